"""Multimodal wrappers (issue 15 item 4) on a tiny random Gemma 3 (Gemma3ForConditionalGeneration:
a 3-layer Gemma 3 text decoder, a 2-layer SigLIP vision tower, the multimodal projector):
quantized on the text decoder's layers only, everything else copied unchanged.

Expectations are computed independently of the quantizer: which tensors belong to the text
decoder's layers from the source file's keys, the in-memory quantized model loaded by
transformers' own from_pretrained from the source tensors with the observed Q substituted.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import user_error
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForConditionalGeneration,
    GemmaConfig,
    LlavaConfig,
)

from leanquant_serve.format import Checkpoint, load_reference_model
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import REPORT_FILE, QuantizeJob, quantize_model

NSAMPLES, SEQLEN = 4, 32
SETTINGS = GPTQSettings(bits=4, group_size=32, blocksize=32)
TEXT_LAYERS = r"^language_model\.model\.layers\.(\d+)\."  # the hub checkpoint's names
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class WrapperRun:
    src: Path
    out: Path
    Q: dict[str, torch.Tensor]  # checkpoint module name -> the observed quantized weight
    report: dict


def quantize(src: Path, out: Path, **kw) -> tuple[dict[str, torch.Tensor], dict]:
    Q: dict[str, torch.Tensor] = {}

    def observer(name, r):
        assert name not in Q, f"{name} quantized twice"
        Q[name] = r.Q.clone()

    job = QuantizeJob(
        model=src, out=out, settings=SETTINGS, nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=2,
        **kw,
    )  # fmt: skip
    quantize_model(job, observer)
    return Q, json.loads((out / REPORT_FILE).read_text())


@pytest.fixture(scope="module")
def gemma3(tiny_model, calib_text, tmp_path_factory) -> WrapperRun:
    src = tiny_model("gemma3")
    out = tmp_path_factory.mktemp("gemma3") / "ckpt"
    Q, report = quantize(src, out, calib=str(calib_text))
    return WrapperRun(src, out, Q, report)


def source_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_the_source_is_a_wrapper_with_a_vision_tower(gemma3: WrapperRun):
    keys = set(source_tensors(gemma3.src))
    assert {k.split(".")[0] for k in keys} == {
        "language_model", "vision_tower", "multi_modal_projector",
    }  # fmt: skip
    assert json.loads((gemma3.src / "config.json").read_text())["architectures"] == [
        "Gemma3ForConditionalGeneration"
    ]


def test_only_the_text_decoder_layers_are_quantized(gemma3: WrapperRun):
    ckpt = Checkpoint(gemma3.out)
    ckpt.validate()
    src = source_tensors(gemma3.src)
    text_linears = {
        k.removesuffix(".weight")
        for k in src
        if re.match(TEXT_LAYERS, k) and k.endswith(tuple(f"{p}.weight" for p in LINEARS))
    }
    assert len(text_linears) == 3 * len(LINEARS)
    assert set(ckpt.quantized_prefixes()) == text_linears == set(gemma3.Q)
    assert sum(len(layer) for layer in gemma3.report["layers"]) == len(text_linears)
    # every other source tensor is in the output under its own name, bit for bit
    stored = {n: ckpt.get(n) for n in ckpt.tensor_names()}
    others = {k: t for k, t in src.items() if k.removesuffix(".weight") not in text_linears}
    assert set(others) == {
        n for n in stored if not n.endswith(("qweight", "scales", "zero_points"))
    }
    for k, t in others.items():
        assert stored[k].dtype == t.dtype and torch.equal(stored[k], t), k
    # the vision tower and the projector are present and listed as not converted
    assert any(k.startswith("vision_tower.encoder.layers.1.") for k in others)
    assert "multi_modal_projector.mm_input_projection_weight" in others
    assert set(ckpt.qcfg.modules_to_not_convert) == {
        "language_model.lm_head", "vision_tower", "multi_modal_projector",
    }  # fmt: skip


def test_config_is_the_wrappers_with_quantization_config(gemma3: WrapperRun):
    src = json.loads((gemma3.src / "config.json").read_text())
    out = json.loads((gemma3.out / "config.json").read_text())
    assert out.pop("quantization_config")["quant_method"] == "leanquant"
    assert out == src


def expected_model(run: WrapperRun, tmp_path: Path) -> torch.nn.Module:
    """transformers' own from_pretrained of the source with the observed Q put in."""
    expected_dir = shutil.copytree(run.src, tmp_path / "expected")
    state = source_tensors(expected_dir)
    assert {f"{n}.weight" for n in run.Q} <= set(state)
    state.update({f"{n}.weight": Q for n, Q in run.Q.items()})
    state = {k: v.to(torch.float32) for k, v in state.items()}
    save_file(state, expected_dir / "model.safetensors", metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(expected_dir, dtype=torch.float32).eval()


def text_and_image(config) -> dict[str, torch.Tensor]:
    """Two prompts with one image each: text, <start_of_image>, the image's tokens,
    <end_of_image>, text; and the image."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, config.boi_token_index, (2, 6), generator=g)
    image = torch.full((2, config.mm_tokens_per_image), config.image_token_index)
    ids = torch.cat([
        text[:, :3], torch.full((2, 1), config.boi_token_index), image,
        torch.full((2, 1), config.eoi_token_index), text[:, 3:],
    ], dim=1)  # fmt: skip
    size = config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)
    return {"input_ids": ids, "pixel_values": pixels}


def test_reference_model_is_the_wrapper_with_the_observed_weights(gemma3: WrapperRun, tmp_path):
    ckpt = Checkpoint(gemma3.out)
    for name, Q in gemma3.Q.items():
        assert torch.equal(ckpt.dequantized_weight(name), Q), name
    expected = expected_model(gemma3, tmp_path)
    got = load_reference_model(gemma3.out)
    assert type(got) is Gemma3ForConditionalGeneration
    inputs = text_and_image(got.config)
    with torch.no_grad():
        # text only, and text with an image (the copied vision tower and projector at work)
        for kw in ({"input_ids": inputs["input_ids"][:, :3]}, inputs):
            want = expected(**kw, use_cache=False).logits
            have = got(**kw, use_cache=False).logits
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        # the image changes the text after it: the vision path really ran
        blank = {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}
        assert not torch.allclose(
            got(**blank, use_cache=False).logits[:, -1],
            got(**inputs, use_cache=False).logits[:, -1],
        )


def test_hub_vision_names_are_kept(gemma3: WrapperRun, tmp_path):
    """Gemma 3's hub checkpoints name the tower ``vision_tower.vision_model.*`` (what vLLM's
    SiglipVisionModel loads); transformers renames it on load and would save it as
    ``vision_tower.*``. Copied unchanged means under the source's names."""
    src = shutil.copytree(gemma3.src, tmp_path / "hub")
    state = {
        re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v
        for k, v in source_tensors(src).items()
    }
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    Q, _ = quantize(src, out, rtn=True)
    ckpt = Checkpoint(out)
    vision = {n for n in ckpt.tensor_names() if n.startswith("vision_tower.")}
    assert vision == {k for k in state if k.startswith("vision_tower.")}
    assert all(n.startswith("vision_tower.vision_model.") for n in vision)
    assert set(ckpt.quantized_prefixes()) == set(Q) == set(gemma3.Q)
    model = load_reference_model(out)  # transformers maps them back
    for k in vision:
        name = k.replace("vision_tower.vision_model.", "model.vision_tower.")
        assert torch.equal(model.get_parameter(name), state[k].float()), k


def test_a_wrapper_around_an_untested_text_model_is_one_line(tiny_model, tmp_path, capsys):
    """Llava around a Gemma (1) text model: its decoder layers are found, but Gemma 1 is not a
    tested text architecture."""
    text = GemmaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=1, vocab_size=400,
    )  # fmt: skip
    vision = json.loads((tiny_model("gemma3") / "config.json").read_text())["vision_config"]
    vision = {k: v for k, v in vision.items() if k != "model_type"}
    config = LlavaConfig(
        text_config=text.to_dict(), vision_config={"model_type": "siglip_vision_model", **vision},
        image_token_index=399,
    )  # fmt: skip
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    src = tmp_path / "llava-gemma"
    model.save_pretrained(src)
    line = user_error(capsys, ["quantize", str(src), str(tmp_path / "out"), "--rtn"])
    assert "LlavaForConditionalGeneration" in line and "'gemma'" in line, line
    assert "not one of the tested architectures" in line, line
    assert not (tmp_path / "out").exists()
