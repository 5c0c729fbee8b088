"""Text for calibration and evaluation, as token windows.

A text source is a local file (.txt, .jsonl/.json with a "text" field), a folder of
such files (read through ``datasets``' local loaders), ``wiki-sample`` (the bundled
offline Wikipedia sample, see ``assets``), or a hub dataset name (``wikitext2``, ``c4``),
which needs network access to the Hugging Face hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
_LOCAL_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json"}


def load_text(source: str, split: str = "calib") -> str:
    """All text of ``source`` joined by blank lines; ``split`` is "calib" or "eval" for named sources."""
    import datasets

    if source == "wiki-sample":
        from .assets import wiki_splits

        splits = wiki_splits()
        return (splits.calib if split == "calib" else splits.eval).read_text(encoding="utf-8")
    if source in HUB_DATASETS:
        path, name, files, calib_split, eval_split, limit = HUB_DATASETS[source]
        which = calib_split if split == "calib" else eval_split
        ds = datasets.load_dataset(
            path, name, data_files=files and {which: files[which]}, split=which
        )
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return "\n\n".join(t for t in ds["text"] if t)
    p = Path(source)
    if not p.exists():
        raise UserError(
            f"text source {source!r} is neither an existing file or folder nor one of "
            f"wiki-sample, {', '.join(HUB_DATASETS)}"
        )
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.suffix in _LOCAL_SUFFIXES)
    if not files:
        raise UserError(f"no .txt, .jsonl or .json files in {source}")
    kinds = {_LOCAL_SUFFIXES[f.suffix] for f in files}
    if len(kinds) > 1:
        raise UserError(f"{source} mixes text and JSON files: point at one kind")
    kind = kinds.pop()
    ds = datasets.load_dataset(
        kind,
        data_files=[str(f) for f in files],
        split="train",
        **({"sample_by": "paragraph"} if kind == "text" else {}),
    )
    if "text" not in ds.column_names:
        raise UserError(f"{source}: JSON records need a 'text' field (found {ds.column_names})")
    return "\n\n".join(t for t in ds["text"] if t)


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text as one 1-D tensor of token ids."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def random_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets (the GPTQ/LeanQuant recipe)."""
    if tokens.numel() <= seqlen:
        raise UserError(
            f"calibration text has {tokens.numel()} tokens, fewer than one window of --seqlen {seqlen}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def consecutive_windows(tokens: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (perplexity evaluation)."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(
            f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}"
        )
    return tokens[: n * seqlen].view(n, seqlen)
