"""The portable dequantize/matmul paths equal the reference dequantizer bit for bit."""

import pytest
import torch

from leanquant_serve.format import LeanQuantConfig, dequantize_linear, pack_linear
from leanquant_serve.kernels.portable import (
    affine_matmul,
    dequantize_affine_t,
    dequantize_lut_t,
    lut_matmul,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _affine(bits, group_size, act_order, out=64, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = LeanQuantConfig(bits=bits, group_size=group_size, desc_act=act_order)
    n_groups = cfg.n_groups(inp)
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g)
    scales = torch.rand(n_groups, out, generator=g) * 0.05 + 1e-3
    zeros = torch.randint(0, 1 << bits, (n_groups, out), generator=g)
    g_idx = None
    if cfg.uses_g_idx:
        g_idx = torch.arange(inp)[torch.randperm(inp, generator=g)] // group_size
    return cfg, pack_linear(cfg, codes, scales=scales, zeros=zeros, g_idx=g_idx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(32, False), (-1, False), (32, True)])
def test_affine_equals_reference(bits, group_size, act_order, dtype):
    cfg, t = _affine(bits, group_size, act_order)
    want = dequantize_linear(cfg, t).t().to(dtype)
    got = dequantize_affine_t(
        t["qweight"], t["scales"], t["zero_points"], bits, t.get("g_idx"), dtype
    )
    assert got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lut_equals_reference(bits, dtype):
    g = torch.Generator().manual_seed(bits)
    cfg = LeanQuantConfig(bits=bits, group_size=-1, grid="nonuniform")
    codes = torch.randint(0, 1 << bits, (48, 96), generator=g)
    lut = torch.randn(48, 1 << bits, generator=g)
    t = pack_linear(cfg, codes, lut=lut)
    want = dequantize_linear(cfg, t).t().to(dtype)
    assert torch.equal(dequantize_lut_t(t["qweight"], t["lut"], bits, dtype), want)


def test_matmuls_equal_dense():
    cfg, t = _affine(4, 32, False)
    x = torch.randn(3, 128)
    bias = torch.randn(64)
    w = dequantize_linear(cfg, t)
    y = affine_matmul(x, t["qweight"], t["scales"], t["zero_points"], 4, bias=bias)
    torch.testing.assert_close(y, x @ w.t() + bias)
    cfg = LeanQuantConfig(bits=3, group_size=-1, grid="nonuniform")
    codes = torch.randint(0, 8, (64, 128))
    t = pack_linear(cfg, codes, lut=torch.randn(64, 8))
    torch.testing.assert_close(lut_matmul(x, t["qweight"], t["lut"], 3), x @ dequantize_linear(cfg, t).t())
