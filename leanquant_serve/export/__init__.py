"""Exports of LeanQuant checkpoints to stock formats that other engines load without a plugin:
what every exporter shares. The exporters live in their engine's folder
(``leanquant_serve/compressed_tensors/export.py``, ``leanquant_serve/exllamav2/export.py``).

Each exporter reads a checkpoint through :mod:`leanquant_serve.format` one tensor at a time,
writes the new folder atomically, and refuses (with a one-line ``ValueError``) whatever the
target format cannot represent exactly.
"""

from __future__ import annotations

from pathlib import Path

from ..format import Checkpoint


class ExportError(ValueError):
    """The checkpoint cannot be written exactly in the target format; the message says why."""


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
