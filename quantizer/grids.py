"""Quantization grids: how one column of weights is rounded inside the GPTQ loop.

Layout: W is (rows, columns) = (out_features, in_features). A grid is fitted on a
slice of W (all rows, the columns of one group) given a per-column importance
d_j = U_jj^(-p), where U is the upper Cholesky factor of H^-1 (LeanQuant §3).
The learned grids minimise, per row, the loss-error-aware objective

    L = Σ_j d_j · (w_j − q(w_j))²                                  (LeanQuant eq. 6)

- ``minmax``: GPTQ's asymmetric min-max grid (ignores d): the baseline.
- ``affine``: LeanQuant_aff, a coarse-to-fine search over the clipping range
  lo = min + a·R/T, hi = max − c·R/T (R = max − min) for the affine grid with the lowest L.
- ``nonuniform``: LeanQuant_nu, a per-row weighted k-means (Lloyd) with 2^b centroids.
- ``exl2``: the same loss-error-aware objective minimised inside exllamav2's EXL2 grid family
  (fixed zero 2^(b−1); per group one fp16 maximum M shared by all rows, per row one of 16
  scales (i+1)²·M/256), so ``leanquant export exllamav2`` writes EXL2 tensors exactly.

Every grid returns parameters whose values are exactly representable in fp16, so
the values the loop rounds to are the values the checkpoint stores; a parameter beyond fp16's
range (weights too large for any fp16 scale, table entry or maximum) raises
:class:`FP16RangeError` from :func:`stored_fp16`, the one place that rule is checked.
All fitting is batched over rows in torch on W's device: no per-row Python loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from leanquant_serve.format.exl2 import EXL2_SCALE_LEVELS, exl2_scales

GRID_NAMES = ("minmax", "affine", "nonuniform", "exl2")
# Grids whose rows must be fitted together: one parameter is shared by all rows of a group.
ROW_COUPLED_GRIDS = ("exl2",)
# Default shrink limit of the affine range search, as a fraction of T (LeanQuant appendix);
# 8 bits is not in the paper: its grid is fine enough that a small range suffices.
DEFAULT_SHRINK = {2: 0.4, 3: 0.3, 4: 0.2, 8: 0.1}


FP16_MAX = torch.finfo(torch.float16).max  # 65504: the largest finite fp16 value


def _fp16_exact(x: Tensor) -> Tensor:
    """Round to the nearest fp16 value but keep the dtype (what the checkpoint will store)."""
    return x.to(torch.float16).to(x.dtype)


class FP16RangeError(ValueError):
    """A fitted grid parameter is beyond fp16's range, so the checkpoint cannot store it.

    ``what`` names the parameter (scale, table entry, EXL2 group maximum), ``value`` is the
    largest one the weights need, ``largest_w`` the largest |w| of the weights it was fitted on.
    """

    def __init__(self, what: str, value: float, largest_w: float) -> None:
        self.what, self.value, self.largest_w = what, value, largest_w
        super().__init__(
            f"weights up to |w| = {largest_w:.3g} need an fp16 {what} of {value:.3g}, more than "
            f"an fp16 {what} can represent (at most {FP16_MAX:.0f})"
        )


def stored_fp16(x: Tensor, what: str, W: Tensor) -> Tensor:
    """The grid parameters x as the checkpoint stores them: rounded to fp16, dtype kept.

    The rule for every fitted grid parameter: a value that fp16 rounds to ±inf (|x| ≥ 65520,
    or already infinite) raises :class:`FP16RangeError` naming ``what`` and the weights W it was
    fitted on. NaN is passed through: it comes from NaN inputs, not from a range the weights
    need, and the caller reports it as such."""
    s = _fp16_exact(x)
    over = torch.isinf(s)
    if bool(over.any()):
        largest_w = float(torch.nan_to_num(W.abs(), nan=0.0).max()) if W.numel() else 0.0
        raise FP16RangeError(what, float(x[over].abs().max()), largest_w)
    return s


@dataclass
class AffineParams:
    """Per-row affine grid: q(w) = (clamp(round(w / scale) + zero, 0, maxq) − zero) · scale."""

    scale: Tensor  # (rows,) fp32, fp16-representable, > 0
    zero: Tensor  # (rows,) fp32 holding integers in [0, maxq]
    maxq: int

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Round w, shaped (rows,) or (rows, k), to the grid; returns (codes, dequantized values)."""
        scale, zero = (
            (self.scale, self.zero) if w.dim() == 1 else (self.scale[:, None], self.zero[:, None])
        )
        codes = torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        return codes.to(torch.int32), (codes - zero) * scale


@dataclass
class LUTParams:
    """Per-row lookup table: q(w) = the nearest of the row's 2^b sorted entries."""

    lut: Tensor  # (rows, 2^b) fp32, fp16-representable, ascending

    def __post_init__(self) -> None:
        self._mids = (self.lut[:, 1:] + self.lut[:, :-1]) / 2  # decision boundaries between entries

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Round w, shaped (rows,) or (rows, k), to the nearest table entry; returns (codes, values)."""
        col = w.dim() == 1
        w2 = w[:, None] if col else w
        codes = torch.searchsorted(self._mids, w2.contiguous())
        q = self.lut.gather(1, codes)
        return (codes[:, 0], q[:, 0]) if col else (codes, q)


GridParams = AffineParams | LUTParams


def weighted_loss(W: Tensor, Q: Tensor, d: Tensor) -> Tensor:
    """Per-row objective L = Σ_j d_j (w_j − q_j)²."""
    return ((W - Q) ** 2 * d).sum(-1)


# ----------------------------------------------------------------------------- minmax


def _affine_from_range(
    lo: Tensor, hi: Tensor, maxq: int, W: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """scale = (hi − lo)/maxq, rounded to fp16; zero = round(−lo/scale) clamped to the code range.

    Given the weights W the range belongs to, the scales are checked by :func:`stored_fp16`
    (search candidates inside a checked range need no check: their scales are smaller)."""
    scale = ((hi - lo) / maxq).clamp_min(1e-6)  # scale = (hi − lo)/maxq
    scale = _fp16_exact(scale) if W is None else stored_fp16(scale, "scale", W)
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)  # z = round(−lo/scale)
    return scale, zero


def _row_range(W: Tensor) -> tuple[Tensor, Tensor]:
    """GPTQ's range: [min(w, 0), max(w, 0)] per row, [-1, 1] for an all-zero row."""
    lo = W.min(dim=1).values.clamp(max=0)
    hi = W.max(dim=1).values.clamp(min=0)
    dead = (lo == 0) & (hi == 0)
    return torch.where(dead, -1.0, lo), torch.where(dead, 1.0, hi)


def fit_minmax(W: Tensor, bits: int) -> AffineParams:
    """GPTQ's asymmetric min-max grid per row."""
    maxq = 2**bits - 1
    W = W.float()
    scale, zero = _affine_from_range(*_row_range(W), maxq, W)
    return AffineParams(scale, zero, maxq)


# ----------------------------------------------------------------------------- affine


def fit_affine(
    W: Tensor,
    d: Tensor,
    bits: int,
    *,
    T: int = 2048,
    shrink: float | None = None,
    coarse: int = 5,
    radius: int = 1,
    max_chunk_elems: int = 1 << 20,  # (rows, candidates, cols) temporaries that stay in cache
) -> AffineParams:
    """LeanQuant_aff: choose lo = min + a·R/T, hi = max − c·R/T, 0 ≤ a, c ≤ shrink·T, minimising L.

    Coarse-to-fine search: a ``coarse``×``coarse`` grid over (a, c), then (2·radius+1)² neighbourhoods
    around each row's best with the step halved until it is 1. (a, c) = (0, 0), the min-max
    grid, is always a candidate, so the result is never worse than min-max on L.
    """
    W, d = W.float(), d.float()
    maxq = 2**bits - 1
    limit = int(round((DEFAULT_SHRINK[bits] if shrink is None else shrink) * T))
    lo0, hi0 = _row_range(W)
    _affine_from_range(lo0, hi0, maxq, W)  # (a, c) = (0, 0) has the widest scales: must fit fp16
    unit = (hi0 - lo0) / T  # R / T per row

    rows = W.shape[0]
    best_a = torch.zeros(rows, device=W.device)
    best_c = torch.zeros(rows, device=W.device)
    best_loss = torch.full((rows,), math.inf, device=W.device)

    def evaluate(a: Tensor, c: Tensor) -> None:
        """Score candidates a, c of shape (rows, n) and keep each row's best."""
        nonlocal best_a, best_c, best_loss
        a, c = a.float().clamp(0, limit), c.float().clamp(0, limit)
        lo, hi = lo0[:, None] + a * unit[:, None], hi0[:, None] - c * unit[:, None]
        scale, zero = _affine_from_range(lo, hi, maxq)  # (rows, n)
        n, cols = a.shape[1], W.shape[1]
        step = max(1, max_chunk_elems // (n * cols))
        loss = torch.empty_like(a)
        for r in range(0, rows, step):  # chunk rows to bound the (rows, n, cols) temporary
            w = W[r : r + step, None, :]
            s, z = scale[r : r + step, :, None], zero[r : r + step, :, None]
            q = (torch.clamp(torch.round(w / s) + z, 0, maxq) - z) * s
            loss[r : r + step] = ((w - q) ** 2 * d).sum(-1)
        idx = loss.argmin(dim=1, keepdim=True)
        better = loss.gather(1, idx)[:, 0] < best_loss
        best_loss = torch.where(better, loss.gather(1, idx)[:, 0], best_loss)
        best_a = torch.where(better, a.gather(1, idx)[:, 0], best_a)
        best_c = torch.where(better, c.gather(1, idx)[:, 0], best_c)

    if limit > 0:
        step = max(1, math.ceil(limit / (coarse - 1)))
        axis = torch.arange(coarse, device=W.device) * step
        ga, gc = torch.meshgrid(axis, axis, indexing="ij")
        evaluate(ga.reshape(1, -1).expand(rows, -1), gc.reshape(1, -1).expand(rows, -1))
        offsets = torch.arange(-radius, radius + 1, device=W.device)
        oa, oc = (t.reshape(1, -1) for t in torch.meshgrid(offsets, offsets, indexing="ij"))
        while step > 1:
            step = max(1, step // 2)
            evaluate(best_a[:, None] + oa * step, best_c[:, None] + oc * step)
    else:
        evaluate(best_a[:, None], best_c[:, None])
    scale, zero = _affine_from_range(lo0 + best_a * unit, hi0 - best_c * unit, maxq, W)
    return AffineParams(scale, zero, maxq)


# ----------------------------------------------------------------------------- exl2

# Candidate maxima M = p · max_r(max|w_r|)/(maxq/2): exllamav2's own search range for p
# (conversion/adaptivegptq.py AdaptiveQuantizer: min_p 0.70 .. max_p 1.2), 26 steps of 0.02.
EXL2_MULTIPLIERS = tuple(round(0.70 + 0.02 * k, 2) for k in range(26))


def fit_exl2(
    W: Tensor,
    d: Tensor,
    bits: int,
    *,
    multipliers: tuple[float, ...] = EXL2_MULTIPLIERS,
    max_chunk_elems: int = 1 << 20,
) -> AffineParams:
    """LeanQuant's loss-error-aware grid inside exllamav2's EXL2 family, for one group.

    Codes q ∈ [0, 2^b) around the fixed zero z = 2^(b−1); the group has one fp16 maximum M and
    each row r one level i_r ∈ [0, 16), scale s_r = (i_r+1)²·M/256 in exllamav2's fp16
    arithmetic (:func:`exl2_scales`). For every candidate M each row takes the level with the
    lowest L_r = Σ_j d_j (w_j − q_j)² (all 16 are scored), and the M with the lowest Σ_r L_r
    wins. (exllamav2's converter instead rounds 16·√(max|w_r|/M) for the level and scores M by
    an unweighted error.) The scales returned are the fp16 values exllamav2 computes, so the
    export is exact.
    """
    W, d = W.float(), d.float()
    maxq = 2**bits - 1
    zero = float(2 ** (bits - 1))
    rows, cols = W.shape
    base = W.abs().amax() / (maxq / 2)  # exllamav2's base scale of the group's widest row
    stored_fp16(base, "EXL2 group maximum", W)  # M = base spans the weights: it must fit fp16
    # Candidates M = p·base (wider ones clamped to fp16's largest value, still spanning W).
    M = (base * torch.tensor(multipliers, device=W.device)).clamp(2.0**-14, FP16_MAX)
    ladders = exl2_scales(M.half()).float()  # (candidates, 16): the scales each M allows
    step = max(1, max_chunk_elems // (EXL2_SCALE_LEVELS * cols))
    best = torch.empty(len(multipliers), rows, dtype=torch.long, device=W.device)
    total = torch.empty(len(multipliers), device=W.device)
    for c, s in enumerate(ladders):
        loss = torch.empty(rows, EXL2_SCALE_LEVELS, device=W.device)
        for r in range(0, rows, step):  # chunk rows to bound the (rows, 16, cols) temporary
            w = W[r : r + step, None, :]
            q = (torch.clamp(torch.round(w / s[:, None]) + zero, 0, maxq) - zero) * s[:, None]
            loss[r : r + step] = ((w - q) ** 2 * d).sum(-1)  # L_r for every level
        lr, best[c] = loss.min(1)
        total[c] = lr.sum()
    c = int(total.argmin())  # first of equals: deterministic
    scale = ladders[c][best[c]]
    return AffineParams(scale, torch.full_like(scale, zero), maxq)


# ----------------------------------------------------------------------------- nonuniform


@dataclass
class RowRandom:
    """Uniform draws that depend only on a row's index in the whole weight: a slice of rows
    (``first``, of ``total``) gets the numbers those rows get when the weight is done whole."""

    generator: torch.Generator | None
    first: int = 0
    total: int | None = None

    def rand(self, rows: int, device: torch.device) -> Tensor:
        total = rows if self.total is None else self.total
        u = torch.rand(total, 1, generator=self.generator, device=device)
        return u[self.first : self.first + rows]


def _sample_rows(p: Tensor, rng: RowRandom) -> Tensor:
    """One column index per row, drawn ∝ p (inverse CDF; uniform where a row's p is all 0)."""
    p = torch.where(p.sum(1, keepdim=True) > 0, p, torch.ones_like(p))
    cdf = p.cumsum(1)
    u = rng.rand(p.shape[0], p.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max(p.shape[1] - 1)


def _kmeanspp_init(W: Tensor, d: Tensor, k: int, rng: RowRandom) -> Tensor:
    """Weighted k-means++ seeding per row: each next centroid drawn ∝ d_j · D(w_j)²."""
    cent = [W.gather(1, _sample_rows(d.expand_as(W), rng))]
    D2 = (W - cent[0]) ** 2  # squared distance to the nearest centroid so far
    for _ in range(1, k):
        cent.append(W.gather(1, _sample_rows(d * D2, rng)))
        D2 = torch.minimum(D2, (W - cent[-1]) ** 2)
    return torch.cat(cent, 1)


def fit_nonuniform(
    W: Tensor,
    d: Tensor,
    bits: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: str | None = None,
    generator: torch.Generator | RowRandom | None = None,
    max_chunk_elems: int = 1 << 24,
) -> LUTParams:
    """LeanQuant_nu: per-row weighted k-means of the row's weights with weights d, 2^b centroids.

    Rows are fitted in chunks of at most ``max_chunk_elems`` weights, which bounds the loop's
    temporaries (int64 assignments, per-cluster sums) at any weight size; rows are independent
    and every chunk replays the same random stream, so the result does not depend on it.
    """
    rng = generator if isinstance(generator, RowRandom) else RowRandom(generator)
    rows, cols = W.shape
    step = max(1, max_chunk_elems // max(cols, 1))
    if step >= rows:
        return _fit_nonuniform_rows(W, d, bits, max_iter, tol, init, rng)
    gen = rng.generator
    start = gen.get_state() if gen is not None else None
    total = rng.total if rng.total is not None else rows
    luts = []
    for r in range(0, rows, step):
        if gen is not None:
            gen.set_state(start)  # each chunk draws what the whole weight would have drawn
        part = RowRandom(gen, rng.first + r, total)
        luts.append(_fit_nonuniform_rows(W[r : r + step], d, bits, max_iter, tol, init, part).lut)
    return LUTParams(torch.cat(luts))


def _fit_nonuniform_rows(
    W: Tensor, d: Tensor, bits: int, max_iter: int, tol: float, init: str | None, rng: RowRandom
) -> LUTParams:
    """:func:`fit_nonuniform` on one chunk of rows.

    Batched Lloyd iterations over all rows; 1-D assignment is a searchsorted against the
    midpoints of the sorted centroids. Init as the reference: linspace(min, max) for b ≤ 3,
    k-means++ for b ≥ 4. Each row stops on its own, as the reference's per-row scikit-learn
    KMeans does: when its assignment no longer changes or its Σ_k (centroid shift)² ≤
    tol · Var(row); at most ``max_iter`` iterations. A row's result therefore does not depend
    on the other rows fitted with it.
    """
    W, d = W.float(), d.float()
    k = 2**bits
    init = init or ("linspace" if bits <= 3 else "kmeans++")
    if init == "linspace":
        lo, hi = W.min(1).values, W.max(1).values
        cent = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, k, device=W.device)
    elif init == "kmeans++":
        cent = _kmeanspp_init(W, d[None, :], k, rng)
    else:
        raise ValueError(f"init must be 'linspace' or 'kmeans++', got {init!r}")
    cent = cent.sort(1).values
    dW = W * d  # numerator terms d_j w_j
    dd = d.expand_as(W)
    shift_tol = tol * W.var(dim=1)
    active = torch.ones(W.shape[0], dtype=torch.bool, device=W.device)  # rows still iterating
    assign = None
    for _ in range(max_iter):
        new_assign = torch.searchsorted((cent[:, 1:] + cent[:, :-1]) / 2, W.contiguous())
        if assign is not None:
            active &= (new_assign != assign).any(1)  # unchanged assignment: the row is done
        if not bool(active.any()):
            break
        assign = new_assign
        num = torch.zeros_like(cent).scatter_add_(1, assign, dW)  # Σ d_j w_j per cluster
        den = torch.zeros_like(cent).scatter_add_(1, assign, dd)  # Σ d_j per cluster
        new = torch.where(den > 0, num / den.clamp_min(1e-30), cent).sort(1).values
        new = torch.where(active[:, None], new, cent)  # finished rows keep their centroids
        active &= ((new - cent) ** 2).sum(1) > shift_tol  # moved less than tol: done after this
        cent = new
    return LUTParams(stored_fp16(cent, "table entry", W).sort(1).values)


def fit_grid(
    name: str,
    W: Tensor,
    d: Tensor,
    bits: int,
    *,
    T: int = 2048,
    shrink: float | None = None,
    kmeans_iters: int = 100,
    generator: torch.Generator | RowRandom | None = None,
) -> GridParams:
    """Fit the grid ``name`` on W (rows, cols) with column importance d (cols,)."""
    if name == "minmax":
        return fit_minmax(W, bits)
    if name == "affine":
        return fit_affine(W, d, bits, T=T, shrink=shrink)
    if name == "nonuniform":
        return fit_nonuniform(W, d, bits, max_iter=kmeans_iters, generator=generator)
    if name == "exl2":
        return fit_exl2(W, d, bits)
    raise ValueError(f"grid must be one of {', '.join(GRID_NAMES)}, got {name!r}")
