"""exllamav2 engine adapter: a ready model, cache, tokenizer and generator in one call.

UNTESTED: exllamav2 builds its CUDA extension when imported, so nothing here has been run (the
project's machines have no GPU). It is written against exllamav2 v0.3.2's API as read from its
source (``examples/inference.py``, ``config.py ExLlamaV2Config``, ``model.py ExLlamaV2.load /
load_autosplit``, ``cache.py ExLlamaV2Cache*``, ``generator/dynamic.py
ExLlamaV2DynamicGenerator``, ``attn.py has_flash_attn_with_paged``). The weights it serves are
checked on the CPU instead: ``tests/test_export_exllamav2.py`` and ``tests/test_export_exl2.py``
re-implement exllamav2's GPTQ and EXL2 dequantization and compare them with the reference
dequantizer, bit for bit.

Layer split across GPUs works for both formats (``gpu_split`` or auto split); tensor
parallelism (``load_tp``, as ``examples/inference_tp.py``) needs EXL2 tensors, i.e. a
checkpoint quantized with ``--grid exl2``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..format import Checkpoint
from .export import choose_format, export_exllamav2

__all__ = ["ExLlamaV2Session", "ExLlamaV2Unavailable", "load_exllamav2"]

PINNED_VERSION = "0.3.2"  # the release whose layouts the exporter was checked against
CACHE_CLASSES = {
    16: "ExLlamaV2Cache",
    8: "ExLlamaV2Cache_Q8",
    6: "ExLlamaV2Cache_Q6",
    4: "ExLlamaV2Cache_Q4",
}


class ExLlamaV2Unavailable(RuntimeError):
    """exllamav2 cannot run here (no CUDA, not installed, or its extension failed to build),
    or the request needs something it cannot do with these tensors (TP with GPTQ)."""


@dataclass
class ExLlamaV2Session:
    """Everything :func:`load_exllamav2` built; ``close()`` frees the GPUs and any temp export."""

    model: Any  # exllamav2.ExLlamaV2
    cache: Any  # exllamav2.ExLlamaV2Cache (or a quantized cache)
    tokenizer: Any  # exllamav2.ExLlamaV2Tokenizer
    generator: Any  # exllamav2.generator.ExLlamaV2DynamicGenerator
    config: Any  # exllamav2.ExLlamaV2Config
    path: Path  # the GPTQ or EXL2 folder exllamav2 read
    _tempdir: Path | None = field(default=None, repr=False)

    def generate(self, prompt: str | list[str], max_new_tokens: int = 128, **kw: Any) -> Any:
        """``ExLlamaV2DynamicGenerator.generate`` (greedy unless ``gen_settings`` is given)."""
        return self.generator.generate(prompt=prompt, max_new_tokens=max_new_tokens, **kw)

    def close(self) -> None:
        if self.model is not None:
            self.model.unload()
            self.model = self.generator = self.cache = None
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> ExLlamaV2Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _import_exllamav2() -> tuple[Any, Any]:
    import torch

    if not torch.cuda.is_available():
        raise ExLlamaV2Unavailable(
            "exllamav2 needs a CUDA GPU: it builds and loads its CUDA extension at import"
        )
    try:
        import exllamav2
        from exllamav2 import generator
    except ImportError as e:
        raise ExLlamaV2Unavailable(
            f"exllamav2 is not importable ({e}); install it with "
            f"`pip install exllamav2=={PINNED_VERSION}` (prebuilt wheels match torch/CUDA "
            "versions, the plain one compiles at first import and needs the CUDA toolkit)"
        ) from e
    except Exception as e:  # a failed JIT build surfaces as RuntimeError / OSError / ...
        raise ExLlamaV2Unavailable(f"exllamav2 failed to load its extension: {e}") from e
    version = getattr(exllamav2, "__version__", "?")
    if version != PINNED_VERSION:
        import logging

        logging.getLogger(__name__).warning(
            "exllamav2 %s: the GPTQ layout was checked against %s", version, PINNED_VERSION
        )
    return exllamav2, generator


def _exllamav2_folder(
    path: Path, workdir: Path | str | None, tensor_parallel: bool
) -> tuple[Path, Path | None]:
    """``path`` if it is already an export (GPTQ or EXL2), else a temp export of the LeanQuant
    checkpoint (EXL2 for ``--grid exl2`` checkpoints, GPTQ otherwise)."""
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing")
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    method = qc.get("quant_method")
    if method not in ("leanquant", "gptq", "exl2"):
        raise ExLlamaV2Unavailable(
            f"{path}: quant_method {method!r}; expected a LeanQuant checkpoint or its "
            "`leanquant export exllamav2` output"
        )
    target = choose_format(Checkpoint(path), "auto") if method == "leanquant" else method
    if tensor_parallel and target != "exl2":
        raise ExLlamaV2Unavailable(
            f"{path}: tensor parallelism needs EXL2 tensors (linear.py tp_split; "
            "ext_qmatrix.cpp make_q_matrix_split: 'Tensor split not implemented for GPTQ "
            "matrices'); quantize with --grid exl2, or use a layer split (gpu_split)"
        )
    if method != "leanquant":
        return path, None
    tmp = Path(tempfile.mkdtemp(prefix="leanquant-exl2-", dir=workdir))
    try:
        export_exllamav2(path, tmp / target, format=target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp / target, tmp


def load_exllamav2(
    path: Path | str,
    max_seq_len: int = 4096,
    *,
    gpu_split: list[float] | None = None,
    cache_bits: int = 16,
    paged: bool | None = None,
    tensor_parallel: bool = False,
    workdir: Path | str | None = None,
    progress: bool = False,
    **generator_kwargs: Any,
) -> ExLlamaV2Session:
    """Build exllamav2's model, cache, tokenizer and dynamic generator for ``path``.

    ``path`` is a ``leanquant export exllamav2`` folder, or a LeanQuant checkpoint, which is
    exported to a temporary folder first (removed by ``close()``; ``workdir`` picks where).
    ``max_seq_len`` sets the model's context and the cache size (the cache holds this many
    tokens for all jobs together). ``gpu_split``: GB per GPU for a manual layer split; None:
    ``load_autosplit`` fills the visible GPUs in turn. ``cache_bits``: 16 (fp16 cache), 8, 6
    or 4 (quantized caches). ``paged``: None uses paged attention when flash-attn >= 2.5.7 is
    present (batching), else the unpaged fallback (one sequence at a time). Other keywords go
    to ``ExLlamaV2DynamicGenerator``. ``tensor_parallel=True`` splits every layer over the GPUs
    (``load_tp``; ``gpu_split`` then caps each GPU) and needs EXL2 tensors: a ``--grid exl2``
    checkpoint or its export; anything else raises before exllamav2 is imported.
    """
    if cache_bits not in CACHE_CLASSES:
        raise ValueError(f"cache_bits: {cache_bits} is not one of {sorted(CACHE_CLASSES)}")
    folder, tmp = _exllamav2_folder(Path(path), workdir, tensor_parallel)
    model = None
    try:
        exl, gen = _import_exllamav2()
        config = exl.ExLlamaV2Config(str(folder))
        config.max_seq_len = max_seq_len
        config.arch_compat_overrides()
        model = exl.ExLlamaV2(config)
        cache_cls = getattr(exl, CACHE_CLASSES[cache_bits])
        if tensor_parallel:  # examples/inference_tp.py
            model.load_tp(
                gpu_split,
                progress=progress,
                expect_cache_tokens=max_seq_len,
                expect_cache_base=cache_cls,
            )
            cache = exl.ExLlamaV2Cache_TP(model, base=cache_cls, max_seq_len=max_seq_len)
        elif gpu_split is None:
            cache = cache_cls(model, max_seq_len=max_seq_len, lazy=True)
            model.load_autosplit(cache, progress=progress)
        else:
            model.load(gpu_split, progress=progress)
            cache = cache_cls(model, max_seq_len=max_seq_len)
        tokenizer = exl.ExLlamaV2Tokenizer(config)
        if paged is None:
            from exllamav2 import attn

            paged = bool(attn.has_flash_attn_with_paged) and not config.no_flash_attn
        generator = gen.ExLlamaV2DynamicGenerator(
            model=model, cache=cache, tokenizer=tokenizer, paged=paged, **generator_kwargs
        )
    except BaseException:
        if model is not None and getattr(model, "loaded", False):
            model.unload()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExLlamaV2Session(model, cache, tokenizer, generator, config, folder, tmp)
