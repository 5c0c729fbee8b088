"""NormalFloat / Student-Float table grids (issue 13): the tables, the loss-aware scale, the
contract (config, pack, reference dequantizer), the quantizer end to end on tiny models, the
portable path and the vLLM plugin's table layers."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import SUPPORTED

from leanquant_serve.format import (
    Checkpoint,
    FormatError,
    LeanQuantConfig,
    dequantize_linear,
    pack_linear,
    unpack_linear,
)
from leanquant_serve.kernels.portable import dequantize_table_t, table_matmul
from quantizer.gptq import GPTQSettings, quantize_weight
from quantizer.grids import fit_table
from quantizer.pipeline import QuantizeJob, quantize_model
from quantizer.tables import quantile_offset, quantile_table

# bitsandbytes' hard-coded NF4 table (bitsandbytes/functional.py get_4bit_type("nf4"), 0.50.2),
# float32 values written as Python floats.
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


# ----------------------------------------------------------------------------- tables


def test_nf4_is_bitsandbytes_table_exactly():
    assert quantile_offset(4) == 0.9677083  # bitsandbytes' create_normal_map default
    assert quantile_table("nf", 4).tolist() == BNB_NF4


def test_nf4_equals_installed_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(quantile_table("nf", 4), F.get_4bit_type("nf4", device="cpu"))
    made = F.create_normal_map()  # 256 entries: the 16 values and 240 padding zeros
    assert torch.equal(quantile_table("nf", 4), torch.unique(made))


@pytest.mark.parametrize("fit", ["nf", "sf"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tables_follow_the_construction(fit, bits):
    from scipy import stats

    nu = 5.0
    t = quantile_table(fit, bits, nu)
    k = 2**bits
    assert t.dtype == torch.float32 and t.shape == (k,)
    assert t[0] == -1 and t[-1] == 1 and int((t == 0).sum()) == 1
    assert bool((t[1:] > t[:-1]).all())
    assert int((t < 0).sum()) == k // 2 - 1 and int((t > 0).sum()) == k // 2  # one more positive
    # Independently, in float64: positive levels F⁻¹(p) / F⁻¹(δ), p evenly spaced from δ to ½.
    delta = 1 - 0.5 * (1 / (2 * k) + 1 / (2 * (k - 1)))
    ppf = stats.norm.ppf if fit == "nf" else (lambda p: stats.t.ppf(p, nu))
    p = [delta + (0.5 - delta) * i / (k // 2) for i in range(k // 2)]
    want = sorted(ppf(x) / ppf(delta) for x in p)
    torch.testing.assert_close(
        t[t > 0].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_sf_has_heavier_tails_and_tends_to_nf():
    nf, sf5 = quantile_table("nf", 4), quantile_table("sf", 4, 5.0)
    inner = (nf.abs() < 1) & (nf != 0)  # both end at ±1 and hold an exact 0
    # Normalised to the same outermost quantile, t's heavier tails pull the inner levels in.
    assert bool((sf5[inner].abs() < nf[inner].abs()).all())
    assert (quantile_table("sf", 4, 1e7) - nf).abs().max() < 1e-5


def test_bad_table_settings_are_one_line_errors():
    for kw, flag in [
        (dict(fit="nf", bits=8), "--grid nf supports"),
        (dict(fit="sf", bits=4, sf_nu=0.0), "--sf-nu"),
        (dict(fit="sf", bits=4, sf_nu=float("nan")), "--sf-nu"),
    ]:
        with pytest.raises(ValueError, match=flag) as e:
            GPTQSettings(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="table grid must be"):
        quantile_table("fp4", 4)


# ----------------------------------------------------------------------------- the scale


def weighted(W, d, table, scale):
    """L per row, computed here: each weight to its nearest s·t (brute force over the table)."""
    v = table[None, None, :] * scale[:, None, None]  # (rows, 1, k)
    v = v.expand(-1, W.shape[1], -1)
    q = v.gather(2, (W[:, :, None] - v).abs().argmin(2, keepdim=True))[:, :, 0]
    return ((W - q) ** 2 * d).sum(1)


@pytest.mark.parametrize("fit", ["nf", "sf"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_learned_scale_never_worse_than_absmax(fit, bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(200, 64, generator=g) * 0.02
    W[:, 5] *= 6  # an outlier column
    d = torch.rand(64, generator=g) ** 4 * 100  # U_jj^-p-like importances
    table = quantile_table(fit, bits)
    p = fit_table(W, d, table)
    assert torch.equal(p.scale, p.scale.half().float())  # fp16-exact: what the checkpoint stores
    absmax = W.abs().amax(1).half().float()  # absmax as the checkpoint would store it
    learned, plain = weighted(W, d, table, p.scale), weighted(W, d, table, absmax)
    assert bool((learned <= plain).all())
    assert float((learned < plain).float().mean()) > 0.9  # strictly lower on most rows
    codes, Q = p.quantize(W)  # the grid's own rounding gives the same objective
    torch.testing.assert_close(((W - Q) ** 2 * d).sum(1), learned, rtol=1e-6, atol=0)
    assert torch.equal(Q, table[codes.long()] * p.scale[:, None])


def test_zero_row_and_row_slices():
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    W[2] = 0
    d = torch.ones(32)
    t = quantile_table("nf", 4)
    p = fit_table(W, d, t)
    assert p.scale[2] == 1 and bool((p.quantize(W)[1][2] == 0).all())
    assert torch.equal(fit_table(W[3:], d, t).scale, p.scale[3:])  # rows are independent


# ----------------------------------------------------------------------------- contract


def table_cfg(bits=4, group_size=32, fit="nf", **kw) -> LeanQuantConfig:
    return LeanQuantConfig(
        bits=bits, group_size=group_size, grid="table",
        table=tuple(quantile_table(fit, bits).tolist()), **kw,
    )  # fmt: skip


def test_config_round_trips_and_only_table_grids_carry_a_table():
    cfg = table_cfg()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["table"] == BNB_NF4 and LeanQuantConfig.from_dict(d) == cfg
    assert "table" not in LeanQuantConfig(bits=4).to_dict()  # other checkpoints unchanged


@pytest.mark.parametrize(
    "table,message",
    [
        (None, "missing"),
        (BNB_NF4[:8], "8 entries, expected 2\\*\\*bits = 16"),
        (BNB_NF4[::-1], "strictly ascending"),
        ([2.0, *BNB_NF4[1:]], "within \\[-1, 1\\]"),
        ([*BNB_NF4[:-1], math.nan], "finite"),
        ([*BNB_NF4[:-2], 0.1 + 0.7, 1.0], "float32"),
        ("nf4", "not a list of numbers"),
    ],
)
def test_bad_tables_are_one_line_format_errors(table, message):
    with pytest.raises(FormatError, match=f"quantization_config.table: .*{message}") as e:
        LeanQuantConfig(bits=4, group_size=64, grid="table", table=table)
    assert "\n" not in str(e.value)
    with pytest.raises(FormatError, match="only grid 'table'"):
        LeanQuantConfig(bits=4, table=tuple(BNB_NF4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size,g_idx", [(4, 32, False), (3, -1, False), (2, 32, True)])
def test_pack_dequantize_and_portable_path(bits, group_size, g_idx, dtype):
    g = torch.Generator().manual_seed(bits)
    cfg = table_cfg(bits, group_size, "sf", desc_act=g_idx)
    out, inp = 40, 96
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g)
    scales = (torch.rand(cfg.n_groups(inp), out, generator=g) * 0.05 + 1e-3).half().float()
    gi = torch.randperm(inp, generator=g) // group_size if g_idx else None
    t = pack_linear(cfg, codes, scales=scales, g_idx=gi)
    assert set(t) == {"qweight", "scales"} | ({"g_idx"} if g_idx else set())
    u = unpack_linear(cfg, t)
    assert torch.equal(u["codes"], codes.int())
    table = torch.tensor(cfg.table)
    groups = (
        gi
        if g_idx
        else (
            torch.arange(inp) // group_size
            if group_size > 0
            else torch.zeros(inp, dtype=torch.long)
        )
    )
    want = (table[codes] * scales[groups, torch.arange(out)[:, None]]).to(dtype)  # fp32 product
    assert torch.equal(dequantize_linear(cfg, t, dtype), want)
    got = dequantize_table_t(t["qweight"], t["scales"], table, bits, t.get("g_idx"), dtype)
    assert torch.equal(got, want.t())
    x = torch.randn(3, inp, generator=g)
    torch.testing.assert_close(
        table_matmul(x, t["qweight"], t["scales"], table, bits, t.get("g_idx")),
        x @ dequantize_linear(cfg, t).t(),
    )
    with pytest.raises(FormatError, match="zeros: grid 'table'"):
        pack_linear(cfg, codes, scales=scales, zeros=codes[:1], g_idx=gi)


def test_quantize_weight_stores_exactly_what_the_loop_rounded_to():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 128, generator=g) * 0.05
    X = torch.randn(512, 128, generator=g)
    H = 2 * X.T @ X / 512
    for fit in ("nf", "sf"):
        s = GPTQSettings(bits=4, group_size=32, fit=fit)
        r = quantize_weight(W, H, s)
        assert r.zeros is None and r.scales.shape == (4, 48)
        cfg = LeanQuantConfig(
            bits=4, group_size=32, grid=s.stored_grid, table=s.stored_table,
            desc_act=True, static_groups=True,
        )  # fmt: skip
        packed = pack_linear(cfg, r.codes, scales=r.scales)
        assert torch.equal(dequantize_linear(cfg, packed), r.Q)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(
    scope="module",
    params=[(a, f) for a in SUPPORTED for f in ("nf", "sf")],
    ids=lambda p: "-".join(p),
)
def table_run(request, tiny_model, calib_text, tmp_path_factory):
    arch, fit = request.param
    out = tmp_path_factory.mktemp(f"{arch}-{fit}") / "ckpt"
    s = GPTQSettings(bits=4 if fit == "nf" else 3, group_size=32, fit=fit, blocksize=32)
    Q: dict[str, torch.Tensor] = {}
    quantize_model(
        QuantizeJob(
            model=tiny_model(arch),
            out=out,
            settings=s,
            calib=str(calib_text),
            nsamples=4,
            seqlen=32,
        ),
        lambda name, r: Q.__setitem__(name, r.Q.clone()),
    )
    return fit, s, out, Q


def test_tiny_models_round_trip_through_the_reference_dequantizer(table_run):
    fit, s, out, Q = table_run
    ckpt = Checkpoint(out)
    ckpt.validate()
    q = ckpt.qcfg
    assert q.grid == "table" and list(q.table) == quantile_table(fit, s.bits).tolist()
    assert q.quantizer["grid_fit"] == fit
    assert set(ckpt.quantized_prefixes()) == set(Q)
    table = torch.tensor(q.table)
    for prefix in Q:
        tensors = {k: ckpt.get(f"{prefix}.{k}") for k in ("qweight", "scales")}
        assert torch.equal(dequantize_linear(q, tensors), Q[prefix])
        got = dequantize_table_t(
            tensors["qweight"], tensors["scales"], table, q.bits, None, torch.float32
        )
        assert torch.equal(got, Q[prefix].t())


# ----------------------------------------------------------------------------- vLLM plugin


@pytest.mark.parametrize("mode", ["per-call", "dense"])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize(
    "cfg",
    [table_cfg(4, 32), table_cfg(3, -1, "sf"), table_cfg(2, 32, desc_act=True)],
    ids=["nf4-g32", "sf3-pc", "nf2-g32-gidx"],
)
def test_vllm_plugin_serves_table_layers(cfg, world, mode, monkeypatch):
    pytest.importorskip("vllm")
    from test_vllm_plugin import HIDDEN, INTER, load, quant_config, tp_rank
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    from leanquant_serve.vllm import register

    register()
    monkeypatch.setenv("LEANQUANT_PORTABLE", mode)
    g = torch.Generator().manual_seed(cfg.bits)

    def make(out, inp):
        codes = torch.randint(0, 1 << cfg.bits, (out, inp), generator=g)
        scales = torch.rand(cfg.n_groups(inp), out, generator=g) * 0.05 + 1e-3
        gi = torch.arange(inp) // cfg.group_size if cfg.uses_g_idx else None
        return pack_linear(cfg, codes, scales=scales, g_idx=gi)

    stored = {0: make(INTER, HIDDEN), 1: make(INTER, HIDDEN), "down": make(HIDDEN, INTER)}
    w = {k: dequantize_linear(cfg, t) for k, t in stored.items()}
    x = torch.randn(5, HIDDEN, generator=g)
    xi = torch.randn(5, INTER, generator=g)
    parts, down_sum = [], torch.zeros(5, HIDDEN)
    for rank in range(world):
        with tp_rank(rank, world):
            kw = dict(bias=False, params_dtype=torch.float32, quant_config=quant_config(cfg))
            gate_up = MergedColumnParallelLinear(
                HIDDEN, [INTER, INTER], prefix="model.layers.0.mlp.gate_up_proj", **kw
            )
            down = RowParallelLinear(
                INTER, HIDDEN, reduce_results=False, prefix="model.layers.0.mlp.down_proj", **kw
            )
            for shard in (0, 1):
                load(gate_up, stored[shard], shard)
            load(down, stored["down"])
            for layer in (gate_up, down):
                layer.quant_method.process_weights_after_loading(layer)
                assert layer.leanquant_kernel == f"portable ({mode})"
            parts.append(gate_up(x)[0])
            per = INTER // world
            down_sum += down(xi[:, rank * per : (rank + 1) * per])[0]
    per = INTER // world
    torch.testing.assert_close(
        torch.cat([p[:, :per] for p in parts], 1), x @ w[0].t(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        torch.cat([p[:, per:] for p in parts], 1), x @ w[1].t(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(down_sum, xi @ w["down"].t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg, act, want",
    [
        (table_cfg(4, 32), torch.bfloat16, "leanquant-triton-table"),
        (table_cfg(3, -1, "sf"), torch.float16, "leanquant-triton-table"),
        (table_cfg(4, 32), torch.float32, "portable (per-call)"),
        (table_cfg(2, 32, desc_act=True), torch.bfloat16, "portable (per-call)"),
    ],
)
def test_vllm_plugin_picks_the_triton_kernel_on_cuda(cfg, act, want, monkeypatch):
    """The CUDA branch, decided here without a GPU: the Triton table kernel for 16-bit
    activations and contiguous groups; the portable path for float32 or g_idx layers."""
    pytest.importorskip("vllm")
    from test_vllm_plugin import HIDDEN, INTER, quant_config, tp_rank
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    from leanquant_serve.kernels import lut_triton
    from leanquant_serve.vllm import linear, register

    register()
    monkeypatch.setenv("LEANQUANT_PORTABLE", "per-call")
    cuda = SimpleNamespace(is_cuda=lambda: True, is_cuda_alike=lambda: True)
    monkeypatch.setattr(linear, "current_platform", cuda)  # the plugin's view only
    monkeypatch.setattr(lut_triton, "is_available", lambda device: True)
    with tp_rank(0, 1):
        layer = MergedColumnParallelLinear(
            HIDDEN, [INTER, INTER], bias=False, params_dtype=act, quant_config=quant_config(cfg),
            prefix="model.layers.0.mlp.gate_up_proj",
        )  # fmt: skip
    assert layer.leanquant_kernel == want


@pytest.mark.slow
def test_learned_scale_on_a_real_smollm2_layer():
    """SmolLM2-135M's layer-5 gate_proj with its real importances d = U_jj^-4 (H from 1024
    tokens of the bundled Wikipedia sample), its first three groups of 64: per (row, group) the
    learned scale is never worse than absmax, strictly better on over 99% of them, and lower in
    total (whole layer, all nine groups: 0.31x absmax's objective for NF4, 0.29x for SF3)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizer.assets import smollm2_dir, wiki_splits
    from quantizer.gptq import prepare

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = wiki_splits().calib.read_text()[:20000]
    ids = tok(text, return_tensors="pt").input_ids[:, :1024].reshape(4, 256)
    gate = model.model.layers[5].mlp.gate_proj
    seen = []
    hook = gate.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 576)))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    X = torch.cat(seen)
    d = prepare(2 * X.T @ X / X.shape[0], GPTQSettings(actorder=False)).d
    W = gate.weight.detach().float()
    for fit, bits in (("nf", 4), ("sf", 3)):
        table = quantile_table(fit, bits)
        learned, plain = [], []
        for g in range(0, 192, 64):  # three groups of 64 columns, all 1536 rows
            Wg, dg = W[:, g : g + 64], d[g : g + 64]
            learned.append(weighted(Wg, dg, table, fit_table(Wg, dg, table).scale))
            plain.append(weighted(Wg, dg, table, Wg.abs().amax(1).half().float()))
        learned, plain = torch.cat(learned), torch.cat(plain)
        assert bool((learned <= plain).all())
        assert float((learned < plain).float().mean()) > 0.99
        assert float(learned.sum() / plain.sum()) < 0.9  # measured: 0.786 (NF4), 0.788 (SF3)
