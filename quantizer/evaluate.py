"""Perplexity of an unquantized model or of a LeanQuant checkpoint (through the reference dequantizer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from leanquant_serve.format import load_reference_model

from .data import consecutive_windows, load_text, tokenize
from .errors import UserError


def is_leanquant_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    return (
        cfg.is_file()
        and json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method")
        == "leanquant"
    )


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A dense model: LeanQuant checkpoints are dequantized by the reference dequantizer."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json)")
    if is_leanquant_checkpoint(path):
        return load_reference_model(path, dtype=dtype, device=device).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: Tensor, batch_size: int = 1, device: str = "cpu"
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, each scored on its own."""
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", leave=False):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        count += target.numel()
    return math.exp(nll / count)


def evaluate(
    path: Path,
    data: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict:
    """Perplexity of the model in ``path`` on the "eval" split of text source ``data``."""
    model = load_model(path, device=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = consecutive_windows(tokenize(tokenizer, load_text(data, "eval")), seqlen, max_windows)
    ppl = perplexity(model, windows, batch_size, device)
    return {
        "model": str(path),
        "data": data,
        "seqlen": seqlen,
        "windows": windows.shape[0],
        "tokens": windows.numel(),
        "perplexity": ppl,
    }
