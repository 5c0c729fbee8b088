"""``leanquant plan`` of multimodal wrappers (issue 15 item 4's planner part): the text decoder
planned as its text model, the vision tower and projector beside it as 16-bit weights.

Expectations are hand-counted from the published sizes (Gemma 3 4B), from the tiny wrappers'
configs (conftest.MULTIMODAL_ARCHITECTURES) and from the tensors the quantizer really writes;
none is read off the planner's own walk of the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import MULTIMODAL_ARCHITECTURES, VOCAB
from safetensors import safe_open

from leanquant_serve.plan import PlanError, PlanInput, format_plan, plan
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import QuantizeJob, quantize_model

# google/gemma-3-4b-it's config.json on the Hugging Face hub
# (https://huggingface.co/google/gemma-3-4b-it/blob/main/config.json; the same values as
# google/gemma-3-4b-pt's), all of its keys but token ids and dtype: the text model's other
# sizes (8 heads, 4 KV heads, head_dim 256, vocab 262208, tied embeddings) are
# Gemma3TextConfig's defaults. The model card gives 4.3B parameters.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def siglip_elements(h: int, inter: int, layers: int, image: int, patch: int) -> int:
    """SigLIP's vision model without its pooling head: per layer q/k/v/out (h×h + bias), fc1
    and fc2 (with biases), two LayerNorms (weight + bias); the patch convolution (3 channels,
    with bias), one position embedding per patch, the post LayerNorm."""
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    return layers * layer + (3 * patch * patch * h + h) + (image // patch) ** 2 * h + 2 * h


def gemma3_text_elements(
    hidden: int, inter: int, layers: int, heads: int = 8, kv_heads: int = 4, head_dim: int = 256
) -> int:
    """Gemma 3's text model (vocabulary 262208) with tied embeddings: per layer q/k/v/o and
    gate/up/down without biases, four RMSNorms of hidden and q_norm/k_norm of head_dim; the
    final norm."""
    q, kv = heads * head_dim, kv_heads * head_dim
    layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 4 * hidden + 2 * head_dim
    return 262208 * hidden + layers * layer + hidden


def write(tmp_path: Path, d: dict, name: str = "config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return str(path)


def test_gemma3_4b_by_hand(tmp_path):
    """16-bit plan of Gemma 3 4B: its SigLIP tower (416.9M) and projector (1152 × 2560 matrix +
    a norm of 1152) counted as 16-bit weights beside the text decoder; every byte, 8.60 GB,
    equals the hand count, which is the hub's own parameter count, and is on the one GPU."""
    p = plan(PlanInput(write(tmp_path, GEMMA3_4B), bits=16, gpu_mem_gib=24))
    tower = siglip_elements(1152, 4304, 27, 896, 14)
    projector = 1152 * 2560 + 1152
    assert (tower, projector) == (416_866_032, 2_950_272)
    assert p.architecture["towers"] == {"vision_tower": tower, "multi_modal_projector": projector}
    assert p.architecture["wrapper"] == "gemma3"
    assert p.architecture["model_type"] == "gemma3_text"
    text = gemma3_text_elements(2560, 10240, 34)
    assert p.checkpoint_bytes["towers"] == 2 * (tower + projector)
    assert p.checkpoint_bytes["lm_head"] == 0  # tied, as the wrapper ties them
    # the hub's safetensors metadata for google/gemma-3-4b-it: 4,300,079,472 parameters
    assert text + tower + projector == 4_300_079_472
    assert p.checkpoint_bytes["total"] == 2 * (text + tower + projector)
    # vLLM, TP 1: everything on the GPU (262208 is a multiple of vLLM's vocabulary padding)
    assert p.weight_bytes_per_gpu == p.checkpoint_bytes["total"]
    assert p.kv_bytes_per_token_per_gpu == 2 * 34 * 4 * 256 * 2
    assert p.quantization["towers_16bit"] == ["vision_tower", "multi_modal_projector"]
    out = format_plan(p)
    assert "gemma3 wrapper, text model gemma3_text: 34 layers" in out
    assert "vision_tower 416,866,032, multi_modal_projector 2,950,272 elements, 16-bit" in out
    assert p.tower_bytes_per_gpu == p.checkpoint_bytes["towers"]  # TP 1: all of them
    assert "0.78 GiB per GPU at tp=1" in out  # the assumption line


# google/gemma-3-27b-it's config.json (https://huggingface.co/google/gemma-3-27b-it): the
# same vision_config; its text_config sizes
GEMMA3_27B = {
    **GEMMA3_4B,
    "text_config": {
        "head_dim": 128,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "model_type": "gemma3_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
}


def test_gemma3_27b_by_hand(tmp_path):
    """Gemma 3 27B, 16-bit: the same SigLIP tower, a 1152 × 5376 projector; 27,432,406,640
    parameters in all, the hub's safetensors count for google/gemma-3-27b-it."""
    p = plan(PlanInput(write(tmp_path, GEMMA3_27B), bits=16))
    tower, projector = siglip_elements(1152, 4304, 27, 896, 14), 1152 * 5376 + 1152
    assert p.architecture["towers"] == {"vision_tower": tower, "multi_modal_projector": projector}
    text = gemma3_text_elements(5376, 21504, 62, heads=32, kv_heads=16, head_dim=128)
    assert text + tower + projector == 27_432_406_640
    assert p.checkpoint_bytes["total"] == 2 * (text + tower + projector)


def siglip_elements_per_rank(
    h: int, inter: int, layers: int, image: int, patch: int, tp: int
) -> int:
    """SigLIP's vision model (as :func:`siglip_elements`) on one of ``tp`` ranks of vLLM 0.32
    (``siglip.py``): per layer q/k/v weights and biases (``QKVParallelLinear``), fc1's weight and
    bias (column parallel) and out_proj's and fc2's weights (row parallel) split over the
    ranks; out_proj's and fc2's biases, the two LayerNorms, the patch convolution, the position
    embeddings and the post LayerNorm whole on every rank."""
    split = 3 * (h * h + h) + (h * inter + inter) + h * h + inter * h
    whole = h + h + 2 * 2 * h
    return (
        layers * (split // tp + whole)
        + (3 * patch * patch * h + h)
        + (image // patch) ** 2 * h
        + 2 * h
    )


@pytest.mark.parametrize(
    "tp, per_rank",
    [(1, 423_060_336), (2, 217_420_344), (4, 114_600_348)],
)
def test_gemma3_27b_towers_per_rank_by_hand(tmp_path, tp, per_rank):
    """Gemma 3 27B, 4-bit g128, TP 1/2/4: vLLM splits the SigLIP layers' attention and MLP
    pairs over the ranks and keeps the rest whole (its 1152 x 5376 projection matrix is a bare
    parameter, whole on every rank). Elements per GPU, by hand: TP 1 416,866,032 + 6,194,304 =
    423,060,336; TP 2: 27 x (15,232,592 / 2 + 6,912) + 5,399,424 + 6,194,304 = 217,420,344;
    TP 4: 27 x (3,808,148 + 6,912) + 5,399,424 + 6,194,304 = 114,600,348 (15,232,592 split
    and 6,912 whole elements per layer; 5,399,424 for the patch convolution, 4,096 position
    embeddings and the post LayerNorm). The weights per GPU are the text model's plus these."""
    h, inter = 1152, 4304
    assert 4 * h * h + 3 * h + 2 * h * inter + inter == 15_232_592
    tower = siglip_elements_per_rank(h, inter, 27, 896, 14, tp)
    assert tower + 1152 * 5376 + 1152 == per_rank
    kw = dict(gpus=tp, gpu_mem_gib=80, max_model_len=8192)
    wrapped = plan(PlanInput(write(tmp_path, GEMMA3_27B), **kw))
    text_d = {**GEMMA3_27B["text_config"], "tie_word_embeddings": True}
    alone = plan(PlanInput(write(tmp_path, text_d, "text.json"), **kw))
    assert (wrapped.tp, wrapped.pp) == (tp, 1)
    assert wrapped.tower_bytes_per_gpu == 2 * per_rank
    assert wrapped.weight_bytes_per_gpu == alone.weight_bytes_per_gpu + 2 * per_rank
    assert f"{2 * per_rank / 2**30:.2f} GiB per GPU at tp={tp}" in format_plan(wrapped)


def test_tower_split_is_vllms_rank_by_rank(tiny_model, tmp_path):
    """The planner's per-rank tower bytes equal the parameters vLLM 0.32 itself builds for the
    tiny Gemma 3's SigLIP tower (``SiglipVisionModel`` under tensor-parallel rank 0 and 1 of 2)
    plus the projector (a bare matrix and a norm, whole on every rank)."""
    pytest.importorskip("vllm")
    from unittest import mock

    import vllm.model_executor.models.siglip as vllm_siglip
    from conftest import vllm_tensor_parallel_rank
    from transformers import SiglipVisionConfig

    d = json.loads((tiny_model("gemma3") / "config.json").read_text())
    d["vision_config"]["vision_use_head"] = False  # as Gemma 3's own configs (vLLM builds none)
    vision = SiglipVisionConfig(**d["vision_config"])
    per_rank = set()
    for rank in range(2):
        with (
            vllm_tensor_parallel_rank(rank, 2),
            mock.patch.object(vllm_siglip, "get_tensor_model_parallel_world_size", lambda: 2),
        ):
            tower = vllm_siglip.SiglipVisionModel(vision, prefix="vision_tower")
        per_rank.add(sum(p.numel() for p in tower.parameters()))
    assert len(per_rank) == 1
    (vllm_tower,) = per_rank
    text, h_vision = d["text_config"]["hidden_size"], vision.hidden_size
    projector = h_vision * text + h_vision
    p = plan(PlanInput(write(tmp_path, d), gpus=2, bits=16, gpu_mem_gib=1, max_model_len=64))
    assert p.architecture["towers"]["multi_modal_projector"] == projector
    assert p.tower_bytes_per_gpu == 2 * (vllm_tower + projector)
    assert p.tower_bytes_per_gpu < p.checkpoint_bytes["towers"]


def test_the_text_decoder_is_planned_as_its_text_model(tmp_path):
    """4-bit, TP 2: the wrapper's plan is its text model's (Gemma3ForCausalLM of the same
    text_config) plus the towers: same decoder bytes, same KV bytes per token, weights per GPU
    larger and the KV cache smaller by exactly the towers' bytes on each GPU (the SigLIP
    pairs split, :func:`siglip_elements_per_rank`; the projector whole)."""
    text_d = {**GEMMA3_4B["text_config"], "tie_word_embeddings": True}
    kw = dict(gpus=2, gpu_mem_gib=24, max_model_len=32768)
    wrapped = plan(PlanInput(write(tmp_path, GEMMA3_4B), **kw))
    alone = plan(PlanInput(write(tmp_path, text_d, "text.json"), **kw))
    towers = 2 * (416_866_032 + 2_950_272)
    per_gpu = 2 * (siglip_elements_per_rank(1152, 4304, 27, 896, 14, 2) + 2_950_272)
    assert wrapped.quantization["towers_16bit"] == ["vision_tower", "multi_modal_projector"]
    for key in ("decoder_layers", "embed_tokens", "lm_head", "final_norm"):
        assert wrapped.checkpoint_bytes[key] == alone.checkpoint_bytes[key], key
    assert wrapped.checkpoint_bytes["total"] == alone.checkpoint_bytes["total"] + towers
    assert wrapped.kv_bytes_per_token_per_gpu == alone.kv_bytes_per_token_per_gpu
    assert wrapped.weight_bytes_per_gpu == alone.weight_bytes_per_gpu + per_gpu
    for w, a in zip(wrapped.per_gpu, alone.per_gpu, strict=True):
        assert w.kv_cache_bytes == a.kv_cache_bytes - per_gpu
    assert wrapped.capacity_tokens < alone.capacity_tokens
    assert wrapped.engine_args == alone.engine_args
    summary = {k: v for k, v in wrapped.architecture.items() if k not in ("wrapper", "towers")}
    assert summary == {**alone.architecture, "name": wrapped.model}


def test_layers_are_named_as_in_the_wrapper_checkpoint(tmp_path):
    """A checkpoint's modules_to_not_convert names a text linear as the wrapper's checkpoint
    does (``language_model.model.layers.0.mlp.down_proj``): that one linear is planned 16-bit
    (2 · 2560 · 10240 bytes instead of its 4-bit g128 tensors), no other."""
    q = {
        "quant_method": "leanquant",
        "bits": 4,
        "group_size": 128,
        "grid": "affine",
        "desc_act": False,
        "static_groups": False,
        "modules_to_not_convert": [
            "language_model.lm_head",
            "vision_tower",
            "multi_modal_projector",
        ],
    }
    base = plan(PlanInput(write(tmp_path, {**GEMMA3_4B, "quantization_config": q})))
    q["modules_to_not_convert"].append("language_model.model.layers.0.mlp.down_proj")
    skip = plan(PlanInput(write(tmp_path, {**GEMMA3_4B, "quantization_config": q}, "skip.json")))
    i, o = 10240, 2560
    # int32 qweight (i/8, o), fp16 scales (i/128, o), int32 zero_points (i/128, o/8)
    quantized = i // 8 * o * 4 + i // 128 * o * 2 + i // 128 * (o // 8) * 4
    assert (
        skip.checkpoint_bytes["decoder_layers"] - base.checkpoint_bytes["decoder_layers"]
        == 2 * i * o - quantized
    )


@pytest.mark.parametrize("arch", list(MULTIMODAL_ARCHITECTURES))
def test_checkpoint_bytes_equal_what_the_quantizer_writes(arch, tiny_model, tmp_path):
    """RTN-quantize the tiny Gemma 3 and Mistral 3 wrappers (down_proj left 16-bit) and compare
    the planned checkpoint bytes with the tensors actually stored: the text decoder's layers,
    embeddings, head, and the towers the quantizer copied."""
    out = tmp_path / "ckpt"
    s = GPTQSettings(bits=4, group_size=32, fit="minmax", actorder=False, static_groups=False)
    quantize_model(
        QuantizeJob(
            model=tiny_model(arch), out=out, settings=s, rtn=True, skip=(r"mlp\.down_proj",)
        )
    )
    stored, towers = 0, 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():  # noqa: SIM118  (safe_open has no __iter__)
                t = st.get_slice(name)
                size = math.prod(t.get_shape()) * _DTYPE_BYTES[t.get_dtype()]
                stored += size
                towers += size if not name.startswith("language_model.") else 0
    p = plan(PlanInput(str(out), max_model_len=64))
    assert p.architecture["wrapper"] == arch
    assert towers > 0 and p.checkpoint_bytes["towers"] == towers
    assert p.checkpoint_bytes["total"] == stored


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}


def test_mistral3_towers_by_hand(tmp_path):
    """The tiny Mistral 3 (conftest): its Pixtral tower (patch convolution without bias, a
    pre-norm, per layer q/k/v/o and gate/up/down without biases and two RMSNorms) and its
    projector (norm, 2×2 patch merger, two linears without bias) counted by hand."""
    c = MULTIMODAL_ARCHITECTURES["mistral3"](VOCAB)
    v, t = c.vision_config, c.text_config
    h, inter, p_ = v.hidden_size, v.intermediate_size, v.patch_size
    layer = 4 * h * h + 3 * h * inter + 2 * h
    tower = 3 * p_ * p_ * h + h + v.num_hidden_layers * layer
    merge = c.spatial_merge_size**2
    projector = h + merge * h * h + h * t.hidden_size + t.hidden_size * t.hidden_size
    d = c.to_dict()
    p = plan(PlanInput(write(tmp_path, d), bits=16, max_model_len=64))
    assert p.architecture["towers"] == {"vision_tower": tower, "multi_modal_projector": projector}
    assert p.architecture["model_type"] == "mistral"


def test_mistral3_towers_per_rank_by_hand(tmp_path):
    """The tiny Mistral 3 at TP 2 (16-bit): vLLM splits each Pixtral layer's qkv_proj / o_proj
    and gate_up_proj / down_proj and the projector's linear_1 / linear_2 (all without bias);
    the patch convolution, the pre-norm, the layers' two RMSNorms, the projector's norm and its
    patch merger (one lone linear) stay whole on every rank."""
    c = MULTIMODAL_ARCHITECTURES["mistral3"](VOCAB)
    v, t = c.vision_config, c.text_config
    h, inter, p_, ht = v.hidden_size, v.intermediate_size, v.patch_size, t.hidden_size
    split_layer = 4 * h * h + 3 * h * inter
    whole = 3 * p_ * p_ * h + h + v.num_hidden_layers * 2 * h + h + c.spatial_merge_size**2 * h * h
    split = v.num_hidden_layers * split_layer + h * ht + ht * ht
    p = plan(PlanInput(write(tmp_path, c.to_dict()), gpus=2, bits=16, max_model_len=64))
    assert p.tp == 2
    assert p.tower_bytes_per_gpu == 2 * (whole + split // 2)
    assert 2 * (whole + split) == p.checkpoint_bytes["towers"]


def test_a_tower_vllm_cannot_split_is_one_line(tiny_model, tmp_path):
    """A SigLIP intermediate size (66) that 4 ranks cannot split: vLLM's ColumnParallelLinear
    would refuse fc1 at load; the plan says so in one line."""
    d = json.loads((tiny_model("gemma3") / "config.json").read_text())
    d["vision_config"]["intermediate_size"] = 66
    with pytest.raises(PlanError) as e:
        plan(PlanInput(write(tmp_path, d), gpus=4, bits=16, max_model_len=64))
    assert str(e.value) == (
        "tensor parallel size 4: vLLM splits "
        "vision_tower.encoder.layers.0.mlp.fc1's output (66) over the ranks, not a "
        "multiple of 4"
    )


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"model_type": "llava"},
            "model_type 'llava' is a multimodal wrapper plan does not support (supported "
            "wrappers: gemma3, mistral3)",
        ),
        (
            {"model_type": "mistral3", "text_config": {"model_type": "phi3"}},
            "the mistral3 wrapper's text model is 'phi3', not one plan supports",
        ),
    ],
)
def test_untested_wrappers_are_one_line(tmp_path, over, message):
    d = {**GEMMA3_4B, **over}
    with pytest.raises(PlanError) as e:
        plan(PlanInput(write(tmp_path, d)))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_exllamav2_does_not_model_wrappers(tmp_path):
    with pytest.raises(PlanError) as e:
        plan(PlanInput(write(tmp_path, GEMMA3_4B), engine="exllamav2"))
    assert str(e.value) == (
        "--engine exllamav2: multimodal wrappers (gemma3) are not modelled for it; plan them "
        "with --engine vllm"
    )
