"""Checkpoint tensor names <-> a transformers model's parameter names, through transformers' own
checkpoint conversion (``transformers.conversion_mapping`` / ``core_model_loading``: the
renamings and ``WeightConverter`` s that ``from_pretrained`` applies and ``save_pretrained``
reverts), so no architecture's rename table is written here.

Example (Mixtral, transformers >= 5): the hub checkpoint holds one tensor per expert
linear, ``model.layers.0.block_sparse_moe.experts.3.w1.weight`` (I, H), while the model holds
them fused, ``model.layers.0.mlp.experts.gate_up_proj`` (E, 2I, H); ``from_checkpoint`` maps the
model's name to the checkpoint keys and the converter that builds it, ``to_checkpoint``
turns model tensors back into the checkpoint's (hub) names, the names vLLM's model files load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Source:
    """How one model tensor is read: its checkpoint keys (in load order) and, when they are
    merged or reshaped on load, the transformers converter that does it (None: a plain
    (possibly renamed) single tensor)."""

    keys: list[tuple[str, str]]  # (checkpoint key, the converter's source pattern it matched)
    converter: object | None = None

    def build(self, name: str, read: Callable[[str], Tensor]) -> Tensor:
        """The model tensor ``name`` from the checkpoint tensors that ``read(key)`` returns."""
        if self.converter is None:
            return read(self.keys[0][0])
        conv = deepcopy(self.converter)
        for key, pattern in self.keys:
            conv.add_tensor(name, key, pattern, lambda key=key: read(key))
        return conv.convert(name)[name]


def from_checkpoint(model: nn.Module, keys: Iterable[str]) -> dict[str, Source]:
    """For each checkpoint key that ``model`` loads, the model tensor it goes to: a mapping from
    model tensor name to its :class:`Source`. Keys that match no model tensor keep their own
    name (as ``from_pretrained`` would report them unexpected, they are carried unchanged).
    ``model`` may be a meta-device skeleton."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    out: dict[str, Source] = {}
    for key in sorted(keys, key=dot_natural_key):  # the order from_pretrained merges experts in
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:
            name, pattern = key, None
        if name not in expected:
            name, pattern = key, None
        src = out.setdefault(name, Source([], by_pattern[pattern] if pattern else None))
        src.keys.append((key, pattern or key))
    return out


def to_checkpoint(
    model: nn.Module, tensors: dict[str, Tensor], contiguous: bool = True
) -> dict[str, Tensor]:
    """``tensors`` (model names) under the checkpoint names ``save_pretrained`` writes for
    ``model``'s architecture (fused experts split per expert, renamings reverted), made
    contiguous for writing unless ``contiguous`` is False (then possibly views). The identity
    for architectures without conversions (every dense model tested here)."""
    from transformers.core_model_loading import revert_weight_conversion

    out = revert_weight_conversion(model, dict(tensors))
    if not contiguous:
        return out
    return {k: v.contiguous() if isinstance(v, Tensor) else v for k, v in out.items()}


def checkpoint_module(model: nn.Module, name: str) -> str:
    """The name checkpoints give ``model``'s module ``name`` (the prefix of its tensors in
    what ``save_pretrained`` writes, as :func:`to_checkpoint`), e.g. Gemma 3's
    ``model.language_model.layers.0.mlp.up_proj`` -> ``language_model.model.layers.0.mlp.up_proj``,
    ``model.vision_tower`` -> ``vision_tower``. Read off one of its tensors' names (its first
    parameter; ``name.weight`` if it is not a module with parameters, e.g. an expert linear
    already named as in the checkpoint); ``name`` itself if the checkpoint renames that tensor
    beyond its module prefix."""
    suffix = "weight"
    with contextlib.suppress(AttributeError):
        suffix = next(iter(dict(model.get_submodule(name).named_parameters())), suffix)
    probe = torch.empty(0, device="meta")
    keys = list(to_checkpoint(model, {f"{name}.{suffix}": probe}, contiguous=False))
    if len(keys) != 1 or not keys[0].endswith(f".{suffix}"):
        return name
    return keys[0].removesuffix(f".{suffix}")


def auto_model_class(config):
    """transformers' Auto class that builds a generating model of ``config``'s type, as
    ``from_pretrained`` users reach it: ``AutoModelForCausalLM`` (decoder-only models, and
    wrappers it maps, e.g. Gemma 3), else ``AutoModelForImageTextToText`` (multimodal wrappers
    only it maps, e.g. Llava, Mistral 3); ``AutoModelForCausalLM`` (whose error names the
    type) for any other."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    return AutoModelForCausalLM


def is_converted(model: nn.Module) -> bool:
    """Whether ``model``'s checkpoint names differ from its parameter names for some tensor."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return bool(get_model_conversion_mapping(model, add_legacy=False))


# The routing transformers' model runs whatever config.json says, per model type, as the config
# keys vLLM reads to build its router. DeepSeek-V3 (transformers 5.19
# models/deepseek_v3/modeling_deepseek_v3.py, DeepseekV3TopkRouter.forward): sigmoid scores, with
# e_score_correction_bias added to choose the expert groups (sum of each group's two best) and the
# experts but not to weigh them, which is DeepSeek's "noaux_tc". vLLM 0.32's deepseek_v2.py
# (DeepseekV2MoE) builds that router only from topk_method "noaux_tc" (else no bias) and
# scoring_func "sigmoid" (its default: "softmax"). transformers' DeepseekV3Config has no such
# fields (it keeps them only when given), so DeepseekV3Config(...).save_pretrained writes none.
ROUTING_TRANSFORMERS_RUNS: dict[str, dict[str, str]] = {
    "deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid"},
}


def routing_keys(config: Mapping) -> tuple[dict[str, str], dict[str, object]]:
    """(absent, contrary) for a config.json dict: ``absent`` maps each routing key of
    :data:`ROUTING_TRANSFORMERS_RUNS` the config lacks (or sets to null) to the value
    transformers' model runs, which a config served by vLLM must state; ``contrary`` maps each
    key stated with another value to that value (transformers ignores it, vLLM routes by it).
    Both empty for model types whose router transformers builds from the config."""
    runs = ROUTING_TRANSFORMERS_RUNS.get(config.get("model_type"), {})
    absent = {k: v for k, v in runs.items() if config.get(k) is None}
    contrary = {k: config[k] for k, v in runs.items() if config.get(k) not in (None, v)}
    return absent, contrary


__all__ = [
    "ROUTING_TRANSFORMERS_RUNS", "Source", "auto_model_class", "checkpoint_module",
    "from_checkpoint", "is_converted", "routing_keys", "to_checkpoint",
]  # fmt: skip
