"""Windows begin with BOS exactly when the tokenizer adds one to a text (lm-eval's
add_bos_token), unless --no-bos; each is [BOS] + seqlen - 1 text tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES
from tokenizers import Tokenizer, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from leanquant.cli import main
from quantizer import job as job_module
from quantizer.data import (
    bos_token_id,
    consecutive_windows,
    load_text,
    random_windows,
    tokenize,
)
from quantizer.evaluate import EvalJob, evaluate
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import REPORT_FILE, QuantizeJob

SEQLEN = 32
FAST = ["--nsamples", "4", "--seqlen", str(SEQLEN), "--group-size", "32"]


def _with_bos_token(tokenizer: PreTrainedTokenizerFast, adds: bool) -> PreTrainedTokenizerFast:
    """The test tokenizer plus a "<s>" BOS token (a new id), which it puts before every text
    only if ``adds`` (a post-processor, as Llama's and Gemma's tokenizers have)."""
    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    if adds:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama whose saved tokenizer adds BOS (id = the last row of its vocab)."""
    tok = _with_bos_token(tokenizer, adds=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES["llama"](len(tok)), dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("llama-bos")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_bos_is_read_off_the_tokenizer(tokenizer, bos_model):
    assert bos_token_id(tokenizer) is None  # no BOS token at all
    assert bos_token_id(_with_bos_token(tokenizer, adds=False)) is None  # named, not added
    saved = AutoTokenizer.from_pretrained(bos_model)
    assert bos_token_id(saved) == len(tokenizer) == saved.convert_tokens_to_ids("<s>")


def test_windows_are_bos_then_text():
    tokens = torch.arange(1000, 1100)
    plain = random_windows(tokens, 5, 8, seed=3)
    with_bos = random_windows(tokens, 5, 8, seed=3, bos=7)
    assert plain.shape == with_bos.shape == (5, 8)
    assert (with_bos[:, 0] == 7).all() and (plain != 7).all()
    for window in [*plain, *with_bos[:, 1:]]:  # contiguous runs of the text
        assert torch.equal(window, torch.arange(int(window[0]), int(window[0]) + len(window)))
    # Without BOS the draw is the one it always was (same seed, same windows).
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, 100 - 8, (5,), generator=g)
    assert torch.equal(plain, torch.stack([tokens[s : s + 8] for s in starts.tolist()]))

    assert torch.equal(consecutive_windows(tokens, 10), tokens.view(10, 10))
    windows = consecutive_windows(tokens, 10, max_windows=4, bos=7)
    assert windows.shape == (4, 10) and (windows[:, 0] == 7).all()
    assert torch.equal(windows[:, 1:].reshape(-1), tokens[:36])  # every text token once


def _calib_windows(model: Path, calib: Path, **kw) -> tuple[torch.Tensor, int | None]:
    job = QuantizeJob(
        model=model,
        out=model / "unused",
        settings=GPTQSettings(
            bits=4, group_size=32, fit="minmax", actorder=False, static_groups=False
        ),
        calib=str(calib),
        nsamples=4,
        seqlen=SEQLEN,
        **kw,
    )
    return job_module.calibration_windows(job, AutoModelForCausalLM.from_pretrained(model).config)


def test_calibration_windows_begin_with_bos_when_the_tokenizer_adds_it(
    bos_model, tiny_model, calib_text
):
    bos = len(AutoTokenizer.from_pretrained(bos_model)) - 1
    windows, got = _calib_windows(bos_model, calib_text)
    assert got == bos and windows.shape == (4, SEQLEN)
    assert (windows[:, 0] == bos).all() and (windows[:, 1:] != bos).all()
    windows, got = _calib_windows(bos_model, calib_text, bos=False)
    assert got is None and windows.shape == (4, SEQLEN) and (windows != bos).all()
    # A tokenizer that adds no BOS: the windows are the text alone, as before.
    plain = tiny_model("llama")
    windows, got = _calib_windows(plain, calib_text)
    tokens = tokenize(AutoTokenizer.from_pretrained(plain), load_text(str(calib_text)))
    assert got is None and torch.equal(windows, random_windows(tokens, 4, SEQLEN, seed=0))


@pytest.mark.parametrize("flags,expect_bos", [([], True), (["--no-bos"], False)])
def test_quantize_report_records_bos(capsys, bos_model, calib_text, tmp_path, flags, expect_bos):
    out = tmp_path / "out"
    assert (
        main(["quantize", str(bos_model), str(out), "--calib", str(calib_text), *FAST, *flags]) == 0
    )
    report = json.loads((out / REPORT_FILE).read_text())
    bos = len(AutoTokenizer.from_pretrained(bos_model)) - 1
    assert report["bos_token_id"] == (bos if expect_bos else None)


def test_quantize_report_without_bos(tiny_model, calib_text, tmp_path):
    out = tmp_path / "out"
    assert (
        main(["quantize", str(tiny_model("llama")), str(out), "--calib", str(calib_text), *FAST])
        == 0
    )
    assert json.loads((out / REPORT_FILE).read_text())["bos_token_id"] is None


def _reference_perplexity(model: Path, windows: torch.Tensor) -> float:
    """exp(mean NLL of every token after the first of each window), computed here."""
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=windows).logits.float(), -1)[:, :-1]
    nll = -logp.gather(-1, windows[:, 1:, None]).mean()
    return math.exp(float(nll))


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_eval_windows_begin_with_bos(capsys, bos_model, calib_text, bos):
    argv = ["eval", str(bos_model), "--data", str(calib_text), "--seqlen", str(SEQLEN)]
    argv += ["--max-windows", "3", "--json"] + ([] if bos else ["--no-bos"])
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokens = tokenize(AutoTokenizer.from_pretrained(bos_model), load_text(str(calib_text), "eval"))
    bos_id = len(AutoTokenizer.from_pretrained(bos_model)) - 1
    text = SEQLEN - 1 if bos else SEQLEN
    windows = tokens[: 3 * text].view(3, text)
    if bos:
        windows = torch.cat([torch.full((3, 1), bos_id), windows], 1)
    assert r["bos_token_id"] == (bos_id if bos else None)
    assert r["windows"] == 3 and r["tokens"] == 3 * SEQLEN
    assert r["perplexity"] == pytest.approx(_reference_perplexity(bos_model, windows), rel=1e-4)
    # The Python API has the same default as the CLI.
    api = evaluate(EvalJob(bos_model, str(calib_text), SEQLEN, max_windows=3, bos=bos))
    assert api == r


@pytest.mark.slow
def test_smollm2_tokenizer_adds_no_bos():
    """So the bundled demo's windows, and its numbers, are what they were before BOS."""
    from quantizer.assets import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    assert tok.bos_token_id is not None and bos_token_id(tok) is None
