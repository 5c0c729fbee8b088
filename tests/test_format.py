"""Packing, config and reference-dequantizer tests for ``leanquant_serve.format``.

Expectations are computed independently of the implementation: Python big-int bitstreams,
hand-written words, and explicit element loops.
"""

import json

import pytest
import torch

from leanquant_serve.format import (
    CHECKPOINT_FORMAT,
    FormatError,
    LeanQuantConfig,
    check_linear,
    chunk_size,
    dequantize_linear,
    infer_linear_shape,
    linear_specs,
    pack_codes,
    pack_linear,
    unpack_codes,
    unpack_linear,
)

BITS = (2, 3, 4, 8)


def to_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def bitstream_words(codes: list[int], bits: int) -> list[int]:
    """The packing definition, literally: one big integer, code j at bit j * bits."""
    stream = sum(c << (bits * j) for j, c in enumerate(codes))
    n_words = len(codes) * bits // 32
    return [to_int32((stream >> (32 * k)) & 0xFFFFFFFF) for k in range(n_words)]


# ---------------------------------------------------------------- packing


def test_chunk_size():
    assert [chunk_size(b) for b in BITS] == [16, 32, 8, 4]
    with pytest.raises(FormatError, match="bits"):
        chunk_size(5)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((3, 96), 1),
        ((5, 32 * 7), 1),
        ((96, 3), 0),
        ((32 * 7, 5), 0),
        ((2, 64, 3), 1),
        ((3, 32), -1),
    ],
)
def test_pack_round_trip(bits, shape, dim):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    packed = pack_codes(codes, bits, dim)
    expected_shape = list(shape)
    expected_shape[dim] = shape[dim] * bits // 32
    assert packed.dtype == torch.int32 and list(packed.shape) == expected_shape
    assert torch.equal(unpack_codes(packed, bits, dim), codes.to(torch.int32))
    all_max = torch.full(shape, (1 << bits) - 1)
    assert torch.equal(unpack_codes(pack_codes(all_max, bits, dim), bits, dim), all_max.int())


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_bitstream_definition(bits):
    codes = torch.randint(0, 1 << bits, (4, 64), generator=torch.Generator().manual_seed(1))
    packed = pack_codes(codes, bits, dim=1)
    for row, words in zip(codes.tolist(), packed.tolist(), strict=True):
        assert words == bitstream_words(row, bits)


def test_3bit_hand_example():
    # Codes 0..7 repeated: every 8 codes are the 24 bits 0o76543210 = 0xFAC688, so the
    # 96-bit stream is 0xFAC688 four times: 0xFAC688FA_C688FAC6_88FAC688 (high to low word).
    codes = torch.arange(32) % 8
    words = [0x88FAC688, 0xC688FAC6, 0xFAC688FA]
    expected = [w - (1 << 32) for w in words]  # all three have the top bit set
    assert expected == [-1996831096, -964101434, -87652102]
    assert pack_codes(codes, 3, dim=0).tolist() == expected
    # GPTQ's 3-bit layout: code 10 splits into bits 30-31 of word 0 and bit 0 of word 1.
    codes = torch.zeros(32, dtype=torch.int64)
    codes[10] = 0b101
    assert pack_codes(codes, 3, dim=0).tolist() == [to_int32(0b01 << 30), 0b1, 0]


def test_4bit_gptq_convention():
    codes = torch.randint(0, 16, (16, 3), generator=torch.Generator().manual_seed(2))
    packed = pack_codes(codes, 4, dim=0)  # GPTQ qweight: packed along the input dim 0
    for row in range(2):
        for col in range(3):
            word = sum(int(codes[8 * row + j, col]) << (4 * j) for j in range(8))
            assert int(packed[row, col]) == to_int32(word)


def test_3bit_is_three_quarters_of_4bit():
    codes = torch.randint(0, 8, (7, 256), generator=torch.Generator().manual_seed(3))
    assert pack_codes(codes, 3, 1).numel() * 4 == pack_codes(codes, 4, 1).numel() * 3


def test_pack_accepts_any_integer_dtype():
    codes = torch.randint(0, 16, (2, 32), generator=torch.Generator().manual_seed(4))
    reference = pack_codes(codes, 4, 1)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(pack_codes(codes.to(dtype), 4, 1), reference)


@pytest.mark.parametrize(
    ("codes", "bits", "match"),
    [
        (torch.full((2, 32), 8), 3, "outside"),
        (torch.full((2, 32), -1), 4, "outside"),
        (torch.zeros(2, 24, dtype=torch.int64), 3, "multiple of 32"),
        (torch.zeros(2, 12, dtype=torch.int64), 4, "multiple of 8"),
        (torch.zeros(2, 32), 4, "integer"),
        (torch.zeros(2, 32, dtype=torch.bool), 4, "integer"),
        (torch.zeros(2, 32, dtype=torch.int64), 5, "bits"),
        (torch.tensor(3), 4, "0-d"),
    ],
)
def test_pack_rejects(codes, bits, match):
    with pytest.raises(FormatError, match=match):
        pack_codes(codes, bits, dim=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", BITS)
def test_cuda_matches_cpu(bits):
    cfg = LeanQuantConfig(bits=bits, group_size=32, desc_act=True)
    args = random_inputs(cfg, 64, 96, seed=bits)
    cpu = pack_linear(cfg, **args)
    gpu = pack_linear(cfg, **{k: v.cuda() for k, v in args.items()})
    for key, t in gpu.items():
        assert t.is_cuda and torch.equal(t.cpu(), cpu[key]), key
    assert torch.equal(dequantize_linear(cfg, gpu).cpu(), dequantize_linear(cfg, cpu))


def test_unpack_rejects():
    with pytest.raises(FormatError, match="int32"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int64), 3, dim=1)
    with pytest.raises(FormatError, match="multiple of 3"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int32), 3, dim=1)


# ---------------------------------------------------------------- config


def test_config_round_trip_through_json():
    cfg = LeanQuantConfig(
        bits=3,
        group_size=128,
        desc_act=True,
        static_groups=True,
        modules_to_not_convert=("lm_head", "model.embed_tokens"),
        quantizer={"method": "leanquant_aff", "p": 4.0, "damp": 0.01, "calib": [128, 2048]},
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["modules_to_not_convert"] == ["lm_head", "model.embed_tokens"]
    assert d["quant_method"] == "leanquant" and d["checkpoint_format"] == CHECKPOINT_FORMAT
    assert LeanQuantConfig.from_dict(d) == cfg
    assert LeanQuantConfig.from_dict({"bits": 4}) == LeanQuantConfig(bits=4)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bits", 5),
        ("bits", True),
        ("bits", "4"),
        ("group_size", 0),
        ("group_size", -2),
        ("group_size", 64.0),
        ("grid", "lut"),
        ("desc_act", 1),
        ("static_groups", "yes"),
        ("modules_to_not_convert", "lm_head"),
        ("modules_to_not_convert", [1]),
        ("checkpoint_format", "gptq"),
        ("quant_method", "gptq"),
        ("quantizer", [1, 2]),
        ("quantizer", {"p": float("nan")}),
    ],
)
def test_config_invalid_field_is_named(field, value):
    with pytest.raises(FormatError, match=rf"^quantization_config\.{field}: "):
        LeanQuantConfig.from_dict({"bits": 4, field: value})


def test_config_nonuniform_needs_per_row_groups():
    with pytest.raises(FormatError, match=r"quantization_config\.group_size"):
        LeanQuantConfig(bits=4, group_size=128, grid="nonuniform")


def test_config_rejects_unknown_and_missing_keys():
    with pytest.raises(FormatError, match="unknown key.*sym"):
        LeanQuantConfig.from_dict({"bits": 4, "sym": True})
    with pytest.raises(FormatError, match=r"quantization_config\.bits: missing"):
        LeanQuantConfig.from_dict({"group_size": 128})
    gptq = {"bits": 4, "group_size": 128, "sym": True, "quant_method": "gptq"}
    with pytest.raises(FormatError, match=r"quantization_config\.quant_method: 'gptq'"):
        LeanQuantConfig.from_dict(gptq)
    with pytest.raises(FormatError, match="not a JSON object"):
        LeanQuantConfig.from_dict([("bits", 4)])


def test_config_derived_properties():
    assert LeanQuantConfig(bits=4, group_size=32, desc_act=True).uses_g_idx
    assert not LeanQuantConfig(bits=4, group_size=32, desc_act=True, static_groups=True).uses_g_idx
    assert not LeanQuantConfig(bits=4, desc_act=True).uses_g_idx
    assert not LeanQuantConfig(bits=4, grid="nonuniform", desc_act=True).uses_g_idx
    assert LeanQuantConfig(bits=4).n_groups(576) == 1
    assert LeanQuantConfig(bits=4, group_size=64).n_groups(576) == 9
    with pytest.raises(FormatError, match=r"quantization_config\.group_size: 128"):
        LeanQuantConfig(bits=4, group_size=128).n_groups(576)
    cfg = LeanQuantConfig(bits=4, modules_to_not_convert=("lm_head", "model.layers.1"))
    assert cfg.is_skipped("lm_head") and cfg.is_skipped("model.layers.1.mlp.up_proj")
    assert not cfg.is_skipped("model.layers.10.mlp.up_proj")
    hash(cfg)  # frozen config stays usable as a dict key despite the quantizer mapping


# ---------------------------------------------------------------- tensor layout


def test_linear_specs_by_hand():
    specs = linear_specs(LeanQuantConfig(bits=3, group_size=32, desc_act=True), 64, 32)
    got = {k: (v.shape, v.dtype) for k, v in specs.items()}
    assert got == {
        "qweight": ((6, 32), torch.int32),
        "scales": ((2, 32), torch.float16),
        "zero_points": ((2, 3), torch.int32),
        "g_idx": ((64,), torch.int32),
    }
    specs = linear_specs(LeanQuantConfig(bits=2, grid="nonuniform"), 48, 5)
    assert {k: v.shape for k, v in specs.items()} == {"qweight": (3, 5), "lut": (5, 4)}
    with pytest.raises(FormatError, match="qweight: in_features=48"):
        linear_specs(LeanQuantConfig(bits=3), 48, 32)
    with pytest.raises(FormatError, match="zero_points: out_features=5"):
        linear_specs(LeanQuantConfig(bits=4), 64, 5)
    with pytest.raises(FormatError, match="qweight: in_features=64 .*group_size=48"):
        linear_specs(LeanQuantConfig(bits=4, group_size=48), 64, 8)


def random_inputs(cfg: LeanQuantConfig, out_f: int, in_f: int, seed: int = 0) -> dict:
    """Random pack_linear arguments (g_idx a random group assignment, as act-order gives)."""
    g = torch.Generator().manual_seed(seed)
    levels = 1 << cfg.bits
    args = {"codes": torch.randint(0, levels, (out_f, in_f), generator=g)}
    if cfg.grid == "nonuniform":
        args["lut"] = torch.randn(out_f, levels, generator=g).sort(dim=1).values
        return args
    n_groups = cfg.n_groups(in_f)
    args["scales"] = torch.rand(n_groups, out_f, generator=g) * 0.1 + 0.01
    args["zeros"] = torch.randint(0, levels, (n_groups, out_f), generator=g)
    if cfg.uses_g_idx:
        args["g_idx"] = torch.arange(in_f)[torch.randperm(in_f, generator=g)] // cfg.group_size
    return args


AFFINE_CASES = {
    "per_channel_4bit": LeanQuantConfig(bits=4),
    "groups_3bit": LeanQuantConfig(bits=3, group_size=32),
    "g_idx_4bit": LeanQuantConfig(bits=4, group_size=16, desc_act=True),
    "static_groups_2bit": LeanQuantConfig(bits=2, group_size=16, desc_act=True, static_groups=True),
    "groups_8bit": LeanQuantConfig(bits=8, group_size=32),
}


@pytest.mark.parametrize("cfg", AFFINE_CASES.values(), ids=AFFINE_CASES.keys())
def test_affine_dequantize_matches_explicit_loop(cfg):
    out_f, in_f = 32, 64
    args = random_inputs(cfg, out_f, in_f)
    w = dequantize_linear(cfg, pack_linear(cfg, **args))
    q, z = args["codes"].tolist(), args["zeros"].tolist()
    s = args["scales"].half().float().tolist()  # the stored precision
    expected = torch.empty(out_f, in_f)
    for o in range(out_f):
        for i in range(in_f):
            if cfg.uses_g_idx:
                grp = int(args["g_idx"][i])
            elif cfg.group_size == -1:
                grp = 0
            else:
                grp = i // cfg.group_size
            expected[o, i] = (q[o][i] - z[grp][o]) * s[grp][o]
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nonuniform_dequantize_matches_explicit_gather(bits):
    cfg = LeanQuantConfig(bits=bits, grid="nonuniform")
    args = random_inputs(cfg, 5, 64, seed=bits)
    w = dequantize_linear(cfg, pack_linear(cfg, **args), dtype=torch.float16)
    lut = args["lut"].half()
    expected = torch.tensor(
        [[float(lut[o, args["codes"][o, i]]) for i in range(64)] for o in range(5)]
    )
    assert w.dtype == torch.float16
    assert torch.equal(w.float(), expected)


@pytest.mark.parametrize(
    "cfg",
    [*AFFINE_CASES.values(), LeanQuantConfig(bits=3, grid="nonuniform")],
)
def test_pack_linear_matches_specs_and_unpacks(cfg):
    args = random_inputs(cfg, 32, 64, seed=5)
    tensors = pack_linear(cfg, **args)
    specs = linear_specs(cfg, 64, 32)
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == {
        k: (s.shape, s.dtype) for k, s in specs.items()
    }
    assert infer_linear_shape(cfg, tensors) == (32, 64)
    check_linear(cfg, "layer", tensors)
    unpacked = unpack_linear(cfg, tensors)
    assert set(unpacked) == set(args)
    for key, value in args.items():
        stored = value.half() if value.is_floating_point() else value.int()
        assert torch.equal(unpacked[key], stored), key


@pytest.mark.parametrize(
    ("cfg", "change", "match"),
    [
        (LeanQuantConfig(bits=4), {"zeros": None}, "zeros: grid 'affine'.* requires"),
        (LeanQuantConfig(bits=4), {"lut": torch.zeros(32, 16)}, "lut: .*does not take"),
        (
            LeanQuantConfig(bits=4, group_size=16, desc_act=True),
            {"g_idx": None},
            "g_idx: .*requires",
        ),
        (LeanQuantConfig(bits=4), {"g_idx": torch.zeros(64, dtype=torch.int64)}, "g_idx: "),
        (LeanQuantConfig(bits=3, grid="nonuniform"), {"scales": torch.ones(1, 32)}, "scales: "),
        (LeanQuantConfig(bits=4), {"scales": torch.ones(2, 32)}, r"scales: shape \(2, 32\)"),
        (LeanQuantConfig(bits=4), {"scales": torch.full((1, 32), 1e6)}, "scales: not finite"),
        (LeanQuantConfig(bits=4), {"zeros": torch.full((1, 32), 16)}, "zeros: values"),
        (LeanQuantConfig(bits=4), {"zeros": torch.zeros(1, 32)}, "zeros: dtype"),
        (LeanQuantConfig(bits=4), {"codes": torch.zeros(32, 64)}, "codes: dtype"),
        (
            LeanQuantConfig(bits=4, group_size=16, desc_act=True),
            {"g_idx": torch.full((64,), 4)},
            "g_idx: group indices",
        ),
    ],
)
def test_pack_linear_rejects(cfg, change, match):
    args = random_inputs(cfg, 32, 64)
    args.update(change)
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(FormatError, match=match):
        pack_linear(cfg, **args)


def test_check_linear_names_full_tensor():
    cfg = LeanQuantConfig(bits=4, group_size=32)
    good = pack_linear(cfg, **random_inputs(cfg, 32, 64))
    prefix = "model.layers.0.mlp.up_proj"
    bad_cases = {
        "zero_points: missing": {k: v for k, v in good.items() if k != "zero_points"},
        "lut: unexpected": {**good, "lut": torch.zeros(32, 16, dtype=torch.float16)},
        "scales: dtype torch.float32": {**good, "scales": good["scales"].float()},
        r"scales: shape \(1, 32\)": {**good, "scales": good["scales"][:1]},
        "qweight: missing": {k: v for k, v in good.items() if k != "qweight"},
        "qweight: in_features=48 is not a multiple of group_size": {
            **good,
            "qweight": good["qweight"][:6],
        },
    }
    for match, tensors in bad_cases.items():
        with pytest.raises(FormatError, match=rf"^{prefix}\.{match}"):
            check_linear(cfg, prefix, tensors)


def test_shard_rule_is_one_pure_function():
    """The tensor-parallel partition rule the vLLM plugin and the planner both ask."""
    from leanquant_serve.format.tensors import (
        SHARD_GROUPS,
        SHARD_WORDS_IN,
        SHARD_WORDS_OUT,
        scales_on_every_rank,
        shard_misfits,
    )

    g128 = LeanQuantConfig(bits=4, group_size=128)
    assert shard_misfits(g128, 256, [64, 64]) == []
    assert shard_misfits(g128, 64, [64]) == [SHARD_GROUPS]  # half a group per rank
    assert shard_misfits(g128, 60, [60]) == [SHARD_WORDS_IN, SHARD_GROUPS, SHARD_WORDS_OUT]
    act = LeanQuantConfig(bits=4, group_size=128, desc_act=True)  # g_idx: every rank holds all
    assert shard_misfits(act, 64) == [] and scales_on_every_rank(act)
    assert scales_on_every_rank(LeanQuantConfig(bits=4)) and not scales_on_every_rank(g128)
    lut = LeanQuantConfig(bits=3, grid="nonuniform")  # no zero points to split
    assert shard_misfits(lut, 32, [4]) == [] and not scales_on_every_rank(lut)
