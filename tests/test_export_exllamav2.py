"""Export for exllamav2 (GPTQ path), checked against a CPU re-implementation of exllamav2's code.

exllamav2 cannot be imported without CUDA, so :class:`EmulatedQMatrix` re-implements, from
exllamav2 v0.3.2's source (tag ``6a2d8311``), what its GPTQ path does with the tensors of one
linear: ``ext.py make_q_matrix`` (g_idx use, shape checks of ``ext_qmatrix.cpp make_q_matrix``),
``cuda/q_matrix.cu QMatrix::QMatrix`` (``gptq_groupsize``), ``QMatrix::make_sequential``
(``q_perm``), ``reconstruct_gptq_kernel`` (fp16 weight), ``cuda/q_gemm_kernel_gptq.cuh
gemm_half_q_half_gptq_kernel`` (fp16 GEMM at M = 1) and ``cuda/quant/qdq_4.cuh``
(``dequant_4bit_8_prep_zero(zeros + 1)``, ``dequant_4bit_8_gptq``). It reads the exported
tensors with its own bit twiddling, not :mod:`leanquant_serve.format`. The expected weights are
always ``dequantize_linear`` of the LeanQuant source.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor

from leanquant.cli import main
from leanquant_serve.exllamav2.export import (
    ExportError,
    convert_linear,
    exllamav2_group_size,
    export_exllamav2,
)
from leanquant_serve.format import (
    Checkpoint,
    FormatError,
    LeanQuantConfig,
    dequantize_linear,
    pack_codes,
    pack_linear,
)
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import QuantizeJob, quantize_model

# ----------------------------------------------------------------------------- the emulator


def _nibbles(words: Tensor, dim: int) -> Tensor:
    """4-bit fields of int32 words, field j of word w at index 8w + j along ``dim``, low
    nibble first (GPTQ's packing; ``MatrixView_q4_row::item`` for qzeros)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4)
    if dim == 0:
        return ((w.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, w.shape[1])
    return ((w.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF).reshape(w.shape[0], -1)


def _fma16(x: Tensor, y: Tensor, acc: Tensor) -> Tensor:
    """fp16 fused multiply-add (``__hfma2``), through float64; rounding is sign-symmetric."""
    return (x.double() * y.double() + acc.double()).half()


class EmulatedQMatrix:
    """exllamav2 v0.3.2's QMatrix for GPTQ tensors, on the CPU. ``zero_offset`` is the +1 of
    ``dequant_4bit_8_prep_zero(zeros[i] + 1, ...)``; 0 gives the "ideal" matrix that stores
    the true z (z = 0 included), used only to compare GEMM arithmetic."""

    BLOCK_KN = 128  # BLOCK_KN_SIZE (q_matrix.cu) = GPTQ_BLOCK_KN_SIZE (q_gemm_kernel_gptq.cuh)

    def __init__(self, t: dict[str, Tensor], zero_offset: int = 1) -> None:
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
        # ext_qmatrix.cpp make_q_matrix: dtype and shape checks, height and groups
        assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
        assert qzeros.shape[1] * 8 == qweight.shape[1]  # TORCH_CHECK_SHAPES(..., 8)
        assert scales.shape[1] == qweight.shape[1] and scales.shape[0] == qzeros.shape[0]
        self.height, self.width = qweight.shape[0] * 8, qweight.shape[1]
        self.groups = qzeros.shape[0]
        # QMatrix::QMatrix: gptq_groupsize doubles from 1 until groupsize * groups >= height
        self.groupsize = 1
        while self.groupsize * self.groups < self.height:
            self.groupsize *= 2
        self.q = _nibbles(qweight, 0)  # (height, width): row k of W^T
        self.zeros = _nibbles(qzeros, 1) + zero_offset  # (groups, width)
        self.scales = scales
        self.perm = None
        g_idx = t.get("g_idx")
        # ext.py make_q_matrix: g_idx is used unless absent or all zero
        if g_idx is not None and not bool((g_idx == 0).all()):
            assert g_idx.dtype == torch.int32 and g_idx.shape == (self.height,)
            self.perm = self._make_sequential(g_idx)
            self.q = self.q[self.perm]  # make_sequential_kernel: new row k = old row q_perm[k]
        self.row_group = self._kernel_row_groups()

    def _make_sequential(self, g_idx: Tensor) -> Tensor:
        """QMatrix::make_sequential: q_perm (sorted row -> original row) of a counting sort."""
        hist = [0] * self.groups
        for g in g_idx.tolist():
            hist[g] += 1
        start, acc = [], 0
        for count in hist:
            start.append(acc)
            acc += count
        x_map_inv = []
        for g in g_idx.tolist():  # target row of each original row, stable within a group
            x_map_inv.append(start[g])
            start[g] += 1
        x_map = [0] * self.height
        for row, target in enumerate(x_map_inv):
            x_map[target] = row
        assert self.height <= 1 << 16  # stored as uint16
        return torch.tensor(x_map)

    def _kernel_row_groups(self) -> Tensor:
        """The group the kernels use for each (sorted) row: per 128-row block, start at
        offset_k / groupsize and advance only when k (stepping by 32) equals nextgroup."""
        groups = torch.empty(self.height, dtype=torch.long)
        for offset_k in range(0, self.height, self.BLOCK_KN):
            group, nextgroup = offset_k // self.groupsize, offset_k + self.groupsize
            end_k = min(offset_k + self.BLOCK_KN, self.height)
            for k in range(offset_k, end_k, 32):
                if k == nextgroup:
                    group += 1
                    nextgroup += self.groupsize
                groups[k : k + 32] = group
        assert int(groups.max()) < self.groups, "the kernel would read past the last group"
        return groups

    def _dq(self) -> Tensor:
        """dequant_4bit_8_gptq, unscaled: q - z, exact in fp16. Rows 8w + {0,1,4,5}: the low
        nibbles, (1024 + q) + (-1024 - z); rows 8w + {2,3,6,7}: (1024 + 16 q) / 16 + (-64 - z)."""
        z = self.zeros[self.row_group]  # (height, width)
        low = (self.q + 1024).half() + (-1024 - z).half()
        high = _fma16((self.q * 16 + 1024).half(), torch.tensor(1 / 16).half(), (-64 - z).half())
        is_high = ((torch.arange(self.height) % 8) // 2 % 2 == 1).unsqueeze(1)
        return torch.where(is_high, high, low)

    def reconstruct(self) -> Tensor:
        """reconstruct_gptq_kernel: W^T (height, width) fp16, dq * scale, rows put back in the
        original order through q_perm."""
        w = self.scales[self.row_group] * self._dq()  # __hmul2: one fp16 rounding
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[self.perm] = w  # b_.set4(perm[lk++], n, ...)
        return out

    def reconstruct_fp32(self) -> Tensor:
        """The same in exact arithmetic (no fp16 rounding of the product)."""
        dq = (self.q - self.zeros[self.row_group]).float()
        w = self.scales[self.row_group].float() * dq
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[self.perm] = w
        return out

    def gemm(self, a: Tensor) -> Tensor:
        """gemm_half_q_half_gptq_kernel for one row of activations ``a`` (height,) fp16: per
        128-row block, per 8 rows a half2 dot (even rows in lane 0, odd rows in lane 1),
        fma'd with the group scale into the block accumulator; lanes added, blocks summed."""
        if self.perm is not None:
            a = a[self.perm]  # block_a: a[b_q_perm[offset_k + t]]
        dq, s = self._dq(), self.scales[self.row_group]
        out = torch.zeros(self.width, dtype=torch.float16)
        for offset_k in range(0, self.height, self.BLOCK_KN):
            c = torch.zeros(2, self.width, dtype=torch.float16)
            for k8 in range(offset_k, min(offset_k + self.BLOCK_KN, self.height), 8):
                res = torch.zeros(2, self.width, dtype=torch.float16)
                for i in range(4):
                    rows = [k8 + 2 * i, k8 + 2 * i + 1]
                    res = _fma16(dq[rows], a[rows].unsqueeze(1).expand(2, self.width), res)
                c = _fma16(res, s[k8].expand(2, self.width), c)
            out = out + (c[0] + c[1])  # __hadd of the lanes, then atomicAdd
        return out


# ----------------------------------------------------------------------------- fixtures

# name -> (bits, group_size, grid, actorder, static_groups, rtn)
KINDS = {
    "w4g32": (4, 32, "affine", True, True, False),  # act-order, static groups: no g_idx
    "w4g32-dynamic": (4, 32, "affine", True, False, False),  # act-order with g_idx
    "w4pc": (4, -1, "affine", False, False, True),  # per channel
    "w4g16": (4, 16, "affine", False, False, True),
    "w3": (3, 32, "affine", False, False, True),
    "w8": (8, 32, "affine", False, False, True),
    "nonuniform": (4, -1, "nonuniform", False, False, True),
}
EXPORTABLE = ("w4g32", "w4g32-dynamic", "w4pc")


@pytest.fixture(scope="module")
def checkpoint(tiny_model, calib_text, tmp_path_factory) -> Callable[[str], Path]:
    """``checkpoint(kind)``: a LeanQuant checkpoint of the tiny llama (see KINDS)."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            bits, group, grid, actorder, static, rtn = KINDS[kind]
            s = GPTQSettings(
                bits=bits,
                group_size=group,
                fit=grid,
                actorder=actorder,
                static_groups=static,
                blocksize=32,
            )
            out = tmp_path_factory.mktemp(kind) / "ckpt"
            calib = {} if rtn else dict(calib=str(calib_text), nsamples=8, seqlen=48)
            quantize_model(
                QuantizeJob(model=tiny_model("llama"), out=out, settings=s, rtn=rtn, **calib)
            )
            cache[kind] = out
        return cache[kind]

    return make


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"{kind}-exl2") / "exl2"
            export_exllamav2(checkpoint(kind), out)
            cache[kind] = out
        return cache[kind]

    return make


def read_safetensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of every ``*.safetensors`` in ``folder`` (exllamav2 globs them the same)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def layer_tensors(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors exllamav2's load_weight loads for a GPTQ linear (module.py)."""
    keys = ("qweight", "qzeros", "scales", "g_idx", "bias")
    return {k: sd[f"{prefix}.{k}"] for k in keys if f"{prefix}.{k}" in sd}


def assert_same_values(got: Tensor, ref: Tensor) -> None:
    """Equal as IEEE values; bit patterns may differ only where both are zero (the -0.0 of
    code 0 in a flipped grid)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref)
    if got.dtype == torch.float16:
        differ = got.view(torch.int16) != ref.view(torch.int16)
        assert bool((got[differ] == 0).all())


# ----------------------------------------------------------------------------- tiny model


@pytest.mark.parametrize("kind", EXPORTABLE)
def test_exllamav2_dequantizes_the_tiny_model_to_the_reference(kind, checkpoint, exported):
    """Every exported linear, as exllamav2's reconstruct kernel dequantizes it, equals
    dequantize_linear of the source in fp16 (what exllamav2 computes in) and in exact fp32."""
    src, sd = Checkpoint(checkpoint(kind)), read_safetensors(exported(kind))
    prefixes = src.quantized_prefixes()
    assert len(prefixes) == 14
    for p in prefixes:
        m = EmulatedQMatrix(layer_tensors(sd, p))
        if kind == "w4g32-dynamic":
            assert m.perm is not None and not torch.equal(m.perm, torch.arange(m.height))
        ref = src.linear_tensors(p)
        assert_same_values(m.reconstruct().t(), dequantize_linear(src.qcfg, ref, torch.float16))
        assert torch.equal(m.reconstruct_fp32().t(), dequantize_linear(src.qcfg, ref))


def test_exllamav2_gemm_on_the_tiny_model_matches_the_reference_product(checkpoint, exported):
    """The emulated GPTQ GEMM (fp16 accumulation) is the reference product up to fp16
    rounding: a check of the emulator itself, g_idx permutation of activations included."""
    src, sd = Checkpoint(checkpoint("w4g32-dynamic")), read_safetensors(exported("w4g32-dynamic"))
    p = "model.layers.1.mlp.down_proj"
    m = EmulatedQMatrix(layer_tensors(sd, p))
    a = torch.randn(m.height, generator=torch.Generator().manual_seed(0)).half()
    expected = dequantize_linear(src.qcfg, src.linear_tensors(p)) @ a.float()
    torch.testing.assert_close(m.gemm(a).float(), expected, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- synthetic z = 0


def synthetic_linear(
    group_size: int, in_features: int, out_features: int, *, g_idx: bool = False, seed: int = 0
) -> tuple[LeanQuantConfig, dict[str, Tensor]]:
    """A 4-bit affine linear whose zero points are 0 in about a third of the grids and 15 in
    another third; scales span tiny (subnormal in fp16), zero and large values."""
    gen = torch.Generator().manual_seed(seed)
    cfg = LeanQuantConfig(bits=4, group_size=group_size, desc_act=g_idx, static_groups=not g_idx)
    groups = cfg.n_groups(in_features)
    codes = torch.randint(0, 16, (out_features, in_features), generator=gen)
    pick = torch.randint(0, 3, (groups, out_features), generator=gen)
    zeros = torch.where(
        pick == 0, 0, torch.where(pick == 1, 15, torch.randint(1, 15, pick.shape, generator=gen))
    )
    scales = torch.rand(groups, out_features, generator=gen) * 0.05 + 1e-3
    scales.view(-1)[:7] = torch.tensor([0.0, 6e-8, 1e-5, 3e-5, 7.5, 100.0, 2.0**-14])
    kw = {}
    if g_idx:  # act-order with dynamic groups: groups of group_size in a permuted order
        perm = torch.randperm(in_features, generator=gen)
        kw["g_idx"] = (torch.argsort(perm) // group_size).to(torch.int32)
    return cfg, pack_linear(cfg, codes, scales=scales, zeros=zeros, **kw)


SYNTHETIC = [(32, 256, False), (64, 576, False), (-1, 96, False), (32, 256, True), (64, 576, True)]


@pytest.mark.parametrize("group_size, in_features, g_idx", SYNTHETIC)
def test_zero_points_0_and_15_are_exact(group_size, in_features, g_idx):
    cfg, t = synthetic_linear(group_size, in_features, 64, g_idx=g_idx)
    gptq, flipped = convert_linear(cfg, t, "layer")
    true_z = torch.stack(
        [(t["zero_points"].to(torch.int64) >> (4 * j)) & 0xF for j in range(8)], dim=-1
    ).reshape(t["scales"].shape)
    assert flipped == int((true_z == 0).sum()) > 0 and bool((true_z == 15).any())
    assert ("g_idx" in gptq) == g_idx
    m = EmulatedQMatrix(gptq)
    if group_size != -1:
        assert m.groupsize == group_size
    assert_same_values(m.reconstruct().t(), dequantize_linear(cfg, t, torch.float16))
    assert torch.equal(m.reconstruct_fp32().t(), dequantize_linear(cfg, t))
    stored_z = _nibbles(gptq["qzeros"], 1)
    assert int(stored_z.max()) <= 14  # z - 1 with z in [1, 15]: never the 0xF of z = 16
    neg = gptq["scales"] < 0
    assert torch.equal(neg, (true_z == 0) & (t["scales"] > 0))


@pytest.mark.parametrize("group_size, in_features, g_idx", [(32, 256, False), (64, 576, True)])
def test_flipped_grids_give_exllamav2s_gemm_bit_identical_results(group_size, in_features, g_idx):
    """The GEMM kernel scales 8-row partial dots by the group scale: with the flip every dot
    and every fma is the exact negation of the one it would form with a representable z = 0,
    so the output is bit for bit the same as the "ideal" matrix storing the true zeros."""
    cfg, t = synthetic_linear(group_size, in_features, 64, g_idx=g_idx, seed=1)
    gptq, flipped = convert_linear(cfg, t, "layer")
    assert flipped > 0
    true_z = torch.stack(
        [(t["zero_points"].to(torch.int64) >> (4 * j)) & 0xF for j in range(8)], dim=-1
    ).reshape(t["scales"].shape)
    ideal = {**gptq, "qweight": t["qweight"], "qzeros": pack_codes(true_z, 4, dim=1)}
    ideal["scales"] = t["scales"]
    a = torch.randn(in_features, generator=torch.Generator().manual_seed(2)).half()
    got = EmulatedQMatrix(gptq).gemm(a)
    want = EmulatedQMatrix(ideal, zero_offset=0).gemm(a)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize(
    "group_size, in_features, ok",
    [
        (32, 64, True),
        (64, 576, True),  # 9 groups: gptq_groupsize 64
        (128, 256, True),
        (256, 512, True),  # groups larger than the kernels' 128-row blocks
        (-1, 576, True),  # one group: gptq_groupsize 1024
        (576, 576, True),  # one group of a non-power-of-two size
        (16, 64, False),  # power of two, but the kernels switch groups every 32 rows only
        (48, 96, False),  # gptq_groupsize 64: rows 48..63 would use group 0
        (96, 288, False),
    ],
)
def test_group_sizes_exllamav2_maps_correctly_and_the_others_are_refused(
    group_size, in_features, ok
):
    cfg, t = synthetic_linear(group_size, in_features, 32)
    if ok:
        gptq, _ = convert_linear(cfg, t)
        m = EmulatedQMatrix(gptq)
        assert_same_values(m.reconstruct().t(), dequantize_linear(cfg, t, torch.float16))
        return
    with pytest.raises(ExportError, match=f"group_size {group_size} with in_features"):
        convert_linear(cfg, t)
    # The refusal is needed: written anyway (zeros in [1, 15]), exllamav2 would misgroup rows.
    groups = cfg.n_groups(in_features)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (32, in_features), generator=gen)
    zeros = torch.randint(1, 16, (groups, 32), generator=gen)
    scales = torch.rand(groups, 32, generator=gen).half() + 0.5
    raw = {
        "qweight": pack_codes(codes.t(), 4, dim=0),
        "qzeros": pack_codes(zeros - 1, 4, dim=1),
        "scales": scales,
    }
    ref = dequantize_linear(cfg, pack_linear(cfg, codes, scales=scales, zeros=zeros))
    assert exllamav2_group_size(in_features, groups) == EmulatedQMatrix(raw).groupsize
    assert not torch.equal(EmulatedQMatrix(raw).reconstruct_fp32().t(), ref)


def test_g_idx_exllamav2_would_regroup_is_refused():
    cfg, t = synthetic_linear(32, 128, 32, g_idx=True)
    t = dict(t)
    t["g_idx"] = torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32, dtype=torch.int32)
    with pytest.raises(ExportError, match="g_idx groups hold 24..40 rows"):
        convert_linear(cfg, t, "layer")


def test_in_and_out_features_must_be_multiples_of_32():
    cfg = LeanQuantConfig(bits=4, group_size=-1)
    for out_f, in_f in ((48, 64), (32, 72)):
        t = pack_linear(
            cfg,
            torch.zeros(out_f, in_f, dtype=torch.int32),
            scales=torch.ones(1, out_f),
            zeros=torch.ones(1, out_f, dtype=torch.int32),
        )
        with pytest.raises(ExportError, match="must be multiples of 32"):
            convert_linear(cfg, t, "layer")


# ----------------------------------------------------------------------------- folder layout


@pytest.mark.parametrize("kind", EXPORTABLE)
def test_folder_has_the_names_shapes_and_dtypes_exllamav2_loads(kind, checkpoint, exported):
    """Read with plain safetensors: per quantized linear exactly qweight int32 (in/8, out),
    qzeros int32 (G, out/8), scales fp16 (G, out), g_idx int32 (in,) iff act-order with
    dynamic groups; no zero_points; every dtype one of stloader.convert_dtype's; other
    tensors as stored; GPTQ v1 config; tokenizer files copied."""
    src, folder = Checkpoint(checkpoint(kind)), exported(kind)
    sd = read_safetensors(folder)
    names = set()
    for p in src.quantized_prefixes():
        out_f, in_f = src.dequantized_weight(p).shape
        groups = src.qcfg.n_groups(in_f)
        want = {
            "qweight": ((in_f // 8, out_f), torch.int32),
            "qzeros": ((groups, out_f // 8), torch.int32),
            "scales": ((groups, out_f), torch.float16),
        }
        if kind == "w4g32-dynamic":
            want["g_idx"] = ((in_f,), torch.int32)
        got = layer_tensors(sd, p)
        assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == want, p
        names |= {f"{p}.{k}" for k in want}
    assert not any(n.endswith((".zero_points", ".lut")) for n in sd)
    loadable = {torch.int32, torch.int16, torch.float16, torch.bfloat16, torch.float32}
    assert {t.dtype for t in sd.values()} <= loadable
    for name in set(src.tensor_names()) - {
        f"{p}.{s}"
        for p in src.quantized_prefixes()
        for s in ("qweight", "scales", "zero_points", "g_idx")
    }:
        names.add(name)
        assert sd[name].dtype == src.get(name).dtype and torch.equal(sd[name], src.get(name))
    assert set(sd) == names
    config = json.loads((folder / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == {k: v for k, v in src.hf_config.items() if k != "quantization_config"}
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["sym"] is False
    assert qc["checkpoint_format"] == "gptq"  # not "gptq_v2": exllamav2 adds 1 to the zeros
    assert qc["group_size"] == src.qcfg.group_size
    assert qc["desc_act"] == (kind == "w4g32-dynamic")
    assert qc["meta"]["source_quantization_config"] == src.qcfg.to_dict()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).read_bytes() == (src.path / f).read_bytes()


def test_biases_of_quantized_linears_are_written_in_fp16(tiny_model, tmp_path):
    """make_q_matrix takes a GPTQ layer's bias as fp16 only (Qwen2 has q/k/v biases)."""
    s = GPTQSettings(bits=4, group_size=32, fit="minmax", actorder=False, static_groups=False)
    src = tmp_path / "ckpt"
    quantize_model(QuantizeJob(model=tiny_model("qwen2"), out=src, settings=s, rtn=True))
    export_exllamav2(src, tmp_path / "exl2")
    sd, ck = read_safetensors(tmp_path / "exl2"), Checkpoint(src)
    biases = [n for n in sd if n.endswith(".bias")]
    assert len(biases) == 6 and ck.get(biases[0]).dtype == torch.bfloat16
    for n in biases:
        assert sd[n].dtype == torch.float16 and torch.equal(sd[n], ck.get(n).half())


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("nonuniform", "grid 'nonuniform' stores a lookup table per row"),
        ("w3", "3-bit: exllamav2's GPTQ path reads 4-bit codes only"),
        ("w8", "8-bit: exllamav2's GPTQ path reads 4-bit codes only"),
        ("w4g16", "group_size 16 with in_features 128: exllamav2 uses groups of 16 rows"),
    ],
)
def test_unexportable_checkpoints_are_refused(kind, reason, checkpoint, tmp_path, capsys):
    with pytest.raises(ExportError, match=reason.replace("(", r"\(")) as e:
        export_exllamav2(checkpoint(kind), tmp_path / "exl2")
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    code = main(["export", "exllamav2", str(checkpoint(kind)), str(tmp_path / "exl2")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("leanquant: error:")]
    assert code == 2 and len(lines) == 1 and reason in lines[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_partly_quantized_attention_is_refused(tiny_model, tmp_path):
    s = GPTQSettings(bits=4, group_size=32, fit="minmax", actorder=False, static_groups=False)
    src = tmp_path / "ckpt"
    skip = (r"self_attn\.k_proj",)
    quantize_model(QuantizeJob(model=tiny_model("llama"), out=src, settings=s, rtn=True, skip=skip))
    with pytest.raises(ExportError, match="q_proj, k_proj, v_proj, o_proj are quantized only"):
        export_exllamav2(src, tmp_path / "exl2")
    assert not (tmp_path / "exl2").exists()


def test_failure_midway_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    from leanquant_serve.exllamav2 import export as ex

    real, calls = ex.convert_linear, []

    def fail_on_third(*args):
        calls.append(args[2])
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args)

    monkeypatch.setattr(ex, "convert_linear", fail_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        export_exllamav2(checkpoint("w4pc"), tmp_path / "exl2")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_never_the_source(checkpoint, tmp_path, capsys):
    src, out = checkpoint("w4pc"), tmp_path / "exl2"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FormatError, match="already exists"):
        export_exllamav2(src, out)
    assert main(["export", "exllamav2", str(src), str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", "exllamav2", str(src), str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "14 linears as GPTQ 4-bit for exllamav2, per channel" in printed
    assert "grids have z = 0 and are stored flipped" in printed
    assert not (out / "stale.txt").exists()
    with pytest.raises(ExportError, match="is the source checkpoint"):
        export_exllamav2(src, src, overwrite=True)
    assert Checkpoint(src).quantized_prefixes()


# ----------------------------------------------------------------------------- runtime helper


def test_load_exllamav2_says_what_is_missing(checkpoint, monkeypatch):
    from leanquant_serve.exllamav2 import ExLlamaV2Unavailable, load_exllamav2

    with pytest.raises(ExLlamaV2Unavailable, match="tensor parallelism needs EXL2"):
        load_exllamav2(checkpoint("w4pc"), tensor_parallel=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExLlamaV2Unavailable, match="needs a CUDA GPU"):
        load_exllamav2(checkpoint("w4pc"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "exllamav2", None)  # import fails
    with pytest.raises(ExLlamaV2Unavailable, match="pip install exllamav2==0.3.2"):
        load_exllamav2(checkpoint("w4pc"))


def test_load_exllamav2_wiring_with_a_stand_in_module(checkpoint, monkeypatch, tmp_path):
    """Only the call sequence (exllamav2's examples/inference.py): a LeanQuant folder is
    exported to a temp folder that exllamav2's config reads and close() removes."""
    from leanquant_serve.exllamav2 import load_exllamav2

    calls = []

    class Config:
        no_flash_attn = False

        def __init__(self, d):
            calls.append(("config", d))
            self.max_seq_len = 8192

        def arch_compat_overrides(self):
            calls.append(("compat",))

    class Model:
        loaded = True

        def __init__(self, config):
            self.config = config

        def load_autosplit(self, cache, progress=False):
            calls.append(("autosplit", cache.lazy, cache.max_seq_len))

        def unload(self):
            calls.append(("unload",))

    class Cache:
        def __init__(self, model, max_seq_len=-1, lazy=False):
            self.max_seq_len, self.lazy = max_seq_len, lazy

    class Generator:
        def __init__(self, model, cache, tokenizer, paged=True, **kw):
            calls.append(("generator", paged, kw))

    exl = types.ModuleType("exllamav2")
    exl.__version__ = "0.3.2"
    exl.ExLlamaV2Config, exl.ExLlamaV2, exl.ExLlamaV2Cache = Config, Model, Cache
    exl.ExLlamaV2Tokenizer = lambda config: "tokenizer"
    gen = types.ModuleType("exllamav2.generator")
    gen.ExLlamaV2DynamicGenerator = Generator
    attn = types.ModuleType("exllamav2.attn")
    attn.has_flash_attn_with_paged = False
    exl.generator, exl.attn = gen, attn
    monkeypatch.setitem(sys.modules, "exllamav2", exl)
    monkeypatch.setitem(sys.modules, "exllamav2.generator", gen)
    monkeypatch.setitem(sys.modules, "exllamav2.attn", attn)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    s = load_exllamav2(checkpoint("w4pc"), max_seq_len=512, workdir=tmp_path, max_batch_size=4)
    folder = Path(calls[0][1])
    assert folder == s.path and folder.parent.parent == tmp_path
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert s.config.max_seq_len == 512 and s.tokenizer == "tokenizer"
    assert calls[1:] == [
        ("compat",),
        ("autosplit", True, 512),
        ("generator", False, {"max_batch_size": 4}),
    ]
    s.close()
    assert calls[-1] == ("unload",) and not folder.parent.exists()


def test_the_fused_parts_rule_names_the_engine_and_the_parts():
    """One rule for both exporters (leanquant_serve.export.check_fused_parts): parts an engine
    handles together are all quantized or none; dense-only and fully quantized groups pass."""
    from leanquant_serve.exllamav2.export import TOGETHER_WHY, quantized_together
    from leanquant_serve.export import check_fused_parts

    attn = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    check_fused_parts(set(attn), quantized_together(attn + mlp), TOGETHER_WHY)
    check_fused_parts({mlp[2]}, quantized_together(attn + mlp), TOGETHER_WHY)
    with pytest.raises(ExportError, match=r"self_attn: q_proj, k_proj, v_proj, o_proj are "
                       r"quantized only in part; exllamav2 needs all or none"):  # fmt: skip
        check_fused_parts(set(attn[:3]), quantized_together(attn + mlp), TOGETHER_WHY)
