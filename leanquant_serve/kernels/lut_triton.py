"""Triton kernel for y = x @ W^T (+ bias) read straight from a non-uniform (LUT) LeanQuant linear.

Stored layout (``leanquant_serve.format.tensors``): ``qweight`` int32 (K * BITS // 32, N) holds
the codes transposed to (K, N) and packed along dim 0, each column a little-endian bitstream in
which the code of input k starts at bit k * BITS; ``lut`` fp16 (N, 2**BITS) holds one table per
output row. With q[k, n] the code stored for input k of output n,

    y[m, n] = sum_k x[m, k] * lut[n, q[k, n]]

Each program owns a BLOCK_M x BLOCK_N tile of y and one of SPLIT_K contiguous ranges of k. Per
BLOCK_K x BLOCK_N step it extracts the codes from the packed words, looks each one up in its
row's table and multiplies by x, accumulating in fp32; W is never materialised. M == 1 (decode)
runs as a GEMV (broadcast multiply, sum over k); larger M uses ``tl.dot``. With SPLIT_K > 1 each
split writes fp32 partial sums to its own slice of a (SPLIT_K, M, N) buffer and the host sums
them (deterministic, no atomics); split-K is what lets a 1 x 16384 @ 16384 x 16384 call spread
over all SMs.

The same kernel serves table grids (NormalFloat / Student-Float, grid "table"): one float32
table of 2**BITS entries shared by every row (passed as ``lut`` with row stride 0) times an fp16
scale per (group, output row), ``scales`` (G, N) as stored, group g(k) = k // GROUP_SIZE:

    y[m, n] = sum_k x[m, k] * (table[q[k, n]] * scales[k // GROUP_SIZE, n])

the product formed in fp32 as the reference dequantizer forms it (:func:`table_matmul`).

The table lookup is a gather; ``lut_in_registers`` chooses where it reads from: False (default)
loads lut[n, code] from global memory (L1-resident after the first touch: BLOCK_N rows of
2**BITS halves), True loads the program's BLOCK_N tables once into registers and uses
``tl.gather`` (meant for BITS <= 4; at 8 bits the table tile is 256 x BLOCK_N).

Importable without triton or CUDA; :func:`lut_matmul` then raises. With TRITON_INTERPRET=1 set
before triton is imported the kernel runs on CPU tensors (that is how it is tested).
"""

from __future__ import annotations  # annotations stay strings: "tl.constexpr" needs no triton

from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # keep the module importable; lut_matmul raises
    triton = tl = None

SUPPORTED_BITS = (2, 3, 4, 8)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def is_available(device: torch.device | str) -> bool:
    """True iff the kernel can run on ``device``: a CUDA device, with triton importable."""
    return triton is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


@_jit
def _codes_tile(qweight_ptr, offs_k, offs_n, mask, stride_qk, stride_qn, BITS: tl.constexpr):
    """Codes q[k, n] of one BLOCK_K x BLOCK_N tile, int32 in [0, 2**BITS)."""
    bit = offs_k * BITS  # first bit of code k in its column's bitstream
    word = bit >> 5  # index of the 32-bit word holding that bit
    shift = (bit & 31).to(tl.uint32)[:, None]  # position of that bit within the word
    ptrs = qweight_ptr + word[:, None] * stride_qk + offs_n[None, :] * stride_qn
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)  # unsigned: >> is logical
    codes = lo >> shift  # the code's low bits at the bottom (higher codes above, masked below)
    if 32 % BITS != 0:  # 3 bits: a code at shift 30 or 31 continues in the next word
        straddles = shift + BITS > 32
        hi = tl.load(ptrs + stride_qk, mask=mask & straddles, other=0).to(tl.uint32, bitcast=True)
        # hi's low bits are the code's high bits, above its 32 - shift low bits; the & 31 only
        # avoids a (poisonous) shift by 32 where shift == 0, and hi is 0 there anyway
        codes = codes | (hi << ((32 - shift) & 31))
    return (codes & ((1 << BITS) - 1)).to(tl.int32)  # keep BITS bits


@_jit
def _lut_matmul_kernel(
    x_ptr,
    qweight_ptr,
    lut_ptr,
    bias_ptr,
    out_ptr,
    scales_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    GROUP_SIZE,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_lut,
    stride_sg,
    stride_sn,
    stride_os,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LUT_IN_REGISTERS: tl.constexpr,
    X_IS_FP16: tl.constexpr,
    HAS_SCALES: tl.constexpr,
):
    """out[s, m, n] = sum over k in split s of x[m, k] * w[k, n] (+ bias[n] in split 0), with
    w[k, n] = lut[n, q[k, n]], times scales[k // GROUP_SIZE, n] if HAS_SCALES (in fp32).

    Grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K). ``out`` is y itself (x's dtype) when
    SPLIT_K == 1, else an fp32 (SPLIT_K, M, N) buffer of partial sums.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)

    if LUT_IN_REGISTERS:  # this program's BLOCK_N tables, transposed: table[j, n] = lut[n, j]
        entries = tl.arange(0, 1 << BITS)
        table = tl.load(
            lut_ptr + offs_n[None, :] * stride_lut + entries[:, None],
            mask=mask_n[None, :],
            other=0.0,
        )

    # GEMV (BLOCK_M == 1): elementwise partial sums x[k] * w[k, n], reduced over k after the
    # loop (a reduction per step would cost a cross-warp exchange per step); else the y tile
    acc = tl.zeros((BLOCK_K if BLOCK_M == 1 else BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        mask_kn = mask_k[:, None] & mask_n[None, :]
        codes = _codes_tile(qweight_ptr, offs_k, offs_n, mask_kn, stride_qk, stride_qn, BITS)
        if LUT_IN_REGISTERS:
            w = tl.gather(table, codes, axis=0)  # w[k, n] = table[codes[k, n], n]
        else:
            w = tl.load(lut_ptr + offs_n[None, :] * stride_lut + codes, mask=mask_kn, other=0.0)
        if HAS_SCALES:  # table grid: w = table[q] * s[g(k), n], one fp32 product
            s_ptrs = scales_ptr + (offs_k // GROUP_SIZE)[:, None] * stride_sg
            s = tl.load(s_ptrs + offs_n[None, :] * stride_sn, mask=mask_kn, other=0.0)
            w = w.to(tl.float32) * s.to(tl.float32)
        if BLOCK_M == 1:  # decode: GEMV, fp32 products (fp16 x fp16 and bf16 x fp16 are exact)
            x = tl.load(x_ptr + pid_m * stride_xm + offs_k * stride_xk, mask=mask_k, other=0.0)
            acc += x.to(tl.float32)[:, None] * w.to(tl.float32)
        else:
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            if X_IS_FP16:  # fp16 x fp16 products, fp32 accumulation (a table grid's w rounded
                acc = tl.dot(x, w.to(tl.float16), acc)  # to fp16 first, as the portable path)
            else:  # bf16 x: tf32 holds both bf16 x and the fp16 table exactly
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="tf32")
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=0)[None, :]  # (1, BLOCK_N)

    if HAS_BIAS:
        if pid_k == 0:  # added once, by the first split
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = (
        out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class LaunchPlan:
    """Tile sizes and K split of one :func:`lut_matmul` call."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int  # number of K ranges (grid dim 2); 1: the kernel writes y directly
    k_per_split: int  # inputs per range, a multiple of block_k


def default_split_k(tiles: int, k_tiles: int, num_sms: int) -> int:
    """Number of K splits so that ``tiles`` output tiles make at most about 4 programs per SM
    (one wave: the default tiles fit 4 or more per SM by registers), with at least 4 BLOCK_K
    steps per split and at most 32 splits. Untuned: see benchmarks/lut_kernel.py --sweep-split."""
    return max(1, min(4 * num_sms // tiles, k_tiles // 4, 32))


def launch_plan(
    m: int,
    n: int,
    k: int,
    *,
    num_sms: int = 1,
    split_k: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> LaunchPlan:
    """Untuned defaults: M == 1 runs as a GEMV over 64 x 64 (BLOCK_N x BLOCK_K) tiles, larger
    M as ``tl.dot`` tiles of BLOCK_M = the power of two >= M in [16, 64], 64 x 64. ``split_k``
    None picks :func:`default_split_k` for ``num_sms``; the split is then trimmed so that no
    range is empty."""
    block_m = 1 if m == 1 else min(64, max(16, _next_power_of_2(m)))
    block_n, block_k = block_n or 64, block_k or 64
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}: {b} is not a power of two >= 16")
    k_tiles = -(-k // block_k)
    if split_k is None:
        tiles = -(-n // block_n) * -(-m // block_m)
        split_k = default_split_k(tiles, k_tiles, num_sms)
    k_per_split = -(-k_tiles // max(1, min(split_k, k_tiles))) * block_k
    return LaunchPlan(block_m, block_n, block_k, -(-k // k_per_split), k_per_split)


def _next_power_of_2(v: int) -> int:
    return 1 << (v - 1).bit_length()


def lut_matmul(
    x: Tensor,
    qweight: Tensor,
    lut: Tensor,
    bits: int,
    bias: Tensor | None = None,
    *,
    split_k: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    lut_in_registers: bool = False,
    num_warps: int = 4,
) -> Tensor:
    """y = x @ W^T (+ bias) with W[n, k] = lut[n, q[n, k]] from the stored ``qweight``/``lut``.

    ``x`` (..., K) fp16 or bf16; ``qweight`` int32 (K * bits // 32, N); ``lut`` (N, 2**bits),
    fp16 as stored; ``bias`` (N,) any float dtype. Returns (..., N) in x's dtype. ``split_k``,
    ``block_n``, ``block_k``: see :func:`launch_plan` (the SM count is 1 off CUDA).
    """
    n = _check(x, qweight, bits, bias)
    if tuple(lut.shape) != (n, 1 << bits):
        raise ValueError(f"lut: shape {tuple(lut.shape)}, expected {(n, 1 << bits)}")
    lut = lut.contiguous()  # a row's entries adjacent: the kernel reads lut_ptr + n * stride + code
    return _launch(
        x, qweight, lut, lut.stride(0), None, 1, bits, bias,
        split_k, block_n, block_k, lut_in_registers, num_warps,
    )  # fmt: skip


def table_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    table: Tensor,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
    *,
    split_k: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    lut_in_registers: bool = False,
    num_warps: int = 4,
) -> Tensor:
    """y = x @ W^T (+ bias) for a table grid: W[n, k] = table[q[n, k]] * scales[k // G, n].

    ``scales`` (K // G, N) fp16 as stored (G = ``group_size``, -1: one group, G = K);
    ``table`` (2**bits,) float32 (``quantization_config.table``); groups are contiguous (no
    ``g_idx``). Other arguments as :func:`lut_matmul`."""
    n = _check(x, qweight, bits, bias)
    k = qweight.shape[0] * 32 // bits
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise ValueError(f"group_size: {group_size} does not divide K = {k}")
    if tuple(scales.shape) != (k // g, n):
        raise ValueError(f"scales: shape {tuple(scales.shape)}, expected {(k // g, n)}")
    if tuple(table.shape) != (1 << bits,):
        raise ValueError(f"table: shape {tuple(table.shape)}, expected {(1 << bits,)}")
    for name, t in (("scales", scales), ("table", table)):
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, x on {x.device}")
    table = table.to(torch.float32).contiguous()
    return _launch(
        x, qweight, table, 0, scales, g, bits, bias,
        split_k, block_n, block_k, lut_in_registers, num_warps,
    )  # fmt: skip


def _check(x: Tensor, qweight: Tensor, bits: int, bias: Tensor | None) -> int:
    """The arguments both entry points share; returns N."""
    if triton is None:
        raise RuntimeError("lut_matmul needs triton, which is not importable here")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: {bits!r} is not one of {SUPPORTED_BITS}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x: dtype {x.dtype} is neither float16 nor bfloat16")
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] * 32 % bits:
        raise ValueError(
            f"qweight: {qweight.dtype} {tuple(qweight.shape)}, expected int32 (K * {bits} // 32, N)"
        )
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim {x.shape[-1]}, qweight packs {k} inputs at {bits} bits")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected {(n,)}")
    for name, t in (("qweight", qweight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, x on {x.device}")
    return n


def _launch(
    x: Tensor,
    qweight: Tensor,
    lut: Tensor,
    stride_lut: int,
    scales: Tensor | None,
    group_size: int,
    bits: int,
    bias: Tensor | None,
    split_k: int | None,
    block_n: int | None,
    block_k: int | None,
    lut_in_registers: bool,
    num_warps: int,
) -> Tensor:
    """Plan and launch :func:`_lut_matmul_kernel` on checked arguments."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    sms = (
        torch.cuda.get_device_properties(x.device).multi_processor_count
        if x.device.type == "cuda"
        else 1
    )
    plan = launch_plan(m, n, k, num_sms=sms, split_k=split_k, block_n=block_n, block_k=block_k)
    split_k = plan.split_k
    if split_k == 1:
        out = torch.empty(1, m, n, device=x.device, dtype=x.dtype)
    else:
        out = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, plan.block_n), triton.cdiv(m, plan.block_m), split_k)
    _lut_matmul_kernel[grid](
        x2,
        qweight,
        lut,
        bias if bias is not None else out,  # dummy pointer, never read without HAS_BIAS
        out,
        scales if scales is not None else lut,  # dummy pointer, never read without HAS_SCALES
        m,
        n,
        k,
        plan.k_per_split,
        group_size,
        x2.stride(0),
        x2.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        stride_lut,
        scales.stride(0) if scales is not None else 0,
        scales.stride(1) if scales is not None else 0,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BITS=bits,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        HAS_BIAS=bias is not None,
        LUT_IN_REGISTERS=lut_in_registers,
        X_IS_FP16=x.dtype == torch.float16,
        HAS_SCALES=scales is not None,
        num_warps=num_warps,
    )
    y = out[0] if split_k == 1 else out.sum(0).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
