"""`leanquant eval --ref`: KL(P_ref ‖ P_model) per token and top-1 agreement on the same windows,
checked against torch's own ``kl_div`` on logits computed here in float64."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import user_error
from transformers import AutoModelForCausalLM

from leanquant.cli import main
from quantizer.data import consecutive_windows, text_tokens
from quantizer.evaluate import EvalJob, compare, evaluate


@pytest.fixture(scope="module")
def two_models(tiny_model, tmp_path_factory):
    """The tiny Llama, and a copy whose weights are perturbed (same tokenizer and vocabulary)."""
    a = tiny_model("llama")
    b = tmp_path_factory.mktemp("llama-perturbed")
    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
    model.save_pretrained(b)
    for f in a.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, b / f.name)
    return a, b


def test_a_model_against_itself_is_at_zero_distance(two_models, calib_text):
    a, _ = two_models
    r = evaluate(EvalJob(a, data=str(calib_text), seqlen=32, max_windows=3, ref=str(a)))
    assert r["kl_to_ref"] == pytest.approx(0.0, abs=1e-7)
    assert r["top1_agreement"] == 1.0
    assert r["perplexity"] == pytest.approx(r["ref_perplexity"], rel=1e-6)


def test_kl_and_agreement_match_an_independent_computation(two_models, calib_text):
    a, b = two_models
    r = evaluate(EvalJob(b, data=str(calib_text), seqlen=32, max_windows=3, ref=str(a)))
    tokens, bos = text_tokens(b, str(calib_text), "eval", bos=True, vocab_size=10**9)
    windows = consecutive_windows(tokens, 32, 3, bos)
    with torch.no_grad():
        logits = {
            k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)(input_ids=windows)
            .logits[:, :-1]
            .double()
            for k, p in (("model", b), ("ref", a))
        }
    logp = torch.log_softmax(logits["model"], -1).reshape(-1, logits["model"].shape[-1])
    logr = torch.log_softmax(logits["ref"], -1).reshape(-1, logits["ref"].shape[-1])
    n = logp.shape[0]
    kl = torch.nn.functional.kl_div(logp, logr, log_target=True, reduction="sum").item() / n
    agree = (logp.argmax(1) == logr.argmax(1)).double().mean().item()
    nll = -logp.gather(1, windows[:, 1:].reshape(-1, 1)).sum().item() / n
    assert r["kl_to_ref"] > 1e-4  # the perturbation is visible
    assert r["kl_to_ref"] == pytest.approx(kl, rel=1e-3)
    assert r["top1_agreement"] == pytest.approx(agree, abs=1.5 / n)  # a near-tie may flip
    assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert r["tokens"] == windows.numel() and r["ref"] == str(a)


def test_compare_refuses_different_vocabularies():
    class Fixed(torch.nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.vocab = vocab

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})

    with pytest.raises(ValueError, match="same vocabulary"):
        compare(Fixed(10), Fixed(12), torch.zeros(1, 4, dtype=torch.long))


def test_cli_reports_kl_and_refuses_a_foreign_reference(two_models, calib_text, tmp_path, capsys):
    a, b = two_models
    args = ["eval", str(b), "--data", str(calib_text), "--seqlen", "32", "--max-windows", "2"]
    assert main([*args, "--ref", str(a), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"kl_to_ref", "top1_agreement", "ref_perplexity"} <= set(r)
    assert main([*args, "--ref", str(a)]) == 0
    assert "KL" in capsys.readouterr().out
    other = tmp_path / "other"
    shutil.copytree(a, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] += 64
    (other / "config.json").write_text(json.dumps(cfg))
    err = user_error(capsys, [*args, "--ref", str(other)])
    assert "vocab_size" in err and "same vocabulary" in err
