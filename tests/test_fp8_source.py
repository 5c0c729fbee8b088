"""FP8 block-quantized sources (issue 15): DeepSeek-V3/R1 and Qwen3 FP8 releases ship each linear
weight as float8_e4m3fn beside a per-block ``weight_scale_inv``, and DeepSeek-V3 one
multi-token-prediction (MTP) layer beyond its decoder stack (``model.layers.61``), which
transformers does not build.

The FP8 source is the tiny DeepSeek-V3 (conftest ``MLA_ARCHITECTURES``) with its linears, its
embeddings and head put into FP8 blocks of 24 x 24 (so most shapes, 48 / 64 / 128 / 32, end in
cropped blocks) by the inverse of DeepSeek's formula, and an MTP layer ``model.layers.3``.
Its expected 16-bit weights are computed here block by block (a loop over blocks, as DeepSeek's
``weight_dequant`` kernel tiles them), not by the code under test; the bf16 model holding them is
what DeepSeek's ``fp8_cast_bf16.py`` would write, and quantizing the FP8 source must give its
checkpoint byte for byte.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from leanquant_serve.format import Checkpoint
from leanquant_serve.plan import PRESETS, PlanInput, format_plan, plan
from quantizer.errors import UserError
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import REPORT_FILE, QuantizeJob, _build_skeleton, quantize_model
from quantizer.source import SourceModel, dequantize_fp8_blocks

BLOCK = (24, 24)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
LAYERS = 3  # the tiny model's decoder layers: the MTP layer is model.layers.3
MTP = f"model.layers.{LAYERS}"
SKIP = r"self_attn\.o_proj"  # FP8 in the source, left unquantized: written dequantized
FP8_CONFIG = {
    "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
    "activation_scheme": "dynamic",
}  # fmt: skip
SETTINGS = GPTQSettings(bits=4, group_size=32, blocksize=32, static_groups=False)


def expected_dequant(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W in float32, one block at a time: q[block] * s[block index] (DeepSeek's weight_dequant:
    one program per block, masked at the edges)."""
    w = torch.empty(q.shape, dtype=torch.float32)
    for bi in range(math.ceil(q.shape[0] / block[0])):
        for bj in range(math.ceil(q.shape[1] / block[1])):
            rows = slice(bi * block[0], (bi + 1) * block[0])
            cols = slice(bj * block[1], (bj + 1) * block[1])
            w[rows, cols] = q[rows, cols].to(torch.float32) * s[bi, bj]
    return w


def to_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale_inv float32 per block): each block scaled so its largest |w| is
    the largest fp8 value (the inverse of the formula, as DeepSeek's and transformers'
    quantizers do)."""
    rows, cols = w.shape
    s = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            part = w[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]]
            s[bi, bj] = part.abs().max().float().clamp(min=1e-12) / FP8_MAX
            q[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]] = (
                (part.float() / s[bi, bj]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            )
    return q, s


def in_fp8(key: str, t: torch.Tensor) -> bool:
    """Which tensors the test source stores in FP8: every 2-D weight but norms and routers
    (DeepSeek-V3 keeps mlp.gate in bf16), plus the embeddings and the head here, which
    DeepSeek-V3 keeps in bf16 (to cover tensors outside the layers)."""
    return (
        t.dim() == 2 and key.endswith(".weight") and "norm" not in key
        and not key.endswith("mlp.gate.weight")
    )  # fmt: skip


@pytest.fixture(scope="module")
def sources(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """{"fp8": the FP8 source, "bf16": the same model with the FP8 values dequantized (what
    DeepSeek's fp8_cast_bf16.py writes)}; both with the MTP layer, routers with a float32
    e_score_correction_bias as DeepSeek-V3 stores it."""
    base = tiny_model("deepseek_v3")
    state = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for i in range(1, LAYERS):
        state[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = (
            torch.randn(8, generator=g) * 0.05
        )
    # the MTP layer as DeepSeek-V3 stores it: a decoder layer (a copy of the last) plus
    # enorm, hnorm, eh_proj (2H -> H) and its own embed_tokens and shared_head
    last = f"model.layers.{LAYERS - 1}."
    for k in [k for k in state if k.startswith(last)]:
        state[MTP + "." + k.removeprefix(last)] = state[k].clone()
    hidden = state["model.norm.weight"].shape[0]
    state.update({
        f"{MTP}.enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{MTP}.hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{MTP}.eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=g).bfloat16() * 0.02,
        f"{MTP}.embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
        f"{MTP}.shared_head.norm.weight": state["model.norm.weight"].clone(),
        f"{MTP}.shared_head.head.weight": state["lm_head.weight"].clone(),
    })  # fmt: skip
    fp8, bf16 = {}, {}
    for k, t in state.items():
        if in_fp8(k, t):
            q, s = to_fp8_blocks(t, BLOCK)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            bf16[k] = expected_dequant(q, s, BLOCK).to(torch.bfloat16)
        else:
            fp8[k] = bf16[k] = t
    config = json.loads((base / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["dtype"] == "bfloat16"
    out = {}
    for kind, tensors, cfg in (
        ("bf16", bf16, config),
        ("fp8", fp8, {**config, "quantization_config": FP8_CONFIG}),
    ):
        dest = shutil.copytree(base, tmp_path_factory.mktemp("fp8src") / kind)
        save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
        (dest / "config.json").write_text(json.dumps(cfg, indent=1))
        out[kind] = dest
    return out


@pytest.fixture(scope="module")
def outputs(sources, calib_text, tmp_path_factory) -> dict[str, Path]:
    """Each source quantized with the same job (calibrated, act-order, o_proj skipped)."""
    out = {}
    for kind, src in sources.items():
        out[kind] = tmp_path_factory.mktemp("fp8out") / kind
        quantize_model(QuantizeJob(
            model=src, out=out[kind], settings=SETTINGS, calib=str(calib_text), nsamples=4,
            seqlen=32, batch_size=2, skip=(SKIP,),
        ))  # fmt: skip
    return out


def report_without_timings(path: Path) -> dict:
    r = json.loads((path / REPORT_FILE).read_text())
    for k in ("out", "seconds", "peak_rss_bytes", "peak_gpu_bytes"):
        r.pop(k)
    for layer in r["layers"]:
        for s in layer:
            s.pop("seconds")
    return r


# ------------------------------------------------------------------------------ the formula


def test_dequantize_is_deepseeks_formula_with_cropped_edges():
    """DeepSeek-V3's kv_a_proj_with_mqa: 576 x 7168 in blocks of 128, 4.5 row blocks (here
    576 x 300: 2.34 column blocks too); and 130 rows, where transformers' Fp8Dequantize would
    take blocks of 65 rows."""
    g = torch.Generator().manual_seed(0)
    for rows, cols in ((576, 300), (130, 256), (128, 128)):
        q = (torch.randn(rows, cols, generator=g) * 100).to(torch.float8_e4m3fn)
        s = torch.rand(math.ceil(rows / 128), math.ceil(cols / 128), generator=g) + 0.01
        got = dequantize_fp8_blocks(q, s, (128, 128), torch.float32)
        assert torch.equal(got, expected_dequant(q, s, (128, 128)))
        assert dequantize_fp8_blocks(q, s, (128, 128), torch.bfloat16).dtype == torch.bfloat16
    # fused experts (E, rows, cols): one scale grid per expert
    q = (torch.randn(3, 48, 40, generator=g) * 10).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2, 2, generator=g)
    got = dequantize_fp8_blocks(q, s, (24, 24), torch.float32)
    for e in range(3):
        assert torch.equal(got[e], expected_dequant(q[e], s[e], (24, 24)))
    with pytest.raises(UserError, match=r"block scales \(2, 2\) .* expected \(3, 2\)"):
        dequantize_fp8_blocks(q[0], s[0], (16, 24), torch.float32)
    with pytest.raises(UserError, match="a float8_e4m3fn matrix, not torch.float32"):
        dequantize_fp8_blocks(q[0].float(), s[0], (24, 24), torch.float32)


# ------------------------------------------------------------------------------ quantizing


def test_fp8_source_gives_the_checkpoint_of_its_bf16_dequantization(outputs):
    """Byte for byte: every file but the report (timings), and the report's contents."""
    files = {kind: sorted(f.name for f in out.iterdir()) for kind, out in outputs.items()}
    assert files["fp8"] == files["bf16"] and "model.safetensors" in files["fp8"]
    fp8, bf16 = outputs["fp8"], outputs["bf16"]
    for name in files["fp8"]:
        if name != REPORT_FILE:
            assert (fp8 / name).read_bytes() == (bf16 / name).read_bytes(), name
    assert report_without_timings(outputs["fp8"]) == report_without_timings(outputs["bf16"])


def test_no_scale_or_fp8_in_the_output_and_kept_tensors_are_dequantized(sources, outputs):
    ckpt = Checkpoint(outputs["fp8"])
    ckpt.validate()
    names = set(ckpt.tensor_names())
    assert not [n for n in names if "scale_inv" in n]
    with safe_open(outputs["fp8"] / "model.safetensors", "pt") as h:
        dtypes = {h.get_slice(n).get_dtype() for n in h.keys()}
    assert not [d for d in dtypes if d.startswith("F8")]
    config = json.loads((outputs["fp8"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "leanquant"
    assert "fp8" not in json.dumps(config) and "weight_block_size" not in json.dumps(config)
    # unquantized tensors that were FP8 in the source: written dequantized in bf16
    src = load_file(sources["fp8"] / "model.safetensors")
    want = load_file(sources["bf16"] / "model.safetensors")
    kept = ["lm_head.weight", "model.embed_tokens.weight"]
    kept += [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(LAYERS)]
    for k in kept:
        assert src[k].dtype == torch.float8_e4m3fn and k in names
        got = ckpt.get(k)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want[k]), k
    assert {f"model.layers.{i}.self_attn.o_proj" for i in range(LAYERS)} <= set(
        ckpt.qcfg.modules_to_not_convert
    )
    # every other FP8 linear quantized
    quantized = {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}
    fp8_linears = {
        k.removesuffix(".weight") for k, t in src.items()
        if t.dtype == torch.float8_e4m3fn and k.startswith("model.layers.")
        and not k.startswith(MTP + ".") and ".o_proj." not in k
    }  # fmt: skip
    assert quantized == fp8_linears and len(quantized) == 3 * 4 + 3 + 2 * (3 + 8 * 3)


def test_the_mtp_layer_is_dropped_reported_and_its_count_zeroed(sources, outputs):
    src_keys = set(load_file(sources["bf16"] / "model.safetensors"))
    mtp_keys = {k for k in src_keys if k.startswith(MTP + ".")}
    assert len(mtp_keys) == len({k for k in src_keys if k.startswith("model.layers.2.")}) + 6
    names = set(Checkpoint(outputs["fp8"]).tensor_names())
    assert not [n for n in names if n.startswith(MTP + ".")]
    report = json.loads((outputs["fp8"] / REPORT_FILE).read_text())
    assert [(d["name"], d["tensors"]) for d in report["dropped"]] == [(MTP, len(mtp_keys))]
    assert "multi-token-prediction" in report["dropped"][0]["why"]
    assert json.loads((sources["fp8"] / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert json.loads((outputs["fp8"] / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_the_model_is_built_without_transformers_fp8(sources):
    """The skeleton comes from the config without the source's quantization_config: plain
    nn.Linear layers in the compute dtype, no FP8Linear and no quantizer attached."""
    src = SourceModel(sources["fp8"])
    assert src.fp8 is not None and src.fp8.block == BLOCK and src.fp8.dtype == torch.bfloat16
    job = QuantizeJob(model=sources["fp8"], out=sources["fp8"].parent / "unused", rtn=True)
    model = _build_skeleton(job, src, torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and {type(m) for m in linears} == {torch.nn.Linear}
    assert {m.weight.dtype for m in linears} == {torch.float32}
    # no consumer sees a scale key; the weights come out dequantized
    assert not [k for k in src.weight_map if k.endswith("_scale_inv")]
    w = src.get_key("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    want = load_file(sources["bf16"] / "model.safetensors")
    assert torch.equal(w, want["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"])


# ------------------------------------------------------------------------------ errors


def edited(src: Path, dest: Path, config=None, drop=(), add=None) -> Path:
    """A copy of ``src`` with config.json fields replaced (None value: removed) and tensors
    dropped or added."""
    shutil.copytree(src, dest)
    cfg = json.loads((src / "config.json").read_text())
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dest / "config.json").write_text(json.dumps(cfg))
    state = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    save_file({**state, **(add or {})}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


WEIGHT = "model.layers.1.self_attn.q_b_proj.weight"


def error_cases():
    qc = FP8_CONFIG
    return {
        "scales missing": (
            dict(drop=(WEIGHT + "_scale_inv",)),
            rf"FP8 tensor {re.escape(WEIGHT)} has no block scales",
        ),
        "per-tensor": (
            dict(config={"quantization_config": {**qc, "weight_block_size": None}}),
            r"FP8 without block scales .*weight_block_size None",
        ),
        "static activations": (
            dict(config={"quantization_config": {**qc, "activation_scheme": "static"}}),
            r"FP8 with activation_scheme 'static': only 'dynamic'",
        ),
        "e5m2": (
            dict(config={"quantization_config": {**qc, "fmt": "e5m2"}}),
            r"FP8 in format 'e5m2': only e4m3",
        ),
        "stray scale": (
            dict(add={"model.norm.weight_scale_inv": torch.ones(1, 1)}),
            r"block scales model\.norm\.weight_scale_inv belong to no float8_e4m3fn tensor",
        ),
        "another method": (
            dict(config={"quantization_config": {"quant_method": "gptq", "bits": 4}}),
            r"is already quantized \(gptq\)",
        ),
    }


@pytest.mark.parametrize("case", list(error_cases()))
def test_unreadable_fp8_sources_are_one_line_errors(case, sources, tmp_path):
    edit, match = error_cases()[case]
    src = edited(sources["fp8"], tmp_path / "src", **edit)
    with pytest.raises(UserError, match=match) as e:
        quantize_model(QuantizeJob(model=src, out=tmp_path / "out", rtn=True, settings=SETTINGS))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_fp8_weights_without_an_fp8_config_are_refused_when_read(sources, tmp_path):
    src = edited(sources["fp8"], tmp_path / "src", config={"quantization_config": None})
    with pytest.raises(UserError, match=r"float8_e4m3fn but config.json has no FP8") as e:
        quantize_model(QuantizeJob(model=src, out=tmp_path / "out", rtn=True, settings=SETTINGS))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_scale_grid_of_the_wrong_shape_is_refused(sources, tmp_path):
    src = edited(sources["fp8"], tmp_path / "src", add={WEIGHT + "_scale_inv": torch.ones(1, 1)})
    with pytest.raises(UserError, match=rf"tensor {re.escape(WEIGHT)} .* do not fit") as e:
        quantize_model(QuantizeJob(model=src, out=tmp_path / "out", rtn=True, settings=SETTINGS))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ planning


@pytest.mark.parametrize("bits", [4, 16])
def test_plan_of_the_fp8_deepseek_config_equals_the_presets(bits, tmp_path):
    """DeepSeek-V3's config.json as published (its FP8 quantization_config) plans exactly as the
    preset (the 16-bit model): the source's fp8 bytes and scales are not what is served."""
    (tmp_path / "config.json").write_text(
        json.dumps({**PRESETS["deepseek-v3"], "quantization_config": FP8_CONFIG})
    )
    kw = dict(bits=bits, gpus=8, max_model_len=4096)
    fp8, preset = plan(PlanInput(str(tmp_path), **kw)), plan(PlanInput("deepseek-v3", **kw))
    assert fp8.checkpoint_bytes == preset.checkpoint_bytes
    assert format_plan(fp8).replace(str(tmp_path), "deepseek-v3") == format_plan(preset)


def test_the_cli_says_what_was_not_written(sources, tmp_path, capsys):
    from leanquant.cli import main

    out = tmp_path / "out"
    assert main(["quantize", str(sources["fp8"]), str(out), "--rtn", "--group-size", "32"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("not written:")]
    assert len(lines) == 1 and lines[0].startswith(f"not written: {MTP} (")
    assert "multi-token-prediction" in lines[0]
