"""Perplexity of an unquantized model or of a LeanQuant checkpoint (through the reference
dequantizer), and its distance to a reference model on the same windows: the mean per-token
KL divergence KL(P_ref ‖ P_model) and the top-1 agreement, the metrics peers publish beside
perplexity because they separate close methods with fewer tokens."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from leanquant_serve.format import load_reference_model

from .data import check_seqlen, consecutive_windows, model_vocab_size, text_tokens
from .errors import UserError, check_counts
from .flags import BOS_HELP, setting
from .source import load_config


@dataclass(frozen=True)
class EvalJob:
    """One perplexity evaluation (the CLI's ``eval`` builds it from its flags)."""

    model: Path  # model or LeanQuant checkpoint folder
    # text source (its evaluation split), see data.load_text
    data: str = setting("wiki-sample", "text source (its evaluation split)")
    seqlen: int = setting(2048, "tokens per window, BOS included")
    max_windows: int | None = setting(  # None: as many as the text holds
        None, "at most this many windows (default: as many as the text holds)", show_default=False
    )
    batch_size: int = setting(1, "windows per forward")
    device: str = setting("cpu", "cpu, cuda, cuda:1, ...")
    # begin each window with the tokenizer's BOS token if the tokenizer adds one to a text
    # (as lm-eval's add_bos_token; see data.py); False: text tokens only (--no-bos)
    bos: bool = setting(True, BOS_HELP)
    # a reference model (e.g. the bf16 original): KL(P_ref ‖ P_model) per token and top-1
    # agreement on the same windows; its own perplexity comes with them
    ref: str | None = setting(
        None,
        "reference model folder (or bundled name) for KL divergence and top-1 agreement on the "
        "same windows, e.g. the unquantized original",
        show_default=False,
        metavar="MODEL",
    )

    # lm-eval-harness tasks, run on the same (dense) model through lm-eval's HF backend
    tasks: str | None = setting(
        None,
        "comma-separated lm-eval-harness tasks (e.g. arc_easy,hellaswag) run on the model "
        "through lm-eval's HF backend (LeanQuant checkpoints through the reference "
        "dequantizer), BOS as --bos; hub tasks need network access",
        show_default=False,
        metavar="TASKS",
    )
    include_path: str | None = setting(
        None, "folder of extra lm-eval task YAMLs (local tasks)", show_default=False, metavar="DIR"
    )
    num_fewshot: int | None = setting(None, "lm-eval few-shot examples", show_default=False)
    limit: int | None = setting(
        None, "at most this many documents per lm-eval task", show_default=False
    )

    def __post_init__(self) -> None:
        """Settings that no model can make right, refused before anything is read."""
        check_counts(seqlen=self.seqlen, batch_size=self.batch_size)
        if self.limit is not None:
            check_counts(limit=self.limit)
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        if self.tasks is not None and not self.task_list:
            raise UserError("--tasks names no task")
        if self.max_windows is not None:
            check_counts(max_windows=self.max_windows)
        if self.seqlen < 2:
            raise UserError(f"--seqlen must be at least 2 to score a token, got {self.seqlen}")


    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in (self.tasks or "").split(",") if t.strip()]


def is_leanquant_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    return (
        cfg.is_file()
        and json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method")
        == "leanquant"
    )


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A dense model: LeanQuant checkpoints are dequantized by the reference dequantizer."""
    load_config(path)  # a readable config.json, or a one-line error
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


@torch.no_grad()
def compare(
    model: nn.Module, ref: nn.Module, windows: Tensor, batch_size: int = 1, device: str = "cpu"
) -> dict:
    """Both models on the same windows: each one's perplexity, the mean over scored tokens of
    KL(P_ref ‖ P_model) = Σ_v p_ref(v) (log p_ref(v) − log p_model(v)) in nats, and the share of
    tokens where both predict the same top-1 token. Raises UserError if their vocabularies
    (logit widths) differ."""
    nll, ref_nll, kl, agree, count = 0.0, 0.0, 0.0, 0, 0
    for batch in tqdm(windows.split(batch_size), desc="compare", unit="batch", leave=False):
        ids = batch.to(device)
        target = ids[:, 1:].reshape(-1)
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        logr = torch.log_softmax(ref(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        if logp.shape[-1] != logr.shape[-1]:
            raise UserError(
                f"the reference model has {logr.shape[-1]} logits per token, the model "
                f"{logp.shape[-1]}: KL needs the same vocabulary"
            )
        logp, logr = logp.reshape(-1, logp.shape[-1]), logr.reshape(-1, logr.shape[-1])
        nll -= logp.gather(1, target[:, None]).sum().item()
        ref_nll -= logr.gather(1, target[:, None]).sum().item()
        kl += (logr.exp() * (logr - logp)).sum().item()  # Σ_tokens Σ_v p_ref (log p_ref − log p)
        agree += int((logp.argmax(1) == logr.argmax(1)).sum())
        count += target.numel()
    return {
        "perplexity": math.exp(nll / count),
        "ref_perplexity": math.exp(ref_nll / count),
        "kl_to_ref": kl / count,
        "top1_agreement": agree / count,
    }


def _task_manager(job: EvalJob):
    """lm-eval's TaskManager with ``job.include_path``; every task of ``job`` checked to exist
    (before any weights load). Raises UserError if lm-eval is missing or a task is unknown."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError("--tasks needs lm-eval-harness: pip install lm-eval") from e
    if job.include_path is not None and not Path(job.include_path).is_dir():
        raise UserError(f"--include-path {job.include_path}: not a folder")
    manager = TaskManager(include_path=job.include_path, verbosity="ERROR")
    unknown = [t for t in job.task_list if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"lm-eval has no task {', '.join(map(repr, unknown))}"
            + ("" if job.include_path else " (local task YAMLs: --include-path DIR)")
        )
    return manager


def run_tasks(model: nn.Module, tokenizer, job: EvalJob, manager) -> dict[str, dict[str, float]]:
    """lm-eval-harness's ``simple_evaluate`` on an in-memory model (its HF backend,
    ``HFLM(pretrained=model)``): per task, each metric's value. BOS as ``job.bos`` (lm-eval's
    ``add_bos_token``); contexts are cut to ``job.seqlen`` tokens."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=job.batch_size,
        device=job.device,
        max_length=job.seqlen,
        add_bos_token=job.bos,
    )
    out = simple_evaluate(
        model=lm,
        tasks=job.task_list,
        num_fewshot=job.num_fewshot,
        limit=job.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,  # no stderr resampling: values only
        verbosity="ERROR",
    )
    return {
        task: {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if "," in k and "stderr" not in k and isinstance(v, (int, float))  # "metric,filter"
        }
        for task, metrics in out["results"].items()
    }


def evaluate(job: EvalJob) -> dict:
    """Perplexity of the model in ``job.model`` on the "eval" split of text source
    ``job.data``. The model, seqlen, text and tokenizer are checked before the weights load."""
    path = Path(job.model)
    config = load_config(path)
    check_seqlen(job.seqlen, config, path)
    tokens, bos = text_tokens(
        path, job.data, "eval", bos=job.bos, vocab_size=model_vocab_size(config)
    )
    windows = consecutive_windows(tokens, job.seqlen, job.max_windows, bos)
    ref_path = None
    if job.ref is not None:  # checked before any weights load
        from .assets import model_path

        ref_path = model_path(job.ref)
        ref_config = load_config(ref_path)
        if model_vocab_size(ref_config) != model_vocab_size(config):
            raise UserError(
                f"--ref {job.ref}: vocab_size {model_vocab_size(ref_config)} differs from "
                f"{path}'s {model_vocab_size(config)}: KL needs the same vocabulary"
            )
    result = {
        "model": str(path),
        "data": job.data,
        "seqlen": job.seqlen,
        "windows": windows.shape[0],
        "tokens": windows.numel(),
        "bos_token_id": bos,  # what every window begins with (None: text only)
    }
    manager = _task_manager(job) if job.tasks else None
    model = load_model(path, device=job.device)
    if ref_path is None:
        result["perplexity"] = perplexity(model, windows, job.batch_size, job.device)
    else:
        ref = load_model(ref_path, device=job.device)
        result |= {"ref": str(ref_path), **compare(model, ref, windows, job.batch_size, job.device)}
        del ref
    if manager is not None:
        from .data import load_tokenizer

        result["tasks"] = run_tasks(model, load_tokenizer(path, "evaluation"), job, manager)
    return result
