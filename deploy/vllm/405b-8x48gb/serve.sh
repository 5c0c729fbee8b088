#!/usr/bin/env bash
# Llama-3.1-405B, LeanQuant 4-bit group 128, one node of 8 x 48 GB GPUs: vLLM, tensor parallel 8.
# Flags agree with this plan (tests/test_deploy.py runs it and checks that it fits):
# leanquant plan llama-3.1-405b --bits 4 --group-size 128 --gpus 8 --gpu-mem 45 --max-model-len 16384 --concurrency 8 --max-num-batched-tokens 2048 --gpu-memory-utilization 0.9
# Usage: MODEL_DIR=/path/to/checkpoint ./serve.sh [more vllm serve flags]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/../lib.sh
source "$here/../lib.sh"
MODEL_DIR=${MODEL_DIR:-/models/llama-3.1-405b-leanquant-w4g128}

leanquant_serve_and_wait \
  --served-model-name "${SERVED_MODEL_NAME:-llama-3.1-405b-leanquant}" \
  --tensor-parallel-size 8 \
  --max-model-len 16384 \
  --max-num-seqs 8 \
  --max-num-batched-tokens 2048 \
  --gpu-memory-utilization 0.9 \
  --dtype float16 \
  "$@"
