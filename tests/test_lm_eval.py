"""`leanquant eval --tasks`: lm-eval-harness on the (dequantized) model, with a local
multiple-choice task written here; the accuracy is recomputed here from the model's own
log-likelihoods, the way lm-eval scores multiple choice (sum of the continuation's token
log-probabilities, argmax over the choices)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import user_error
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # lm-eval indexes its ~10k task configs on every TaskManager

from leanquant.cli import main  # noqa: E402
from quantizer.evaluate import EvalJob, evaluate  # noqa: E402

QUESTIONS = [
    ("the model", ["weight", "grid", "and"]),
    ("of the", ["layer", "the of", "model weight"]),
    ("quantize the", ["grid", "weights", "of"]),
    ("and the of", ["model", "and", "the"]),
    ("weight grid", ["the", "of and", "model"]),
    ("a small", ["grid", "the model", "of"]),
]


@pytest.fixture(scope="module")
def eos_model(tiny_model, tmp_path_factory):
    """The tiny Llama whose tokenizer names an EOS token, as every real tokenizer does (lm-eval
    starts each scored sequence with BOS, else EOS)."""
    import shutil

    path = tmp_path_factory.mktemp("llama-eos")
    for f in tiny_model("llama").iterdir():
        shutil.copy(f, path / f.name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.eos_token = tok.convert_ids_to_tokens(0)
    tok.save_pretrained(path)
    return path


def loglikelihoods(model, tok, context: str, choices: list[str]) -> list[float]:
    """lm-eval's loglikelihood of ' choice' after context: whole = enc(context + ' ' + choice),
    continuation = whole[len(enc(context)):], scored by the model given everything before it."""
    out = []
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    for c in choices:
        whole = tok(context + " " + c, add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx):]
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        n = len(whole)
        out.append(sum(float(logp[i - 1, whole[i]]) for i in range(n - len(cont), n)))
    return out


def write_task(folder, docs) -> None:
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "toy.yaml").write_text(
        "task: leanquant_toy_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )


def test_local_task_accuracy_matches_the_models_own_answers(eos_model, calib_text, tmp_path):
    path = eos_model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    docs = []
    for k, (q, choices) in enumerate(QUESTIONS):
        ll = loglikelihoods(model, tok, q, choices)
        best = max(range(3), key=ll.__getitem__)
        gold = best if k % 2 == 0 else (best + 1) % 3  # the model is right on exactly half
        docs.append({"question": q, "choices": choices, "answer": gold})
    write_task(tmp_path, docs)
    r = evaluate(
        EvalJob(path, data=str(calib_text), seqlen=64, max_windows=1, tasks="leanquant_toy_mc",
                include_path=str(tmp_path), bos=False)
    )  # fmt: skip
    assert r["tasks"]["leanquant_toy_mc"]["acc"] == pytest.approx(0.5)


def test_unknown_tasks_are_refused_before_loading(tiny_model, calib_text, capsys, tmp_path):
    args = ["eval", str(tiny_model("llama")), "--data", str(calib_text), "--seqlen", "32"]
    err = user_error(capsys, [*args, "--tasks", "no_such_task_xyz"])
    assert "lm-eval has no task 'no_such_task_xyz'" in err
    err = user_error(capsys, [*args, "--tasks", "x", "--include-path", str(tmp_path / "none")])
    assert "not a folder" in err
    err = user_error(capsys, [*args, "--tasks", " , "])
    assert "names no task" in err


def test_cli_prints_task_metrics(eos_model, calib_text, capsys, tmp_path):
    write_task(tmp_path, [{"question": q, "choices": c, "answer": 0} for q, c in QUESTIONS])
    args = ["eval", str(eos_model), "--data", str(calib_text), "--seqlen", "32",
            "--max-windows", "1", "--tasks", "leanquant_toy_mc", "--include-path", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert "leanquant_toy_mc: acc " in capsys.readouterr().out
