"""Finding what to quantize from the model itself: its decoder layers and their linear sublayers.

Nothing here names an architecture's attribute paths (no ``model.model.layers``, no
projection-name lists): the decoder stack is the ModuleList of the classes the model
declares in ``_no_split_modules``, the sublayers are its ``nn.Linear`` children, and the
true-sequential order is read off one forward pass (sublayers fed the same tensor form
one group: q/k/v, then o, then gate/up, then down for a Llama block).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

# Architectures covered by the test-suite (tiny random models of each).
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
# Mixture-of-Experts architectures the quantizer is tested on (tests/test_moe.py); kept apart
# from TESTED_MODEL_TYPES, which the planner also reads and which does not know MoE yet.
TESTED_MOE_MODEL_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: (qualified name, ModuleList)."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())

    def is_block(m: nn.Module) -> bool:
        name = type(m).__name__
        return name in block_names or name.endswith("DecoderLayer")

    stacks = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(is_block(c) for c in m)
    ]
    if len(stacks) != 1:
        found = ", ".join(f"{n} ({len(m)}×{type(m[0]).__name__})" for n, m in stacks) or "none"
        children = ", ".join(f"{n}: {type(m).__name__}" for n, m in model.named_children())
        raise UserError(
            f"unsupported architecture {type(model).__name__}: expected exactly one stack of decoder "
            f"layers (classes {sorted(block_names) or 'ending in DecoderLayer'}), found {found}; "
            f"top-level modules: {children}"
        )
    name, layers = stacks[0]
    if not find_linears(layers[0]):  # e.g. GPT-2's blocks use transformers' Conv1D
        held_by = sorted(
            {
                type(m).__name__
                for m in layers[0].modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor)
            }
        )
        raise UserError(
            f"unsupported architecture {type(model).__name__}: its decoder layers {name} "
            f"({type(layers[0]).__name__}) have no nn.Linear sublayers; their weights are held "
            f"by {', '.join(held_by) or 'nothing'}"
        )
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    if model_type not in TESTED_MODEL_TYPES + TESTED_MOE_MODEL_TYPES:
        log.warning(
            "model_type %r is not in the tested set %s: check the result",
            model_type,
            TESTED_MODEL_TYPES + TESTED_MOE_MODEL_TYPES,
        )
    return name, layers


def find_linears(layer: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The layer's nn.Linear sublayers by relative name, minus names matching a ``skip`` regex."""
    patterns = [re.compile(p) for p in skip]
    return {
        name: m
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear) and not any(p.search(name) for p in patterns)
    }


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed input was seen."""


def sequential_groups(linears: dict[str, nn.Linear], run: Callable[[], object]) -> list[list[str]]:
    """Sublayers in execution order, grouped by shared input tensor (true-sequential order).

    ``run`` performs one forward pass of the layer.
    """
    # An input is identified by its memory, shape, strides and version (in-place writes bump
    # it). Inputs are kept alive until the pass ends: a freed input's memory may be reused for
    # a later, different input of the same shape, which would then look shared.
    calls: list[tuple[str, torch.Tensor, int]] = []
    handles = [
        m.register_forward_pre_hook(
            lambda _m, args, name=name: calls.append((name, args[0], args[0]._version))
        )
        for name, m in linears.items()
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_key = None
    for name, x, version in calls:
        # meta tensors (a skeleton traced without weights) all have data_ptr 0: the object
        # itself, kept alive in ``calls``, identifies them
        key = (id(x) if x.is_meta else x.data_ptr(), tuple(x.shape), x.stride(), version)
        if any(name in g for g in groups):
            continue  # called twice: keep its first position
        if groups and key == last_key:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_key = key
    missing = set(linears) - {n for g in groups for n in g}
    if missing:
        raise UserError(f"linear sublayers never called in a forward pass: {sorted(missing)}")
    return groups


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """Linears of ``model`` that read one input tensor (e.g. q/k/v, gate/up of every Llama
    block), as lists of full module names with two or more members, in execution order.

    Read off one forward pass of four tokens; ``model`` may be a meta-device skeleton (built from
    its config under ``torch.device("meta")``), so no weights are needed. Engines that fuse such
    siblings into one layer (vLLM's ``qkv_proj``, ``gate_up_proj``) need them quantized alike.
    Raises UserError if the model cannot run that pass (e.g. an op without a meta kernel).
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    device = next(model.parameters()).device
    ids = torch.zeros(1, 4, dtype=torch.long, device=device)
    try:
        groups = sequential_groups(linears, lambda: model(input_ids=ids))
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        raise UserError(
            f"cannot trace {type(model).__name__} to find the linears that share an input: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    return [g for g in groups if len(g) > 1]
