"""Calibration data as peers' users bring it: chat records through the tokenizer's template,
``datasets`` folders and objects, and per-document windows (quantizer/data.py)."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch
from conftest import user_error
from transformers import AutoTokenizer

from leanquant.cli import main
from leanquant_serve.format import Checkpoint
from quantizer.data import document_windows, load_documents, tokenize
from quantizer.errors import UserError
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import QuantizeJob, quantize_model

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
)
CHATS = [
    [{"role": "user", "content": f"question {i} about the of and model"},
     {"role": "assistant", "content": f"answer {i}: weight grid the of and " * (2 + i % 3)}]
    for i in range(12)
]  # fmt: skip


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory):
    """The tiny Llama with a chat template that writes its own BOS."""
    path = tmp_path_factory.mktemp("llama-chat")
    for f in tiny_model("llama").iterdir():
        shutil.copy(f, path / f.name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    if tok.bos_token is None:
        tok.bos_token = tok.convert_ids_to_tokens(0)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def chat_jsonl(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return p


def test_chat_records_are_rendered_by_the_tokenizers_template(chat_model, chat_jsonl):
    tok = AutoTokenizer.from_pretrained(chat_model)
    docs = load_documents(str(chat_jsonl), "calib", tok)
    want = [tok.apply_chat_template(m, tokenize=False) for m in CHATS]
    assert all(w.startswith(tok.bos_token) for w in want)  # the template writes a BOS ...
    assert docs == [w[len(tok.bos_token) :] for w in want]  # ... windows get theirs from --bos
    assert "<|user|>question 3" in docs[3]


def test_chat_records_need_a_template(tiny_model, chat_jsonl, capsys, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template; use 'text' records"):
        load_documents(str(chat_jsonl), "calib", tok)
    with pytest.raises(UserError, match="need the model's tokenizer"):
        load_documents(str(chat_jsonl), "calib", None)
    err = user_error(
        capsys, ["quantize", str(tiny_model("llama")), str(tmp_path / "o"), "--calib", str(chat_jsonl),
                 "--nsamples", "2", "--seqlen", "16", "--group-size", "32"],
    )  # fmt: skip
    assert "chat template" in err


def test_saved_datasets_and_dataset_objects(tmp_path):
    texts = ["first document", "", "second document", "third"]
    ds = datasets.Dataset.from_dict({"text": texts})
    assert load_documents(ds) == ["first document", "second document", "third"]
    ds.save_to_disk(str(tmp_path / "one"))
    assert load_documents(str(tmp_path / "one")) == ["first document", "second document", "third"]
    both = datasets.DatasetDict(
        train=ds, test=datasets.Dataset.from_dict({"text": ["held out"]})
    )
    both.save_to_disk(str(tmp_path / "two"))
    assert load_documents(str(tmp_path / "two"), "eval") == ["held out"]
    assert load_documents(str(tmp_path / "two"), "calib")[0] == "first document"
    odd = datasets.DatasetDict(a=ds, b=ds)
    odd.save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(UserError, match=r"splits \['a', 'b'\]; none is train"):
        load_documents(str(tmp_path / "odd"), "calib")
    with pytest.raises(UserError, match="'text' field or a 'messages' list"):
        load_documents(datasets.Dataset.from_dict({"body": ["x"]}))


def test_document_windows_begin_documents():
    docs = [torch.arange(100 * i, 100 * i + n) for i, n in enumerate([3, 20, 9, 30, 12, 8])]
    w = document_windows(docs, 3, 9, seed=0, bos=7)
    assert w.shape == (3, 9) and bool((w[:, 0] == 7).all())
    starts = {int(x) for x in w[:, 1]}
    assert starts <= {100, 200, 300, 400, 500}  # docs with >= 8 text tokens, from their start
    assert len(starts) == 3  # different documents
    assert torch.equal(w, document_windows(docs, 3, 9, seed=0, bos=7))  # seeded
    for row in w:
        assert torch.equal(row[1:], torch.arange(int(row[1]), int(row[1]) + 8))
    with pytest.raises(UserError, match="1 of 6 calibration documents hold a window"):
        document_windows(docs, 3, 21, seed=0)


def test_quantize_on_chat_documents(chat_model, chat_jsonl, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(chat_model), str(out), "--calib", str(chat_jsonl),
                 "--calib-windows", "document", "--nsamples", "4", "--seqlen", "12",
                 "--group-size", "32"]) == 0  # fmt: skip
    q = Checkpoint(out).qcfg.quantizer
    assert q["calib_windows"] == "document" and q["calib"] == str(chat_jsonl)


def test_a_dataset_object_calibrates_through_the_python_api(chat_model, tmp_path):
    ds = datasets.Dataset.from_dict({"messages": CHATS})
    job = QuantizeJob(
        chat_model, tmp_path / "q", settings=GPTQSettings(group_size=32), calib=ds, nsamples=4,
        seqlen=12,
    )  # fmt: skip
    quantize_model(job)
    calib = Checkpoint(tmp_path / "q").qcfg.quantizer["calib"]
    assert calib == f"datasets.Dataset:{ds._fingerprint}"


def test_rendered_chats_tokenize_as_the_tokenizer_does(chat_model, chat_jsonl):
    """The calibration tokens of a chat are the tokenizer's own ids for its rendered text."""
    tok = AutoTokenizer.from_pretrained(chat_model)
    doc = load_documents(str(chat_jsonl), "calib", tok)[0]
    ids = tok.apply_chat_template(CHATS[0], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5: a BatchEncoding
    assert tokenize(tok, doc).tolist() == list(ids)[1:]  # all but the template's BOS
