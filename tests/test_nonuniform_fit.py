"""The exact nonuniform (LeanQuant_nu) fit: optimal per-row weighted 1-D k-means.

Checked against independently computed optima (brute force over every contiguous partition of
the sorted row on small rows, a plain O(k·n²) dynamic programme on wider ones), against Lloyd's
fit on the same rows, and for the properties the pipeline relies on: fp16-exact ascending
tables, the same bytes whatever rows share a call (weights are split by rows across devices,
and across threads), the same bytes on every run, and from both engines (the compiled one on
CPU, the batched torch one elsewhere).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from quantizer import grids
from quantizer.gptq import GPTQSettings, quantize_weight
from quantizer.grids import FP16RangeError, _kmeans_1d_exact, fit_nonuniform

ENGINES = ["torch", "compiled"]
needs_numba = pytest.mark.skipif(
    grids._compiled_kernel() is None, reason="the compiled engine needs numba"
)


def objective(w: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> float:
    """Σ_j d_j (w_j − nearest c)² in float64, empty (NaN) entries ignored; one row."""
    c = c[~c.isnan()].double()
    return float((d.double() * ((w.double()[:, None] - c[None, :]) ** 2).min(1).values).sum())


def objectives(W: torch.Tensor, d: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-row objective of a table (rows, k) by brute force over its entries."""
    dist = (W.double()[:, :, None] - lut.double()[:, None, :]) ** 2
    return (dist.min(-1).values * d.double()).sum(1)


def brute_force(w: torch.Tensor, d: torch.Tensor, k: int) -> float:
    """The least objective over every partition of the sorted row into ≤ k contiguous runs."""
    order = torch.argsort(w)
    x, a = w[order].double().tolist(), d[order].double().tolist()
    n, best = len(x), math.inf
    for parts in range(1, min(k, n) + 1):
        for cuts in itertools.combinations(range(1, n), parts - 1):
            total = 0.0
            for i, j in zip((0, *cuts), (*cuts, n), strict=True):
                s0 = sum(a[i:j])
                if s0 == 0:
                    continue  # a run of weightless values costs nothing wherever its entry is
                c = sum(ai * xi for ai, xi in zip(a[i:j], x[i:j], strict=True)) / s0
                total += sum(ai * (xi - c) ** 2 for ai, xi in zip(a[i:j], x[i:j], strict=True))
            best = min(best, total)
    return best


def plain_dp(w: torch.Tensor, d: torch.Tensor, k: int) -> float:
    """Optimal 1-D k-means by the textbook O(k·n²) recursion, numpy float64, no shortcuts."""
    order = np.argsort(w.numpy(), kind="stable")
    x, a = w.numpy()[order].astype(np.float64), d.numpy()[order].astype(np.float64)
    n = len(x)

    def cost(i: int, j: int) -> float:  # values i..j−1 around their weighted mean
        s0 = a[i:j].sum()
        return (
            0.0 if s0 == 0 else float((a[i:j] * (x[i:j] - (a[i:j] * x[i:j]).sum() / s0) ** 2).sum())
        )

    C = np.array([[cost(i, j) if i <= j else np.inf for j in range(n + 1)] for i in range(n + 1)])
    D = C[0].copy()  # one cluster
    for _ in range(1, k):
        D = np.min(D[:, None] + C, axis=0)  # D[m][j] = min_i D[m−1][i] + cost(i, j)
    return float(D[n])


def random_rows(seed: int, rows: int, n: int):
    """Rows with the awkward cases mixed in: duplicates, a constant row, rows with fewer
    distinct values than any table, zero-weight columns, fp16-exact values throughout."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(rows, n, generator=g) * 0.05).half().float()
    W[1] = W[1, 0]  # constant
    W[2] = torch.where(torch.arange(n) % 2 == 0, W[2, 0], W[2, 1])  # two distinct values
    W[3] = (W[3] * 8).round() / 8  # many duplicates
    W[4, : n // 2] = W[4, n // 2 :][: n // 2]  # every value twice
    d = torch.rand(n, generator=g) ** 4 * 10 + 1e-3  # outliers, like U_ii^-4
    d[n // 3] = 0.0  # a column that weighs nothing
    return W, d


def engine_param(engine: str):
    return pytest.param(engine, marks=needs_numba) if engine == "compiled" else engine


@pytest.mark.parametrize("engine", [engine_param(e) for e in ENGINES])
@pytest.mark.parametrize("k", [4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_fit_equals_brute_force(k, seed, engine):
    W, d = random_rows(seed, rows=8, n=11)
    cent = _kmeans_1d_exact(W, d, k, engine=engine)
    assert cent.shape == (8, k) and cent.dtype == torch.float64
    for r in range(W.shape[0]):
        best = brute_force(W[r], d, k)
        got = objective(W[r], d, cent[r])
        assert got <= best * (1 + 1e-9) + 1e-15, (r, got, best)
        assert got >= best * (1 - 1e-9) - 1e-15, (r, got, best)  # the brute force is a bound
        live = cent[r][~cent[r].isnan()]
        assert torch.all(live[1:] > live[:-1])  # ascending, no entry twice


@pytest.mark.parametrize("engine", [engine_param(e) for e in ENGINES])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exact_fit_equals_a_plain_dp_on_wider_rows(bits, engine):
    """Wider rows than brute force can enumerate: the divide-and-conquer levels all run."""
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(6, 70, generator=g) * 0.02 + torch.randn(6, 70, generator=g) ** 3 * 0.005
    W[0, :30] = W[0, 30:60]  # duplicates
    d = torch.rand(70, generator=g) ** 4 * 10 + 1e-3
    cent = _kmeans_1d_exact(W, d, 2**bits, engine=engine)
    for r in range(W.shape[0]):
        best = plain_dp(W[r], d, 2**bits)
        assert objective(W[r], d, cent[r]) == pytest.approx(best, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("bits", [2, 3])
def test_stored_table_is_the_optimum_in_fp16(bits):
    """The table fit_nonuniform returns: fp16-exact, ascending, no gaps, and its objective is
    the optimum up to what rounding the optimal entries to fp16 can cost."""
    k = 2**bits
    W, d = random_rows(7, rows=8, n=11)
    lut = fit_nonuniform(W, d, bits).lut
    assert lut.shape == (8, k) and lut.dtype == torch.float32
    assert torch.equal(lut, lut.half().float()) and bool(torch.isfinite(lut).all())
    assert bool((lut[:, 1:] >= lut[:, :-1]).all())
    got = objectives(W, d, lut)
    for r in range(W.shape[0]):
        best = brute_force(W[r], d, k)
        # each entry moves by at most half an fp16 step: |δ| ≤ 2^−11·max|w|
        delta2 = float(d.double().sum()) * (2**-11 * float(W[r].abs().max())) ** 2
        assert got[r] <= best + 2 * math.sqrt(best * delta2) + delta2 + 1e-12, (r, got[r], best)


def test_degenerate_rows_give_full_ascending_tables():
    W, d = random_rows(3, rows=8, n=11)
    lut = fit_nonuniform(W, d, 3).lut  # 8 entries
    assert torch.all(lut[1] == W[1, 0])  # a constant row: its value, repeated
    assert W[2, 0].item() in lut[2].tolist() and W[2, 1].item() in lut[2].tolist()
    assert torch.all(lut[2, 1:] > lut[2, :-1])  # the spare entries fill the gap between them
    lo, hi = sorted((W[2, 0].item(), W[2, 1].item()))
    assert lut[2].min().item() == lo and lut[2].max().item() == hi
    # Every row with at most 8 distinct values is represented exactly: objective 0.
    few = [r for r in range(8) if len(torch.unique(W[r])) <= 8]
    assert few and all(objectives(W[few], d, lut[few]) == 0)


def test_zero_weights():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 40, generator=g).half().float()
    # All weights zero: every column counts alike (same as weights of one).
    assert torch.equal(
        fit_nonuniform(W, torch.zeros(40), 2).lut, fit_nonuniform(W, torch.ones(40), 2).lut
    )
    # Weightless columns do not pull entries: the table equals the one fitted without them.
    d = torch.rand(40, generator=g) + 0.1
    d[::3] = 0
    keep = d > 0
    a = _kmeans_1d_exact(W, d, 4)
    b = _kmeans_1d_exact(W[:, keep], d[keep], 4)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="finite and non-negative"):
        fit_nonuniform(W, -d, 2)


@pytest.mark.parametrize("bits", [3, 4])
def test_exact_fit_beats_lloyd(bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 256, generator=g) * 0.02 + torch.randn(64, 256, generator=g) ** 3 * 0.005
    d = torch.rand(256, generator=g) ** 4 * 10 + 1e-3
    exact = objectives(W, d, fit_nonuniform(W, d, bits).lut)
    lloyd = objectives(
        W,
        d,
        fit_nonuniform(W, d, bits, method="lloyd", generator=torch.Generator().manual_seed(0)).lut,
    )
    assert bool((exact <= lloyd * (1 + 1e-6)).all())  # fp16 rounding of two near-equal tables aside
    assert exact.sum() < 0.97 * lloyd.sum()  # and clearly better where Lloyd stops early


def test_rows_are_independent_of_their_batch():
    """A row's table is the same bytes alone, in any slice, in small chunks, or with rows of
    many more distinct values beside it (the widest row sets the arrays' width)."""
    g = torch.Generator().manual_seed(11)
    W = torch.randn(37, 96, generator=g) * 0.03
    W[::3] = (W[::3] * 16).round() / 16  # few distinct values in every third row
    W[5] = W[5, 0]
    d = torch.rand(96, generator=g) ** 4 * 10 + 1e-3
    for bits in (2, 4):
        whole = fit_nonuniform(W, d, bits).lut
        parts = torch.cat(
            [fit_nonuniform(W[a:b], d, bits).lut for a, b in ((0, 1), (1, 10), (10, 37))]
        )
        alone = torch.cat([fit_nonuniform(W[r : r + 1], d, bits).lut for r in range(37)])
        chunked = fit_nonuniform(W, d, bits, max_chunk_elems=96 * 4).lut
        for other in (parts, alone, chunked):
            assert torch.equal(whole, other)


def test_deterministic():
    g = torch.Generator().manual_seed(5)
    W, d = torch.randn(50, 200, generator=g), torch.rand(200, generator=g) + 0.01
    a, b = fit_nonuniform(W, d, 4).lut, fit_nonuniform(W.clone(), d.clone(), 4).lut
    assert a.numpy().tobytes() == b.numpy().tobytes()


def test_non_finite_rows():
    W = torch.randn(4, 16)
    W[1, 3] = math.nan
    lut = fit_nonuniform(W, torch.ones(16), 2).lut
    assert bool(lut[1].isnan().all()) and bool(torch.isfinite(lut[[0, 2, 3]]).all())
    assert torch.equal(lut[[0, 2, 3]], fit_nonuniform(W[[0, 2, 3]], torch.ones(16), 2).lut)
    W[1, 3] = math.inf
    with pytest.raises(FP16RangeError):
        fit_nonuniform(W, torch.ones(16), 2)


def test_quantize_weight_row_split_gives_the_same_bytes():
    """What a device list does: slices of rows quantized apart equal the whole weight."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(24, 64, generator=g) * 0.02
    X = torch.randn(256, 64, generator=g)
    H = 2 / 256 * X.T @ X
    s = GPTQSettings(bits=3, group_size=-1, fit="nonuniform", actorder=True, static_groups=False)
    whole = quantize_weight(W, H, s)
    halves = [quantize_weight(W[a:b], H, s, rows=(a, 24)) for a, b in ((0, 7), (7, 24))]
    assert torch.equal(whole.lut, torch.cat([h.lut for h in halves]))
    assert torch.equal(whole.codes, torch.cat([h.codes for h in halves]))


def test_method_choice():
    g = torch.Generator().manual_seed(4)
    W, d = torch.randn(6, 300, generator=g), torch.rand(300, generator=g) + 0.1
    for bits in (2, 4):  # exact by default up to 4 bits
        assert torch.equal(
            fit_nonuniform(W, d, bits).lut, fit_nonuniform(W, d, bits, method="exact").lut
        )
    lloyd = fit_nonuniform(W, d, 8, method="lloyd", generator=torch.Generator().manual_seed(0))
    default = fit_nonuniform(W, d, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(default.lut, lloyd.lut)  # Lloyd at 8 bits (the DP's 256 layers cost)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_nonuniform(W, d, 2, method="kmeans")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: equal bit patterns (−0 ≠ +0), NaN where NaN."""
    bits_a = torch.where(a.isnan(), 0.0, a).view(torch.int64)
    bits_b = torch.where(b.isnan(), 0.0, b).view(torch.int64)
    return ((bits_a == bits_b) & (a.isnan() == b.isnan())).all(1)


def awkward_rows(seed: int, rows: int, n: int, dtype: torch.dtype):
    """Random heavy-tailed rows in ``dtype`` with the awkward cases of :func:`random_rows`, plus
    −0 beside +0, ties between a value's copies, rows with exactly k distinct values, tiny
    and zero column weights, values far from 0 (a large mean)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n, generator=g) * 0.02 + torch.randn(rows, n, generator=g) ** 3 * 0.005
    W[1] = W[1, 0]
    W[2] = torch.where(torch.arange(n) % 2 == 0, W[2, 0], W[2, 1])
    W[3] = (W[3] * 8).round() / 8
    W[4, : n // 2] = W[4, n // 2 :][: n // 2]
    W[5] = (W[5] * 64).round() / 64  # many ties, -0 among them below
    W[5, ::7] = -0.0
    W[5, 3::7] = 0.0
    W[6] = torch.tensor([-0.0, 0.0, 0.0, -0.0]).repeat(n // 4 + 1)[:n]  # one value, two signs
    W[7] = W[7] + 3.0
    for r, m in ((8, 2), (9, 4), (10, 8), (11, 16)):  # exactly m distinct values
        if m > n:
            continue
        W[r] = torch.linspace(-0.1, 0.1, m)[torch.randint(m, (n,), generator=g)]
        W[r, :m] = torch.linspace(-0.1, 0.1, m)
    W = W.to(dtype)
    d = torch.rand(n, generator=g) ** 4 * 10 + 1e-3
    d[n // 3] = 0.0
    d[n // 2] = 1e-30
    return W, d


@needs_numba
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
def test_engines_give_the_same_bytes(dtype):
    """The compiled engine (the CPU default) against the torch engine, which is the fit this
    project shipped before it (unchanged, and the GPU path): every centroid the same bit
    pattern on a few hundred random rows, at every table size, from every input dtype."""
    for seed, rows, n in ((0, 300, 97), (1, 40, 700), (2, 30, 5)):
        W, d = awkward_rows(seed, rows, n, dtype)
        for k in (2, 4, 8, 16):
            a = _kmeans_1d_exact(W, d, k, engine="compiled")
            b = _kmeans_1d_exact(W, d, k, engine="torch")
            assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape == (rows, k)
            bad = (~same_bytes(a, b)).nonzero().flatten().tolist()
            assert not bad, (seed, k, bad[:5], a[bad[:2]], b[bad[:2]])
    # the ±0 row: one distinct value (the last copy's sign, as the torch engine's stable sort)
    assert torch.equal(a[6].isnan(), torch.tensor([False] + [True] * 15))


@needs_numba
def test_default_engine_and_fallback(monkeypatch):
    """CPU uses the compiled engine when numba imports and the torch engine otherwise; the
    tables are the same bytes either way; an unknown engine is refused."""
    W, d = awkward_rows(3, 64, 120, torch.float32)
    compiled = fit_nonuniform(W, d, 3).lut
    calls = []
    monkeypatch.setattr(grids, "_kmeans_1d_torch", lambda *a: calls.append(1) or torch_fit(*a))
    assert torch.equal(fit_nonuniform(W, d, 3).lut, compiled) and not calls
    monkeypatch.setattr(grids, "_KERNEL", [None])  # as without numba
    assert torch.equal(fit_nonuniform(W, d, 3).lut, compiled) and calls
    with pytest.raises(RuntimeError, match="needs numba"):
        _kmeans_1d_exact(W, d, 8, engine="compiled")
    with pytest.raises(ValueError, match="engine must be one of"):
        _kmeans_1d_exact(W, d, 8, engine="numpy")


torch_fit = grids._kmeans_1d_torch


@needs_numba
def test_compiled_engine_threads_and_chunks_give_the_same_bytes(monkeypatch):
    W, d = awkward_rows(4, 101, 64, torch.float32)
    one = _kmeans_1d_exact(W, d, 4)
    monkeypatch.setattr(grids, "_COMPILED_MIN_WORK", 1)  # a thread per few rows
    monkeypatch.setattr(grids, "_COMPILED_CHUNK_ELEMS", 64 * 7)  # 7 rows per kernel call
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        split = _kmeans_1d_exact(W, d, 4)
    finally:
        torch.set_num_threads(threads)
    assert bool(same_bytes(one, split).all())
