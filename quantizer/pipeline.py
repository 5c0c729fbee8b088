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

import errno
import functools
import hashlib
import json
import logging
import re
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from leanquant_serve.format import (
    CheckpointWriter,
    FormatError,
    LeanQuantConfig,
    dequantize_linear,
    linear_specs,
    pack_linear,
)
from leanquant_serve.format.checkpoint import PartialRunError, PartialRunLocked

from .data import load_text, random_windows, tokenize
from .errors import UserError
from .gptq import CholeskyError, GPTQSettings, Hessian, QuantizedWeight, quantize_weight
from .model_walk import StopForward, find_decoder_layers, find_linears, sequential_groups
from .source import SourceModel

log = logging.getLogger(__name__)

REPORT_FILE = "quantize_report.json"


@dataclass(frozen=True)
class QuantizeJob:
    """Everything one quantization run needs (the CLI builds it from its flags)."""

    model: Path
    out: Path
    settings: GPTQSettings
    rtn: bool = False  # round-to-nearest: no calibration, no error feedback
    calib: str | None = None  # text source, see data.load_text
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"  # dtype for layer forwards and activations
    # regexes of linear sublayers (relative to a layer) to leave unquantized
    skip: tuple[str, ...] = ()
    overwrite: bool = False
    max_shard_bytes: int = 4 * 1024**3
    # An existing partial run of ``out`` is refused unless one of these is set.
    resume: bool = False  # continue it after its last finished layer (or start if none)
    fresh: bool = False  # discard it and start over


@dataclass
class SublayerReport:
    name: str
    shape: tuple[int, int]
    loss: float
    seconds: float
    damp: float
    cholesky_retries: int


@dataclass
class Summary:
    out: str
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int
    total_loss: float
    cholesky_retries: int
    layers: list[list[SublayerReport]] = field(default_factory=list)


def _qcfg(job: QuantizeJob, not_converted: list[str]) -> LeanQuantConfig:
    s = job.settings
    method = "rtn" if job.rtn else ("gptq" if s.grid == "minmax" else "leanquant")
    meta = {
        "method": method,
        "grid_fit": s.grid,
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
        grid="nonuniform" if s.grid == "nonuniform" else "affine",
        desc_act=s.actorder and not job.rtn,
        static_groups=s.static_groups,
        modules_to_not_convert=tuple(not_converted),
        quantizer=meta,
    )


def _peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _LayerInputs:
    """Catches what the model feeds each decoder layer: layer 0's hidden states, every layer's kwargs."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.hidden: list[Tensor] = []
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
            self.sink.hidden.append(hidden_states)
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
        if job.settings.group_size != -1 and m.in_features % job.settings.group_size:
            raise UserError(
                f"--group-size {job.settings.group_size} does not divide in_features "
                f"{m.in_features} of {layer_name}.{name}: use a divisor such as "
                f"{', '.join(str(g) for g in (32, 64, 128, 256) if m.in_features % g == 0) or '-1'}"
            )
        try:
            linear_specs(qcfg, m.in_features, m.out_features)
        except FormatError as e:
            raise UserError(f"{layer_name}.{name}: {e}") from e


def _load_layer(
    src: SourceModel, layer: nn.Module, prefix: str, device, dtype
) -> dict[str, Tensor]:
    """Materialise the layer from the shards; returns the tensors read, as stored."""
    stored = {f"{prefix}.{p}": src.get_finite(f"{prefix}.{p}") for p, _ in layer.named_parameters()}
    for name, t in stored.items():
        set_module_tensor_to_device(layer, name[len(prefix) + 1 :], device, value=t, dtype=dtype)
    return stored


def quantize_model(
    job: QuantizeJob, observer: Callable[[str, QuantizedWeight], None] | None = None
) -> Summary:
    """Run ``job``; returns the summary also written as ``quantize_report.json`` in the output.

    ``observer(name, result)`` is called for every quantized sublayer (tests use it to
    rebuild the in-memory quantized model).
    """
    if job.resume and job.fresh:
        raise UserError("--resume and --fresh exclude each other")
    t0 = time.time()
    src = SourceModel(job.model)
    try:
        return _run(job, src, t0, observer)
    finally:
        src.close()


def _partial_hint(partial: Path) -> str:
    return (
        f"partial run kept at {partial} ({CheckpointWriter.describe_partial(partial)}): "
        "rerun with --resume to continue it, or with --fresh (or delete it) to start over"
    )


def _os_error(e: OSError) -> str:
    what = f" writing {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{what}"
    return f"I/O error{what}: {e.strerror or e}"


def _build_skeleton(job: QuantizeJob, dtype: torch.dtype) -> nn.Module:
    """The model with empty (meta) parameters; buffers such as rotary frequencies are real."""
    try:
        config = AutoConfig.from_pretrained(job.model)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot read the model config in {job.model}: {e}") from e
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as e:
            raise UserError(f"unsupported architecture in {job.model}: {e}") from e
    return model.eval()


def _run(job: QuantizeJob, src: SourceModel, t0: float, observer) -> Summary:
    device, dtype = torch.device(job.device), getattr(torch, job.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is available")
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
    # Non-layer tensors (embeddings, final norm, lm_head) go to the checkpoint unchanged.
    outer_names = [n for n in src.weight_map if not n.startswith(layers_name + ".")]
    windows = None if job.rtn else _calibration_windows(job)
    fingerprint = _fingerprint(job, src, windows)

    try:
        writer = CheckpointWriter(
            job.out,
            max_shard_bytes=job.max_shard_bytes,
            overwrite=job.overwrite,
            resumable=True,
            on_partial="resume" if job.resume else "fresh" if job.fresh else "refuse",
            check_state=lambda state: _check_fingerprint(
                job.out.parent / f".{job.out.name}.partial", state.get("job", {}), fingerprint
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
    try:
        with writer:
            return _layers(
                job,
                src,
                t0,
                observer,
                model,
                layers_name,
                layers,
                head_name,
                qcfg,
                outer_names,
                windows,
                fingerprint,
                writer,
                device,
                dtype,
            )
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


def _layers(
    job,
    src,
    t0,
    observer,
    model,
    layers_name,
    layers,
    head_name,
    qcfg,
    outer_names,
    windows,
    fingerprint,
    writer: CheckpointWriter,
    device,
    dtype,
) -> Summary:
    """The per-layer loop, from the first layer the partial run in ``writer`` has not done."""
    s = job.settings
    summary = Summary(str(job.out), 0.0, 0, 0, 0.0, 0)
    start, seconds_before = 0, 0.0
    if writer.progress is not None:
        state = writer.progress  # its fingerprint was checked by the writer
        start, seconds_before = state["layers_done"], state["seconds"]
        summary = _summary_from_state(job, state["summary"])
        log.info("resuming %s after layer %d of %d", writer.partial, start - 1, len(layers))
    outer = {n: src.get_finite(n) for n in outer_names}
    if start == 0:
        writer.add(outer)
    if not job.rtn:
        inputs, kwargs = _calibration_inputs(
            job, windows, outer, model, layers_name, layers, device, dtype, head_name
        )
        if start and start < len(layers):
            saved = writer.load_state_file(writer.progress["activations"])
            if len(saved) != len(inputs):
                raise UserError(f"{writer.partial}: saved activations do not match the batches")
            inputs = [saved[str(b)].to(device) for b in range(len(inputs))]
    del outer

    bar = tqdm(
        range(start, len(layers)), desc="layers", unit="layer", initial=start, total=len(layers)
    )
    for i in bar:
        prefix, layer = f"{layers_name}.{i}", layers[i]
        linears = find_linears(layer, job.skip)
        stored = _load_layer(src, layer, prefix, device, dtype)
        results: list[tuple[dict[str, Tensor], SublayerReport]] = []
        sub = tqdm(total=len(linears), desc=f"layer {i}", unit="sublayer", leave=False)
        if job.rtn:
            for name in linears:
                results.append(
                    _quantize_sublayer(qcfg, s, prefix, name, linears[name], None, observer)
                )
                sub.update()
        else:
            run_first = functools.partial(_layer_forward, layer, inputs[0], kwargs[i])
            for group in sequential_groups(linears, run_first):
                H = _hessian(layer, linears[group[0]], inputs, kwargs[i], device)
                if not torch.isfinite(H).all():
                    raise UserError(
                        f"{prefix}.{group[0]}: the Hessian of its calibration inputs has "
                        f"NaN/Inf (the activations entering layer {i} overflowed or are NaN;"
                        " try --dtype float32 or other calibration data)"
                    )
                for name in group:  # members share the input, hence H
                    results.append(
                        _quantize_sublayer(qcfg, s, prefix, name, linears[name], H, observer)
                    )
                    sub.update()
                del H
            with torch.no_grad():  # inputs of the next layer, through the quantized layer
                inputs = [_layer_forward(layer, x, kwargs[i]) for x in inputs]
            if not all(torch.isfinite(x).all() for x in inputs):
                raise UserError(
                    f"{prefix}: the quantized layer's outputs contain NaN/Inf "
                    "(try --dtype float32, a larger --damp or other calibration data)"
                )
        sub.close()

        quantized_weights = {f"{prefix}.{n}.weight" for n in linears}
        rest = {
            n: stored[n] if n in stored else src.get(n)
            for n in src.names(prefix + ".")
            if n not in quantized_weights
        }
        writer.add(rest)
        for tensors, _ in results:
            writer.add(tensors)
        layer.to("meta")  # free the layer
        reports = [r for _, r in results]
        summary.layers.append(reports)
        loss = sum(r.loss for r in reports)
        summary.total_loss += loss
        summary.cholesky_retries += sum(r.cholesky_retries for r in reports)
        bar.set_postfix(loss=f"{loss:.3g}")
        log.debug("layer %d: %s", i, ", ".join(f"{r.name}={r.loss:.3g}" for r in reports))
        # Durable step: a kill from here on resumes at layer i + 1.
        summary.seconds = seconds_before + time.time() - t0
        state = {
            "job": fingerprint,
            "layers_done": i + 1,
            "seconds": summary.seconds,
            "summary": _summary_state(summary),
            "activations": None,
        }
        files = {}
        if not job.rtn and i + 1 < len(layers):
            state["activations"] = f"state-activations-{i + 1:05d}.safetensors"
            files[state["activations"]] = {str(b): x for b, x in enumerate(inputs)}
        writer.save_state(state, files, note=f"{i + 1} of {len(layers)} layers done")

    summary.seconds = seconds_before + time.time() - t0
    summary.peak_rss_bytes = _peak_rss()
    if device.type == "cuda":
        summary.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    (writer.partial / REPORT_FILE).write_text(json.dumps(asdict(summary), indent=1))
    writer.finalize(src.config, qcfg, copy_from=job.model)
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


def _quantize_sublayer(
    qcfg: LeanQuantConfig,
    s: GPTQSettings,
    prefix: str,
    name: str,
    m: nn.Linear,
    H: Tensor | None,
    observer: Callable[[str, QuantizedWeight], None] | None,
) -> tuple[dict[str, Tensor], SublayerReport]:
    """Quantize sublayer ``name`` of layer ``prefix`` in place (its weight becomes Q);
    returns its checkpoint tensors and report."""
    full, t = f"{prefix}.{name}", time.time()
    try:
        r = quantize_weight(m.weight.data, H, s)
    except CholeskyError as e:
        raise UserError(f"{full}: {e}; raise --damp") from e
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
    if observer is not None:
        observer(full, r)
    report = SublayerReport(name, tuple(m.weight.shape), r.loss, time.time() - t, r.damp, r.retries)
    return tensors, report


def _calibration_windows(job: QuantizeJob) -> Tensor:
    """The calibration windows (nsamples, seqlen) drawn with the job's seed."""
    if job.calib is None:
        raise UserError(
            "--calib is required (a text file, folder, wiki-sample or a hub dataset name), or use --rtn"
        )
    if job.nsamples % job.batch_size:
        raise UserError(
            f"--nsamples {job.nsamples} is not a multiple of --batch-size {job.batch_size}"
        )
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    return random_windows(
        tokenize(tokenizer, load_text(job.calib, "calib")),
        job.nsamples,
        job.seqlen,
        job.settings.seed,
    )


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
        "device": torch.device(job.device).type,
        "dtype": job.dtype,
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


def _calibration_inputs(job, windows, outer, model, layers_name, layers, device, dtype, head_name):
    """Capture every layer's inputs/kwargs for the calibration ``windows``."""
    batches = list(windows.split(job.batch_size))
    # Materialise everything outside the layer stack that runs before layer 0 (embeddings, rotary).
    names = [
        name
        for name, _ in model.named_parameters()
        if not name.startswith(layers_name + ".")
        and not (head_name and name.startswith(head_name + "."))
    ]
    for name in names:
        if name not in outer:
            raise UserError(f"tensor {name} is missing from {job.model}")
        set_module_tensor_to_device(model, name, device, value=outer[name], dtype=dtype)
    sink = _LayerInputs(layers)
    sink.capture(model, batches, device)
    for name in names:  # the embeddings are not needed again: free them
        set_module_tensor_to_device(model, name, "meta")
    return sink.hidden, sink.kwargs


def _hessian(
    layer: nn.Module, first: nn.Linear, inputs: list[Tensor], kwargs: dict, device
) -> Tensor:
    """H of the group's shared input: run the layer up to that sublayer for every batch."""
    h = Hessian(first.in_features, device)

    def hook(_m, args):
        h.add_batch(args[0])
        raise StopForward

    handle = first.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in inputs:
                try:
                    _layer_forward(layer, x, kwargs)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return h.H


def parse_skip(patterns: list[str]) -> tuple[str, ...]:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise UserError(f"--skip {p!r} is not a valid regular expression: {e}") from e
    return tuple(patterns)
