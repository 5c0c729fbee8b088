#!/usr/bin/env bash
# Llama-3.1-8B, LeanQuant 4-bit group 128, one 24 GB GPU: vLLM.
# Flags agree with this plan (tests/test_deploy.py runs it and checks that it fits):
# leanquant plan llama-3.1-8b --bits 4 --group-size 128 --gpus 1 --gpu-mem 22 --max-model-len 16384 --concurrency 4 --max-num-batched-tokens 2048 --gpu-memory-utilization 0.9
# Usage: MODEL_DIR=/path/to/checkpoint ./serve.sh [more vllm serve flags]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/../lib.sh
source "$here/../lib.sh"
MODEL_DIR=${MODEL_DIR:-/models/llama-3.1-8b-leanquant-w4g128}

leanquant_serve_and_wait \
  --served-model-name "${SERVED_MODEL_NAME:-llama-3.1-8b-leanquant}" \
  --tensor-parallel-size 1 \
  --max-model-len 16384 \
  --max-num-seqs 4 \
  --max-num-batched-tokens 2048 \
  --gpu-memory-utilization 0.9 \
  --dtype float16 \
  "$@"
