"""benchmarks/scale.py runs end to end on a scaled-down layer (the 405B shape needs a GPU)."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale.py"


def test_scaled_down_layer(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--nsamples", "2", "--seqlen", "32",
           "--group-size", "32", "--device", "cpu", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    data = json.loads((tmp_path / "scale-tiny-cpu.json").read_text())
    assert set(data["results"]) == {"minmax", "affine", "nonuniform"}
    for r in data["results"].values():
        assert r["seconds"] > 0 and r["peak_bytes"] > 0
        assert len(r["sublayers"]) == 7
        assert all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in r["sublayers"].values())
        assert r["sublayers"]["down_proj"]["shape"] == [128, 416]
        assert r["projected_405b_hours_1_device"] is None  # only the 405B shape is projected
    assert "| nonuniform |" in (tmp_path / "scale-tiny-cpu.md").read_text()


def test_405b_shape_refuses_the_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "needs a GPU" in p.stderr
    assert not list(tmp_path.iterdir())
