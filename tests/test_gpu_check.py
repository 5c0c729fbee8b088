"""benchmarks/gpu_check.py, the prepared GPU run (issue 17), kept from rotting without a GPU:
its dry mode runs every part on the CPU with tiny shapes and writes the same files; the runner
keeps going past a part that fails, crashes or runs out of time; what travels to the GPU
machine fits its 64 MiB; the results fit the 8 files that come back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check as gc  # noqa: E402  (imports no torch)


def test_what_travels_and_what_comes_back_fit():
    c = gc.carry_report()
    assert gc.EXL2_WHEEL in c["carry"]  # counted whether fetched here or not
    assert c["total_bytes"] == c["tree_bytes"] + sum(x["bytes"] for x in c["carry"].values())
    assert c["fits"] and c["total_bytes"] <= 64 * 2**20, c
    assert len(gc.RUN_COMMAND) <= 2000  # the device tool's command limit
    assert len(gc.RESULT_FILES) <= 8 == gc.MAX_RESULT_FILES
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in gc.RESULT_FILES)
    # the parts' own limits fit the 8 minutes (the last one takes what is left)
    assert sum(p.limit_s or 0 for p in gc.PARTS) <= gc.BUDGET_S + 60
    assert sum(p.expected_s for p in gc.PARTS) <= gc.BUDGET_S - gc.RESERVE_S


def test_runner_goes_on_after_a_crash_a_timeout_and_an_exhausted_budget(tmp_path):
    ctx = gc.Ctx(out=tmp_path / "out", work=tmp_path / "work")
    ctx.work.mkdir()
    write_ok = (
        "import json, sys; from pathlib import Path; "
        "Path(sys.argv[1]).write_text(json.dumps({'status': 'ok', 'summary': 'fine'}))"
    )
    commands = {
        "crash": [sys.executable, "-c", "raise SystemExit(3)"],
        "hang": [sys.executable, "-c", "import time; time.sleep(60)"],
        "fine": [sys.executable, "-c", write_ok, str(ctx.work / "fine.status.json")],
        "late": [sys.executable, "-c", "pass"],
    }
    parts = [
        gc.Part("crash", 1, 10, ""),
        gc.Part("hang", 1, 2, ""),
        gc.Part("fine", 1, 10, ""),
        gc.Part("late", 1, None, ""),
    ]
    calls = []

    def before(part, deadline):
        calls.append(part.name)
        if part.name == "late":  # the budget is spent by the time the last part comes up
            time.sleep(max(0.0, deadline - time.monotonic()))

    t = time.monotonic()
    st = gc.run_parts(
        parts, ctx, time.monotonic() + 5, inline=False, command=lambda n, c: commands[n],
        before=before, reserve_s=0, min_s=1,
    )  # fmt: skip
    assert time.monotonic() - t < 15
    assert calls == ["crash", "hang", "fine", "late"]
    assert st["crash"]["status"] == "failed" and "exit code 3" in st["crash"]["error"]
    assert st["hang"]["status"] == "timeout" and st["hang"]["seconds"] < 10
    assert st["fine"]["status"] == "ok" and st["fine"]["summary"] == "fine"
    assert st["late"]["status"] == "skipped"
    lines = gc.summary_lines(
        {"dry": True, "budget_s": 8, "out": "x", "carry": gc.carry_report()}, st, 8.0
    )
    assert any(line.startswith("hang") and "timeout" in line for line in lines)


def test_projection_scales_only_the_token_proportional_part():
    subs = {
        "q_proj": {"hessian_seconds": 1.0, "group_quantize_seconds": 10.0},
        "o_proj": {"hessian_seconds": 2.0, "group_quantize_seconds": 5.0},
        "gate_proj": {"hessian_seconds": 3.0, "group_quantize_seconds": 20.0},
        "down_proj": {"hessian_seconds": 4.0, "group_quantize_seconds": 25.0},
    }
    r = {"seconds": 70.0, "advance_seconds": 2.0, "sublayers": subs}
    p = gc.project(r, list(subs), nsamples=16, seqlen=2048)  # 1/8 of the paper's tokens
    assert p["token_scale"] == 8
    assert p["hessian_and_forward_seconds"] == 12 and p["quantize_seconds"] == 60
    assert p["layer_seconds_at_paper_tokens"] == 12 * 8 + 60
    assert p["projected_1gpu_hours"] == pytest.approx(126 * 156 / 3600)
    assert p["projected_2gpu_hours"] == pytest.approx(126 * (96 + 30) / 3600)
    assert p["paper_hours"] == 21


@pytest.mark.slow  # the script end to end in a subprocess: ~15-30 s on 2 busy cores
def test_dry_run_writes_every_file_and_survives_a_failing_part(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--out", str(out), "--inject-fail", "scale:affine"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # injected failure
    assert sorted(f.name for f in out.iterdir()) == sorted(gc.RESULT_FILES)
    assert all(f.stat().st_size < 16 * 2**20 for f in out.iterdir())

    summary = json.loads((out / "gpu_check.json").read_text())
    parts = summary["parts"]
    assert list(parts) == [p.name for p in gc.PARTS]
    assert parts["scale:affine"]["status"] == "failed"
    assert "injected failure" in parts["scale:affine"]["error"]
    # every other part ran, after the failure too, and passed
    assert all(st["status"] == "ok" for n, st in parts.items() if n != "scale:affine"), parts
    assert summary["meta"]["carry"]["fits"] and not summary["ok"]
    assert len(summary["summary"]) <= 24  # one screen
    assert proc.stdout.rstrip().endswith(summary["summary"][-1])  # printed last

    det = json.loads((out / "determinism.json").read_text())
    assert det["status"] == "ok" and set(det["grids"]) == set(gc.DET_GRIDS_DRY)
    for g in det["grids"].values():
        assert g["twice_same_bytes"] and g["vs_cpu_same_bytes"]
        assert {"codes_differ_fraction", "max_abs_weight_diff", "tensors"} <= set(g["vs_cpu"])

    lut = json.loads((out / "lut_kernel.json").read_text())
    assert lut["correct"] and all(c["within_bound"] for c in lut["correctness"])
    assert {c["bits"] for c in lut["correctness"]} == {2, 3, 4, 8}
    assert len(lut["rows"]) == 6 and {r["m"] for r in lut["rows"]} == {1, 16}
    assert all({"fp16", "torch-deq", "lut", "lut-regs"} == set(r["ms"]) for r in lut["rows"])
    assert "Correctness first" in (out / "lut_kernel.md").read_text()

    scale = json.loads((out / "scale.json").read_text())
    assert scale["grids"]["affine"]["status"] == "failed"
    for grid in ("minmax", "nonuniform"):
        proj = scale["grids"][grid]["projection"]
        assert proj["projected_1gpu_hours"] > 0 and proj["paper_hours"] == 21
        assert proj["projected_2gpu_hours"] <= proj["projected_1gpu_hours"]
        assert scale["grids"][grid]["result"]["advance_seconds"] > 0
    assert "| affine | failed" in (out / "scale.md").read_text()

    exl2 = json.loads((out / "exllamav2.json").read_text())
    assert exl2["status"] == "ok" and set(exl2["formats"]) == {"gptq", "exl2"}
    assert all(f["layers"] == 14 and f["reference_logits_finite"] for f in exl2["formats"].values())
    md = (out / "gpu_check.md").read_text()
    assert "## scale.md" in md and "## lut_kernel.md" in md
