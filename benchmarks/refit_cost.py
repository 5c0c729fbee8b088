"""Refit cost benchmark (issue 13): CPU seconds of ``--refit`` per weight next to the GPTQ
column loop of the same weight, at SmolLM2's shapes and at wider layers, in one process.

    python benchmarks/refit_cost.py            # ~5 min on one slow core
    python benchmarks/refit_cost.py --quick    # the two small shapes only

Per weight (rows x columns, affine grid, 4 bits, groups as given, act-order + static groups):

- ``loop``: ``quantize_weight`` without refit (LeanQuant's affine fit + GPTQ's column loop);
- ``refit``: the refit alone (``refit_weight`` on the loop's result: per-group GEMM path, rows ·
  columns² multiply-adds);
- ``dense``: the same refit with one product with H per row and parameter (rows · K · columns²,
  the first implementation), where it finishes in reasonable time.

The target (issue 13): LeanQuant's run with refit ≤ 1.5× GPTQ's. The loop is the part of a
run that grows like the refit (columns²); calibration forwards come on top of both, so the
whole-run ratio is smaller than (loop + refit) / loop. H: XᵀX of Gaussian inputs with
correlated columns (the refit's cost does not depend on the values); one thread.
Results: benchmarks/results/refit_cost.{json,md}.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantizer import refit as R  # noqa: E402
from quantizer.gptq import GPTQSettings, quantize_weight  # noqa: E402

# (rows, columns, group): SmolLM2's up/down_proj, then wider layers (8B's o_proj-like, a
# 405B down_proj column count on fewer rows: the cost per row is what scales)
SHAPES = [(1536, 576, 64), (576, 1536, 64), (1024, 4096, 128), (256, 14336, 128)]
DENSE_MAX_COLUMNS = 4096  # the rows·K·columns² path beyond this takes too long to show


def cpu(f, *args):
    t = time.process_time()
    out = f(*args)
    return out, time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows_out = []
    for rows, C, g in SHAPES[:2] if a.quick else SHAPES:
        gen = torch.Generator().manual_seed(0)
        mix = torch.randn(C, C, generator=gen) * (1 / C**0.5) + torch.eye(C)
        X = torch.randn(2 * C, C, generator=gen) @ mix
        H = X.T @ X / X.shape[0]
        W = torch.randn(rows, C, generator=gen) * 0.02
        s = GPTQSettings(bits=4, group_size=g, fit="affine")
        r, loop = cpu(quantize_weight, W, H, s)
        Hd = H + s.damp * torch.diag(H).mean() * torch.eye(C)
        b = R.basis("affine", r.codes, scales=r.scales, zeros=r.zeros, group_size=g)
        res, refit = cpu(R.refit, W, Hd, b, "affine")
        dense = None
        if C <= DENSE_MAX_COLUMNS:
            _, dense = cpu(R.solve, W, Hd, R.Basis(b.k, b.a, b.theta, None))
        drop = 1 - float(res.loss_after.sum() / res.loss_before.sum())
        row = {
            "rows": rows, "columns": C, "group": g, "loop_s": loop, "refit_s": refit,
            "dense_solve_s": dense, "refit_over_loop": refit / loop,
            "loss_drop": drop, "rows_refit": res.rows_refit,
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    meta = {
        "cpu": next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln),
            platform.processor(),
        ),
        "threads": 1,
        "torch": torch.__version__,
        "load_before_after": [load_before, os.getloadavg()],
        "command": "python benchmarks/refit_cost.py" + (" --quick" if a.quick else ""),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "refit_cost.json").write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))
    lines = [
        f"# Refit cost: {meta['cpu']}, 1 thread",
        "",
        f"`{meta['command']}` (torch {meta['torch']}; load average "
        f"{' '.join(f'{x:.2f}' for x in meta['load_before_after'][0])} before, "
        f"{' '.join(f'{x:.2f}' for x in meta['load_before_after'][1])} after, on shared "
        "cores). CPU seconds of this process per weight "
        "(affine, 4 bits, act-order + static groups). `refit / loop`: the refit's cost "
        "over the column loop's for the same weight; `dense`: the refit's solve with one "
        "product with H per row and parameter, as first written.",
        "",
        "| weight (rows x columns, group) | loop s | refit s | refit / loop | dense solve s "
        "| layer-wise loss drop | rows refit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        d = "-" if r["dense_solve_s"] is None else f"{r['dense_solve_s']:.2f}"
        lines.append(
            f"| {r['rows']}x{r['columns']}, g{r['group']} | {r['loop_s']:.2f} "
            f"| {r['refit_s']:.2f} | {r['refit_over_loop']:.2f} | {d} | {r['loss_drop']:.2%} "
            f"| {r['rows_refit']}/{r['rows']} |"
        )
    (a.out / "refit_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
