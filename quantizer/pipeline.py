"""The quantization job: stream a model through the GPTQ loop one decoder layer at a time.

Memory: the model is built as a skeleton with empty (meta) weights; only the embeddings,
the current decoder layer and the calibration activations are ever materialised. Each
layer's tensors are read from the safetensors shards, quantized in true-sequential order
(q/k/v, then o with quantized q/k/v upstream, ...), written to the checkpoint and freed.

Resume: after every decoder layer the partial checkpoint folder durably records the step
(the layer's tensors, the calibration activations entering the next layer, the reports so
far and a fingerprint of the job) in ``progress.json``. A failed or killed run keeps that
folder; ``QuantizeJob(resume=True)`` (``--resume``) continues after the last recorded layer
and produces the same checkpoint files, byte for byte, as an uninterrupted run (only the
timing and memory fields of ``quantize_report.json`` differ).

The steps live in their own modules: job.py (the job, its reports, config and fingerprint),
capture.py (what each layer is fed), layer_step.py (one layer quantized and written),
journal.py (the resumable writer and its per-layer entries); this module runs them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm

from leanquant_serve.format import FormatError, group_misfit, linear_specs
from leanquant_serve.format.hf_names import auto_model_class, checkpoint_module, to_checkpoint

from . import layer_step
from .activations import PLACES, Activations
from .capture import outer_tensors
from .errors import UserError
from .gptq import QuantizedWeight
from .job import (
    DTYPES,
    REPORT_FILE,
    RTN_LOSS,
    QuantizeJob,
    Run,
    SublayerReport,
    Summary,
    calibration_windows,
    checkpoint_config,
    fingerprint,
    summary_from_dict,
    summary_to_dict,
)
from .journal import (
    JournaledWriter,
    PartialRunError,
    PartialRunLocked,
    ResumeMismatch,
    check_fingerprint,
    journal_step,
    resume_point,
)
from .layer_step import layer_linears, quantize_layer
from .model_walk import (
    beside_text_decoder,
    find_decoder_layers,
    find_linears,
    layer_names,
    skip_matches,
)
from .moe import unquantized_large
from .source import SourceModel

log = logging.getLogger(__name__)

__all__ = [
    "DTYPES", "REPORT_FILE", "QuantizeJob", "Summary", "SublayerReport", "quantize_model",
    "deterministic_algorithms",
]  # fmt: skip


def quantize_model(
    job: QuantizeJob, observer: Callable[[str, QuantizedWeight], None] | None = None
) -> Summary:
    """Run ``job``; returns the summary also written as ``quantize_report.json`` in the output.

    ``observer(name, result)`` is called for every quantized sublayer (tests use it to
    rebuild the in-memory quantized model).
    """
    t0 = time.time()
    try:
        cuda = any(d.type == "cuda" for d in job.devices)
    except RuntimeError:  # a bad --device: _run says so
        cuda = False
    with deterministic_algorithms(cuda):
        return _run(job, SourceModel(job.model), t0, observer)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch's deterministic implementations while ``enabled`` (runs on CUDA GPUs), so the same
    inputs and seed give the same bytes there too: CUDA's float ``scatter_add_`` (the
    nonuniform fit's cluster sums) is nondeterministic otherwise. ``warn_only``: an op without a
    deterministic CUDA implementation warns instead of failing the run. cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when its handle is created (at the run's first matmul)."""
    if not enabled:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _partial_hint(partial: Path) -> str:
    return (
        f"partial run kept at {partial} ({JournaledWriter.describe_partial(partial)}): "
        "rerun with --resume to continue it, or with --fresh (or delete it) to start over"
    )


def _os_error(e: OSError) -> str:
    what = f" writing {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{what}"
    return f"I/O error{what}: {e.strerror or e}"


def _build_skeleton(job: QuantizeJob, src: SourceModel, dtype: torch.dtype) -> nn.Module:
    """The model with empty (meta) parameters; buffers such as rotary frequencies are real.
    Built from ``src.model_config()``: an FP8 source's quantization_config left out."""
    config = src.model_config()
    with init_empty_weights(include_buffers=False):
        try:
            # eager experts: quantizer/moe.py reads which expert slice each F.linear uses
            model = auto_model_class(config).from_config(
                config, dtype=dtype, experts_implementation="eager"
            )
        except ValueError as e:
            raise UserError(f"unsupported architecture in {job.model}: {e}") from e
    return model.eval()


def _check_devices(job: QuantizeJob) -> tuple[list[torch.device], torch.dtype]:
    """(devices, compute dtype) of ``job``, refused if this machine cannot run them."""
    try:
        devices, dtype = job.devices, getattr(torch, job.dtype)
    except RuntimeError as e:  # torch.device's parse error
        raise UserError(f"--device {job.device!r}: {e}") from e
    if len({d.type for d in devices}) > 1:
        raise UserError(f"--device {job.device}: mixes device types (use GPUs only, or cpu)")
    if job.activations not in PLACES:
        raise UserError(f"--activations must be one of {', '.join(PLACES)}")
    for d in devices:
        if d.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {d} but no CUDA GPU is available")
        if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
            raise UserError(f"--device {d}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    if len(set(devices)) != len(devices) and devices[0].type != "cpu":
        raise UserError(f"--device {job.device} names a device twice")
    return devices, dtype


def _check_shapes(job: QuantizeJob, linears: dict[str, tuple[int, int]], layer_name: str) -> None:
    """Fail before any work if a sublayer ((out, in) by relative name) cannot be stored
    (group size, packing alignment)."""
    qcfg = checkpoint_config(job, [])
    for name, (out_features, in_features) in linears.items():
        if group_misfit(job.settings.group_size, in_features):
            fits = [str(g) for g in (32, 64, 128, 256) if not group_misfit(g, in_features)]
            raise UserError(
                f"--group-size {job.settings.group_size} does not divide in_features "
                f"{in_features} of {layer_name}.{name}: use a divisor such as "
                f"{', '.join(fits) or '-1'}"
            )
        try:
            linear_specs(qcfg, in_features, out_features)
        except FormatError as e:
            raise UserError(f"{layer_name}.{name}: {e}") from e


class _Coverage(NamedTuple):
    not_converted: list[str]  # checkpoint module names left 16-bit in the decoder layers
    skipped: list[dict]  # the report's ``skipped`` entries
    expert_linears: int  # expert linears quantized (Summary.expert_linears)
    has_experts: bool  # whether any decoder layer holds fused experts (--skip'ed or not)


def _check_coverage(job: QuantizeJob, model: nn.Module, layers_name: str, layers) -> _Coverage:
    """Every decoder layer's plan, checked before any work: shapes of what is quantized, every
    --skip regex matching something (UserError naming the one that matches nothing, or part of
    a fused experts module), and no large weight left unquantized silently (UserError naming
    the first, unless --skip keeps it), MoE flags only for models with experts
    (QuantizeJob.check_moe_flags). Returns the unquantized modules (checkpoint names, for
    modules_to_not_convert: --skip's linears first, as before MoE, then the rest), the
    report's ``skipped`` entries (routers by rule, --skip matches) under checkpoint names, and
    the expert counts."""
    linears_kept, not_converted, skipped = [], [], []
    has_experts, expert_linears = False, 0
    matched = dict.fromkeys(job.skip, False)
    for i, layer in enumerate(layers):
        prefix = f"{layers_name}.{i}"
        linears, fused, kept = layer_linears(_Plan(job, model), layer, prefix)
        experts = layer_step.find_fused_experts(model, layer, prefix)
        has_experts = has_experts or bool(experts)
        expert_linears += sum(len(fe.linears) for fe in fused)
        by_skip = skip_matches(model, layer, prefix, experts, job.skip)
        for p, modules in by_skip.items():
            matched[p] = matched[p] or bool(modules)
        kept_by_skip = set().union(set(), *by_skip.values())
        linears_kept += [
            checkpoint_module(model, f"{prefix}.{n}")
            for n in sorted(kept_by_skip & set(find_linears(layer)))
        ]
        shapes = {n: (m.out_features, m.in_features) for n, m in linears.items()}
        for fe in fused:
            shapes.update({
                lin.name: (lin.rows[1] - lin.rows[0], fe.params[lin.param].shape[-1])
                for lin in fe.linears
            })  # fmt: skip
        _check_shapes(job, shapes, prefix)
        quantized = {f"{n}.weight" for n in linears} | {p for fe in fused for p in fe.params}
        why = {**dict.fromkeys(kept_by_skip, "--skip"), **kept}
        entries, refused = unquantized_large(layer, quantized, why, ())
        if refused:
            name, shape, share = refused[0]
            raise UserError(
                f"{prefix}.{name} {tuple(shape)} ({share:.1%} of the layer's parameters) "
                "would stay unquantized: it is neither a linear nor a recognised expert "
                f"weight; keep it unquantized with --skip '{re.escape(name)}'"
                + (f" ({len(refused) - 1} more such weights)" if len(refused) > 1 else "")
            )
        params = dict(layer.named_parameters())
        for e in entries:  # under checkpoint names: a fused parameter as its expert linears
            p = params[e["name"]]
            for key, t in to_checkpoint(model, {f"{prefix}.{e['name']}": p}, False).items():
                share = e["share"] * t.numel() / p.numel()
                name = key.removesuffix(".weight")
                skipped.append({**e, "name": name, "shape": list(t.shape), "share": share})
                if key.rpartition(".")[0] not in not_converted:
                    not_converted.append(key.rpartition(".")[0])
    job.check_moe_flags(has_experts)
    unmatched = [p for p, hit in matched.items() if not hit]
    if unmatched:
        prefix = f"{layers_name}.0"
        names = layer_names(
            model, layers[0], prefix, layer_step.find_fused_experts(model, layers[0], prefix)
        )
        raise UserError(
            f"--skip '{unmatched[0]}' matches no linear or weight of the decoder layers; it is "
            f"searched in names relative to a layer, such as {', '.join(names[:12])}"
            + (", ..." if len(names) > 12 else "")
        )
    not_converted = linears_kept + [n for n in not_converted if n not in linears_kept]
    return _Coverage(not_converted, skipped, expert_linears, has_experts)


class _Plan:
    """What layer_linears reads of a run, before the run exists."""

    def __init__(self, job: QuantizeJob, model: nn.Module) -> None:
        self.job, self.model = job, model


def _run(job: QuantizeJob, src: SourceModel, t0: float, observer) -> Summary:
    """Check the job against the model, open the output, then the per-layer loop."""
    devices, dtype = _check_devices(job)
    model = _build_skeleton(job, src, dtype)
    src.bind(model)
    layers_name, layers = find_decoder_layers(model)
    for d in layers_beyond_stack(src, layers_name, len(layers)):
        log.warning("%s (%d tensors) is not written: %s", d["name"], d["tensors"], d["why"])
    cov = _check_coverage(job, model, layers_name, layers)
    skipped_report = cov.skipped
    out_emb = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is out_emb), None)
    # a multimodal wrapper's towers and projectors: copied unchanged
    beside = [checkpoint_module(model, n) for n in beside_text_decoder(model, layers_name)]
    skipped_report += [
        {
            "name": checkpoint_module(model, n),
            "parameters": sum(p.numel() for p in model.get_submodule(n).parameters()),
            "why": "outside the text decoder: copied unchanged",
        }
        for n in beside_text_decoder(model, layers_name)
    ]
    head = [checkpoint_module(model, head_name)] if head_name else []
    qcfg = checkpoint_config(job, head + beside + cov.not_converted, moe=cov.has_experts)
    outer_names = [n for n in src.names() if not n.startswith(layers_name + ".")]
    windows, bos = (None, None) if job.rtn else calibration_windows(job, model.config)
    job_fingerprint = fingerprint(job, src, windows)
    writer = _open_writer(job, job_fingerprint)
    if writer.finished:  # a resumed run that had finished all but moving into place
        return _summary_from_report(job.out / REPORT_FILE)
    run = Run(
        job, src, writer, model, layers_name, layers, head_name, qcfg, outer_names, windows,
        bos, job_fingerprint, devices, dtype, observer, t0, skipped_report, cov.expert_linears,
    )  # fmt: skip
    with _user_errors(writer), writer:
        return _layers(run)


def _open_writer(job: QuantizeJob, job_fingerprint: dict) -> JournaledWriter:
    """The output's writer: a new partial folder, or the job's own partial run continued."""
    on_partial = "resume" if job.resume else "fresh" if job.fresh else "refuse"
    try:
        return JournaledWriter(
            job.out,
            max_shard_bytes=job.max_shard_bytes,
            overwrite=job.overwrite,
            on_partial=on_partial,
            check_state=lambda partial, state: check_fingerprint(
                partial, state.get("job", {}), job_fingerprint
            ),
        )
    except PartialRunLocked:
        raise
    except PartialRunError as e:  # refused, or found unusable by a resume
        hint = (
            "pass --fresh to discard it"
            if job.resume
            else "pass --resume to continue it, or --fresh to discard it"
        )
        raise PartialRunError(f"{e}: {hint}") from e


@contextlib.contextmanager
def _user_errors(writer: JournaledWriter) -> Iterator[None]:
    """A failure as the user should read it: one line, and where the partial run was kept
    (if a layer had finished) with how to continue it; for an interrupt that line is a note
    on the KeyboardInterrupt (shown with its traceback; ``leanquant`` prints it alone)."""
    try:
        yield
    except (UserError, FormatError, OSError) as e:
        msg = _os_error(e) if isinstance(e, OSError) else str(e)
        if writer.kept and not isinstance(e, ResumeMismatch):
            raise UserError(f"{msg}; {_partial_hint(writer.partial)}") from e
        if isinstance(e, OSError):
            raise UserError(f"{msg} (no layer had finished: nothing kept)") from e
        raise
    except KeyboardInterrupt as e:  # (SIGTERM too, through leanquant.cli): the caller's line
        if writer.kept:
            e.add_note(_partial_hint(writer.partial))
        raise
    except BaseException:
        if writer.kept:
            log.error(_partial_hint(writer.partial))
        raise


def _layers(run: Run) -> Summary:
    """The per-layer loop, from the first layer the partial run in ``run.writer`` has not done:
    resume point, activations, then per layer its quantization and a journal step."""
    start, seconds_before, summary = resume_point(run)
    summary.skipped = run.skipped
    summary.expert_linears = run.expert_linears
    summary.loss_measure = RTN_LOSS if run.job.rtn else ""
    acts, kwargs = _calibration_inputs(run, start, summary)
    n = len(run.layers)
    bar = tqdm(range(start, n), desc="layers", unit="layer", initial=start, total=n)
    for i in bar:
        reports, fallbacks = quantize_layer(run, i, acts, kwargs[i])
        summary.layers.append(reports)
        summary.moe_fallbacks += fallbacks
        if fallbacks:
            log.warning(
                "layer %d: %d expert linears had fewer than %d calibration tokens and used "
                "their all-token Hessian", i, len(fallbacks), run.job.moe_min_tokens,
            )  # fmt: skip
        loss = sum(r.loss for r in reports)
        summary.total_loss += loss
        summary.cholesky_retries += sum(r.cholesky_retries for r in reports)
        bar.set_postfix(loss=f"{loss:.3g}")
        log.debug("layer %d: %s", i, ", ".join(f"{r.name}={r.loss:.3g}" for r in reports))
        summary.seconds = seconds_before + time.time() - run.t0
        journal_step(run, i, summary, acts)
    return _finish(run, summary, seconds_before)


def _calibration_inputs(
    run: Run, start: int, summary: Summary
) -> tuple[Activations | None, list[dict]]:
    """The activations entering layer ``start`` (None: RTN) and every layer's other inputs
    (position embeddings, masks): captured, or restored from the journal on a resume."""
    job, writer = run.job, run.writer
    acts = None
    if not job.rtn:
        store_dtype = getattr(torch, job.act_dtype or job.dtype)
        acts = Activations(job.activations, run.device, run.dtype, store_dtype, writer)
    kwargs = outer_tensors(run, start, acts)
    if acts is not None and 0 < start < len(run.layers):
        names = writer.progress["activations"]
        if not isinstance(names, list):
            raise UserError(f"{writer.partial}: made by an older version; pass --fresh")
        acts.restore(start, names)
    if acts is not None and acts.nbytes:  # (none left to restore after the last layer)
        summary.activation_bytes = acts.nbytes
    return acts, kwargs


# config.json keys counting multi-token-prediction layers (DeepSeek-V3's own name, and the
# name transformers' DeepseekV3Config maps to it)
MTP_LAYER_COUNTS = ("num_nextn_predict_layers", "num_mtp_layers")


def layers_beyond_stack(src: SourceModel, layers_name: str, n_layers: int) -> list[dict]:
    """Decoder layers the source holds beyond the ``n_layers`` the model builds, e.g.
    DeepSeek-V3's multi-token-prediction layer ``model.layers.61`` (``num_nextn_predict_layers``
    1): transformers drops them on load (DeepseekV3's ``_keys_to_ignore_on_load_unexpected``),
    vLLM's main model skips them (deepseek_v2.py ``get_spec_layer_idx_from_weight_name``) and
    only its MTP drafter (deepseek_mtp.py, speculative decoding) loads them. The quantizer
    cannot calibrate a layer transformers does not run, so they are not written; reported as
    ``{"name", "tensors", "why"}`` (Summary.dropped) and the output config's MTP count is 0."""
    counts: dict[int, int] = {}
    for name in src.names(layers_name + "."):
        index = name[len(layers_name) + 1 :].partition(".")[0]
        if index.isdigit() and int(index) >= n_layers:
            counts[int(index)] = counts.get(int(index), 0) + 1
    mtp = next((k for k in MTP_LAYER_COUNTS if src.config.get(k)), None)
    why = (
        f"a layer beyond the model's {n_layers} decoder layers"
        + (f" (the multi-token-prediction layer of {mtp} {src.config[mtp]})" if mtp else "")
        + ", which transformers does not build, so it cannot be calibrated; vLLM serves the "
        "model without it, but MTP speculative decoding is not available from this checkpoint"
    )
    return [
        {"name": f"{layers_name}.{i}", "tensors": counts[i], "why": why} for i in sorted(counts)
    ]


def _output_config(run: Run, dropped: list[dict]) -> dict:
    """The source's config.json as the checkpoint's (its quantization_config, e.g. an FP8
    source's, is replaced by ours in finalize): MTP layer counts 0 when those were dropped."""
    config = dict(run.src.config)
    if dropped:
        config.update({k: 0 for k in MTP_LAYER_COUNTS if k in config})
    return config


def _finish(run: Run, summary: Summary, seconds_before: float) -> Summary:
    """Write the report, finalize the checkpoint (moved into place) and return the summary."""
    summary.dropped = layers_beyond_stack(run.src, run.layers_name, len(run.layers))
    routed = sorted(
        r.routed_tokens for layer in summary.layers for r in layer if r.routed_tokens is not None
    )
    if routed:  # (statistics.median: the mean of the middle two of an even count)
        summary.moe_routed_tokens = {
            "min": routed[0],
            "median": statistics.median(routed),
            "max": routed[-1],
        }
    summary.seconds = seconds_before + time.time() - run.t0
    summary.peak_rss_bytes = _peak_rss()
    summary.peak_gpu_bytes = max(
        (torch.cuda.max_memory_allocated(d) for d in run.devices if d.type == "cuda"), default=0
    )
    (run.writer.partial / REPORT_FILE).write_text(json.dumps(summary_to_dict(summary), indent=1))
    run.writer.finalize(_output_config(run, summary.dropped), run.qcfg, copy_from=run.job.model)
    return summary


def _peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _summary_from_report(path: Path) -> Summary:
    return summary_from_dict(json.loads(path.read_text()))
