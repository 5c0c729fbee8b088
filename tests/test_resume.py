"""Resuming killed or failed quantization runs, and determinism.

A run keeps its hidden partial folder (``.<out>.partial``) once a decoder layer has finished;
``--resume`` continues after the last finished layer and must give the same files, byte for
byte, as an uninterrupted run with the same seed. Only ``quantize_report.json`` is left out
of the byte comparison: its timing and memory fields (and ``out``) differ between runs; the
rest of it is compared as data.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import _COMMON
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from leanquant.cli import main
from leanquant_serve.format import Checkpoint
from quantizer import journal, layer_step
from quantizer.errors import UserError
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import REPORT_FILE, QuantizeJob, quantize_model

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 6
# The CLI run the subprocess tests kill: GPTQ with activations carried between layers.
CLI_FLAGS = ["--nsamples", "8", "--seqlen", "48", "--group-size", "32", "--batch-size", "2"]
TIMING = ("seconds", "peak_rss_bytes", "peak_gpu_bytes", "out")


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny random bf16 llama with LAYERS decoder layers (so that a run has a middle)."""
    torch.manual_seed(0)
    config = LlamaConfig(**_COMMON, num_hidden_layers=LAYERS, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("deep")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def files_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file but quantize_report.json (whose timings differ)."""
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.iterdir())
        if f.name != REPORT_FILE
    }


def report_data(folder: Path) -> dict:
    """quantize_report.json without its timing and memory fields and ``out``."""
    r = json.loads((folder / REPORT_FILE).read_text())
    for k in TIMING:
        r.pop(k)
    for layer in r["layers"]:
        for sub in layer:
            sub.pop("seconds")
    return r


def assert_same_checkpoint(got: Path, want: Path) -> None:
    assert files_digest(got) == files_digest(want)
    assert report_data(got) == report_data(want)
    assert not (got.parent / f".{got.name}.partial").exists()
    Checkpoint(got).validate()


def progress(partial: Path) -> dict:
    return json.loads((partial / "progress.json").read_text())


def cli_args(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), str(out), "--calib", str(calib), *CLI_FLAGS, *extra]


@pytest.fixture(scope="module")
def cli_reference(deep_model, calib_text, tmp_path_factory) -> Path:
    """An uninterrupted CLI run (in this process, one thread)."""
    out = tmp_path_factory.mktemp("reference") / "ckpt"
    assert main(cli_args(deep_model, out, calib_text)) == 0
    return out


def start_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "leanquant.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(proc: subprocess.Popen, ready, timeout: float = 60.0) -> bool:
    """Poll ``ready()`` every few ms until true (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.003)
    proc.kill()
    raise AssertionError("timed out")


def layers_done(partial: Path) -> int:
    try:
        return progress(partial)["state"]["layers_done"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


# ----------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow  # end to end: real runs killed and resumed
def test_sigkill_mid_run_then_resume_is_byte_identical(
    deep_model, calib_text, cli_reference, tmp_path, capsys
):
    out = tmp_path / "ckpt"
    partial = tmp_path / ".ckpt.partial"
    proc = start_cli(cli_args(deep_model, out, calib_text))
    assert wait_for(proc, lambda: layers_done(partial) >= 2), proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = layers_done(partial)
    assert 2 <= done < LAYERS and not out.exists()

    # Neither a fresh run nor one with other settings may touch the partial run.
    before = files_digest(partial)
    assert main(cli_args(deep_model, out, calib_text)) == 2
    err = capsys.readouterr().err
    assert f"{done} of {LAYERS} layers done" in err and "--resume" in err and "--fresh" in err
    assert main(cli_args(deep_model, out, calib_text, "--resume", "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "seed: 0 -> 1" in err and "calib_windows_sha256" in err
    assert main(cli_args(deep_model, out, calib_text, "--resume", "--bits", "3")) == 2
    assert "bits: 4 -> 3" in capsys.readouterr().err
    assert files_digest(partial) == before

    assert main(cli_args(deep_model, out, calib_text, "--resume")) == 0
    assert_same_checkpoint(out, cli_reference)


@pytest.mark.slow  # end to end: real runs killed and resumed
def test_sigkill_at_a_random_moment(deep_model, calib_text, cli_reference, tmp_path):
    """Kill at a random moment from the partial folder's creation (before any layer) to the
    end of the run; finish with --resume in this process."""
    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    seed = time.time_ns() % 10**6  # a new moment each time; the seed is in failure messages
    delay = random.Random(seed).choice([0.0, random.Random(seed).uniform(0.0, 1.5)])
    proc = start_cli(cli_args(deep_model, out, calib_text))
    assert wait_for(proc, partial.exists), (seed, proc.communicate()[1])
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    code, done = proc.wait(), layers_done(partial)
    assert code in (0, -signal.SIGKILL), (seed, proc.communicate()[1])
    if not out.exists():  # (killed after moving it into place: nothing left to do)
        assert main(cli_args(deep_model, out, calib_text, "--resume")) == 0, seed
    assert files_digest(out) == files_digest(cli_reference), (seed, delay, done)
    assert_same_checkpoint(out, cli_reference)


# ----------------------------------------------------------------------------- SIGINT, SIGTERM


def importing_torch(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` has begun importing torch (its shared library is mapped): the command
    is then in its imports, which go on for seconds (torch's Python part, transformers)."""
    try:
        return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


def stopped(proc: subprocess.Popen, sig: int) -> tuple[int, list[str]]:
    """Send ``sig``; (exit code, stderr's lines, split at newlines and progress bars' \\r)."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode().splitlines()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
def test_ctrl_c_during_the_imports_is_one_line(deep_model, calib_text, tmp_path):
    """Ctrl-C while torch and transformers are imported (the first minute on a loaded
    machine): one line, no traceback, nothing written."""
    out = tmp_path / "ckpt"
    proc = start_cli(cli_args(deep_model, out, calib_text))
    assert wait_for(proc, lambda: importing_torch(proc)), proc.communicate()[1]
    code, lines = stopped(proc, signal.SIGINT)
    assert (code, lines) == (130, ["leanquant: interrupted; nothing was written"])
    assert not out.exists() and not (tmp_path / ".ckpt.partial").exists()


@pytest.mark.slow  # end to end: real runs stopped and resumed
@pytest.mark.parametrize(
    ("sig", "what"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated (SIGTERM)")]
)
def test_ctrl_c_or_sigterm_mid_run_is_one_line_then_resume(
    sig, what, deep_model, calib_text, cli_reference, tmp_path
):
    """After a layer has finished: exit code 128 + the signal, one line saying where the
    partial run was kept, with how many layers and how to resume (the progress bars and INFO
    lines before it aside), no traceback; the lock is released and --resume finishes it."""
    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    proc = start_cli(cli_args(deep_model, out, calib_text))
    assert wait_for(proc, lambda: layers_done(partial) >= 2), proc.communicate()[1]
    code, lines = stopped(proc, sig)
    done = layers_done(partial)
    assert 2 <= done < LAYERS and not out.exists()
    assert code == 128 + sig, lines
    assert lines[-1] == (
        f"leanquant: {what}; partial run kept at {partial} ({done} of {LAYERS} layers done): "
        "rerun with --resume to continue it, or with --fresh (or delete it) to start over"
    )
    said = [line for line in lines if "kept" in line or "interrupt" in line.lower()]
    assert said == lines[-1:] and not any("Traceback" in line for line in lines)
    assert main(cli_args(deep_model, out, calib_text, "--resume")) == 0
    assert_same_checkpoint(out, cli_reference)


def test_partial_without_a_finished_layer(deep_model, calib_text, cli_reference, tmp_path):
    """What a kill before the first step leaves: refused without --resume; --resume starts
    over."""
    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    partial.mkdir()
    (partial / ".lock").touch()
    (partial / "pending-00001.safetensors").write_bytes(b"half-written")
    with pytest.raises(UserError, match=r"no step finished.*--resume.*--fresh"):
        quantize_model(small_job(deep_model, out, calib_text))
    assert main(cli_args(deep_model, out, calib_text, "--resume")) == 0
    assert_same_checkpoint(out, cli_reference)


# ----------------------------------------------------------------------------- in process


def small_job(model: Path, out: Path, calib: Path, **kw) -> QuantizeJob:
    """GPTQ (plain grid: fast) with small shards, so that shards flush in mid-layer."""
    s = GPTQSettings(
        bits=4, group_size=32, fit="minmax", blocksize=32, actorder=False, static_groups=False
    )
    return QuantizeJob(
        model=model,
        out=out,
        settings=s,
        calib=str(calib),
        nsamples=4,
        seqlen=32,
        batch_size=2,
        max_shard_bytes=25_000,
        **kw,
    )


@pytest.fixture(scope="module")
def small_reference(deep_model, calib_text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "ckpt"
    quantize_model(small_job(deep_model, out, calib_text))
    assert len(list(out.glob("model-*.safetensors"))) > LAYERS  # several shards per layer
    return out


class Killed(BaseException):
    """A simulated SIGKILL: nothing after it runs (the writer keeps what is on disk)."""


@pytest.fixture(scope="module")
def two_layer_reference(tiny_model, calib_text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "ckpt"
    quantize_model(small_job(tiny_model("llama"), out, calib_text))
    return out


@pytest.mark.slow  # end to end: real runs killed and resumed
def test_killed_at_every_durable_write_resumes_identically(
    tiny_model, calib_text, two_layer_reference, tmp_path, monkeypatch
):
    """Stop the run before every file write and right after every directory sync (the
    moments between writing a file and recording it, and between recording a step and
    deleting what it superseded; the finalize commit), then resume."""
    calls = {"n": 0, "at": -1}

    def hook(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["at"]:
                raise Killed
            result = real(*args, **kwargs)
            if calls["n"] + 0.5 == calls["at"]:
                raise Killed
            return result

        return wrapped

    monkeypatch.setattr(journal, "_save_durably", hook(journal._save_durably))
    monkeypatch.setattr(journal, "_fsync_dir", hook(journal._fsync_dir))
    model = tiny_model("llama")  # 2 layers: about 2 x 15 runs
    quantize_model(small_job(model, tmp_path / "count", calib_text))
    events = calls["n"]
    assert events > 6
    for k, at in enumerate(x / 2 for x in range(2, 2 * events + 2)):
        out = tmp_path / f"run{k}"
        calls.update(n=0, at=at)
        with pytest.raises(Killed):
            quantize_model(small_job(model, out, calib_text))
        calls["at"] = -1
        partial = tmp_path / f".run{k}.partial"
        if (partial / "progress.json").exists():  # another job's resume leaves it untouched
            before = files_digest(partial)
            job = small_job(model, out, calib_text, resume=True)
            with pytest.raises(UserError, match="seed: 0 -> 1"):
                quantize_model(replace(job, settings=replace(job.settings, seed=1)))
            assert files_digest(partial) == before
        quantize_model(small_job(model, out, calib_text, resume=True))
        assert_same_checkpoint(out, two_layer_reference)


def test_same_seed_same_bytes(deep_model, calib_text, small_reference, tmp_path):
    out = tmp_path / "again"
    quantize_model(small_job(deep_model, out, calib_text))
    assert_same_checkpoint(out, small_reference)
    other = tmp_path / "seed1"
    job = small_job(deep_model, other, calib_text)
    quantize_model(replace(job, settings=replace(job.settings, seed=1)))
    assert files_digest(other) != files_digest(small_reference)


# ----------------------------------------------------------------------------- faults


def test_nan_mid_run_keeps_a_resumable_partial(
    deep_model, calib_text, small_reference, tmp_path, monkeypatch
):
    real = layer_step.quantize_weight
    target = "model.layers.3.mlp.up_proj"
    seen = []

    def nan_in_layer3(W, H, s, rows=None):
        r = real(W, H, s, rows)
        seen.append(None)
        if len(seen) == 3 * 7 + 6:  # the 6th sublayer of layer 3 (up_proj)
            r = dataclasses.replace(r, Q=torch.full_like(r.Q, float("nan")))
        return r

    monkeypatch.setattr(layer_step, "quantize_weight", nan_in_layer3)
    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    with pytest.raises(UserError) as e:
        quantize_model(small_job(deep_model, out, calib_text))
    msg = str(e.value)
    assert target in msg and "NaN" in msg and str(partial) in msg and "--resume" in msg
    assert layers_done(partial) == 3 and not out.exists()
    monkeypatch.setattr(layer_step, "quantize_weight", real)

    def nan_hessian(layer, first, inputs, kwargs, device):
        h = real_hessian(layer, first, inputs, kwargs, device)
        if layers_done(partial) == 3:
            h.H *= float("inf")
        return h

    real_hessian = layer_step.hessian
    monkeypatch.setattr(layer_step, "hessian", nan_hessian)
    with pytest.raises(UserError, match=r"model\.layers\.3\.self_attn\.q_proj: the Hessian.*NaN"):
        quantize_model(small_job(deep_model, out, calib_text, resume=True))
    assert layers_done(partial) == 3
    monkeypatch.setattr(layer_step, "hessian", real_hessian)

    quantize_model(small_job(deep_model, out, calib_text, resume=True))
    assert_same_checkpoint(out, small_reference)


def test_full_disk_keeps_a_resumable_partial(
    deep_model, calib_text, cli_reference, tmp_path, monkeypatch, capsys
):
    writes = []

    def save_file_until_full(tensors, path, metadata=None):
        writes.append(Path(path).name)
        # state-act-<layer>-<batch>: the first activation file of the third step
        if len({w.split("-")[2] for w in writes if w.startswith("state-act-")}) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, metadata=metadata)

    real = journal.save_file
    monkeypatch.setattr(journal, "save_file", save_file_until_full)
    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    assert main(cli_args(deep_model, out, calib_text)) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("leanquant: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on the device" in lines[0] and "2 of 6 layers done" in lines[0]
    assert "--resume" in lines[0] and layers_done(partial) == 2 and not out.exists()
    monkeypatch.setattr(journal, "save_file", real)
    assert main(cli_args(deep_model, out, calib_text, "--resume")) == 0
    assert_same_checkpoint(out, cli_reference)


@pytest.mark.parametrize("rtn", [False, True])
def test_unreadable_source_shard_then_resume(
    rtn, deep_model, calib_text, small_reference, tmp_path
):
    """Layers 2.. live in a second source shard that is corrupt: the run stops there with a
    clear message; once the shard is replaced, --resume finishes the same checkpoint."""
    src = tmp_path / "src"
    src.mkdir()
    for f in deep_model.iterdir():
        if f.name != "model.safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    weights = load_file(deep_model / "model.safetensors")
    late = {n for n in weights if n.startswith("model.layers.") and int(n.split(".")[2]) >= 2}
    save_file({n: t for n, t in weights.items() if n not in late}, src / "a.safetensors")
    save_file({n: weights[n] for n in late}, src / "b.safetensors")
    index = {"weight_map": {n: "b.safetensors" if n in late else "a.safetensors" for n in weights}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    good = (src / "b.safetensors").read_bytes()
    (src / "b.safetensors").write_bytes(b"\x00garbage" * 100)

    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    job = replace(small_job(src, out, calib_text), rtn=rtn)
    with pytest.raises(UserError, match=r"cannot read weight shard .*b\.safetensors.*--resume"):
        quantize_model(job)
    assert layers_done(partial) == 2 and not out.exists()
    (src / "b.safetensors").write_bytes(good)
    quantize_model(replace(job, resume=True))
    if rtn:
        reference = tmp_path / "rtn"
        quantize_model(replace(small_job(deep_model, reference, calib_text), rtn=True))
    else:
        reference = small_reference
    assert files_digest(out) == files_digest(reference)


def test_fresh_discards_and_a_running_partial_is_locked(
    deep_model, calib_text, small_reference, tmp_path, monkeypatch
):
    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    job = small_job(deep_model, out, calib_text)
    real = layer_step.store_sublayer
    calls = []

    def stop_in_layer2(run, prefix, *args):
        calls.append(prefix)
        if prefix.endswith(".2"):
            raise RuntimeError("boom")
        return real(run, prefix, *args)

    monkeypatch.setattr(layer_step, "store_sublayer", stop_in_layer2)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_model(job)
    monkeypatch.setattr(layer_step, "store_sublayer", real)
    assert layers_done(partial) == 2

    with pytest.raises(UserError, match="--resume and --fresh"):
        quantize_model(replace(job, resume=True, fresh=True))
    fd = os.open(partial / ".lock", os.O_RDWR)  # as if another process were running it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for kw in ({"resume": True}, {"fresh": True}):
            with pytest.raises(UserError, match="in use by another running process"):
                quantize_model(replace(job, **kw))
    finally:
        os.close(fd)
    assert layers_done(partial) == 2

    # A damaged partial run: --resume says what is wrong and how to start over.
    pending = sorted(partial.glob("pending-*.safetensors"))[0]
    pending.write_bytes(pending.read_bytes()[:100])
    with pytest.raises(UserError, match=rf"{pending.name}.*unreadable.*pass --fresh"):
        quantize_model(replace(job, resume=True))

    quantize_model(replace(job, fresh=True))
    assert_same_checkpoint(out, small_reference)


def test_overflowing_activations_stop_with_the_layer_named(deep_model, calib_text, tmp_path):
    """Real data, no patching: layer 3's MLP norm is huge, so the Hessian of its MLP input
    overflows; the 3 finished layers are kept for a resume."""
    src = tmp_path / "src"
    src.mkdir()
    for f in deep_model.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    weights["model.layers.3.post_attention_layernorm.weight"].fill_(1e30)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    with pytest.raises(UserError) as e:
        quantize_model(small_job(src, out, calib_text))
    msg = str(e.value)
    assert "model.layers.3.mlp.gate_proj: the Hessian" in msg and "NaN/Inf" in msg, msg
    assert "--resume" in msg and layers_done(partial) == 3 and not out.exists()


# ----------------------------------------------------------------------------- devices, activations


@pytest.mark.parametrize(
    ("device", "activations"),
    [("cpu,cpu", "device"), ("cpu,cpu,cpu", "cpu"), ("cpu", "disk")],
)
def test_device_lists_and_activation_places_give_the_same_bytes(
    device, activations, deep_model, calib_text, small_reference, tmp_path
):
    """Rows split over several workers, and activations kept in host RAM or spilled to disk,
    change no byte. (On this CPU-only machine the workers are threads on the same CPU: this
    checks the split, the threads and the merge, not transfers between GPUs.)"""
    out = tmp_path / "ckpt"
    job = small_job(deep_model, out, calib_text, device=device, activations=activations)
    quantize_model(job)
    assert_same_checkpoint(out, small_reference)


@pytest.mark.parametrize("grid", ["affine", "nonuniform"])
def test_split_rows_are_exact_for_learned_grids(grid, deep_model, calib_text, tmp_path):
    """Act-order, dynamic groups (g_idx) and k-means++'s random draws, split over 3 workers."""
    s = GPTQSettings(
        bits=4,
        group_size=32 if grid == "affine" else -1,
        fit=grid,
        actorder=True,
        blocksize=32,
        static_groups=False,
    )
    for device in ("cpu", "cpu,cpu,cpu"):
        job = small_job(deep_model, tmp_path / device, calib_text, device=device)
        quantize_model(replace(job, settings=s))
    assert files_digest(tmp_path / "cpu") == files_digest(tmp_path / "cpu,cpu,cpu")


def test_disk_activations_resume_in_another_place(
    deep_model, calib_text, small_reference, tmp_path, monkeypatch
):
    """Spilled activations are the resume state itself (no second copy); a run killed with
    them on disk resumes with them on the device, split over two workers, to the same bytes."""
    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    real = layer_step.store_sublayer

    def kill_in_layer3(run, prefix, *args):
        if prefix.endswith(".3"):
            raise Killed
        return real(run, prefix, *args)

    monkeypatch.setattr(layer_step, "store_sublayer", kill_in_layer3)
    with pytest.raises(Killed):
        quantize_model(small_job(deep_model, out, calib_text, activations="disk"))
    monkeypatch.setattr(layer_step, "store_sublayer", real)
    state = progress(partial)
    assert state["state"]["layers_done"] == 3
    listed = state["state"]["activations"]
    assert listed == [f"state-act-00003-{b:05d}.safetensors" for b in range(2)]  # 4 samples / 2
    # Only the listed inputs of layer 3 remain (layer 3's own outputs were being written).
    assert sorted(f.name for f in partial.glob("state-*")) == sorted(listed)
    with pytest.raises(UserError, match="act_dtype: 'float32' -> 'bfloat16'"):
        quantize_model(small_job(deep_model, out, calib_text, act_dtype="bfloat16", resume=True))
    quantize_model(small_job(deep_model, out, calib_text, device="cpu,cpu", resume=True))
    assert_same_checkpoint(out, small_reference)


def test_activation_dtype(deep_model, calib_text, small_reference, tmp_path):
    """bf16 activations take half the bytes and give a valid checkpoint (a resume with another
    activation dtype is refused: see test_disk_activations_resume_in_another_place)."""
    out = tmp_path / "ckpt"
    quantize_model(small_job(deep_model, out, calib_text, act_dtype="bfloat16"))
    Checkpoint(out).validate()
    half = json.loads((out / REPORT_FILE).read_text())["activation_bytes"]
    full = json.loads((small_reference / REPORT_FILE).read_text())["activation_bytes"]
    assert full == 4 * 32 * 64 * 4 and half == full // 2  # nsamples x seqlen x hidden x 4 B


def test_bad_device_lists_are_refused(deep_model, calib_text, tmp_path, capsys):
    for device, msg in [("cpu,cuda:0", "mixes device types"), ("gpu0", "--device 'gpu0'")]:
        args = cli_args(deep_model, tmp_path / "x", calib_text, "--device", device)
        assert main(args) == 2
        assert msg in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_row_plan_covers_every_row_once_and_balances():
    for counts, n in [([7, 1, 1], 2), ([5], 3), ([3, 3], 4), ([2], 1), ([1, 1], 3)]:
        plan = layer_step.row_plan(counts, n)
        assert len(plan) == n
        for m, rows in enumerate(counts):
            got = sorted((a, b) for per in plan for mm, a, b in per if mm == m)
            assert [a for a, _ in got] == [0] + [b for _, b in got[:-1]] and got[-1][1] == rows
        sizes = [sum(b - a for _, a, b in per) for per in plan]
        assert max(sizes) - min(sizes) <= 1


def test_a_device_list_really_splits_the_rows(deep_model, calib_text, tmp_path, monkeypatch):
    """The byte-equality tests above would also pass if the list were ignored: check that a
    two-worker run quantizes half-weights, from two threads."""
    import threading

    real, calls = layer_step.quantize_weight, []

    def spy(W, prep, s, rows=None):
        calls.append((threading.get_ident(), rows, W.shape[0]))
        return real(W, prep, s, rows)

    monkeypatch.setattr(layer_step, "quantize_weight", spy)
    quantize_model(small_job(deep_model, tmp_path / "ckpt", calib_text, device="cpu,cpu"))
    # Worker threads, not the caller's. (How many distinct ids they show is up to the thread
    # pool, which may reuse an idle thread for the second half and recycle ids between groups.)
    main = threading.get_ident()
    assert calls and all(t != main for t, _, _ in calls)
    # each weight (group members one at a time) in two halves, one per worker: the 64-row
    # q_proj, o_proj and down_proj as rows 0-32 and 32-64
    assert all(r is not None and 2 * n == r[1] and r[0] in (0, n) for _, r, n in calls)
    halves = [(r, n) for _, r, n in calls if r[1] == 64]
    assert halves.count(((0, 64), 32)) == halves.count(((32, 64), 32)) == 3 * LAYERS


def test_cuda_runs_use_torchs_deterministic_algorithms(monkeypatch):
    """On CUDA (where float scatter_add_, used by the nonuniform fit, is nondeterministic) a run
    switches torch's deterministic implementations on, warn-only, and restores the setting;
    CPU runs, already deterministic, leave it alone."""
    from quantizer.pipeline import deterministic_algorithms

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
