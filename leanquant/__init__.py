"""``leanquant``: the product's entry points over the quantizer and the engines' packages.

``leanquant.cli`` is the ``leanquant`` command (``quantize``, ``eval``, ``export``, ``plan``,
``fetch-assets``, ``demo``): a thin layer that builds its flags from the settings dataclasses
and calls the Python API below, so the library and the command share every default and check
(and write byte-identical checkpoints).

Python API (:mod:`leanquant.api`)::

    import leanquant
    from leanquant import GPTQSettings

    leanquant.quantize("smollm2", "out/w4g64", GPTQSettings(bits=4, group_size=64),
                       calib="wiki-sample", nsamples=32, seqlen=512)
    leanquant.evaluate("out/w4g64", ref="smollm2", seqlen=1024, max_windows=16)
    leanquant.export("compressed-tensors", "out/w4g64", "out/w4g64-ct")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantizer.evaluate import EvalJob
    from quantizer.gptq import GPTQSettings
    from quantizer.pipeline import QuantizeJob, Summary

    from .api import EXPORT_TARGETS, evaluate, export, quantize, quantize_job

# Imported on first use (PEP 562), so that importing ``leanquant.cli`` does not import torch
# and transformers before its main() can turn Ctrl-C and SIGTERM into one line.
_LAZY = {
    "EvalJob": "quantizer.evaluate",
    "GPTQSettings": "quantizer.gptq",
    "QuantizeJob": "quantizer.pipeline",
    "Summary": "quantizer.pipeline",
    **dict.fromkeys(
        ("EXPORT_TARGETS", "evaluate", "export", "quantize", "quantize_job"), "leanquant.api"
    ),
}


def __getattr__(name: str):
    if name in ("api", "cli"):  # submodules, as attributes once imported (as before PEP 562)
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "EXPORT_TARGETS",
    "EvalJob",
    "GPTQSettings",
    "QuantizeJob",
    "Summary",
    "evaluate",
    "export",
    "quantize",
    "quantize_job",
]
