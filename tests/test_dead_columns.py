"""Dead inputs: channels that are zero in every calibration token keep their weights.

The calibration loss cannot see such a column (x_i = 0, so H_ii = 0 with no cross terms), but
real inputs can: its weights are quantized like the others, to the nearest point of their
grid (no cross terms, so no error updates reach them or leave them), weigh in grid fits as a
typical live column, add nothing to the loss error, and are counted per sublayer in
``quantize_report.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from leanquant_serve.format import Checkpoint, unpack_linear
from quantizer.gptq import GPTQSettings, Hessian, prepare, quantize_weight
from quantizer.pipeline import REPORT_FILE, QuantizeJob, quantize_model

COLS, G = 64, 16
# Dead inputs: three inside live groups, and all of group 2 (columns 32..47).
DEAD = [3, 17, 18, *range(32, 48)]
ORDERS = {"plain": (False, False), "actorder": (True, False), "static": (True, True)}


def problem(
    scale: float = 1.0, seed: int = 0, dead: list[int] = DEAD
) -> tuple[torch.Tensor, torch.Tensor]:
    """W (24, COLS) and H of correlated inputs whose ``dead`` channels are zero in every token."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(COLS) + 0.5 * torch.randn(COLS, COLS, generator=g)
    X = (torch.randn(512, COLS, generator=g) @ mix) * (torch.rand(COLS, generator=g) * 3 + 0.1)
    X[:, dead] = 0
    h = Hessian(COLS)
    h.add_batch(X * scale)
    return torch.randn(24, COLS, generator=g), h.H


def settings(grid: str, order: str) -> GPTQSettings:
    actorder, static = ORDERS[order]
    return GPTQSettings(
        bits=4,
        fit=grid,
        group_size=-1 if grid == "nonuniform" else G,
        actorder=actorder,
        static_groups=static,
        blocksize=32,  # two blocks: the lazy batch updates between blocks are exercised
    )


def grid_levels(r, columns: int, group_size: int, bits: int = 4) -> torch.Tensor:
    """Every value each weight's stored grid offers, (levels, rows, columns), from the result's
    scales/zeros (its column's group: g_idx, or column // group size) or table."""
    if r.lut is not None:
        return r.lut.T[:, :, None].expand(-1, -1, columns)
    group = r.g_idx.long() if r.g_idx is not None else torch.arange(columns) // group_size
    s, z = r.scales[group].T, r.zeros[group].T.float()  # (rows, columns)
    return (torch.arange(2.0**bits)[:, None, None] - z) * s


def nearest(levels: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The level nearest each weight, by brute force."""
    return levels.gather(0, (levels - W).abs().argmin(0, keepdim=True))[0]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("grid", ["minmax", "affine", "nonuniform", "exl2"])
def test_dead_columns_are_rounded_to_nearest_not_zeroed(grid, order):
    W, H = problem()
    s = settings(grid, order)
    r = quantize_weight(W, H, s)
    levels = grid_levels(r, COLS, s.group_size)
    want = nearest(levels, W)  # the original weights, rounded on the fitted grid
    torch.testing.assert_close(r.Q[:, DEAD], want[:, DEAD], rtol=0, atol=0)
    assert (r.Q[:, DEAD] != 0).float().mean() > 0.8  # not zeroed
    live = [j for j in range(COLS) if j not in DEAD]
    # Live columns do get GPTQ's error updates: their values are not all the nearest ones.
    assert not torch.equal(r.Q[:, live], want[:, live])


@pytest.mark.parametrize("order", ["plain", "static"])
@pytest.mark.parametrize("grid", ["minmax", "affine", "exl2"])
def test_live_columns_ignore_the_dead_weights(grid, order):
    """With a whole group dead, every live column is bit for bit what it is with the dead
    weights zeroed (the previous behaviour) or scaled: no error update crosses a dead column,
    and dead columns add nothing to the loss error. (Groups that mix dead and live columns
    fit their grid to both, as they should, so their live columns, and through the error
    updates the columns after them, do change; act-order's dynamic groups mix them.)"""
    dead = list(range(2 * G, 3 * G))
    live = [j for j in range(COLS) if j not in dead]
    W, H = problem(dead=dead)
    s = settings(grid, order)
    r = quantize_weight(W, H, s)
    for other in (0.0, -3.0):
        W2 = W.clone()
        W2[:, dead] *= other
        r2 = quantize_weight(W2, H, s)
        assert torch.equal(r.codes[:, live], r2.codes[:, live])
        assert torch.equal(r.Q[:, live], r2.Q[:, live])
        assert torch.equal(r.row_loss, r2.row_loss)
        assert not torch.equal(r.Q[:, dead], r2.Q[:, dead])


def test_dead_columns_do_not_change_the_live_columns_factor():
    """A dead input's placeholder H_ii is the mean live H_jj, so the damping λ·mean(diag H)
    and every live d_j are those of the live inputs alone (a fixed placeholder such as 1 would
    change them when activations are small), and a dead column's d is the median live d."""
    W, H = problem(scale=1e-2)
    live = [j for j in range(COLS) if j not in DEAD]
    s = GPTQSettings(bits=4, group_size=-1, fit="minmax", actorder=False, static_groups=False)
    p = prepare(H, s)
    alone = prepare(H[live][:, live], s)
    torch.testing.assert_close(p.d[live], alone.d, rtol=1e-3, atol=0)
    torch.testing.assert_close(p.U[live][:, live], alone.U, rtol=1e-3, atol=1e-6)
    assert torch.equal(p.dead, torch.isin(torch.arange(COLS), torch.tensor(DEAD)))
    assert torch.equal(p.d[DEAD], p.d[live].median().expand(len(DEAD)))
    # Under act-order too (d in act-order: the dead positions permuted alike).
    pa = prepare(H, replace(s, actorder=True))
    dead_p = pa.dead[pa.perm]
    assert torch.equal(pa.d[dead_p], pa.d[~dead_p].median().expand(len(DEAD)))


def test_all_dead_inputs():
    W, _ = problem()
    s = GPTQSettings(bits=4, group_size=G, fit="affine", actorder=True, static_groups=False)
    r = quantize_weight(W, torch.zeros(COLS, COLS), s)
    torch.testing.assert_close(r.Q, nearest(grid_levels(r, COLS, G), W), rtol=0, atol=0)
    assert r.loss == 0.0


# ----------------------------------------------------------------------------- the pipeline

DEAD_DOWN = [5, 6, 7, 30, 31, 64, 65, 66, 90, 100, 126, 127]  # 12 of down_proj's 128 inputs
DEAD_QKV = [1, 20, 21, 40, 63]  # 5 of layer 1's q/k/v inputs (hidden 64)


@pytest.fixture(scope="module")
def dead_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny llama with dead channels: layer 0's up_proj rows DEAD_DOWN are zero, so
    down_proj's inputs act(gate)·up are zero there; layer 1's input_layernorm weights DEAD_QKV
    are zero, so q/k/v see zero there."""
    path = tmp_path_factory.mktemp("dead") / "model"
    shutil.copytree(tiny_model("llama"), path)
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][DEAD_DOWN] = 0
    weights["model.layers.1.input_layernorm.weight"][DEAD_QKV] = 0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def report(out: Path) -> dict[str, int | None]:
    layers = json.loads((out / REPORT_FILE).read_text())["layers"]
    return {f"{i}.{r['name']}": r["dead_inputs"] for i, layer in enumerate(layers) for r in layer}


def test_pipeline_counts_and_keeps_dead_inputs(dead_model, calib_text, tmp_path, caplog):
    s = GPTQSettings(bits=4, group_size=32, fit="affine", actorder=True, static_groups=True)
    out = tmp_path / "ckpt"
    job = QuantizeJob(
        model=dead_model, out=out, settings=s, calib=str(calib_text), nsamples=4, seqlen=32
    )
    with caplog.at_level(logging.INFO, logger="quantizer"):
        quantize_model(job)
    counts = report(out)
    want = dict.fromkeys(counts, 0)
    want["0.mlp.down_proj"] = len(DEAD_DOWN)
    for n in ("q_proj", "k_proj", "v_proj"):
        want[f"1.self_attn.{n}"] = len(DEAD_QKV)
    assert counts == want
    assert "model.layers.0.mlp.down_proj: 12 of 128 inputs are zero" in caplog.text

    # The stored down_proj keeps those columns: the nearest stored grid point of the source
    # weights, computed here from the checkpoint's own scales and zeros.
    name = "model.layers.0.mlp.down_proj"
    ckpt = Checkpoint(out)
    W = load_file(dead_model / "model.safetensors")[f"{name}.weight"].float()
    Q = ckpt.dequantized_weight(name)
    t = unpack_linear(ckpt.qcfg, ckpt.linear_tensors(name))
    group = torch.arange(W.shape[1]) // 32
    scales, zeros = t["scales"].float()[group].T, t["zeros"].float()[group].T
    levels = (torch.arange(16.0)[:, None, None] - zeros) * scales
    torch.testing.assert_close(Q[:, DEAD_DOWN], nearest(levels, W)[:, DEAD_DOWN], rtol=0, atol=0)
    assert (Q[:, DEAD_DOWN] != 0).float().mean() > 0.8

    rtn = tmp_path / "rtn"
    quantize_model(QuantizeJob(model=dead_model, out=rtn, settings=s, rtn=True))
    assert set(report(rtn).values()) == {None}  # no calibration: nothing counted
