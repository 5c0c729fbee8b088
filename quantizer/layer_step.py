"""One decoder layer's step: load it, quantize its linears group by group in true-sequential
order (the GPTQ loop of quantizer/gptq.py, rows split over the devices), check each stored
form through the reference dequantizer, advance the calibration inputs through the quantized
layer, hand every tensor to the writer and free the layer.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from leanquant_serve.format import dequantize_linear, pack_linear
from leanquant_serve.format.hf_names import checkpoint_module, to_checkpoint

from . import moe
from .activations import Activations
from .capture import hessian, layer_forward, load_layer
from .errors import UserError
from .gptq import CholeskyError, Hessian, QuantizedWeight, prepare, quantize_weight
from .grids import FP16_MAX, ROW_COUPLED_GRIDS, FP16RangeError
from .job import Run, SublayerReport
from .model_walk import StopForward, find_linears, sequential_groups, skipped_modules
from .moe import (
    ExpertInputs,
    ExpertLinear,
    FusedExperts,
    call_order,
    find_fused_experts,
    route_all,
    routers,
)

log = logging.getLogger(__name__)


def layer_linears(run: Run, layer: nn.Module, prefix: str):
    """What of decoder layer ``layer`` is quantized: (its nn.Linear sublayers minus --skip and
    routers, its fused experts minus --skip, its routers: module name -> why)."""
    job = run.job
    fused = find_fused_experts(run.model, layer, prefix)
    kept = routers(layer, fused)
    skipped = skipped_modules(run.model, layer, prefix, fused, job.skip)
    linears = {n: m for n, m in find_linears(layer).items() if n not in kept and n not in skipped}
    fused = [fe for fe in fused if fe.name not in skipped]
    return linears, fused, kept


def quantize_layer(
    run: Run, i: int, acts: Activations | None, kwargs: dict
) -> tuple[list[SublayerReport], list[dict]]:
    """Load decoder layer ``i``, quantize its linears group by group and then its experts
    (Hessians from ``acts``, whose inputs then advance through the quantized layer), hand
    every tensor to the writer (under the checkpoint's names, hf_names.to_checkpoint) and
    free the layer; returns its sublayer reports and its MoE fallbacks.

    The writer gets the layer's unquantized tensors first, then each sublayer's tensors as
    soon as it is stored (in the order quantized): the layer's results are never all held."""
    src, writer = run.src, run.writer
    prefix, layer = f"{run.layers_name}.{i}", run.layers[i]
    linears, fused, _ = layer_linears(run, layer, prefix)
    quantized_weights = {f"{prefix}.{n}.weight" for n in linears}
    quantized_weights |= {f"{prefix}.{p}" for fe in fused for p in fe.params}
    layer_names = src.names(prefix + ".")
    stored = load_layer(
        src, layer, prefix, run.device, run.dtype, set(layer_names) - quantized_weights,
        stored_blocks(fused, prefix),
    )  # fmt: skip
    rest = {
        n: stored[n] if n in stored else src.get(n)
        for n in layer_names
        if n not in quantized_weights
    }
    writer.add(to_checkpoint(run.model, rest))
    del stored, rest
    reports: list[SublayerReport] = []
    fallbacks: list[dict] = []
    n_experts = sum(len(fe.linears) for fe in fused)
    sub = tqdm(total=len(linears) + n_experts, desc=f"layer {i}", unit="sublayer", leave=False)

    def write(results: Iterable[tuple[dict[str, Tensor], SublayerReport]]) -> None:
        for tensors, report in results:
            writer.add(tensors)
            del tensors  # (the writer holds its own copy)
            reports.append(report)
            sub.update()

    if acts is None:
        for name in linears:
            write(quantize_members(run, prefix, [name], linears, None))
    else:
        run_first = functools.partial(layer_forward, layer, acts.first(), kwargs)
        for group in sequential_groups(linears, run_first):
            h = hessian(layer, linears[group[0]], acts, kwargs, run.hessian_device)
            check_finite(h, f"{prefix}.{group[0]}", i)
            write(quantize_members(run, prefix, group, linears, h))
            del h
    for fe in fused:
        write(quantize_experts(run, prefix, i, layer, fe, acts, kwargs, fallbacks))
    if acts is not None:
        with torch.no_grad():  # inputs of the next layer, through the quantized layer
            step = functools.partial(layer_forward, layer, kwargs=kwargs)
            finite = acts.advance(step, keep=i + 1 < len(run.layers))
        if not finite:
            raise UserError(
                f"{prefix}: the quantized layer's outputs contain NaN/Inf "
                "(try --dtype float32, a larger --damp or other calibration data)"
            )
    sub.close()
    layer.to("meta")  # free the layer
    return reports, fallbacks


def stored_blocks(
    fused: list[FusedExperts], prefix: str
) -> dict[str, list[tuple[str, int, int, int]]]:
    """Each fused parameter of the experts of decoder layer ``prefix`` (relative name) -> its
    stored linears as (checkpoint key, expert, first row, end row): what load_layer fills it
    from one linear at a time."""
    blocks: dict[str, list[tuple[str, int, int, int]]] = {}
    for fe in fused:
        for lin in fe.linears:
            key = f"{prefix}.{lin.name}.weight"
            blocks.setdefault(lin.param, []).append((key, lin.expert, *lin.rows))
    return blocks


def check_finite(h: Hessian, name: str, i: int) -> None:
    if not torch.isfinite(h.H).all():
        raise UserError(
            f"{name}: the Hessian of its calibration inputs has NaN/Inf (the activations "
            f"entering layer {i} overflowed or are NaN; try --dtype float32 or other "
            "calibration data)"
        )


def _as_linear(W: Tensor) -> nn.Linear:
    """An nn.Linear whose weight is ``W`` (out, in) itself, no copy (a view of a fused
    experts parameter): what quantize_members works on and writes Q into."""
    m = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    m.weight = nn.Parameter(W, requires_grad=False)
    return m


def quantize_experts(
    run: Run,
    prefix: str,
    i: int,
    layer: nn.Module,
    fe: FusedExperts,
    acts: Activations | None,
    kwargs: dict,
    fallbacks: list[dict],
) -> Iterator[tuple[dict[str, Tensor], SublayerReport]]:
    """Quantize every expert linear of ``fe`` (each stored as its own linear), stage by stage
    in call order (gate/up, then down with the quantized gate/up upstream), yielding each
    one's checkpoint tensors and report as soon as it is stored; its Q is written into the
    fused parameter in place (a stage's inputs depend only on earlier stages, so the Hessians
    are those of writing Q back after the stage). H per stage: ``all``, stage 0: the experts'
    input, one H for every expert, factored once; ``all``, later stages: one H per (expert,
    parameter) from every token; ``routed``: one H per (expert, parameter) from the tokens the
    router sends, falling back to the expert's all-token H below ``--moe-min-tokens`` tokens
    (appended to ``fallbacks``)."""
    job = run.job
    mods = {lin.name: _as_linear(fe.weight(lin)) for lin in fe.linears}
    if acts is None:  # RTN
        for lin in fe.linears:
            yield from quantize_members(run, prefix, [lin.name], mods, None)
        return
    stages = call_order(fe, functools.partial(layer_forward, layer, acts.first(), kwargs))
    feeds = ExpertFeeds(run, layer, fe, acts, kwargs)
    for stage in sorted(set(stages.values())):
        params = [p for p, s in stages.items() if s == stage]
        lins = [lin for lin in fe.linears if lin.param in params]
        if stage == 0 and job.moe_calibration == "all":
            h = feeds.input_hessian(consume=True)
            check_finite(h, f"{prefix}.{fe.name}", i)
            yield from quantize_members(run, prefix, [lin.name for lin in lins], mods, h)
        else:
            # per-expert Hessians, a chunk of experts at a time (at most
            # moe.EXPERT_HESSIAN_BYTES of them held at once; the same bytes for any chunk)
            columns = max(fe.params[p].shape[-1] for p in params)
            per_expert = len(params) * columns * columns * 4
            chunk = max(1, moe.EXPERT_HESSIAN_BYTES // per_expert)
            for first in range(0, fe.num_experts, chunk):
                experts = set(range(first, min(first + chunk, fe.num_experts)))
                part = [lin for lin in lins if lin.expert in experts]
                yield from _expert_groups(
                    run, prefix, i, feeds, mods, params, part, experts, stage == 0, fallbacks
                )


def _expert_groups(
    run: Run,
    prefix: str,
    i: int,
    feeds: ExpertFeeds,
    mods: dict[str, nn.Linear],
    params: list[str],
    lins: list[ExpertLinear],
    experts: set[int],
    stage0: bool,
    fallbacks: list[dict],
) -> Iterator[tuple[dict[str, Tensor], SublayerReport]]:
    """Quantize ``lins`` (one stage, the given ``experts``; ``stage0``: the stage reading the
    experts' input) with one H per (parameter, expert) from the tokens --moe-calibration
    sends. ``routed``: those below --moe-min-tokens use their all-token H instead (appended
    to ``fallbacks``). ``all``: every expert already sees every calibration token, so none
    falls back; a calibration set below --moe-min-tokens is logged."""
    job = run.job
    route = None if job.moe_calibration == "routed" else "all"
    hs = feeds.hessians(params, route, experts)
    keys = sorted({(lin.param, lin.expert) for lin in lins})
    by_key: dict[tuple[str, int], list[str]] = {}
    for lin in lins:
        by_key.setdefault((lin.param, lin.expert), []).append(lin.name)
    counts = {k: hs[k].n if k in hs else 0 for k in keys}
    starved = []
    if route is None:
        starved = [k for k in keys if k not in hs or hs[k].n < job.moe_min_tokens]
    else:
        few = sorted({hs[k].n for k in keys if hs[k].n < job.moe_min_tokens})
        if few:
            log.warning(
                "%s: --moe-calibration all sends every one of the %d calibration tokens to "
                "every expert, fewer than --moe-min-tokens %d; nothing to fall back to (more "
                "calibration tokens raise it)", prefix, few[0], job.moe_min_tokens,
            )  # fmt: skip
    for key in starved:
        tokens = hs[key].n if key in hs else 0
        fallbacks += [{"name": f"{prefix}.{n}", "tokens": tokens} for n in by_key[key]]
    groups = [(by_key[k], hs.pop(k)) for k in keys if k not in starved]
    if starved and stage0:  # the experts' input: one H for all of them, factored once
        groups.append(([n for k in starved for n in by_key[k]], feeds.input_hessian()))
    elif starved:
        hs = feeds.hessians(params, "all", {e for _, e in starved})
        groups += [(by_key[k], hs.pop(k)) for k in starved]
    # routed: each linear's routed token count goes in its report (SublayerReport.routed_tokens)
    routed = {n: hs_n for k, hs_n in counts.items() for n in by_key[k]} if route is None else {}
    for names, h in groups:
        check_finite(h, f"{prefix}.{names[0]}", i)
        for tensors, report in quantize_members(run, prefix, names, mods, h):
            report.routed_tokens = routed.get(report.name)
            yield tensors, report


class ExpertFeeds:
    """The Hessians of a fused experts module's linears over the calibration inputs: the
    layer is run up to the experts for every batch, whose input is then fed (under
    moe.ExpertInputs) as the router sends it, or to every expert."""

    def __init__(self, run: Run, layer: nn.Module, fe: FusedExperts, acts, kwargs) -> None:
        self.run, self.layer, self.fe, self.acts, self.kwargs = run, layer, fe, acts, kwargs
        self._input: Hessian | None = None

    def _each_batch(self, feed) -> None:
        """``feed(args, kwargs)`` with the experts module's inputs, for every batch."""

        def hook(_m, args, kwargs):
            feed(args, kwargs)
            raise StopForward

        handle = self.fe.module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for x in self.acts:
                    try:
                        layer_forward(self.layer, x, self.kwargs)
                    except StopForward:
                        pass
        finally:
            handle.remove()

    def input_hessian(self, consume: bool = False) -> Hessian:
        """H of the experts' input (every token), accumulated once per layer. quantize_members
        consumes the H it is given: a copy unless ``consume`` (the last use)."""
        if self._input is None:
            first = next(iter(self.fe.params.values()))
            h = Hessian(first.shape[-1], self.run.hessian_device)
            self._each_batch(lambda args, kw: h.add_batch(args[0] if args else kw["hidden_states"]))
            self._input = h
        if consume:
            h, self._input = self._input, None
            return h
        h = Hessian(self._input.H.shape[0], self._input.H.device)
        h.H, h.n = self._input.H.clone(), self._input.n
        return h

    def hessians(
        self, params: list[str], route: str | None, experts: set[int] | None = None
    ) -> dict[tuple[str, int], Hessian]:
        """H per (parameter, expert) of ``params``' inputs: routed as the router sends tokens
        (``route`` None) or with every token sent to every expert ("all"), for ``experts``
        (default all)."""
        fe, device = self.fe, self.run.hessian_device
        hs: dict[tuple[str, int], Hessian] = {}
        watched = {p: fe.params[p] for p in params}

        def sink(p: str, e: int, x: Tensor) -> None:
            if experts is None or e in experts:
                if (p, e) not in hs:
                    hs[p, e] = Hessian(x.shape[-1], device)
                hs[p, e].add_batch(x)

        def feed(args, kw):
            with ExpertInputs(watched, sink):
                if route is None:
                    fe.module.forward(*args, **kw)
                else:
                    x = args[0] if args else kw["hidden_states"]
                    route_all(fe, sorted(experts) if experts is not None else None)(x)

        self._each_batch(feed)
        return hs


def row_plan(row_counts: list[int], n_devices: int) -> list[list[tuple[int, int, int]]]:
    """Split the group's weights, stacked by rows, into ``n_devices`` equal row ranges:
    per device, (member, first row, end row) slices. Rows are independent given H."""
    total = sum(row_counts)
    bounds = [round(k * total / n_devices) for k in range(n_devices + 1)]
    offsets = [sum(row_counts[:m]) for m in range(len(row_counts))]
    plan: list[list[tuple[int, int, int]]] = []
    for lo, hi in itertools.pairwise(bounds):
        plan.append(
            [
                (m, max(lo - off, 0), min(hi - off, n))
                for m, (off, n) in enumerate(zip(offsets, row_counts, strict=True))
                if max(lo - off, 0) < min(hi - off, n)
            ]
        )
    return plan


def quantize_group(
    run: Run, prefix: str, group: list[str], linears: dict[str, nn.Linear], h: Hessian | None
) -> list[tuple[dict[str, Tensor], SublayerReport]]:
    """Quantize the sublayers of ``group`` (they share the input, hence H) in place; returns
    each one's checkpoint tensors and report (all of them at once: :func:`quantize_members`
    hands them out one at a time)."""
    return list(quantize_members(run, prefix, group, linears, h))


def quantize_members(
    run: Run, prefix: str, group: list[str], linears: dict[str, nn.Linear], h: Hessian | None
) -> Iterator[tuple[dict[str, Tensor], SublayerReport]]:
    """Quantize the sublayers of ``group`` (they share the input, hence H) in place, one at a
    time, yielding each one's checkpoint tensors and report as soon as it is stored: at most
    one member's result is held (a group of 256 expert linears sharing one H included).

    H is factored once, on the Hessian device, and U copied once to each device; each
    member's rows are then split evenly over the devices, each quantizing its slice (in
    threads: GPU kernels run concurrently). The slices give exactly the rows a single device
    would. Each report's seconds: its own quantization plus an equal share of the factoring."""
    s = run.job.settings
    t = time.time()
    try:
        prep = None if h is None else prepare(h, s)
    except CholeskyError as e:
        raise UserError(f"{prefix}.{'/'.join(group)}: {e}; raise --damp") from e
    dead = None if prep is None else int(prep.dead.sum())
    if dead:
        log.info(
            "%s.%s: %d of %d inputs are zero in every calibration token (weights kept, rounded "
            "to nearest)", prefix, "/".join(group), dead, len(prep.dead),
        )  # fmt: skip
    # A row-coupled grid (one parameter per group shared by all rows) is fitted on whole
    # weights: its rows stay on the first device (the Hessian still goes to the second).
    devices = run.devices[:1] if s.fit in ROW_COUPLED_GRIDS else run.devices
    preps = [None if prep is None else prep.to(d) for d in devices]  # U copied to each device
    prep = None
    shared = (time.time() - t) / len(group)

    def work(W: Tensor, name: str, device: torch.device, p, a: int, b: int):
        # the thread's current CUDA device, for anything allocated without an explicit device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            try:
                return quantize_weight(W[a:b].to(device), p, s, rows=(a, len(W)))
            except FP16RangeError as e:
                raise fp16_range_error(prefix, name, W, e, h is None) from e

    with ThreadPoolExecutor(len(devices)) if len(devices) > 1 else contextlib.nullcontext() as pool:
        for m, name in enumerate(group):
            t = time.time()
            W = linears[name].weight.data
            # one slice of rows per device, in row order
            slices = [sl[0] for sl in row_plan([W.shape[0]], len(devices))]
            args = [(W, name, devices[k], preps[k], a, b) for k, (_, a, b) in enumerate(slices)]
            if pool is None:
                parts = [work(*args[0])]
            else:
                parts = list(pool.map(lambda x: work(*x), args))
            del args
            if m == len(group) - 1:  # free U before the last result is packed
                preps.clear()
            r = QuantizedWeight.cat(parts, run.device)
            del parts
            seconds = shared + time.time() - t
            stored = store_sublayer(run, prefix, name, linears[name], r, seconds, dead)
            del r  # (nothing of this member is held while the next one is quantized)
            yield stored
            del stored


def fp16_range_error(prefix: str, name: str, W: Tensor, e: FP16RangeError, rtn: bool) -> UserError:
    """The one-line error for a weight whose grid cannot be stored in fp16: names the tensor,
    the value needed, and whether the weights themselves or GPTQ's updates of them need it."""
    full, largest = f"{prefix}.{name}.weight", float(W.abs().max())
    need = f"an fp16 {e.what} of {e.value:.3g} (fp16 holds at most {FP16_MAX:.0f})"
    if not rtn and e.largest_w > largest:  # the fit saw weights larger than the source's
        return UserError(
            f"{full}: GPTQ's error updates grew its weights from |w| <= {largest:.3g} to "
            f"{e.largest_w:.3g}, which would need {need}; try a larger --damp"
        )
    return UserError(
        f"{full}: its values exceed what an fp16 {e.what} can represent: weights up to "
        f"|w| = {e.largest_w:.3g} would need {need}; leave it unquantized with "
        f"--skip '{name}' or rescale the model"
    )


def store_sublayer(
    run: Run,
    prefix: str,
    name: str,
    m: nn.Linear,
    r: QuantizedWeight,
    seconds: float,
    dead_inputs: int | None,
) -> tuple[dict[str, Tensor], SublayerReport]:
    """Set sublayer ``name``'s weight to Q; returns its checkpoint tensors and report
    (``dead_inputs``: its inputs that were zero in every calibration token)."""
    # named as in the checkpoint (a multimodal wrapper's text decoder is renamed on load)
    full, qcfg = checkpoint_module(run.model, f"{prefix}.{name}"), run.qcfg
    if not torch.isfinite(r.Q).all():
        raise UserError(f"{full}: quantization produced NaN/Inf (check the calibration data)")
    m.weight.data.copy_(r.Q)  # later sublayers see the quantized output (in place: an
    # expert's weight is a view of its fused parameter)
    if qcfg.grid == "nonuniform":
        grid = {"lut": r.lut}
    else:
        grid = {"scales": r.scales, "zeros": r.zeros}
        if qcfg.uses_g_idx:
            grid["g_idx"] = r.g_idx
    packed = pack_linear(qcfg, r.codes, **grid)
    # Check the stored form against the loop's own result through the reference dequantizer
    # (our equivalent of exllamav2 reloading each converted layer through its kernel).
    err = (dequantize_linear(qcfg, packed, torch.float32) - r.Q.float()).abs().max()
    if err > 1e-6 * r.Q.abs().max().clamp_min(1e-30):
        raise RuntimeError(
            f"{full}: stored tensors dequantize {err:.3g} away from Q (a packing bug)"
        )
    tensors = {f"{full}.{k}": v for k, v in packed.items()}
    if run.observer is not None:
        run.observer(full, r)
    refit_loss = None
    if r.refit_loss is not None:  # Σ_rows (w − q)ᵀ H (w − q) before and after --refit
        before, after = r.refit_loss.sum(0).tolist()
        refit_loss = (before, after)
        log.debug("%s: refit lowered the layer-wise loss %.4g -> %.4g", full, before, after)
    report = SublayerReport(
        name, tuple(m.weight.shape), r.loss, seconds, r.damp, r.retries, dead_inputs, refit_loss
    )
    return tensors, report
