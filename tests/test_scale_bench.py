"""benchmarks/scale.py runs end to end on a scaled-down layer (the 405B shape needs a GPU)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

# a benchmark script end to end in subprocesses: about a minute
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale.py"


def run_bench(tmp_path: Path, device: str) -> dict:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--shape",
        "tiny",
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--group-size",
        "32",
        "--device",
        device,
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    suffix = "" if "," not in device else f"-x{len(device.split(','))}"
    assert "| nonuniform |" in (tmp_path / f"scale-tiny-cpu{suffix}.md").read_text()
    return json.loads((tmp_path / f"scale-tiny-cpu{suffix}.json").read_text())


def test_scaled_down_layer(tmp_path):
    data = run_bench(tmp_path, "cpu")
    assert set(data["results"]) == {"minmax", "affine", "nonuniform"}
    for r in data["results"].values():
        assert r["seconds"] > 0 and r["peak_bytes"] > 0
        assert len(r["sublayers"]) == 7
        assert all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in r["sublayers"].values())
        assert r["sublayers"]["down_proj"]["shape"] == [128, 416]
        assert r["projected_405b_hours"] is None  # only the 405B shape is projected

    # Two (CPU) workers split every group's rows and give the same layer: equal losses.
    split = run_bench(tmp_path, "cpu,cpu")
    for grid, r in split["results"].items():
        for name, sub in r["sublayers"].items():
            assert math.isclose(
                sub["loss"], data["results"][grid]["sublayers"][name]["loss"], rel_tol=1e-5
            ), (grid, name)


def test_405b_shape_refuses_the_cpu(tmp_path):
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert p.returncode != 0 and "needs a GPU" in p.stderr
    assert not list(tmp_path.iterdir())
