"""--refit (quantizer/refit.py): with the codes fixed, every row's grid parameters re-solved for
the full-Hessian layer-wise loss (w − q)ᵀ H (w − q). Losses are recomputed here in float64 from
H itself (damped as the loop damps it), independently of the module's own arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import user_error

from leanquant_serve.format import Checkpoint, dequantize_linear
from quantizer import refit as refit_module
from quantizer.gptq import GPTQSettings, quantize_weight
from quantizer.pipeline import REPORT_FILE, QuantizeJob, quantize_model

CASES = [  # (fit, group size)
    ("affine", 32),
    ("affine", -1),
    ("minmax", 64),
    ("nonuniform", -1),
    ("nf", 64),
    ("sf", 32),
]


def correlated_problem(rows: int = 48, columns: int = 128, seed: int = 0):
    """W and an H with strongly correlated inputs: where the diagonal alone misleads most."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=g) * 0.15 + torch.eye(columns)
    X = torch.randn(2048, columns, generator=g) @ mix
    H = X.T @ X / X.shape[0]
    W = torch.randn(rows, columns, generator=g) * 0.05
    return W, H


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.double()
    return H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)


def loss64(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    E = W.double() - Q.double()
    return ((E @ H) * E).sum(1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("fit,group_size", CASES)
def test_refit_keeps_codes_and_never_raises_the_full_hessian_loss(fit, group_size, bits):
    W, H = correlated_problem()
    plain = quantize_weight(W, H, GPTQSettings(bits=bits, group_size=group_size, fit=fit))
    s = GPTQSettings(bits=bits, group_size=group_size, fit=fit, refit=True)
    r = quantize_weight(W, H, s)
    assert plain.refit_loss is None and r.refit_loss is not None
    assert torch.equal(r.codes, plain.codes)
    if plain.zeros is not None:  # integer zero points stay as the loop chose them
        assert torch.equal(r.zeros, plain.zeros)
    Hd = damped(H, s.damp)
    before, after = loss64(W, plain.Q, Hd), loss64(W, r.Q, Hd)
    # per row: never above, up to float32's rounding of the loss the refit compares (a sum of
    # 128 products: relative error far below 1e-4 on any BLAS) ...
    assert bool((after <= before * (1 + 1e-4)).all()), float((after / before).max())
    # ... and exactly never above in the refit's own arithmetic (it keeps the old grid otherwise)
    assert bool((r.refit_loss[:, 1] <= r.refit_loss[:, 0]).all())
    # ... and lower in total: the diagonal-only fit leaves room on correlated inputs
    assert float(after.sum()) < 0.998 * float(before.sum())
    # the module's own before/after agree with the independent float64 ones
    torch.testing.assert_close(r.refit_loss.double()[:, 0], before, rtol=1e-4, atol=0)
    torch.testing.assert_close(r.refit_loss.double()[:, 1], after, rtol=1e-4, atol=0)
    # stored parameters are fp16-exact, as the checkpoint holds them
    stored = r.lut if fit == "nonuniform" else r.scales
    assert torch.equal(stored, stored.half().float())


def test_solve_is_the_least_squares_optimum():
    """θ = argmin ‖Lᵀ(w − Mθ)‖ (H = L Lᵀ) by float64 least squares, M built here from the codes."""
    W, H = correlated_problem(rows=8, columns=64)
    s = GPTQSettings(bits=3, group_size=16, fit="affine")
    r = quantize_weight(W, H, s)
    Hd = damped(H, s.damp)
    b = refit_module.basis(
        "affine", r.codes, scales=r.scales, zeros=r.zeros, group_size=16, g_idx=r.g_idx
    )
    theta = refit_module.solve(W, Hd.float(), b).double()
    L = torch.linalg.cholesky(Hd)
    for row in range(W.shape[0]):
        M = torch.zeros(64, 4, dtype=torch.float64)
        for j in range(64):
            M[j, j // 16] = float(r.codes[row, j]) - float(r.zeros[j // 16, row])
        want = torch.linalg.lstsq(L.T @ M, L.T @ W[row].double()).solution
        torch.testing.assert_close(theta[row], want, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("fit", ["affine", "nf"])
def test_grouped_normal_equations_equal_the_dense_ones(fit, static_groups):
    """Affine and table grids take the per-group GEMM path (parameters shared by every row's
    group of columns; with act-order's g_idx the groups are scattered columns); in float64 it
    must give the dense path's Mᵀ H M and Mᵀ H w (M built per row, one product per parameter)."""
    W, H = correlated_problem(rows=12, columns=96)
    s = GPTQSettings(bits=3, group_size=16, fit=fit, static_groups=static_groups)
    r = quantize_weight(W, H, s)
    assert (r.g_idx is None) == static_groups
    kw = dict(scales=r.scales, zeros=r.zeros, group_size=16, g_idx=r.g_idx)
    grid = "affine"
    if fit == "nf":
        from quantizer.tables import quantile_table

        grid, kw["table"] = "table", quantile_table("nf", 3)
    b = refit_module.basis(grid, r.codes, **kw)
    assert b.groups is not None and b.groups.shape == (6, 16)
    b64 = refit_module.Basis(b.k, b.a.double(), b.theta.double(), b.groups)
    dense = refit_module.Basis(b.k, b.a.double(), b.theta.double(), None)
    Hd = damped(H, s.damp)
    got = refit_module.solve(W.double(), Hd, b64)
    want = refit_module.solve(W.double(), Hd, dense)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert not torch.equal(want, b.theta.double())  # the refit moved the scales


def test_row_slices_give_the_same_bytes():
    """Device lists split rows; each row's refit must not depend on its neighbours."""
    W, H = correlated_problem(rows=40)
    s = GPTQSettings(bits=3, group_size=32, fit="affine", refit=True)
    whole = quantize_weight(W, H, s)
    for a, b in [(0, 17), (17, 40)]:
        part = quantize_weight(W[a:b], H, s, rows=(a, 40))
        assert torch.equal(part.Q, whole.Q[a:b])
        assert torch.equal(part.scales, whole.scales[:, a:b])


def test_dynamic_groups_with_g_idx_are_refit_by_their_stored_group():
    W, H = correlated_problem()
    s = GPTQSettings(bits=3, group_size=32, fit="affine", static_groups=False, refit=True)
    r = quantize_weight(W, H, s)
    assert r.g_idx is not None
    Q = r.codes.float() - r.zeros.T.gather(1, r.g_idx.long()[None].expand_as(r.codes)).float()
    assert torch.equal(Q * r.scales.T.gather(1, r.g_idx.long()[None].expand_as(r.codes)), r.Q)
    assert float(r.refit_loss[:, 1].sum()) < float(r.refit_loss[:, 0].sum())


def test_refit_is_refused_where_it_cannot_apply(capsys, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="EXL2's ladder"):
        GPTQSettings(fit="exl2", refit=True)
    err = user_error(
        capsys, ["quantize", str(tiny_model("llama")), str(tmp_path / "o"), "--rtn", "--refit"]
    )
    assert "--refit" in err and "calibration" in err


def test_pipeline_reports_refit_and_stores_what_it_refit(tiny_model, calib_text, tmp_path):
    out = tmp_path / "q"
    seen = {}
    s = GPTQSettings(bits=3, group_size=32, fit="affine", refit=True)
    job = QuantizeJob(
        tiny_model("llama"), out, settings=s, calib=str(calib_text), nsamples=4, seqlen=32
    )
    quantize_model(job, observer=lambda name, r: seen.__setitem__(name, r.Q.clone()))
    report = json.loads((out / REPORT_FILE).read_text())
    pairs = [r["refit_loss"] for layer in report["layers"] for r in layer]
    assert len(pairs) == len(seen) and all(after <= before for before, after in pairs)
    assert sum(a for _, a in pairs) < sum(b for b, _ in pairs)
    ckpt = Checkpoint(out)
    assert ckpt.qcfg.quantizer["refit"] is True
    for name, Q in seen.items():  # the checkpoint holds the refit grids
        W = dequantize_linear(ckpt.qcfg, ckpt.linear_tensors(name), torch.float32)
        assert torch.equal(W, Q)


def test_without_refit_the_report_and_config_are_as_before(tiny_model, calib_text, tmp_path):
    out = tmp_path / "q"
    job = QuantizeJob(
        tiny_model("llama"), out, settings=GPTQSettings(bits=4, group_size=32),
        calib=str(calib_text), nsamples=4, seqlen=32,
    )  # fmt: skip
    quantize_model(job)
    report = json.loads((out / REPORT_FILE).read_text())
    assert all("refit_loss" not in r for layer in report["layers"] for r in layer)
    assert "refit" not in Checkpoint(out).qcfg.quantizer


@pytest.mark.slow
@pytest.mark.parametrize(
    "fit,group_size,bits", [("affine", 64, 3), ("nonuniform", -1, 3), ("nf", 64, 4)]
)
def test_refit_lowers_the_loss_on_a_real_smollm2_layer(fit, group_size, bits):
    """Real weights and a real H: SmolLM2-135M's layer-5 up_proj, inputs from 4 windows of 256
    tokens of the bundled Wikipedia sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizer.assets import smollm2_dir, wiki_splits

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(wiki_splits().calib.read_text()[:40000], return_tensors="pt")["input_ids"][0]
    sub = model.model.layers[5].mlp.up_proj
    xs = []
    handle = sub.register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for k in range(4):
            model(input_ids=ids[k * 256 : (k + 1) * 256][None])
    handle.remove()
    X = torch.cat(xs).double()
    H = (X.T @ X / X.shape[0]).float()
    W = sub.weight.data.float()
    s = GPTQSettings(bits=bits, group_size=group_size, fit=fit)
    plain = quantize_weight(W, H, s)
    r = quantize_weight(W, H, GPTQSettings(bits=bits, group_size=group_size, fit=fit, refit=True))
    Hd = damped(H, s.damp)
    before, after = loss64(W, plain.Q, Hd), loss64(W, r.Q, Hd)
    assert bool((after <= before * (1 + 1e-4)).all())
    assert float(after.sum()) < 0.99 * float(before.sum()), float(after.sum() / before.sum())
