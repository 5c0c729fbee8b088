"""The quantizer's crash-resume journal: a checkpoint writer whose partial folder survives a
failure or a kill and can be continued.

:class:`JournaledWriter` is the contract's :class:`~leanquant_serve.format.CheckpointWriter`
(same shards, same finished folder) plus, in the partial folder: ``progress.json`` (the last
durable step, replaced atomically), ``pending-*`` files (tensors still in the writer's buffer
at that step), the caller's ``state-*`` files (e.g. calibration activations) and a ``.lock``
file flock'ed by the writing process. None of these is part of the checkpoint contract, so
they live here, beside the quantizer that needs them, not in ``leanquant_serve.format``
(which every engine imports).
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
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from leanquant_serve.format.checkpoint import CONFIG_FILE, CheckpointWriter

from .errors import UserError
from .job import QuantizeJob, Run, Summary, summary_from_dict, summary_to_dict

if TYPE_CHECKING:
    from .activations import Activations

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"  # resumable partial runs: the last durable step
LOCK_FILE = ".lock"  # flock'ed by the process writing a resumable partial folder
STATE_PREFIX = "state-"  # caller files saved with a step (e.g. activations)
_PROGRESS_VERSION = 1


class PartialRunError(UserError):
    """A resumable partial folder exists (or is in use, or cannot be resumed): a state of the
    user's output folder, not a checkpoint that breaks the contract."""


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


class JournaledWriter(CheckpointWriter):
    """A :class:`CheckpointWriter` whose steps are durable and whose partial folder survives.

    :meth:`save_state` durably records a step (flushed shards, the still-buffered tensors in
    ``pending-*`` files, the caller's ``state-*`` files and JSON state; ``progress.json`` is
    replaced atomically, last). A failure or a kill after the first step keeps the partial
    folder; a later writer opened with ``on_partial="resume"`` drops whatever the last
    ``progress.json`` does not list, reloads the buffer and exposes the caller's state as
    :attr:`progress`, so the finished folder is byte-identical to an uninterrupted run. An
    existing partial folder is refused (``on_partial="refuse"``), resumed, or discarded
    (``"fresh"``); one locked by a running process is always refused. ``check_state(partial, state)``
    may raise to refuse a resume before the folder is changed.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        max_shard_bytes: int = 2 * 1024**3,
        overwrite: bool = False,
        on_partial: str = "refuse",
        check_state: Callable[[Path, dict[str, Any]], None] | None = None,
    ) -> None:
        if on_partial not in ("refuse", "resume", "fresh"):
            raise ValueError(f"on_partial: {on_partial!r} is not refuse, resume or fresh")
        self._on_partial = on_partial
        self._check_state = check_state
        self._pending: dict[str, list[str]] = {}  # pending file -> its still-buffered names
        self._state_files: list[str] = []
        self._seq = 0
        self._lock_fd: int | None = None
        self._kept = False  # a progress.json exists: failures keep the partial folder
        self.progress: dict[str, Any] | None = None  # the caller's state of a resumed run
        self.finished = False  # resume found a finished folder and moved it into place
        super().__init__(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite)

    def _open_partial(self) -> None:
        if not self.partial.exists():
            self.partial.mkdir(parents=True)
            self._lock()
            return
        self._lock()
        try:
            if self._on_partial == "refuse":
                raise PartialRunError(
                    f"{self.out_dir}: a partial run exists at {self.partial} "
                    f"({self.describe_partial(self.partial)})"
                )
            if self._on_partial == "fresh":
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
            self._check_state(self.partial, state)
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
        if self._kept:
            self._buffer, self._buffered_bytes = {}, 0
            self._open = False
            self._unlock()
            # (debug: the caller says it, with how to resume: quantizer.pipeline._user_errors)
            log.debug("partial run kept at %s", self.partial)
        else:
            self.abort()

    @property
    def kept(self) -> bool:
        """Whether a failure keeps (kept) the partial folder for a resume."""
        return self._kept and self.partial.exists()

    # -- the writer's hooks ---------------------------------------------------------------

    def _write_shard(self, tensors: Mapping[str, Tensor], path: Path) -> None:
        _save_durably(tensors, path)

    def _place_shard(self, shard: Path, final: Path) -> None:
        """The shards stay listed (for a resume) until the commit: link, not rename."""
        final.unlink(missing_ok=True)
        try:
            os.link(shard, final)
        except OSError:  # no hard links on this file system
            shutil.copyfile(shard, final)

    def _commit(self) -> None:
        _fsync_dir(self.partial)
        # Commit: without progress.json, a folder with config.json is finished.
        (self.partial / PROGRESS_FILE).unlink(missing_ok=True)
        _fsync_dir(self.partial)
        for f in self._strays():
            (self.partial / f).unlink()

    def _release(self) -> None:
        self._unlock()


# The quantization run's journal entries: after each decoder layer, the step the writer saves
# (layers done, the summary so far, the activations entering the next layer, the job's
# fingerprint), and where a resumed run continues.


class ResumeMismatch(UserError):
    """The partial run belongs to another job (its message says what to do)."""


def check_fingerprint(partial: Path, old: dict, new: dict) -> None:
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
        raise ResumeMismatch(
            f"cannot resume the partial run {partial}: it was started with a different model, "
            f"data or settings ({'; '.join(diffs)}); rerun with its settings, or pass --fresh "
            "to discard it"
        )


def resume_point(run: Run) -> tuple[int, float, Summary]:
    """(first layer to do, seconds spent before, summary so far) of a fresh or resumed run."""
    job, writer = run.job, run.writer
    summary = Summary(str(job.out), 0.0, 0, 0, 0.0, 0)
    start, seconds_before = 0, 0.0
    if writer.progress is not None:
        state = writer.progress  # its fingerprint was checked by the writer
        start, seconds_before = state["layers_done"], state["seconds"]
        summary = summary_from_state(job, state["summary"])
        log.info("resuming %s after layer %d of %d", writer.partial, start - 1, len(run.layers))
    summary.bos_token_id = run.bos_token_id
    return start, seconds_before, summary


def journal_step(run: Run, i: int, summary: Summary, acts: Activations | None) -> None:
    """Durable step: a kill from here on resumes at layer i + 1."""
    n = len(run.layers)
    files, written = {}, []
    if acts is not None and i + 1 < n:
        files, written = acts.state()
    state = {
        "job": run.fingerprint,
        "layers_done": i + 1,
        "seconds": summary.seconds,
        "summary": summary_state(summary),
        "activations": [*files, *written] or None,
    }
    run.writer.save_state(state, files, note=f"{i + 1} of {n} layers done", written=written)


def summary_state(summary: Summary) -> dict:
    return {k: v for k, v in summary_to_dict(summary).items() if k != "out"}


def summary_from_state(job: QuantizeJob, d: dict) -> Summary:
    return summary_from_dict({**d, "out": str(job.out)})
