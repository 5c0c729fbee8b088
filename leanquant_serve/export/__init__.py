"""Exports of LeanQuant checkpoints to stock formats that other engines load without a plugin:
what every exporter shares. The exporters live in their engine's folder
(``leanquant_serve/compressed_tensors/export.py``, ``leanquant_serve/exllamav2/export.py``).

Each exporter reads a checkpoint through :mod:`leanquant_serve.format` one tensor at a time,
writes the new folder atomically, and refuses (with a one-line ``ValueError``) whatever the
target format cannot represent exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..format import QUANT_SUFFIXES, Checkpoint, CheckpointWriter


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


def check_fused_parts(
    quantized: set[str], present: Iterable[str], groups: Iterable[Sequence[str]], why: str
) -> None:
    """The rule for layers an engine handles as one (fused, or asserted together): their parts
    are all quantized or none. ``groups`` name the parts relative to their parent module;
    ``why`` ends the message (the engine's reason)."""
    present, seen = set(present), set()
    for name in sorted(present):
        parent, dot, leaf = name.rpartition(".")
        for group in groups:
            if leaf not in group or (parent, tuple(group)) in seen:
                continue
            seen.add((parent, tuple(group)))
            parts = [f"{parent}{dot}{g}" for g in group if f"{parent}{dot}{g}" in present]
            done = [p in quantized for p in parts]
            if any(done) and not all(done):
                raise ExportError(
                    f"{parent}: {', '.join(p.rpartition('.')[2] for p in parts)} are quantized "
                    f"only in part; {why}"
                )


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
