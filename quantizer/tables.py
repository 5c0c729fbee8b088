"""The fixed tables of the NormalFloat (NF) and Student-Float (SF) grids, built from quantiles.

A table grid rounds w to s·t[q]: one scale s per (row, group) and a fixed table t of 2^b values
in [-1, 1] with an exact 0 (the quantizer learns s, :func:`quantizer.grids.fit_table`).

Construction (QLoRA, Dettmers et al. 2023, §3 and Appendix E; bitsandbytes'
``functional.create_normal_map(offset, use_extra_value=True)``, whose arithmetic is copied
step by step so that 4 bits reproduces bitsandbytes' NF4 table bit for bit), for k = 2^b:

    offset  δ = round(1 − ½·(1/(2k) + 1/(2(k−1))), 7)      (k = 16: 0.9677083, bitsandbytes')
    p⁺ = linspace(δ, ½, k/2 + 1)[:−1]  (float32)            k/2 positive quantile levels
    p⁻ = linspace(δ, ½, k/2)[:−1]      (float32)            k/2 − 1 negative ones
    t  = sort({F⁻¹(p⁺)} ∪ {0} ∪ {−F⁻¹(p⁻)}) in float32,  then t /= max(t) in float32

with F the standard normal CDF for NF and Student's t CDF with ν degrees of freedom for SF
(Dotzel et al., "Student Float", ICML 2024: SF4 is this construction with ν = 5). The table is
asymmetric (one more positive value), so it has an exact 0 and ends at exactly −1 and 1 only
on the positive side's normalisation (t[−1] = 1; t[0] = −F⁻¹(δ)/F⁻¹(δ) = −1 as well, since
p⁺ and p⁻ share their first level δ). Quantiles come from scipy (``scipy.stats``; scipy is
installed with scikit-learn), as bitsandbytes computes them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TABLE_FITS = ("nf", "sf")
TABLE_BITS = (2, 3, 4)
DEFAULT_SF_NU = 5.0  # Student Float's SF4 (Dotzel et al. 2024)


def quantile_offset(bits: int) -> float:
    """δ of the construction: QLoRA's outermost quantile level for 2^bits values, rounded to 7
    decimals as bitsandbytes writes it (0.9677083 at 4 bits)."""
    k = 2**bits
    return round(1 - 0.5 * (1 / (2 * k) + 1 / (2 * (k - 1))), 7)


def quantile_table(fit: str, bits: int, nu: float = DEFAULT_SF_NU) -> Tensor:
    """The 2^bits-entry table of grid ``fit`` ("nf" or "sf"), float32 (2^bits,), ascending,
    in [-1, 1] with an exact 0; ``nu`` (Student's t degrees of freedom, > 0) only for "sf".

    Raises ValueError for another fit, bits outside 2..4, or a ν that is not positive and
    finite. NF4 equals bitsandbytes' NF4 table exactly (tests/test_tables.py)."""
    from scipy import stats

    if fit not in TABLE_FITS:
        raise ValueError(f"table grid must be one of {', '.join(TABLE_FITS)}, got {fit!r}")
    if bits not in TABLE_BITS:
        raise ValueError(
            f"--grid {fit} supports {', '.join(map(str, TABLE_BITS))} bits, got {bits}"
        )
    if fit == "sf" and not (0 < nu < math.inf):
        raise ValueError(f"--sf-nu must be a positive finite number, got {nu}")
    ppf = stats.norm.ppf if fit == "nf" else (lambda p: stats.t.ppf(p, nu))
    k, offset = 2**bits, quantile_offset(bits)
    v1 = ppf(torch.linspace(offset, 0.5, k // 2 + 1)[:-1].numpy()).tolist()  # k/2 positive
    v3 = (-ppf(torch.linspace(offset, 0.5, k // 2)[:-1].numpy())).tolist()  # k/2 − 1 negative
    values = torch.tensor(v1 + [0.0] + v3, dtype=torch.float32).sort().values
    values /= values.max()  # in float32, as bitsandbytes
    return values


def table_name(fit: str, bits: int, nu: float = DEFAULT_SF_NU) -> str:
    """A short name for the table: ``nf4``, ``sf3-nu5``."""
    return f"{fit}{bits}" if fit == "nf" else f"{fit}{bits}-nu{nu:g}"
