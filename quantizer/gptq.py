"""The GPTQ/OBQ column loop with LeanQuant's loss-error-aware grids.

Layout: W is (rows, columns) = (out_features, in_features); H is (columns, columns).
Pure math: tensors in, tensors out, no hooks, files or module state.

    H  = (2/n) Σ x xᵀ                       Hessian of the layer-wise loss (fp32)
    U  = chol(H⁻¹)ᵀ (upper)                  GPTQ's Cholesky reformulation of OBQ
    err_i = (w_i − q_i) / U_ii               scaled quantization error of column i
    W[:, j>i] −= err_i · U[i, j>i]           optimal update of the not-yet-quantized columns
    loss error of column i = (w_i − q_i)² / U_ii²
LeanQuant weights each column's grid fit by d_i = U_ii^(−p) (p = 4 by default).

Dead inputs (x_i = 0 in every calibration token, so H_ii = 0 and H has no cross terms with i)
keep their weights: the calibration loss cannot see them, real inputs can. They are rounded to
the nearest point of their grid (no cross terms: their column neither sends nor receives error
updates), weigh in grid fits as the median live column, and add nothing to the loss error.

Rows of W are independent given U: :func:`prepare` factors H once for every weight that
shares it (q/k/v, gate/up), and :func:`quantize_weight` takes any slice of rows (``rows``),
giving exactly the rows the whole matrix would get, so a weight can be split across devices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from leanquant_serve.format import SUPPORTED_BITS, group_misfit

from .flags import setting
from .grids import GRID_NAMES, AffineParams, GridParams, RowRandom, TableParams, fit_grid
from .refit import refit_weight
from .tables import DEFAULT_SF_NU, TABLE_BITS, TABLE_FITS, quantile_table

log = logging.getLogger(__name__)


class Hessian:
    """Running H = (2/n) Σ x xᵀ over the calibration tokens seen so far, in fp32."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: Tensor) -> None:
        """Add activations x of shape (..., columns)."""
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)  # rescale the old mean to the new count
        self.n += m
        x = x * (2 / self.n) ** 0.5
        self.H.addmm_(x.T, x)  # H += (2/n) xᵀx


class CholeskyError(RuntimeError):
    """H stayed non-positive-definite after every damping retry."""


@dataclass(frozen=True)
class GPTQSettings:
    """How to quantize every weight. The defaults are LeanQuant's (affine grid, groups of 128,
    act-order with static groups), for library callers and the CLI alike: the ``leanquant
    quantize`` flags are built from these fields (quantizer/flags.py). Plain GPTQ is
    ``fit="minmax"``."""

    bits: int = setting(4, "bits per weight", choices=SUPPORTED_BITS)
    group_size: int = setting(128, "columns per group; -1: one group per row")
    # Which grid fit (quantizer/grids.py): minmax (GPTQ) | affine (LeanQuant_aff) | nonuniform
    # (LeanQuant_nu) | exl2 (LeanQuant's objective on the EXL2 ladder) | nf / sf (NormalFloat /
    # Student-Float table, LeanQuant's scale per group). Not the stored grid kind: the
    # checkpoint stores affine, nonuniform or table (:attr:`stored_grid`).
    fit: str = setting(
        "affine",
        "grid fit. affine/nonuniform: LeanQuant's learned grids; exl2: LeanQuant's objective "
        "inside exllamav2's EXL2 grid family (exact `export exllamav2` at 2/3/4/8 bits, stored "
        "as affine); nf/sf: NormalFloat/Student-Float tables (2-4 bits) with LeanQuant's "
        "scale per group (nf at 4 bits, group 64: exact `export bnb-nf4`); minmax: plain GPTQ",
        flags=("--grid",),
        choices=GRID_NAMES,
    )
    # quantize columns in order of decreasing H_ii
    actorder: bool = setting(
        True, "quantize columns by decreasing Hessian diagonal", flags=("--act-order",)
    )
    # fit group grids up front on the original W (no g_idx needed)
    static_groups: bool = setting(
        True, "fit group grids up front so act-order needs no g_idx (fast kernels)"
    )
    blocksize: int = 128
    damp: float = setting(0.01, "λ of H += λ·mean(diag H)·I")
    damp_retries: int = 5  # on a failed Cholesky: λ *= 10, at most this many times
    exponent: float = setting(4.0, "p of LeanQuant's U_ii^-p weights")
    T: int = setting(2048, "affine range-search resolution")
    shrink: float | None = setting(
        None,
        "affine search limit as a fraction of T (default 0.2/0.3/0.4/0.1 for 4/3/2/8 bits)",
        show_default=False,
    )
    kmeans_iters: int = 100
    sf_nu: float = setting(
        DEFAULT_SF_NU, "Student's t degrees of freedom ν of --grid sf's table (SF4: 5)"
    )
    seed: int = setting(0, "random seed (calibration windows, k-means++ draws)")
    # after the column loop, re-solve each row's grid parameters (codes fixed) against the
    # full layer-wise loss (w − q)ᵀ H (w − q); kept per row only where it lowers it (refit.py)
    refit: bool = setting(
        False,
        "after the column loop, re-solve each row's scales / LUT entries (codes fixed) for the "
        "full-Hessian layer-wise loss, kept per row where it helps (quantizer/refit.py)",
    )

    def __post_init__(self) -> None:
        if self.fit not in GRID_NAMES:
            raise ValueError(f"--grid must be one of {', '.join(GRID_NAMES)}, got {self.fit!r}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"--group-size must be -1 or positive, got {self.group_size}")
        if self.fit == "nonuniform" and self.group_size != -1:
            raise ValueError(
                "--grid nonuniform stores one table per output row: use --group-size -1"
            )
        if self.fit in TABLE_FITS and self.bits not in TABLE_BITS:
            raise ValueError(
                f"--grid {self.fit} supports --bits {', '.join(map(str, TABLE_BITS))}, got {self.bits}"
            )
        if self.refit and self.fit == "exl2":
            raise ValueError(
                "--refit re-solves free scales; --grid exl2's scales must stay on EXL2's ladder"
            )
        if not 0 < self.sf_nu < float("inf"):  # also refuses NaN
            raise ValueError(f"--sf-nu must be a positive finite number, got {self.sf_nu}")
        from .errors import check_counts  # (a ValueError too)

        check_counts(T=self.T)
        if not 0 < self.damp < float("inf"):  # also refuses NaN
            raise ValueError(f"--damp must be a positive finite number, got {self.damp}")
        if self.shrink is not None and not 0 <= self.shrink < 0.5:  # lo < hi needs a + c < T
            raise ValueError(f"--shrink must be at least 0 and below 0.5, got {self.shrink}")
        if self.exponent != self.exponent or abs(self.exponent) == float("inf"):
            raise ValueError(f"--exponent must be a finite number, got {self.exponent}")

    @property
    def stored_grid(self) -> str:
        """The grid kind the checkpoint stores (``quantization_config["grid"]``): the per-row
        table, the scaled fixed table (nf, sf), else an affine grid."""
        if self.fit == "nonuniform":
            return "nonuniform"
        return "table" if self.fit in TABLE_FITS else "affine"

    @property
    def table(self):
        """The fixed table of an nf/sf fit, float32 (2^bits,) (quantizer/tables.py); else None."""
        if self.fit not in TABLE_FITS:
            return None
        return quantile_table(self.fit, self.bits, self.sf_nu)

    @property
    def stored_table(self) -> tuple[float, ...] | None:
        """``quantization_config["table"]``: the fixed table's float32 values (nf/sf), else None."""
        t = self.table
        return None if t is None else tuple(t.tolist())


@dataclass
class QuantizedWeight:
    """Result of quantizing one weight matrix, in the original column order."""

    codes: Tensor  # (rows, columns) integer codes (uint8 from the column loop)
    Q: Tensor  # (rows, columns) fp32 dequantized weight, exactly what the codes + grid give
    scales: Tensor | None  # (n_groups, rows) affine and table
    zeros: Tensor | None  # (n_groups, rows) int32, affine only
    lut: Tensor | None  # (rows, 2^bits), nonuniform only
    g_idx: Tensor | None  # (columns,) int32, only for act-order with dynamic groups
    loss: float  # Σ (w − q)²/U_ii² over live columns: GPTQ's loss error (the objective, p = 2)
    row_loss: Tensor  # (rows,) the same per row: row slices concatenate to the same sum
    damp: float  # damping λ finally used
    retries: int  # Cholesky retries needed
    # (rows, 2): each row's layer-wise loss (w − q)ᵀ H (w − q) before and after --refit
    refit_loss: Tensor | None = None

    @staticmethod
    def cat(parts: list[QuantizedWeight], device: torch.device | str) -> QuantizedWeight:
        """The whole weight from its row slices (in row order), on ``device``."""

        def cat(field: str, dim: int) -> Tensor | None:
            ts = [getattr(p, field) for p in parts]
            return None if ts[0] is None else torch.cat([t.to(device) for t in ts], dim)

        g_idx = parts[0].g_idx  # per column: the same in every slice
        row_loss = cat("row_loss", 0)
        return QuantizedWeight(
            cat("codes", 0), cat("Q", 0), cat("scales", 1), cat("zeros", 1), cat("lut", 0),
            None if g_idx is None else g_idx.to(device),
            float(row_loss.sum()), row_loss, parts[0].damp, parts[0].retries,
            cat("refit_loss", 0),
        )  # fmt: skip


def inverse_cholesky(H: Tensor, damp: float, retries: int) -> tuple[Tensor, float, int]:
    """U = chol(H⁻¹) upper, after damping H + λ·mean(diag H)·I; retries with λ·10 on failure.

    H is left unchanged; the factorisation runs in place in one H-sized buffer, so the peak is
    2·|H| (at 405B down_proj's H is 53248² fp32 = 11.3 GB)."""
    mean_diag = torch.mean(torch.diag(H))
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(retries + 1):
        lam = damp * 10**attempt
        L = H.clone()
        L.diagonal().add_(lam * mean_diag)  # H + λ·mean(diag H)·I
        torch.linalg.cholesky_ex(L, out=(L, info))  # = L Lᵀ, in place
        if info == 0:
            torch.cholesky_inverse(L, out=L)  # H⁻¹ = (L Lᵀ)⁻¹, in place
            torch.linalg.cholesky_ex(L, upper=True, out=(L, info))  # H⁻¹ = Uᵀ U, in place
            if info == 0 and torch.isfinite(L).all():
                if attempt:
                    log.warning("Cholesky needed damping %.3g (%d retries)", lam, attempt)
                return L, lam, attempt
        del L
    raise CholeskyError(f"Hessian not positive definite even with damping {lam:.3g}")


@dataclass
class Prepared:
    """What every weight sharing one H needs from it, computed once by :func:`prepare`."""

    U: Tensor  # (columns, columns) upper Cholesky factor of H⁻¹, columns in act-order
    d: Tensor  # (columns,) LeanQuant's column importance U_ii^(−p), act-order (dead: median)
    perm: Tensor | None  # act-order permutation (None: natural order)
    dead: Tensor  # (columns,) bool, original order: inputs that are zero in every token
    damp: float  # damping λ finally used
    retries: int  # Cholesky retries needed

    def to(self, device: torch.device | str) -> Prepared:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Prepared(
            move(self.U), move(self.d), move(self.perm), move(self.dead), self.damp, self.retries
        )


def prepare(H: Tensor | Hessian, s: GPTQSettings) -> Prepared:
    """Factor H for the column loop: dead inputs, act-order, damping, U = chol(H⁻¹)ᵀ, d.

    A dead input (H_ii = 0: zero in every calibration token) gets the placeholder H_ii = mean
    of the live diagonal (1 if none is live): mean(diag H), hence the damping of every other
    column, stays what the live inputs give, and act-order puts it among average columns. Its
    U_ii then reflects the placeholder, not data, so its d_i is set to the median of the live
    columns' d: it weighs in grid fits as a typical column, neither dominating nor ignored.

    Given a :class:`Hessian`, its matrix is taken over (``h.H`` becomes None) and freed as soon
    as U exists: peak 2·|H|. A tensor H is left unchanged (peak 3·|H|)."""
    if isinstance(H, Hessian):
        H, H_owner = H.H, H
        H_owner.H = None
        H = H.to(torch.float32)
    else:
        H = H.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    live = ~dead
    any_live, any_dead = bool(live.any()), bool(dead.any())
    if any_dead:  # H_ii = mean of the live H_jj: a placeholder, no calibration data behind it
        H.diagonal()[dead] = torch.diag(H)[live].mean() if any_live else 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if s.actorder else None
    if perm is not None:
        H = H[perm]
        H = H[:, perm]
    U, lam, retries = inverse_cholesky(H, s.damp, s.damp_retries)
    del H
    d = torch.diag(U) ** -s.exponent  # LeanQuant's column importance d_i = U_ii^(−p)
    if any_dead and any_live:  # dead inputs weigh as the median live column: d_i = median_live d
        dead_p = dead if perm is None else dead[perm]
        d[dead_p] = d[~dead_p].median()
    return Prepared(U, d, perm, dead, lam, retries)


def _stack(groups: list[AffineParams]) -> tuple[Tensor, Tensor]:
    return torch.stack([g.scale for g in groups]), torch.stack([g.zero for g in groups])


def quantize_weight(
    W: Tensor,
    H: Tensor | Prepared | None,
    s: GPTQSettings,
    rows: tuple[int, int] | None = None,
) -> QuantizedWeight:
    """Quantize W (rows, columns) with Hessian H (or its :func:`prepare` d form); H = None gives
    round-to-nearest (no error feedback).

    ``rows=(first, total)``: W holds rows first..first+len(W) of a weight with ``total`` rows;
    the result equals those rows of quantizing the whole weight (random draws are per row)."""
    n_rows, columns = W.shape
    why = group_misfit(s.group_size, columns)
    if why:
        raise ValueError(why)
    G = columns if s.group_size == -1 else s.group_size
    W = W.detach().to(torch.float32).clone()
    W0 = W.clone() if s.refit else None  # the original rows, for the refit's loss
    first, total = rows if rows is not None else (0, n_rows)
    gen = RowRandom(torch.Generator(device=W.device).manual_seed(s.seed), first, total)
    table = s.table
    fit = lambda Wg, d: fit_grid(  # noqa: E731
        s.fit,
        Wg,
        d,
        s.bits,
        T=s.T,
        shrink=s.shrink,
        kmeans_iters=s.kmeans_iters,
        generator=gen,
        table=table,
    )

    if H is None:  # RTN: every column weighs the same, no Hessian, no updates: no column loop
        ones = torch.ones(columns, device=W.device)
        groups = [fit(W[:, g : g + G], ones[g : g + G]) for g in range(0, columns, G)]
        parts = [p.quantize(W[:, k * G : (k + 1) * G]) for k, p in enumerate(groups)]
        codes, Q = torch.cat([c for c, _ in parts], 1), torch.cat([q for _, q in parts], 1)
        return _result(s, groups, codes, Q, None, ((W - Q) ** 2).sum(1), 0.0, 0)

    prep = (H if isinstance(H, Prepared) else prepare(H, s)).to(W.device)
    U, d, perm = prep.U, prep.d, prep.perm
    # Dead inputs keep their weights; they add no loss error (their calibration inputs are 0).
    dead = (prep.dead if perm is None else prep.dead[perm]).tolist()  # per permuted column
    if perm is not None:
        W = W[:, perm]
    invperm = torch.argsort(perm) if perm is not None else None

    # Grids fitted before the loop: per row (group_size -1) and static groups, both on the original W.
    if s.group_size == -1:
        groups: list[GridParams] = [fit(W, d)]
    elif s.static_groups:
        W0, d0 = (W[:, invperm], d[invperm]) if perm is not None else (W, d)
        groups = [fit(W0[:, g : g + G], d0[g : g + G]) for g in range(0, columns, G)]
    else:
        groups = []
    # Group of each (permuted) column: the original column's group for static groups.
    if s.group_size == -1:
        col_group = torch.zeros(columns, dtype=torch.long)
    elif s.static_groups and perm is not None:
        col_group = perm.cpu() // G
    else:
        col_group = torch.arange(columns) // G

    codes = torch.zeros(n_rows, columns, dtype=torch.uint8, device=W.device)  # bits <= 8
    Q = torch.zeros_like(W)
    losses = torch.zeros(n_rows, device=W.device)  # per row: Σ_columns (w − q)²/U_ii²
    B = s.blocksize
    for i1 in range(0, columns, B):
        i2 = min(i1 + B, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if s.group_size != -1 and not s.static_groups and col % G == 0:
                # Dynamic group: fit on the current (error-updated) weights of columns col..col+G.
                Wg = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :G]
                groups.append(fit(Wg, d[col : col + G]))
            w = W1[:, i]
            c, q = groups[col_group[col]].quantize(w)
            codes[:, col], Q[:, col] = c, q
            if not dead[col]:
                losses += (w - q) ** 2 / U1[i, i] ** 2  # loss error (w − q)²/U_ii²
            err = (w - q) / U1[i, i]  # err = (w − q)/U_ii
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # OBQ update inside the block
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the later blocks

    g_idx = None
    if perm is not None:
        codes, Q = codes[:, invperm], Q[:, invperm]
        if s.group_size != -1 and not s.static_groups:
            g_idx = col_group[invperm.cpu()].to(torch.int32)
    result = _result(s, groups, codes, Q, g_idx, losses, prep.damp, prep.retries)
    if s.refit:  # codes fixed, grid re-solved against the full H (quantizer/refit.py)
        H_full = torch.cholesky_inverse(U, upper=True)  # H = (UᵀU)⁻¹: the damped H, act-order
        if perm is not None:
            H_full = H_full[invperm][:, invperm]
        result, res = refit_weight(W0, H_full, result, s.stored_grid, s.group_size, table)
        result.refit_loss = torch.stack([res.loss_before, res.loss_after], 1)
    return result


def _result(
    s: GPTQSettings,
    groups: list[GridParams],
    codes: Tensor,
    Q: Tensor,
    g_idx: Tensor | None,
    row_loss: Tensor,
    damp: float,
    retries: int,
) -> QuantizedWeight:
    """Collect the fitted grids into the stored form: a per-row table, (n_groups, rows) scales
    (fixed tables) or (n_groups, rows) scales/zeros."""
    scales = zeros = lut = None
    if s.fit == "nonuniform":
        lut = groups[0].lut
    elif isinstance(groups[0], TableParams):
        scales = torch.stack([g.scale for g in groups])
    else:
        scales, zeros = _stack(groups)
        zeros = zeros.to(torch.int32)
    return QuantizedWeight(
        codes, Q, scales, zeros, lut, g_idx, float(row_loss.sum()), row_loss, damp, retries
    )
