"""``leanquant export bnb-nf4``: LeanQuant NF4 checkpoints as pre-quantized bitsandbytes NF4.

Checked against bitsandbytes itself (its own CPU ``dequantize_4bit`` and ``quantize_4bit``,
``QuantState.from_dict``) and transformers' bitsandbytes integration loading the folder;
expectations come from the source checkpoint's reference dequantizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import user_error
from safetensors.torch import load_file

from leanquant_serve.bitsandbytes.export import NF4, export_bnb_nf4, pack_nf4
from leanquant_serve.export import ExportError
from leanquant_serve.format import Checkpoint, dequantize_linear, load_reference_model
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import QuantizeJob, quantize_model
from quantizer.tables import quantile_table

bnb = pytest.importorskip("bitsandbytes")  # a dev dependency: present wherever tests run
F = pytest.importorskip("bitsandbytes.functional")

KINDS = {
    "nf4-g64": dict(fit="nf", bits=4, group_size=64),
    "nf4-g64-dynamic": dict(fit="nf", bits=4, group_size=64, static_groups=False),
    "nf4-g32": dict(fit="nf", bits=4, group_size=32),
    "nf4-pc": dict(fit="nf", bits=4, group_size=-1),  # blocksizes 64 (in = 64) and 128 (down)
    "nf3-g64": dict(fit="nf", bits=3, group_size=64),
    "sf4-g64": dict(fit="sf", bits=4, group_size=64),
    "affine-g64": dict(fit="affine", bits=4, group_size=64),
}


@pytest.fixture(scope="module")
def checkpoint(tiny_model, calib_text, tmp_path_factory):
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            out = tmp_path_factory.mktemp(kind) / "ckpt"
            s = GPTQSettings(blocksize=32, **KINDS[kind])
            job = QuantizeJob(
                model=tiny_model("llama"), out=out, settings=s, calib=str(calib_text),
                nsamples=4, seqlen=32,
            )  # fmt: skip
            quantize_model(job)
            made[kind] = out
        return made[kind]

    return make


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bnb") / "nf4"
    r = export_bnb_nf4(checkpoint("nf4-g64"), out)
    assert r.blocksizes == (64,) and r.layers == 14
    return out


def test_nf4_table_is_bitsandbytes_and_ours():
    assert torch.equal(torch.tensor(NF4), F.get_4bit_type("nf4", device="cpu"))
    assert quantile_table("nf", 4).tolist() == list(NF4)


def test_packing_is_bitsandbytes_quantize_4bit():
    """Weights lying exactly on absmax·NF4 quantize (bitsandbytes' own rounding) to the codes
    we pack, byte for byte, with the same absmax."""
    g = torch.Generator().manual_seed(0)
    out, inp = 6, 128
    codes = torch.randint(0, 16, (out, inp), generator=g)
    codes[:, 0] = 15  # every block reaches 1.0, so bitsandbytes' absmax is our scale
    codes[:, 64] = 15
    scale = (torch.rand(out, inp // 64, generator=g) + 0.1).half().float()
    W = torch.tensor(NF4)[codes] * scale.repeat_interleave(64, 1)
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    assert torch.equal(state.absmax, scale.reshape(-1))
    assert torch.equal(pack_nf4(codes), packed)


def test_files_hold_what_bitsandbytes_reads(checkpoint, exported):
    src = Checkpoint(checkpoint("nf4-g64"))
    cfg = json.loads((exported / "config.json").read_text())["quantization_config"]
    from transformers import BitsAndBytesConfig

    parsed = BitsAndBytesConfig.from_dict(cfg)
    assert parsed.load_in_4bit and parsed.bnb_4bit_quant_type == "nf4"
    assert not parsed.bnb_4bit_use_double_quant and cfg["llm_int8_skip_modules"] == ["lm_head"]
    assert parsed.bnb_4bit_compute_dtype == getattr(torch, src.hf_config["dtype"])
    tensors = {}
    for f in exported.glob("*.safetensors"):
        tensors.update(load_file(f))
    for p in src.quantized_prefixes():
        assert f"{p}.qweight" not in tensors
        state = json.loads(bytes(tensors[f"{p}.weight.quant_state.bitsandbytes__nf4"].tolist()))
        out_f, in_f = src.get(f"{p}.qweight").shape[1], src.get(f"{p}.qweight").shape[0] * 8
        assert state == {
            "quant_type": "nf4",
            "blocksize": 64,
            "dtype": "bfloat16",
            "shape": [out_f, in_f],
        }
        assert tensors[f"{p}.weight"].dtype == torch.uint8
        assert tensors[f"{p}.weight"].shape == (out_f * in_f // 2, 1)


@pytest.mark.parametrize("kind", ["nf4-g64", "nf4-pc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitsandbytes_dequantizes_to_the_reference_bit_for_bit(
    kind, dtype, checkpoint, exported, tmp_path
):
    src = Checkpoint(checkpoint(kind))
    if kind == "nf4-g64":
        out = exported
    else:  # per-row scales: each layer's blocksize is its in_features
        out = tmp_path / "bnb"
        assert export_bnb_nf4(src.path, out).blocksizes == (64, 128)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    for p in src.quantized_prefixes():
        w = f"{p}.weight"
        stats = {k[len(w) + 1 :]: v for k, v in tensors.items() if k.startswith(w + ".")}
        state = F.QuantState.from_dict(stats, device=torch.device("cpu"))
        state.dtype = dtype  # bitsandbytes' dequantize_4bit returns quant_state.dtype
        got = F.dequantize_4bit(tensors[w], state)
        want = dequantize_linear(src.qcfg, src.linear_tensors(p), dtype)
        assert got.dtype == dtype and torch.equal(got, want), (p, dtype)


@pytest.mark.parametrize("fused_cpu_kernel", [False, True], ids=["generic", "avx512bf16"])
def test_transformers_loads_the_export_with_the_reference_weights_and_logits(
    fused_cpu_kernel, checkpoint, exported
):
    """transformers' bitsandbytes integration (config parse, Linear4bit replacement,
    Params4bit.from_prequantized): every Linear4bit dequantizes (bitsandbytes' kernel) to the
    reference weight, and the logits equal the reference model's in the same dtype.

    Both of bitsandbytes' CPU branches: its generic one (dequantize_4bit, then a dense matmul)
    must give the reference logits exactly. On CPUs with AVX512-BF16, Linear4bit instead repacks
    the weight and runs a fused bf16 kernel that accumulates in its own order: there the logits
    must be those of the same weights up to bf16 rounding (inputs and outputs rounded to bf16,
    unit roundoff 2^-8: normwise under 3%, as tests/test_vllm_plugin.py argues), while a misread
    layout (nibble order, block order, absmax) gives errors of order 100%."""
    from transformers import AutoModelForCausalLM

    src_dir = checkpoint("nf4-g64")
    src = Checkpoint(src_dir)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.bfloat16).eval()
    linear4 = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(linear4) == set(src.quantized_prefixes())
    for p, m in linear4.items():
        got = F.dequantize_4bit(m.weight.data, m.weight.quant_state)
        want = dequantize_linear(src.qcfg, src.linear_tensors(p), torch.bfloat16)
        assert torch.equal(got, want), p
    if fused_cpu_kernel and not all(m.support_avx512bf16_for_cpu for m in linear4.values()):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes runs only its generic branch")
    for m in linear4.values():
        m.support_avx512bf16_for_cpu = fused_cpu_kernel
    ref = load_reference_model(src_dir, torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=gen)
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    if not fused_cpu_kernel:
        assert torch.equal(got, want)
    else:
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        assert rel < 0.03  # measured on an AMX Xeon: 0.0057


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("sf4-g64", "not bitsandbytes' NF4 table"),
        ("affine-g64", "grid 'affine'"),
        ("nf3-g64", "3-bit: bitsandbytes NF4 is 4-bit only"),
        ("nf4-g32", "group size 32: bitsandbytes blocksizes are 64, 128"),
        ("nf4-g64-dynamic", "act-order with dynamic groups (g_idx)"),
    ],
)
def test_what_nf4_cannot_hold_is_refused(kind, reason, checkpoint, tmp_path, capsys):
    with pytest.raises(ExportError, match=reason.replace("(", r"\(").replace(")", r"\)")) as e:
        export_bnb_nf4(checkpoint(kind), tmp_path / "bnb")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    line = user_error(capsys, ["export", "bnb-nf4", str(checkpoint(kind)), str(tmp_path / "bnb")])
    assert reason in line
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_export(checkpoint, tmp_path, capsys):
    from leanquant.cli import main

    out = tmp_path / "bnb"
    assert main(["export", "bnb-nf4", str(checkpoint("nf4-g64")), str(out)]) == 0
    assert "14 linears as bitsandbytes NF4, blocksize 64" in capsys.readouterr().out
    assert (out / "config.json").exists()
