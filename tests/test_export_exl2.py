"""``--grid exl2`` and ``leanquant export exllamav2`` to EXL2, checked without a GPU.

exllamav2 cannot be imported without CUDA, so :class:`EmulatedEXL2Matrix` re-implements, from
its source at tag v0.3.2, what it does with an EXL2 linear:

- ``module.py ExLlamaV2Module.load_weight``: q_perm = argsort(q_invperm);
- ``ext.py make_q_matrix``: q_scale_max *= 1/256 (in fp16); ``make_group_map_py``: a group's
  rows are (its packed rows) · 32 / bits, the last group takes the rest;
- ``cuda/q_matrix.cu reconstruct_kernel``: per output n, the group's scale is
  ``qdq_util.cuh dq_scale`` = fp16((qs+1)²) · q_scale_max (fp16 product), qs being nibble n % 8
  of word n // 8 of q_scale row g (``pack_rows_4_kernel``); each weight is
  fp16(q − 2^(bits−1)) · scale (``__hmul2``), written to row q_perm[k];
- ``cuda/pack_tensor.cu pack_columns_kernel``: 32 rows of codes fill ``bits`` words per column,
  code j at bit j·bits of their little-endian concatenation (``wshift``).

The unpacking below is written from those kernels bit by bit, not with the project's
``unpack_codes``, so a packing mistake cannot cancel out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_export_exllamav2 import read_safetensors
from torch import Tensor

from leanquant.cli import main
from leanquant_serve.exllamav2.export import (
    convert_linear_exl2,
    exl2_levels,
    export_exllamav2,
)
from leanquant_serve.export import ExportError
from leanquant_serve.format import Checkpoint, LeanQuantConfig, dequantize_linear, pack_linear
from leanquant_serve.format.exl2 import exl2_scales
from quantizer.gptq import GPTQSettings
from quantizer.grids import EXL2_MULTIPLIERS, fit_exl2, weighted_loss
from quantizer.pipeline import QuantizeJob, quantize_model


class EmulatedEXL2Matrix:
    """What exllamav2 0.3.2 builds from one EXL2 linear's tensors (see the module docstring)."""

    def __init__(self, t: dict[str, Tensor]) -> None:
        assert t["q_weight"].dtype == torch.int32 and t["q_scale"].dtype == torch.int32
        assert t["q_scale_max"].dtype == torch.float16 and t["q_groups"].dtype == torch.int16
        self.q_weight = t["q_weight"].to(torch.int64) & 0xFFFFFFFF  # words as unsigned
        self.q_scale = t["q_scale"].to(torch.int64) & 0xFFFFFFFF
        self.max_scale = t["q_scale_max"] * (1 / 256)  # ext.py: fp16 tensor *= 1/256
        self.perm = torch.argsort(t["q_invperm"].long())  # module.py: q_perm
        self.groups = t["q_groups"].long().view(-1, 2).tolist()  # (bits, first packed row)
        self.width = self.q_weight.shape[1]
        assert self.q_scale.shape == (len(self.groups), self.width // 8)  # TORCH_CHECK_SHAPES

    def _codes(self, words: Tensor, bits: int) -> Tensor:
        """pack_columns_kernel inverted: (rows·bits/32, n) words -> (rows, n) codes."""
        chunks = words.view(-1, bits, self.width)  # 32 rows per ``bits`` words
        out = []
        for j in range(32):
            w, off = divmod(j * bits, 32)
            v = chunks[:, w] >> off
            if off + bits > 32:  # straddles into the next word
                v = v | (chunks[:, w + 1] << (32 - off))
            out.append(v & ((1 << bits) - 1))
        return torch.stack(out, 1).reshape(-1, self.width)

    def reconstruct(self) -> Tensor:
        """The dense (in, out) fp16 weight, rows in the original order."""
        n = torch.arange(self.width)
        rows_out = []
        n_qrows = self.q_weight.shape[0]
        for g, (bits, start) in enumerate(self.groups):
            end = self.groups[g + 1][1] if g + 1 < len(self.groups) else n_qrows
            q = self._codes(self.q_weight[start:end], bits)
            qs = (self.q_scale[g, n // 8] >> (4 * (n % 8))) & 0xF  # MatrixView_q4_row.item
            scale = ((qs + 1) ** 2).to(torch.float16) * self.max_scale[g]  # dq_scale
            rows_out.append((q - (1 << (bits - 1))).to(torch.float16) * scale)  # dq, __hmul2
        stored = torch.cat(rows_out)
        W = torch.empty_like(stored)
        W[self.perm] = stored  # b_.set(perm[lk], n, ...)
        return W


def exl2_tensors(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    keys = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
    return {k: sd[f"{prefix}.{k}"] for k in keys}


# ----------------------------------------------------------------------------- the grid fit


def exllamav2_level_rule(W: Tensor, M: Tensor, bits: int) -> Tensor:
    """exllamav2's own level choice for maximum M (AdaptiveQuantizer.find_params):
    qs = clamp(round(√(base_r / M) · 16), 1, 16), base_r = max|w_r| / (maxq/2); level qs − 1."""
    base = W.abs().amax(1) / ((2**bits - 1) / 2)
    return (torch.clamp(torch.round(torch.sqrt(base / M) * 16), 1, 16) - 1).long()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fit_exl2_is_in_the_family_and_beats_exllamav2s_choice_on_the_objective(bits):
    gen = torch.Generator().manual_seed(bits)
    W = torch.randn(96, 64, generator=gen) * torch.rand(96, 1, generator=gen) * 0.05
    d = torch.rand(64, generator=gen) ** 4 + 1e-3  # uneven column importance, as U_ii^-4
    p = fit_exl2(W, d, bits)
    assert bool((p.zero == 2 ** (bits - 1)).all()) and p.maxq == 2**bits - 1
    M, level = exl2_levels(p.scale[None, :], "fit")  # every scale on one group's ladder
    assert torch.equal(exl2_scales(M)[0, level[0]].float(), p.scale)
    loss = weighted_loss(W, p.quantize(W)[1], d).sum()
    base = W.abs().amax() / ((2**bits - 1) / 2)
    for mult in EXL2_MULTIPLIERS:  # at every candidate M, every row's level is the best one
        Mc = (base * mult).half()
        s = exl2_scales(Mc).float()[exllamav2_level_rule(W, Mc.float(), bits)]
        zero = 2 ** (bits - 1)
        q = (torch.clamp(torch.round(W / s[:, None]) + zero, 0, 2**bits - 1) - zero) * s[:, None]
        assert loss <= weighted_loss(W, q, d).sum()


def test_fit_exl2_handles_a_dead_group():
    p = fit_exl2(torch.zeros(8, 32), torch.ones(32), 4)
    assert bool((p.scale > 0).all()) and torch.equal(
        p.quantize(torch.zeros(8, 32))[1], torch.zeros(8, 32)
    )


# ----------------------------------------------------------------------------- synthetic linears


def synthetic_exl2_linear(
    bits: int, group_size: int, in_features: int, out_features: int, *, g_idx: bool, seed: int
) -> tuple[LeanQuantConfig, dict[str, Tensor]]:
    """A linear whose grids are EXL2's: random maxima (tiny ones make M/256 subnormal in fp16)
    and random levels."""
    gen = torch.Generator().manual_seed(seed)
    cfg = LeanQuantConfig(bits=bits, group_size=group_size, desc_act=g_idx, static_groups=not g_idx)
    groups = cfg.n_groups(in_features)
    M = (torch.rand(groups, generator=gen) * 0.2 + 1e-4).half()
    M[0] = 2.0**-14  # M/256 = 2^-22: subnormal
    level = torch.randint(0, 16, (groups, out_features), generator=gen)
    scales = exl2_scales(M).gather(1, level)
    zeros = torch.full((groups, out_features), 1 << (bits - 1))
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen)
    kw = {}
    if g_idx:
        perm = torch.randperm(in_features, generator=gen)
        kw["g_idx"] = (torch.argsort(perm) // group_size).to(torch.int32)
    return cfg, pack_linear(cfg, codes, scales=scales, zeros=zeros, **kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "group_size, in_features, g_idx", [(32, 256, False), (64, 192, True), (-1, 96, False)]
)
def test_exl2_export_of_exl2_grids_is_exact(bits, group_size, in_features, g_idx):
    cfg, t = synthetic_exl2_linear(bits, group_size, in_features, 64, g_idx=g_idx, seed=bits)
    exl2 = convert_linear_exl2(cfg, t, "layer")
    assert exl2["q_weight"].shape == (in_features * bits // 32, 64)
    permuted = not torch.equal(exl2["q_invperm"].long(), torch.arange(in_features))
    assert permuted == g_idx
    W = EmulatedEXL2Matrix(exl2).reconstruct()
    ref = dequantize_linear(cfg, t, torch.float16)
    assert torch.equal(W.t().view(torch.int16), ref.view(torch.int16))  # bit for bit


@pytest.mark.parametrize("levels", [range(0, 7), range(2, 16, 2), range(5, 6)])
def test_exl2_levels_recovers_groups_whose_top_level_is_not_15(levels):
    """Any (M, level) reproducing every scale is as good as the original one."""
    gen = torch.Generator().manual_seed(len(levels))
    M = (torch.rand(6, generator=gen) * 0.3 + 2.0**-14).half()
    pick = torch.tensor(list(levels))[torch.randint(0, len(levels), (6, 40), generator=gen)]
    scales = exl2_scales(M).gather(1, pick)
    M2, level = exl2_levels(scales, "layer")
    assert torch.equal(exl2_scales(M2).gather(1, level), scales)


def test_exl2_export_refuses_grids_outside_the_family():
    cfg, t = synthetic_exl2_linear(4, 32, 128, 64, g_idx=False, seed=0)
    scales = t["scales"].clone()
    scales[1, 3] = scales[1, 3] * 1.01  # off the ladder
    with pytest.raises(ExportError, match="group 1 are not"):
        convert_linear_exl2(cfg, {**t, "scales": scales}, "layer")
    other = pack_linear(
        cfg,
        torch.zeros(64, 128, dtype=torch.int32),
        scales=t["scales"],
        zeros=torch.full(t["scales"].shape, 3),
    )
    with pytest.raises(ExportError, match="zero points other than 8"):
        convert_linear_exl2(cfg, other, "layer")
    cfg48, t48 = synthetic_exl2_linear(4, 48, 96, 64, g_idx=False, seed=0)
    with pytest.raises(ExportError, match="multiple of 32"):
        convert_linear_exl2(cfg48, t48, "layer")


# ----------------------------------------------------------------------------- tiny model, end to end

KINDS = {  # bits, group size, act-order, static groups
    "w4g32": (4, 32, False, False),
    "w3g32-actorder": (3, 32, True, False),  # dynamic groups: rows permuted in EXL2
    "w2-channel": (2, -1, False, False),
    "w8g64-static": (8, 64, True, True),
}


@pytest.fixture(scope="module")
def exl2_checkpoint(tiny_model, calib_text, tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            bits, group, actorder, static = KINDS[kind]
            s = GPTQSettings(
                bits=bits, group_size=group, fit="exl2", actorder=actorder,
                static_groups=static, blocksize=32,
            )  # fmt: skip
            out = tmp_path_factory.mktemp(kind) / "ckpt"
            quantize_model(
                QuantizeJob(
                    model=tiny_model("llama"), out=out, settings=s,
                    calib=str(calib_text), nsamples=8, seqlen=48,
                )
            )  # fmt: skip
            cache[kind] = out
        return cache[kind]

    return make


@pytest.mark.parametrize("kind", list(KINDS))
def test_exl2_export_of_a_quantized_tiny_model_is_exact(kind, exl2_checkpoint, tmp_path):
    src = Checkpoint(exl2_checkpoint(kind))
    assert src.qcfg.grid == "affine" and src.qcfg.quantizer["grid_fit"] == "exl2"
    r = export_exllamav2(src.path, tmp_path / "exl2")  # auto: EXL2 for --grid exl2
    assert r.format == "exl2" and r.quantization_config["quant_method"] == "exl2"
    sd = read_safetensors(r.out)
    assert not any(k.endswith((".qweight", ".scales", ".zero_points")) for k in sd)
    prefixes = src.quantized_prefixes()
    assert len(prefixes) == r.layers == 14
    for p in prefixes:
        W = EmulatedEXL2Matrix(exl2_tensors(sd, p)).reconstruct()
        ref = dequantize_linear(src.qcfg, src.linear_tensors(p), torch.float16)
        assert torch.equal(W.t().view(torch.int16), ref.view(torch.int16)), p


def test_exl2_export_of_a_free_affine_checkpoint_fails_leaving_nothing(
    tiny_model, calib_text, tmp_path
):
    src = tmp_path / "affine"
    s = GPTQSettings(
        bits=4, group_size=32, fit="affine", blocksize=32, actorder=False, static_groups=False
    )
    quantize_model(
        QuantizeJob(model=tiny_model("llama"), out=src, settings=s, calib=str(calib_text),
                    nsamples=8, seqlen=48)
    )  # fmt: skip
    with pytest.raises(ExportError, match="quantize with --grid exl2"):
        export_exllamav2(src, tmp_path / "out", format="exl2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["affine"]  # no output, no temp folder


def test_auto_format_is_read_off_the_tensors_not_the_quantizer_metadata(
    exl2_checkpoint, tiny_model, calib_text, tmp_path
):
    """``quantization_config["quantizer"]`` is informational: an EXL2-ladder checkpoint whose
    metadata says nothing of the fit still exports as EXL2, and a free affine checkpoint whose
    metadata claims the exl2 fit exports as GPTQ."""
    import json
    import shutil

    def edit(folder: Path, fit: str | None) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        q = cfg["quantization_config"]["quantizer"]
        q.pop("grid_fit")
        if fit is not None:
            q["grid_fit"] = fit
        (folder / "config.json").write_text(json.dumps(cfg))

    ladder = tmp_path / "ladder"
    shutil.copytree(exl2_checkpoint("w4g32"), ladder)
    edit(ladder, None)
    assert export_exllamav2(ladder, tmp_path / "a").format == "exl2"
    free = tmp_path / "free"
    s = GPTQSettings(
        bits=4, group_size=32, fit="affine", blocksize=32, actorder=False, static_groups=False
    )
    quantize_model(
        QuantizeJob(model=tiny_model("llama"), out=free, settings=s, calib=str(calib_text),
                    nsamples=8, seqlen=48)
    )  # fmt: skip
    edit(free, "exl2")
    assert export_exllamav2(free, tmp_path / "b").format == "gptq"


def test_a_4bit_exl2_checkpoint_also_exports_as_gptq(exl2_checkpoint, tmp_path):
    r = export_exllamav2(exl2_checkpoint("w4g32"), tmp_path / "gptq", format="gptq")
    assert r.format == "gptq" and r.negated == 0  # z = 8 is always representable


def test_exl2_cli(exl2_checkpoint, tmp_path, capsys):
    main(["export", "exllamav2", str(exl2_checkpoint("w3g32-actorder")), str(tmp_path / "a")])
    assert "EXL2 3-bit" in capsys.readouterr().out
    code = main(  # a 3-bit checkpoint has no GPTQ form
        ["export", "exllamav2", "--format", "gptq",
         str(exl2_checkpoint("w3g32-actorder")), str(tmp_path / "b")]
    )  # fmt: skip
    assert code == 2 and "--format exl2" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_exl2_grid_keeps_rows_together_on_a_device_list(tiny_model, calib_text, tmp_path):
    """One maximum per group is shared by all rows, so a device list must not split rows:
    ``cpu,cpu`` gives the bytes of ``cpu``."""
    s = GPTQSettings(
        bits=4, group_size=32, fit="exl2", blocksize=32, actorder=False, static_groups=False
    )
    outs = []
    for devices in ("cpu", "cpu,cpu"):
        out = tmp_path / devices.replace(",", "-")
        quantize_model(
            QuantizeJob(
                model=tiny_model("llama"), out=out, settings=s, device=devices,
                calib=str(calib_text), nsamples=8, seqlen=48,
            )
        )  # fmt: skip
        outs.append(read_safetensors(out))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


# ----------------------------------------------------------------------------- runtime helper


def test_load_exllamav2_tensor_parallel_exports_exl2_and_calls_load_tp(
    exl2_checkpoint, monkeypatch, tmp_path
):
    """Only the call sequence (exllamav2's examples/inference_tp.py) with a stand-in module: a
    --grid exl2 checkpoint is exported as EXL2, loaded with load_tp and an ExLlamaV2Cache_TP."""
    import json
    import sys
    import types

    from leanquant_serve.exllamav2 import load_exllamav2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Exception, match="needs a CUDA GPU"):  # checked after the TP check
        load_exllamav2(exl2_checkpoint("w4g32"), tensor_parallel=True, workdir=tmp_path)
    assert not any(tmp_path.iterdir())  # the temp export is removed on failure

    calls = []

    class Config:
        no_flash_attn = False

        def __init__(self, d):
            calls.append(("config", d))

        def arch_compat_overrides(self):
            pass

    class Model:
        loaded = True

        def __init__(self, config):
            self.config = config

        def load_tp(self, gpu_split, progress=False, expect_cache_tokens=0, expect_cache_base=None):
            calls.append(("load_tp", gpu_split, expect_cache_tokens, expect_cache_base))

        def unload(self):
            calls.append(("unload",))

    class CacheTP:
        def __init__(self, model, base, max_seq_len=-1):
            calls.append(("cache_tp", base, max_seq_len))

    exl = types.ModuleType("exllamav2")
    exl.__version__ = "0.3.2"
    exl.ExLlamaV2Config, exl.ExLlamaV2, exl.ExLlamaV2Cache_TP = Config, Model, CacheTP
    exl.ExLlamaV2Cache = object
    exl.ExLlamaV2Tokenizer = lambda config: "tokenizer"
    gen = types.ModuleType("exllamav2.generator")
    gen.ExLlamaV2DynamicGenerator = lambda **kw: "generator"
    attn = types.ModuleType("exllamav2.attn")
    attn.has_flash_attn_with_paged = True
    exl.generator, exl.attn = gen, attn
    for name, mod in (("exllamav2", exl), ("exllamav2.generator", gen), ("exllamav2.attn", attn)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    s = load_exllamav2(
        exl2_checkpoint("w4g32"), 256, tensor_parallel=True, gpu_split=[20, 20], workdir=tmp_path
    )
    folder = Path(calls[0][1])
    assert (
        json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
        == "exl2"
    )
    assert any(k.endswith(".q_scale_max") for k in read_safetensors(folder))
    assert calls[1:] == [("load_tp", [20, 20], 256, object), ("cache_tp", object, 256)]
    s.close()
    assert calls[-1] == ("unload",) and not folder.parent.exists()
