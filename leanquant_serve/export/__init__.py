"""Exports of LeanQuant checkpoints to stock formats that other engines load without a plugin:
what every exporter shares. The exporters live in their engine's folder
(``leanquant_serve/compressed_tensors/export.py``, ``leanquant_serve/exllamav2/export.py``).

Each exporter reads a checkpoint through :mod:`leanquant_serve.format` one tensor at a time,
writes the new folder atomically, and refuses (with a one-line ``ValueError``) whatever the
target format cannot represent exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..format import QUANT_SUFFIXES, Checkpoint, CheckpointWriter, FormatError, fused_misfit


class ExportError(ValueError):
    """The checkpoint cannot be written exactly in the target format; the message says why."""


class Exporter(ABC):
    """One target format (compare compressed-tensors' registered compressors).

    Constructing one checks the whole source against the target, before anything is written
    (raise :class:`ExportError`); :func:`export`, the one driver, then hands it the source's
    tensors in order and writes what it returns."""

    def __init__(self, src: Checkpoint, prefixes: list[str]) -> None:
        self.src, self.prefixes = src, prefixes

    @abstractmethod
    def convert_linear(self, prefix: str) -> dict[str, Tensor]:
        """The target's tensors (full names) for the quantized linear ``prefix``."""

    def convert_tensor(self, name: str, tensor: Tensor) -> Tensor:
        """A tensor that is not part of a quantized linear's stored grid (default: as is)."""
        return tensor

    @abstractmethod
    def quantization_config(self) -> dict[str, Any]:
        """``config.json["quantization_config"]`` of the export, once every linear was
        converted."""


def export(
    make: Callable[[Checkpoint, list[str]], Exporter],
    src_dir: Path | str,
    out_dir: Path | str,
    *,
    overwrite: bool = False,
) -> tuple[Exporter, Path, dict[str, Any]]:
    """The one export driver: open ``src_dir``, build the exporter (which checks everything),
    stream every tensor through it into ``out_dir`` (atomically: nothing is left behind on
    failure), and finish with its ``quantization_config``. ``make(src, prefixes)`` builds the
    exporter (a subclass, or a ``functools.partial`` of one with its options). Returns
    (exporter, out, config)."""
    src, out, prefixes = open_source(src_dir, out_dir)
    exporter = make(src, prefixes)
    stored = {f"{p}.{s}" for p in prefixes for s in QUANT_SUFFIXES}
    hf_config = {k: v for k, v in src.hf_config.items() if k != "quantization_config"}
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        for name in src.tensor_names():
            if name not in stored:
                writer.add({name: exporter.convert_tensor(name, src.get(name))})
            elif name.endswith(".qweight"):
                writer.add(exporter.convert_linear(name.removesuffix(".qweight")))
        qconfig = exporter.quantization_config()
        writer.finalize(hf_config, qconfig, copy_from=src.path)
    return exporter, out, qconfig


def check_fused_parts(quantized: set[str], groups: Iterable[Sequence[str]], why: str) -> None:
    """Every exporter's application of the contract's fused-parts rule
    (:func:`~leanquant_serve.format.fused_misfit`): ``groups`` (full module names) are the
    linears the target engine runs as one layer; ``why`` ends the message (the engine's
    reason). Raises ExportError naming the first group quantized only in part."""
    for group in groups:
        misfit = fused_misfit(group, quantized)
        if misfit:
            raise ExportError(f"{misfit}; {why}")


def open_source(src_dir: Path | str, out_dir: Path | str) -> tuple[Checkpoint, Path, list[str]]:
    """(source checkpoint, output path, quantized prefixes), refusing an output folder that is
    the source itself and a checkpoint with nothing quantized."""
    src = Checkpoint(src_dir)
    out = Path(out_dir)
    if out.exists() and out.resolve() == src.path.resolve():
        raise ExportError(f"{out}: the output folder is the source checkpoint")
    prefixes = src.quantized_prefixes()
    if not prefixes:
        raise ExportError(f"{src.path}: no quantized linears")
    return src, out, prefixes


def meta_model(hf_config: Mapping[str, Any], path: Path) -> torch.nn.Module:
    """The architecture of ``hf_config`` as a meta-device skeleton (no weights, no memory), as
    ``AutoModelForCausalLM.from_config`` builds it. Raises FormatError without a model_type,
    ExportError if transformers cannot build the architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy imports, only needed here

    config_dict = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    if "model_type" not in config_dict:
        raise FormatError(f"{path / 'config.json'}: no model_type")
    try:
        config = AutoConfig.for_model(**config_dict)
        # bfloat16: the dtype every kernel a trace may reach accepts (grouped MoE matmuls
        # take nothing else); no memory is allocated on the meta device
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    except (ValueError, KeyError) as e:
        raise ExportError(f"{path}: cannot build the architecture to list its linears ({e})") from e


def model_linears(
    hf_config: Mapping[str, Any], path: Path, model: torch.nn.Module | None = None
) -> tuple[list[str], list[list[str]]]:
    """Names of every ``nn.Linear`` of the architecture, and those that read one input (what
    vLLM fuses), from a meta-device skeleton traced once (no weights read): ``model`` if given,
    else :func:`meta_model`. Every exporter that must know the model's linears calls this.
    Raises FormatError without a model_type, ExportError if transformers cannot build or trace
    the architecture."""
    from quantizer.model_walk import shared_input_groups

    if model is None:
        model = meta_model(hf_config, path)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        groups = shared_input_groups(model)
    except ValueError as e:  # UserError
        raise ExportError(f"{path}: {e}") from e
    return linears, groups
