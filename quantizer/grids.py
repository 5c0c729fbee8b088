"""Quantization grids: how one column of weights is rounded inside the GPTQ loop.

Layout: W is (rows, columns) = (out_features, in_features). A grid is fitted on a
slice of W (all rows, the columns of one group) given a per-column importance
d_j = U_jj^(-p), where U is the upper Cholesky factor of H^-1 (LeanQuant §3).
The learned grids minimise, per row, the loss-error-aware objective

    L = Σ_j d_j · (w_j − q(w_j))²                                  (LeanQuant eq. 6)

- ``minmax``: GPTQ's asymmetric min-max grid (ignores d): the baseline.
- ``affine``: LeanQuant_aff, a coarse-to-fine search over the clipping range
  lo = min + a·R/T, hi = max − c·R/T (R = max − min) for the affine grid with the lowest L.
- ``nonuniform``: LeanQuant_nu, a per-row weighted k-means with 2^b centroids: the optimal one
  (dynamic programming over the sorted row, default) or Lloyd's local optimum (the reference's).
- ``exl2``: the same loss-error-aware objective minimised inside exllamav2's EXL2 grid family
  (fixed zero 2^(b−1); per group one fp16 maximum M shared by all rows, per row one of 16
  scales (i+1)²·M/256), so ``leanquant export exllamav2`` writes EXL2 tensors exactly.
- ``nf`` / ``sf``: a fixed NormalFloat / Student-Float table t (quantizer/tables.py) times one
  learned scale per (row, group): the scale minimising L, found by a search over multiples of
  the row's absmax (absmax itself always a candidate), where QLoRA/bitsandbytes take absmax.

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

GRID_NAMES = ("minmax", "affine", "nonuniform", "exl2", "nf", "sf")
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


@dataclass
class TableParams:
    """Per-row scaled fixed table: q(w) = scale · t[c], c the table entry nearest to w / scale.

    The value is formed as float32(t[c]) · float32(scale), one rounding: the reference
    dequantizer's arithmetic and bitsandbytes' ``dequantize_4bit``'s."""

    scale: Tensor  # (rows,) fp32, fp16-representable, > 0
    table: Tensor  # (2^b,) fp32, ascending, in [-1, 1], with an exact 0

    def __post_init__(self) -> None:
        self._mids = ((self.table[1:] + self.table[:-1]) / 2).contiguous()  # decision boundaries

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Round w, shaped (rows,) or (rows, k), to the grid; returns (codes, dequantized values)."""
        scale = self.scale if w.dim() == 1 else self.scale[:, None]
        codes = torch.searchsorted(self._mids, (w / scale).contiguous())
        return codes.to(torch.int32), self.table[codes] * scale


GridParams = AffineParams | LUTParams | TableParams


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


# ----------------------------------------------------------------------------- nf / sf

# Coarse candidates s = m · absmax of the scale search (m = 1: absmax, bitsandbytes' choice);
# then TABLE_REFINE rounds of 2·TABLE_RADIUS+1 candidates around each row's best, step / 4
# each; then TABLE_LSQ least-squares steps (codes fixed, s = Σ d w t / Σ d t²).
TABLE_COARSE = tuple(round(0.30 + 0.05 * k, 2) for k in range(19))  # 0.30 .. 1.20
TABLE_REFINE, TABLE_RADIUS, TABLE_LSQ = 2, 2, 3
TABLE_MIN_SCALE = 2.0**-24  # fp16's smallest positive value: a scale is never 0


def table_objective(W: Tensor, d: Tensor, table: Tensor, scale: Tensor) -> Tensor:
    """L = Σ_j d_j (w_j − s·t[q_j])² per row and candidate: W (rows, cols), d (cols,),
    scale (rows, n) → (rows, n), with q_j the entry nearest to w_j / s (fp32)."""
    mids = ((table[1:] + table[:-1]) / 2).contiguous()
    w, s = W[:, None, :], scale[:, :, None]
    q = table[torch.searchsorted(mids, (w / s).contiguous())] * s
    return ((w - q) ** 2 * d).sum(-1)


def fit_table(
    W: Tensor,
    d: Tensor,
    table: Tensor,
    *,
    coarse: tuple[float, ...] = TABLE_COARSE,
    refine: int = TABLE_REFINE,
    radius: int = TABLE_RADIUS,
    lsq: int = TABLE_LSQ,
    max_chunk_elems: int = 1 << 20,
) -> TableParams:
    """The loss-error-aware scale of a fixed table per row of W (rows, cols), weights d (cols,).

    Minimises L = Σ_j d_j (w_j − s·t[q_j])² over fp16 scales s (what the checkpoint stores):
    first s = fp16(absmax) (absmax = max_j |w_j|, QLoRA's scale, so the result is never worse
    than absmax on L), then s = fp16(m · absmax) for m in ``coarse``, then ``refine`` rounds of
    2·radius+1 multiples around each row's best with the step divided by 4 each round, then
    ``lsq`` least-squares steps: with the best scale's codes q fixed, L is a quadratic in s
    minimised by s = Σ_j d_j w_j t[q_j] / Σ_j d_j t[q_j]² (tried as one more candidate). The
    first candidate with the lowest L wins (deterministic). An all-zero row gets s = 1.
    Batched over rows, which are independent (a row slice gets the rows the whole weight gets).
    Raises :class:`FP16RangeError` when absmax exceeds fp16's range.
    """
    W, d = W.float(), d.float()
    table = table.float().to(W.device)
    rows = W.shape[0]
    absmax = W.abs().amax(1)
    absmax = torch.where(absmax == 0, 1.0, absmax)  # all-zero row: any scale is exact
    base = stored_fp16(absmax, "scale", W).clamp_min(TABLE_MIN_SCALE)
    best_s, best_loss = base, torch.full((rows,), math.inf, device=W.device)

    def evaluate(scale: Tensor) -> None:
        """Score fp16-rounded candidate scales (rows, n); keep each row's first best."""
        nonlocal best_s, best_loss
        scale = _fp16_exact(scale.clamp(TABLE_MIN_SCALE, FP16_MAX))
        n, cols = scale.shape[1], W.shape[1]
        step = max(1, max_chunk_elems // (n * cols))
        loss = torch.cat(
            [
                table_objective(W[r : r + step], d, table, scale[r : r + step])
                for r in range(0, rows, step)
            ]
        )
        idx = loss.argmin(dim=1, keepdim=True)  # the first of equals
        lmin = loss.gather(1, idx)[:, 0]
        better = lmin < best_loss
        best_loss = torch.where(better, lmin, best_loss)
        best_s = torch.where(better, scale.gather(1, idx)[:, 0], best_s)

    evaluate(base[:, None])  # absmax first: it wins every tie
    m = torch.tensor(coarse, device=W.device)
    evaluate(absmax[:, None] * m)
    step = (coarse[1] - coarse[0]) if len(coarse) > 1 else 0.05
    offsets = torch.arange(-radius, radius + 1, device=W.device, dtype=torch.float32)
    for _ in range(refine):
        step /= 4
        evaluate(best_s[:, None] + offsets * (step * absmax[:, None]))
    mids = ((table[1:] + table[:-1]) / 2).contiguous()
    for _ in range(lsq):  # codes of the best scale fixed: s = Σ d w t / Σ d t²
        t = table[torch.searchsorted(mids, (W / best_s[:, None]).contiguous())]
        den = (d * t * t).sum(1)
        s_opt = torch.where(den > 0, (d * W * t).sum(1) / den.clamp_min(1e-30), best_s)
        evaluate(s_opt[:, None])
    return TableParams(best_s, table)


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


# The exact fit (default): Wang & Song (2011), "Ckmeans.1d.dp: Optimal k-means clustering in one
# dimension by dynamic programming", The R Journal 3(2), with the divide-and-conquer speed-up over
# monotone split points of Grønlund et al. (2017), "Fast exact k-means, k-medians and Bregman
# divergence clustering in 1D" (arXiv:1701.07204). Two engines, one result: compiled loops one
# row at a time on CPU (numba), and torch ops batched over rows elsewhere (GPU; CPU without numba).

NONUNIFORM_FITS = ("exact", "lloyd")
# The default fit is exact up to 4 bits. At 8 bits (k = 256) the DP's k layers cost ~60x
# Lloyd's time on a CPU (SmolLM2's down_proj: 180 vs 3 ms per row, one thread, torch engine)
# for an error that is tiny either way, so 8 bits defaults to Lloyd.
EXACT_MAX_BITS = 4
# Rows × columns per chunk of the torch engine, for 16 centroids (scaled down for more): on one
# CPU thread 2^18 was as fast as any size at 576 columns and 1.5x faster than 2^16 at 53248
# (fewer, larger ops); larger on a GPU. Tables do not depend on it (every row's result is its
# own, see _kmeans_1d_exact). The compiled engine needs no chunks (O(N·k) memory per thread).
_EXACT_CHUNK_ELEMS = {"cpu": 1 << 18}
_EXACT_CHUNK_ELEMS_ACCEL = 1 << 23
_TINY = 1e-300  # stands in for a zero cluster weight S0 (whose S1 is then exactly 0 too)
# Scales a positive difference of two DP values (≥ ~1e-200: they are float64 sums of terms no
# smaller) past any index; a zero difference stays zero.
_HUGE = 2.0**1000
EXACT_ENGINES = ("compiled", "torch")


def _kmeans_1d_exact(W: Tensor, d: Tensor, k: int, engine: str | None = None) -> Tensor:
    """Optimal weighted 1-D k-means of every row of W: minimise Σ_j d_j (w_j − c_{a(j)})².

    W (rows, n) finite, d (n,) ≥ 0 with Σ d > 0, any float dtype; returns (rows, k) float64
    centroids, ascending, NaN where a row has nothing to put (fewer than k distinct values, or
    a cluster of weightless values). Per row, with the distinct values x_1 < … < x_N (the row
    sorted stably, duplicates merged, their d summed), centred on the row's weighted mean μ, and
    float64 prefix sums (sequential, in that order)

        S0_j = Σ_{i≤j} d_i,   S1_j = Σ_{i≤j} d_i (x_i − μ),   S2_j = Σ_{i≤j} d_i (x_i − μ)²,

    the cost of one cluster {x_{i+1}, …, x_j} around its weighted mean is

        c(i, j) = (S2_j − S2_i) − (S1_j − S1_i)² / (S0_j − S0_i)       (0 when S0_j = S0_i),

    and D[m][j], the least cost of x_1..x_j in m clusters, follows (Wang & Song 2011, eq. 3)

        D[1][j] = c(0, j),    D[m][j] = min_{0 ≤ i ≤ j} D[m−1][i] + c(i, j),

    i = j meaning an empty m-th cluster. c is Monge, so the leftmost minimiser B[m][j] is
    nondecreasing in j and each layer is solved by divide and conquer over fixed dyadic levels
    (Grønlund et al. 2017): B[m][j] for j = h, 3h, 5h, … (h = 2^s, s descending) is the leftmost
    minimiser over [B[m][j−h], min(j, B[m][j+h])], with B[m][0] = 0 and B[m][j] = N past N;
    the last layer is D[k][N], over all i. Centroid m: μ + (S1_{b_m} − S1_{b_{m−1}}) /
    (S0_{b_m} − S0_{b_{m−1}}) from the bounds b walked back through B. Work O(k·N log N) per row.

    ``engine``: ``"compiled"`` (:func:`_compiled_kernel`, numba, CPU tensors; the default on
    CPU when numba imports) or ``"torch"`` (:func:`_kmeans_1d_torch`, batched over rows, any
    device; the default elsewhere). Both do the same float64 operations in the same order and
    keep the smallest i among equal values, so they return the same bytes (tested); ValueError
    for another engine. Every row's result is its own, whatever other rows share the call
    (rows may be split across devices or threads).
    """
    if engine is None:
        engine = (
            "compiled" if W.device.type == "cpu" and _compiled_kernel() is not None else "torch"
        )
    if engine == "torch":
        return _kmeans_1d_torch(W, d, k)
    if engine != "compiled":
        raise ValueError(f"engine must be one of {', '.join(EXACT_ENGINES)}, got {engine!r}")
    compiled = _compiled_kernel()
    if compiled is None:
        raise RuntimeError("the compiled exact fit needs numba (pip install numba)")
    if W.device.type != "cpu":
        raise ValueError(f"the compiled exact fit runs on CPU tensors, got {W.device}")
    if W.dtype != torch.float64:
        W = W.to(torch.float32)  # exact for fp16/bf16: one kernel for all of them
    Wn = W.contiguous().numpy()
    dn = d.to(torch.float64).contiguous().numpy()
    out = torch.empty(W.shape[0], k, dtype=torch.float64)
    outn = out.numpy()
    rows, n = Wn.shape
    step = max(1, _COMPILED_CHUNK_ELEMS // max(n, 1))
    fit_rows = compiled[0]

    def fit(r0: int, r1: int) -> None:
        for r in range(r0, r1, step):
            e = min(r + step, r1)
            fit_rows(Wn[r:e], _stable_order(Wn[r:e]), dn, k, outn[r:e])

    threads = min(torch.get_num_threads(), max(1, rows * n // _COMPILED_MIN_WORK))
    if threads <= 1:
        fit(0, rows)
        return out
    from concurrent.futures import ThreadPoolExecutor  # the kernel releases the GIL

    part = -(-rows // threads)
    with ThreadPoolExecutor(threads) as pool:
        for job in [pool.submit(fit, r, min(r + part, rows)) for r in range(0, rows, part)]:
            job.result()
    return out


def _stable_order(W):
    """Per row of W (rows, n) float32 or float64 numpy, the column indices that sort it stably
    (equal values, −0 and +0 among them, keep their column order), in the low 32 bits of a
    (rows, n) int64 array. float32: one SIMD sort of int64 keys (the value's order-preserving
    bit pattern, then the column), several times faster than a stable argsort."""
    import numpy as np

    if W.dtype != np.float32:
        return np.argsort(W, axis=1, kind="stable")
    key = np.empty(W.shape, np.int64)
    _compiled_kernel()[1](W.view(np.int32), key)
    key.sort(axis=1)
    return key


# Rows × columns per call of the compiled fit (sort keys: 8 bytes each), and per thread below
# which it does not start another thread.
_COMPILED_CHUNK_ELEMS = 1 << 20
_COMPILED_MIN_WORK = 1 << 16
_KERNEL: list = []  # [(fit, keys), or None where numba does not import], built on first use


def _compiled_kernel():
    """The compiled exact fit: ``(fit, keys)``. ``fit(W, order, d, k, out)``: W (rows, n)
    float32 or float64 numpy, ``order`` (rows, n) int64 whose low 32 bits are the columns that
    sort each row stably (:func:`_stable_order`), d (n,) float64; writes out (rows, k) float64 with
    :func:`_kmeans_1d_exact`'s centroids, one row at a time (O(k·n) scratch). None where numba
    does not import. numba compiles it on first use (seconds) and caches it on disk beside this
    file. The operations are :func:`_kmeans_1d_torch`'s, in its order, no fast-math (no
    reassociation, no fused multiply-add), so the results are the same bytes. ``keys(bits,
    key)``: float32 values' bits (rows, n) int32 to int64 sort keys (−0 as +0, negative values
    reversed, then the column).
    """
    if _KERNEL:
        return _KERNEL[0]
    try:
        import numba
        import numpy as np
    except ImportError:
        _KERNEL.append(None)
        return None

    @numba.njit(cache=True, nogil=True)
    def keys(bits, key):  # pragma: no cover (compiled)
        rows, n = bits.shape
        for r in range(rows):
            for j in range(n):
                b = np.int64(bits[r, j])
                if b == -2147483648:
                    b = 0  # −0 sorts as +0
                if b < 0:
                    b ^= 0x7FFFFFFF  # larger magnitude, smaller key
                key[r, j] = (b << 32) | j

    @numba.njit(cache=True, nogil=True)
    def fit_rows(W, order, d, k, out):  # pragma: no cover (compiled)
        tiny = 1e-300  # _TINY
        rows, n = W.shape
        x = np.empty(n)
        a = np.empty(n)
        xv = np.empty(n)
        S0 = np.empty(n + 1)
        S1 = np.empty(n + 1)
        S2 = np.empty(n + 1)
        D = np.empty(n + 1)
        E = np.empty(n + 1)
        Dm = np.empty(n + 1)
        B = np.empty((max(k - 2, 1), n + 1), np.int64)
        bnd = np.empty(k + 1, np.int64)
        for r in range(rows):
            acc0 = 0.0
            acc1 = 0.0
            for j in range(n):
                c = order[r, j] & 0xFFFFFFFF
                x[j] = np.float64(W[r, c])
                a[j] = d[c]
                acc0 += a[j]
                acc1 += a[j] * x[j]
            mu = acc1 / acc0  # the row's weighted mean: centring keeps S2 small
            acc0 = 0.0
            acc1 = 0.0
            acc2 = 0.0
            S0[0] = 0.0
            S1[0] = 0.0
            S2[0] = 0.0
            N = 0  # distinct values so far; S at the last copy of each
            for j in range(n):
                acc0 += a[j]
                xc = x[j] - mu
                t = a[j] * xc
                acc1 += t
                acc2 += t * xc
                if j == n - 1 or x[j + 1] != x[j]:
                    N += 1
                    S0[N] = acc0
                    S1[N] = acc1
                    S2[N] = acc2
                    xv[N - 1] = x[j]
            if N <= k:  # each distinct value is a centroid (cost 0, no DP rounding noise)
                for m in range(k):
                    out[r, m] = xv[m] if m < N else np.nan
                continue
            for j in range(N + 1):  # D[1][j] = c(0, j)
                w = S0[j] - 0.0
                if w < tiny:
                    w = tiny
                u = S1[j] - 0.0
                D[j] = (S2[j] - 0.0) - u * u / w
            top = 1
            while top * 2 <= N:
                top *= 2
            for m in range(k - 2):  # layers 2 .. k−1: B[m + 2] in B[m]
                for i in range(N + 1):
                    E[i] = D[i] - S2[i]  # the i-part of D[m−1][i] + c(i, j), less S2_j
                Bm = B[m]
                Bm[0] = 0
                Dm[0] = 0.0
                h = top
                while h >= 1:
                    for j in range(h, N + 1, 2 * h):
                        lo = Bm[j - h]
                        hi = Bm[j + h] if j + h <= N else N
                        if hi > j:
                            hi = j
                        j0 = S0[j]
                        j1 = S1[j]
                        best = np.inf
                        arg = lo
                        for i in range(lo, hi + 1):
                            w = j0 - S0[i]
                            if w < tiny:
                                w = tiny
                            u = j1 - S1[i]
                            v = E[i] - u * u / w
                            if v < best:  # ties: the smallest i
                                best = v
                                arg = i
                        Bm[j] = arg
                        Dm[j] = best + S2[j]
                    h //= 2
                for j in range(N + 1):
                    D[j] = Dm[j]
            j0 = S0[N]  # the last layer only at j = N
            j1 = S1[N]
            j2 = S2[N]
            best = np.inf
            arg = 0
            for i in range(N + 1):
                w = j0 - S0[i]
                if w < tiny:
                    w = tiny
                u = j1 - S1[i]
                v = D[i] + ((j2 - S2[i]) - u * u / w)
                if v < best:
                    best = v
                    arg = i
            bnd[k] = N
            b = arg
            for m in range(k - 1, 1, -1):  # walk back: b_{m−1} = B[m][b_m]
                bnd[m] = b
                b = B[m - 2][b]
            bnd[1] = b
            bnd[0] = 0
            for m in range(k):
                w0 = S0[bnd[m + 1]] - S0[bnd[m]]  # Σ d of the cluster
                w1 = S1[bnd[m + 1]] - S1[bnd[m]]  # Σ d (x − μ) of the cluster
                if w0 > 0:
                    w = w0
                    if w < tiny:
                        w = tiny
                    out[r, m] = w1 / w + mu
                else:
                    out[r, m] = np.nan

    _KERNEL.append((fit_rows, keys))
    return _KERNEL[0]


def _kmeans_1d_torch(W: Tensor, d: Tensor, k: int) -> Tensor:
    """The exact fit's torch engine (:func:`_kmeans_1d_exact`: arguments, result, the DP),
    batched over rows, any device. One dyadic level is evaluated for all its j at once: the
    search intervals of its j's overlap only at their ends, so every candidate i in [0, N]
    belongs to at most one interval's inside (found by a cumulative sum) and one segmented
    minimum per level covers them, plus one evaluation at each interval's right end. Memory
    (k−2)·rows·N int32 split points plus O(rows·N) float64. Rows are independent: the levels
    depend on positions only, and at positions past a row's own N the split point is taken as
    N (a valid upper bound), never computed, so the batch's widest row changes nothing. (On
    CUDA this rests on cumsum scanning each row the same way whatever the row count: not yet
    checked on a GPU.)
    """
    rows, n = W.shape
    f64, dev = torch.float64, W.device
    x, order = W.to(f64).sort(dim=1, stable=True)
    a = d.to(f64)[order]  # d_j in the row's sorted order
    last = torch.ones_like(x, dtype=torch.bool)
    last[:, :-1] = x[:, 1:] != x[:, :-1]  # the last copy of each distinct value
    rank = last.cumsum(1)  # distinct values up to and including j
    N = rank[:, -1:]  # (rows, 1): distinct values per row
    Np = int(N.max())  # the widest row of this batch (arrays are this wide, results are not)
    g = torch.arange(1, Np + 1, device=dev).expand(rows, -1).contiguous()
    at = torch.searchsorted(rank, g).clamp_max(n - 1)  # index of distinct value g (past N: last)
    A0, A1 = a.cumsum(1), (a * x).cumsum(1)
    mu = A1[:, -1:] / A0[:, -1:]  # the row's weighted mean: centring keeps S2 small
    xc = x - mu
    zero = torch.zeros(rows, 1, dtype=f64, device=dev)
    S0 = torch.cat([zero, A0.gather(1, at)], 1)  # (rows, Np + 1); past N: constant (weight 0)
    S1 = torch.cat([zero, (a * xc).cumsum(1).gather(1, at)], 1)
    S2 = torch.cat([zero, (a * xc * xc).cumsum(1).gather(1, at)], 1)
    pos = torch.arange(Np + 1, device=dev)
    posr = pos.expand(rows, -1)
    posf = pos.to(f64).expand(rows, -1)

    def cost(j0: Tensor, j1: Tensor, j2: Tensor, i0: Tensor, i1: Tensor, i2: Tensor) -> Tensor:
        s1 = j1 - i1
        return (j2 - i2) - s1 * s1 / (j0 - i0).clamp_min(_TINY)  # c(i, j)

    # A row with at most k distinct values: each is a centroid (cost 0, no DP rounding noise).
    few = torch.where(pos[1 : k + 1] <= N, x.gather(1, at[:, :k]), math.nan)
    if Np <= k:
        return torch.cat([few, few.new_full((rows, k - Np), math.nan)], 1)
    D = cost(S0, S1, S2, zero, zero, zero)  # D[1][j] = c(0, j)
    # The dyadic levels, top first: h = 2^s, positions j = h, 3h, 5h, … ≤ Np, and what each
    # layer reads at them (S at j, with a 0 in front for "no interval").
    levels = []
    for s in range(max(Np, 1).bit_length() - 1, -1, -1):
        h = 1 << s
        j = pos[h :: 2 * h]
        t = j.numel()
        J0, J1 = S0[:, h :: 2 * h], S1[:, h :: 2 * h]
        Q0, Q1 = torch.cat([zero, J0], 1), torch.cat([zero, J1], 1)
        tag = torch.arange(1, t + 1, device=dev).expand(rows, -1)
        levels.append((h, j, t, J0, J1, S2[:, h :: 2 * h], Q0, Q1, tag, j <= N))
    splits: list[Tensor] = []  # B[m] for m = 2 .. k−1, (rows, Np + 1) int32
    for _ in range(2, k):
        E = D - S2  # the i-part of D[m−1][i] + c(i, j): D[m−1][i] − S2_i
        ES = torch.stack([E, S0, S1], 2)  # for the intervals' right ends
        B = torch.where(posr > N, N, 0)  # B[m][0] = 0; past N: N, an upper bound, never computed
        Dm = torch.zeros_like(D)
        for h, j, t, J0, J1, J2, Q0, Q1, tag, live in levels:
            lo = B[:, 0 :: 2 * h][:, :t]  # B[m][j − h]
            hi = B[:, 2 * h :: 2 * h]  # B[m][j + h]
            if hi.shape[1] < t:
                hi = torch.cat([hi, N], 1)  # j + h past the arrays: past every N
            hi = torch.where(live, torch.minimum(j, hi), lo)  # search B[m][j] in [lo, hi]
            # Which interval's inside [lo, hi) holds candidate i: 1..t, 0 for none.
            node = torch.zeros(rows, Np + 2, dtype=torch.long, device=dev)
            node.scatter_add_(1, lo, tag).scatter_add_(1, hi, -tag)
            node = node[:, : Np + 1].cumsum(1)
            s0 = Q0.gather(1, node).sub_(S0).clamp_min_(_TINY)
            s1 = Q1.gather(1, node).sub_(S1)
            v = E - s1.mul_(s1).div_(s0)  # D[m−1][i] + c(i, j) − S2_j
            vmin = torch.full((rows, t + 1), math.inf, dtype=f64, device=dev)
            vmin.scatter_reduce_(1, node, v, "amin")
            # The smallest i reaching the minimum: key i where v is the minimum, > Np elsewhere.
            key = (v - vmin.gather(1, node)).mul_(_HUGE).add_(posf)
            imin = torch.full((rows, t + 1), math.inf, dtype=f64, device=dev)
            imin.scatter_reduce_(1, node, key, "amin")
            vmin, imin = vmin[:, 1:], imin[:, 1:].long()
            e = ES.gather(1, hi[:, :, None].expand(-1, -1, 3))  # E, S0, S1 at i = hi
            s1hi = J1 - e[:, :, 2]
            vhi = e[:, :, 0] - s1hi * s1hi / (J0 - e[:, :, 1]).clamp_min(_TINY)
            inside = vmin <= vhi  # ties: the inside's smaller i
            B[:, h :: 2 * h] = torch.where(live, torch.where(inside, imin, hi), N)
            Dm[:, h :: 2 * h] = torch.where(inside, vmin, vhi) + J2
        splits.append(B.to(torch.int32))
        D = Dm
    # The last layer only at j = N: D[k][N] = min_i D[k−1][i] + c(i, N).
    JN = [S.gather(1, N) for S in (S0, S1, S2)]
    v = torch.where(posr <= N, D + cost(*JN, S0, S1, S2), math.inf)
    b = v.argmin(1, keepdim=True)  # the first minimum: the smallest i
    bounds = [N, b]  # cluster m holds x_{b_{m−1}+1} .. x_{b_m}; walk back through B
    for B in reversed(splits):
        b = B.gather(1, b).long()
        bounds.append(b)
    bounds.append(torch.zeros_like(b))
    bounds = torch.cat(bounds[::-1], 1)  # (rows, k + 1), nondecreasing
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    w0 = S0.gather(1, hi) - S0.gather(1, lo)  # Σ d of each cluster
    w1 = S1.gather(1, hi) - S1.gather(1, lo)  # Σ d x of each cluster
    c = torch.where(w0 > 0, w1 / w0.clamp_min(_TINY) + mu, math.nan)  # c_m = Σ d x / Σ d
    return torch.where(N <= k, few, c)


def _fill_empty(c: Tensor) -> Tensor:
    """Fill a table's empty (NaN) entries, one at a time, with the midpoint of the widest gap
    between the entries so far (a row with one entry repeats it); ascending. Entries are only
    empty where the row has fewer distinct weighted values than entries, all of which already
    have an entry: a filled entry cannot make any weight's nearest entry farther."""
    c = c.sort(1).values  # NaN last
    count = (~c.isnan()).sum(1, keepdim=True)
    col = torch.arange(c.shape[1], device=c.device)
    while bool((count < c.shape[1]).any()):
        gap = (c[:, 1:] - c[:, :-1]).nan_to_num(nan=-1.0)  # −1: not a gap between two entries
        g = gap.argmax(1, keepdim=True)  # the widest (first of equals)
        mid = (c.gather(1, g) + c.gather(1, g + 1)) / 2
        mid = torch.where(gap.gather(1, g) >= 0, mid, c[:, :1])
        fill = (count < c.shape[1]) & (col == count)
        c = torch.where(fill, mid, c).sort(1).values
        count = count + fill.any(1, keepdim=True)
    return c


def _fit_nonuniform_exact(W: Tensor, d: Tensor, bits: int, max_chunk_elems: int) -> LUTParams:
    """:func:`fit_nonuniform`'s exact fit: the optimal table per row, in row chunks."""
    rows, cols = W.shape
    k = 2**bits
    d = d.to(torch.float64)
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError("column importance d must be finite and non-negative")
    if not bool((d > 0).any()):
        d = torch.ones_like(d)  # no column weighs anything: weigh them all alike
    # NaN/Inf rows: a table the caller reports (stored_fp16). A finite row sum rules them out in
    # one pass (finite weights can sum to inf: then the exact test decides).
    bad = ~torch.isfinite(W.sum(1))
    if bool(bad.any()):
        bad = ~torch.isfinite(W).all(1)
    if bool(bad.any()):
        worst = torch.where(W.isnan().any(1), math.nan, math.inf)
        W = torch.where(bad[:, None], 0.0, W)
    if W.device.type == "cpu" and _compiled_kernel() is not None:
        budget = max_chunk_elems  # the compiled engine's temporaries do not grow with rows
    else:
        budget = _EXACT_CHUNK_ELEMS.get(W.device.type, _EXACT_CHUNK_ELEMS_ACCEL) * 16 // max(16, k)
    step = max(1, min(budget, max_chunk_elems) // max(cols, 1))
    luts = []
    for r in range(0, rows, step):
        Wr = W[r : r + step]
        luts.append(_fill_empty(_kmeans_1d_exact(Wr, d, k)))
    lut = torch.cat(luts).to(torch.float32)
    if bool(bad.any()):
        lut = torch.where(bad[:, None], worst[:, None].to(lut.dtype), lut)
    return LUTParams(stored_fp16(lut, "table entry", W).sort(1).values)


def fit_nonuniform(
    W: Tensor,
    d: Tensor,
    bits: int,
    *,
    method: str | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: str | None = None,
    generator: torch.Generator | RowRandom | None = None,
    max_chunk_elems: int = 1 << 24,
) -> LUTParams:
    """LeanQuant_nu: per row of W (rows, cols), a weighted k-means of the row's weights with
    weights d (cols,), 2^b centroids, minimising L = Σ_j d_j (w_j − c_{a(j)})².

    ``method="exact"`` (default up to :data:`EXACT_MAX_BITS` bits): the optimal table of every
    row (:func:`_kmeans_1d_exact`, optimal 1-D k-means by dynamic programming), deterministic,
    without random draws; on CPU compiled by numba where it imports (the same bytes as the
    batched torch engine used elsewhere, 11-25x faster than it on one CPU thread on SmolLM2's
    layer-5 MLP weights at 2-4 bits). ``"lloyd"`` (default above): the reference's algorithm,
    batched Lloyd iterations from the reference's initialisation (``init``, ``max_iter``,
    ``tol``, ``generator``), a local optimum: 6% to 2.1x the optimum's L on SmolLM2's layer-5 MLP
    weights at 2-4 bits (benchmarks/results/grid_fit.md).
    Entries are fp16-exact (:func:`stored_fp16`), ascending, fp32.

    Rows are fitted in chunks of at most ``max_chunk_elems`` weights (fewer for the exact fit,
    which sizes its chunks for the device), which bounds the temporaries at any weight size;
    every row's table is its own, so it does not depend on the chunks (nor, for Lloyd, on them:
    every chunk replays the same random stream).
    """
    if method is None:
        method = "exact" if bits <= EXACT_MAX_BITS else "lloyd"
    if method == "exact":
        return _fit_nonuniform_exact(W, d, bits, max_chunk_elems)
    if method != "lloyd":
        raise ValueError(f"method must be one of {', '.join(NONUNIFORM_FITS)}, got {method!r}")
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
    """:func:`fit_nonuniform`'s Lloyd fit on one chunk of rows.

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
    table: Tensor | None = None,
) -> GridParams:
    """Fit the grid ``name`` on W (rows, cols) with column importance d (cols,); ``table``: the
    fixed table of ``nf``/``sf`` (quantizer/tables.py)."""
    if name == "minmax":
        return fit_minmax(W, bits)
    if name == "affine":
        return fit_affine(W, d, bits, T=T, shrink=shrink)
    if name == "nonuniform":
        return fit_nonuniform(W, d, bits, max_iter=kmeans_iters, generator=generator)
    if name == "exl2":
        return fit_exl2(W, d, bits)
    if name in ("nf", "sf"):
        if table is None or table.numel() != 2**bits:
            raise ValueError(f"grid {name!r} needs its 2^{bits}-entry table")
        return fit_table(W, d, table)
    raise ValueError(f"grid must be one of {', '.join(GRID_NAMES)}, got {name!r}")
