"""Weights too large for the checkpoint's fp16 grid parameters are refused by name.

Scales, table entries and EXL2 maxima are stored in fp16 (largest finite value 65504; values
from 65520 on round to Inf). A weight that needs a larger one must be reported as such, naming
the tensor and the value needed, for calibrated and round-to-nearest runs and every grid, not
as "NaN/Inf" from the rounded result.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import user_error
from safetensors.torch import load_file, save_file

from quantizer.gptq import GPTQSettings, quantize_weight
from quantizer.grids import FP16RangeError, fit_grid

GRIDS = ("minmax", "affine", "nonuniform", "exl2")
BIG = 6.6e5  # the |w| of the report: 4-bit grids over [−BIG, BIG] need a scale of 88000
TENSOR = "model.layers.1.mlp.down_proj.weight"


def weights_with(values: list[float], rows: int = 8, cols: int = 64) -> torch.Tensor:
    """Small random weights with ``values`` written into row 3."""
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    W[3, : len(values)] = torch.tensor(values)
    return W


def needed(grid: str, lo: float, hi: float, bits: int = 4) -> float:
    """The fp16 parameter a row spanning [lo, hi] (lo < 0 < hi) needs, computed here: the
    affine scale (hi − lo)/maxq, the table entry max(|lo|, |hi|), EXL2's maximum
    max|w|/(maxq/2)."""
    maxq = 2**bits - 1
    if grid in ("minmax", "affine"):
        return (hi - lo) / maxq
    if grid == "nonuniform":
        return max(-lo, hi)
    return max(-lo, hi) / (maxq / 2)


@pytest.mark.parametrize("grid", GRIDS)
def test_each_grid_names_the_value_it_would_need(grid):
    W = weights_with([BIG, -BIG])
    with pytest.raises(FP16RangeError) as e:
        fit_grid(grid, W, torch.ones(W.shape[1]), 4, generator=torch.Generator().manual_seed(0))
    assert e.value.value == pytest.approx(needed(grid, -BIG, BIG), rel=1e-6)
    assert e.value.largest_w == BIG
    assert e.value.what == {"nonuniform": "table entry", "exl2": "EXL2 group maximum"}.get(
        grid, "scale"
    )
    assert "65504" in str(e.value) and "NaN" not in str(e.value)


@pytest.mark.parametrize("grid", GRIDS)
def test_the_boundary_is_fp16s_largest_value(grid):
    """A row needing exactly 65504 is stored (and quantizes to finite values); one needing
    65520, which fp16 rounds to Inf, is refused."""
    fit = lambda W: fit_grid(  # noqa: E731
        grid, W, torch.ones(W.shape[1]), 4, generator=torch.Generator().manual_seed(0)
    )

    def row_needing(value: float) -> list[float]:
        """A row spanning [−1, hi] whose parameter (see :func:`needed`) is ``value``."""
        hi = {"minmax": 15 * value - 1, "affine": 15 * value - 1, "exl2": 7.5 * value}
        return [hi.get(grid, value), -1.0]

    assert needed(grid, *row_needing(65504.0)[::-1]) == 65504.0
    W = weights_with(row_needing(65504.0))
    p = fit(W)
    Q = p.quantize(W)[1]
    assert torch.isfinite(Q).all()
    stored = p.lut if grid == "nonuniform" else p.scale
    assert float(stored.max()) == 65504.0
    with pytest.raises(FP16RangeError):
        fit(weights_with(row_needing(65520.0)))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("calibrated", [False, True], ids=["rtn", "gptq"])
def test_quantize_weight_refuses_before_rounding(grid, calibrated):
    W = weights_with([BIG, -BIG])
    X = torch.randn(256, W.shape[1], generator=torch.Generator().manual_seed(1))
    H = 2 / len(X) * X.T @ X if calibrated else None
    s = GPTQSettings(
        bits=4,
        fit=grid,
        group_size=-1 if grid == "nonuniform" else 32,
        actorder=False,
        static_groups=False,
    )
    with pytest.raises(FP16RangeError) as e:
        quantize_weight(W, H, s)
    assert e.value.value >= needed(grid, -BIG, BIG) * (1 - 1e-6)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def big_weight_model(tiny_model, tmp_path_factory) -> tuple[Path, float]:
    """The tiny llama with TENSOR holding ±6.6e5 (as bf16 stores it); returns (folder, |w|)."""
    path = tmp_path_factory.mktemp("big") / "model"
    shutil.copytree(tiny_model("llama"), path)
    weights = load_file(path / "model.safetensors")
    weights[TENSOR][0, 1] = BIG
    weights[TENSOR][0, 2] = -BIG
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path, float(weights[TENSOR][0, 1])


@pytest.mark.parametrize(
    "grid,calibrated",
    [("affine", False), ("affine", True), ("nonuniform", False), ("exl2", True)],
)
def test_cli_names_the_tensor_and_the_fp16_limit(
    grid, calibrated, big_weight_model, calib_text, capsys, tmp_path
):
    model, w = big_weight_model
    how = ["--calib", str(calib_text), "--nsamples", "4", "--seqlen", "32"] if calibrated else []
    group = ["--group-size", "-1" if grid == "nonuniform" else "32"]
    argv = ["quantize", str(model), str(tmp_path / "out"), "--grid", grid, *group]
    msg = user_error(capsys, argv + (how or ["--rtn"]))
    what = {"nonuniform": "table entry", "exl2": "EXL2 group maximum"}.get(grid, "scale")
    assert f"{TENSOR}: its values exceed what an fp16 {what} can represent" in msg, msg
    assert f"|w| = {w:.3g}" in msg and f"{needed(grid, -w, w):.3g}" in msg and "65504" in msg
    assert "NaN" not in msg and "--skip 'mlp.down_proj'" in msg
    assert not (tmp_path / "out").exists()


def test_a_weight_beyond_the_compute_dtype_is_named(big_weight_model, capsys, tmp_path):
    model, w = big_weight_model
    argv = [
        "quantize",
        str(model),
        str(tmp_path / "out"),
        "--rtn",
        "--dtype",
        "float16",
        "--group-size",
        "32",
    ]
    msg = user_error(capsys, argv)
    assert f"tensor {TENSOR}: values up to |w| = {w:.3g} exceed what --dtype float16" in msg
    assert "NaN" not in msg


def test_weights_grown_by_gptq_updates_are_told_apart():
    """The fit saw weights larger than the source's: the cause is the error feedback."""
    from quantizer.layer_step import fp16_range_error

    W = weights_with([3.0, -3.0])
    grown = FP16RangeError("scale", 9e4, 6.75e5)
    msg = str(fp16_range_error("model.layers.0", "mlp.up_proj", W, grown, rtn=False))
    assert msg.startswith("model.layers.0.mlp.up_proj.weight: GPTQ's error updates grew")
    assert "|w| <= 3 to 6.75e+05" in msg and "9e+04" in msg and "--damp" in msg
    own = FP16RangeError("scale", 9e4, 3.0)  # the source's own weights: no feedback to blame
    assert "exceed what an fp16 scale" in str(fp16_range_error("p", "q", W, own, rtn=False))
