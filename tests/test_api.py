"""The Python API (leanquant/api.py) and the command it backs: same defaults, same errors, the
same bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import leanquant
from leanquant.cli import main
from quantizer.errors import UserError

FLAGS = ["--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32"]


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file; quantize_report.json without its timing and memory fields."""
    out = {}
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.name == "quantize_report.json":
            r = json.loads(data)
            for k in ("seconds", "peak_rss_bytes", "peak_gpu_bytes", "out"):
                r.pop(k)
            for layer in r["layers"]:
                for s in layer:
                    s.pop("seconds")
            data = json.dumps(r, sort_keys=True).encode()
        out[f.name] = hashlib.sha256(data).hexdigest()
    return out


def test_api_and_cli_write_the_same_checkpoint(tiny_model, calib_text, tmp_path):
    model = tiny_model("qwen2")
    assert main(["quantize", str(model), str(tmp_path / "cli"), "--calib", str(calib_text), *FLAGS]) == 0
    leanquant.quantize(
        model, tmp_path / "api", leanquant.GPTQSettings(bits=4, group_size=32),
        calib=str(calib_text), nsamples=4, seqlen=32,
    )  # fmt: skip
    assert digests(tmp_path / "cli") == digests(tmp_path / "api")
    # and the exports of both
    assert main(["export", "compressed-tensors", str(tmp_path / "cli"), str(tmp_path / "cli-ct")]) == 0
    r = leanquant.export("compressed-tensors", tmp_path / "api", tmp_path / "api-ct")
    assert r.out == tmp_path / "api-ct"
    assert digests(tmp_path / "cli-ct") == digests(tmp_path / "api-ct")


def test_api_defaults_are_the_commands(tiny_model):
    """One default per setting: a job built by the API equals the one the command builds from
    no flags (quantize_job is what both call)."""
    from leanquant.cli import build_parser
    from quantizer.flags import given

    a = build_parser().parse_args(["quantize", "m", "o"])
    cli_job = leanquant.quantize_job(
        "m", "o", leanquant.GPTQSettings(**given(a, leanquant.GPTQSettings)),
        **given(a, leanquant.QuantizeJob),
    )  # fmt: skip
    assert cli_job == leanquant.quantize_job("m", "o")
    assert cli_job.settings.fit == "affine" and cli_job.settings.group_size == 128


def test_api_evaluate_is_evals_json(tiny_model, calib_text, capsys):
    model = tiny_model("llama")
    args = ["--data", str(calib_text), "--seqlen", "32", "--max-windows", "2"]
    assert main(["eval", str(model), *args, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    api = leanquant.evaluate(model, data=str(calib_text), seqlen=32, max_windows=2)
    assert api == cli


def test_api_errors_are_the_commands(tiny_model, calib_text, tmp_path, monkeypatch):
    import quantizer.pipeline

    def no_work(job, observer=None):
        raise AssertionError("quantize_model ran: the refusal came after work started")

    monkeypatch.setattr(quantizer.pipeline, "quantize_model", no_work)
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ValueError, match=r"already exists \(pass overwrite=True"):
        leanquant.quantize(tiny_model("llama"), out, calib=str(calib_text))  # before any work
    with pytest.raises(UserError, match="--resume and --fresh exclude each other"):
        leanquant.quantize(tiny_model("llama"), tmp_path / "o", resume=True, fresh=True)
    with pytest.raises(UserError, match="export target 'gguf': choose one of"):
        leanquant.export("gguf", tmp_path, tmp_path / "x")
    with pytest.raises(TypeError):  # a field that does not exist is not silently ignored
        leanquant.quantize(tiny_model("llama"), tmp_path / "o", nsample=4)


def test_package_resolves_its_api_and_submodules_on_first_use():
    """``import leanquant`` imports no torch (the CLI's Ctrl-C handling relies on it), and its
    API names and its submodules ``api``/``cli`` resolve as attributes on first use."""
    code = (
        "import sys, leanquant\n"
        "assert 'torch' not in sys.modules\n"
        "assert leanquant.api.quantize is leanquant.quantize\n"
        "assert callable(leanquant.cli.main)\n"
        "try:\n    leanquant.nothing\nexcept AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('leanquant.nothing resolved')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
