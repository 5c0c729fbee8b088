"""Scale benchmark: time and peak memory to quantize ONE Llama-3.1-405B-shaped decoder layer,
per grid, exactly as the pipeline does it (true-sequential groups q/k/v -> o -> gate/up ->
down; each group's Hessian from a forward pass of the already-quantized upstream), with random
weights and random calibration activations, and the projection to the whole model.

    python benchmarks/scale.py --device cuda                 # 405B layer, 128 x 2048 tokens (GPU)
    python benchmarks/scale.py --device cuda:0,cuda:1        # the same on two GPUs
    python benchmarks/scale.py --shape small --nsamples 4 --seqlen 128   # CPU smoke run

Layer: hidden 16384, intermediate 53248, 128 heads of 128, 8 KV heads (Llama-3.1-405B).
Each group is quantized by the pipeline's own ``quantize_group`` on ``--devices`` (e.g.
``cuda:0,cuda:1``: Hessians on the second, rows split over both), so the measured time is
what ``leanquant quantize --device`` with the same list would take per layer.
Projection: 126 layers x the measured layer time (its groups, plus ``advance_seconds``: the
forward of every window through the quantized layer, which makes the next layer's inputs).
The paper's reference: 21 h for 405B on 2x Quadro RTX 8000 (Turing, 48 GB, ~16 TFLOPS
fp32 each; an H100 has ~67 TFLOPS fp32 and ~3x the memory bandwidth). Results: benchmarks/results/scale-<device>.{json,md} (--out).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from types import SimpleNamespace  # noqa: E402

from leanquant_serve.format import LeanQuantConfig  # noqa: E402
from quantizer.capture import hessian, layer_forward  # noqa: E402  (the pipeline's own)
from quantizer.gptq import GPTQSettings  # noqa: E402
from quantizer.layer_step import quantize_group  # noqa: E402

SHAPES = {  # hidden, intermediate, heads, kv heads, head_dim
    "405b": (16384, 53248, 128, 8, 128),
    "small": (512, 1664, 8, 2, 64),  # same ratios, for a CPU run
    "tiny": (128, 416, 4, 2, 32),  # for the test
}
LAYERS_405B = 126
GROUPS = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def build_layer(shape: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    hidden, inter, heads, kv, head_dim = SHAPES[shape]
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        num_hidden_layers=1,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        layer = LlamaDecoderLayer(cfg, layer_idx=0).to(dtype)
        rotary = LlamaRotaryEmbedding(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return layer.eval(), rotary


def peak_bytes(devices: list[torch.device]) -> list[int]:
    """Peak memory per GPU, or this process's peak RSS on CPU."""
    if devices[0].type == "cuda":
        return [torch.cuda.max_memory_allocated(d) for d in devices]
    return [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]  # Linux: KiB


def run(a: argparse.Namespace, grid: str) -> dict:
    devices = [torch.device(d) for d in a.device.split(",")]
    device = devices[0]
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    layer, rotary = build_layer(a.shape, dtype, device)
    hidden = SHAPES[a.shape][0]
    gen = torch.Generator(device=device).manual_seed(1)
    inputs = [  # random calibration activations, one (1, seqlen, hidden) window each
        torch.randn(1, a.seqlen, hidden, generator=gen, device=device, dtype=dtype)
        for _ in range(a.nsamples)
    ]
    pos = torch.arange(a.seqlen, device=device)[None]
    kwargs = {"position_embeddings": rotary(inputs[0], pos), "position_ids": pos}
    settings = GPTQSettings(
        bits=a.bits,
        group_size=a.group_size if grid != "nonuniform" else -1,
        fit=grid,
        actorder=True,
        static_groups=grid != "nonuniform",
    )
    qcfg = LeanQuantConfig(
        bits=a.bits,
        group_size=settings.group_size,
        grid=settings.stored_grid,
        desc_act=True,
        static_groups=settings.static_groups,
    )
    # What quantize_group reads of a pipeline run.
    ctx = SimpleNamespace(
        job=SimpleNamespace(settings=settings),
        devices=devices,
        device=device,
        qcfg=qcfg,
        observer=None,
        model=layer,  # names: the bare layer has no checkpoint renamings
    )
    hdev = devices[1] if len(devices) > 1 else device
    if device.type == "cuda":
        for d in devices:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
    t_layer = time.perf_counter()
    rows = {}
    for group in GROUPS:
        linears = {
            n: getattr(
                layer.self_attn
                if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                else layer.mlp,
                n,
            )
            for n in group
        }
        t = time.perf_counter()
        h = hessian(layer, linears[group[0]], inputs, kwargs, hdev)  # a forward pass per window
        t_h = time.perf_counter() - t
        t = time.perf_counter()
        results = quantize_group(ctx, "layer", group, linears, h)  # sets each weight to Q
        if device.type == "cuda":
            for d in devices:
                torch.cuda.synchronize(d)
        t_q = time.perf_counter() - t
        for name, (_, report) in zip(group, results, strict=True):
            rows[name] = {
                "group_quantize_seconds": t_q,
                "loss": report.loss,
                "hessian_seconds": t_h,
                "shape": list(report.shape),
            }
        del h, results
    seconds = time.perf_counter() - t_layer
    # Then the pipeline runs every window through the quantized layer: the next layer's inputs.
    t = time.perf_counter()
    with torch.no_grad():
        for x in inputs:
            layer_forward(layer, x, kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    advance = time.perf_counter() - t
    peaks = peak_bytes(devices)
    return {
        "seconds": seconds,
        "advance_seconds": advance,
        "peak_bytes": max(peaks),
        "peak_bytes_per_device": peaks,
        "sublayers": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=SHAPES, default="405b")
    ap.add_argument("--grids", default="minmax,affine,nonuniform")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="a device or a comma-separated list, as leanquant quantize --device",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args()
    if a.shape == "405b" and a.device == "cpu":
        sys.exit(
            "benchmarks/scale.py: the 405B layer needs a GPU (--device cuda); use --shape small on CPU"
        )
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    if "," in a.device:
        dev = f"{len(a.device.split(','))}x {dev}"
    results = {}
    for grid in a.grids.split(","):
        print(f"{grid}: quantizing one {a.shape} layer on {dev} ...", flush=True)
        results[grid] = r = run(a, grid)
        print(f"  {r['seconds']:.1f} s, peak {r['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    meta = {
        "device": dev,
        "shape": dict(
            zip(
                ["hidden", "intermediate", "heads", "kv_heads", "head_dim"],
                SHAPES[a.shape],
                strict=True,
            )
        ),
        "bits": a.bits,
        "group_size": a.group_size,
        "nsamples": a.nsamples,
        "seqlen": a.seqlen,
        "torch": torch.__version__,
    }
    lines = [
        f"# One {a.shape}-shaped decoder layer on {dev}",
        "",
        f"`python benchmarks/scale.py --shape {a.shape} --nsamples {a.nsamples} --seqlen {a.seqlen} "
        f"--group-size {a.group_size} --device {a.device}`, "
        f"{a.bits}-bit, group {a.group_size} (nonuniform: per row), act-order + static groups.",
        "",
        f"| grid | layer s | peak GiB per device | x126 layers on {a.device} (h) |",
        "|---|---|---|---|",
    ]
    for grid, r in results.items():
        h = (r["seconds"] + r["advance_seconds"]) * LAYERS_405B / 3600
        r["projected_405b_hours"] = h if a.shape == "405b" else None
        cell = f"{h:.1f}" if a.shape == "405b" else "n/a (not the 405B shape)"
        peaks = " / ".join(f"{p / 2**30:.2f}" for p in r["peak_bytes_per_device"])
        lines.append(f"| {grid} | {r['seconds'] + r['advance_seconds']:.1f} | {peaks} | {cell} |")
    lines += [
        "",
        "Paper reference: 21 h for 405B on 2x Quadro RTX 8000 (whole model held in host RAM).",
    ]
    a.out.mkdir(parents=True, exist_ok=True)
    n_dev = len(a.device.split(","))
    tag = f"scale-{a.shape}-{'cuda' if a.device.startswith('cuda') else 'cpu'}" + (
        f"-x{n_dev}" if n_dev > 1 else ""
    )
    (a.out / f"{tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (a.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
