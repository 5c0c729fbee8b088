"""Grids: each learned grid beats min-max on its own weighted objective, values are fp16-exact."""

import pytest
import torch

from quantizer.grids import (
    AffineParams,
    LUTParams,
    fit_affine,
    fit_minmax,
    fit_nonuniform,
)


def objective(W, Q, d):
    """Σ_j d_j (w_j − q_j)² summed over rows, computed here independently of the library."""
    return float(((W - Q) ** 2 * d[None, :]).sum())


def heavy_tailed(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W += torch.randn(rows, cols, generator=g) ** 3 * 0.005  # heavier tails, as real weights
    d = torch.rand(cols, generator=g) ** 4 * 10 + 1e-3  # importance with outliers, like U_ii^-4
    return W, d


def dequant_affine(W, p: AffineParams):
    """Independent affine rounding: q = (clamp(round(w/s) + z, 0, maxq) − z)·s."""
    s, z = p.scale[:, None], p.zero[:, None]
    return (torch.clamp(torch.round(W / s) + z, 0, p.maxq) - z) * s


def dequant_lut(W, p: LUTParams):
    """Independent nearest-entry rounding by brute force over the table."""
    idx = (W[:, :, None] - p.lut[:, None, :]).abs().argmin(-1)
    return p.lut.gather(1, idx)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_affine_beats_minmax_on_weighted_objective(bits):
    W, d = heavy_tailed(64, 256, seed=bits)
    base = objective(W, dequant_affine(W, fit_minmax(W, bits)), d)
    learned = objective(W, dequant_affine(W, fit_affine(W, d, bits)), d)
    assert learned <= base  # min-max is one of the candidates
    if bits <= 4:
        assert learned < 0.97 * base  # and a real search finds better clipping at low bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nonuniform_beats_minmax_on_weighted_objective(bits):
    W, d = heavy_tailed(64, 256, seed=10 + bits)
    base = objective(W, dequant_affine(W, fit_minmax(W, bits)), d)
    learned = objective(
        W, dequant_lut(W, fit_nonuniform(W, d, bits, generator=torch.Generator().manual_seed(0))), d
    )
    assert learned < 0.9 * base


def test_params_quantize_matches_independent_rounding_and_fp16():
    W, d = heavy_tailed(32, 128, seed=0)
    pa = fit_affine(W, d, 3)
    codes, q = pa.quantize(W)
    torch.testing.assert_close(q, dequant_affine(W, pa), rtol=0, atol=0)
    assert torch.equal(pa.scale, pa.scale.half().float())
    assert codes.min() >= 0 and codes.max() <= 7
    pl = fit_nonuniform(W, d, 3)
    codes, q = pl.quantize(W)
    torch.testing.assert_close(q, dequant_lut(W, pl), rtol=0, atol=0)
    assert torch.equal(pl.lut, pl.lut.half().float())
    # column-wise rounding (what the GPTQ loop does) equals whole-matrix rounding
    c0, q0 = pl.quantize(W[:, 5])
    assert torch.equal(q0, q[:, 5]) and torch.equal(c0, codes[:, 5])


def test_weighted_kmeans_follows_the_weights():
    # One row, two clusters of points; a heavily weighted point must pull a centroid onto itself.
    W = torch.tensor([[0.0, 0.1, 0.2, 1.0, 1.1, 5.0]])
    d = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1e6])
    lut = fit_nonuniform(W, d, 1, init="linspace").lut
    assert lut[0, 1].item() == pytest.approx(5.0, abs=1e-2)
    assert lut[0, 0].item() == pytest.approx(0.48, abs=1e-2)  # mean of the other five


@pytest.mark.parametrize("bits", [2, 4])  # linspace and k-means++ (random) initialisation
def test_nonuniform_row_chunks_give_the_same_tables(bits):
    """Fitting in row chunks (bounded memory) changes nothing, random draws included, and
    leaves the generator where one pass over the whole weight leaves it."""
    gen = torch.Generator().manual_seed(bits)
    W, d = torch.randn(37, 24, generator=gen), torch.rand(24, generator=gen) + 0.1
    g_whole, g_chunked = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    whole = fit_nonuniform(W, d, bits, generator=g_whole)
    chunked = fit_nonuniform(W, d, bits, generator=g_chunked, max_chunk_elems=24 * 5)
    assert torch.equal(whole.lut, chunked.lut)
    assert torch.equal(g_whole.get_state(), g_chunked.get_state())


def test_real_smollm2_layer_learned_grids_beat_minmax(smollm2_layer):
    """On a real SmolLM2 weight with a real Hessian's U_ii^-4 importance, both learned grids win."""
    W, d = smollm2_layer
    for bits in (3, 4):
        base = objective(W, dequant_affine(W, fit_minmax(W, bits)), d)
        aff = objective(W, dequant_affine(W, fit_affine(W, d, bits)), d)
        nu = objective(
            W,
            dequant_lut(W, fit_nonuniform(W, d, bits, generator=torch.Generator().manual_seed(0))),
            d,
        )
        assert aff < base and nu < base, (bits, aff / base, nu / base)


@pytest.fixture(scope="module")
def smollm2_layer():
    """mlp.up_proj of SmolLM2 layer 3 and d = U_ii^-4 from its real calibration Hessian."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizer.assets import smollm2_dir, wiki_splits
    from quantizer.data import random_windows, tokenize
    from quantizer.gptq import Hessian, inverse_cholesky

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = tokenize(
        AutoTokenizer.from_pretrained(path), wiki_splits().calib.read_text()[:200_000]
    )
    lin = model.model.layers[3].mlp.up_proj
    h = Hessian(lin.in_features)
    handle = lin.register_forward_pre_hook(lambda _m, a: h.add_batch(a[0]))
    with torch.no_grad():
        model(random_windows(tokens, 8, 256, seed=0))
    handle.remove()
    U, _, _ = inverse_cholesky(h.H, 0.01, 3)
    return lin.weight.detach().clone(), torch.diag(U) ** -4.0


test_real_smollm2_layer_learned_grids_beat_minmax = pytest.mark.slow(
    test_real_smollm2_layer_learned_grids_beat_minmax
)
