"""``leanquant plan``: serving arithmetic, checked against numbers worked out by hand here from
the architecture (not by calling the code under test), against real checkpoints the quantizer
writes, and against the parameters vLLM's own layers build for each tensor-parallel rank."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, SUPPORTED, VOCAB, vllm_tensor_parallel_rank
from safetensors import safe_open

from leanquant.cli import main
from leanquant_serve.format import LeanQuantConfig
from leanquant_serve.plan import (
    PRESETS,
    Architecture,
    PlanError,
    PlanInput,
    format_plan,
    plan,
)
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import QuantizeJob, quantize_model

GiB = 2**30

# Llama-3.1-405B (config.json of Meta's release; DESIGN.md §4)
H, I, L, HEADS, KV, HD, V = 16384, 53248, 126, 128, 8, 128, 128256


def lq4g128(i: int, o: int) -> int:
    """Bytes of one LeanQuant 4-bit, group-128 affine linear with an (o, i) weight, from the
    format's table: qweight int32 (i·4/32, o) + scales fp16 (i/128, o) + zero_points int32
    (i/128, o·4/32)."""
    return (i * 4 // 32) * o * 4 + (i // 128) * o * 2 + (i // 128) * (o * 4 // 32) * 4


# --------------------------------------------------------------------- 405B on 8 x 48 GB, TP 8


def test_405b_4bit_g128_on_8x48gb_tp8_by_hand():
    TP = 8
    # One rank's shard of each linear of a layer, (in, out):
    #   q    column parallel: 16384 -> 128·128/8 = 2048
    #   k, v column parallel over KV heads: 8 KV heads / 8 ranks = 1 head = 128 outputs
    #   o    row parallel: 2048 -> 16384 (its 16 groups of 128 inputs)
    #   gate, up column parallel: 16384 -> 53248/8 = 6656
    #   down row parallel: 6656 (52 groups) -> 16384
    q = lq4g128(H, HEADS * HD // TP)  # 16,777,216 + 524,288 + 131,072 = 17,432,576
    k = v = lq4g128(H, KV // TP * HD)  # 1,048,576 + 32,768 + 8,192 = 1,089,536
    o = lq4g128(HEADS * HD // TP, H)  # 16,777,216 + 524,288 + 131,072 = 17,432,576
    gate = up = lq4g128(H, I // TP)  # 54,525,952 + 1,703,936 + 425,984 = 56,655,872
    down = lq4g128(I // TP, H)  # 54,525,952 + 1,703,936 + 425,984 = 56,655,872
    norms = 2 * H * 2  # input + post-attention RMSNorm, fp16, replicated: 65,536
    layer = q + k + v + o + gate + up + down + norms
    assert layer == 207_077_376
    embed = lm_head = (V // TP) * H * 2  # vocab parallel: 16,032 rows x 16384 x 2 B = 525,336,576
    weights = L * layer + embed + lm_head + H * 2  # + final norm
    assert weights == 27_142_455_296  # 27.14 GB = 25.28 GiB (DESIGN §4: "≈ 27 GB each")

    kv_per_token = 2 * L * (KV // TP) * HD * 2  # K and V, 126 layers, 1 head of 128, fp16
    assert kv_per_token == 64_512

    budget = math.ceil(48 * GiB * 9 / 10)  # vLLM: ceil(total · gpu_memory_utilization)
    assert budget == 46_385_646_797
    # Stated reserve: activations of a 2048-token profile forward (vLLM 0.32's default
    # max_num_batched_tokens for GPUs under 70 GiB): 2048 · 2 B · (4·16384 + 2·(2048 + 2·128)
    # + 3·6656); sampler 8 seqs · vocab · 16 B; CUDA graphs 1 GiB; other 1 GiB.
    activations = 2048 * 2 * (4 * H + 2 * (2048 + 2 * 128) + 3 * (I // TP))  # 369,098,752
    sampler = 8 * V * 4 * 4  # 16,416,768
    reserve = activations + sampler + GiB + GiB
    assert reserve == 2_532_999_168
    kv_bytes = budget - weights - reserve  # 16,710,192,333
    blocks = kv_bytes // (16 * kv_per_token)  # blocks of 16 tokens: 16,189
    capacity = blocks * 16
    assert capacity == 259_024

    p = plan(
        PlanInput(
            "llama-3.1-405b",
            bits=4,
            group_size=128,
            gpus=8,
            gpu_mem_gib=48,
            max_model_len=16384,
            concurrency=8,
            kv_dtype="fp16",
        )
    )
    assert (p.tp, p.pp) == (8, 1)
    assert p.weight_bytes_per_gpu == weights
    assert p.kv_bytes_per_token_per_gpu == kv_per_token
    assert p.per_gpu[0].budget_bytes == budget
    assert sum(p.reserve.values()) == reserve
    assert p.capacity_tokens == capacity
    assert p.required_tokens == 16384 * 8
    assert p.fits and p.fits_one_sequence
    assert p.margin_tokens == capacity - 131_072
    assert p.max_full_length_sequences == capacity // 16384  # 15

    # The whole checkpoint: the same tensors unsharded (k/v 1024 outputs, 128 or 416 groups).
    full_layer = (
        2 * lq4g128(H, HEADS * HD) + 2 * lq4g128(H, KV * HD) + 2 * lq4g128(H, I) + lq4g128(I, H)
    ) + norms
    total = L * full_layer + 2 * V * H * 2 + H * 2
    assert total == 217_081_610_240  # ≈ 217 GB (DESIGN §4: "≈ 216 GB")
    assert p.checkpoint_bytes["total"] == total

    # A stated reserve replaces the estimate: 4 GiB.
    p4 = plan(
        PlanInput(
            "llama-3.1-405b",
            gpus=8,
            gpu_mem_gib=48,
            max_model_len=16384,
            concurrency=8,
            reserve_gib=4,
        )
    )
    assert p4.capacity_tokens == (budget - weights - 4 * GiB) // (16 * kv_per_token) * 16
    assert p4.capacity_tokens == 231_712


def test_405b_bf16_on_8x48gb_does_not_fit():
    TP = 8
    params_per_rank = H * (HEADS * HD + 2 * KV * HD) // TP + HEADS * HD // TP * H + 3 * H * I // TP
    weights = L * (params_per_rank * 2 + 2 * H * 2) + 2 * (V // TP) * H * 2 + H * 2
    assert weights == 101_470_601_216  # 94.5 GiB per GPU: more than the card holds
    p = plan(
        PlanInput(
            "llama-3.1-405b", bits=16, gpus=8, gpu_mem_gib=48, max_model_len=16384, concurrency=8
        )
    )
    assert p.weight_bytes_per_gpu == weights
    assert not p.fits and not p.fits_one_sequence
    assert p.capacity_tokens == 0 and p.margin_tokens == -131_072
    assert p.per_gpu[0].kv_cache_bytes < 0
    text = format_plan(p)
    assert "fits" in text and "NO" in text and "not even ONE full-length sequence" in text
    assert "exceed the budget" in text


@pytest.mark.parametrize(
    "preset, gpus, gpu_mem, max_len, seqs",
    [
        ("llama-3.1-8b", 1, 24, 16384, 4),
        ("llama-3.1-8b", 1, 22, 16384, 4),  # a "24 GB" card that reports less
        ("llama-3.1-70b", 2, 48, 16384, 6),
        ("llama-3.1-70b", 2, 45, 16384, 6),
    ],
)
def test_smaller_presets_fit(preset, gpus, gpu_mem, max_len, seqs):
    p = plan(
        PlanInput(preset, gpus=gpus, gpu_mem_gib=gpu_mem, max_model_len=max_len, concurrency=seqs)
    )
    assert p.fits and p.margin_tokens > 0


def test_8b_and_70b_by_hand():
    # 8B: 32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads; TP 1
    h, i, n = 4096, 14336, 32
    layer = (
        2 * lq4g128(h, h) + 2 * lq4g128(h, 8 * HD) + 2 * lq4g128(h, i) + lq4g128(i, h) + 2 * h * 2
    )
    p = plan(PlanInput("llama-3.1-8b", gpus=1, gpu_mem_gib=24, max_model_len=16384, concurrency=4))
    assert p.weight_bytes_per_gpu == n * layer + 2 * V * h * 2 + h * 2
    assert p.kv_bytes_per_token_per_gpu == 2 * n * 8 * HD * 2  # 131,072
    # 70B: 80 layers, hidden 8192, intermediate 28672, 64 heads, 8 KV heads; TP 2
    h, i, n, tp = 8192, 28672, 80, 2
    layer = (
        lq4g128(h, 64 * HD // tp)
        + 2 * lq4g128(h, 8 // tp * HD)
        + lq4g128(64 * HD // tp, h)
        + 2 * lq4g128(h, i // tp)
        + lq4g128(i // tp, h)
        + 2 * h * 2
    )
    p = plan(PlanInput("llama-3.1-70b", gpus=2, gpu_mem_gib=48, max_model_len=16384, concurrency=6))
    assert p.weight_bytes_per_gpu == n * layer + 2 * (V // tp) * h * 2 + h * 2
    assert p.kv_bytes_per_token_per_gpu == 2 * n * (8 // tp) * HD * 2  # 163,840


def test_fp8_kv_halves_kv_bytes_and_pipeline_stages_split_layers():
    base = dict(gpus=8, gpu_mem_gib=48, max_model_len=16384, concurrency=8)
    fp16 = plan(PlanInput("llama-3.1-405b", **base))
    fp8 = plan(PlanInput("llama-3.1-405b", kv_dtype="fp8", **base))
    assert fp8.kv_bytes_per_token_per_gpu * 2 == fp16.kv_bytes_per_token_per_gpu
    assert "--kv-cache-dtype" in fp8.engine_args
    pp = plan(PlanInput("llama-3.1-405b", tp=4, **base))  # 4-way TP x 2 pipeline stages
    assert pp.pp == 2 and [g.layers for g in pp.per_gpu] == [63, 63]
    # 2 KV heads per rank on half the layers: the same KV bytes per token as TP 8
    assert pp.kv_bytes_per_token_per_gpu == 2 * 63 * 2 * HD * 2
    assert pp.engine_args[:4] == ["--tensor-parallel-size", "4", "--pipeline-parallel-size", "2"]


def test_405b_exllamav2_layer_split_by_hand():
    p = plan(
        PlanInput(
            "llama-3.1-405b",
            engine="exllamav2",
            gpus=8,
            gpu_mem_gib=48,
            max_model_len=16384,
            concurrency=8,
        )
    )
    full_layer = (
        2 * lq4g128(H, HEADS * HD)
        + 2 * lq4g128(H, KV * HD)
        + 2 * lq4g128(H, I)
        + lq4g128(I, H)
        + 2 * H * 2
    )  # 1,656,160,256 B, whole (no tensor parallelism)
    head = V * H * 2 + H * 2  # lm_head + final norm, after the last layer
    # Even split: 16 layers on each of GPUs 0-6 (26.50 GB), 14 + lm_head on GPU 7 (27.39 GB);
    # a 17th layer on GPU 0 (28.15 GB) or a 15th on GPU 7 (29.05 GB) would be more.
    assert [g.layers for g in p.per_gpu] == [16] * 7 + [14]
    assert p.per_gpu[0].weight_bytes == 16 * full_layer
    assert p.weight_bytes_per_gpu == 14 * full_layer + head == 27_388_968_960
    assert p.host_bytes == V * H * 2  # the token embedding stays in host RAM
    assert p.kv_bytes_per_token_per_gpu == 16 * 2 * KV * HD * 2  # 65,536: whole KV heads
    assert p.fits and p.tp == 1 and len(p.gpu_split_gib) == 8


# ------------------------------------- shapes from transformers, linears read off the model


def test_linears_and_input_groups_are_read_off_the_model():
    """405B's decoder layer as transformers builds it: seven linears in forward order, grouped
    by the input they read (the quantizer's groups), plus two hidden-sized RMSNorm weights."""
    a = Architecture.from_config(PRESETS["llama-3.1-405b"], "405b")
    got = [(lin.name, lin.in_features, lin.out_features, lin.group) for lin in a.linears]
    assert got == [
        ("self_attn.q_proj", H, HEADS * HD, 0),
        ("self_attn.k_proj", H, KV * HD, 0),
        ("self_attn.v_proj", H, KV * HD, 0),
        ("self_attn.o_proj", HEADS * HD, H, 1),
        ("mlp.gate_proj", H, I, 2),
        ("mlp.up_proj", H, I, 2),
        ("mlp.down_proj", I, H, 3),
    ]
    assert [lin.first_in_group for lin in a.linears] == [1, 0, 0, 1, 1, 0, 1]
    assert not any(lin.bias for lin in a.linears)
    assert a.layers_name == "model.layers" and a.layer_16bit_elements == 2 * H


def test_config_defaults_and_layer_shapes_are_transformers_own(tmp_path):
    """A Gemma 2 config.json without head_dim and tie_word_embeddings: Gemma2Config's defaults
    (head_dim 256, tied embeddings) decide, not hidden / heads (= 288); its layer has four
    RMSNorms. Qwen2's q/k/v carry biases, o does not; Qwen3 has q_norm and k_norm."""
    d = {
        "model_type": "gemma2",
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
    }
    (tmp_path / "config.json").write_text(json.dumps(d))
    p = plan(PlanInput(str(tmp_path), bits=16, max_model_len=4096))
    a = p.architecture
    assert (a["head_dim"], a["tie_word_embeddings"], a["layer_norms"]) == (256, True, 4)
    q, kv = 8 * 256, 4 * 256  # 2048 query and 1024 K/V features, hidden 2304
    layer = (2304 * (q + 2 * kv) + q * 2304 + 3 * 2304 * 9216 + 4 * 2304) * 2
    assert p.checkpoint_bytes["decoder_layers"] == 26 * layer
    assert p.checkpoint_bytes["lm_head"] == 0  # tied
    assert p.kv_bytes_per_token_per_gpu == 2 * 26 * 4 * 256 * 2

    qwen2 = Architecture.from_config({**PRESETS["llama-3.1-8b"], "model_type": "qwen2"})
    assert {lin.name: lin.bias for lin in qwen2.linears if lin.group < 2} == {
        "self_attn.q_proj": True,
        "self_attn.k_proj": True,
        "self_attn.v_proj": True,
        "self_attn.o_proj": False,
    }
    assert (qwen2.qkv_bias, qwen2.o_bias) == (True, False)
    qwen3 = Architecture.from_config({**PRESETS["llama-3.1-8b"], "model_type": "qwen3"})
    assert qwen3.head_norms == 2 and qwen3.layer_16bit_elements == 2 * 4096 + 2 * 128


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"model_type": "no-such-type"},
            "model_type 'no-such-type' is not a model type transformers",
        ),
        ({"hidden_size": "x"}, "transformers' llama config refuses it: "),
        ({"hidden_act": "no-such-act"}, "transformers cannot build its llama layer: KeyError"),
    ],
)
def test_configs_transformers_refuses_are_one_line(tmp_path, over, message):
    with pytest.raises(PlanError) as e:
        plan(PlanInput(str(write_config(tmp_path, **over))))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_input_groups_are_the_layers_vllm_fuses(arch):
    """The planner counts one g_idx per fused vLLM layer; the layers it takes as fused (the
    quantizer's shared-input groups of two or more linears) are the ones vLLM's model class
    fuses (its packed_modules_mapping), for every supported architecture."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM
    from vllm.model_executor.models import ModelRegistry

    config = ARCHITECTURES[arch](VOCAB)
    a = Architecture.from_config(config.to_dict(), arch)
    fused = sorted(
        [lin.name.rpartition(".")[2] for lin in a.linears if lin.group == g]
        for g in {lin.group for lin in a.linears}
        if sum(lin.group == g for lin in a.linears) > 1
    )
    hf_class = AutoModelForCausalLM._model_mapping[type(config)].__name__
    vllm_class = ModelRegistry._try_load_model_cls(hf_class)
    assert fused == sorted(vllm_class.packed_modules_mapping.values())


def test_engine_parts_import_no_engine_and_the_contract_no_planner():
    code = (
        "import sys, leanquant_serve.format\n"
        "assert 'leanquant_serve.plan' not in sys.modules\n"
        "import leanquant_serve.vllm.plan, leanquant_serve.exllamav2.plan\n"
        "engines = [m for m in ('vllm', 'exllamav2') if m in sys.modules]\n"
        "assert not engines, engines\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------------------- errors, CLI


def write_config(tmp_path: Path, **over) -> Path:
    d = {**PRESETS["llama-3.1-8b"], **over}
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(model="llama-3.1-405b", gpus=3),
            "tensor parallel size 3 does not divide the 128 attention heads",
        ),
        (
            dict(model="llama-3.1-8b", gpus=8, group_size=512),
            "mlp.down_proj: group size 512 does not divide the 1792 input features per rank",
        ),
        (dict(model="llama-3.1-8b", gpus=8, tp=3), "--tp 3 does not divide --gpus 8"),
        (
            dict(model="llama-3.1-8b", max_model_len=200_000),
            "exceeds the model's max_position_embeddings 131072",
        ),
        (dict(model="llama-3.1-8b", bits=5), "--bits 5"),
        (dict(model="llama-3.1-8b", grid="nonuniform", group_size=128), "needs -1"),
        (
            dict(model="llama-3.1-8b", group_size=100),
            "self_attn.q_proj: group size 100 does not divide its 4096 inputs: plan with "
            "--group-size 128 (or -1, one group per row), or --bits 16 for the unquantized model",
        ),
        (dict(model="llama-3.1-8b", kv_dtype="q4"), "--kv-dtype 'q4'"),
        (dict(model="llama-3.1-8b", gpu_memory_utilization=1.5), "must be in (0, 1]"),
        (dict(model="llama-3.1-405b", engine="exllamav2", gpus=8, tp=8), "EXL2 exports"),
        (
            dict(model="llama-3.1-405b", engine="exllamav2", bits=3),
            "4 bits with an affine grid only",
        ),
        (dict(model="llama-3.1-405b", engine="exllamav2", group_size=16), "power of two >= 32"),
        (dict(model="no-such-model"), "neither a preset"),
    ],
)
def test_bad_inputs_are_refused_with_the_reason(kw, message):
    with pytest.raises(PlanError) as e:
        plan(PlanInput(**kw))
    assert message in str(e.value)


SMALL = dict(
    hidden_size=96, intermediate_size=192, num_attention_heads=3, num_key_value_heads=1,
    head_dim=32, num_hidden_layers=2, vocab_size=256, max_position_embeddings=2048,
    rope_scaling=None,
)  # fmt: skip


def test_max_model_len_default_is_capped_at_the_model(tmp_path, capsys):
    """New-user finding L2: without --max-model-len the plan takes 8192 capped at the model's
    max_position_embeddings, and says so; a length given beyond it is still refused."""
    folder = write_config(tmp_path, **SMALL)
    p = plan(PlanInput(str(folder), bits=16))
    assert p.max_model_len == 2048 and p.required_tokens == 2048
    assert p.assumptions[0] == (
        "max_model_len 2048: --max-model-len not given, the model's max_position_embeddings "
        "(the default 8192 capped at it)"
    )
    assert main(["plan", str(folder), "--bits", "16"]) == 0
    assert "--max-model-len 2048 " in capsys.readouterr().out
    big = plan(PlanInput("llama-3.1-8b"))
    assert big.max_model_len == 8192
    assert big.assumptions[0] == "max_model_len 8192: --max-model-len not given, the default 8192"
    given = plan(PlanInput("llama-3.1-8b", max_model_len=4096))
    assert not given.assumptions[0].startswith("max_model_len")
    with pytest.raises(PlanError, match="--max-model-len 4096 exceeds the model's max_position"):
        plan(PlanInput(str(folder), bits=16, max_model_len=4096))


def test_group_size_that_does_not_divide_names_the_flags(tmp_path, capsys):
    """New-user finding L2: an unquantized folder of hidden 96 at the default group 128 is one
    line naming --group-size (a size that divides) and --bits 16, no contract tensor names."""
    folder = write_config(tmp_path, **SMALL)
    assert main(["plan", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "leanquant: error: self_attn.q_proj: group size 128 does not divide its 96 inputs: "
        "plan with --group-size 32 (or -1, one group per row), or --bits 16 for the "
        "unquantized model"
    )
    assert plan(PlanInput(str(folder), group_size=32)).quantization["group_size"] == 32


@pytest.mark.parametrize("symmetric, group", [(False, 32), (True, -1)])
def test_compressed_tensors_export_is_planned_with_its_own_settings(tmp_path, symmetric, group):
    """New-user finding L2: plan reads a compressed-tensors export's quantization_config (as the
    exporter writes it): its bits, group size and ignore list, not the quantizer's defaults."""
    from leanquant_serve.compressed_tensors.export import quantization_config

    q = quantization_config(8, symmetric, group, None, ["lm_head", "model.layers.1.mlp.down_proj"])
    folder = write_config(tmp_path, **SMALL, quantization_config=q)
    p = plan(PlanInput(str(folder)))
    assert (p.quantization["bits"], p.quantization["group_size"]) == (8, group)
    assert p.quantization["modules_to_not_convert"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    assert "a compressed-tensors export" in p.assumptions[0]
    same = LeanQuantConfig(
        bits=8, group_size=group, grid="affine", desc_act=False, static_groups=False,
        modules_to_not_convert=["lm_head", "model.layers.1.mlp.down_proj"],
    )  # fmt: skip
    (tmp_path / "lq").mkdir()
    lq = write_config(tmp_path / "lq", **SMALL, quantization_config=same.to_dict())
    assert p.checkpoint_bytes == plan(PlanInput(str(lq))).checkpoint_bytes
    assert plan(PlanInput(str(folder), bits=4)).quantization["bits"] == 4  # flags still win


def test_kv_heads_that_tp_cannot_split(tmp_path):
    folder = write_config(
        tmp_path,
        num_attention_heads=12,
        num_key_value_heads=6,
        head_dim=128,
        hidden_size=1536,
        intermediate_size=4096,
    )
    with pytest.raises(PlanError, match="tensor parallel size 4 and 6 KV heads"):
        plan(PlanInput(str(folder), gpus=4))
    with pytest.raises(PlanError, match="model_type 'gpt2' is not supported"):
        plan(PlanInput(str(write_config(tmp_path, model_type="gpt2"))))  # MoE now is


def test_cli_prints_table_json_and_errors(capsys):
    argv = [
        "plan",
        "llama-3.1-405b",
        "--gpus",
        "8",
        "--gpu-mem",
        "48",
        "--max-model-len",
        "16384",
        "--concurrency",
        "8",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "27.14 GB (25.28 GiB)" in out and "64,512 B (fp16)" in out and "YES" in out
    assert "assumptions:" in out and "ESTIMATE" in out
    assert main([*argv, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["weight_bytes_per_gpu"] == 27_142_455_296 and d["fits"] is True
    with pytest.raises(SystemExit) as e:
        main([*argv, "--bits", "16", "--check"])
    assert e.value.code == 1 and "NO" in capsys.readouterr().out
    assert main(["plan", "llama-3.1-405b", "--gpus", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanquant: error: tensor parallel size 3") and "Traceback" not in err


# --------------------------------------------- checkpoint bytes against real checkpoints


@pytest.mark.parametrize("arch", SUPPORTED)
def test_checkpoint_bytes_equal_what_the_quantizer_writes(arch, tiny_model, tmp_path):
    """RTN-quantize a tiny model of every supported architecture (one linear kind left 16-bit)
    and compare the planned checkpoint bytes with the tensors actually stored."""
    out = tmp_path / "ckpt"
    s = GPTQSettings(bits=4, group_size=32, fit="minmax", actorder=False, static_groups=False)
    quantize_model(
        QuantizeJob(
            model=tiny_model(arch),
            out=out,
            settings=s,
            rtn=True,
            skip=(r"mlp\.down_proj",),
        )
    )
    stored = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():  # noqa: SIM118  (safe_open has no __iter__)
                t = st.get_slice(name)
                stored += math.prod(t.get_shape()) * _DTYPE_BYTES[t.get_dtype()]
    p = plan(PlanInput(str(out), max_model_len=64))
    assert p.quantization["group_size"] == 32  # read from the checkpoint
    assert p.checkpoint_bytes["total"] == stored


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}


# -------------------------------------- per-rank bytes against vLLM's own tensor-parallel layers

TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_hidden_layers=2,
    vocab_size=320,
    max_position_embeddings=256,
)
RANK_CONFIGS = {
    "aff4-g32-static": LeanQuantConfig(bits=4, group_size=32, desc_act=True, static_groups=True),
    "aff4-g32-g_idx": LeanQuantConfig(bits=4, group_size=32, desc_act=True),
    "aff8-per-channel": LeanQuantConfig(bits=8, group_size=-1),
    "aff3-g32": LeanQuantConfig(bits=3, group_size=32),
    "nu4": LeanQuantConfig(bits=4, grid="nonuniform"),
}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("name", list(RANK_CONFIGS))
def test_weights_per_gpu_equal_the_parameters_vllm_builds(name, world, tmp_path):
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    from leanquant_serve.vllm.config import LeanQuantVLLMConfig

    cfg = RANK_CONFIGS[name]
    h, i, heads, kv, hd = 128, 256, 4, 2, 32
    per_rank = set()
    for rank in range(world):
        with vllm_tensor_parallel_rank(rank, world):
            qc = LeanQuantVLLMConfig.from_config(cfg.to_dict())
            qc.packed_modules_mapping = {
                "qkv_proj": ["q_proj", "k_proj", "v_proj"],
                "gate_up_proj": ["gate_proj", "up_proj"],
            }
            kw = dict(bias=False, params_dtype=torch.float16, quant_config=qc)
            pre = "model.layers.0."
            layers = [
                QKVParallelLinear(h, hd, heads, kv, prefix=pre + "self_attn.qkv_proj", **kw),
                RowParallelLinear(heads * hd, h, prefix=pre + "self_attn.o_proj", **kw),
                MergedColumnParallelLinear(h, [i, i], prefix=pre + "mlp.gate_up_proj", **kw),
                RowParallelLinear(i, h, prefix=pre + "mlp.down_proj", **kw),
            ]
            per_rank.add(sum(t.numel() * t.element_size() for m in layers for t in m.parameters()))
    assert len(per_rank) == 1  # every rank holds the same bytes
    linears = per_rank.pop()
    cfg_d = {**PRESETS["llama-3.1-8b"], **TINY, "quantization_config": cfg.to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(cfg_d))
    p = plan(PlanInput(str(tmp_path), gpus=world, gpu_mem_gib=1, max_model_len=64))
    vocab_rows = 320 // world  # 320 is already a multiple of 64
    expected = 2 * (linears + 2 * h * 2) + 2 * vocab_rows * h * 2 + h * 2
    assert p.weight_bytes_per_gpu == expected
