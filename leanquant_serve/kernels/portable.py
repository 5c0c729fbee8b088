"""Portable torch paths for LeanQuant weights: unpack, dequantize, matmul.

They run wherever torch runs and are what an engine falls back to when none of its fused
kernels implements a layer (an AVX2 CPU, 2/3-bit or act-order layers, non-uniform grids off
CUDA). They work on the stored orientation, W^T (in, out), so no transpose is materialised,
and equal ``leanquant_serve.format.dequantize_linear(...).t()`` cast to the same dtype, bit for
bit (see tests/test_portable.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..format.packing import unpack_codes


def dequantize_affine_t(
    qweight: Tensor,
    scales: Tensor,
    zero_points: Tensor,
    bits: int,
    g_idx: Tensor | None = None,
    dtype: torch.dtype = torch.float16,
) -> Tensor:
    """W^T (in, out) with W^T[i, o] = (q[i, o] - z[g(i), o]) * s[g(i), o].

    Groups are contiguous runs of in / G input rows unless ``g_idx`` gives each row's group.
    The product is formed in float16 when ``dtype`` is float16 (one rounding of an exact
    product, as the reference's float32 product cast to float16) and in float32 otherwise.
    """
    q = unpack_codes(qweight, bits, dim=0)  # (in, out)
    z = unpack_codes(zero_points, bits, dim=1)  # (G, out)
    compute = torch.float16 if dtype == torch.float16 else torch.float32
    s = scales.to(compute)
    if g_idx is not None:
        g = g_idx.long()
        w = (q - z[g]).to(compute) * s[g]
    else:
        n_groups, out = s.shape
        w = (q.view(n_groups, -1, out) - z[:, None]).to(compute) * s[:, None]
        w = w.view(-1, out)
    return w.to(dtype)


def dequantize_lut_t(
    qweight: Tensor, lut: Tensor, bits: int, dtype: torch.dtype = torch.float16
) -> Tensor:
    """W^T (in, out) with W^T[i, o] = lut[o, q[i, o]] (the table rounded to ``dtype`` first,
    which equals rounding the looked-up value)."""
    q = unpack_codes(qweight, bits, dim=0)  # (in, out)
    return torch.gather(lut.to(dtype).t(), 0, q.long())  # lut^T is (2**bits, out)


def dequantize_table_t(
    qweight: Tensor,
    scales: Tensor,
    table: Tensor,
    bits: int,
    g_idx: Tensor | None = None,
    dtype: torch.dtype = torch.float16,
) -> Tensor:
    """W^T (in, out) with W^T[i, o] = table[q[i, o]] * s[g(i), o] for a table grid
    (NormalFloat / Student-Float): ``table`` float32 (2**bits,), ``scales`` fp16 (G, out).

    Formed as the float32 product of the table entry and the scale, then cast to ``dtype``:
    the reference dequantizer's arithmetic, bit for bit."""
    q = unpack_codes(qweight, bits, dim=0).long()  # (in, out)
    t = table.to(device=q.device, dtype=torch.float32)[q]
    s = scales.float()
    if g_idx is not None:
        w = t * s[g_idx.long()]
    else:
        n_groups, out = s.shape
        w = (t.view(n_groups, -1, out) * s[:, None]).view(-1, out)
    return w.to(dtype)


def table_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    table: Tensor,
    bits: int,
    g_idx: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x W^T + b for a table-grid weight, dequantized for this call."""
    y = x @ dequantize_table_t(qweight, scales, table, bits, g_idx, x.dtype)
    return y if bias is None else y + bias


def affine_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zero_points: Tensor,
    bits: int,
    g_idx: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x W^T + b, dequantizing W for this call only (memory stays that of the codes)."""
    y = x @ dequantize_affine_t(qweight, scales, zero_points, bits, g_idx, x.dtype)
    return y if bias is None else y + bias


def lut_matmul(
    x: Tensor, qweight: Tensor, lut: Tensor, bits: int, bias: Tensor | None = None
) -> Tensor:
    """y = x W^T + b for a non-uniform (per-row table) weight, dequantized for this call."""
    y = x @ dequantize_lut_t(qweight, lut, bits, x.dtype)
    return y if bias is None else y + bias
