"""The LeanQuant checkpoint folder: writing it (streamed, sharded, atomic) and reading it back.

A checkpoint is a Hugging Face model folder: ``config.json`` (the source model's config plus
``quantization_config`` = :meth:`LeanQuantConfig.to_dict`), ``model.safetensors`` or
``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``, and the
source's tokenizer / generation files. Quantized linears are stored as described in
:mod:`leanquant_serve.format.tensors` (W is (out, in) = (rows, columns)); every other tensor
keeps its name, shape and dtype.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
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


PROGRESS_FILE = "progress.json"  # resumable partial runs: the last durable step
LOCK_FILE = ".lock"  # flock'ed by the process writing a resumable partial folder
STATE_PREFIX = "state-"  # caller files saved with a step (e.g. activations)
_PROGRESS_VERSION = 1


class PartialRunError(FormatError):
    """A resumable partial folder exists (or is in use, or cannot be resumed)."""


class PartialRunLocked(PartialRunError):
    """The partial folder is being written by another running process."""


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Two names for one call, so that tests can intercept the directory syncs (the commit points)
# without the file syncs.
_fsync_dir = _fsync_file = _fsync


def _save_durably(tensors: Mapping[str, Tensor], path: Path) -> None:
    save_file(dict(tensors), path, metadata={"format": "pt"})
    _fsync_file(path)


class CheckpointWriter:
    """Streams tensors into a checkpoint folder that appears only when :meth:`finalize` succeeds.

    Tensors are buffered on the CPU and written to safetensors shards in the hidden sibling
    folder ``.<name>.partial``. A shard is flushed before the buffer would exceed
    ``max_shard_bytes`` (a single larger tensor gets a shard of its own), so shard contents
    depend only on the sequence of tensors added. An existing ``out_dir`` is refused unless
    ``overwrite=True``; it is then replaced only at the end of :meth:`finalize`. As a context
    manager, leaving the block without a successful :meth:`finalize` (an exception, or no
    call) deletes the partial folder.

    ``resumable=True``: :meth:`save_state` durably records a step (flushed shards, the
    still-buffered tensors in ``pending-*`` files, the caller's ``state-*`` files and JSON
    state; ``progress.json`` is replaced atomically, last). A failure or a kill after the
    first step keeps the partial folder; a later writer opened with ``on_partial="resume"``
    drops whatever the last ``progress.json`` does not list, reloads the buffer and exposes
    the caller's state as :attr:`progress`, so the finished folder is byte-identical to an
    uninterrupted run. An existing partial folder is refused (``on_partial="refuse"``),
    resumed, or discarded (``"fresh"``); one locked by a running process is always refused.
    ``check_state(state)`` may raise to refuse a resume before the folder is changed.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        max_shard_bytes: int = 2 * 1024**3,
        overwrite: bool = False,
        resumable: bool = False,
        on_partial: str = "refuse",
        check_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes: {max_shard_bytes} is not positive")
        if on_partial not in ("refuse", "resume", "fresh"):
            raise ValueError(f"on_partial: {on_partial!r} is not refuse, resume or fresh")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.resumable = resumable
        self._check_state = check_state
        if self.out_dir.exists() and not (overwrite and self.out_dir.is_dir()):
            raise FormatError(f"{self.out_dir}: already exists (pass overwrite=True to replace it)")
        self.partial = self.out_dir.parent / f".{self.out_dir.name}.partial"
        self._buffer: dict[str, Tensor] = {}
        self._buffered_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each flushed shard
        self._names: set[str] = set()
        self._total_bytes = 0
        self._pending: dict[str, list[str]] = {}  # pending file -> its still-buffered names
        self._state_files: list[str] = []
        self._seq = 0
        self._lock_fd: int | None = None
        self._kept = False  # a progress.json exists: failures keep the partial folder
        self.progress: dict[str, Any] | None = None  # the caller's state of a resumed run
        self.finished = False  # resume found a finished folder and moved it into place
        self._open = True
        if not resumable:
            if self.partial.exists():
                log.warning("removing stale partial checkpoint %s", self.partial)
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
            return
        if not self.partial.exists():
            self.partial.mkdir(parents=True)
            self._lock()
            return
        self._lock()
        try:
            if on_partial == "refuse":
                raise PartialRunError(
                    f"{self.out_dir}: a partial run exists at {self.partial} "
                    f"({self.describe_partial(self.partial)})"
                )
            if on_partial == "fresh":
                log.warning("discarding the partial run %s", self.partial)
                self._clear(keep=set())
            else:
                self._load()
        except BaseException:
            self._unlock()
            raise

    @staticmethod
    def describe_partial(partial: Path) -> str:
        """The ``note`` of a partial folder's last step, or why it has none."""
        try:
            return str(json.loads((partial / PROGRESS_FILE).read_text()).get("note", "?"))
        except FileNotFoundError:
            if (partial / CONFIG_FILE).exists():
                return "finished, not yet moved into place"
            return "no step finished"
        except (OSError, ValueError) as e:
            return f"unreadable {PROGRESS_FILE}: {e}"

    # -- resumable partial folders ------------------------------------------------------

    def _lock(self) -> None:
        fd = os.open(self.partial / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise PartialRunLocked(
                    f"{self.partial}: in use by another running process (locked)"
                ) from None
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clear(self, keep: set[str]) -> None:
        """Delete everything in the partial folder but ``keep`` and the lock file."""
        for f in sorted(self.partial.iterdir()):
            if f.name in keep or f.name == LOCK_FILE:
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()

    @staticmethod
    def _shard_file(i: int) -> str:
        return f"shard-{i:05d}.safetensors"

    def _load(self) -> None:
        progress = self.partial / PROGRESS_FILE
        if not progress.exists():
            if (self.partial / CONFIG_FILE).exists():  # killed between commit and move
                self._clear(keep=set(os.listdir(self.partial)) - set(self._strays()))
                self._unlock()
                (self.partial / LOCK_FILE).unlink(missing_ok=True)
                self._move_into_place()
                self._open, self.finished = False, True
                log.info("%s: the resumed run had already finished; moved into place", self.out_dir)
                return
            log.warning("%s: no step of the partial run had finished; starting over", self.partial)
            self._clear(keep=set())
            return
        try:
            data = json.loads(progress.read_text())
            w = data["writer"]
            if data.get("version") != _PROGRESS_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {_PROGRESS_VERSION}")
            shards = [list(names) for names in w["shards"]]
            pending = {str(f): list(names) for f, names in w["pending"].items()}
            buffer_names, state_files = list(w["buffer"]), list(data["files"])
            total, seq, state = int(w["total_bytes"]), int(w["seq"]), data["state"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PartialRunError(f"{progress}: cannot resume from it ({e})") from None
        if self._check_state is not None:  # before anything in the folder changes
            self._check_state(state)
        listed = [self._shard_file(i) for i in range(1, len(shards) + 1)]
        listed += [*pending, *state_files]
        self._clear(keep={PROGRESS_FILE, *listed})  # written after the last step: redone
        for f in listed:
            if not (self.partial / f).is_file():
                raise PartialRunError(f"{self.partial / f}: listed in {PROGRESS_FILE} but missing")
        buffer: dict[str, Tensor] = {}
        current = self.partial
        try:
            for i, names in enumerate(shards, 1):
                current = self.partial / self._shard_file(i)
                with safe_open(current, framework="pt") as h:
                    if sorted(h.keys()) != sorted(names):
                        raise PartialRunError(f"{current}: tensors differ from {PROGRESS_FILE}")
            for f, names in pending.items():
                current = self.partial / f
                with safe_open(current, framework="pt") as h:
                    for n in names:
                        buffer[n] = h.get_tensor(n)
        except SafetensorError as e:
            raise PartialRunError(f"{current}: unreadable ({e}); cannot resume") from None
        missing = [n for n in buffer_names if n not in buffer]
        if missing:
            raise PartialRunError(
                f"{missing[0]}: buffered but in no pending file of {self.partial}"
            )
        self._shards, self._pending, self._state_files = shards, pending, state_files
        self._buffer = {n: buffer[n] for n in buffer_names}
        self._buffered_bytes = sum(t.nbytes for t in self._buffer.values())
        self._names = {n for names in shards for n in names} | set(self._buffer)
        self._total_bytes, self._seq = total, seq
        self.progress, self._kept = state, True

    def _strays(self) -> list[str]:
        """Files of a resumable partial folder that are no part of the finished checkpoint."""
        return [
            f
            for f in os.listdir(self.partial)
            if f.startswith(("shard-", "pending-", STATE_PREFIX, PROGRESS_FILE)) or f == LOCK_FILE
        ]

    def _listed(self, name: str) -> str:
        if name not in self._state_files:
            raise PartialRunError(f"{name}: not a state file of the resumed run")
        return name

    @contextlib.contextmanager
    def _open_state_file(self, name: str):
        """safetensors handle of a ``state-*`` file, closed on exit (its pages then leave this
        process's resident memory); a damaged file is a PartialRunError."""
        try:
            with safe_open(self.partial / name, framework="pt") as h:
                yield h
        except SafetensorError as e:
            raise PartialRunError(f"{self.partial / name}: unreadable ({e})") from None

    def read_state_file(self, name: str) -> dict[str, Tensor]:
        """The tensors of a ``state-*`` file in the partial folder."""
        with self._open_state_file(name) as h:
            return {k: h.get_tensor(k) for k in h.keys()}

    def load_state_file(self, name: str) -> dict[str, Tensor]:
        """The tensors of a ``state-*`` file listed in the resumed run's last step."""
        return self.read_state_file(self._listed(name))

    def state_file_shapes(self, name: str) -> dict[str, list[int]]:
        """The tensor shapes of a listed ``state-*`` file, from its header only."""
        with self._open_state_file(self._listed(name)) as h:
            return {k: h.get_slice(k).get_shape() for k in h.keys()}

    def _check_state_name(self, name: str) -> None:
        if not name.startswith(STATE_PREFIX) or "/" in name or name in self._state_files:
            raise ValueError(f"{name}: state files are new names starting with {STATE_PREFIX}")

    def write_state_file(self, name: str, tensors: Mapping[str, Tensor]) -> None:
        """Durably write a state file now, for a later :meth:`save_state` (``written``)."""
        self._check_open()
        self._check_state_name(name)
        _save_durably(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, self.partial / name
        )

    def save_state(
        self,
        state: Mapping[str, Any],
        files: Mapping[str, Mapping[str, Tensor]] = {},
        note: str = "",
        written: Sequence[str] = (),
    ) -> None:
        """Durably record a step: the tensors added so far, ``files`` (name -> tensors; names
        start with ``state-`` and must differ from the previous step's), the state files
        ``written`` earlier with :meth:`write_state_file`, and the JSON ``state`` that
        :attr:`progress` returns after a resume. ``progress.json`` is replaced last; then
        every state file this step does not list is deleted. Files are written one at a time
        (host memory: one file's tensors)."""
        self._check_open()
        if not self.resumable:
            raise RuntimeError("save_state needs resumable=True")
        for name in [*files, *written]:
            self._check_state_name(name)
        for name in written:
            if not (self.partial / name).is_file():
                raise ValueError(f"{name}: not written into {self.partial}")
        for name, tensors in files.items():
            self.write_state_file(name, tensors)
        persisted = {n for names in self._pending.values() for n in names}
        new = [n for n in self._buffer if n not in persisted]
        if new:
            self._seq += 1
            f = f"pending-{self._seq:05d}.safetensors"
            _save_durably({n: self._buffer[n] for n in new}, self.partial / f)
            self._pending[f] = new
        self._pending = {
            f: [n for n in names if n in self._buffer]
            for f, names in self._pending.items()
            if any(n in self._buffer for n in names)
        }
        self._state_files = [*files, *written]
        data = {
            "version": _PROGRESS_VERSION,
            "note": note,
            "state": state,
            "files": self._state_files,
            "writer": {
                "shards": self._shards,
                "pending": self._pending,
                "buffer": list(self._buffer),
                "total_bytes": self._total_bytes,
                "seq": self._seq,
            },
        }
        tmp = self.partial / (PROGRESS_FILE + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.partial / PROGRESS_FILE)
        _fsync_dir(self.partial)
        self._kept = True
        for f in os.listdir(self.partial):  # superseded pending and state files
            if (f.startswith("pending-") and f not in self._pending) or (
                f.startswith(STATE_PREFIX) and f not in self._state_files
            ):
                (self.partial / f).unlink()

    def _fail(self) -> None:
        """After an error: keep a resumable partial folder that has a step, else discard it."""
        if self.resumable and self._kept:
            self._buffer, self._buffered_bytes = {}, 0
            self._open = False
            self._unlock()
            log.warning("partial run kept at %s", self.partial)
        else:
            self.abort()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._open:
            if exc_type is None:
                log.warning("%s: writer closed without finalize(); discarding", self.out_dir)
                self.abort()
            else:
                self._fail()
        self._unlock()

    @property
    def kept(self) -> bool:
        """Whether a failure keeps (kept) the partial folder for a resume."""
        return self.resumable and self._kept and self.partial.exists()

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

    def _flush(self) -> None:
        if not self._buffer:
            return
        shard = self.partial / self._shard_file(len(self._shards) + 1)
        if self.resumable:
            _save_durably(self._buffer, shard)
        else:
            save_file(self._buffer, shard, metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffered_bytes = {}, 0

    def finalize(
        self, hf_config: Mapping[str, Any], qcfg: LeanQuantConfig, copy_from: Path | None = None
    ) -> Path:
        """Write shards, index and ``config.json``, copy auxiliary files from ``copy_from``,
        and move the folder to ``out_dir`` (returned). On failure the partial folder is deleted
        (resumable: kept once a step was saved; removing progress.json is the commit point)."""
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
                if self.resumable:  # the shards stay listed until the commit below
                    (self.partial / final).unlink(missing_ok=True)
                    try:
                        os.link(self.partial / self._shard_file(i), self.partial / final)
                    except OSError:  # no hard links on this file system
                        shutil.copyfile(self.partial / self._shard_file(i), self.partial / final)
                else:
                    (self.partial / self._shard_file(i)).rename(self.partial / final)
                weight_map.update(dict.fromkeys(names, final))
            if n > 1:
                index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
                _write_json(self.partial / INDEX_FILE, index)
            try:
                config = json.dumps({**hf_config, "quantization_config": qcfg.to_dict()})
            except (TypeError, ValueError) as e:
                raise FormatError(f"hf_config: not JSON-serialisable ({e})") from None
            _write_json(self.partial / CONFIG_FILE, json.loads(config))
            if copy_from is not None:
                if not Path(copy_from).is_dir():
                    raise FormatError(f"copy_from: {copy_from} is not a folder")
                for fname in AUXILIARY_FILES:
                    if (Path(copy_from) / fname).is_file():
                        shutil.copy2(Path(copy_from) / fname, self.partial / fname)
            if self.resumable:
                _fsync_dir(self.partial)
                # Commit: without progress.json, a folder with config.json is finished.
                (self.partial / PROGRESS_FILE).unlink(missing_ok=True)
                _fsync_dir(self.partial)
                for f in self._strays():
                    (self.partial / f).unlink()
            self._move_into_place()
        except BaseException:
            self._fail()
            raise
        self._unlock()
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
    (``tie_word_embeddings``), which is re-tied.
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy import, only needed here

    ckpt = Checkpoint(path)
    config_dict = {k: v for k, v in ckpt.hf_config.items() if k != "quantization_config"}
    if "model_type" not in config_dict:
        raise FormatError(f"{ckpt.path / CONFIG_FILE}: no model_type")
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = ckpt.state_dict(dtype)
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
