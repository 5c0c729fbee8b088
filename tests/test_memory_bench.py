"""benchmarks/memory.py runs end to end on a tiny synthetic model (the recorded runs use the
Llama-3.1-8B shape, which takes about half an hour here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

# a benchmark script end to end in subprocesses: minutes on 2 cores
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory.py"


def test_tiny_synthetic_model(tmp_path):
    model = tmp_path / "synthetic"
    common = [sys.executable, str(SCRIPT), "--shape", "tiny", "--model-dir", str(model),
              "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "results")]  # fmt: skip
    subprocess.run([*common, "--layers", "2"], check=True, capture_output=True, cwd=ROOT)
    subprocess.run([*common, "--rtn", "--grid", "minmax"], check=True, capture_output=True, cwd=ROOT)

    # One shard per decoder layer (+ embeddings, + norm/head); the 2-layer view links to them.
    assert len(list(model.glob("model-*.safetensors"))) == 3 + 2
    with safe_open(model / "model-00002-of-00005.safetensors", "pt") as h:
        assert h.get_tensor("model.layers.0.mlp.down_proj.weight").shape == (128, 384)
    view = model.with_name("synthetic-first2")
    assert all(f.is_symlink() for f in view.glob("*.safetensors"))
    assert json.loads((view / "config.json").read_text())["num_hidden_layers"] == 2

    cal = json.loads((tmp_path / "results" / "memory-tiny-2l.json").read_text())
    rtn = json.loads((tmp_path / "results" / "memory-tiny-3l-rtn.json").read_text())
    assert cal["layers"] == 2 and rtn["layers"] == 3 and rtn["rtn"] and not cal["rtn"]
    # The quantizer's own count of the activations matches the arithmetic (bf16, hidden 128).
    assert cal["report_activation_bytes"] == cal["activation_bytes"] == 4 * 32 * 128 * 2
    for r in (cal, rtn):
        assert r["peak_rss_bytes"] > 0 and r["sampled_peak_anon_bytes"] > 0
        assert 0 < r["quantized_bytes"] < r["model_bytes"]
    assert not (tmp_path / "memory-bench-tiny").exists()  # the checkpoint is removed
