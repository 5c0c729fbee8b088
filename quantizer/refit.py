"""Refit (beyond the paper): with the column loop's codes fixed, re-solve each row's grid
parameters against the full layer-wise loss.

GPTQ's loop (and LeanQuant's grid fit inside it) weighs columns by the diagonal of U only. Once
every code c is chosen, a row's dequantized weights are linear in its grid parameters θ:

    q_j = θ_{k(j)} · a_j        affine:  k(j) = group of column j, a_j = c_j − z_{k(j)}, θ = scales
                                table:   k(j) = group of column j, a_j = t[c_j],          θ = scales
                                LUT:     k(j) = c_j,               a_j = 1,               θ = entries

so q = M θ with M (columns × K) one non-zero per column, and the row's layer-wise loss
(w − q)ᵀ H (w − q) (= ‖X wᵀ − X qᵀ‖², H = X Xᵀ, w the original row) is a least-squares problem
in θ with the normal equations

    (Mᵀ H M) θ = Mᵀ H w.

Integer zero points and the codes stay as they are. The solution is rounded to what the
checkpoint stores (fp16), and kept per row only where it lowers that row's loss and stays a
valid grid (finite, fp16-representable; scales > 0; LUT entries ascending): the refit never
raises the loss. H is the damped Hessian the loop used, H = (UᵀU)⁻¹.

Cost per weight: rows · K · columns² multiply-adds (a product with H per row and parameter),
batched over row chunks; every product is per row, so row slices on several devices give the
same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

# Basis chunk: rows · columns · K fp32 elements at a time (64 MiB).
_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class Basis:
    """A row's dequantized weights as q = M θ: column j uses parameter ``k[:, j]`` with
    coefficient ``a[:, j]``. ``k``: (rows, columns) int64; ``a``: (rows, columns) fp32;
    ``theta``: (rows, K) fp32, the parameters as stored."""

    k: Tensor
    a: Tensor
    theta: Tensor

    def values(self, theta: Tensor) -> Tensor:
        """q (rows, columns) fp32 for parameters ``theta`` (rows, K): θ_k(j) · a_j, one rounding
        (the reference dequantizer's arithmetic)."""
        return theta.gather(1, self.k) * self.a


def basis(
    grid: str,
    codes: Tensor,
    *,
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    lut: Tensor | None = None,
    table: Tensor | None = None,
    group_size: int = -1,
    g_idx: Tensor | None = None,
) -> Basis:
    """The linear form of a quantized weight's rows (see the module docstring).

    ``codes``: (rows, columns) integer; ``scales``/``zeros``: (n_groups, rows) as
    :class:`~quantizer.gptq.QuantizedWeight` holds them; ``lut``: (rows, 2^b); ``table``:
    (2^b,) fp32 for the scaled fixed tables; ``g_idx``: (columns,) group of each column
    (act-order with dynamic groups), else groups of ``group_size`` consecutive columns
    (-1: one group). ``grid``: "affine", "table" or "nonuniform"."""
    rows, columns = codes.shape
    c = codes.long()
    if grid == "nonuniform":
        return Basis(c, torch.ones(rows, columns, device=codes.device), lut.float())
    if g_idx is not None:
        group = g_idx.long().to(codes.device)
    elif group_size == -1:
        group = torch.zeros(columns, dtype=torch.long, device=codes.device)
    else:
        group = torch.arange(columns, device=codes.device) // group_size
    k = group[None, :].expand(rows, columns)
    theta = scales.float().T.contiguous()  # (rows, n_groups)
    if grid == "affine":
        a = (c - zeros.T.long().gather(1, k)).float()  # a_j = c_j − z_k(j)
    elif grid == "table":
        a = table.float().to(codes.device)[c]  # a_j = t[c_j]
    else:
        raise ValueError(f"no refit for grid {grid!r}")
    return Basis(k.contiguous(), a, theta)


def _times_H(X: Tensor, H: Tensor) -> Tensor:
    """X (n, m, C) times H (C, C), row by row: one batched product per row, so a row's result
    does not depend on which other rows share the call (row slices give the same bytes)."""
    return torch.bmm(X, H.expand(X.shape[0], *H.shape))


def layer_loss(W: Tensor, Q: Tensor, H: Tensor) -> Tensor:
    """Per row, the layer-wise loss (w − q)ᵀ H (w − q); W, Q (rows, columns), H (columns,
    columns). Returns (rows,) fp32."""
    E = W - Q  # (rows, columns)
    step = max(1, _CHUNK_ELEMS // max(1, E.shape[1]))
    return torch.cat(
        [(_times_H(e[:, None, :], H)[:, 0] * e).sum(1) for e in E.split(step)]
    )  # (w − q)ᵀ H (w − q)


def solve(W: Tensor, H: Tensor, b: Basis) -> Tensor:
    """θ minimising (w − Mθ)ᵀ H (w − Mθ) per row, unrounded: (rows, K) fp32. A parameter no
    column uses (or whose columns all have a_j = 0) keeps its value; a row whose normal
    equations are singular keeps all of its values."""
    rows, columns = W.shape
    K = b.theta.shape[1]
    out = b.theta.clone()
    step = max(1, _CHUNK_ELEMS // max(1, columns * K))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        n = r1 - r0
        M = torch.zeros(n, columns, K, device=W.device)
        M.scatter_(2, b.k[r0:r1, :, None], b.a[r0:r1, :, None])  # M_jk = a_j [k(j) = k]
        Mt = M.transpose(1, 2)  # (n, K, C)
        S = torch.bmm(_times_H(Mt, H), M)  # Mᵀ H M  (n, K, K); H symmetric
        rhs = torch.bmm(Mt, _times_H(W[r0:r1, None, :], H).transpose(1, 2))[..., 0]  # Mᵀ H w
        unused = torch.diagonal(S, dim1=1, dim2=2) <= 0  # no column carries this parameter
        if bool(unused.any()):  # pin it: S_kk = 1, rhs_k = θ_k (its row and column are 0)
            idx = unused.nonzero(as_tuple=True)
            S[idx[0], idx[1], idx[1]] = 1.0
            rhs[idx] = b.theta[r0:r1][idx]
        theta, info = torch.linalg.solve_ex(S, rhs)
        ok = (info == 0) & torch.isfinite(theta).all(1)
        out[r0:r1][ok] = theta[ok]
    return out


@dataclass(frozen=True)
class RefitResult:
    theta: Tensor  # (rows, K) fp32, as stored (fp16-exact): refit where it helped, else as given
    Q: Tensor  # (rows, columns) fp32, what the codes and ``theta`` give
    loss_before: Tensor  # (rows,) layer-wise loss (w − q)ᵀ H (w − q) with the loop's grid
    loss_after: Tensor  # (rows,) the same with ``theta`` (never above loss_before)
    rows_refit: int  # rows whose parameters changed


def refit(W: Tensor, H: Tensor, b: Basis, grid: str) -> RefitResult:
    """Re-solve the grid parameters of every row of W (rows, columns; original weights, fp32)
    against H (columns, columns; the damped Hessian, same column order) with the codes in
    ``b`` fixed; see the module docstring. ``grid`` decides which parameters are valid:
    scales must stay > 0 (affine, table), LUT entries ascending (nonuniform)."""
    W, H = W.float(), H.float()
    before = layer_loss(W, b.values(b.theta), H)
    theta = solve(W, H, b).to(torch.float16).to(torch.float32)  # what the checkpoint stores
    valid = torch.isfinite(theta).all(1)
    if grid == "nonuniform":
        valid &= (theta[:, 1:] >= theta[:, :-1]).all(1)
    else:
        valid &= (theta > 0).all(1)
    after = layer_loss(W, b.values(theta), H)
    keep = valid & (after < before)
    theta = torch.where(keep[:, None], theta, b.theta)
    after = torch.where(keep, after, before)
    return RefitResult(theta, b.values(theta), before, after, int(keep.sum()))


def refit_weight(W: Tensor, H: Tensor, r, grid: str, group_size: int, table: Tensor | None):
    """A :class:`~quantizer.gptq.QuantizedWeight` ``r`` with its grid refitted: same codes,
    zero points and g_idx; new scales (affine, table) or LUT, Q; and the per-row layer-wise
    losses before and after (``r.refit_loss``: (before, after) sums)."""
    b = basis(
        grid, r.codes, scales=r.scales, zeros=r.zeros, lut=r.lut, table=table,
        group_size=group_size, g_idx=r.g_idx,
    )  # fmt: skip
    res = refit(W, H, b, grid)
    if grid == "nonuniform":
        new = replace(r, lut=res.theta.to(r.lut.dtype), Q=res.Q)
    else:
        new = replace(r, scales=res.theta.T.contiguous().to(r.scales.dtype), Q=res.Q)
    return new, res
