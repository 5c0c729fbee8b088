"""Finding what to quantize from the model itself: its decoder layers and their linear sublayers.

Nothing here names an architecture's attribute paths (no ``model.model.layers``, no
projection-name lists): the decoder stack is the ModuleList of the classes the model
declares in ``_no_split_modules``, the sublayers are its ``nn.Linear`` children, and the
true-sequential order is read off one forward pass (sublayers fed the same tensor form
one group: q/k/v, then o, then gate/up, then down for a Llama block).

Multimodal wrappers (``Gemma3ForConditionalGeneration``: a vision tower, a projector and a
text decoder) hold several such stacks; the text decoder's is the one beside the model's token
embeddings (``get_input_embeddings``), and what sits beside the text decoder (towers,
projectors) is found the same way (:func:`beside_text_decoder`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from leanquant_serve.format.hf_names import checkpoint_module, to_checkpoint

from .errors import UserError

log = logging.getLogger(__name__)

# Architectures covered by the test-suite (tiny random models of each).
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
# Mixture-of-Experts architectures the quantizer is tested on (tests/test_moe.py; DeepSeek-V3,
# MLA and a first dense layer: tests/test_moe_deepseek.py); kept apart from TESTED_MODEL_TYPES,
# which the planner also reads and which does not know MoE yet.
TESTED_MOE_MODEL_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3")
# Multimodal wrappers tested (tests/test_multimodal.py): quantized on their text decoder, which
# must be of a tested type above. Apart from TESTED_MODEL_TYPES for the same reason as MoE.
TESTED_MULTIMODAL_MODEL_TYPES = ("gemma3", "mistral3")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: (qualified name, ModuleList).

    A stack is a ModuleList whose every member is a block (a class in ``_no_split_modules`` or
    one ending in ``DecoderLayer``). Of several (a multimodal wrapper's vision encoder and text
    decoder), the text decoder's: the one nearest the token embeddings. Raises UserError if no
    single stack is found, if its layers hold no nn.Linear, or if the model is a wrapper whose
    text decoder is not of a tested architecture (TESTED_MODEL_TYPES, TESTED_MOE_MODEL_TYPES).
    """
    block_names = set(getattr(model, "_no_split_modules", None) or ())

    def is_block(m: nn.Module) -> bool:
        name = type(m).__name__
        return name in block_names or name.endswith("DecoderLayer")

    stacks = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(is_block(c) for c in m)
    ]
    if len(stacks) > 1:
        stacks = _nearest_to_embeddings(model, stacks)
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
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "?")
    text_types = TESTED_MODEL_TYPES + TESTED_MOE_MODEL_TYPES
    if beside_text_decoder(model, name):  # a wrapper: quantized on its text decoder only
        text_type = getattr(config.get_text_config(), "model_type", "?")
        if text_type not in text_types:
            raise UserError(
                f"unsupported text decoder in {type(model).__name__}: its text model is "
                f"{text_type!r} ({type(layers[0]).__name__} layers), not one of the tested "
                f"architectures {', '.join(text_types)}"
            )
        if model_type not in TESTED_MULTIMODAL_MODEL_TYPES:
            log.warning(
                "multimodal model_type %r is not in the tested set %s (its text model %r is): "
                "check the result", model_type, TESTED_MULTIMODAL_MODEL_TYPES, text_type,
            )  # fmt: skip
    elif model_type not in text_types:
        log.warning(
            "model_type %r is not in the tested set %s: check the result", model_type, text_types
        )
    return name, layers


def _input_embeddings_name(model: nn.Module) -> str | None:
    """Qualified name of the model's token embeddings (``get_input_embeddings``), if any."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((n for n, m in model.named_modules() if m is emb), None)


def _common_ancestor(a: str, b: str) -> str:
    """The deepest module containing both qualified names ("" for the root)."""
    common = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _nearest_to_embeddings(
    model: nn.Module, stacks: list[tuple[str, nn.ModuleList]]
) -> list[tuple[str, nn.ModuleList]]:
    """Of several stacks, those whose deepest common ancestor with the token embeddings is
    deepest (the text decoder's, beside its embeddings); all of them if that is not one."""
    emb = _input_embeddings_name(model)
    if emb is None:
        return stacks
    depth = {n: len(_common_ancestor(n, emb)) for n, _ in stacks}
    best = [(n, m) for n, m in stacks if depth[n] == max(depth.values())]
    return best if len(best) == 1 else stacks


def beside_text_decoder(model: nn.Module, layers_name: str) -> list[str]:
    """Modules of a multimodal wrapper outside its text decoder (vision/audio towers,
    projectors), by qualified name, in definition order; [] for a plain causal LM.

    The text decoder is the deepest module holding both the decoder stack ``layers_name`` and
    the token embeddings (Gemma 3: ``model.language_model``); the modules beside it are the
    other children, holding parameters, of the modules above it, except the output embeddings
    (the LM head). Gemma3ForConditionalGeneration: ``model.vision_tower``,
    ``model.multi_modal_projector``.
    """
    emb = _input_embeddings_name(model)
    if emb is None:
        return []
    text = _common_ancestor(layers_name, emb)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parts = text.split(".") if text else []
    beside = []
    for depth in range(len(parts)):  # the modules above the text decoder, root first
        parent = ".".join(parts[:depth])
        for child, m in model.get_submodule(parent).named_children():
            full = f"{parent}.{child}" if parent else child
            if child == parts[depth] or m is head or next(m.parameters(), None) is None:
                continue
            beside.append(full)
    return beside


def find_linears(layer: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The layer's nn.Linear sublayers by relative name, minus names matching a ``skip`` regex."""
    patterns = [re.compile(p) for p in skip]
    return {
        name: m
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear) and not any(p.search(name) for p in patterns)
    }


def skip_matches(
    model: nn.Module, layer: nn.Module, prefix: str, fused, skip: Iterable[str]
) -> dict[str, set[str]]:
    """For each ``--skip`` regex, the modules of decoder layer ``layer`` (named ``prefix`` in
    ``model``) it keeps unquantized, by relative name (nn.Linear sublayers, fused experts
    modules, other modules holding weights of 2 or more dimensions); an empty set where it
    matches none of them.

    A regex is searched in the layer-relative names of both schemes a user meets: the model's
    (transformers' in-memory names, e.g. Mixtral's ``mlp.gate``, ``mlp.experts.gate_up_proj``)
    and the checkpoint's (what ``save_pretrained`` writes and the report, the checkpoint and
    ``modules_to_not_convert`` name: ``block_sparse_moe.gate``,
    ``block_sparse_moe.experts.3.w2``; hf_names.to_checkpoint). A fused experts module
    (``fused``: moe.FusedExperts of the layer) is kept when a regex matches its own or one of
    its parameters' names, or every expert linear it holds; a regex matching only some of them
    (one expert, or ``w2`` of every expert) raises UserError: a fused module is kept or
    quantized whole."""
    patterns = {p: re.compile(p) for p in skip}
    if not patterns:
        return {}
    linears, others = find_linears(layer), _other_weights(layer, fused)
    ckpt = _checkpoint_names(model, layer, prefix, [*linears, *others])
    out: dict[str, set[str]] = {}
    for text, r in patterns.items():
        kept = out.setdefault(text, set())
        kept.update(n for n in linears if r.search(n) or r.search(ckpt[n]))
        kept.update(
            m for m in others if any(r.search(x) for x in (m, ckpt[m], *_params_of(layer, m)))
        )
        for fe in fused:
            if any(r.search(x) for x in (fe.name, *fe.params)):
                kept.add(fe.name)
                continue
            names = [lin.name for lin in fe.linears]
            hit = [n for n in names if r.search(n)]
            if len(hit) == len(names):
                kept.add(fe.name)
            elif hit:
                whole = os.path.commonprefix(names).rpartition(".")[0] or fe.name
                raise UserError(
                    f"--skip '{text}' matches {len(hit)} of the {len(names)} expert linears "
                    f"held fused in {prefix}.{fe.name} (e.g. {hit[0]}): fused experts are kept "
                    f"or quantized whole; --skip '{re.escape(whole)}\\.' keeps them all"
                )
    return out


def skipped_modules(
    model: nn.Module, layer: nn.Module, prefix: str, fused, skip: Iterable[str]
) -> set[str]:
    """The modules of ``layer`` that ``--skip`` keeps unquantized (:func:`skip_matches`)."""
    return set().union(*skip_matches(model, layer, prefix, fused, skip).values())


def layer_names(model: nn.Module, layer: nn.Module, prefix: str, fused) -> list[str]:
    """Names a ``--skip`` regex can match in ``layer`` (for messages): its linears' and other
    weights' model and checkpoint names, then each fused experts module's name and its first
    expert's linears."""
    ckpt = _checkpoint_names(
        model, layer, prefix, [*find_linears(layer), *_other_weights(layer, fused)]
    )
    names = [*ckpt, *ckpt.values()]
    for fe in fused:
        names += [fe.name, *(lin.name for lin in fe.linears if lin.expert == 0)]
    return list(dict.fromkeys(names))


def _other_weights(layer: nn.Module, fused) -> list[str]:
    """Modules of ``layer`` holding a weight of 2 or more dimensions that is neither an
    nn.Linear's nor a fused experts module's (e.g. transformers 5's Mixtral router)."""
    owned = set(find_linears(layer)) | {fe.name for fe in fused}
    return sorted(
        {
            name.rpartition(".")[0]
            for name, p in layer.named_parameters()
            if p.dim() >= 2 and name.rpartition(".")[0] not in owned
        }
    )


def _params_of(layer: nn.Module, module: str) -> list[str]:
    return [f"{module}.{n}" for n, _ in layer.get_submodule(module).named_parameters(recurse=False)]


def _checkpoint_names(
    model: nn.Module, layer: nn.Module, prefix: str, modules: Iterable[str]
) -> dict[str, str]:
    """Layer-relative module name -> its layer-relative checkpoint name (itself where the
    checkpoint does not rename it, or splits its first parameter), by one reverse conversion
    of each module's first parameter (told apart by identity; a split makes new tensors)."""
    firsts = {m: _params_of(layer, m)[0] for m in modules}
    probes = {m: layer.get_parameter(firsts[m]) for m in firsts}
    ckpt_prefix = checkpoint_module(model, prefix)
    out = {m: m for m in firsts}
    converted = to_checkpoint(
        model, {f"{prefix}.{firsts[m]}": t for m, t in probes.items()}, contiguous=False
    )
    for key, t in converted.items():
        m = next((m for m, p in probes.items() if p is t), None)
        suffix = None if m is None else firsts[m][len(m) :]  # e.g. ".weight"
        if m is not None and key.endswith(suffix):
            out[m] = key.removesuffix(suffix).removeprefix(f"{ckpt_prefix}.")
    return out


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed input was seen."""


def sequential_groups(linears: dict[str, nn.Linear], run: Callable[[], object]) -> list[list[str]]:
    """Sublayers in execution order, grouped by shared input tensor (true-sequential order).

    A group is every sublayer fed one tensor, also when other sublayers run between them
    (DeepSeek's MLA: ``q_a_proj``, ``q_b_proj``, then ``kv_a_proj_with_mqa`` on ``q_a_proj``'s
    input), placed at its first member's call: they share one H, hence one act-order
    permutation and one ``g_idx``, as the engines that fuse them (vLLM's ``fused_qkv_a_proj``)
    need. Quantizing a later member with the group loses nothing: its input existed before the
    group's first call, so no sublayer quantized in between can change it.

    ``run`` performs one forward pass of the layer. Raises UserError if a sublayer is never
    called.
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
    group_of: dict[tuple, list[str]] = {}  # input key -> the group its readers form
    for name, x, version in calls:
        # meta tensors (a skeleton traced without weights) all have data_ptr 0: the object
        # itself, kept alive in ``calls``, identifies them
        key = (id(x) if x.is_meta else x.data_ptr(), tuple(x.shape), x.stride(), version)
        if any(name in g for g in groups):
            continue  # called twice: keep its first position
        if key in group_of:
            group_of[key].append(name)
        else:
            group_of[key] = [name]
            groups.append(group_of[key])
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
