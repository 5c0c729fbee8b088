"""Mixture-of-Experts layers: experts found from the model itself, each expert linear quantized
as its own linear of the checkpoint contract, routers left dense, and the Hessians each expert
linear is calibrated with.

Layout (transformers >= 5): a decoder layer's experts are held fused, as 3-D parameters of one
module, e.g. Mixtral's ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj``
(E, H, I), applied as ``F.linear(x, gate_up_proj[e])``. Nothing here names an architecture:

- fused experts: a module's parameters with 3 or more dimensions (first = expert);
- the per-expert linears and their checkpoint names: transformers' reverse checkpoint
  conversion (what ``save_pretrained`` writes: ``block_sparse_moe.experts.{e}.w1`` for Mixtral,
  ``mlp.experts.{e}.gate_proj`` for Qwen3-MoE, the names vLLM's ``load_weights`` map), applied
  to index probes so that each stored linear is known as (parameter, expert, rows);
- which linear reads what: the F.linear calls the experts module makes (a TorchFunctionMode),
  in call order: stage 0 reads the experts' input, stage 1 the intermediate, ...;
- routers: inside the block that holds the experts, a sibling module whose weight has one row
  per expert (it selects experts) or a single row (a shared-expert gate).

Calibration (``--moe-calibration``): ``all`` (llm-compressor's choice) feeds every calibration
token through every expert for the Hessians, so stage 0 of every expert shares one H (the
experts' input), factored once per layer; ``routed`` uses only the tokens the router sends.
Under ``routed``, an expert linear with fewer than ``--moe-min-tokens`` tokens falls back to
its all-token Hessian and is counted in the report (under ``all`` every expert sees every
token: nothing falls back, and fewer calibration tokens than the minimum are logged). The
layer's outputs for the next layer always use the real routing.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from leanquant_serve.format.hf_names import to_checkpoint

from .errors import UserError

CALIBRATION = ("all", "routed")
LARGE_SHARE = 0.01  # of a decoder layer's parameters: larger weights must be quantized or skipped
# per-expert Hessians (down projections; every stage under routed calibration) held at once:
# experts are calibrated in chunks that fit (Qwen3-30B-A3B's 128 x 768^2 fp32 = 302 MB: one)
EXPERT_HESSIAN_BYTES = 1 << 30


@dataclass(frozen=True)
class ExpertLinear:
    """One expert linear: stored as ``name`` (relative to the decoder layer, checkpoint
    naming), held as rows ``rows`` of expert ``expert`` of the fused parameter ``param``."""

    name: str
    param: str  # relative to the decoder layer, e.g. "mlp.experts.gate_up_proj"
    expert: int
    rows: tuple[int, int]


@dataclass
class FusedExperts:
    """A module holding E experts as 3-D parameters (E, out, in), and its stored linears."""

    name: str  # relative to the decoder layer, e.g. "mlp.experts"
    module: nn.Module
    num_experts: int
    linears: list[ExpertLinear]
    stages: dict[str, int] = field(default_factory=dict)  # param -> position in the call order

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return {
            f"{self.name}.{n}": p for n, p in self.module.named_parameters(recurse=False)
            if p.dim() >= 3
        }  # fmt: skip

    def weight(self, lin: ExpertLinear) -> Tensor:
        """The expert linear's (out, in) weight: a view of its fused parameter."""
        return self.params[lin.param].data[lin.expert, lin.rows[0] : lin.rows[1]]


def find_fused_experts(model: nn.Module, layer: nn.Module, prefix: str) -> list[FusedExperts]:
    """The fused experts modules of decoder layer ``layer`` (named ``prefix`` in ``model``),
    with each expert linear's checkpoint name, expert and rows. Raises UserError for a layout
    whose stored linears are not row blocks of one expert (e.g. transposed experts)."""
    found = []
    for mname, module in layer.named_modules():
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() >= 3}
        if not params:
            continue
        full = f"{prefix}.{mname}"
        num = {p.shape[0] for p in params.values()}
        if len(num) != 1 or any(p.dim() != 3 for p in params.values()):
            raise UserError(f"{full}: expert parameters {sorted(params)} are not (E, out, in)")
        # the same for every layer of one structure: located once per model (seconds at 128
        # experts), kept on the model
        cache = model.__dict__.setdefault("_leanquant_expert_linears", {})
        key = (mname, tuple((n, tuple(p.shape)) for n, p in params.items()))
        if key not in cache:
            cache[key] = _stored_linears(model, full, params, prefix)
        linears = cache[key]
        found.append(FusedExperts(mname, module, num.pop(), linears))
    return found


def _stored_linears(
    model: nn.Module, full: str, params: dict[str, nn.Parameter], prefix: str
) -> list[ExpertLinear]:
    """Each checkpoint linear of the fused ``params``, located by converting an index probe
    with transformers' reverse conversion: the probe has each parameter's (E, out) shape and
    two columns, both holding each row's (parameter, expert, row) code (the conversions split
    experts and rows; two columns are enough to see that no transposition mixes rows and
    columns, and keep the probe small: E x out x 2 int64)."""
    names = list(params)
    base, probe, bases = 0, {}, []
    for n in names:
        E, R, _ = params[n].shape
        codes = torch.arange(base, base + E * R, dtype=torch.int64).view(E, R, 1)
        probe[f"{full}.{n}"] = codes.expand(E, R, 2).contiguous()
        bases.append(base)
        base += E * R
    linears = []
    for key, r in to_checkpoint(model, probe, contiguous=False).items():
        bad = UserError(
            f"{full}: checkpoint tensor {key} is not a block of rows of one expert "
            "(unsupported fused-experts layout)"
        )
        if r.dim() != 2 or not key.startswith(prefix + ".") or not key.endswith(".weight"):
            raise bad
        code = int(r[0, 0])
        k = max(i for i, b in enumerate(bases) if b <= code)
        R = params[names[k]].shape[1]
        e, r0 = divmod(code - bases[k], R)
        want = torch.arange(code, code + r.shape[0])
        if r.shape[1] != 2 or r0 + r.shape[0] > R or not bool((r == want.view(-1, 1)).all()):
            raise bad
        name = key[len(prefix) + 1 : -len(".weight")]
        param = f"{full[len(prefix) + 1 :]}.{names[k]}"
        linears.append(ExpertLinear(name, param, e, (r0, r0 + r.shape[0])))
    return sorted(linears, key=lambda x: (x.expert, x.param, x.rows))


class ExpertInputs(TorchFunctionMode):
    """Calls ``sink(param, expert, x)`` for every ``F.linear(x, W)`` whose W is one expert's
    slice of a fused parameter in ``params`` (relative name -> parameter)."""

    def __init__(self, params: dict[str, nn.Parameter], sink: Callable[[str, int, Tensor], None]):
        super().__init__()
        self.params, self.sink = params, sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            for name, p in self.params.items():
                if (
                    w.dim() == 2
                    and w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                ):
                    e = (w.storage_offset() - p.storage_offset()) // p.stride(0)
                    self.sink(name, e, args[0] if args else kwargs["input"])
                    break
        return func(*args, **kwargs)


def call_order(fe: FusedExperts, run: Callable[[], object]) -> dict[str, int]:
    """Stage of each fused parameter: its position in the order the experts call them (the
    first reads the experts' input); read off ``run``, one forward pass of the layer."""
    order: list[str] = []
    mode = ExpertInputs(fe.params, lambda n, _e, _x: order.append(n) if n not in order else None)

    def on(*_) -> None:  # (returns None: a pre-hook's return value replaces the inputs)
        mode.__enter__()

    def off(*_) -> None:
        mode.__exit__(None, None, None)

    enter = fe.module.register_forward_pre_hook(on)
    leave = fe.module.register_forward_hook(off)
    try:
        with torch.no_grad():
            run()
    finally:
        enter.remove()
        leave.remove()
    missing = set(fe.params) - set(order)
    if missing:
        raise UserError(
            f"{fe.name}: expert parameters never used in a forward pass: {sorted(missing)}"
        )
    return {n: i for i, n in enumerate(order)}


def route_all(fe: FusedExperts, experts: Iterable[int] | None = None):
    """A call of the experts module sending every token to every expert in ``experts``
    (default: all) with weight 1 (its signature: hidden_states, top_k_index, top_k_weights).
    Raises UserError if the module is not called that way."""
    sig = inspect.signature(fe.module.forward)
    if list(sig.parameters)[:3] != ["hidden_states", "top_k_index", "top_k_weights"]:
        raise UserError(
            f"{fe.name} ({type(fe.module).__name__}): cannot route every token to every expert "
            "(its forward is not (hidden_states, top_k_index, top_k_weights)); use "
            "--moe-calibration routed"
        )
    ids = torch.tensor(list(range(fe.num_experts) if experts is None else experts))

    def call(x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        idx = ids.to(x.device).expand(x.shape[0], -1)
        fe.module.forward(x, idx, torch.ones(idx.shape, dtype=x.dtype, device=x.device))

    return call


def routers(layer: nn.Module, fused: list[FusedExperts]) -> dict[str, str]:
    """Modules (relative names) of ``layer`` that route tokens to experts, with why: inside the
    block holding the experts, a sibling module whose 2-D weight has one row per expert
    (selects experts) or a single row (a shared-expert gate). They stay dense."""
    found = {}
    for fe in fused:
        block_name = fe.name.rpartition(".")[0]
        block = layer.get_submodule(block_name) if block_name else layer
        for cname, child in block.named_children():
            w = getattr(child, "weight", None)
            if child is fe.module or not isinstance(w, Tensor) or w.dim() != 2:
                continue
            full = f"{block_name}.{cname}" if block_name else cname
            if w.shape[0] == fe.num_experts:
                found[full] = f"router: one output per expert ({fe.num_experts})"
            elif w.shape[0] == 1:
                found[full] = "expert gate: one output"
    return found


def unquantized_large(
    layer: nn.Module, quantized: set[str], kept: dict[str, str], skip: Iterable[str]
) -> tuple[list[dict], list[tuple[str, tuple[int, ...], float]]]:
    """Weights (≥ 2-D, ≥ LARGE_SHARE of the layer's parameters) of ``layer`` that are neither
    in ``quantized`` (parameter names) nor kept by rule (``kept``: module name -> why):
    (those matching a ``skip`` regex, as report entries; the others as (name, shape, share))."""
    patterns = [re.compile(p) for p in skip]
    total = sum(p.numel() for p in layer.parameters())
    skipped, refused = [], []
    for name, p in layer.named_parameters():
        module = name.rpartition(".")[0]
        if p.dim() < 2 or name in quantized:
            continue
        share = p.numel() / total
        if module in kept:
            skipped.append(
                {"name": name, "shape": list(p.shape), "share": share, "why": kept[module]}
            )
        elif any(r.search(name) or r.search(module) for r in patterns):
            skipped.append({"name": name, "shape": list(p.shape), "share": share, "why": "--skip"})
        elif share >= LARGE_SHARE:
            refused.append((name, tuple(p.shape), share))
    return skipped, refused
