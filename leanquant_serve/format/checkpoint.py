"""The LeanQuant checkpoint folder: writing it (streamed, sharded, atomic) and reading it back.

A checkpoint is a Hugging Face model folder: ``config.json`` (the source model's config plus
``quantization_config`` = :meth:`LeanQuantConfig.to_dict`), ``model.safetensors`` or
``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``, and the
source's tokenizer / generation files. Quantized linears are stored as described in
:mod:`leanquant_serve.format.tensors` (W is (out, in) = (rows, columns)); every other tensor
keeps its name, shape and dtype.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as _SAFETENSORS_DTYPES  # header dtype name -> torch dtype
from safetensors.torch import save_file
from torch import Tensor

from .config import FormatError, LeanQuantConfig
from .tensors import QUANT_SUFFIXES, check_linear, dequantize_linear

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
AUXILIARY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "added_tokens.json",
    "preprocessor_config.json",  # a multimodal wrapper's image processor (transformers 4)
    "processor_config.json",  # its processor (transformers 5: the image processor inside)
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a JSON object")
    return data


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def partial_dir(out_dir: Path) -> Path:
    """Where a checkpoint folder is written before it appears: the hidden sibling
    ``.<name>.partial``. The one place that name is built (the writer, the quantizer's journal
    and the CLI's messages all call this)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial"


def check_output(out_dir: Path, overwrite: bool, flag: str = "overwrite=True") -> None:
    """The rule for an output folder: an existing one is replaced only with ``overwrite`` (and
    only if it is a folder). Raises FormatError naming ``flag``, the way to pass it (the CLI
    says ``--overwrite``). Called by the writer, and by the CLI before any work."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (overwrite and out_dir.is_dir()):
        raise FormatError(f"{out_dir}: already exists (pass {flag} to replace it)")


class CheckpointWriter:
    """Streams tensors into a checkpoint folder that appears only when :meth:`finalize` succeeds.

    Tensors are buffered on the CPU and written to safetensors shards in the hidden sibling
    folder :func:`partial_dir` (``.<name>.partial``). A shard is flushed before the buffer
    would exceed ``max_shard_bytes`` (a single larger tensor gets a shard of its own), so shard
    contents depend only on the sequence of tensors added. An existing ``out_dir`` is refused
    unless ``overwrite=True``; it is then replaced only at the end of :meth:`finalize`. As a
    context manager, leaving the block without a successful :meth:`finalize` (an exception, or
    no call) deletes the partial folder.

    Subclasses may keep the partial folder across failures (the quantizer's crash-resume
    journal, ``quantizer.journal.JournaledWriter``) by overriding the hooks marked below.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        max_shard_bytes: int = 2 * 1024**3,
        overwrite: bool = False,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes: {max_shard_bytes} is not positive")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        check_output(self.out_dir, overwrite)
        self.partial = partial_dir(self.out_dir)
        self._buffer: dict[str, Tensor] = {}
        self._buffered_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each flushed shard
        self._names: set[str] = set()
        self._total_bytes = 0
        self._open = True
        self._open_partial()

    # -- hooks --------------------------------------------------------------------------

    def _open_partial(self) -> None:
        """Create the partial folder (a stale one from a killed run is removed)."""
        if self.partial.exists():
            log.warning("removing stale partial checkpoint %s", self.partial)
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)

    def _write_shard(self, tensors: Mapping[str, Tensor], path: Path) -> None:
        save_file(dict(tensors), path, metadata={"format": "pt"})

    def _place_shard(self, shard: Path, final: Path) -> None:
        """Give a flushed shard its final name inside the partial folder."""
        shard.rename(final)

    def _commit(self) -> None:
        """Called once every file of the finished checkpoint is in the partial folder, just
        before it is moved into place."""

    def _fail(self) -> None:
        """After an error: discard the partial folder."""
        self.abort()

    def _release(self) -> None:
        """Called when the writer is done, whichever way."""

    # -----------------------------------------------------------------------------------

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._open:
            if exc_type is None:
                log.warning("%s: writer closed without finalize(); discarding", self.out_dir)
                self.abort()
            else:
                self._fail()
        self._release()

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"{self.out_dir}: writer already finalized or aborted")

    def add(self, tensors: Mapping[str, Tensor]) -> None:
        """Queue ``tensors`` (name -> tensor) for writing, as contiguous CPU copies."""
        self._check_open()
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise FormatError(f"{name!r}: tensor names must be non-empty strings")
            if name in self._names:
                raise FormatError(f"{name}: duplicate tensor name")
            if not isinstance(t, Tensor):
                raise FormatError(f"{name}: {type(t).__name__} is not a tensor")
        for name, t in tensors.items():
            t = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            if self._buffer and self._buffered_bytes + t.nbytes > self.max_shard_bytes:
                self._flush()
            self._names.add(name)
            self._buffer[name] = t
            self._buffered_bytes += t.nbytes
            self._total_bytes += t.nbytes

    @staticmethod
    def _shard_file(i: int) -> str:
        return f"shard-{i:05d}.safetensors"

    def _flush(self) -> None:
        if not self._buffer:
            return
        shard = self.partial / self._shard_file(len(self._shards) + 1)
        self._write_shard(self._buffer, shard)
        self._shards.append(list(self._buffer))
        self._buffer, self._buffered_bytes = {}, 0

    def finalize(
        self,
        hf_config: Mapping[str, Any],
        qcfg: LeanQuantConfig | Mapping[str, Any],
        copy_from: Path | None = None,
    ) -> Path:
        """Write shards, index and ``config.json`` (``hf_config`` plus ``quantization_config``:
        ``qcfg``, a LeanQuantConfig or, for exports to other formats, their config as a
        mapping), copy auxiliary files from ``copy_from``, and move the folder to ``out_dir``
        (returned). On failure the partial folder is deleted (see :meth:`_fail`)."""
        self._check_open()
        try:
            if not isinstance(hf_config, Mapping):
                raise FormatError(
                    f"hf_config: {type(hf_config).__name__} is not a mapping (pass .to_dict())"
                )
            self._flush()
            if not self._shards:
                raise FormatError(f"{self.out_dir}: no tensors were added")
            n = len(self._shards)
            weight_map = {}
            for i, names in enumerate(self._shards, 1):
                final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
                self._place_shard(self.partial / self._shard_file(i), self.partial / final)
                weight_map.update(dict.fromkeys(names, final))
            if n > 1:
                index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
                _write_json(self.partial / INDEX_FILE, index)
            try:
                quant = qcfg.to_dict() if isinstance(qcfg, LeanQuantConfig) else dict(qcfg)
                config = json.dumps({**hf_config, "quantization_config": quant})
            except (TypeError, ValueError) as e:
                raise FormatError(f"hf_config: not JSON-serialisable ({e})") from None
            _write_json(self.partial / CONFIG_FILE, json.loads(config))
            if copy_from is not None:
                if not Path(copy_from).is_dir():
                    raise FormatError(f"copy_from: {copy_from} is not a folder")
                for fname in AUXILIARY_FILES:
                    if (Path(copy_from) / fname).is_file():
                        shutil.copy2(Path(copy_from) / fname, self.partial / fname)
            self._commit()
            self._move_into_place()
        except BaseException:
            self._fail()
            raise
        self._release()
        self._open = False
        log.info("wrote %s (%d shard(s), %d bytes)", self.out_dir, n, self._total_bytes)
        return self.out_dir

    def _move_into_place(self) -> None:
        old = None
        if self.out_dir.exists():
            if not self.overwrite:
                raise FormatError(f"{self.out_dir}: appeared while writing; not overwriting it")
            old = self.out_dir.parent / f".{self.out_dir.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            self.out_dir.rename(old)
        self.partial.rename(self.out_dir)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        """Discard everything written so far (deletes the partial folder)."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self._buffer, self._buffered_bytes = {}, 0
        self._open = False


class Checkpoint:
    """Read-only view of a LeanQuant checkpoint folder; tensors are read lazily.

    Opening checks ``config.json`` and its ``quantization_config``; :meth:`validate` checks
    every tensor. ``hf_config`` is the whole ``config.json``, ``qcfg`` its parsed
    ``quantization_config``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError(f"{self.path}: not a checkpoint folder")
        self.hf_config = _read_json(self.path / CONFIG_FILE)
        if "quantization_config" not in self.hf_config:
            raise FormatError(f"{self.path / CONFIG_FILE}: no quantization_config")
        self.qcfg = LeanQuantConfig.from_dict(self.hf_config["quantization_config"])
        self._handles: dict[str, Any] = {}
        self._files = self._read_weight_map()  # tensor name -> file name

    def _read_weight_map(self) -> dict[str, str]:
        if (self.path / INDEX_FILE).exists():
            weight_map = _read_json(self.path / INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise FormatError(
                    f"{self.path / INDEX_FILE}: weight_map is not a name -> file object"
                )
            return dict(weight_map)
        if (self.path / SINGLE_FILE).exists():
            return dict.fromkeys(self._handle(SINGLE_FILE).keys(), SINGLE_FILE)
        raise FormatError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE}")

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            if not (self.path / file).is_file():
                raise FormatError(f"{self.path / file}: missing")
            try:
                self._handles[file] = safe_open(self.path / file, framework="pt")
            except SafetensorError as e:
                raise FormatError(f"{self.path / file}: unreadable ({e})") from None
        return self._handles[file]

    def tensor_names(self) -> list[str]:
        return sorted(self._files)

    def get(self, name: str) -> Tensor:
        """The stored tensor ``name``; ``FormatError`` naming it if absent."""
        if name not in self._files:
            raise FormatError(f"{name}: no such tensor in {self.path}")
        try:
            return self._handle(self._files[name]).get_tensor(name)
        except SafetensorError as e:
            raise FormatError(f"{name}: cannot read it from {self._files[name]} ({e})") from None

    def meta(self, name: str) -> Tensor:
        """A meta tensor with the stored shape and dtype of ``name``, read from the header."""
        if name not in self._files:
            raise FormatError(f"{name}: no such tensor in {self.path}")
        try:
            sl = self._handle(self._files[name]).get_slice(name)
            dtype = _SAFETENSORS_DTYPES[sl.get_dtype()]
        except (SafetensorError, KeyError) as e:
            raise FormatError(
                f"{name}: cannot read its header in {self._files[name]} ({e})"
            ) from None
        return torch.empty(sl.get_shape(), dtype=dtype, device="meta")

    def quantized_prefixes(self) -> list[str]:
        """Module names of the quantized linears (those with a ``.qweight``)."""
        return sorted(n.removesuffix(".qweight") for n in self._files if n.endswith(".qweight"))

    def linear_tensors(self, prefix: str, meta: bool = False) -> dict[str, Tensor]:
        """Suffix -> stored tensor of quantized linear ``prefix``, checked with ``check_linear``;
        ``meta``: meta tensors from the headers (shapes and dtypes only, nothing read)."""
        read = self.meta if meta else self.get
        tensors = {
            s: read(f"{prefix}.{s}") for s in QUANT_SUFFIXES if f"{prefix}.{s}" in self._files
        }
        check_linear(self.qcfg, prefix, tensors)
        return tensors

    def dequantized_weight(self, prefix: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense (out, in) weight of quantized linear ``prefix`` (the reference dequantizer)."""
        return dequantize_linear(self.qcfg, self.linear_tensors(prefix), dtype)

    def _check_module(self, prefix: str) -> None:
        if self.qcfg.is_skipped(prefix):
            raise FormatError(
                f"{prefix}.qweight: module is listed in quantization_config.modules_to_not_convert"
            )
        if f"{prefix}.weight" in self._files:
            raise FormatError(f"{prefix}.weight: dense weight stored next to {prefix}.qweight")

    def validate(self) -> None:
        """Check the index against the shard files and every quantized linear's tensor names,
        shapes and dtypes against its specs. Reads headers only, so it is cheap at any size."""
        by_file: dict[str, set[str]] = {}
        for name, file in self._files.items():
            by_file.setdefault(file, set()).add(name)
        for file, names in sorted(by_file.items()):
            stored = set(self._handle(file).keys())
            for name in sorted(names - stored):
                raise FormatError(f"{name}: listed under {file} in {INDEX_FILE} but absent from it")
            for name in sorted(stored - names):
                raise FormatError(f"{name}: stored in {file} but not listed in {INDEX_FILE}")
        prefixes = set(self.quantized_prefixes())
        for name in self.tensor_names():
            prefix, _, suffix = name.rpartition(".")
            if suffix in QUANT_SUFFIXES and prefix not in prefixes:
                raise FormatError(f"{prefix}.qweight: missing (found {name})")
        for prefix in sorted(prefixes):
            self._check_module(prefix)
            self.linear_tensors(prefix, meta=True)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Dense state dict: unquantized tensors as stored (floating ones cast to ``dtype`` if
        given) plus ``prefix.weight`` = dequantized weight (``dtype``, else float32)."""
        prefixes = self.quantized_prefixes()
        quantized = {f"{p}.{s}" for p in prefixes for s in QUANT_SUFFIXES}
        out = {}
        for name in self.tensor_names():
            if name not in quantized:
                t = self.get(name)
                out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        for prefix in prefixes:
            self._check_module(prefix)
            out[f"{prefix}.weight"] = self.dequantized_weight(prefix, dtype or torch.float32)
        return out


def load_reference_model(
    path: Path | str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A transformers causal LM with the checkpoint's dequantized weights: the ground truth
    every serving path is tested against.

    Built from ``config.json`` without ``quantization_config``; every model tensor must come
    from the checkpoint with its exact shape, except a tied output embedding
    (``tie_word_embeddings``), which is re-tied. Checkpoint names are mapped to the model's
    as ``from_pretrained`` maps them (hf_names.from_checkpoint: e.g. Mixtral's per-expert
    ``experts.{e}.w1/w3`` merged into the fused ``experts.gate_up_proj``).
    """
    from transformers import AutoConfig  # heavy import, only needed here

    from .hf_names import auto_model_class, from_checkpoint

    ckpt = Checkpoint(path)
    config_dict = {k: v for k, v in ckpt.hf_config.items() if k != "quantization_config"}
    if "model_type" not in config_dict:
        raise FormatError(f"{ckpt.path / CONFIG_FILE}: no model_type")
    config = AutoConfig.for_model(**config_dict)
    model = auto_model_class(config).from_config(config, dtype=dtype)
    stored = ckpt.state_dict(dtype)
    state = {n: src.build(n, stored.pop) for n, src in from_checkpoint(model, list(stored)).items()}
    expected = model.state_dict()
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        tied = {f"{n}.weight" for n, m in model.named_modules() if m is head}
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise FormatError(f"{missing[0]}: missing from {ckpt.path} ({len(missing)} missing)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise FormatError(f"{unexpected[0]}: not a tensor of {type(model).__name__}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise FormatError(
                f"{name}: shape {tuple(t.shape)} in the checkpoint, "
                f"{tuple(expected[name].shape)} in the model"
            )
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    return model.to(device).eval()
