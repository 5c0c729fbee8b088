"""Text for calibration and evaluation, as token windows.

A text source is a local file (.txt, .jsonl/.json), a folder of such files (read through
``datasets``' local loaders), a folder written by ``datasets``' ``save_to_disk``, a
``datasets.Dataset`` object (Python API), ``wiki-sample`` (the bundled offline Wikipedia
sample, see ``assets``), or a hub dataset name (``wikitext2``, ``c4``), which needs network
access to the Hugging Face hub. JSON records and dataset rows hold either ``text`` (a
document) or ``messages`` (a chat: a list of ``{"role", "content"}``), which is rendered with
the tokenizer's chat template, as llm-compressor's examples do for instruct models.

Windows begin with the tokenizer's BOS token when the tokenizer adds one to a text (decided
from its output, as lm-eval's ``add_bos_token`` does for the models that need it, e.g. the
Gemma family), unless ``bos=False`` (``--no-bos``): a window is then [BOS] + seqlen − 1 text
tokens, so its length stays ``seqlen``. A chat template that writes its own BOS is rendered
without it, so no window holds two.

Calibration windows (``--calib-windows``): ``random`` draws them at random offsets of the
documents joined by blank lines (the GPTQ/LeanQuant recipe; any text, windows may straddle
documents); ``document`` takes the start of randomly drawn documents long enough for a whole
window (each window one document from its beginning, as a served prompt begins: use it for
chat data, where the template's header is what the model sees first).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import UserError

log = logging.getLogger(__name__)

# name: (hub path, config, data_files per split or None, calib split, eval split, max documents)
HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", None, "train", "test", None),
    # One shard each, as the GPTQ/LeanQuant references do, not the whole 300 GB corpus.
    "c4": (
        "allenai/c4",
        None,
        {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        "train",
        "validation",
        20_000,
    ),
}
CALIB_WINDOWS = ("random", "document")  # --calib-windows
_LOCAL_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json"}


def load_text(source, split: str = "calib", tokenizer=None) -> str:
    """All text of ``source`` joined by blank lines; ``split`` is "calib" or "eval" for named
    sources; ``tokenizer`` renders chat records (see :func:`load_documents`)."""
    if source == "wiki-sample":  # the file as it is (its articles: blank-line separated)
        return _wiki_text(split)
    return "\n\n".join(load_documents(source, split, tokenizer))


def _wiki_text(split: str) -> str:
    from .assets import wiki_splits

    splits = wiki_splits()
    path = splits.calib if split == "calib" else splits.eval
    return _nonempty(path.read_text(encoding="utf-8"), "wiki-sample")


def load_documents(source, split: str = "calib", tokenizer=None) -> list[str]:
    """The documents of ``source`` (a name, path or ``datasets.Dataset``), non-empty, in order.
    Chat records (``messages``) are rendered with ``tokenizer``'s chat template. Raises
    UserError for a missing, empty or unreadable source."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _documents(_one_split(source, split, "the dataset"), "the dataset", tokenizer)
    source = str(source)
    if source == "wiki-sample":
        return [d for d in _wiki_text(split).split("\n\n") if d.strip()]
    if source in HUB_DATASETS:
        path, name, files, calib_split, eval_split, limit = HUB_DATASETS[source]
        which = calib_split if split == "calib" else eval_split
        ds = datasets.load_dataset(
            path, name, data_files=files and {which: files[which]}, split=which
        )
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return _documents(ds, source, tokenizer)
    p = Path(source)
    if not p.exists():
        raise UserError(
            f"text source {source!r} is neither an existing file or folder nor one of "
            f"wiki-sample, {', '.join(HUB_DATASETS)}"
        )
    if p.is_dir() and any((p / f).is_file() for f in _SAVED_MARKERS):  # save_to_disk
        try:
            saved = datasets.load_from_disk(str(p))
        except (OSError, ValueError, FileNotFoundError) as e:
            raise UserError(f"cannot read the saved dataset {source}: {_first_line(e)}") from e
        return _documents(_one_split(saved, split, source), source, tokenizer)
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.suffix in _LOCAL_SUFFIXES)
    if not files:
        raise UserError(f"no .txt, .jsonl or .json files in {source}")
    kinds = {_LOCAL_SUFFIXES[f.suffix] for f in files}
    if len(kinds) > 1:
        raise UserError(f"{source} mixes text and JSON files: point at one kind")
    kind = kinds.pop()
    files = [f for f in files if f.stat().st_size]  # datasets cannot read an empty file
    if not files:
        raise _no_text(source)
    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors are ours, once
    datasets.disable_progress_bars()  # a local file reads in moments; a bar only clutters errors
    try:
        ds = datasets.load_dataset(
            kind,
            data_files=[str(f) for f in files],
            split="train",
            **({"sample_by": "paragraph"} if kind == "text" else {}),
        )
    except datasets.exceptions.DatasetGenerationError as e:  # e.g. a malformed JSON line
        raise UserError(f"cannot read {source}: {_first_line(e.__cause__ or e)}") from e
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
    return _documents(ds, source, tokenizer)


# Files ``datasets``' save_to_disk writes in a Dataset (state.json) or DatasetDict folder.
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def _one_split(ds, split: str, source: str):
    """A ``datasets.Dataset`` from a Dataset or DatasetDict: its only split, else "train" for
    calibration and "test" / "validation" for evaluation."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        return ds
    names = list(ds)
    wanted = ["train"] if split == "calib" else ["test", "validation"]
    pick = names[0] if len(names) == 1 else next((w for w in wanted if w in ds), None)
    if pick is None:
        raise UserError(
            f"{source}: splits {names}; none is {' or '.join(wanted)} for "
            f"{'calibration' if split == 'calib' else 'evaluation'}: save one split"
        )
    return ds[pick]


def _documents(ds, source: str, tokenizer) -> list[str]:
    """The non-empty documents of a ``datasets.Dataset`` with a ``text`` or ``messages`` column."""
    if "text" in ds.column_names:
        docs = [t for t in ds["text"] if t]
    elif "messages" in ds.column_names:
        docs = [render_chat(tokenizer, m, source) for m in ds["messages"] if m]
    else:
        raise UserError(
            f"{source}: records need a 'text' field or a 'messages' list (found "
            f"{ds.column_names})"
        )
    if not any(d.strip() for d in docs):
        raise _no_text(source)
    return docs


def render_chat(tokenizer, messages, source: str) -> str:
    """A chat (list of ``{"role", "content"}``) as the tokenizer's chat template writes it, without
    a leading BOS (windows get theirs from ``bos``). Raises UserError if there is no tokenizer or
    no template, or the messages do not fit it."""
    if tokenizer is None:
        raise UserError(f"{source}: chat records ('messages') need the model's tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source}: chat records ('messages') but the tokenizer has no chat template; "
            "use 'text' records"
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja2 errors, bad roles, ...: the template's own message
        raise UserError(f"{source}: cannot render a chat record: {_first_line(e)}") from e
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _no_text(source: str) -> UserError:
    return UserError(f"text source {source} holds no text (empty): point at a file with text")


def _nonempty(text: str, source: str) -> str:
    """The one rule for calibration and evaluation text: there is some."""
    if not text.strip():
        raise _no_text(source)
    return text


def load_tokenizer(model: Path, purpose: str):
    """The tokenizer saved in the folder ``model``; ``purpose`` ("calibration" or
    "evaluation") says in the error what needs it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        hint = "; --rtn quantizes without one" if purpose == "calibration" else ""
        raise UserError(
            f"no usable tokenizer in {model} ({_first_line(e)}): a tokenizer is needed to "
            f"tokenize the {purpose} text{hint}"
        ) from e


def bos_token_id(tokenizer) -> int | None:
    """The BOS id ``tokenizer`` puts before a text, or None if it adds none. Read off what it
    does to a text (a tokenizer may name a BOS token and not add it, like SmolLM2's)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if bos is not None and ids[:1] == [bos] else None


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens)."""
    # verbose=False: the whole text is longer than the model's context on purpose (it is cut
    # into windows next), so transformers' "longer than the maximum sequence length" is noise
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def text_tokens(
    model: Path, source: str, split: str, *, bos: bool, vocab_size: int
) -> tuple[Tensor, int | None]:
    """The ``split`` ("calib"/"eval") text of ``source`` tokenized by ``model``'s tokenizer, and
    the id windows begin with: its BOS if ``bos`` and the tokenizer adds one, else None.
    Refuses ids the model's embedding (``vocab_size`` rows) cannot look up."""
    tokenizer = load_tokenizer(model, "calibration" if split == "calib" else "evaluation")
    tokens = tokenize(tokenizer, load_text(source, split, tokenizer))
    bos_id = bos_token_id(tokenizer) if bos else None
    check_token_ids(tokens, bos_id, vocab_size, model)
    return tokens, bos_id


def document_tokens(
    model: Path, source, split: str, *, bos: bool, vocab_size: int
) -> tuple[list[Tensor], int | None]:
    """As :func:`text_tokens`, one 1-D tensor per document (for ``--calib-windows document``)."""
    tokenizer = load_tokenizer(model, "calibration" if split == "calib" else "evaluation")
    docs = [tokenize(tokenizer, d) for d in load_documents(source, split, tokenizer)]
    bos_id = bos_token_id(tokenizer) if bos else None
    for d in docs:
        check_token_ids(d, bos_id, vocab_size, model)
    return docs, bos_id


def check_token_ids(tokens: Tensor, bos: int | None, vocab_size: int, model: Path) -> None:
    """Every id (text tokens and BOS) is below the model's ``vocab_size``."""
    top = max(int(tokens.max()) if tokens.numel() else -1, -1 if bos is None else bos)
    if top >= vocab_size:
        raise UserError(
            f"the tokenizer in {model} produces token id {top} but the model's vocab_size is "
            f"{vocab_size}: the tokenizer does not belong to this model"
        )


def check_seqlen(seqlen: int, config: Any, model: Path) -> None:
    """A window fits the model's positions: ``seqlen`` ≤ ``max_position_embeddings`` (of the
    text config). A config without the field is not checked."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise UserError(
            f"--seqlen {seqlen} is longer than the max_position_embeddings {limit} of {model}"
        )


def model_vocab_size(config: Any) -> int:
    """Rows of the model's input embedding, as its (text) config says."""
    return config.get_text_config().vocab_size


def _text_per_window(seqlen: int, bos: int | None) -> int:
    """Text tokens in a window of ``seqlen``: all but the BOS, if any; at least one."""
    n = seqlen - (bos is not None)
    if n < 1:
        raise UserError(f"--seqlen {seqlen} leaves no room for text after the BOS token")
    return n


def _bos_windows(text: Tensor, bos: int | None) -> Tensor:
    """(n, L) text windows, with a BOS column in front if ``bos`` is not None."""
    if bos is None:
        return text
    return torch.cat([torch.full((text.shape[0], 1), bos, dtype=text.dtype), text], dim=1)


def random_windows(
    tokens: Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None = None
) -> Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets (the GPTQ/LeanQuant recipe);
    with ``bos``, each is [bos] + seqlen − 1 text tokens (the window length stays seqlen)."""
    n = _text_per_window(seqlen, bos)
    if tokens.numel() <= n:
        raise UserError(
            f"calibration text has {tokens.numel()} tokens, fewer than one window of --seqlen {seqlen}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - n, (nsamples,), generator=g)
    return _bos_windows(torch.stack([tokens[s : s + n] for s in starts.tolist()]), bos)


def document_windows(
    docs: list[Tensor], nsamples: int, seqlen: int, seed: int, bos: int | None = None
) -> Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, each the beginning of a different document
    drawn at random (with ``seed``) among those long enough for a whole window; with ``bos``,
    each is [bos] + the document's first seqlen − 1 tokens. Raises UserError if fewer than
    ``nsamples`` documents are long enough."""
    n = _text_per_window(seqlen, bos)
    long_enough = [d for d in docs if d.numel() >= n]
    if len(long_enough) < nsamples:
        raise UserError(
            f"--calib-windows document: {len(long_enough)} of {len(docs)} calibration documents "
            f"hold a window of --seqlen {seqlen}, fewer than --nsamples {nsamples}: lower "
            "--seqlen or --nsamples, or use --calib-windows random"
        )
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(long_enough), generator=g)[:nsamples].tolist()
    return _bos_windows(torch.stack([long_enough[i][:n] for i in picks]), bos)


def consecutive_windows(
    tokens: Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None
) -> Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (perplexity evaluation);
    with ``bos``, each is [bos] + the next seqlen − 1 text tokens (the window length stays
    seqlen, and every text token of a window is scored, its first one given only BOS)."""
    n = _text_per_window(seqlen, bos)
    count = tokens.numel() // n
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UserError(
            f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}"
        )
    return _bos_windows(tokens[: count * n].view(count, n), bos)
