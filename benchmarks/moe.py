"""MoE benchmark: time and peak resident memory to quantize Qwen3-30B-A3B-shaped
Mixture-of-Experts decoder layers on this machine's CPU with ``leanquant quantize``,
``--moe-calibration all`` against ``routed``, and the projection to the whole 48-layer model.

    python benchmarks/moe.py                        # 1 layer, all and routed (minutes per run)
    python benchmarks/moe.py --layers 1,2 --modes all   # does the peak grow with the layers?
    python benchmarks/moe.py --shape tiny --nsamples 4 --seqlen 32   # seconds; what the test runs

The model: ``transformers.Qwen3MoeConfig`` with Qwen3-30B-A3B's published layer shapes
(hidden 2048, 32 query / 4 KV heads of 128, 128 experts of intermediate 768, top-8,
normalised top-k weights) but only ``--layers`` decoder layers and the bundled SmolLM2's
vocabulary (49152, its tokenizer; the real model has 151936): random bf16 weights (std 0.02,
norms 1) written once to ``--work`` (default runs/, git-ignored) as synthetic-moe-<shape>-<L>l,
one safetensors shard per decoder layer, under the names ``save_pretrained`` writes (the hub
layout, one tensor per expert linear: what the quantizer reads through transformers'
checkpoint conversion for real checkpoints). Fewer layers than the largest count are views of
those shards (benchmarks/memory.py's ``layer_view``).

Every quantization is its own ``leanquant quantize`` process (4-bit, group 128, the default
affine grid, ``--calib wiki-sample``, ``--nsamples`` x ``--seqlen`` windows). Its time and peak
RSS are the ones its ``quantize_report.json`` records (ru_maxrss of that process); its CPU
seconds (user + system) come from ``resource.getrusage(RUSAGE_CHILDREN)`` before and after,
since the machine may be shared (the load average before and after each run is recorded too).
Per layer: the run's seconds / its layers (fixed costs — loading, the embeddings, writing the
head — are thus counted once per layer, so the 48-layer projection overestimates slightly);
with two layer counts of one mode, the difference is the marginal layer, and the peak RSS of
both says whether memory grows with the layers. Finished runs are kept in
``--work``/moe-bench-<shape>-runs and reused; the table holds every finished run with the same
settings (any mode, any layer count), so ``--layers 2 --modes all`` adds a row to an earlier
``--layers 1`` table. Results:
benchmarks/results/moe-<shape>-layer.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memory import layer_view  # noqa: E402

SHAPES = {
    # Qwen/Qwen3-30B-A3B's config.json (transformers' Qwen3MoeConfig documents this checkpoint;
    # its defaults have 24 layers and no head_dim: the published model has 48 and 128)
    "qwen3-30b-a3b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
    ),  # fmt: skip
    "tiny": dict(  # group 128 divides every input width
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        norm_topk_prob=True,
        max_position_embeddings=256,
    ),  # fmt: skip
}
FULL_LAYERS = {"qwen3-30b-a3b": 48, "tiny": 48}  # the projection's layer count
VOCAB = 49152  # the bundled SmolLM2 tokenizer's
EXPERT_LINEAR = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.qweight$")


def shape_config(shape: str, experts: int | None = None) -> dict:
    """The config fields of ``shape``, with ``experts`` experts instead of its own (a reduced
    layer: the same linears, fewer of them; top-k at most the experts)."""
    c = dict(SHAPES[shape])
    if experts is not None:
        c["num_experts"] = experts
        c["num_experts_per_tok"] = min(c["num_experts_per_tok"], experts)
    return c


def tag(shape: str, experts: int | None = None) -> str:
    """The name of ``shape`` with ``experts`` experts: ``shape``, or ``shape``-e<experts>."""
    return shape if experts is None else f"{shape}-e{experts}"


def config(shape: str, layers: int, experts: int | None = None):
    """The Qwen3MoeConfig of ``shape`` with ``layers`` decoder layers (and ``experts``)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **shape_config(shape, experts), num_hidden_layers=layers, vocab_size=VOCAB, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        torch_dtype="bfloat16",
    )  # fmt: skip


def skeleton(shape: str, layers: int, experts: int | None = None) -> torch.nn.Module:
    """The model on the meta device (shapes and names only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        cfg = config(shape, layers, experts)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def layer_params(shape: str, experts: int | None = None) -> int:
    """Parameters of one decoder layer."""
    return sum(p.numel() for p in skeleton(shape, 1, experts).model.layers[0].parameters())


def write_model(
    path: Path, shape: str, layers: int, seed: int = 0, experts: int | None = None
) -> None:
    """A Qwen3-MoE of ``shape`` with random bf16 weights, one shard per decoder layer, under
    the checkpoint names save_pretrained writes (hf_names.to_checkpoint)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from leanquant_serve.format.hf_names import to_checkpoint
    from quantizer.assets import smollm2_dir

    model = skeleton(shape, layers, experts)
    g = torch.Generator().manual_seed(seed)

    def rand(name: str, p: torch.Tensor) -> torch.Tensor:
        if "norm" in name:
            return torch.ones(p.shape, dtype=torch.bfloat16)
        return torch.randn(p.shape, generator=g, dtype=torch.bfloat16) * 0.02

    def part(prefix: str) -> dict[str, torch.Tensor]:
        if prefix.startswith("model.layers."):
            want = lambda n: n.startswith(prefix)  # noqa: E731
        else:
            want = lambda n: not n.startswith("model.layers.")  # noqa: E731
        tensors = {n: rand(n, p) for n, p in model.state_dict().items() if want(n)}
        return to_checkpoint(model, tensors)

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # embeddings, norm and head first: each layer's weights are then the same for any count
    parts = ["outer"] + [f"model.layers.{i}." for i in range(layers)]
    weight_map, total = {}, 0
    for n, prefix in enumerate(parts, 1):
        name = f"model-{n:05d}-of-{len(parts):05d}.safetensors"
        tensors = part(prefix)
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
        print(f"\rwriting {path.name}: shard {n}/{len(parts)}", end="", flush=True)
    print()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    model.config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(tmp)
    tmp.rename(path)


def machine() -> dict:
    """CPU kind, core count, torch threads, RAM."""
    cpu = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        cpu.setdefault(key.strip(), value.strip())
    return {
        "cpu": cpu.get("model name", "unknown"),
        "avx512f": "avx512f" in cpu.get("flags", "").split(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "torch": torch.__version__,
    }


def child_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def code_label(repo: Path) -> str:
    """The checkout ``repo``'s commit, "+wip" when its code differs from the commit."""
    git = ["git", "-C", str(repo)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        sys.exit(f"benchmarks/moe.py: {repo} is not a git checkout: name its code with --label")
    changed = subprocess.run(
        [*git, "status", "--porcelain", "--", "quantizer", "leanquant", "leanquant_serve"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return head.stdout.strip() + ("+wip" if changed else "")


def quantize(
    model: Path, out: Path, flags: list[str], repo: Path = ROOT, trace: Path | None = None
) -> dict:
    """One ``leanquant quantize`` process of the checkout ``repo``: its report's seconds and
    peak RSS, its wall and CPU seconds, the load average around it, its fallbacks and the
    expert linears it stored; with ``trace`` (a JSON file), run under benchmarks/rss_phases.py:
    the peak RSS of each quantizer step too."""
    from leanquant_serve.format import Checkpoint

    args = ["quantize", str(model), str(out), *flags]
    if trace is None:
        cmd = [sys.executable, "-m", "leanquant.cli", *args]
    else:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "rss_phases.py"), str(trace), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    load_before, cpu_before, t = os.getloadavg(), child_cpu_seconds(), time.time()
    p = subprocess.run(cmd, cwd=repo, env=env, stderr=subprocess.PIPE, text=True)
    wall, cpu = time.time() - t, child_cpu_seconds() - cpu_before
    if p.returncode != 0:
        sys.exit(
            f"benchmarks/moe.py: leanquant quantize failed ({p.returncode}):\n{p.stderr[-3000:]}"
        )
    report = json.loads((out / "quantize_report.json").read_text())
    experts = [n for n in Checkpoint(out).tensor_names() if EXPERT_LINEAR.search(n)]
    fallbacks = report.get("moe_fallbacks", [])
    return {
        "seconds": report["seconds"],
        "wall_seconds": wall,
        "child_cpu_seconds": cpu,
        "peak_rss_bytes": report["peak_rss_bytes"],
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "layers": len(report["layers"]),
        "quantize_seconds": sum(r["seconds"] for layer in report["layers"] for r in layer),
        "sublayers": sum(len(layer) for layer in report["layers"]),
        "expert_linears_quantized": len(experts),
        "fallbacks": len(fallbacks),
        "fallback_tokens": sorted(f["tokens"] for f in fallbacks),
        "activation_bytes": report.get("activation_bytes"),
        "quantized_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        **({} if trace is None else {"rss_trace": json.loads(trace.read_text())}),
    }


def without_mode(flags: list[str]) -> list[str]:
    """A run's quantize flags but its --moe-calibration: the settings its runs share."""
    i = flags.index("--moe-calibration")
    return flags[:i] + flags[i + 2 :]


def run_key(r: dict, runs: list[dict]) -> str:
    """What a run's summary is keyed by: its mode, and the code that ran (``--label``) where
    ``runs`` hold runs of more than one code."""
    codes = {x.get("code") for x in runs}
    return r["mode"] if len(codes) <= 1 else f"{r['mode']}, {r.get('code')}"


def summarize(runs: list[dict], full_layers: int) -> dict[str, dict]:
    """Per mode (and code, run_key): seconds and CPU seconds per layer (run's / layers of its largest run) and
    their projection to ``full_layers``; with two layer counts, the marginal layer (difference of
    the runs' seconds) and its projection, and the peak RSS of each count."""
    out = {}
    for mode in sorted({run_key(r, runs) for r in runs}):
        rs = sorted((r for r in runs if run_key(r, runs) == mode), key=lambda r: r["layers"])
        big = rs[-1]
        per_layer = big["seconds"] / big["layers"]
        cpu = big["child_cpu_seconds"] / big["layers"]
        s = {
            "seconds_per_layer": per_layer,
            "projected_seconds": per_layer * full_layers,
            "cpu_seconds_per_layer": cpu,
            "projected_cpu_seconds": cpu * full_layers,
            "peak_rss_bytes_by_layers": {str(r["layers"]): r["peak_rss_bytes"] for r in rs},
        }
        if len(rs) > 1:
            a, b = rs[0], rs[-1]
            marginal = (b["seconds"] - a["seconds"]) / (b["layers"] - a["layers"])
            s["marginal_seconds_per_layer"] = marginal
            s["projected_seconds_marginal"] = a["seconds"] + marginal * (full_layers - a["layers"])
            s["peak_rss_ratio"] = b["peak_rss_bytes"] / a["peak_rss_bytes"]
        out[mode] = s
    return out


def markdown(result: dict) -> list[str]:
    m, a, gib = result["machine"], result["settings"], 2**30
    lines = [
        f"## {a['shape']}-shaped MoE decoder layers quantized on CPU: "
        + " vs ".join(f"`--moe-calibration {x}`" for x in result["summary"]),
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {m['cpu']} ({'AVX-512' if m['avx512f'] else 'no AVX-512'}), "
        f"{m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
        f"{m['ram_bytes'] / gib:.1f} GiB RAM; shared with other jobs (load average in the table). "
        f"Model: Qwen3MoeConfig with {a['experts']} experts of intermediate "
        f"{a['moe_intermediate_size']}, top-{a['top_k']}, hidden {a['hidden_size']}; "
        f"one decoder layer = {a['layer_params'] / 1e6:.1f} M parameters "
        f"({a['layer_params'] * 2 / gib:.2f} GiB bf16, {a['layer_params'] * 4 / gib:.2f} GiB fp32). "
        f"{a['bits']}-bit, group {a['group_size']}, {a.get('grid', 'affine')} grid, "
        f"{a['nsamples']} x {a['seqlen']} "
        f"calibration tokens (wiki-sample), --moe-min-tokens {a['moe_min_tokens']}"
        + (f", --skip {a['skip']} (left dense)" if a.get("skip") else "")
        + ".",
        "",
        "| mode | code | layers | run s | CPU s (child) | sublayer quantize s | peak RSS GiB "
        "| x layer fp32 | expert linears quantized | fell back (routed, starved) "
        "| load before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp32 = a["layer_params"] * 4
    for r in result["runs"]:
        fb = str(r["fallbacks"])
        if r["fallbacks"]:
            t = r["fallback_tokens"]
            fb += f" (tokens {t[0]}..{t[-1]})"
        lines.append(
            f"| {r['mode']} | {r.get('code', '')} | {r['layers']} | {r['seconds']:.0f} "
            f"| {r['child_cpu_seconds']:.0f} | {r['quantize_seconds']:.0f} "
            f"| {r['peak_rss_bytes'] / gib:.2f} | {r['peak_rss_bytes'] / fp32:.2f} "
            f"| {r['expert_linears_quantized']} of {r['layers'] * a['experts'] * 3} | {fb} "
            f"| {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |"
        )
    traced = [r for r in result["runs"] if "rss_trace" in r]
    if traced:
        phases = sorted(
            {p for r in traced for p in r["rss_trace"]["phases"]},
            key=lambda p: -max(r["rss_trace"]["phases"].get(p, 0) for r in traced),
        )
        lines += [
            "",
            "Peak RSS (GiB) in each quantizer step (benchmarks/rss_phases.py: RSS sampled every "
            "10 ms, each sample counted in the step running then; * the run's peak). Above the "
            "first layer: the peak minus the RSS as the first decoder layer begins loading "
            "(interpreter, torch, skeleton, calibration inputs, the writer's buffer of the "
            "embeddings and head), in GiB and in layers in fp32:",
            "",
            "| step | " + " | ".join(f"{run_key(r, traced)}, {r['layers']} l" for r in traced) + " |",
            "|---|" + "---|" * len(traced),
        ]
        cells = []
        for r in traced:
            t = r["rss_trace"]
            if t.get("first_layer_rss_bytes") is None:
                cells.append("")
            else:
                above = t["peak_rss_bytes"] - t["first_layer_rss_bytes"]
                cells.append(f"{above / gib:.2f} ({above / fp32:.2f} x)")
        lines.append("| **peak above the first layer** | " + " | ".join(cells) + " |")
        for p in phases:
            cells = []
            for r in traced:
                v = r["rss_trace"]["phases"].get(p)
                star = "*" if p == r["rss_trace"]["peak_phase"] else ""
                cells.append("" if v is None else f"{v / gib:.2f}{star}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    full = result["full_layers"]
    lines += [
        "",
        f"Projection to the whole {full}-layer model (a run's seconds / its layers x {full}; "
        "fixed costs are counted per layer, so an overestimate; wall time depends on the "
        "machine's load, CPU seconds much less):",
        "",
    ]
    for mode, s in result["summary"].items():
        rss = s["peak_rss_bytes_by_layers"]
        line = (
            f"- {mode}: {s['seconds_per_layer']:.0f} s per layer -> "
            f"{s['projected_seconds'] / 3600:.1f} h; {s['cpu_seconds_per_layer']:.0f} CPU s per "
            f"layer -> {s['projected_cpu_seconds'] / 3600:.1f} CPU hours (at least "
            f"{s['projected_cpu_seconds'] / m['torch_threads'] / 3600:.1f} h on "
            f"{m['torch_threads']} idle threads). Peak RSS "
            f"{max(rss.values()) / (a['layer_params'] * 4):.2f} x one layer in fp32"
        )
        if "marginal_seconds_per_layer" in s:
            counts = sorted(rss, key=int)
            line += (
                f"; marginal layer {s['marginal_seconds_per_layer']:.0f} s -> "
                f"{s['projected_seconds_marginal'] / 3600:.1f} h. Peak RSS "
                + " vs ".join(f"{rss[c] / gib:.2f} GiB ({c} layers)" for c in counts)
                + f": x{s['peak_rss_ratio']:.2f}"
            )
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=SHAPES, default="qwen3-30b-a3b")
    ap.add_argument(
        "--experts", type=int, default=None,
        help="experts per layer instead of the shape's (a reduced layer: minutes, not an hour; "
        "its runs, model and results are named <shape>-e<experts>)",
    )  # fmt: skip
    ap.add_argument("--layers", default="1", help="decoder layer counts to run, e.g. 1,2")
    ap.add_argument("--modes", default="all,routed", help="--moe-calibration values to run")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--moe-min-tokens", type=int, default=64)
    ap.add_argument(
        "--work", type=Path, default=ROOT / "runs",
        help="where the synthetic models, the checkpoints being written and the finished runs "
        "(moe-bench-<shape>-runs) go",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--redo", action="store_true", help="measure cached runs again")
    ap.add_argument(
        "--repo", type=Path, default=ROOT,
        help="the checkout whose quantizer runs (e.g. an older commit's files, to measure "
        "before and after a change on one model); default this one",
    )  # fmt: skip
    ap.add_argument(
        "--label", default=None,
        help="the code's name in the table (default: --repo's commit, +wip if its code is "
        "changed)",
    )  # fmt: skip
    ap.add_argument(
        "--trace",
        action="store_true",
        help="run each quantize under benchmarks/rss_phases.py: the peak RSS of each step",
    )
    ap.add_argument(
        "--skip",
        default=None,
        help="a quantize --skip regex, e.g. self_attn: the attention left dense (a memory "
        "measurement of the experts alone, without its minutes of column loop)",
    )
    ap.add_argument(
        "--grid",
        default="affine",
        help="the quantize --grid (minmax: the same tensors held, minutes less of grid search)",
    )
    a = ap.parse_args(argv)
    counts = sorted({int(x) for x in a.layers.split(",")})
    modes = a.modes.split(",")
    name = tag(a.shape, a.experts)
    full = a.work / f"synthetic-moe-{name}-{counts[-1]}l"
    cache = a.work / f"moe-bench-{name}-runs"
    common = ["--bits", str(a.bits), "--group-size", str(a.group_size), "--calib", "wiki-sample",
              "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
              "--moe-min-tokens", str(a.moe_min_tokens), "--overwrite", "--fresh"]  # fmt: skip
    if a.grid != "affine":  # (flags of earlier runs unchanged: their cached runs still count)
        common = ["--grid", a.grid, *common]
    if a.skip is not None:
        common = ["--skip", a.skip, *common]
    label = a.label or code_label(a.repo)
    n = common.index("--overwrite")
    for layers in counts:
        for mode in modes:
            flags = [*common[:n], "--moe-calibration", mode, *common[n:]]
            code = "" if a.repo == ROOT and a.label is None and not a.trace else f"-{label}"
            cached = cache / (
                f"{mode}-{layers}l{code}{'-trace' if a.trace else ''}-{'_'.join(flags)}.json"
            )
            if cached.exists() and not a.redo:
                print(f"  {mode}, {layers} layer(s): cached in {cached}", flush=True)
                continue
            if not full.exists():
                write_model(full, a.shape, counts[-1], experts=a.experts)
            model = full
            if layers < counts[-1]:
                model = full.with_name(f"{full.name}-first{layers}")
                if not model.exists():
                    layer_view(full, model, layers)
            out = a.work / f"moe-bench-{name}.{os.getpid()}"  # removed after each run
            trace = cache / f"trace-{os.getpid()}.tmp" if a.trace else None
            if trace is not None:
                cache.mkdir(parents=True, exist_ok=True)
            r = {"mode": mode, "code": label, "flags": flags,
                 **quantize(model, out, flags, a.repo.resolve(), trace)}  # fmt: skip
            if trace is not None:
                trace.unlink()
            shutil.rmtree(out)
            cache.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(r, indent=1))
            print(f"  {mode}, {layers} layer(s): {r['seconds']:.0f} s, peak RSS "
                  f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['fallbacks']} fell back", flush=True)  # fmt: skip
    # every finished run with these settings (any mode, any layer count), this one's or earlier
    runs = [json.loads(f.read_text()) for f in sorted(cache.glob("*.json"))]
    runs = [r for r in runs if without_mode(r["flags"]) == common]
    runs.sort(key=lambda r: (r["layers"], r["mode"] != "all", r["mode"], r.get("code", "")))
    shape = shape_config(a.shape, a.experts)
    settings = {
        "shape": name, "hidden_size": shape["hidden_size"], "experts": shape["num_experts"],
        "top_k": shape["num_experts_per_tok"], "moe_intermediate_size": shape["moe_intermediate_size"],
        "layer_params": layer_params(a.shape, a.experts), "vocab": VOCAB, "bits": a.bits,
        "group_size": a.group_size, "nsamples": a.nsamples, "seqlen": a.seqlen,
        "moe_min_tokens": a.moe_min_tokens, "grid": a.grid, "skip": a.skip,
    }  # fmt: skip
    command = (
        f"python benchmarks/moe.py --shape {a.shape}"
        + (f" --experts {a.experts}" if a.experts is not None else "")
        + f" --layers {a.layers} --modes {a.modes} "
        f"--nsamples {a.nsamples} --seqlen {a.seqlen}"
        + (f" --grid {a.grid}" if a.grid != "affine" else "")
        + (f" --skip {a.skip}" if a.skip is not None else "")
        + (" --trace" if a.trace else "")
    )
    result = {
        "command": command, "machine": machine(), "settings": settings,
        "full_layers": FULL_LAYERS[a.shape], "runs": runs,
        "summary": summarize(runs, FULL_LAYERS[a.shape]),
    }  # fmt: skip
    lines = markdown(result)
    a.out.mkdir(parents=True, exist_ok=True)
    out_tag = f"moe-{name}-layer"
    (a.out / f"{out_tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / f"{out_tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
