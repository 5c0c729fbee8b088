"""exllamav2 engine adapter: a ready model, cache, tokenizer and generator in one call.

UNTESTED: exllamav2 builds its CUDA extension when imported, so nothing here has been run (the
project's machines have no GPU). It is written against exllamav2 v0.3.2's API as read from its
source (``examples/inference.py``, ``config.py ExLlamaV2Config``, ``model.py ExLlamaV2.load /
load_autosplit``, ``cache.py ExLlamaV2Cache*``, ``generator/dynamic.py
ExLlamaV2DynamicGenerator``, ``attn.py has_flash_attn_with_paged``). The weights it serves are
checked on the CPU instead: ``tests/test_export_exllamav2.py`` re-implements exllamav2's GPTQ
dequantization and compares it with the reference dequantizer.

Layer split across GPUs works (``gpu_split`` or auto split); tensor parallelism does not, see
:data:`leanquant_serve.export.exllamav2.EXL2_REASON`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..export.exllamav2 import EXL2_REASON, export_exllamav2

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
    or the request needs something it cannot do with GPTQ tensors."""


@dataclass
class ExLlamaV2Session:
    """Everything :func:`load_exllamav2` built; ``close()`` frees the GPUs and any temp export."""

    model: Any  # exllamav2.ExLlamaV2
    cache: Any  # exllamav2.ExLlamaV2Cache (or a quantized cache)
    tokenizer: Any  # exllamav2.ExLlamaV2Tokenizer
    generator: Any  # exllamav2.generator.ExLlamaV2DynamicGenerator
    config: Any  # exllamav2.ExLlamaV2Config
    path: Path  # the GPTQ folder exllamav2 read
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


def _gptq_folder(path: Path, workdir: Path | str | None) -> tuple[Path, Path | None]:
    """``path`` if it is already a GPTQ folder, else a temp export of the LeanQuant checkpoint."""
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing")
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "gptq":
        return path, None
    if method != "leanquant":
        raise ExLlamaV2Unavailable(
            f"{path}: quant_method {method!r}; expected a LeanQuant checkpoint or its "
            "`leanquant export exllamav2` output"
        )
    tmp = Path(tempfile.mkdtemp(prefix="leanquant-exl2-", dir=workdir))
    try:
        export_exllamav2(path, tmp / "gptq")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp / "gptq", tmp


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
    to ``ExLlamaV2DynamicGenerator``. ``tensor_parallel=True`` raises: GPTQ tensors cannot be
    split by exllamav2 (see ``EXL2_REASON``).
    """
    if tensor_parallel:
        raise ExLlamaV2Unavailable(f"tensor parallelism needs EXL2 tensors. {EXL2_REASON}")
    if cache_bits not in CACHE_CLASSES:
        raise ValueError(f"cache_bits: {cache_bits} is not one of {sorted(CACHE_CLASSES)}")
    exl, gen = _import_exllamav2()
    folder, tmp = _gptq_folder(Path(path), workdir)
    model = None
    try:
        config = exl.ExLlamaV2Config(str(folder))
        config.max_seq_len = max_seq_len
        config.arch_compat_overrides()
        model = exl.ExLlamaV2(config)
        cache_cls = getattr(exl, CACHE_CLASSES[cache_bits])
        if gpu_split is None:
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
