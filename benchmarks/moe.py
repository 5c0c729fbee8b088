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


def config(shape: str, layers: int):
    """The Qwen3MoeConfig of ``shape`` with ``layers`` decoder layers."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **SHAPES[shape], num_hidden_layers=layers, vocab_size=VOCAB, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        torch_dtype="bfloat16",
    )  # fmt: skip


def skeleton(shape: str, layers: int) -> torch.nn.Module:
    """The model on the meta device (shapes and names only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config(shape, layers), dtype=torch.bfloat16)


def layer_params(shape: str) -> int:
    """Parameters of one decoder layer."""
    return sum(p.numel() for p in skeleton(shape, 1).model.layers[0].parameters())


def write_model(path: Path, shape: str, layers: int, seed: int = 0) -> None:
    """A Qwen3-MoE of ``shape`` with random bf16 weights, one shard per decoder layer, under
    the checkpoint names save_pretrained writes (hf_names.to_checkpoint)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from leanquant_serve.format.hf_names import to_checkpoint
    from quantizer.assets import smollm2_dir

    model = skeleton(shape, layers)
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


def quantize(model: Path, out: Path, flags: list[str]) -> dict:
    """One ``leanquant quantize`` process: its report's seconds and peak RSS, its wall and CPU
    seconds, the load average around it, its fallbacks and the expert linears it stored."""
    from leanquant_serve.format import Checkpoint

    cmd = [sys.executable, "-m", "leanquant.cli", "quantize", str(model), str(out), *flags]
    print("$", " ".join(cmd[1:]), flush=True)
    load_before, cpu_before, t = os.getloadavg(), child_cpu_seconds(), time.time()
    p = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
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
    }


def without_mode(flags: list[str]) -> list[str]:
    """A run's quantize flags but its --moe-calibration: the settings its runs share."""
    i = flags.index("--moe-calibration")
    return flags[:i] + flags[i + 2 :]


def summarize(runs: list[dict], full_layers: int) -> dict[str, dict]:
    """Per mode: seconds and CPU seconds per layer (run's / layers of its largest run) and
    their projection to ``full_layers``; with two layer counts, the marginal layer (difference of
    the runs' seconds) and its projection, and the peak RSS of each count."""
    out = {}
    for mode in sorted({r["mode"] for r in runs}):
        rs = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["layers"])
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
        f"{a['bits']}-bit, group {a['group_size']}, affine grid, {a['nsamples']} x {a['seqlen']} "
        f"calibration tokens (wiki-sample), --moe-min-tokens {a['moe_min_tokens']}.",
        "",
        "| mode | layers | run s | CPU s (child) | sublayer quantize s | peak RSS GiB "
        "| expert linears quantized | fell back (starved) | load before → after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        fb = str(r["fallbacks"])
        if r["fallbacks"]:
            t = r["fallback_tokens"]
            fb += f" (tokens {t[0]}..{t[-1]})"
        lines.append(
            f"| {r['mode']} | {r['layers']} | {r['seconds']:.0f} | {r['child_cpu_seconds']:.0f} "
            f"| {r['quantize_seconds']:.0f} | {r['peak_rss_bytes'] / gib:.2f} "
            f"| {r['expert_linears_quantized']} of {r['layers'] * a['experts'] * 3} | {fb} "
            f"| {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |"
        )
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
            f"{max(rss.values()) / (a['layer_params'] * 4):.1f} x one layer in fp32"
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
    a = ap.parse_args(argv)
    counts = sorted({int(x) for x in a.layers.split(",")})
    modes = a.modes.split(",")
    full = a.work / f"synthetic-moe-{a.shape}-{counts[-1]}l"
    cache = a.work / f"moe-bench-{a.shape}-runs"
    common = ["--bits", str(a.bits), "--group-size", str(a.group_size), "--calib", "wiki-sample",
              "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
              "--moe-min-tokens", str(a.moe_min_tokens), "--overwrite", "--fresh"]  # fmt: skip
    for layers in counts:
        for mode in modes:
            flags = [*common[:10], "--moe-calibration", mode, *common[10:]]
            cached = cache / f"{mode}-{layers}l-{'_'.join(flags)}.json"
            if cached.exists() and not a.redo:
                print(f"  {mode}, {layers} layer(s): cached in {cached}", flush=True)
                continue
            if not full.exists():
                write_model(full, a.shape, counts[-1])
            model = full
            if layers < counts[-1]:
                model = full.with_name(f"{full.name}-first{layers}")
                if not model.exists():
                    layer_view(full, model, layers)
            out = a.work / f"moe-bench-{a.shape}"  # removed after each run
            r = {"mode": mode, "flags": flags, **quantize(model, out, flags)}
            shutil.rmtree(out)
            cache.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(r, indent=1))
            print(f"  {mode}, {layers} layer(s): {r['seconds']:.0f} s, peak RSS "
                  f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['fallbacks']} fell back", flush=True)  # fmt: skip
    # every finished run with these settings (any mode, any layer count), this one's or earlier
    runs = [json.loads(f.read_text()) for f in sorted(cache.glob("*.json"))]
    runs = [r for r in runs if without_mode(r["flags"]) == common]
    runs.sort(key=lambda r: (r["layers"], r["mode"] != "all", r["mode"]))
    shape = SHAPES[a.shape]
    settings = {
        "shape": a.shape, "hidden_size": shape["hidden_size"], "experts": shape["num_experts"],
        "top_k": shape["num_experts_per_tok"], "moe_intermediate_size": shape["moe_intermediate_size"],
        "layer_params": layer_params(a.shape), "vocab": VOCAB, "bits": a.bits,
        "group_size": a.group_size, "nsamples": a.nsamples, "seqlen": a.seqlen,
        "moe_min_tokens": a.moe_min_tokens,
    }  # fmt: skip
    command = (
        f"python benchmarks/moe.py --shape {a.shape} --layers {a.layers} --modes {a.modes} "
        f"--nsamples {a.nsamples} --seqlen {a.seqlen}"
    )
    result = {
        "command": command, "machine": machine(), "settings": settings,
        "full_layers": FULL_LAYERS[a.shape], "runs": runs,
        "summary": summarize(runs, FULL_LAYERS[a.shape]),
    }  # fmt: skip
    lines = markdown(result)
    a.out.mkdir(parents=True, exist_ok=True)
    tag = f"moe-{a.shape}-layer"
    (a.out / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
