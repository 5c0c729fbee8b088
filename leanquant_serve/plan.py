"""``leanquant plan``: will a LeanQuant checkpoint of this model serve on these GPUs?

Everything here is arithmetic on the model's architecture; nothing is loaded or measured.

**Weights** are counted tensor by tensor from the checkpoint contract
(:func:`leanquant_serve.format.linear_specs`): per quantized linear ``qweight`` int32
(in·b/32, out), ``scales`` fp16 (G, out), ``zero_points`` int32 (G, out·b/32) (affine), ``g_idx``
int32 (in,) (act-order with dynamic groups only) or ``lut`` fp16 (out, 2^b) (non-uniform).
Embeddings, ``lm_head``, norms, biases and linears listed in ``modules_to_not_convert`` are
16-bit (2 bytes an element). ``--bits 16`` plans the unquantized 16-bit model.

**vLLM** (``--engine vllm``) shards as its Llama-family model code does: column-parallel
q/k/v/gate/up split their outputs over the tensor-parallel ranks, row-parallel o/down split
their inputs (so each rank stores the groups of its slice of the input), the embedding and
``lm_head`` are vocab-parallel (vocabulary padded to a multiple of 64, then split), norms and
row-parallel biases are replicated, and when there are fewer KV heads than ranks each rank
holds one whole KV head (replicated ``tp / kv_heads`` times). Per-channel and act-order
(``g_idx``) layers keep every group's scales and zeros on every rank, and the fused
``qkv_proj`` / ``gate_up_proj`` hold one ``g_idx`` (as ``leanquant_serve.vllm.linear`` builds
them; ``tests/test_plan.py`` compares with vLLM's layers rank by rank). GPUs beyond the
tensor-parallel size form pipeline stages (``--pipeline-parallel-size gpus/tp``), with layers split as
``vllm.distributed.utils.get_pp_indices`` does; the embedding lives on the first stage and
``lm_head`` + final norm on the last. Memory, per GPU, as vLLM 0.32's worker computes it
(``gpu_worker.determine_available_memory``)::

    budget   = ceil(gpu_mem · gpu_memory_utilization)
    kv bytes = budget − weights − reserve
    blocks   = kv bytes // (block_size · KV bytes per token)   (block_size 16, vLLM's default)
    capacity = blocks · block_size tokens  (the smallest over pipeline stages)
    KV bytes per token = 2 (K and V) · layers on this GPU · KV heads on this GPU · head_dim · dtype bytes

and ``max_model_len × concurrency`` fits when ``blocks ≥ concurrency · ceil(max_model_len /
block_size)`` (every sequence at full length at once: the worst case; vLLM only *requires*
one full-length sequence to fit and preempts beyond that).

The **reserve** is an estimate, not a measurement (no GPU was used to write this module); it
stands for what vLLM's profile run finds inside the budget besides the weights:

- activations of one profile forward: ``max_num_batched_tokens × 2 B × (4·hidden +
  2·(q + k + v widths per rank) + 3·intermediate per rank)`` (hidden/residual buffers, the
  fused QKV and gate/up outputs, the activation);
- sampler: ``max_num_seqs × vocab × 4 B × 4`` (fp32 logits and working copies);
- CUDA graphs: 1 GiB (vLLM 0.32 subtracts its CUDA-graph estimate from the KV budget by
  default; 0 with ``--enforce-eager``);
- other non-torch growth (cuBLAS/attention workspaces) and allocator fragmentation: 1 GiB.

``--reserve-gib`` replaces the sum. The CUDA context and NCCL communicators exist before
vLLM's memory snapshot, so they are *outside* the budget: vLLM refuses to start unless the
free memory at startup covers the budget, so ``(1 − utilization) · gpu_mem`` must hold them
(assumed 1 GiB; a warning says when it does not).

**exllamav2** (``--engine exllamav2``): the layer split of the GPTQ tensors (4-bit affine)
``leanquant export exllamav2`` writes. Not modelled: EXL2 exports of ``--grid exl2``
checkpoints and exllamav2's tensor parallelism (``load_tp``), which needs them. Modelled as its ``load_autosplit`` does: modules fill GPU 0, then GPU
1, ... in order, each decoder layer with its weights and its share of the KV cache;
``lm_head`` and the final norm go after the last layer; the token embedding stays in host
RAM. Budget per GPU = ``gpu_mem − reserve`` (exllamav2 has no utilization setting): the
reserve is the CUDA context (1 GiB assumed) + scratch for a ``max_chunk_size`` = 2048-token
prefill chunk (same width formula as above, unsharded). Quantized caches (fp8, q8/q6/q4) also
keep one fp16 layer-sized K/V buffer per GPU. Capacity is rounded down to whole 256-token pages
(the dynamic generator's page size). Its GPU footprint per linear is taken to be the GPTQ
tensors' bytes (the same shapes as the LeanQuant tensors).

Nothing here accounts for speculative decoding, LoRA adapters, multimodal encoders, prefix
caching beyond the KV pool itself, or memory taken by other processes on the GPUs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leanquant_serve.format import FormatError, LeanQuantConfig, chunk_size, linear_specs
from leanquant_serve.format.tensors import (
    SHARD_GROUPS,
    SHARD_WORDS_IN,
    SHARD_WORDS_OUT,
    scales_on_every_rank,
    shard_misfits,
)

GiB = 1 << 30
ELEMENT_16BIT = 2  # bytes of an fp16/bf16 element: embeddings, lm_head, norms, biases
ENGINES = ("vllm", "exllamav2")
PLAN_BITS = (2, 3, 4, 8, 16)  # 16: the unquantized model, for comparison

# KV cache dtypes: bytes per cached element (K or V).
VLLM_KV_DTYPES = {"fp16": 2.0, "bf16": 2.0, "fp8": 1.0}
# exllamav2: ExLlamaV2Cache (fp16), ExLlamaV2Cache_8bit (fp8), ExLlamaV2Cache_Q8/Q6/Q4: codes
# (K bytes, V bytes per element) + one fp16 scale per 32 elements for each of K and V.
EXL2_KV_DTYPES = {
    "fp16": (2.0, 2.0, 0.0),
    "fp8": (1.0, 1.0, 0.0),
    "q8": (1.0, 1.0, 2 / 32),
    "q6": (1.0, 0.5, 2 / 32),
    "q4": (0.5, 0.5, 2 / 32),
}
EXL2_CACHE_CLASS = {
    "fp16": "ExLlamaV2Cache",
    "fp8": "ExLlamaV2Cache_8bit",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}

VLLM_BLOCK_SIZE = 16
VLLM_VOCAB_PADDING = 64
VLLM_CUDA_GRAPHS = 1 * GiB
VLLM_NON_TORCH = 1 * GiB
VLLM_OUTSIDE_BUDGET = 1 * GiB  # CUDA context + NCCL, before vLLM's memory snapshot
EXL2_CONTEXT = 1 * GiB
EXL2_CHUNK = 2048  # ExLlamaV2DynamicGenerator's default max_chunk_size
EXL2_PAGE = 256  # ExLlamaV2DynamicGenerator's page size

_LLAMA31 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
# The config.json of Meta's Llama 3.1 releases (the fields that matter for sizes).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        **_LLAMA31,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "llama-3.1-70b": {
        **_LLAMA31,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    "llama-3.1-405b": {
        **_LLAMA31,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
    },
}

# model_type -> (hidden-sized norms per layer, head_dim-sized norms per layer (q_norm/k_norm),
# q/k/v bias rule, o_proj bias rule, tie_word_embeddings default). A bias rule is True/False or
# the config key that decides.
_FAMILIES: dict[str, tuple[int, int, bool | str, bool | str, bool]] = {
    "llama": (2, 0, "attention_bias", "attention_bias", False),
    "mistral": (2, 0, False, False, False),
    "qwen2": (2, 0, True, False, False),
    "qwen3": (2, 2, "attention_bias", "attention_bias", False),
    "gemma2": (4, 0, "attention_bias", "attention_bias", True),
    "gemma3_text": (4, 2, "attention_bias", "attention_bias", True),
}


class PlanError(ValueError):
    """Inputs that cannot be planned (bad model, settings or parallel layout); the message says why."""


@dataclass(frozen=True)
class Architecture:
    """The sizes of a dense decoder-only transformer of the Llama family."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    layer_norms: int = 2
    head_norms: int = 0

    @classmethod
    def from_config(cls, d: Mapping[str, Any], name: str = "model") -> Architecture:
        mt = d.get("model_type")
        if mt not in _FAMILIES:
            raise PlanError(
                f"{name}: model_type {mt!r} is not supported by plan "
                f"(supported: {', '.join(sorted(_FAMILIES))}; MoE and multimodal configs are not)"
            )
        norms, head_norms, qkv_rule, o_rule, tie_default = _FAMILIES[mt]

        def need(key: str) -> int:
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise PlanError(f"{name}: config.{key} is {v!r}, not a positive integer")
            return v

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or hidden // heads

        def rule(r: bool | str) -> bool:
            return bool(d.get(r, False)) if isinstance(r, str) else r

        arch = cls(
            name=name,
            model_type=mt,
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=need("vocab_size"),
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
            qkv_bias=rule(qkv_rule),
            o_bias=rule(o_rule),
            mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False,
            layer_norms=norms,
            head_norms=head_norms,
        )
        if heads % kv_heads:
            raise PlanError(
                f"{name}: {heads} attention heads are not a multiple of {kv_heads} KV heads"
            )
        return arch


@dataclass(frozen=True)
class _Linear:
    name: str  # path inside a decoder layer, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    split: str  # "column", "kv" (column over KV heads, replicated below tp) or "row"
    bias: bool


def _layer_linears(a: Architecture) -> list[_Linear]:
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    h, i = a.hidden_size, a.intermediate_size
    return [
        _Linear("self_attn.q_proj", h, q, "column", a.qkv_bias),
        _Linear("self_attn.k_proj", h, kv, "kv", a.qkv_bias),
        _Linear("self_attn.v_proj", h, kv, "kv", a.qkv_bias),
        _Linear("self_attn.o_proj", q, h, "row", a.o_bias),
        _Linear("mlp.gate_proj", h, i, "column", a.mlp_bias),
        _Linear("mlp.up_proj", h, i, "column", a.mlp_bias),
        _Linear("mlp.down_proj", i, h, "row", a.mlp_bias),
    ]


@dataclass(frozen=True)
class PlanInput:
    """What to plan; see the module docstring for the model behind each number."""

    model: str  # preset name, config.json, or a model/checkpoint folder
    # None: the checkpoint's, else the quantizer's default (GPTQSettings: 4, 128, affine)
    bits: int | None = None
    group_size: int | None = None
    grid: str | None = None
    gpus: int = 1
    gpu_mem_gib: float = 80.0  # total memory of one GPU, GiB (as nvidia-smi / torch report it)
    max_model_len: int = 8192
    concurrency: int = 1  # sequences at once (vLLM --max-num-seqs)
    tp: int | None = None  # None: gpus (vLLM); exllamav2: 1
    kv_dtype: str = "fp16"
    gpu_memory_utilization: float = 0.9
    engine: str = "vllm"
    max_num_batched_tokens: int | None = None  # None: vLLM 0.32's default for this GPU size
    enforce_eager: bool = False
    reserve_gib: float | None = None  # None: the estimate described in the module docstring


def load_model_config(model: str) -> tuple[str, dict[str, Any]]:
    """(display name, config dict) of a preset name, a config.json or a folder holding one."""
    if model in PRESETS:
        return model, dict(PRESETS[model])
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise PlanError(
            f"{model}: neither a preset ({', '.join(PRESETS)}) nor a config.json or a folder "
            "containing one"
        )
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise PlanError(f"{p}: not a JSON object")
    return model, d


def _quant_config(inp: PlanInput, d: Mapping[str, Any]) -> tuple[LeanQuantConfig | None, int]:
    """The LeanQuant config to plan with (None: 16-bit), and its bits."""
    stored = d.get("quantization_config")
    base: dict[str, Any] = {}
    if isinstance(stored, Mapping) and stored.get("quant_method") == "leanquant":
        try:
            base = LeanQuantConfig.from_dict(stored).to_dict()
        except FormatError as e:
            raise PlanError(f"{inp.model}: {e}") from None
    # Without a checkpoint: what `leanquant quantize` writes by default (its one set of
    # defaults, GPTQSettings'); the quantizer is imported only for them.
    from quantizer.gptq import GPTQSettings

    default = GPTQSettings()
    bits = inp.bits if inp.bits is not None else base.get("bits", default.bits)
    if bits not in PLAN_BITS:
        raise PlanError(f"--bits {bits}: not one of {', '.join(map(str, PLAN_BITS))}")
    if bits == 16:
        return None, 16
    settings = {
        "bits": bits,
        "group_size": inp.group_size
        if inp.group_size is not None
        else base.get("group_size", default.group_size),
        "grid": inp.grid if inp.grid is not None else base.get("grid", default.stored_grid),
        "desc_act": base.get("desc_act", default.actorder),
        "static_groups": base.get("static_groups", default.static_groups),
        "modules_to_not_convert": base.get("modules_to_not_convert", ["lm_head"]),
    }
    try:
        return LeanQuantConfig(**settings), bits
    except FormatError as e:
        raise PlanError(str(e).replace("quantization_config.", "--").replace("_", "-")) from None


def _tensor_bytes(cfg: LeanQuantConfig, in_f: int, out_f: int, where: str) -> int:
    try:
        specs = linear_specs(cfg, in_f, out_f)
    except FormatError as e:
        raise PlanError(f"{where}: {e}") from None
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in specs.values())


def _linear_bytes(
    cfg: LeanQuantConfig | None, name: str, in_f: int, out_f: int, bias: int, in_full: int
) -> int:
    """Bytes of one (rank's shard of a) linear with an (out_f, in_f) weight and a
    ``bias``-element bias; ``in_full`` is the unsharded input size.

    A row-parallel shard (in_f < in_full) holds its slice of ``qweight`` (and ``g_idx``) and,
    normally, the groups of its input slice; per-channel and act-order (``g_idx``) layers keep
    every group's scales and zeros on every rank (as ``leanquant_serve.vllm.linear`` builds them).
    """
    if cfg is None or cfg.is_skipped(name):
        return (in_f * out_f + bias) * ELEMENT_16BIT
    if in_f == in_full or not scales_on_every_rank(cfg):
        return _tensor_bytes(cfg, in_f, out_f, name) + bias * ELEMENT_16BIT
    specs = linear_specs(cfg, in_full, out_f)  # every group; then this rank's slice of the rows
    w = 0
    for suffix, spec in specs.items():
        size = math.prod(spec.shape) * spec.dtype.itemsize
        w += size * in_f // in_full if suffix in ("qweight", "g_idx") else size
    return w + bias * ELEMENT_16BIT


def _tp_shape(a: Architecture, lin: _Linear, tp: int) -> tuple[int, int, int]:
    """(in, out, bias elements) of one rank's shard of ``lin`` at tensor-parallel size ``tp``."""
    if lin.split == "column":
        out = lin.out_features // tp
        return lin.in_features, out, out if lin.bias else 0
    if lin.split == "kv":
        out = max(1, a.num_kv_heads // tp) * a.head_dim
        return lin.in_features, out, out if lin.bias else 0
    return lin.in_features // tp, lin.out_features, lin.out_features if lin.bias else 0


def _check_tp(a: Architecture, cfg: LeanQuantConfig | None, tp: int) -> None:
    if a.num_heads % tp:
        raise PlanError(
            f"tensor parallel size {tp} does not divide the {a.num_heads} attention heads"
        )
    kv = a.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise PlanError(
            f"tensor parallel size {tp} and {kv} KV heads: one must divide the other "
            "(vLLM splits KV heads over ranks, or replicates whole heads)"
        )
    if a.intermediate_size % tp:
        raise PlanError(
            f"tensor parallel size {tp} does not divide intermediate_size={a.intermediate_size}"
        )
    padded = -(-a.vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    if padded % tp:
        raise PlanError(
            f"tensor parallel size {tp} does not divide the padded vocabulary {padded} "
            f"(vocab_size {a.vocab_size} padded to a multiple of {VLLM_VOCAB_PADDING})"
        )
    if cfg is None:
        return
    n = chunk_size(cfg.bits)
    for lin in _layer_linears(a):  # the plugin's rule (format.shard_misfits), before any GPU
        in_r, out_r, _ = _tp_shape(a, lin, tp)
        if lin.split == "row":
            problems = shard_misfits(cfg, in_r)
            if SHARD_GROUPS in problems:
                raise PlanError(
                    f"{lin.name}: group size {cfg.group_size} does not divide the {in_r} input "
                    f"features per rank ({lin.in_features} / tensor parallel size {tp}): "
                    "a rank would hold part of a group"
                )
            if SHARD_WORDS_IN in problems:
                raise PlanError(
                    f"{lin.name}: {in_r} input features per rank are not a multiple of {n}, "
                    f"so {cfg.bits}-bit words of qweight would be split over ranks"
                )
        elif SHARD_WORDS_OUT in shard_misfits(cfg, lin.in_features, [out_r]):
            raise PlanError(
                f"{lin.name}: {out_r} output features per rank are not a multiple of {n}, so "
                f"{cfg.bits}-bit words of zero_points would be split over ranks"
            )


# Parts of vLLM's fused layers (qkv_proj, gate_up_proj) that share the first part's g_idx.
_SHARES_G_IDX = ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")


def _layer_bytes(a: Architecture, cfg: LeanQuantConfig | None, layer: int, tp: int | None) -> int:
    """Bytes of decoder layer ``layer``: the whole layer (tp None) or one rank's shard."""
    total = (
        a.layer_norms * a.hidden_size * ELEMENT_16BIT + a.head_norms * a.head_dim * ELEMENT_16BIT
    )
    for lin in _layer_linears(a):
        name = f"model.layers.{layer}.{lin.name}"
        if tp is None:
            in_f, out_f, bias = (
                lin.in_features,
                lin.out_features,
                lin.out_features if lin.bias else 0,
            )
        else:
            in_f, out_f, bias = _tp_shape(a, lin, tp)
        total += _linear_bytes(cfg, name, in_f, out_f, bias, lin.in_features)
        if tp is not None and lin.name in _SHARES_G_IDX and cfg and cfg.uses_g_idx:
            if not cfg.is_skipped(name):  # vLLM's fused qkv_proj / gate_up_proj: one g_idx
                total -= in_f * 4
    return total


def _all_layer_bytes(a: Architecture, cfg: LeanQuantConfig | None, tp: int | None) -> list[int]:
    """Per-layer bytes; layers differ only where a checkpoint leaves some linears unquantized."""
    if cfg is None or not any(m.startswith("model.layers.") for m in cfg.modules_to_not_convert):
        return [_layer_bytes(a, cfg, 0, tp)] * a.num_layers
    return [_layer_bytes(a, cfg, i, tp) for i in range(a.num_layers)]


def checkpoint_bytes(a: Architecture, cfg: LeanQuantConfig | None) -> dict[str, int]:
    """Bytes of every tensor the checkpoint stores (headers and tokenizer files not included)."""
    emb = a.vocab_size * a.hidden_size * ELEMENT_16BIT
    layers = sum(_all_layer_bytes(a, cfg, None))
    head = 0 if a.tie_word_embeddings else emb
    norm = a.hidden_size * ELEMENT_16BIT
    return {
        "decoder_layers": layers,
        "embed_tokens": emb,
        "lm_head": head,
        "final_norm": norm,
        "total": layers + emb + head + norm,
    }


def _pp_partitions(layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, as vllm.distributed.utils.get_pp_indices splits them."""
    parts = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        parts[-i] += 1
    return parts


def _activation_bytes(a: Architecture, tokens: int, tp: int) -> int:
    q = a.num_heads * a.head_dim // tp
    kv = max(1, a.num_kv_heads // tp) * a.head_dim
    width = 4 * a.hidden_size + 2 * (q + 2 * kv) + 3 * (a.intermediate_size // tp)
    return tokens * ELEMENT_16BIT * width


def vllm_default_batched_tokens(gpu_mem_gib: float) -> int:
    """``vllm serve``'s default max_num_batched_tokens in 0.32 (EngineArgs, by GPU memory)."""
    if gpu_mem_gib >= 160:
        return 16384
    return 8192 if gpu_mem_gib >= 70 else 2048


@dataclass
class GPUPlan:
    """One GPU (every GPU of a pipeline stage is alike)."""

    gpu: str  # "stage 0 (ranks 0-7)" or "GPU 3"
    layers: int
    weight_bytes: int
    kv_bytes_per_token: int
    budget_bytes: int
    reserve_bytes: int
    kv_cache_bytes: int
    capacity_tokens: int


@dataclass
class Plan:
    model: str
    engine: str
    architecture: dict[str, Any]
    quantization: dict[str, Any]
    gpus: int
    tp: int
    pp: int
    gpu_mem_bytes: int
    gpu_memory_utilization: float | None
    kv_dtype: str
    max_model_len: int
    concurrency: int
    checkpoint_bytes: dict[str, int]
    per_gpu: list[GPUPlan]
    weight_bytes_per_gpu: int  # the largest over GPUs
    kv_bytes_per_token_per_gpu: int  # the largest over GPUs
    capacity_tokens: int  # KV-cache tokens the engine can hold (smallest over GPUs)
    required_tokens: int  # max_model_len × concurrency, in whole blocks/pages
    fits: bool
    fits_one_sequence: bool
    margin_tokens: int
    margin_bytes: int  # KV-cache bytes left on the tightest GPU once the needed tokens are in
    max_full_length_sequences: int
    reserve: dict[str, int]
    host_bytes: int = 0  # exllamav2: the token embedding, kept in host RAM
    engine_args: list[str] = field(default_factory=list)
    gpu_split_gib: list[float] = field(default_factory=list)  # exllamav2 only
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _validate(inp: PlanInput) -> None:
    if inp.engine not in ENGINES:
        raise PlanError(f"--engine {inp.engine!r}: not one of {', '.join(ENGINES)}")
    for name, v in (
        ("gpus", inp.gpus),
        ("max-model-len", inp.max_model_len),
        ("concurrency", inp.concurrency),
    ):
        if not isinstance(v, int) or v < 1:
            raise PlanError(f"--{name} {v!r}: must be a positive integer")
    if not inp.gpu_mem_gib > 0:
        raise PlanError(f"--gpu-mem {inp.gpu_mem_gib!r}: must be a positive number of GiB")
    if not 0 < inp.gpu_memory_utilization <= 1:
        raise PlanError(
            f"--gpu-memory-utilization {inp.gpu_memory_utilization!r}: must be in (0, 1]"
        )
    if inp.reserve_gib is not None and inp.reserve_gib < 0:
        raise PlanError(f"--reserve-gib {inp.reserve_gib!r}: must be >= 0")
    if inp.max_num_batched_tokens is not None and inp.max_num_batched_tokens < 1:
        raise PlanError(f"--max-num-batched-tokens {inp.max_num_batched_tokens!r}: must be >= 1")
    kv = VLLM_KV_DTYPES if inp.engine == "vllm" else EXL2_KV_DTYPES
    if inp.kv_dtype not in kv:
        raise PlanError(
            f"--kv-dtype {inp.kv_dtype!r}: not one of {', '.join(kv)} for engine {inp.engine}"
        )


def plan(inp: PlanInput) -> Plan:
    """Plan serving ``inp.model``; raises :class:`PlanError` for inputs that cannot be served."""
    _validate(inp)
    name, d = load_model_config(inp.model)
    a = Architecture.from_config(d, name)
    cfg, bits = _quant_config(inp, d)
    if inp.max_model_len > a.max_position_embeddings:
        raise PlanError(
            f"--max-model-len {inp.max_model_len} exceeds the model's max_position_embeddings "
            f"{a.max_position_embeddings} (vLLM refuses it)"
        )
    if cfg is not None:  # the unsharded checkpoint must exist first
        for lin in _layer_linears(a):
            _tensor_bytes(cfg, lin.in_features, lin.out_features, lin.name)
    quant = (
        {"bits": 16, "note": "unquantized 16-bit weights"}
        if cfg is None
        else {
            "bits": bits,
            "group_size": cfg.group_size,
            "grid": cfg.grid,
            "uses_g_idx": cfg.uses_g_idx,
            "modules_to_not_convert": list(cfg.modules_to_not_convert),
        }
    )
    common = {
        "model": name,
        "architecture": asdict(a),
        "quantization": quant,
        "gpus": inp.gpus,
        "gpu_mem_bytes": int(inp.gpu_mem_gib * GiB),
        "kv_dtype": inp.kv_dtype,
        "max_model_len": inp.max_model_len,
        "concurrency": inp.concurrency,
        "checkpoint_bytes": checkpoint_bytes(a, cfg),
    }
    if inp.engine == "vllm":
        return _plan_vllm(inp, a, cfg, common)
    return _plan_exllamav2(inp, a, cfg, common)


def _plan_vllm(
    inp: PlanInput, a: Architecture, cfg: LeanQuantConfig | None, common: dict[str, Any]
) -> Plan:
    tp = inp.tp if inp.tp is not None else inp.gpus
    if tp < 1 or inp.gpus % tp:
        raise PlanError(
            f"--tp {tp} does not divide --gpus {inp.gpus} (GPUs = tensor parallel × pipeline stages)"
        )
    pp = inp.gpus // tp
    if pp > a.num_layers:
        raise PlanError(f"{pp} pipeline stages for {a.num_layers} layers")
    _check_tp(a, cfg, tp)
    kv_elem = VLLM_KV_DTYPES[inp.kv_dtype]
    kv_heads_rank = max(1, a.num_kv_heads // tp)
    batched = inp.max_num_batched_tokens or vllm_default_batched_tokens(inp.gpu_mem_gib)
    mem = common["gpu_mem_bytes"]
    budget = math.ceil(mem * inp.gpu_memory_utilization)
    if inp.reserve_gib is not None:
        reserve = {"stated (--reserve-gib)": int(inp.reserve_gib * GiB)}
    else:
        reserve = {
            "activations": _activation_bytes(a, batched, tp),
            "sampler": inp.concurrency * a.vocab_size * 4 * 4,
            "cuda_graphs": 0 if inp.enforce_eager else VLLM_CUDA_GRAPHS,
            "non_torch_and_fragmentation": VLLM_NON_TORCH,
        }
    reserve_total = sum(reserve.values())

    layer_bytes = _all_layer_bytes(a, cfg, tp)
    vocab_rank = -(-a.vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING // tp
    emb_rank = vocab_rank * a.hidden_size * ELEMENT_16BIT
    parts = _pp_partitions(a.num_layers, pp)
    block_tokens = VLLM_BLOCK_SIZE
    per_gpu: list[GPUPlan] = []
    start = 0
    for s, n in enumerate(parts):
        w = sum(layer_bytes[start : start + n])
        start += n
        if s == 0:
            w += emb_rank
        if s == pp - 1:
            w += a.hidden_size * ELEMENT_16BIT  # final norm
            if not (a.tie_word_embeddings and pp == 1):
                w += emb_rank  # lm_head (a tied one is a second copy on the last stage)
        kv_tok = int(2 * n * kv_heads_rank * a.head_dim * kv_elem)
        kv_bytes = budget - w - reserve_total
        blocks = max(0, kv_bytes) // (block_tokens * kv_tok)
        ranks = f"ranks {s * tp}-{s * tp + tp - 1}" if tp > 1 else f"rank {s}"
        per_gpu.append(
            GPUPlan(
                gpu=f"stage {s} ({ranks})" if pp > 1 else f"each of {tp} ({ranks})",
                layers=n,
                weight_bytes=w,
                kv_bytes_per_token=kv_tok,
                budget_bytes=budget,
                reserve_bytes=reserve_total,
                kv_cache_bytes=kv_bytes,
                capacity_tokens=blocks * block_tokens,
            )
        )
    capacity = min(g.capacity_tokens for g in per_gpu)
    seq_blocks = -(-inp.max_model_len // block_tokens)
    required = inp.concurrency * seq_blocks * block_tokens

    args = [
        "--tensor-parallel-size",
        str(tp),
        *(["--pipeline-parallel-size", str(pp)] if pp > 1 else []),
        "--max-model-len",
        str(inp.max_model_len),
        "--max-num-seqs",
        str(inp.concurrency),
        "--max-num-batched-tokens",
        str(batched),
        "--gpu-memory-utilization",
        f"{inp.gpu_memory_utilization:g}",
        "--dtype",
        "float16",
        *(["--kv-cache-dtype", "fp8"] if inp.kv_dtype == "fp8" else []),
        *(["--enforce-eager"] if inp.enforce_eager else []),
    ]
    assumptions = [
        f"weights: LeanQuant tensors as stored, sharded as vLLM shards them (tp={tp}, pp={pp}); "
        "embeddings, lm_head, norms and biases 16-bit",
        f"KV heads per GPU: {kv_heads_rank} of {a.num_kv_heads}"
        + (f" (each replicated on {tp // a.num_kv_heads} ranks)" if a.num_kv_heads < tp else ""),
        f"budget = ceil({inp.gpu_mem_gib:g} GiB × gpu_memory_utilization {inp.gpu_memory_utilization:g})",
        "reserve inside the budget is an ESTIMATE, not a measurement: "
        + (
            f"{inp.reserve_gib:g} GiB as given by --reserve-gib"
            if inp.reserve_gib is not None
            else f"activations of a {batched}-token profile forward "
            "(tokens × 2 B × (4·hidden + 2·qkv width per rank + 3·intermediate per rank)), "
            f"sampler {inp.concurrency} seqs × vocab × 16 B, "
            + ("no CUDA graphs (--enforce-eager), " if inp.enforce_eager else "CUDA graphs 1 GiB, ")
            + "non-torch workspaces + fragmentation 1 GiB"
        ),
        f"KV cache in blocks of {block_tokens} tokens; fits = every one of {inp.concurrency} "
        f"sequences at max_model_len {inp.max_model_len} at once (worst case)",
        "CUDA context + NCCL (~1 GiB assumed) sit outside the budget, in the "
        f"(1 − {inp.gpu_memory_utilization:g}) share",
        "no speculative decoding, LoRA, or other processes on the GPUs",
    ]
    warnings = []
    if (1 - inp.gpu_memory_utilization) * mem < VLLM_OUTSIDE_BUDGET:
        warnings.append(
            f"(1 − gpu_memory_utilization) × gpu_mem = "
            f"{(1 - inp.gpu_memory_utilization) * mem / GiB:.2f} GiB may not hold the CUDA "
            "context and NCCL buffers (~1 GiB): vLLM refuses to start when free memory is below "
            "the budget"
        )
    if cfg is not None and cfg.grid == "nonuniform":
        warnings.append("non-uniform (LUT) layers run this project's Triton kernel on GPUs")
    return Plan(
        engine="vllm",
        tp=tp,
        pp=pp,
        gpu_memory_utilization=inp.gpu_memory_utilization,
        per_gpu=per_gpu,
        weight_bytes_per_gpu=max(g.weight_bytes for g in per_gpu),
        kv_bytes_per_token_per_gpu=max(g.kv_bytes_per_token for g in per_gpu),
        capacity_tokens=capacity,
        required_tokens=required,
        fits=capacity >= required,
        fits_one_sequence=capacity >= seq_blocks * block_tokens,
        margin_tokens=capacity - required,
        margin_bytes=min(g.kv_cache_bytes - required * g.kv_bytes_per_token for g in per_gpu),
        max_full_length_sequences=capacity // (seq_blocks * block_tokens),
        reserve=reserve,
        engine_args=args,
        assumptions=assumptions,
        warnings=warnings,
        **common,
    )


def _plan_exllamav2(
    inp: PlanInput, a: Architecture, cfg: LeanQuantConfig | None, common: dict[str, Any]
) -> Plan:
    if inp.tp not in (None, 1):
        raise PlanError(
            "--engine exllamav2 models the layer split (gpu_split) of GPTQ exports; "
            "exllamav2's tensor parallelism (EXL2 exports of --grid exl2 checkpoints) is not "
            "modelled; leave --tp out"
        )
    if cfg is None or cfg.bits != 4 or cfg.grid != "affine":
        raise PlanError(
            "--engine exllamav2 models GPTQ exports: 4 bits with an affine grid only "
            f"(got {'16-bit' if cfg is None else f'{cfg.bits}-bit {cfg.grid}'})"
        )
    g = cfg.group_size
    if g != -1 and (g < 32 or g & (g - 1)):
        raise PlanError(f"--group-size {g}: exllamav2 needs a power of two >= 32 (or -1)")
    k_b, v_b, scale_b = EXL2_KV_DTYPES[inp.kv_dtype]
    kv_layer = a.num_kv_heads * a.head_dim * (k_b + v_b + 2 * scale_b)  # B per token per layer
    temp_per_token = 0 if inp.kv_dtype == "fp16" else 2 * a.num_kv_heads * a.head_dim * 2
    mem = common["gpu_mem_bytes"]
    scratch = _activation_bytes(a, EXL2_CHUNK, 1)
    if inp.reserve_gib is not None:
        reserve = {"stated (--reserve-gib)": int(inp.reserve_gib * GiB)}
    else:
        reserve = {"cuda_context": EXL2_CONTEXT, "scratch": scratch}
    reserve_total = sum(reserve.values())
    budget = mem - reserve_total
    layer_bytes = _all_layer_bytes(a, cfg, None)
    head = a.vocab_size * a.hidden_size * ELEMENT_16BIT + a.hidden_size * ELEMENT_16BIT
    modules = [(w, True) for w in layer_bytes] + [(head, False)]

    def fill(cap: int) -> list[tuple[int, int]] | None:
        """Weights-only greedy fill in module order, at most ``cap`` bytes per GPU (as
        exllamav2 fills each gpu_split allocation): (layers, weight bytes) per GPU, or None."""
        layers, weights, dev = [0] * inp.gpus, [0] * inp.gpus, 0
        for w, is_layer in modules:
            while dev < inp.gpus and weights[dev] + w > cap:
                dev += 1
            if dev == inp.gpus:
                return None
            layers[dev] += is_layer
            weights[dev] += w
        return list(zip(layers, weights, strict=True))

    # Even split: the smallest per-GPU cap at which the modules fill the GPUs in order.
    lo, hi = max(w for w, _ in modules), sum(w for w, _ in modules)
    while lo < hi:
        mid = (lo + hi) // 2
        if fill(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    layout = fill(lo)
    assert layout is not None
    per_gpu: list[GPUPlan] = []
    for i, (n, w) in enumerate(layout):
        kv_tok = int(n * kv_layer)
        per_token = kv_tok + (temp_per_token if n else 0)
        free = budget - w
        cap = max(0, free) // per_token if per_token else (None if free >= 0 else 0)
        per_gpu.append(
            GPUPlan(
                gpu=f"GPU {i}",
                layers=n,
                weight_bytes=w,
                kv_bytes_per_token=kv_tok,
                budget_bytes=budget,
                reserve_bytes=reserve_total,
                kv_cache_bytes=free,
                capacity_tokens=-1 if cap is None else cap // EXL2_PAGE * EXL2_PAGE,
            )
        )
    capacity = min(g.capacity_tokens for g in per_gpu if g.capacity_tokens >= 0)
    seq_pages = -(-inp.max_model_len // EXL2_PAGE)
    required = inp.concurrency * seq_pages * EXL2_PAGE
    # gpu_split: GiB per GPU for weights plus the scratch exllamav2 counts in each allocation.
    split = [
        math.ceil((g.weight_bytes + scratch) / GiB * 4 + 1) / 4 if g.weight_bytes else 0.0
        for g in per_gpu
    ]
    worst = max(per_gpu, key=lambda g: g.kv_bytes_per_token)
    assumptions = [
        "exllamav2 layer split (no tensor parallelism), even: decoder layers fill GPU 0, "
        "GPU 1, ... in order, lm_head + final norm after the last layer; each layer's KV cache "
        "on its GPU",
        "token embedding in host RAM (exllamav2's default), not on a GPU",
        "GPU footprint of a linear = the GPTQ tensors leanquant export exllamav2 writes "
        "(qweight, qzeros, scales, g_idx if any), the same bytes as the LeanQuant tensors",
        "reserve per GPU is an ESTIMATE, not a measurement: "
        + (
            f"{inp.reserve_gib:g} GiB as given by --reserve-gib"
            if inp.reserve_gib is not None
            else f"CUDA context 1 GiB + scratch for a {EXL2_CHUNK}-token prefill chunk "
            "(tokens × 2 B × (4·hidden + 2·qkv width + 3·intermediate))"
        ),
        f"KV cache {EXL2_CACHE_CLASS[inp.kv_dtype]}"
        + ("" if inp.kv_dtype == "fp16" else " (+ one fp16 layer-sized K/V buffer per GPU)")
        + f", in pages of {EXL2_PAGE} tokens; capacity = the smallest over GPUs",
        "gpu_split (GiB): weights + scratch + 0.25, rounded up to 0.25; exllamav2 fills each "
        "allocation greedily, so with small layers its split may differ slightly",
        "--gpu-memory-utilization does not apply to exllamav2",
    ]
    return Plan(
        engine="exllamav2",
        tp=1,
        pp=inp.gpus,
        gpu_memory_utilization=None,
        per_gpu=per_gpu,
        weight_bytes_per_gpu=max(g.weight_bytes for g in per_gpu),
        kv_bytes_per_token_per_gpu=worst.kv_bytes_per_token,
        capacity_tokens=capacity,
        required_tokens=required,
        fits=capacity >= required,
        fits_one_sequence=capacity >= seq_pages * EXL2_PAGE,
        margin_tokens=capacity - required,
        margin_bytes=min(
            g.kv_cache_bytes
            - required * (g.kv_bytes_per_token + (temp_per_token if g.layers else 0))
            for g in per_gpu
        ),
        max_full_length_sequences=capacity // (seq_pages * EXL2_PAGE),
        reserve=reserve,
        host_bytes=a.vocab_size * a.hidden_size * ELEMENT_16BIT,
        gpu_split_gib=split,
        assumptions=assumptions,
        warnings=[],
        **common,
    )


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB ({n / GiB:,.2f} GiB)"


def format_plan(p: Plan) -> str:
    """The human-readable report ``leanquant plan`` prints."""
    a, q = p.architecture, p.quantization
    quant = (
        "16-bit (unquantized)"
        if q["bits"] == 16
        else f"{q['bits']}-bit {q['grid']}, group size {q['group_size']}"
    )
    layout = (
        f"{p.gpus} GPU(s): tensor parallel {p.tp}" + (f" × pipeline {p.pp}" if p.pp > 1 else "")
        if p.engine == "vllm"
        else f"{p.gpus} GPU(s): layer split"
    )
    rows = [
        (
            "model",
            f"{p.model} ({a['model_type']}: {a['num_layers']} layers, hidden "
            f"{a['hidden_size']}, intermediate {a['intermediate_size']}, {a['num_heads']} "
            f"heads, {a['num_kv_heads']} KV heads × {a['head_dim']}, vocab {a['vocab_size']})",
        ),
        ("weights", quant),
        ("engine", f"{p.engine}, {layout}, {p.gpu_mem_bytes / GiB:g} GiB each"),
        ("checkpoint tensors", _gb(p.checkpoint_bytes["total"])),
        (
            "weights per GPU",
            _gb(p.weight_bytes_per_gpu)
            + (f" (+ {_gb(p.host_bytes)} embedding in host RAM)" if p.host_bytes else ""),
        ),
        ("KV cache per token per GPU", f"{p.kv_bytes_per_token_per_gpu:,} B ({p.kv_dtype})"),
        (
            "reserve per GPU (estimate)",
            _gb(sum(p.reserve.values()))
            + " = "
            + " + ".join(f"{k} {v / GiB:.2f}" for k, v in p.reserve.items())
            + " GiB",
        ),
    ]
    if p.gpu_memory_utilization is not None:
        rows.append(
            (
                "budget per GPU",
                f"{_gb(p.per_gpu[0].budget_bytes)} "
                f"(gpu_memory_utilization {p.gpu_memory_utilization:g})",
            )
        )
    worst = min((g for g in p.per_gpu if g.capacity_tokens >= 0), key=lambda g: g.capacity_tokens)
    kv_row = _gb(worst.kv_cache_bytes)
    if worst.kv_cache_bytes < 0:
        kv_row = f"none: weights + reserve exceed the budget by {_gb(-worst.kv_cache_bytes)}"
    unit = "blocks" if p.engine == "vllm" else "pages"
    rows += [
        ("KV cache per GPU", kv_row),
        ("KV capacity", f"{p.capacity_tokens:,} tokens"),
        (
            "needed",
            f"{p.required_tokens:,} tokens = {p.concurrency} × max_model_len "
            f"{p.max_model_len} (in whole {unit})",
        ),
        (
            "fits",
            ("YES" if p.fits else "NO")
            + f", margin {p.margin_tokens:+,} tokens ({p.margin_bytes / GiB:+,.2f} GiB on the "
            f"tightest GPU); {p.max_full_length_sequences} full-length sequence(s) fit at once"
            + ("" if p.fits_one_sequence else "; not even ONE full-length sequence fits"),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    if len(p.per_gpu) > 1 and (p.pp > 1):
        out.append("")
        out.append("per GPU: layers, weights, KV B/token, KV capacity")
        for g in p.per_gpu:
            out.append(
                f"  {g.gpu}: {g.layers} layers, {_gb(g.weight_bytes)}, "
                f"{g.kv_bytes_per_token:,} B/token, "
                + (f"{g.capacity_tokens:,} tokens" if g.capacity_tokens >= 0 else "no KV cache")
            )
    if p.engine_args:
        out += ["", "vllm serve CHECKPOINT " + " ".join(p.engine_args)]
    if p.gpu_split_gib:
        out += [
            "",
            f"model.load(gpu_split={p.gpu_split_gib})  # GiB per GPU (weights + scratch)",
        ]
    out += ["", "assumptions:"] + [f"  - {s}" for s in p.assumptions]
    if p.warnings:
        out += ["warnings:"] + [f"  - {s}" for s in p.warnings]
    return "\n".join(out)
