#!/usr/bin/env bash
# Qwen3-235B-A22B (MoE: 128 experts, 8 per token), LeanQuant 4-bit group 64, one node of
# 8 x 48 GB GPUs: vLLM, tensor parallel 8, every expert split over the 8 ranks (vLLM's default).
# Group 64, not 128: each expert's down_proj gets 1536 / 8 = 192 inputs per rank, three whole
# groups of 64 (a group of 128 would be cut; `leanquant plan` refuses it and says so).
# Quantize with: leanquant quantize /models/Qwen3-235B-A22B OUT --bits 4 --group-size 64 ...
# The experts' 4-bit size assumes a quantized MoE kernel: the plugin hands these experts to
# vLLM's WNA16 MoE kernels on CUDA (written against vLLM 0.32, not run on a GPU yet); its
# portable path dequantizes experts at load, needs 52.88 GiB per GPU and does not fit
# (see deploy/README.md).
# Flags agree with this plan (tests/test_deploy.py runs it and checks that it fits):
# leanquant plan qwen3-235b-a22b --bits 4 --group-size 64 --gpus 8 --gpu-mem 45 --max-model-len 32768 --concurrency 8 --max-num-batched-tokens 2048 --gpu-memory-utilization 0.9
# Usage: MODEL_DIR=/path/to/checkpoint ./serve.sh [more vllm serve flags]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/../lib.sh
source "$here/../lib.sh"
MODEL_DIR=${MODEL_DIR:-/models/qwen3-235b-a22b-leanquant-w4g64}

leanquant_serve_and_wait \
  --served-model-name "${SERVED_MODEL_NAME:-qwen3-235b-a22b-leanquant}" \
  --tensor-parallel-size 8 \
  --max-model-len 32768 \
  --max-num-seqs 8 \
  --max-num-batched-tokens 2048 \
  --gpu-memory-utilization 0.9 \
  --dtype float16 \
  "$@"
