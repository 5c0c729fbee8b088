"""The Python API: what the ``leanquant`` command does, as calls (the command calls these).

    import leanquant
    from leanquant import GPTQSettings

    summary = leanquant.quantize("smollm2", "out/w4g64", GPTQSettings(bits=4, group_size=64),
                                 calib="wiki-sample", nsamples=32, seqlen=512)
    leanquant.evaluate("out/w4g64", ref="smollm2", seqlen=1024, max_windows=16)
    leanquant.export("compressed-tensors", "out/w4g64", "out/w4g64-ct")

Defaults are the dataclasses' (:class:`~quantizer.gptq.GPTQSettings`,
:class:`~quantizer.pipeline.QuantizeJob`, :class:`~quantizer.evaluate.EvalJob`), the same ones the
command's flags show, so a call and the command write byte-identical checkpoints. Bad input
raises :class:`~quantizer.errors.UserError` (a ``ValueError``) with the message the command
prints; export refusals raise :class:`~leanquant_serve.export.ExportError` (a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from leanquant_serve.format import check_output
from quantizer.evaluate import EvalJob
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import QuantizeJob, Summary


def model_path(model: str | Path) -> Path:
    """A model folder, or a bundled model's name (``smollm2``, ``gemma3-270m``: built offline
    on first use)."""
    from quantizer.assets import model_path as resolve

    return resolve(model)


def quantize(
    model: str | Path,
    out: str | Path,
    settings: GPTQSettings | None = None,
    *,
    calib: Any = None,
    **job: Any,
) -> Summary:
    """Quantize ``model`` into the checkpoint folder ``out``; returns the run's summary (also
    written as ``out/quantize_report.json``).

    ``settings``: the grid, bits, groups, ... (default ``GPTQSettings()``: LeanQuant affine,
    4-bit, groups of 128, act-order with static groups); ``calib``: a text source name or path,
    or a ``datasets.Dataset`` (``text`` or chat ``messages`` records); ``job``: any other
    :class:`QuantizeJob` field (``nsamples``, ``seqlen``, ``device``, ``overwrite``, ``resume``,
    ...). Raises UserError for bad settings, an existing ``out`` without ``overwrite=True``, or
    unusable model / data, before any weight is read where it can."""
    from quantizer.pipeline import quantize_model

    j = quantize_job(model, out, settings, calib=calib, **job)
    check_output(j.out, j.overwrite)
    return quantize_model(j)


def quantize_job(
    model: str | Path,
    out: str | Path,
    settings: GPTQSettings | None = None,
    *,
    calib: Any = None,
    **job: Any,
) -> QuantizeJob:
    """The :class:`QuantizeJob` :func:`quantize` runs (the command builds its job here too):
    ``model`` resolved (a bundled name is built on first use), every field validated."""
    return QuantizeJob(
        model=model_path(model),
        out=Path(out),
        settings=settings if settings is not None else GPTQSettings(),
        calib=calib,
        **job,
    )


def evaluate(model: str | Path, **job: Any) -> dict:
    """Perplexity of ``model`` (a folder, a LeanQuant checkpoint or a bundled name) on a text
    source's evaluation split; with ``ref=MODEL`` also KL(P_ref ‖ P_model) per token and top-1
    agreement on the same windows. ``job``: :class:`EvalJob` fields (``data``, ``seqlen``,
    ``max_windows``, ``ref``, ``bos``, ...). Returns the dict ``leanquant eval --json`` prints."""
    from quantizer.evaluate import evaluate as run

    return run(EvalJob(model_path(model), **job))


def _exporters() -> dict[str, Callable[..., Any]]:
    from leanquant_serve.bitsandbytes.export import export_bnb_nf4
    from leanquant_serve.compressed_tensors.export import export_compressed_tensors
    from leanquant_serve.exllamav2.export import export_exllamav2

    return {
        "compressed-tensors": export_compressed_tensors,
        "exllamav2": export_exllamav2,
        "bnb-nf4": export_bnb_nf4,
    }


EXPORT_TARGETS = ("compressed-tensors", "exllamav2", "bnb-nf4")


def export(
    target: str, checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, **options
):
    """Convert the LeanQuant ``checkpoint`` into ``target``'s format in ``out``:
    ``compressed-tensors`` (stock vLLM), ``exllamav2`` (``format="gptq"|"exl2"|"auto"``) or
    ``bnb-nf4`` (transformers / vLLM's bitsandbytes loader). Returns the exporter's result.
    Raises UserError for an unknown target or an existing ``out`` without ``overwrite=True``,
    ExportError for what the target cannot hold exactly."""
    from quantizer.errors import UserError

    if target not in EXPORT_TARGETS:
        raise UserError(f"export target {target!r}: choose one of {', '.join(EXPORT_TARGETS)}")
    check_output(Path(out), overwrite, flag="--overwrite")
    return _exporters()[target](checkpoint, out, overwrite=overwrite, **options)
