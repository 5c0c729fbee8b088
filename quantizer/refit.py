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

Cost per weight. Affine and table grids: a parameter is a group of columns shared by every
row, so H M = Σ_k H[:, group k] a[group k] is one GEMM per group over all rows: rows ·
columns² multiply-adds in all, the order of GPTQ's own loop (its lazy updates are GEMMs over
rows as well, so row slices give the same bytes as the whole weight). LUT (nonuniform): each
row's columns pick parameters by their codes, so M differs per row: rows · 2^b · columns²
(one product with H per row and entry), batched per row.
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
    # (K, columns / K) int64: the columns of each parameter where every row shares them and
    # every parameter has as many (affine, table grids); None where they differ per row (LUT)
    groups: Tensor | None = None

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
    K = theta.shape[1]
    sizes = torch.bincount(group, minlength=K)
    groups = None
    if bool((sizes == sizes[0]).all()) and columns % K == 0:  # as GPTQ's groups always are
        groups = torch.argsort(group, stable=True).view(K, columns // K)
    if grid == "affine":
        a = (c - zeros.T.long().gather(1, k)).float()  # a_j = c_j − z_k(j)
    elif grid == "table":
        a = table.float().to(codes.device)[c]  # a_j = t[c_j]
    else:
        raise ValueError(f"no refit for grid {grid!r}")
    return Basis(k.contiguous(), a, theta, groups)


def _times_H(X: Tensor, H: Tensor) -> Tensor:
    """X (n, m, C) times H (C, C), row by row: one batched product per row, so a row's result
    does not depend on which other rows share the call (row slices give the same bytes)."""
    return torch.bmm(X, H.expand(X.shape[0], *H.shape))


def layer_loss(W: Tensor, Q: Tensor, H: Tensor) -> Tensor:
    """Per row, the layer-wise loss (w − q)ᵀ H (w − q); W, Q (rows, columns), H (columns,
    columns). Returns (rows,) fp32."""
    E = W - Q  # (rows, columns)
    step = max(1, _CHUNK_ELEMS // max(1, E.shape[1]))
    return torch.cat([((e @ H) * e).sum(1) for e in E.split(step)])  # (w − q)ᵀ H (w − q)


def solve(W: Tensor, H: Tensor, b: Basis) -> Tensor:
    """θ minimising (w − Mθ)ᵀ H (w − Mθ) per row, unrounded: (rows, K) fp32. A parameter no
    column uses (or whose columns all have a_j = 0) keeps its value; a row whose normal
    equations are singular keeps all of its values."""
    rows, columns = W.shape
    K = b.theta.shape[1]
    out = b.theta.clone()
    if b.groups is not None:  # columns ordered group by group (H symmetric: same on both sides)
        perm = b.groups.flatten()
        H, W = H[perm][:, perm].contiguous(), W[:, perm]
    step = max(1, _CHUNK_ELEMS // max(1, columns * K))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        S, rhs = _normal_equations(W[r0:r1], H, b, r0, r1)
        unused = torch.diagonal(S, dim1=1, dim2=2) <= 0  # no column carries this parameter
        if bool(unused.any()):  # pin it: S_kk = 1, rhs_k = θ_k (its row and column are 0)
            idx = unused.nonzero(as_tuple=True)
            S[idx[0], idx[1], idx[1]] = 1.0
            rhs[idx] = b.theta[r0:r1][idx]
        theta, info = torch.linalg.solve_ex(S, rhs)
        ok = (info == 0) & torch.isfinite(theta).all(1)
        out[r0:r1][ok] = theta[ok]
    return out


def _normal_equations(W: Tensor, H: Tensor, b: Basis, r0: int, r1: int) -> tuple[Tensor, Tensor]:
    """Mᵀ H M (n, K, K) and Mᵀ H w (n, K) for rows r0:r1 of the weight (W: those rows). With
    ``b.groups``, H and W come with their columns already ordered group by group."""
    n, columns = W.shape
    K = b.theta.shape[1]
    if b.groups is not None:  # parameter k scales the columns of group k in every row
        size = columns // K
        A = b.a[r0:r1][:, b.groups.flatten()].view(n, K, size)  # a_j, group by group
        Hk = H.view(columns, K, size).transpose(0, 1)  # (K, C, size): H's columns of group k
        HM = torch.bmm(Hk, A.permute(1, 2, 0))  # (K, C, n): (H M)_cl = Σ_{j ∈ l} H_cj a_j
        # (Mᵀ H M)_kl = Σ_{c ∈ k} a_c (H M)_cl
        S = (A.permute(1, 2, 0)[None] * HM.view(K, K, size, n)).sum(2).permute(2, 1, 0)
        rhs = (A * (W @ H).view(n, K, size)).sum(-1)  # Mᵀ H w  (H symmetric: H w = (w H)ᵀ)
        return S, rhs
    M = torch.zeros(n, columns, K, device=W.device, dtype=W.dtype)
    M.scatter_(2, b.k[r0:r1, :, None], b.a[r0:r1, :, None])  # M_jk = a_j [k(j) = k]
    Mt = M.transpose(1, 2)  # (n, K, C)
    S = torch.bmm(_times_H(Mt, H), M)  # Mᵀ H M; H symmetric
    rhs = torch.bmm(Mt, _times_H(W[:, None, :], H).transpose(1, 2))[..., 0]  # Mᵀ H w
    return S, rhs


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
