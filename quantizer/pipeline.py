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
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from leanquant_serve.format import (
    FormatError,
    LeanQuantConfig,
    dequantize_linear,
    group_misfit,
    linear_specs,
    pack_linear,
)
from leanquant_serve.format.checkpoint import partial_dir

from .activations import PLACES, Activations
from .data import check_seqlen, model_vocab_size, random_windows, text_tokens
from .errors import UserError, check_counts
from .flags import BOS_HELP, parse_size, setting
from .gptq import (
    CholeskyError,
    GPTQSettings,
    Hessian,
    QuantizedWeight,
    prepare,
    quantize_weight,
)
from .grids import FP16_MAX, ROW_COUPLED_GRIDS, FP16RangeError
from .journal import JournaledWriter, PartialRunError, PartialRunLocked
from .model_walk import StopForward, find_decoder_layers, find_linears, sequential_groups
from .source import SourceModel, load_config

log = logging.getLogger(__name__)

REPORT_FILE = "quantize_report.json"


DTYPES = ("float32", "bfloat16", "float16")  # of layer forwards and of stored activations


@dataclass(frozen=True)
class QuantizeJob:
    """Everything one quantization run needs. The ``leanquant quantize`` flags are built from
    these fields and :class:`GPTQSettings`' (quantizer/flags.py): one default per setting."""

    model: Path
    out: Path
    settings: GPTQSettings = field(default_factory=GPTQSettings)
    # round-to-nearest: no calibration, no error feedback
    rtn: bool = setting(False, "round to nearest: no calibration, no GPTQ updates")
    calib: str | None = setting(  # text source, see data.load_text
        None,
        "calibration text: a .txt/.jsonl file or folder, wiki-sample, wikitext2 or c4",
        show_default=False,
    )
    nsamples: int = setting(128, "calibration windows")
    seqlen: int = setting(2048, "tokens per calibration window, BOS included")
    batch_size: int = setting(1, "calibration windows per forward")
    # begin each calibration window with the tokenizer's BOS token if the tokenizer adds one
    # to a text (see data.py); False: text tokens only (--no-bos)
    bos: bool = setting(True, BOS_HELP)
    # compute device, or a comma-separated list (cuda:0,cuda:1): the first runs the layer
    # forwards and holds the activations; every one takes rows of each group's GPTQ work,
    # and the second accumulates and factors the Hessians
    device: str = setting(
        "cpu",
        "cpu, cuda, cuda:1, or a list such as cuda:0,cuda:1: the first runs the layer "
        "forwards, the second accumulates and factors the Hessians, and each group's rows are "
        "split over all of them (the result is the same for any list)",
        flags=("--device", "--devices"),
    )
    dtype: str = setting(  # dtype for layer forwards
        "float32",
        "dtype of layer forwards (and of the calibration activations unless --act-dtype)",
        choices=DTYPES,
    )
    activations: str = setting(  # where calibration activations live: device | cpu | disk
        "device",
        "where the calibration activations (nsamples x seqlen x hidden) live between uses: "
        "on the first device (fastest), in host RAM, or spilled to the partial output folder "
        "one batch at a time (host memory: one batch)",
        choices=PLACES,
    )
    act_dtype: str | None = setting(  # their stored dtype (None: dtype)
        None,
        "dtype the calibration activations are stored in (default: --dtype); bfloat16 "
        "halves them (8.6 GB for 405B at 128 x 2048)",
        choices=DTYPES,
        show_default=False,
    )
    # regexes of linear sublayers (relative to a layer) to leave unquantized
    skip: tuple[str, ...] = setting(
        (),
        "regex of sublayer names (e.g. 'mlp\\.down_proj') to leave unquantized; repeatable",
        repeat=True,
        show_default=False,
    )
    overwrite: bool = setting(False, "replace an existing output folder")
    max_shard_bytes: int = setting(
        4 * 1024**3,
        "largest checkpoint shard, e.g. 4GiB (default), 500MB or a byte count",
        flags=("--max-shard-size",),
        type=parse_size,
        metavar="SIZE",
        show_default=False,
    )
    # An existing partial run of ``out`` is refused unless one of these is set.
    resume: bool = setting(  # continue it after its last finished layer (or start if none)
        False,
        "continue the partial run of OUT (kept in .OUT.partial next to it after a failure "
        "or kill) after its last finished layer; the model, calibration data and settings "
        "must be the same. The result is byte-identical to an uninterrupted run. Without a "
        "partial run, starts one",
    )
    fresh: bool = setting(  # discard it and start over
        False,
        "discard a partial run of OUT and start over (without --resume or --fresh, an "
        "existing partial run is an error)",
    )

    def __post_init__(self) -> None:
        """Settings that no model can make right, refused before anything is read."""
        check_counts(
            nsamples=self.nsamples,
            seqlen=self.seqlen,
            batch_size=self.batch_size,
            max_shard_size=self.max_shard_bytes,
        )
        if self.resume and self.fresh:
            raise UserError("--resume and --fresh exclude each other")
        for p in self.skip:
            try:
                re.compile(p)
            except re.error as e:
                raise UserError(f"--skip {p!r} is not a valid regular expression: {e}") from e

    @property
    def devices(self) -> list[torch.device]:
        return [torch.device(d.strip()) for d in self.device.split(",")]


@dataclass
class SublayerReport:
    name: str
    shape: tuple[int, int]
    loss: float
    seconds: float
    damp: float
    cholesky_retries: int
    # inputs that are zero in every calibration token (None: --rtn, no calibration); their
    # weights are kept and rounded to nearest, see gptq.prepare
    dead_inputs: int | None = None


@dataclass
class Summary:
    out: str
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int  # the largest over the devices
    total_loss: float
    cholesky_retries: int
    layers: list[list[SublayerReport]] = field(default_factory=list)
    activation_bytes: int = 0  # of one layer's calibration inputs, as stored
    bos_token_id: int | None = None  # what every calibration window begins with (None: text)


def _qcfg(job: QuantizeJob, not_converted: list[str]) -> LeanQuantConfig:
    s = job.settings
    method = "rtn" if job.rtn else ("gptq" if s.fit == "minmax" else "leanquant")
    meta = {
        "method": method,
        "grid_fit": s.fit,  # informational: loaders read the tensors and ``grid``
        "damp": s.damp,
        "exponent": s.exponent,
        "blocksize": s.blocksize,
        "T": s.T,
        "shrink": s.shrink,
        "seed": s.seed,
    }
    if not job.rtn:
        meta.update(calib=job.calib, nsamples=job.nsamples, seqlen=job.seqlen)
    return LeanQuantConfig(
        bits=s.bits,
        group_size=s.group_size,
        grid=s.stored_grid,
        desc_act=s.actorder and not job.rtn,
        static_groups=s.static_groups,
        modules_to_not_convert=tuple(not_converted),
        quantizer=meta,
    )


def _peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _LayerInputs:
    """Catches what the model feeds each decoder layer: layer 0's hidden states (handed to
    ``on_hidden`` batch by batch), every layer's kwargs (from the first batch)."""

    def __init__(self, layers: nn.ModuleList, on_hidden: Callable[[Tensor], None]) -> None:
        self.layers = layers
        self.on_hidden = on_hidden
        self.kwargs: list[dict] = [{} for _ in layers]
        self.first_batch = True

    def capture(self, model: nn.Module, batches: list[Tensor], device: torch.device) -> None:
        originals = list(self.layers)
        catchers = [_Catcher(layer, i, self) for i, layer in enumerate(originals)]
        for i, c in enumerate(catchers):
            self.layers[i] = c
        try:
            with torch.no_grad():
                for b, ids in enumerate(batches):
                    self.first_batch = b == 0  # kwargs are read from the first batch only
                    try:
                        model(input_ids=ids.to(device), use_cache=False)
                    except StopForward:
                        pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, index: int, sink: _LayerInputs) -> None:
        super().__init__()
        self.layer, self.index, self.sink = layer, index, sink

    def __getattr__(self, name: str):
        """The model may read attributes of its layers (e.g. attention_type)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if args:
            raise UserError("decoder layers called with positional arguments beyond hidden_states")
        if self.index == 0:
            self.sink.on_hidden(hidden_states)
        if self.sink.first_batch:
            kwargs.pop("past_key_values", None)
            self.sink.kwargs[self.index] = kwargs
        if self.index == len(self.sink.layers) - 1 or not self.sink.first_batch:
            raise StopForward
        return hidden_states


def _layer_forward(layer: nn.Module, x: Tensor, kwargs: dict) -> Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _check_shapes(job: QuantizeJob, layer: nn.Module, layer_name: str) -> None:
    """Fail before any work if a sublayer cannot be stored (group size, packing alignment)."""
    qcfg = _qcfg(job, [])
    for name, m in find_linears(layer, job.skip).items():
        if group_misfit(job.settings.group_size, m.in_features):
            fits = [str(g) for g in (32, 64, 128, 256) if not group_misfit(g, m.in_features)]
            raise UserError(
                f"--group-size {job.settings.group_size} does not divide in_features "
                f"{m.in_features} of {layer_name}.{name}: use a divisor such as "
                f"{', '.join(fits) or '-1'}"
            )
        try:
            linear_specs(qcfg, m.in_features, m.out_features)
        except FormatError as e:
            raise UserError(f"{layer_name}.{name}: {e}") from e


def _load_layer(
    src: SourceModel, layer: nn.Module, prefix: str, device, dtype, keep: set[str]
) -> dict[str, Tensor]:
    """Materialise the layer from the shards, one tensor at a time; returns the tensors named
    in ``keep`` as stored (the others are dropped as soon as the module holds them)."""
    kept = {}
    for p, _ in layer.named_parameters():
        t = _fits_dtype(f"{prefix}.{p}", src.get_finite(f"{prefix}.{p}"), dtype)
        set_module_tensor_to_device(layer, p, device, value=t, dtype=dtype)
        if f"{prefix}.{p}" in keep:
            kept[f"{prefix}.{p}"] = t
    return kept


def _fits_dtype(name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t``, refused if the compute dtype cannot hold its values (|w| ≥ 65520 would become
    Inf in float16, and the layer's outputs NaN)."""
    if t.is_floating_point() and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        if bool(torch.isinf(t.to(dtype)).any()):
            raise UserError(
                f"tensor {name}: values up to |w| = {float(t.abs().max()):.3g} exceed what "
                f"--dtype {str(dtype).removeprefix('torch.')} can represent (at most "
                f"{torch.finfo(dtype).max:.0f}); use --dtype float32 or bfloat16"
            )
    return t


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


def _build_skeleton(job: QuantizeJob, dtype: torch.dtype) -> nn.Module:
    """The model with empty (meta) parameters; buffers such as rotary frequencies are real."""
    config = load_config(job.model)
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as e:
            raise UserError(f"unsupported architecture in {job.model}: {e}") from e
    return model.eval()


@dataclass
class _Run:
    """One quantization run: what the per-layer loop works with."""

    job: QuantizeJob
    src: SourceModel
    writer: JournaledWriter
    model: nn.Module
    layers_name: str
    layers: nn.ModuleList
    head_name: str | None
    qcfg: LeanQuantConfig
    outer_names: list[str]  # tensors outside the decoder layers, stored unchanged
    windows: Tensor | None  # calibration windows (None: RTN)
    bos_token_id: int | None  # their first token, if the tokenizer's BOS
    fingerprint: dict
    devices: list[torch.device]
    dtype: torch.dtype
    observer: Callable[[str, QuantizedWeight], None] | None
    t0: float

    @property
    def device(self) -> torch.device:
        """The device of the layer forwards and of ``--activations device``."""
        return self.devices[0]

    @property
    def hessian_device(self) -> torch.device:
        """Where Hessians are accumulated and factored: the second device if there is one."""
        return self.devices[1] if len(self.devices) > 1 else self.devices[0]


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


def _run(job: QuantizeJob, src: SourceModel, t0: float, observer) -> Summary:
    devices, dtype = _check_devices(job)
    model = _build_skeleton(job, dtype)
    layers_name, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        _check_shapes(job, layer, f"{layers_name}.{i}")
    out_emb = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is out_emb), None)
    skipped = [  # sorted: set order varies between processes (string hashing)
        f"{layers_name}.{i}.{n}"
        for i, layer in enumerate(layers)
        for n in sorted(set(find_linears(layer)) - set(find_linears(layer, job.skip)))
    ]
    qcfg = _qcfg(job, ([head_name] if head_name else []) + skipped)
    outer_names = [n for n in src.weight_map if not n.startswith(layers_name + ".")]
    windows, bos = (None, None) if job.rtn else _calibration_windows(job, model.config)
    fingerprint = _fingerprint(job, src, windows)

    try:
        writer = JournaledWriter(
            job.out,
            max_shard_bytes=job.max_shard_bytes,
            overwrite=job.overwrite,
            on_partial="resume" if job.resume else "fresh" if job.fresh else "refuse",
            check_state=lambda state: _check_fingerprint(
                partial_dir(job.out), state.get("job", {}), fingerprint
            ),
        )
    except PartialRunLocked as e:
        raise UserError(str(e)) from e
    except PartialRunError as e:  # refused, or found unusable by a resume
        hint = (
            "pass --fresh to discard it"
            if job.resume
            else "pass --resume to continue it, or --fresh to discard it"
        )
        raise UserError(f"{e}: {hint}") from e
    if writer.finished:  # a resumed run that had finished all but moving into place
        return _summary_from_report(job.out / REPORT_FILE)
    run = _Run(
        job, src, writer, model, layers_name, layers, head_name, qcfg, outer_names, windows,
        bos, fingerprint, devices, dtype, observer, t0,
    )  # fmt: skip
    try:
        with writer:
            return _layers(run)
    except (UserError, FormatError, OSError) as e:
        msg = _os_error(e) if isinstance(e, OSError) else str(e)
        if writer.kept and not isinstance(e, _Mismatch):
            raise UserError(f"{msg}; {_partial_hint(writer.partial)}") from e
        if isinstance(e, OSError):
            raise UserError(f"{msg} (no layer had finished: nothing kept)") from e
        raise
    except BaseException:
        if writer.kept:
            log.error(_partial_hint(writer.partial))
        raise


def _summary_from_report(path: Path) -> Summary:
    return _summary_from_dict(json.loads(path.read_text()))


def _summary_state(summary: Summary) -> dict:
    return {k: v for k, v in asdict(summary).items() if k != "out"}


def _layers(run: _Run) -> Summary:
    """The per-layer loop, from the first layer the partial run in ``run.writer`` has not done:
    resume point, activations, then per layer its quantization and a journal step."""
    start, seconds_before, summary = _resume_point(run)
    acts, kwargs = _calibration_inputs(run, start, summary)
    n = len(run.layers)
    bar = tqdm(range(start, n), desc="layers", unit="layer", initial=start, total=n)
    for i in bar:
        reports = _quantize_layer(run, i, acts, kwargs[i])
        summary.layers.append(reports)
        loss = sum(r.loss for r in reports)
        summary.total_loss += loss
        summary.cholesky_retries += sum(r.cholesky_retries for r in reports)
        bar.set_postfix(loss=f"{loss:.3g}")
        log.debug("layer %d: %s", i, ", ".join(f"{r.name}={r.loss:.3g}" for r in reports))
        summary.seconds = seconds_before + time.time() - run.t0
        _journal_step(run, i, summary, acts)
    return _finish(run, summary, seconds_before)


def _resume_point(run: _Run) -> tuple[int, float, Summary]:
    """(first layer to do, seconds spent before, summary so far) of a fresh or resumed run."""
    job, writer = run.job, run.writer
    summary = Summary(str(job.out), 0.0, 0, 0, 0.0, 0)
    start, seconds_before = 0, 0.0
    if writer.progress is not None:
        state = writer.progress  # its fingerprint was checked by the writer
        start, seconds_before = state["layers_done"], state["seconds"]
        summary = _summary_from_state(job, state["summary"])
        log.info("resuming %s after layer %d of %d", writer.partial, start - 1, len(run.layers))
    summary.bos_token_id = run.bos_token_id
    return start, seconds_before, summary


def _calibration_inputs(
    run: _Run, start: int, summary: Summary
) -> tuple[Activations | None, list[dict]]:
    """The activations entering layer ``start`` (None: RTN) and every layer's other inputs
    (position embeddings, masks): captured, or restored from the journal on a resume."""
    job, writer = run.job, run.writer
    acts = None
    if not job.rtn:
        store_dtype = getattr(torch, job.act_dtype or job.dtype)
        acts = Activations(job.activations, run.device, run.dtype, store_dtype, writer)
    kwargs = _outer_tensors(run, start, acts)
    if acts is not None and 0 < start < len(run.layers):
        names = writer.progress["activations"]
        if not isinstance(names, list):
            raise UserError(f"{writer.partial}: made by an older version; pass --fresh")
        acts.restore(start, names)
    if acts is not None and acts.nbytes:  # (none left to restore after the last layer)
        summary.activation_bytes = acts.nbytes
    return acts, kwargs


def _quantize_layer(
    run: _Run, i: int, acts: Activations | None, kwargs: dict
) -> list[SublayerReport]:
    """Load decoder layer ``i``, quantize its linears group by group (Hessians from ``acts``,
    whose inputs then advance through the quantized layer), hand every tensor to the writer
    and free the layer; returns its sublayer reports."""
    job, src, writer = run.job, run.src, run.writer
    prefix, layer = f"{run.layers_name}.{i}", run.layers[i]
    linears = find_linears(layer, job.skip)
    quantized_weights = {f"{prefix}.{n}.weight" for n in linears}
    layer_names = src.names(prefix + ".")
    stored = _load_layer(
        src, layer, prefix, run.device, run.dtype, set(layer_names) - quantized_weights
    )
    results: list[tuple[dict[str, Tensor], SublayerReport]] = []
    sub = tqdm(total=len(linears), desc=f"layer {i}", unit="sublayer", leave=False)
    if acts is None:
        for name in linears:
            results += _quantize_group(run, prefix, [name], linears, None)
            sub.update()
    else:
        run_first = functools.partial(_layer_forward, layer, acts.first(), kwargs)
        for group in sequential_groups(linears, run_first):
            h = _hessian(layer, linears[group[0]], acts, kwargs, run.hessian_device)
            if not torch.isfinite(h.H).all():
                raise UserError(
                    f"{prefix}.{group[0]}: the Hessian of its calibration inputs has "
                    f"NaN/Inf (the activations entering layer {i} overflowed or are NaN;"
                    " try --dtype float32 or other calibration data)"
                )
            results += _quantize_group(run, prefix, group, linears, h)
            sub.update(len(group))
            del h
        with torch.no_grad():  # inputs of the next layer, through the quantized layer
            step = functools.partial(_layer_forward, layer, kwargs=kwargs)
            finite = acts.advance(step, keep=i + 1 < len(run.layers))
        if not finite:
            raise UserError(
                f"{prefix}: the quantized layer's outputs contain NaN/Inf "
                "(try --dtype float32, a larger --damp or other calibration data)"
            )
    sub.close()

    rest = {
        n: stored[n] if n in stored else src.get(n)
        for n in layer_names
        if n not in quantized_weights
    }
    writer.add(rest)
    del stored, rest
    for tensors, _ in results:
        writer.add(tensors)
    layer.to("meta")  # free the layer
    return [r for _, r in results]


def _journal_step(run: _Run, i: int, summary: Summary, acts: Activations | None) -> None:
    """Durable step: a kill from here on resumes at layer i + 1."""
    n = len(run.layers)
    files, written = {}, []
    if acts is not None and i + 1 < n:
        files, written = acts.state()
    state = {
        "job": run.fingerprint,
        "layers_done": i + 1,
        "seconds": summary.seconds,
        "summary": _summary_state(summary),
        "activations": [*files, *written] or None,
    }
    run.writer.save_state(state, files, note=f"{i + 1} of {n} layers done", written=written)


def _finish(run: _Run, summary: Summary, seconds_before: float) -> Summary:
    """Write the report, finalize the checkpoint (moved into place) and return the summary."""
    summary.seconds = seconds_before + time.time() - run.t0
    summary.peak_rss_bytes = _peak_rss()
    summary.peak_gpu_bytes = max(
        (torch.cuda.max_memory_allocated(d) for d in run.devices if d.type == "cuda"), default=0
    )
    (run.writer.partial / REPORT_FILE).write_text(json.dumps(asdict(summary), indent=1))
    run.writer.finalize(run.src.config, run.qcfg, copy_from=run.job.model)
    return summary


def _summary_from_state(job: QuantizeJob, d: dict) -> Summary:
    return _summary_from_dict({**d, "out": str(job.out)})


def _summary_from_dict(d: dict) -> Summary:
    d = dict(d)
    d["layers"] = [
        [SublayerReport(**{**r, "shape": tuple(r["shape"])}) for r in layer]
        for layer in d["layers"]
    ]
    return Summary(**d)


def _row_plan(row_counts: list[int], n_devices: int) -> list[list[tuple[int, int, int]]]:
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


def _quantize_group(
    run: _Run, prefix: str, group: list[str], linears: dict[str, nn.Linear], h: Hessian | None
) -> list[tuple[dict[str, Tensor], SublayerReport]]:
    """Quantize the sublayers of ``group`` (they share the input, hence H) in place; returns
    each one's checkpoint tensors and report.

    H is factored once, on the Hessian device; the group's rows are then split evenly over
    the devices, each quantizing its slices with its own copy of U (in threads: GPU kernels
    run concurrently). The slices give exactly the rows a single device would."""
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
    weights = [linears[n].weight.data for n in group]
    # A row-coupled grid (one parameter per group shared by all rows) is fitted on whole
    # weights: its rows stay on the first device (the Hessian still goes to the second).
    row_devices = 1 if s.fit in ROW_COUPLED_GRIDS else len(run.devices)
    plan = _row_plan([w.shape[0] for w in weights], row_devices)

    def one(m: int, a: int, b: int, device: torch.device, p) -> QuantizedWeight:
        try:
            return quantize_weight(weights[m][a:b].to(device), p, s, rows=(a, len(weights[m])))
        except FP16RangeError as e:
            raise _fp16_range_error(prefix, group[m], weights[m], e, h is None) from e

    def work(device: torch.device, slices: list[tuple[int, int, int]]):
        p = None if prep is None else prep.to(device)  # U copied to each device
        # the thread's current CUDA device, for anything allocated without an explicit device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return [(m, a, one(m, a, b, device, p)) for m, a, b in slices]

    if len(plan) == 1:
        done = [work(run.devices[0], plan[0])]
    else:
        with ThreadPoolExecutor(len(run.devices)) as pool:
            done = list(pool.map(work, run.devices, plan))
    prep = None  # free U before the results are packed
    seconds = (time.time() - t) / len(group)
    # Devices take consecutive row ranges, so the slices arrive in row order.
    parts: list[list[QuantizedWeight]] = [[] for _ in group]
    for m, _, r in (x for per_device in done for x in per_device):
        parts[m].append(r)
    stored = []
    for m, name in enumerate(group):  # one whole weight at a time
        r = QuantizedWeight.cat(parts[m], run.device)
        stored.append(_store_sublayer(run, prefix, name, linears[name], r, seconds, dead))
    return stored


def _fp16_range_error(prefix: str, name: str, W: Tensor, e: FP16RangeError, rtn: bool) -> UserError:
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


def _store_sublayer(
    run: _Run,
    prefix: str,
    name: str,
    m: nn.Linear,
    r: QuantizedWeight,
    seconds: float,
    dead_inputs: int | None,
) -> tuple[dict[str, Tensor], SublayerReport]:
    """Set sublayer ``name``'s weight to Q; returns its checkpoint tensors and report
    (``dead_inputs``: its inputs that were zero in every calibration token)."""
    full, qcfg = f"{prefix}.{name}", run.qcfg
    if not torch.isfinite(r.Q).all():
        raise UserError(f"{full}: quantization produced NaN/Inf (check the calibration data)")
    m.weight.data = r.Q.to(m.weight.dtype)  # later sublayers see the quantized output
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
    report = SublayerReport(
        name, tuple(m.weight.shape), r.loss, seconds, r.damp, r.retries, dead_inputs
    )
    return tensors, report


def _calibration_windows(job: QuantizeJob, config) -> tuple[Tensor, int | None]:
    """The calibration windows (nsamples, seqlen) drawn with the job's seed, and the BOS id
    each begins with (None: none; see data.py). ``config``: the model's."""
    if job.calib is None:
        raise UserError(
            "--calib is required (a text file, folder, wiki-sample or a hub dataset name), or use --rtn"
        )
    if job.nsamples % job.batch_size:
        raise UserError(
            f"--nsamples {job.nsamples} is not a multiple of --batch-size {job.batch_size}"
        )
    check_seqlen(job.seqlen, config, job.model)
    tokens, bos = text_tokens(
        job.model, job.calib, "calib", bos=job.bos, vocab_size=model_vocab_size(config)
    )
    return random_windows(tokens, job.nsamples, job.seqlen, job.settings.seed, bos), bos


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(job: QuantizeJob, src: SourceModel, windows: Tensor | None) -> dict:
    """What a resumed run must share with the run it continues (as JSON data).

    The source model is identified by its resolved path, config.json and tensor names per
    file (not the tensor bytes, which would mean reading the whole model, and not the file
    sizes or times, so that a corrupt shard can be replaced and the run resumed)."""
    fp = {
        "model": str(Path(job.model).resolve()),
        "model_config_sha256": _sha256((Path(job.model) / "config.json").read_bytes()),
        "model_tensors_sha256": _sha256(json.dumps(sorted(src.weight_map.items())).encode()),
        "settings": asdict(job.settings),
        "rtn": job.rtn,
        "calib": None if job.rtn else job.calib,
        "nsamples": None if job.rtn else job.nsamples,
        "seqlen": None if job.rtn else job.seqlen,
        "batch_size": None if job.rtn else job.batch_size,
        "calib_windows_sha256": None if windows is None else _sha256(windows.numpy().tobytes()),
        "device": job.devices[0].type,  # not the count: rows split exactly across devices
        "dtype": job.dtype,
        "act_dtype": job.act_dtype or job.dtype,  # not where they live: that changes no value
        "skip": list(job.skip),
        "max_shard_bytes": job.max_shard_bytes,
    }
    return json.loads(json.dumps(fp))


class _Mismatch(UserError):
    """The partial run belongs to another job (its message says what to do)."""


def _check_fingerprint(partial: Path, old: dict, new: dict) -> None:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b and key.endswith("sha256"):
            diffs.append(f"{key}: {str(a)[:12]}... -> {str(b)[:12]}...")
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        raise _Mismatch(
            f"cannot resume the partial run {partial}: it was started with a different model, "
            f"data or settings ({'; '.join(diffs)}); rerun with its settings, or pass --fresh "
            "to discard it"
        )


def _outer_tensors(run: _Run, start: int, acts: Activations | None) -> list[dict]:
    """Stream the tensors outside the decoder layers into the checkpoint (a fresh run), one at
    a time, and capture the calibration inputs of layer 0 into ``acts`` and every layer's
    kwargs; a resumed run reads only the embeddings and captures only the kwargs."""
    job, model, src = run.job, run.model, run.src
    # What runs before layer 0 (embeddings, rotary): outside the layer stack and the head.
    needed = set()
    if acts is not None and start < len(run.layers):
        needed = {
            name
            for name, _ in model.named_parameters()
            if not name.startswith(run.layers_name + ".")
            and not (run.head_name and name.startswith(run.head_name + "."))
        }
    missing = sorted(needed - set(run.outer_names))
    if missing:
        raise UserError(f"tensor {missing[0]} is missing from {job.model}")
    for name in run.outer_names:
        if start == 0 or name in needed:
            t = src.get_finite(name)
            if name in needed:
                _fits_dtype(name, t, run.dtype)
            if start == 0:
                run.writer.add({name: t})
            if name in needed:
                set_module_tensor_to_device(model, name, run.device, value=t, dtype=run.dtype)
            del t
    if not needed:
        return [{} for _ in run.layers]
    batches = list(run.windows.split(job.batch_size))
    if start > 0:  # resumed: the inputs come from the saved state, the kwargs from one batch
        sink = _LayerInputs(run.layers, on_hidden=lambda x: None)
        batches = batches[:1]
    else:
        sink = _LayerInputs(run.layers, on_hidden=acts.append)
    sink.capture(model, batches, run.device)
    for name in needed:  # the embeddings are not needed again: free them
        set_module_tensor_to_device(model, name, "meta")
    return sink.kwargs


def _hessian(
    layer: nn.Module, first: nn.Linear, acts: Activations, kwargs: dict, device
) -> Hessian:
    """H of the group's shared input, on ``device``: run the layer up to that sublayer for
    every batch."""
    h = Hessian(first.in_features, device)

    def hook(_m, args):
        h.add_batch(args[0])
        raise StopForward

    handle = first.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in acts:
                try:
                    _layer_forward(layer, x, kwargs)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return h
