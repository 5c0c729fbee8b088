"""Kernel benchmark: the Triton LUT matmul vs dequantize-then-matmul vs dense fp16, on CUDA.

For Llama-3.1-405B-shaped linears (out x in: 16384 x 16384 attention output, 53248 x 16384
gate/up, 16384 x 53248 down) at M = 1 (decode) and M = 16 tokens, with random codes and
per-row tables, it times (CUDA events; warmup, then the median of --reps samples, each
sample the mean of --inner back-to-back calls):

- fp16:        torch.nn.functional.linear(x, W) with the dense fp16 W (what the LUT replaces)
- torch-deq:   unpack the codes and gather W^T from the tables in torch, then x @ W^T
- lut:         leanquant_serve.kernels.lut_triton.lut_matmul (table gathered from global memory)
- lut-regs:    the same with lut_in_registers=True (tables in registers, tl.gather)

plus the maximum absolute error of each path against the dense fp16 result and against an
fp32 reference. The table is printed; JSON and markdown go to benchmarks/results/
lut_kernel.{json,md} with the device name and torch / triton versions. Without CUDA (or
triton) it exits with status 2 and writes nothing.

    python benchmarks/lut_kernel.py                   # 4- and 3-bit, M = 1 and 16
    python benchmarks/lut_kernel.py --bits 4 --m 1 --sweep-split
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from math import gcd
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanquant_serve.kernels import lut_triton  # noqa: E402

SHAPES = {  # name: (out_features, in_features) of Llama-3.1-405B (hidden 16384, MLP 53248)
    "o_proj": (16384, 16384),
    "gate/up": (53248, 16384),
    "down": (16384, 53248),
}
SPLITS = (1, 2, 4, 8, 16)  # --sweep-split


def make_layer(out_f: int, in_f: int, bits: int, device: torch.device, seed: int = 0):
    """Random stored tensors: any int32 bit pattern is a valid packing of random codes."""
    g = torch.Generator(device=device).manual_seed(seed)
    qweight = torch.randint(
        -(2**31), 2**31, (in_f * bits // 32, out_f), generator=g, device=device, dtype=torch.int32
    )
    lut = torch.randn(out_f, 1 << bits, generator=g, device=device).sort(dim=1).values * 0.02
    return qweight, lut.half()


def unpack_t(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q^T (in, out), int64, from the packed (in * bits // 32, out) words, in torch."""
    words, out_f = qweight.shape
    n = 32 // gcd(32, bits)  # codes per chunk of whole words
    w = qweight.view(-1, n * bits // 32, out_f)
    codes = torch.empty(w.shape[0], n, out_f, dtype=torch.int64, device=qweight.device)
    for j in range(n):
        i, s = divmod(j * bits, 32)  # word and bit shift of code j of the chunk
        c = w[:, i] >> s  # arithmetic shift: the sign bits are masked off below
        if s + bits > 32:  # straddles into the next word
            c = (c & ((1 << (32 - s)) - 1)) | (w[:, i + 1] << (32 - s))
        codes[:, j] = c & ((1 << bits) - 1)
    return codes.view(-1, out_f)


def dequantize_t(qweight: torch.Tensor, lut: torch.Tensor, bits: int) -> torch.Tensor:
    """W^T (in, out) fp16: W^T[k, n] = lut[n, q[k, n]]."""
    codes = unpack_t(qweight, bits)
    rows = torch.arange(lut.shape[0], device=lut.device) << bits
    return lut.view(-1)[codes + rows]


def cuda_time_ms(fn: Callable[[], object], warmup: int, reps: int, inner: int) -> float:
    """Median over ``reps`` samples of the mean time of ``inner`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def bench_case(
    name: str, out_f: int, in_f: int, m: int, bits: int, a: argparse.Namespace, timer
) -> dict:
    dev = torch.device(a.device)
    qweight, lut = make_layer(out_f, in_f, bits, dev)
    w = dequantize_t(qweight, lut, bits).t().contiguous()  # dense (out, in) fp16, exact
    x = torch.randn(m, in_f, device=dev, generator=torch.Generator(dev).manual_seed(1)).half()
    ref16 = F.linear(x, w)
    ref32 = F.linear(x.float(), w.float())
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1

    blocks = dict(block_n=a.block_n, block_k=a.block_k)
    plan = lut_triton.launch_plan(m, out_f, in_f, num_sms=sms, **blocks)
    paths = {
        "fp16": lambda: F.linear(x, w),
        "lut": lambda: lut_triton.lut_matmul(x, qweight, lut, bits, **blocks),
        "lut-regs": lambda: lut_triton.lut_matmul(
            x, qweight, lut, bits, lut_in_registers=True, **blocks
        ),
    }
    if not a.skip_torch_deq:
        paths["torch-deq"] = lambda: x @ dequantize_t(qweight, lut, bits)
    row = {
        "layer": name,
        "out": out_f,
        "in": in_f,
        "m": m,
        "bits": bits,
        "split_k": plan.split_k,
        "blocks": [plan.block_m, plan.block_n, plan.block_k],
        "ms": {},
        "max_abs_err_vs_fp16": {},
        "max_abs_err_vs_fp32": {},
        "max_abs_ref": ref32.abs().max().item(),
    }
    for path, fn in paths.items():
        y = fn().float()
        row["max_abs_err_vs_fp16"][path] = (y - ref16.float()).abs().max().item()
        row["max_abs_err_vs_fp32"][path] = (y - ref32).abs().max().item()
        del y
        row["ms"][path] = timer(fn)
    if a.sweep_split:
        row["lut_ms_by_split"] = {
            s: timer(lambda s=s: lut_triton.lut_matmul(x, qweight, lut, bits, split_k=s, **blocks))
            for s in SPLITS
        }
    stored = qweight.numel() * 4 + lut.numel() * 2 + x.numel() * 2 + m * out_f * 2
    row["lut_GBps"] = stored / row["ms"]["lut"] / 1e6
    row["fp16_GBps"] = (w.numel() * 2 + x.numel() * 2 + m * out_f * 2) / row["ms"]["fp16"] / 1e6
    for path in ("lut", "lut-regs", "torch-deq"):
        if path in row["ms"]:
            row.setdefault("fp16_over", {})[path] = row["ms"]["fp16"] / row["ms"][path]
    return row


def fmt_row(r: dict) -> list[str]:
    us = {k: f"{v * 1e3:.1f}" for k, v in r["ms"].items()}
    cells = [
        r["layer"],
        f"{r['out']}x{r['in']}",
        str(r["m"]),
        str(r["bits"]),
        us["fp16"],
        us.get("torch-deq", "-"),
        f"{us['lut']} (split {r['split_k']})",
        us["lut-regs"],
        f"{r['fp16_over']['lut']:.2f}",
        f"{r['fp16_over']['lut-regs']:.2f}",
        f"{r['fp16_over']['torch-deq']:.3f}" if "torch-deq" in r["fp16_over"] else "-",
        f"{r['lut_GBps']:.0f} / {r['fp16_GBps']:.0f}",
        " / ".join(f"{r['max_abs_err_vs_fp16'][k]:.1e}" for k in ERR_VS_FP16 if k in r["ms"]),
        " / ".join(f"{r['max_abs_err_vs_fp32'][k]:.1e}" for k in ERR_VS_FP32),
    ]
    if "lut_ms_by_split" in r:
        best = min(r["lut_ms_by_split"], key=r["lut_ms_by_split"].get)
        cells.append(f"{r['lut_ms_by_split'][best] * 1e3:.1f} (split {best})")
    return cells


HEADER = [
    "layer",
    "out x in",
    "M",
    "bits",
    "fp16 us",
    "torch-deq us",
    "lut us",
    "lut-regs us",
    "fp16/lut",
    "fp16/lut-regs",
    "fp16/torch-deq",
    "GB/s lut / fp16",
    "max abs err vs fp16: lut / lut-regs / torch-deq",
    "max abs err vs fp32: fp16 / lut / lut-regs",
]
ERR_VS_FP16 = ("lut", "lut-regs", "torch-deq")
ERR_VS_FP32 = ("fp16", "lut", "lut-regs")


def markdown(rows: list[dict], meta: dict) -> str:
    header = HEADER + (["best split us"] if any("lut_ms_by_split" in r for r in rows) else [])
    lines = [
        f"LUT matmul kernel on **{meta['device']}** (torch {meta['torch']}, triton "
        f"{meta['triton']}). Times are medians of {meta['reps']} samples of {meta['inner']} "
        "back-to-back calls; fp16/x > 1 means x is faster than the dense fp16 linear. GB/s: "
        "bytes a call must read and write (packed weight + tables + x + y, or fp16 W + x + y) "
        "per second. Errors: max |y - reference| over the output, against the dense fp16 "
        "F.linear result and an fp32 reference.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(fmt_row(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bits", default="4,3", help="comma-separated, of 2,3,4,8 (default 4,3)")
    p.add_argument("--m", default="1,16", help="comma-separated token counts (default 1,16)")
    p.add_argument("--layers", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=30, help="samples; the median is reported")
    p.add_argument("--inner", type=int, default=10, help="back-to-back calls per sample")
    p.add_argument("--block-n", type=int, help="LUT kernel BLOCK_N (default: launch_plan's)")
    p.add_argument("--block-k", type=int, help="LUT kernel BLOCK_K (default: launch_plan's)")
    p.add_argument("--sweep-split", action="store_true", help=f"also time split_k in {SPLITS}")
    p.add_argument("--skip-torch-deq", action="store_true", help="skip the slow torch baseline")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    a = p.parse_args()
    bits_list = [int(b) for b in a.bits.split(",")]
    ms = [int(m) for m in a.m.split(",")]
    layers = a.layers.split(",")
    if any(b not in lut_triton.SUPPORTED_BITS for b in bits_list):
        p.error(f"--bits: {a.bits!r}, each must be one of {lut_triton.SUPPORTED_BITS}")
    if any(name not in SHAPES for name in layers):
        p.error(f"--layers: {a.layers!r}, each must be one of {', '.join(SHAPES)}")

    if not torch.cuda.is_available() or not lut_triton.is_available(a.device):
        why = "no CUDA device" if not torch.cuda.is_available() else "triton is not importable"
        print(
            f"lut_kernel: {why}: this benchmark needs a CUDA GPU; nothing written", file=sys.stderr
        )
        sys.exit(2)
    # cuBLAS's fp16 GEMM accumulates in fp32, as the LUT kernel does
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    def timer(fn):
        return cuda_time_ms(fn, a.warmup, a.reps, a.inner)

    meta = {
        "device": torch.cuda.get_device_name(a.device),
        "torch": torch.__version__,
        "triton": lut_triton.triton.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "warmup": a.warmup,
        "reps": a.reps,
        "inner": a.inner,
    }
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}", flush=True)
    print(" | ".join(HEADER + (["best split us"] if a.sweep_split else [])), flush=True)
    rows = []
    for bits in bits_list:
        for name in layers:
            out_f, in_f = SHAPES[name]
            for m in ms:
                rows.append(bench_case(name, out_f, in_f, m, bits, a, timer))
                torch.cuda.empty_cache()  # the case's weights are gone: return their memory
                print(" | ".join(fmt_row(rows[-1])), flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "lut_kernel.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (a.out / "lut_kernel.md").write_text(markdown(rows, meta))
    print(f"wrote {a.out / 'lut_kernel.json'} and {a.out / 'lut_kernel.md'}")


if __name__ == "__main__":
    main()
