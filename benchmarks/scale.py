"""Scale benchmark: time and peak memory to quantize ONE Llama-3.1-405B-shaped decoder layer,
per grid, exactly as the pipeline does it (true-sequential groups q/k/v -> o -> gate/up ->
down; each group's Hessian from a forward pass of the already-quantized upstream), with random
weights and random calibration activations, and the projection to the whole model.

    python benchmarks/scale.py --device cuda                 # 405B layer, 128 x 2048 tokens (GPU)
    python benchmarks/scale.py --shape small --nsamples 4 --seqlen 128   # CPU smoke run

Layer: hidden 16384, intermediate 53248, 128 heads of 128, 8 KV heads (Llama-3.1-405B).
Projection: 126 layers x the measured layer time on ONE device. The quantizer has no
multi-GPU mode yet (issue 5, `--devices`): an ideal two-GPU split would halve it; the number
printed for two GPUs is that ideal, labelled as such. The paper's reference: 21 h for 405B on
2x Quadro RTX 8000 (Turing, 48 GB, ~16 TFLOPS fp32 each; an H100 has ~67 TFLOPS fp32 and ~3x
the memory bandwidth). Results: benchmarks/results/scale-<device>.{json,md} (--out).
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

from quantizer.gptq import GPTQSettings, quantize_weight  # noqa: E402
from quantizer.pipeline import _hessian  # noqa: E402  (the pipeline's own Hessian pass)

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
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, num_hidden_layers=1,
        max_position_embeddings=131072, rope_theta=500000.0,
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


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run(a: argparse.Namespace, grid: str) -> dict:
    device = torch.device(a.device)
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
        bits=a.bits, group_size=a.group_size if grid != "nonuniform" else -1, grid=grid,
        actorder=True, static_groups=grid != "nonuniform",
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t_layer = time.perf_counter()
    rows = {}
    for group in GROUPS:
        mods = [getattr(layer.self_attn if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp, n) for n in group]
        t = time.perf_counter()
        H = _hessian(layer, mods[0], inputs, kwargs, device)  # a forward pass per window
        t_h = time.perf_counter() - t
        for name, m in zip(group, mods, strict=True):
            t = time.perf_counter()
            r = quantize_weight(m.weight.data.float(), H, settings)
            m.weight.data.copy_(r.Q.to(dtype))  # downstream groups see the quantized layer
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rows[name] = {"seconds": time.perf_counter() - t, "loss": r.loss,
                          "hessian_seconds": t_h if name == group[0] else 0.0,
                          "shape": list(m.weight.shape)}
        del H
    seconds = time.perf_counter() - t_layer
    return {"seconds": seconds, "peak_bytes": peak_bytes(device), "sublayers": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="405b")
    ap.add_argument("--grids", default="minmax,affine,nonuniform")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args()
    if a.shape == "405b" and a.device == "cpu":
        sys.exit("benchmarks/scale.py: the 405B layer needs a GPU (--device cuda); use --shape small on CPU")
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    results = {}
    for grid in a.grids.split(","):
        print(f"{grid}: quantizing one {a.shape} layer on {dev} ...", flush=True)
        results[grid] = r = run(a, grid)
        print(f"  {r['seconds']:.1f} s, peak {r['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    meta = {"device": dev, "shape": dict(zip(["hidden", "intermediate", "heads", "kv_heads", "head_dim"], SHAPES[a.shape], strict=True)),
            "bits": a.bits, "group_size": a.group_size, "nsamples": a.nsamples, "seqlen": a.seqlen,
            "torch": torch.__version__}
    lines = [f"# One {a.shape}-shaped decoder layer on {dev}", "",
             f"`python benchmarks/scale.py --shape {a.shape} --nsamples {a.nsamples} --seqlen {a.seqlen} "
             f"--group-size {a.group_size} --device {a.device}`, "
             f"{a.bits}-bit, group {a.group_size} (nonuniform: per row), act-order + static groups.", "",
             "| grid | layer s | peak GiB | x126 layers, 1 device (h) | ideal 2-device split (h, not implemented) |",
             "|---|---|---|---|---|"]
    for grid, r in results.items():
        h = r["seconds"] * LAYERS_405B / 3600
        r["projected_405b_hours_1_device"] = h if a.shape == "405b" else None
        cells = (f"{h:.1f}", f"{h / 2:.1f}") if a.shape == "405b" else ("n/a (not the 405B shape)",) * 2
        lines.append(f"| {grid} | {r['seconds']:.1f} | {r['peak_bytes'] / 2**30:.2f} | {cells[0]} | {cells[1]} |")
    lines += ["", "Paper reference: 21 h for 405B on 2x Quadro RTX 8000 (whole model held in host RAM)."]
    a.out.mkdir(parents=True, exist_ok=True)
    tag = f"scale-{a.shape}-{'cuda' if a.device.startswith('cuda') else 'cpu'}"
    (a.out / f"{tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (a.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
