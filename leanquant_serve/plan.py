"""``leanquant plan``: will a LeanQuant checkpoint of this model serve on these GPUs?

Everything here is arithmetic on the model's architecture; nothing is loaded or measured.
This module is the engine-neutral core: the model's shapes, the checkpoint's bytes, the
inputs and the result (:class:`PlanInput`, :class:`Plan`, :class:`PlanError`,
:func:`format_plan`). Each engine's part sits next to that engine's code and is dispatched
to by :func:`plan`: :mod:`leanquant_serve.vllm.plan` (tensor and pipeline parallel, vLLM's
memory budget) and :mod:`leanquant_serve.exllamav2.plan` (exllamav2's layer split).

**Shapes** come from transformers itself: the config dict (a preset of :data:`PRESETS`, a
``config.json``, or a model/checkpoint folder) goes through the model type's own config class
(``transformers.AutoConfig.for_model``), so its defaults (``head_dim``,
``num_key_value_heads``, ``tie_word_embeddings``) are transformers'. A decoder layer is built
from that config on the ``meta`` device (no memory) and its ``nn.Linear`` sublayers and other
parameters (norms) are read off it with the quantizer's own walkers
(:func:`quantizer.model_walk.find_decoder_layers`, :func:`~quantizer.model_walk.find_linears`);
which linears share one input (and so one Hessian, one act-order permutation, one ``g_idx``)
is read off one forward pass of that meta-device model, as the quantizer learns it
(:func:`~quantizer.model_walk.sequential_groups`). No projection name appears here.

**Mixture-of-Experts and MLA.** The whole model is built on the meta device and its layers
are grouped by structure (:class:`LayerKind`: DeepSeek-V3's three dense layers and its 58 MoE
layers are two kinds); one layer of each kind is traced. Routed experts are found as the
quantizer finds them, from the fused 3-D parameters (:func:`quantizer.moe.find_fused_experts`:
each expert linear under its checkpoint name, :class:`Experts`), and counted as the quantizer
stores them: every expert linear a linear of the contract; routers
(:func:`quantizer.moe.routers`) 16-bit. Shared experts are ordinary linears. Multi-head Latent
Attention (a config with ``kv_lora_rank``) is recorded in :class:`Architecture` for the
engines' KV-cache and sharding rules.

**Weights** are counted tensor by tensor from the checkpoint contract
(:func:`leanquant_serve.format.linear_specs`): per quantized linear ``qweight`` int32
(in·b/32, out), ``scales`` fp16 (G, out), ``zero_points`` int32 (G, out·b/32) (affine), ``g_idx``
int32 (in,) (act-order with dynamic groups only) or ``lut`` fp16 (out, 2^b) (non-uniform).
Embeddings, ``lm_head``, norms, biases and linears listed in ``modules_to_not_convert`` are
16-bit (2 bytes an element). ``--bits 16`` plans the unquantized 16-bit model. A row-parallel
shard holds its slice of ``qweight`` (and ``g_idx``) and, unless the contract's
:func:`~leanquant_serve.format.tensors.scales_on_every_rank` says otherwise, the groups of its
input slice.

**Multimodal wrappers** (``Gemma3ForConditionalGeneration``, ``Mistral3ForConditionalGeneration``:
a config with ``text_config`` and ``vision_config``, a model type of the quantizer's
``TESTED_MULTIMODAL_MODEL_TYPES``): the text decoder is planned as its text model is (its
``text_config`` through the path above: quantized layers, KV cache), under the checkpoint's
names (``language_model.model.layers``); the modules beside it, vision tower and projector, are
found as the quantizer finds them (:func:`quantizer.model_walk.beside_text_decoder` on the
wrapper built on the meta device by transformers' own class) and counted as 16-bit weights,
element by element off that model (:attr:`Architecture.towers`): the quantizer copies them
unchanged. Other wrappers, and wrappers around an untested text model, are refused.

Nothing here accounts for speculative decoding (DeepSeek-V3's multi-token-prediction layer is
not counted), LoRA adapters, a vision encoder's own activations in the profile run, prefix
caching beyond the KV pool itself, or memory taken by other processes on the GPUs.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leanquant_serve.format import FormatError, LeanQuantConfig, linear_specs
from leanquant_serve.format.config import group_misfit
from leanquant_serve.format.hf_names import ROUTING_TRANSFORMERS_RUNS, routing_keys
from leanquant_serve.format.tensors import scales_on_every_rank

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GiB = 1 << 30
ELEMENT_16BIT = 2  # bytes of an fp16/bf16 element: embeddings, lm_head, norms, biases
PLAN_BITS = (2, 3, 4, 8, 16)  # 16: the unquantized model, for comparison
DEFAULT_MAX_MODEL_LEN = 8192  # without --max-model-len: this, capped at max_position_embeddings
# Each engine's part of the planner: a module with KV_DTYPES and plan_engine(inp, a, cfg, common).
_ENGINE_PARTS = {
    "vllm": "leanquant_serve.vllm.plan",
    "exllamav2": "leanquant_serve.exllamav2.plan",
}
ENGINES = tuple(_ENGINE_PARTS)

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
    # Mixture-of-Experts. The size fields of each model's published config.json on the
    # Hugging Face hub (experts, routers and attention are read off the layer transformers
    # builds from them, not from these names).
    # mistralai/Mixtral-8x22B-Instruct-v0.1 config.json (the base v0.1 differs only in
    # vocab_size 32000): 8 experts, 2 per token, expert intermediate 16384; 140.6B parameters.
    "mixtral-8x22b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 6144,
        "intermediate_size": 16384,
        "num_hidden_layers": 56,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32768,
        "max_position_embeddings": 65536,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # Qwen/Qwen3-235B-A22B config.json: 128 experts, 8 per token, expert intermediate 1536,
    # every layer MoE (decoder_sparse_step 1, no mlp_only_layers); 235.1B parameters.
    "qwen3-235b-a22b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_hidden_layers": 94,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "max_window_layers": 94,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    # deepseek-ai/DeepSeek-V3 config.json (DeepSeek-R1 has the same sizes): Multi-head Latent
    # Attention (q_lora_rank 1536, kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128,
    # v_head_dim 128), first_k_dense_replace 3 dense layers (intermediate 18432), then 58 MoE
    # layers of 256 routed experts (8 per token, intermediate 2048) + 1 shared expert; 671.0B
    # parameters in the 61 layers. Published as FP8 blocks (its quantization_config, left out
    # here: plans start from the 16-bit model); the multi-token-prediction layer
    # (num_nextn_predict_layers 1) is not part of the model vLLM serves without speculative
    # decoding and is not counted.
    "deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 1,
        "vocab_size": 129280,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
}
# Model types the planner knows beyond the quantizer's tested sets (the quantizer runs on them
# but is not tested on them yet: a plan of one says so).
PLAN_ONLY_MODEL_TYPES = ("deepseek_v3",)


class PlanError(ValueError):
    """Inputs that cannot be planned (bad model, settings or parallel layout); the message says why."""


@dataclass(frozen=True)
class LayerLinear:
    """One ``nn.Linear`` of a decoder layer, as the model built from its config has it."""

    name: str  # path inside a decoder layer, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool
    group: int  # index, in forward order, of the input it reads (linears fed one tensor share it)
    first_in_group: bool  # the first linear of its group in forward order


@dataclass(frozen=True)
class TowerLinear:
    """One ``nn.Linear`` of a multimodal wrapper's module beside the text decoder (vision tower,
    projector), as transformers builds the wrapper: the engines' parts decide how they hold it
    (:func:`leanquant_serve.vllm.plan.tower_bytes_per_rank`)."""

    tower: str  # the tower's checkpoint name, e.g. "vision_tower"
    parent: str  # the module holding it, inside the tower: "vision_model.encoder.layers.0.mlp"
    name: str  # its attribute in that module: "fc1"
    in_features: int
    out_features: int
    bias: bool
    sibling: int  # its index among the parent's nn.Linear children, in registration order
    siblings: int  # how many nn.Linear children the parent holds


@dataclass(frozen=True)
class Experts:
    """A decoder layer's routed experts, held by transformers as fused 3-D parameters
    (E, out, in) and found as the quantizer finds them (:func:`quantizer.moe.find_fused_experts`):
    ``linears`` are expert 0's linears under their checkpoint names with ``{e}`` for the expert
    (``block_sparse_moe.experts.{e}.w1``, ``mlp.experts.{e}.down_proj``), each stored as its
    own linear of the contract. ``group`` 0: reads the experts' input (hidden_size features:
    gate/up, vLLM's ``w13``); 1: reads the intermediate (down, ``w2``)."""

    name: str  # the fused module inside the layer, e.g. "mlp.experts"
    num_experts: int
    linears: tuple[LayerLinear, ...]

    @property
    def intermediate_size(self) -> int:
        """One expert's intermediate size (the output of each group-0 linear)."""
        return next(lin.out_features for lin in self.linears if lin.group == 0)


@dataclass(frozen=True)
class LayerKind:
    """One decoder-layer structure (a model may have several: DeepSeek-V3's first three layers
    are dense, the others MoE): its ``nn.Linear`` sublayers in forward order, its routed
    experts, and its other parameters (norms, routers: 16-bit)."""

    linears: tuple[LayerLinear, ...]
    layer_16bit_elements: int
    experts: Experts | None = None
    routers: tuple[str, ...] = ()  # modules that pick experts: kept dense, by the quantizer's rule
    # persistent buffers (DeepSeek-V3's router e_score_correction_bias): float32 in its
    # checkpoints and in vLLM's deepseek_v2.py, so 4 bytes each
    layer_fp32_buffer_elements: int = 0


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder-only transformer, dense or Mixture-of-Experts, read from
    transformers' config class and the decoder layers built from it (see the module
    docstring). The MoE and MLA fields are None for models without them."""

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
    qkv_bias: bool = False  # any bias in the first input group (attention's input projections)
    o_bias: bool = False  # a bias in the second group
    mlp_bias: bool = False  # any bias in the later groups
    layer_norms: int = 0  # hidden-sized non-linear parameters per layer (norms)
    head_norms: int = 0  # head_dim-sized non-linear parameters per layer (q_norm / k_norm)
    # Mixture-of-Experts (None: dense), read off the layers
    num_experts: int | None = None
    experts_per_token: int | None = None  # config.num_experts_per_tok
    moe_intermediate_size: int | None = None  # one expert's
    moe_layers: int | None = None  # decoder layers with routed experts
    # Multi-head Latent Attention (None: not MLA), from the config: what vLLM caches per token
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None  # None also for MLA without a low-rank query (V2-Lite)
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Multimodal wrapper (None: a causal LM): the wrapper's model_type; model_type above is its
    # text model's, whose decoder the rest of these fields describe
    wrapper: str | None = None
    # Modules beside the text decoder (vision tower, projector): (checkpoint name, elements),
    # 16-bit; reported in the summary as {name: elements}
    towers: tuple[tuple[str, int], ...] = field(default=(), repr=False)
    tower_linears: tuple[TowerLinear, ...] = field(default=(), repr=False)  # their nn.Linears
    # Not part of the summary (:meth:`summary`): the layers themselves.
    layers_name: str = field(default="model.layers", repr=False)  # the decoder stack's path
    linears: tuple[LayerLinear, ...] = field(default=(), repr=False)  # layer 0's, forward order
    layer_16bit_elements: int = field(default=0, repr=False)  # layer 0's other parameters
    kinds: tuple[LayerKind, ...] = field(default=(), repr=False)  # distinct layer structures
    layer_kind: tuple[int, ...] = field(default=(), repr=False)  # index in kinds, per layer

    @classmethod
    def from_config(cls, d: Mapping[str, Any], name: str = "model") -> Architecture:
        """Shapes of the model of config dict ``d`` (``name`` labels errors); of a multimodal
        wrapper's text model, with its towers (see the module docstring). Raises
        :class:`PlanError` for a model type transformers does not know, one outside the
        quantizer's tested set (wrappers: ``TESTED_MULTIMODAL_MODEL_TYPES`` around a tested
        text model), or a config its class refuses."""
        return _architecture(json.dumps(dict(d), sort_keys=True, default=str), name)

    def summary(self) -> dict[str, Any]:
        """The sizes as ``Plan.architecture`` reports them (the layers' linears left out, and
        the MoE / MLA fields of a model without them)."""
        skip = {
            "layers_name", "linears", "layer_16bit_elements", "kinds", "layer_kind", "towers",
            "tower_linears",
        }  # fmt: skip
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in skip and getattr(self, f.name) is not None
        }
        if self.towers:
            out["towers"] = dict(self.towers)
        return out

    @property
    def tower_bytes(self) -> int:
        """Bytes of the modules beside a wrapper's text decoder (vision tower, projector), all
        16-bit; 0 for a causal LM."""
        return sum(n for _, n in self.towers) * ELEMENT_16BIT

    @property
    def is_mla(self) -> bool:
        """Multi-head Latent Attention (DeepSeek-V2/V3): a compressed KV cache."""
        return self.kv_lora_rank is not None

    def kind(self, layer: int) -> LayerKind:
        """The structure of decoder layer ``layer``."""
        if not self.kinds:  # built by hand, without kinds: every layer is layer 0
            return LayerKind(self.linears, self.layer_16bit_elements)
        return self.kinds[self.layer_kind[layer]]

    def all_linears(self) -> list[LayerLinear]:
        """The dense linears of every layer kind (experts not included)."""
        kinds = self.kinds or (self.kind(0),)
        return [lin for k in kinds for lin in k.linears]

    def all_experts(self) -> list[Experts]:
        """The routed experts of every MoE layer kind."""
        return [k.experts for k in self.kinds if k.experts is not None]


def _config_class(d: Mapping[str, Any], name: str) -> PretrainedConfig:
    """``d`` through its model type's transformers config class."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        raise PlanError(
            f"{name}: model_type {mt!r} is not a model type transformers "
            f"{transformers.__version__} knows"
        )
    wrappers = supported_wrapper_types()
    if "text_config" in (getattr(CONFIG_MAPPING[mt], "sub_configs", None) or {}):
        if mt not in wrappers:
            raise PlanError(
                f"{name}: model_type {mt!r} is a multimodal wrapper plan does not support "
                f"(supported wrappers: {', '.join(wrappers)})"
            )
    elif mt not in supported_model_types():
        raise PlanError(
            f"{name}: model_type {mt!r} is not supported by plan "
            f"(supported: {', '.join(sorted(supported_model_types()))}; multimodal wrappers: "
            f"{', '.join(wrappers)})"
        )
    kwargs = {k: v for k, v in d.items() if k not in ("model_type", "quantization_config")}
    try:
        config = AutoConfig.for_model(mt, **kwargs)
    except Exception as e:  # transformers' validators raise many types, for a user's config
        raise PlanError(f"{name}: transformers' {mt} config refuses it: {_one_line(e)}") from None
    text_type = getattr(config.get_text_config(), "model_type", None)
    if config.get_text_config() is not config and text_type not in supported_model_types():
        raise PlanError(
            f"{name}: the {mt} wrapper's text model is {text_type!r}, not one plan supports "
            f"(supported: {', '.join(sorted(supported_model_types()))})"
        )
    return config


def supported_model_types() -> tuple[str, ...]:
    """The quantizer's tested dense and MoE model types, and :data:`PLAN_ONLY_MODEL_TYPES`."""
    from quantizer.model_walk import TESTED_MODEL_TYPES, TESTED_MOE_MODEL_TYPES

    known = TESTED_MODEL_TYPES + TESTED_MOE_MODEL_TYPES
    return known + tuple(t for t in PLAN_ONLY_MODEL_TYPES if t not in known)


def supported_wrapper_types() -> tuple[str, ...]:
    """The multimodal wrappers plan knows: the quantizer's tested ones
    (``quantizer.model_walk.TESTED_MULTIMODAL_MODEL_TYPES``)."""
    from quantizer.model_walk import TESTED_MULTIMODAL_MODEL_TYPES

    return TESTED_MULTIMODAL_MODEL_TYPES


def quantizer_tested(model_type: str) -> bool:
    """Whether the quantizer's test suite covers ``model_type``."""
    from quantizer.model_walk import TESTED_MODEL_TYPES, TESTED_MOE_MODEL_TYPES

    return model_type in TESTED_MODEL_TYPES + TESTED_MOE_MODEL_TYPES


def _one_line(e: BaseException) -> str:
    """``e`` as one line: its type and its message's words."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _with(config: PretrainedConfig, **sizes: int) -> PretrainedConfig:
    """A copy of ``config`` with other sizes (and ``layer_types`` cut to the layer count)."""
    c = copy.deepcopy(config)
    for k, v in sizes.items():
        setattr(c, k, v)
    if isinstance(getattr(c, "layer_types", None), list):
        c.layer_types = c.layer_types[: c.num_hidden_layers]
    return c


def _input_groups(model: Any, layer: Any) -> list[list[str]]:
    """``layer``'s linears in forward order, grouped by the input they share, read off one
    forward pass of the meta-device ``model`` by the quantizer's own grouping
    (``quantizer.model_walk.sequential_groups``)."""
    import torch

    from quantizer.model_walk import find_linears, sequential_groups

    ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    return sequential_groups(find_linears(layer), lambda: model(input_ids=ids))


def _signature(layer: Any) -> tuple:
    """A decoder layer's structure: its parameters' names and shapes."""
    return tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())


def _expert_set(model: Any, layer: Any, prefix: str, hidden: int, name: str) -> Experts | None:
    """The routed experts of ``layer`` (named ``prefix``), found by the quantizer's rule
    (:func:`quantizer.moe.find_fused_experts`), as :class:`Experts`."""
    from quantizer.moe import find_fused_experts

    fused = find_fused_experts(model, layer, prefix)
    if not fused:
        return None
    if len(fused) > 1:
        raise PlanError(f"{name}: {len(fused)} fused expert modules in one layer")
    (fe,) = fused
    shapes = {n: tuple(p.shape) for n, p in fe.params.items()}
    own = [x for x in fe.linears if x.expert == 0]
    marker = f".{0}."

    def template(n: str) -> str:  # expert 0's checkpoint name, the expert index as {e}
        head, sep, tail = n.rpartition(marker)
        if not sep:
            raise PlanError(f"{name}: expert linear {n} has no expert index in its name")
        return f"{head}.{{e}}.{tail}"

    per_param = {x.param: sum(y.param == x.param for y in own) for x in own}
    linears = []
    for x in own:
        _, _, in_f = shapes[f"{fe.name}.{x.param.rpartition('.')[2]}"]
        out_f = x.rows[1] - x.rows[0]
        # vLLM's fused MoE (and the contract) take gate/up as reading the experts' input
        # (hidden_size features) and down as reading the intermediate, writing hidden_size;
        # where both sizes are equal, gate/up are the parameter that stacks two linears
        reads_hidden, writes_hidden = in_f == hidden, out_f == hidden
        if reads_hidden == writes_hidden and len(set(per_param.values())) > 1:
            reads_hidden = per_param[x.param] == max(per_param.values())
        elif reads_hidden == writes_hidden:
            raise PlanError(
                f"{name}: cannot tell whether expert linear {x.name} ({in_f} -> {out_f}) reads "
                f"the layer's input or the experts' intermediate (hidden_size {hidden})"
            )
        linears.append((0 if reads_hidden else 1, template(x.name), in_f, out_f))
    linears.sort(key=lambda t: t[0])  # stable: the checkpoint order inside each group
    return Experts(
        name=fe.name,
        num_experts=fe.num_experts,
        linears=tuple(
            LayerLinear(
                name=n,
                in_features=i,
                out_features=o,
                bias=False,
                group=g,
                first_in_group=j == 0 or linears[j - 1][0] != g,
            )
            for j, (g, n, i, o) in enumerate(linears)
        ),
    )


def _layer_kind(model: Any, layer: Any, prefix: str, hidden: int, name: str) -> LayerKind:
    """One decoder layer of the meta-device ``model`` as a :class:`LayerKind`: its linears
    grouped by input (the quantizer's groups), its experts, routers and other parameters."""
    from quantizer.model_walk import find_linears
    from quantizer.moe import find_fused_experts, routers

    experts = _expert_set(model, layer, prefix, hidden, name)
    dense_routers = routers(layer, find_fused_experts(model, layer, prefix)) if experts else {}
    found = {n: m for n, m in find_linears(layer).items() if n not in dense_routers}
    groups = [
        g for g in ([n for n in grp if n in found] for grp in _input_groups(model, layer)) if g
    ]
    linears = tuple(
        LayerLinear(
            name=n,
            in_features=found[n].in_features,
            out_features=found[n].out_features,
            bias=found[n].bias is not None,
            group=g,
            first_in_group=j == 0,
        )
        for g, group in enumerate(groups)
        for j, n in enumerate(group)
    )
    in_linears = {f"{n}.{p}" for n, m in found.items() for p, _ in m.named_parameters()}
    fused = {f"{experts.name}.{n}" for n, _ in _fused_params(layer, experts)} if experts else set()
    others = [
        p.numel() for n, p in layer.named_parameters() if n not in in_linears and n not in fused
    ]
    buffers = [
        b.numel()
        for n, b in layer.named_buffers()
        if n.rpartition(".")[2]
        not in layer.get_submodule(n.rpartition(".")[0])._non_persistent_buffers_set
    ]
    return LayerKind(
        linears=linears,
        layer_16bit_elements=sum(others),
        experts=experts,
        routers=tuple(sorted(dense_routers)),
        layer_fp32_buffer_elements=sum(buffers),
    )


def _fused_params(layer: Any, experts: Experts) -> list[tuple[str, Any]]:
    return [
        (n, p)
        for n, p in layer.get_submodule(experts.name).named_parameters(recurse=False)
        if p.dim() >= 3
    ]


@functools.lru_cache(maxsize=32)
def _architecture(config_json: str, name: str) -> Architecture:
    config = _config_class(json.loads(config_json), name)
    if config.get_text_config() is not config:
        return _wrapper_architecture(config, name)
    return _decoder_architecture(config, name)


def _wrapper_architecture(config: PretrainedConfig, name: str) -> Architecture:
    """A multimodal wrapper: its text decoder as :func:`_decoder_architecture` plans its
    ``text_config``, under the wrapper checkpoint's names, and the modules beside it (the
    quantizer's :func:`~quantizer.model_walk.beside_text_decoder`), counted off the wrapper
    transformers builds on the meta device."""
    import torch

    from leanquant_serve.format.hf_names import auto_model_class, checkpoint_module
    from quantizer.errors import UserError
    from quantizer.model_walk import beside_text_decoder, find_decoder_layers

    text = _decoder_architecture(config.get_text_config(), name)
    try:
        with torch.device("meta"):
            whole = auto_model_class(config).from_config(config, dtype=torch.bfloat16)
        layers_name, layers = find_decoder_layers(whole)
        beside = {
            checkpoint_module(whole, t): whole.get_submodule(t)
            for t in beside_text_decoder(whole, layers_name)
        }
        towers = tuple((t, sum(p.numel() for p in m.parameters())) for t, m in beside.items())
        tower_linears = tuple(lin for t, m in beside.items() for lin in _tower_linears(t, m))
        stack = checkpoint_module(whole, f"{layers_name}.0").removesuffix(".0")
        head = whole.get_output_embeddings()
        tied = head is not None and head.weight is whole.get_input_embeddings().weight
    except UserError as e:  # the quantizer's walkers: not a wrapper it could quantize
        raise PlanError(f"{name}: {e}") from None
    except Exception as e:  # what transformers raises for a config it cannot build varies
        raise PlanError(
            f"{name}: transformers cannot build its {config.model_type} model: {_one_line(e)}"
        ) from None
    if len(layers) != text.num_layers:
        raise PlanError(
            f"{name}: the wrapper's text decoder has {len(layers)} layers, its text_config "
            f"{text.num_layers}"
        )
    return replace(
        text, wrapper=config.model_type, towers=towers, tower_linears=tower_linears,
        layers_name=stack, tie_word_embeddings=tied,
    )  # fmt: skip


def _tower_linears(tower: str, module: Any) -> list[TowerLinear]:
    """Every ``nn.Linear`` inside ``module`` (a tower named ``tower``), with its place among its
    parent's linear children."""
    import torch

    out = []
    for parent, m in module.named_modules():
        children = [(n, c) for n, c in m.named_children() if isinstance(c, torch.nn.Linear)]
        for i, (n, c) in enumerate(children):
            out.append(
                TowerLinear(
                    tower=tower,
                    parent=parent,
                    name=n,
                    in_features=c.in_features,
                    out_features=c.out_features,
                    bias=c.bias is not None,
                    sibling=i,
                    siblings=len(children),
                )  # fmt: skip
            )
    return out


def _decoder_architecture(config: PretrainedConfig, name: str) -> Architecture:
    """The :class:`Architecture` of a causal LM's (or a wrapper's text model's) ``config``."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantizer.errors import UserError
    from quantizer.model_walk import find_decoder_layers

    model_type = config.model_type

    def need(key: str) -> int:
        v = getattr(config, key, None)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise PlanError(f"{name}: config.{key} is {v!r}, not a positive integer")
        return v

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise PlanError(
            f"{name}: {heads} attention heads are not a multiple of {kv_heads} KV heads"
        )
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    sizes = {k: need(k) for k in ("intermediate_size", "num_hidden_layers", "vocab_size")}
    max_pos = need("max_position_embeddings")

    try:
        # Every layer's structure from the whole model on the meta device (no memory: shapes
        # only; bfloat16 because MoE experts' grouped matmuls take nothing else), then one
        # forward pass of a model cut after the last first-of-its-kind layer.
        with torch.device("meta"):
            whole = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        _, all_layers = find_decoder_layers(whole)
        sigs: dict[tuple, int] = {}
        first: list[int] = []
        layer_kind = []
        for i, lyr in enumerate(all_layers):
            sig = _signature(lyr)
            if sig not in sigs:
                sigs[sig] = len(first)
                first.append(i)
            layer_kind.append(sigs[sig])
        del whole, all_layers
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                _with(config, num_hidden_layers=first[-1] + 1), dtype=torch.bfloat16
            )
        layers_name, layers = find_decoder_layers(model)
        kinds = tuple(
            _layer_kind(model, layers[i], f"{layers_name}.{i}", hidden, name) for i in first
        )
    except (UserError, PlanError) as e:  # the quantizer's walkers: not a model it could quantize
        raise PlanError(f"{name}: {e}" if isinstance(e, UserError) else str(e)) from None
    except Exception as e:  # what transformers raises for a config it cannot build varies
        raise PlanError(
            f"{name}: transformers cannot build its {model_type} layer: {_one_line(e)}"
        ) from None
    k0 = kinds[0]
    linears = [lin for k in kinds for lin in k.linears]
    moe = [k.experts for k in kinds if k.experts]
    mla = getattr(config, "kv_lora_rank", None)
    not_norms = {f"{lin.name}.{x}" for lin in k0.linears for x in ("weight", "bias")}
    not_norms |= {f"{r}.weight" for r in k0.routers}
    first_norms = [
        p.numel() for n, p in layers[0].named_parameters() if n not in not_norms and p.dim() == 1
    ]
    return Architecture(
        name=name,
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=sizes["intermediate_size"],
        num_layers=sizes["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=sizes["vocab_size"],
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=any(lin.bias for lin in linears if lin.group == 0),
        o_bias=any(lin.bias for lin in linears if lin.group == 1),
        mlp_bias=any(lin.bias for lin in linears if lin.group >= 2),
        layer_norms=sum(n == hidden for n in first_norms),
        head_norms=sum(n == head_dim and n != hidden for n in first_norms),
        num_experts=moe[0].num_experts if moe else None,
        experts_per_token=getattr(config, "num_experts_per_tok", None) if moe else None,
        moe_intermediate_size=moe[0].intermediate_size if moe else None,
        moe_layers=sum(kinds[k].experts is not None for k in layer_kind) if moe else None,
        kv_lora_rank=mla,
        q_lora_rank=getattr(config, "q_lora_rank", None) if mla else None,
        qk_rope_head_dim=getattr(config, "qk_rope_head_dim", None) if mla else None,
        qk_nope_head_dim=getattr(config, "qk_nope_head_dim", None) if mla else None,
        v_head_dim=getattr(config, "v_head_dim", None) if mla else None,
        layers_name=layers_name,
        linears=k0.linears,
        layer_16bit_elements=k0.layer_16bit_elements,
        kinds=kinds,
        layer_kind=tuple(layer_kind),
    )


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
    max_model_len: int | None = None  # None: DEFAULT_MAX_MODEL_LEN, capped at the model's limit
    concurrency: int = 1  # sequences at once (vLLM --max-num-seqs)
    tp: int | None = None  # None: gpus (vLLM); exllamav2: 1
    kv_dtype: str = "fp16"
    gpu_memory_utilization: float = 0.9
    engine: str = "vllm"
    max_num_batched_tokens: int | None = None  # None: vLLM 0.32's default for this GPU size
    enforce_eager: bool = False
    reserve_gib: float | None = None  # None: the estimate described in the module docstring
    expert_parallel: bool = False  # vLLM --enable-expert-parallel: whole experts per rank


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
    elif isinstance(stored, Mapping) and stored.get("quant_method") == "compressed-tensors":
        base = _compressed_tensors_settings(inp.model, stored)
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


def _compressed_tensors_settings(model: str, q: Mapping[str, Any]) -> dict[str, Any]:
    """Bits, group size and unquantized modules of a compressed-tensors export's
    ``quantization_config`` (as :mod:`leanquant_serve.compressed_tensors.export` writes it:
    one config group of integer weights, ``strategy`` group or channel, ``ignore`` the
    linears left 16-bit), in LeanQuantConfig's field names."""
    groups = q.get("config_groups")
    weights = (
        [g.get("weights") for g in groups.values() if isinstance(g, Mapping)]
        if isinstance(groups, Mapping)
        else []
    )
    if len(weights) != 1 or not isinstance(weights[0], Mapping):
        raise PlanError(
            f"{model}: a compressed-tensors config with {len(weights)} weight schemes "
            "(config_groups); plan supports one, as `leanquant export compressed-tensors` writes"
        )
    w = weights[0]
    if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
        raise PlanError(
            f"{model}: compressed-tensors weights of type {w.get('type')!r}, strategy "
            f"{w.get('strategy')!r}: plan supports int weights in groups or per channel"
        )
    ignore = [n for n in q.get("ignore") or [] if isinstance(n, str) and not n.startswith("re:")]
    return {
        "bits": w.get("num_bits"),
        "group_size": w.get("group_size") if w.get("strategy") == "group" else -1,
        "grid": "affine",
        "desc_act": False,  # no g_idx: the exporter refuses act-order with dynamic groups
        "modules_to_not_convert": ignore or ["lm_head"],
    }


def _tensor_bytes(cfg: LeanQuantConfig, in_f: int, out_f: int, where: str) -> int:
    try:
        specs = linear_specs(cfg, in_f, out_f)
    except FormatError as e:
        raise PlanError(f"{where}: {e}") from None
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in specs.values())


def linear_bytes(
    cfg: LeanQuantConfig | None, name: str, in_f: int, out_f: int, bias: int, in_full: int
) -> int:
    """Bytes of one (rank's shard of a) linear with an (out_f, in_f) weight and a
    ``bias``-element bias; ``in_full`` is the unsharded input size.

    A row-parallel shard (in_f < in_full) holds its slice of ``qweight`` (and ``g_idx``) and,
    normally, the groups of its input slice; per-channel and act-order (``g_idx``) layers keep
    every group's scales and zeros on every rank (the contract's ``scales_on_every_rank``, which
    ``leanquant_serve.vllm.linear`` follows too).
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


@dataclass(frozen=True)
class Shard:
    """How an engine holds a decoder layer's linears on one GPU (see the engine parts):
    ``shape(lin)`` gives (in, out, bias elements) of the part on this GPU, ``shares_g_idx(lin)``
    whether ``lin`` is fused into a layer whose one ``g_idx`` is counted with another part.
    Routed experts: ``expert_shape(lin)`` is one expert linear's part on this GPU and
    ``experts_held(E)`` how many of the E experts this GPU holds (all of them, split, under
    tensor parallelism; a share of them, whole, under expert parallelism)."""

    shape: Callable[[LayerLinear], tuple[int, int, int]]
    shares_g_idx: Callable[[LayerLinear], bool] = lambda _lin: False
    expert_shape: Callable[[LayerLinear], tuple[int, int, int]] | None = None  # None: shape
    experts_held: Callable[[int], int] = lambda e: e


def _whole(lin: LayerLinear) -> tuple[int, int, int]:
    return lin.in_features, lin.out_features, lin.out_features if lin.bias else 0


WHOLE = Shard(_whole)  # every linear whole: the checkpoint, or an engine without TP


def _linear_part(
    cfg: LeanQuantConfig | None,
    name: str,
    lin: LayerLinear,
    part: tuple[int, int, int],
    shares_g_idx: bool,
) -> int:
    """Bytes of ``part`` (in, out, bias) of ``lin``, stored as ``name``."""
    in_f, out_f, bias = part
    total = linear_bytes(cfg, name, in_f, out_f, bias, lin.in_features)
    if cfg and cfg.uses_g_idx and shares_g_idx and not cfg.is_skipped(name):
        total -= in_f * 4  # int32 g_idx, held once by the fused layer
    return total


def experts_bytes(a: Architecture, cfg: LeanQuantConfig | None, layer: int, shard: Shard) -> int:
    """Bytes of decoder layer ``layer``'s routed experts on one GPU as ``shard`` holds them:
    each expert linear a linear of the contract (``qweight``/``scales``/... and its own
    ``g_idx``: vLLM's fused-MoE layers keep one per expert and part), a 16-bit weight when
    ``modules_to_not_convert`` keeps it. Under expert parallelism the experts held are counted
    as rank 0's (the first ``experts_held(E)``)."""
    experts = a.kind(layer).experts
    if experts is None:
        return 0
    held = shard.experts_held(experts.num_experts)
    part_of = shard.expert_shape or shard.shape
    prefix = f"{a.layers_name}.{layer}"
    total = 0
    for lin in experts.linears:
        part = part_of(lin)
        head = f"{prefix}.{lin.name.partition('{e}')[0]}"
        listed = cfg is not None and any(
            head.startswith(m + ".") or m.startswith(head) for m in cfg.modules_to_not_convert
        )
        # none listed: every expert alike, expert 0's bytes times the experts held
        for e in range(held) if listed else (0,):
            name = f"{prefix}.{lin.name.format(e=e)}"
            size = _linear_part(cfg, name, lin, part, shares_g_idx=False)
            total += size if listed else held * size
    return total


def layer_bytes(a: Architecture, cfg: LeanQuantConfig | None, layer: int, shard: Shard) -> int:
    """Bytes of decoder layer ``layer`` as ``shard`` holds it on one GPU."""
    kind = a.kind(layer)
    total = kind.layer_16bit_elements * ELEMENT_16BIT  # norms, routers: 16-bit, on every GPU
    total += kind.layer_fp32_buffer_elements * 4  # routers' score-correction biases: float32
    for lin in kind.linears:
        name = f"{a.layers_name}.{layer}.{lin.name}"
        total += _linear_part(cfg, name, lin, shard.shape(lin), shard.shares_g_idx(lin))
    return total + experts_bytes(a, cfg, layer, shard)


def all_layer_bytes(a: Architecture, cfg: LeanQuantConfig | None, shard: Shard) -> list[int]:
    """Per-layer bytes; layers differ by structure (dense and MoE layers) and where a
    checkpoint leaves some linears unquantized."""
    prefix = a.layers_name + "."
    if cfg is None or not any(m.startswith(prefix) for m in cfg.modules_to_not_convert):
        if not a.kinds or len(a.kinds) == 1:
            return [layer_bytes(a, cfg, 0, shard)] * a.num_layers
        per_kind = {}
        for i, k in enumerate(a.layer_kind):
            if k not in per_kind:
                per_kind[k] = layer_bytes(a, cfg, i, shard)
        return [per_kind[k] for k in a.layer_kind]
    return [layer_bytes(a, cfg, i, shard) for i in range(a.num_layers)]


def checkpoint_bytes(a: Architecture, cfg: LeanQuantConfig | None) -> dict[str, int]:
    """Bytes of every tensor the checkpoint stores (headers and tokenizer files not included);
    ``towers``: a multimodal wrapper's vision tower and projector (16-bit), 0 for a causal LM."""
    emb = a.vocab_size * a.hidden_size * ELEMENT_16BIT
    layers = sum(all_layer_bytes(a, cfg, WHOLE))
    head = 0 if a.tie_word_embeddings else emb
    norm = a.hidden_size * ELEMENT_16BIT
    return {
        "decoder_layers": layers,
        "embed_tokens": emb,
        "lm_head": head,
        "final_norm": norm,
        "towers": a.tower_bytes,
        "total": layers + emb + head + norm + a.tower_bytes,
    }


def towers_line(a: Architecture, engine: str) -> str:
    """The plan's line on a wrapper's modules beside the text decoder: what they are, their
    16-bit bytes, and how ``engine`` holds them."""
    parts = ", ".join(f"{n} {e:,}" for n, e in a.towers)
    return (
        f"{a.wrapper} wrapper: the text decoder ({a.model_type}) planned as that text model; "
        f"beside it {parts} elements stay 16-bit (copied unchanged by the quantizer): "
        f"{_gb(a.tower_bytes)} in the checkpoint, held per GPU as {engine} holds them (below); "
        "the vision encoder's own profile-run activations are not counted"
    )


def activation_bytes(
    a: Architecture,
    tokens: int,
    heads: int,
    kv_heads: int,
    inter: int,
    qkv_width: int | None = None,
) -> int:
    """Activations of one forward over ``tokens`` tokens on a GPU holding ``heads`` query
    heads, ``kv_heads`` KV heads and ``inter`` intermediate features: ``tokens × 2 B ×
    (4·hidden + 2·(q + k + v widths) + 3·intermediate)`` (hidden/residual buffers, the fused
    QKV and gate/up outputs, the activation). ``qkv_width`` replaces ``(heads + 2·kv_heads) ·
    head_dim`` where q, k and v differ in width (MLA). An estimate, both engines' reserve."""
    if qkv_width is None:
        qkv_width = (heads + 2 * kv_heads) * a.head_dim
    width = 4 * a.hidden_size + 2 * qkv_width + 3 * inter
    return tokens * ELEMENT_16BIT * width


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
    # MoE experts served at another size than stored (vLLM: the plugin's portable path holds
    # them 16-bit): the fit as stored, which needs a kernel that does not exist yet
    # (weight_bytes_per_gpu, experts_bytes_per_gpu, capacity_tokens, fits, needs); {}: none
    as_stored: dict[str, Any] = field(default_factory=dict)
    host_bytes: int = 0  # exllamav2: the token embedding, kept in host RAM
    tower_bytes_per_gpu: int = 0  # a multimodal wrapper's towers on each GPU (in weight_bytes)
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
        if name == "max-model-len" and v is None:
            continue
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
    kv = _engine_part(inp.engine).KV_DTYPES
    if inp.kv_dtype not in kv:
        raise PlanError(
            f"--kv-dtype {inp.kv_dtype!r}: not one of {', '.join(kv)} for engine {inp.engine}"
        )


def plan(inp: PlanInput) -> Plan:
    """Plan serving ``inp.model``; raises :class:`PlanError` for inputs that cannot be served."""
    _validate(inp)
    name, d = load_model_config(inp.model)
    a = Architecture.from_config(d, name)
    if a.wrapper and inp.engine != "vllm":
        raise PlanError(
            f"--engine {inp.engine}: multimodal wrappers ({a.wrapper}) are not modelled for it; "
            "plan them with --engine vllm"
        )
    cfg, bits = _quant_config(inp, d)
    length_note = None
    if inp.max_model_len is None:
        inp = replace(inp, max_model_len=min(DEFAULT_MAX_MODEL_LEN, a.max_position_embeddings))
        length_note = f"max_model_len {inp.max_model_len}: --max-model-len not given, " + (
            f"the default {DEFAULT_MAX_MODEL_LEN}"
            if inp.max_model_len == DEFAULT_MAX_MODEL_LEN
            else f"the model's max_position_embeddings (the default {DEFAULT_MAX_MODEL_LEN} "
            "capped at it)"
        )
    if inp.max_model_len > a.max_position_embeddings:
        raise PlanError(
            f"--max-model-len {inp.max_model_len} exceeds the model's max_position_embeddings "
            f"{a.max_position_embeddings} (vLLM refuses it)"
        )
    if cfg is not None:  # the unsharded checkpoint must exist first
        for lin in a.all_linears() + [x for e in a.all_experts() for x in e.linears]:
            _group_check(cfg, lin)
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
    routers = sorted({r for k in a.kinds for r in k.routers})
    if routers:  # kept 16-bit by the quantizer's rule (quantizer.moe.routers), every layer
        quant["routers_16bit"] = routers
    if a.towers:  # copied unchanged by the quantizer (quantizer.model_walk.beside_text_decoder)
        quant["towers_16bit"] = [n for n, _ in a.towers]
    common = {
        "model": name,
        "architecture": a.summary(),
        "quantization": quant,
        "gpus": inp.gpus,
        "gpu_mem_bytes": int(inp.gpu_mem_gib * GiB),
        "kv_dtype": inp.kv_dtype,
        "max_model_len": inp.max_model_len,
        "concurrency": inp.concurrency,
        "checkpoint_bytes": checkpoint_bytes(a, cfg),
    }
    p = _engine_part(inp.engine).plan_engine(inp, a, cfg, common)
    p.warnings += _routing_warnings(d)
    if a.towers:
        p.assumptions.insert(1, towers_line(a, inp.engine))
    if length_note:
        p.assumptions.insert(0, length_note)
    source = _stored_quantization(d)
    if source == "compressed-tensors" and cfg is not None:
        p.assumptions.insert(
            0,
            "a compressed-tensors export: bits, group size and the modules it leaves "
            "unquantized (ignore) read from its quantization_config, and its tensors counted "
            "as the LeanQuant checkpoint's they were exported from (packed codes, fp16 scales, "
            "packed zero points; a symmetric export stores no zero points, a little less)",
        )
    return p


def _routing_warnings(d: Mapping[str, Any]) -> list[str]:
    """A config whose routing keys vLLM would read otherwise than transformers' model runs
    (:func:`~leanquant_serve.format.hf_names.routing_keys`): one warning saying what happens."""
    absent, contrary = routing_keys(d)
    runs = ", ".join(
        f"{k} {v!r}" for k, v in ROUTING_TRANSFORMERS_RUNS.get(d.get("model_type"), {}).items()
    )
    if contrary:
        stated = ", ".join(f"{k} {v!r}" for k, v in contrary.items())
        return [
            f"the config states {stated}, which transformers' {d['model_type']} does not run "
            f"(only {runs}): leanquant quantize refuses it"
        ]
    if not absent:
        return []
    if _stored_quantization(d) is None:
        return [
            f"the config states no {'/'.join(absent)}: leanquant quantize writes {runs} (what "
            "transformers runs); served as it is, vLLM would build a softmax router without "
            "e_score_correction_bias"
        ]
    return [
        f"the config states no {'/'.join(absent)}: vLLM builds a softmax router without "
        f"e_score_correction_bias, not the routing it was calibrated with; add {runs} to its "
        "config.json"
    ]


def _stored_quantization(d: Mapping[str, Any]) -> str | None:
    """The quant_method of the config's quantization_config (None: an unquantized model)."""
    q = d.get("quantization_config")
    return q.get("quant_method") if isinstance(q, Mapping) else None


def _group_check(cfg: LeanQuantConfig, lin: LayerLinear) -> None:
    """One line when ``cfg``'s group size does not divide ``lin``'s input (the contract's
    rule, :func:`~leanquant_serve.format.config.group_misfit`), naming the flags that would
    do: a group size that divides it, or ``--bits 16`` for the unquantized model."""
    if group_misfit(cfg.group_size, lin.in_features) is None:
        return
    fits = [g for g in (128, 64, 32) if lin.in_features % g == 0]
    raise PlanError(
        f"{lin.name}: group size {cfg.group_size} does not divide its {lin.in_features} "
        f"inputs: plan with --group-size {fits[0] if fits else -1}"
        + (" (or -1, one group per row)" if fits else " (one group per row)")
        + ", or --bits 16 for the unquantized model"
    )


def _engine_part(engine: str) -> Any:
    """The engine's part of the planner (imported when asked for: the engines' parts import
    this module)."""
    return importlib.import_module(_ENGINE_PARTS[engine])


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
    attention = (
        f"MLA: {a['kv_lora_rank']} + {a['qk_rope_head_dim']} cached per token"
        if a.get("kv_lora_rank")
        else f"{a['num_kv_heads']} KV heads × {a['head_dim']}"
    )
    moe = (
        f"; MoE in {a['moe_layers']} layers: {a['num_experts']} experts "
        f"({a['experts_per_token']} per token) × intermediate {a['moe_intermediate_size']}"
        if a.get("num_experts")
        else ""
    )
    wrapper = f"{a['wrapper']} wrapper, text model " if a.get("wrapper") else ""
    rows = [
        (
            "model",
            f"{p.model} ({wrapper}{a['model_type']}: {a['num_layers']} layers, hidden "
            f"{a['hidden_size']}, intermediate {a['intermediate_size']}, {a['num_heads']} "
            f"heads, {attention}, vocab {a['vocab_size']}{moe})",
        ),
        ("weights", quant),
        *(
            [
                (
                    "beside the text decoder",
                    ", ".join(f"{n} {e:,}" for n, e in a["towers"].items())
                    + f" elements, 16-bit: {_gb(p.checkpoint_bytes['towers'])}; "
                    + f"{_gb(p.tower_bytes_per_gpu)} on each GPU",
                )
            ]
            if a.get("towers")
            else []
        ),
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
    if p.as_stored:
        s = p.as_stored
        rows.append(
            (
                "if served as stored",
                f"weights {_gb(s['weight_bytes_per_gpu'])} per GPU, "
                f"{s['capacity_tokens']:,} tokens: "
                + ("YES" if s["fits"] else "NO")
                + f" (needs {s['needs']})",
            )
        )
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
