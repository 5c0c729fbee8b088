"""Multimodal wrappers (issue 15 item 4) on tiny random Gemma 3 (Gemma3ForConditionalGeneration:
a 3-layer Gemma 3 text decoder, a 2-layer SigLIP vision tower, the multimodal projector) and
Mistral 3 (Mistral3ForConditionalGeneration: a 2-layer Mistral text decoder, a 2-layer Pixtral
tower, the patch-merging projector): quantized on the text decoder's layers only, everything
else copied unchanged.

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
from conftest import quantize_observed, user_error
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    Gemma3ForConditionalGeneration,
    GemmaConfig,
    LlavaConfig,
    Mistral3ForConditionalGeneration,
)

from leanquant_serve.format import Checkpoint, load_reference_model
from quantizer.gptq import GPTQSettings

NSAMPLES, SEQLEN = 4, 32
SETTINGS = GPTQSettings(bits=4, group_size=32, blocksize=32)
TEXT_LAYERS = r"^language_model\.model\.layers\.(\d+)\."  # the hub checkpoint's names
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class WrapperRun:
    arch: str
    src: Path
    out: Path
    Q: dict[str, torch.Tensor]  # checkpoint module name -> the observed quantized weight
    report: dict


def quantize(src: Path, out: Path, **kw) -> tuple[dict[str, torch.Tensor], dict]:
    job = dict(settings=SETTINGS, nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=2)
    return quantize_observed(src, out, **job, **kw)


WRAPPERS = {  # the class each tiny wrapper (conftest.MULTIMODAL_ARCHITECTURES) loads as
    "gemma3": Gemma3ForConditionalGeneration,
    "mistral3": Mistral3ForConditionalGeneration,
}


@pytest.fixture(scope="module")
def quantized(tiny_model, calib_text, tmp_path_factory):
    """``quantized(arch)``: the calibrated run of the tiny wrapper ``arch``, made once."""
    runs: dict[str, WrapperRun] = {}

    def make(arch: str) -> WrapperRun:
        if arch not in runs:
            src = tiny_model(arch)
            out = tmp_path_factory.mktemp(arch) / "ckpt"
            Q, report = quantize(src, out, calib=str(calib_text))
            runs[arch] = WrapperRun(arch, src, out, Q, report)
        return runs[arch]

    return make


@pytest.fixture(scope="module", params=list(WRAPPERS))
def wrapper(request, quantized) -> WrapperRun:
    return quantized(request.param)


@pytest.fixture(scope="module")
def gemma3(quantized) -> WrapperRun:
    return quantized("gemma3")


def source_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_the_source_is_a_wrapper_with_a_vision_tower(wrapper: WrapperRun):
    keys = set(source_tensors(wrapper.src))
    assert {k.split(".")[0] for k in keys} == {
        "language_model", "vision_tower", "multi_modal_projector",
    }  # fmt: skip
    config = json.loads((wrapper.src / "config.json").read_text())
    assert config["architectures"] == [WRAPPERS[wrapper.arch].__name__]


def test_only_the_text_decoder_layers_are_quantized(wrapper: WrapperRun):
    ckpt = Checkpoint(wrapper.out)
    ckpt.validate()
    src = source_tensors(wrapper.src)
    text_linears = {
        k.removesuffix(".weight")
        for k in src
        if re.match(TEXT_LAYERS, k) and k.endswith(tuple(f"{p}.weight" for p in LINEARS))
    }
    layers = {"gemma3": 3, "mistral3": 2}[wrapper.arch]
    assert len(text_linears) == layers * len(LINEARS)
    assert set(ckpt.quantized_prefixes()) == text_linears == set(wrapper.Q)
    assert sum(len(layer) for layer in wrapper.report["layers"]) == len(text_linears)
    # every other source tensor is in the output under its own name, bit for bit
    stored = {n: ckpt.get(n) for n in ckpt.tensor_names()}
    others = {k: t for k, t in src.items() if k.removesuffix(".weight") not in text_linears}
    assert set(others) == {
        n for n in stored if not n.endswith(("qweight", "scales", "zero_points"))
    }
    for k, t in others.items():
        assert stored[k].dtype == t.dtype and torch.equal(stored[k], t), k
    # the vision tower and the projector are present and listed as not converted
    assert any(re.match(r"vision_tower\..*layers\.1\.", k) for k in others)
    assert any(k.startswith("multi_modal_projector.") for k in others)
    assert set(ckpt.qcfg.modules_to_not_convert) == {
        "language_model.lm_head", "vision_tower", "multi_modal_projector",
    }  # fmt: skip


def test_config_is_the_wrappers_with_quantization_config(wrapper: WrapperRun):
    src = json.loads((wrapper.src / "config.json").read_text())
    out = json.loads((wrapper.out / "config.json").read_text())
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
    return AutoModelForImageTextToText.from_pretrained(expected_dir, dtype=torch.float32).eval()


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


def test_reference_model_is_the_wrapper_with_the_observed_weights(wrapper: WrapperRun, tmp_path):
    ckpt = Checkpoint(wrapper.out)
    for name, Q in wrapper.Q.items():
        assert torch.equal(ckpt.dequantized_weight(name), Q), name
    expected = expected_model(wrapper, tmp_path)
    got = load_reference_model(wrapper.out)
    assert type(got) is WRAPPERS[wrapper.arch]
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = expected(input_ids=ids, use_cache=False).logits
        have = got(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_reference_gemma3_sees_images_as_the_source_does(gemma3: WrapperRun, tmp_path):
    """Text with an image: the copied vision tower and projector at work."""
    expected = expected_model(gemma3, tmp_path)
    got = load_reference_model(gemma3.out)
    inputs = text_and_image(got.config)
    with torch.no_grad():
        want = expected(**inputs, use_cache=False).logits
        have = got(**inputs, use_cache=False).logits
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        # the image changes the text after it: the vision path really ran
        blank = {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}
        assert not torch.allclose(got(**blank, use_cache=False).logits[:, -1], have[:, -1])


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


TEXT_MODELS = {"gemma3": "Gemma3ForCausalLM", "mistral3": "MistralForCausalLM"}


def text_model_copy(wrapper: Path, dest: Path, arch: str) -> Path:
    """The wrapper's text decoder as a standalone causal LM folder (same tensors under the text
    model's names, its text_config as config.json, the tokenizer)."""
    shutil.copytree(wrapper, dest)
    config = json.loads((dest / "config.json").read_text())
    text = {**config["text_config"], "architectures": [TEXT_MODELS[arch]]}
    text["tie_word_embeddings"] = config.get("tie_word_embeddings", True)
    (dest / "config.json").write_text(json.dumps(text))
    state = {
        re.sub(r"^language_model\.", "", k): v
        for k, v in source_tensors(dest).items()
        if k.startswith("language_model.")
    }
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_calibrating_through_the_wrapper_is_calibrating_its_text_model(
    wrapper: WrapperRun, calib_text, tmp_path
):
    """Text reaches the wrapper's decoder layers exactly as it reaches the text model alone
    (same embeddings, same attention masks, sliding windows included): the same Q for every linear, bit for bit."""
    text = text_model_copy(wrapper.src, tmp_path / "text", wrapper.arch)
    Q, _ = quantize(text, tmp_path / "out", calib=str(calib_text))
    assert {f"language_model.{n}" for n in Q} == set(wrapper.Q)
    for name, q in Q.items():
        assert torch.equal(wrapper.Q[f"language_model.{name}"], q), name


# --- vLLM: where the checkpoint's quantized linears land (vLLM's gemma3_mm.py, read as text:
# importing it needs torchvision, which the CPU environment here does not have)


def vllm_gemma3_names() -> tuple[dict[str, str], dict[str, list[str]], str]:
    """(hf_to_vllm_mapper's orig_to_new_prefix, packed_modules_mapping, the file's text) of
    vLLM's Gemma3ForConditionalGeneration."""
    import ast
    import importlib.util

    path = (
        Path(importlib.util.find_spec("vllm").origin).parent / "model_executor/models/gemma3_mm.py"
    )
    text = path.read_text()
    cls = next(
        n for n in ast.parse(text).body
        if isinstance(n, ast.ClassDef) and n.name == "Gemma3ForConditionalGeneration"
    )  # fmt: skip
    found = {}
    for node in cls.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    prefixes = next(
        ast.literal_eval(k.value) for k in found["hf_to_vllm_mapper"].keywords
        if k.arg == "orig_to_new_prefix"
    )  # fmt: skip
    return prefixes, ast.literal_eval(found["packed_modules_mapping"]), text


def test_vllm_asks_for_the_text_linears_only(gemma3: WrapperRun):
    """The plugin's answer for the layers vLLM's Gemma 3 wrapper builds: its text decoder's
    fused qkv_proj / o_proj / gate_up_proj / down_proj under ``language_model.model.layers.L``
    (the text model is built with prefix "language_model", its layers under "model"), quantized;
    the SigLIP tower's (``vision_tower.vision_model.encoder.layers.L``) not; both from the
    checkpoint's tensors (a local folder) and from modules_to_not_convert alone (not local)."""
    pytest.importorskip("vllm")
    from vllm.model_executor.models.utils import WeightsMapper

    from leanquant_serve.vllm.config import LeanQuantVLLMConfig

    prefixes, packed, text = vllm_gemma3_names()
    assert 'maybe_prefix(prefix, "language_model")' in text
    assert 'maybe_prefix(prefix, "vision_tower")' in text
    text_layers = [
        f"language_model.model.layers.{i}.{p}"
        for i in range(3)
        for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ]
    vision_layers = [
        f"vision_tower.vision_model.encoder.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.qkv_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    ]
    ckpt = Checkpoint(gemma3.out)
    for local in (True, False):
        qc = LeanQuantVLLMConfig.from_config(ckpt.qcfg.to_dict())
        qc.packed_modules_mapping = packed
        if local:
            qc.maybe_update_config(str(gemma3.out))
            qc.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix=prefixes))
        assert all(qc.is_quantized(p) for p in text_layers), local
        assert not any(qc.is_quantized(p) for p in vision_layers), local
