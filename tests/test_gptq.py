"""The blocked GPTQ loop against a plain column-by-column OBQ reference written here."""

import pytest
import torch

from quantizer.gptq import (
    CholeskyError,
    GPTQSettings,
    Hessian,
    QuantizedWeight,
    inverse_cholesky,
    prepare,
    quantize_weight,
)
from quantizer.grids import AffineParams, fit_grid, weighted_loss


def problem(rows=24, cols=64, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.5 * torch.randn(
        cols, cols, generator=g
    )  # correlated inputs, as in LLMs
    X = (torch.randn(n, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.1)
    W = torch.randn(rows, cols, generator=g)
    h = Hessian(cols)
    for chunk in X.split(100):  # several batches: the running mean must equal the one-shot one
        h.add_batch(chunk)
    return W, h.H, X


def reference_gptq(W, H, s: GPTQSettings):
    """Unblocked OBQ with Cholesky: quantize column i, push err_i·U[i, j>i] onto the rest."""
    W = W.clone()
    cols = W.shape[1]
    H = H + s.damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # chol(H⁻¹) upper, computed directly
    d = torch.diag(U) ** -s.exponent
    G = cols if s.group_size == -1 else s.group_size
    Q = torch.zeros_like(W)
    params = None
    for i in range(cols):
        if i % G == 0:
            params = fit_grid(s.fit, W[:, i : i + G], d[i : i + G], s.bits)
        _, q = params.quantize(W[:, i])
        Q[:, i] = q
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return Q


def test_hessian_is_two_over_n_xtx():
    W, H, X = problem()
    torch.testing.assert_close(H, 2 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-5)


def teacher_forced_obq(W, H, s: GPTQSettings, r: QuantizedWeight):
    """Replay the column-by-column reference in float64 with the codes and grids the blocked
    loop chose (teacher forcing, as a served model is checked against its reference), and
    return, per column, how much farther the chosen value is from the reference's updated
    weight than the nearest point of the chosen grid (in grid steps; 0 where the chosen code is
    nearest), and, per dynamic group, the chosen grid's objective over the best refit's.

    Exact arithmetic gives 0 and 1 everywhere. In floating point the blocked and the column
    loop sum the error feedback in different orders (and every BLAS in its own), so a weight
    that sits on a rounding boundary may go either way, and then both runs go on from that
    choice: comparing codes would test the BLAS. Replaying the loop's own choices keeps the
    check exact up to float noise on any machine: a wrong update, order or grid gives
    excess of whole steps."""
    W = W.double().clone()
    cols = W.shape[1]
    H = H.double() + s.damp * torch.mean(torch.diag(H.double())) * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # chol(H⁻¹) upper, computed directly
    d = torch.diag(U) ** -s.exponent
    G = cols if s.group_size == -1 else s.group_size
    levels = torch.arange(1 << s.bits, dtype=torch.float64)
    excess, fit_ratio = torch.zeros(cols), []
    for i in range(cols):
        g = i // G
        scale, zero = r.scales[g].double(), r.zeros[g].double()  # (rows,) the loop's grid
        if i % G == 0 and G < cols:  # dynamic group: the loop fitted it on the updated weights
            Wg, dg = W[:, i : i + G].float(), d[i : i + G].float()
            chosen = AffineParams(r.scales[g], r.zeros[g].float(), (1 << s.bits) - 1)
            refit = fit_grid(s.fit, Wg, dg, s.bits)
            L_chosen, L_refit = (weighted_loss(Wg, p.quantize(Wg)[1], dg).sum() for p in (chosen, refit))
            fit_ratio.append(float(L_chosen / L_refit))
        grid = (levels[None, :] - zero[:, None]) * scale[:, None]  # (rows, 2^b) grid values
        w, q = W[:, i], r.Q[:, i].double()
        nearest = (w[:, None] - grid).abs().min(1).values
        excess[i] = float((((w - q).abs() - nearest) / scale).max())
        err = (w - q) / U[i, i]  # err = (w − q)/U_ii
        W[:, i:] -= err[:, None] * U[i, i:][None, :]  # OBQ update of the later columns
    return excess, fit_ratio


@pytest.mark.parametrize(
    "grid,group_size", [("minmax", -1), ("minmax", 16), ("affine", 16), ("affine", -1)]
)
def test_blocked_loop_matches_column_reference(grid, group_size):
    W, H, _ = problem()
    s = GPTQSettings(bits=3, group_size=group_size, fit=grid, blocksize=8, actorder=False, static_groups=False)
    r = quantize_weight(W, H, s)
    excess, fit_ratio = teacher_forced_obq(W, H, s, r)
    # Every code the blocked loop chose is a nearest grid point of the reference's weight, up
    # to float noise (fp32 loop vs float64 replay: far below a thousandth of a step).
    assert excess.max() < 1e-3, (excess.argmax(), excess.max())
    # Every dynamic group's grid is as good as a refit on the reference's weights.
    assert all(abs(f - 1) < 1e-3 for f in fit_ratio), fit_ratio
    # The codes and grids reproduce Q exactly (the loop's bookkeeping).
    g = torch.arange(W.shape[1]) // (W.shape[1] if group_size == -1 else group_size)
    torch.testing.assert_close((r.codes - r.zeros[g].T) * r.scales[g].T, r.Q, rtol=0, atol=0)


def test_teacher_forced_check_catches_a_wrong_update():
    """The check above can fail: a loop that skips the error feedback is off by whole steps."""
    W, H, _ = problem()
    s = GPTQSettings(bits=3, group_size=16, fit="minmax", blocksize=8, actorder=False, static_groups=False)
    rtn = quantize_weight(W, None, s)  # the same grids' family, no error feedback
    excess, _ = teacher_forced_obq(W, H, s, rtn)
    assert excess.max() > 0.5


def test_gptq_beats_rtn_on_layer_output():
    W, H, X = problem(rows=64, cols=128, n=2048)
    for grid in ("minmax", "affine"):
        s = GPTQSettings(bits=3, group_size=32, fit=grid, actorder=False, static_groups=False)
        err = lambda Q: ((X @ (W - Q).T) ** 2).mean().item()  # noqa: E731
        assert err(quantize_weight(W, H, s).Q) < 0.8 * err(quantize_weight(W, None, s).Q)


def test_codes_and_params_reproduce_Q_with_act_order_and_dynamic_groups():
    W, H, _ = problem(cols=64)
    s = GPTQSettings(bits=4, group_size=16, fit="affine", actorder=True, static_groups=False)
    r = quantize_weight(W, H, s)
    assert r.g_idx is not None and sorted(torch.bincount(r.g_idx).tolist()) == [16, 16, 16, 16]
    g = r.g_idx.long()
    Q = (r.codes - r.zeros[g].T) * r.scales[g].T  # w[o, i] = (q − z[g(i), o])·s[g(i), o]
    torch.testing.assert_close(Q.float(), r.Q, rtol=0, atol=0)
    assert not torch.equal(g, torch.arange(64) // 16)  # act-order really permuted the groups


def test_static_groups_keep_contiguous_groups():
    W, H, _ = problem(cols=64)
    r = quantize_weight(
        W, H, GPTQSettings(bits=4, group_size=16, fit="minmax", actorder=True, static_groups=True)
    )
    assert r.g_idx is None
    g = torch.arange(64) // 16
    torch.testing.assert_close((r.codes - r.zeros[g].T) * r.scales[g].T, r.Q, rtol=0, atol=0)


def test_nonuniform_codes_index_the_table():
    W, H, _ = problem()
    r = quantize_weight(W, H, GPTQSettings(bits=3, fit="nonuniform", actorder=True, group_size=-1, static_groups=False))
    assert r.lut.shape == (W.shape[0], 8) and r.scales is None
    torch.testing.assert_close(r.lut.gather(1, r.codes.long()), r.Q, rtol=0, atol=0)


def test_cholesky_retries_with_more_damping_then_fails():
    cols = 16
    v = torch.randn(cols, 1)
    H = v @ v.T  # rank one: not positive definite with tiny damping
    H[0, 1] = H[1, 0] = H[0, 0] * 5  # and indefinite
    U, lam, retries = inverse_cholesky(H, 1e-6, 10)
    assert retries > 0 and lam > 1e-6
    torch.testing.assert_close(
        U.T @ U @ (H + lam * H.diag().mean() * torch.eye(cols)), torch.eye(cols), rtol=0, atol=1e-3
    )
    with pytest.raises(CholeskyError):
        inverse_cholesky(-torch.eye(cols), 0.01, 2)


@pytest.mark.parametrize(
    "s",
    [
        GPTQSettings(bits=4, fit="affine", group_size=64, actorder=False, static_groups=False),
        GPTQSettings(bits=3, fit="nonuniform", actorder=True, group_size=-1, static_groups=False),
        GPTQSettings(bits=4, fit="nonuniform", group_size=-1, actorder=False, static_groups=False),  # k-means++: random draws per row
        GPTQSettings(bits=2, fit="minmax", group_size=32, actorder=True, static_groups=False),
    ],
    ids=["affine-g64", "nu3-actorder", "nu4-kmeans++", "minmax2-g32-actorder"],
)
def test_row_slices_equal_the_whole_weight(s):
    """Rows are independent given U: slices (as a multi-device run quantizes them) give the
    whole weight's codes, values and per-row losses exactly."""
    torch.manual_seed(0)
    rows, cols = 96, 256
    W = torch.randn(rows, cols)
    h = Hessian(cols)
    h.add_batch(torch.randn(512, cols) @ torch.randn(cols, cols) * 0.1)
    prep = prepare(h.H, s)
    whole = quantize_weight(W, prep, s)
    parts = [quantize_weight(W[a:b], prep, s, rows=(a, rows)) for a, b in [(0, 40), (40, 96)]]
    split = QuantizedWeight.cat(parts, "cpu")
    for f in ("codes", "Q", "scales", "zeros", "lut", "row_loss"):
        a, b = getattr(split, f), getattr(whole, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    assert split.loss == whole.loss
    assert torch.equal(quantize_weight(W, h.H, s).Q, whole.Q)  # prepare() inside is the same


def test_prepare_takes_over_a_hessian_and_leaves_a_tensor_alone():
    cols = 64
    h = Hessian(cols)
    h.add_batch(torch.randn(256, cols))
    H = h.H.clone()
    s = GPTQSettings(bits=4, actorder=True, group_size=-1, fit="minmax", static_groups=False)
    from_tensor = prepare(H, s)
    assert torch.equal(H, h.H)  # unchanged
    from_hessian = prepare(h, s)
    assert h.H is None  # taken over (freed once U exists)
    assert torch.equal(from_tensor.U, from_hessian.U) and torch.equal(
        from_tensor.perm, from_hessian.perm
    )
