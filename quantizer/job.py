"""The quantization job (what the user asked for) and the state of one run of it.

:class:`QuantizeJob` holds every setting of a run; the ``leanquant quantize`` flags are built
from its fields and :class:`~quantizer.gptq.GPTQSettings`' (quantizer/flags.py). Beside it:
the per-sublayer report, the run's summary (``quantize_report.json``), the checkpoint's
``quantization_config`` for the job, its calibration windows, and the fingerprint a resumed
run must share with the run it continues.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from leanquant_serve.format import LeanQuantConfig

from .activations import PLACES
from .data import (
    CALIB_WINDOWS,
    check_seqlen,
    document_tokens,
    document_windows,
    model_vocab_size,
    random_windows,
    text_tokens,
)
from .errors import UserError, check_counts
from .flags import BOS_HELP, parse_size, setting
from .gptq import GPTQSettings, QuantizedWeight
from .moe import CALIBRATION
from .source import SourceModel

if TYPE_CHECKING:
    from .journal import JournaledWriter

REPORT_FILE = "quantize_report.json"


# Summary.loss_measure of --rtn runs: their loss is the squared rounding error of the
# weights, not the calibrated runs' Σ (w − q)²/U_ii², so it is labelled apart
RTN_LOSS = "total weight error (unweighted): Σ (w − q)², no calibration"

DTYPES = ("float32", "bfloat16", "float16")  # of layer forwards and of stored activations


@dataclass(frozen=True)
class QuantizeJob:
    """Everything one quantization run needs. The ``leanquant quantize`` flags are built from
    these fields and :class:`GPTQSettings`' (quantizer/flags.py): one default per setting."""

    model: Path
    out: Path
    settings: GPTQSettings = field(default_factory=GPTQSettings)
    # round-to-nearest: no calibration, no error feedback
    rtn: bool = setting(False, "round to nearest: no calibration, no GPTQ updates")
    # text source, see data.py (the Python API also takes a datasets.Dataset)
    calib: str | Any | None = setting(
        None,
        "calibration text: a .txt/.jsonl file or folder ('text' or chat 'messages' records), "
        "a datasets save_to_disk folder, wiki-sample, wikitext2 or c4",
        show_default=False,
    )
    # how windows are cut (data.py): random offsets of the joined text, or document starts
    calib_windows: str = setting(
        "random",
        "random: windows at random offsets of the documents joined (any text); document: "
        "each window the beginning of a different document long enough for it (chat data: "
        "the model sees the template's start, as when served)",
        choices=CALIB_WINDOWS,
    )
    nsamples: int = setting(128, "calibration windows")
    seqlen: int = setting(2048, "tokens per calibration window, BOS included")
    batch_size: int = setting(1, "calibration windows per forward")
    # begin each calibration window with the tokenizer's BOS token if the tokenizer adds one
    # to a text (see data.py); False: text tokens only (--no-bos)
    bos: bool = setting(True, BOS_HELP)
    # compute device, or a comma-separated list (cuda:0,cuda:1): the first runs the layer
    # forwards and holds the activations; every one takes rows of each group's GPTQ work,
    # and the second accumulates and factors the Hessians
    device: str = setting(
        "cpu",
        "cpu, cuda, cuda:1, or a list such as cuda:0,cuda:1: the first runs the layer "
        "forwards, the second accumulates and factors the Hessians, and each group's rows are "
        "split over all of them (the result is the same for any list)",
        flags=("--device", "--devices"),
    )
    dtype: str = setting(  # dtype for layer forwards
        "float32",
        "dtype of layer forwards (and of the calibration activations unless --act-dtype)",
        choices=DTYPES,
    )
    activations: str = setting(  # where calibration activations live: device | cpu | disk
        "device",
        "where the calibration activations (nsamples x seqlen x hidden) live between uses: "
        "on the first device (fastest), in host RAM, or spilled to the partial output folder "
        "one batch at a time (host memory: one batch)",
        choices=PLACES,
    )
    act_dtype: str | None = setting(  # their stored dtype (None: dtype)
        None,
        "dtype the calibration activations are stored in (default: --dtype); bfloat16 "
        "halves them (8.6 GB for 405B at 128 x 2048)",
        choices=DTYPES,
        show_default=False,
    )
    # regexes of linear sublayers (relative to a layer, checkpoint or in-memory names) to leave
    # unquantized: resolved in model_walk.skip_matches
    skip: tuple[str, ...] = setting(
        (),
        "regex of sublayer names relative to a decoder layer, as the checkpoint or transformers "
        "names them (e.g. 'mlp\\.down_proj', 'block_sparse_moe\\.experts'), to leave "
        "unquantized; repeatable. One matching nothing, or part of a fused experts module, is "
        "an error",
        repeat=True,
        show_default=False,
    )
    # Mixture-of-Experts calibration (quantizer/moe.py): every calibration token through every
    # expert for the Hessians (llm-compressor's choice), or only the tokens the router sends
    moe_calibration: str = setting(
        "all",
        "MoE experts' Hessians from every calibration token through every expert (all: the "
        "experts' input H is shared and factored once per layer) or only the tokens the "
        "router sends them (routed); the next layer's inputs always use the real routing",
        choices=CALIBRATION,
    )
    moe_min_tokens: int = setting(
        64,
        "an expert linear calibrated on fewer tokens than this uses its all-token Hessian "
        "instead (counted in the report)",
    )
    overwrite: bool = setting(False, "replace an existing output folder")
    max_shard_bytes: int = setting(
        4 * 1024**3,
        "largest checkpoint shard, e.g. 4GiB (default), 500MB or a byte count",
        flags=("--max-shard-size",),
        type=parse_size,
        metavar="SIZE",
        show_default=False,
    )
    # An existing partial run of ``out`` is refused unless one of these is set.
    resume: bool = setting(  # continue it after its last finished layer (or start if none)
        False,
        "continue the partial run of OUT (kept in .OUT.partial next to it after a failure "
        "or kill) after its last finished layer; the model, calibration data and settings "
        "must be the same. The result is byte-identical to an uninterrupted run. Without a "
        "partial run, starts one",
    )
    fresh: bool = setting(  # discard it and start over
        False,
        "discard a partial run of OUT and start over (without --resume or --fresh, an "
        "existing partial run is an error)",
    )

    def __post_init__(self) -> None:
        """Settings that no model can make right, refused before anything is read."""
        check_counts(
            nsamples=self.nsamples,
            seqlen=self.seqlen,
            batch_size=self.batch_size,
            max_shard_size=self.max_shard_bytes,
            moe_min_tokens=self.moe_min_tokens,
        )
        if self.moe_calibration not in CALIBRATION:
            raise UserError(f"--moe-calibration must be one of {', '.join(CALIBRATION)}")
        if self.rtn and self.settings.refit:
            raise UserError("--refit needs calibration (a Hessian); it does nothing with --rtn")
        self.check_moe_flags()
        if self.resume and self.fresh:
            raise UserError("--resume and --fresh exclude each other")
        for p in self.skip:
            try:
                re.compile(p)
            except re.error as e:
                raise UserError(f"--skip {p!r} is not a valid regular expression: {e}") from e

    def check_moe_flags(self, has_experts: bool = True) -> None:
        """--moe-calibration and --moe-min-tokens act only on calibrated runs of models with
        experts: set to other than their defaults, they are refused (UserError) with --rtn,
        or on a model without experts (``has_experts`` False, known once the model is read).
        Their defaults, which every API call carries, never are."""
        given = [
            f"--{f.name.replace('_', '-')} {getattr(self, f.name)}"
            for f in fields(self)
            if f.name in ("moe_calibration", "moe_min_tokens")
            and getattr(self, f.name) != f.default
        ]
        what, it = " and ".join(given), "it does" if len(given) == 1 else "they do"
        if given and self.rtn:
            raise UserError(
                f"{what} need{'s' if len(given) == 1 else ''} calibration (the tokens the router "
                f"sends each expert); {it} nothing with --rtn"
            )
        if given and not has_experts:
            raise UserError(
                f"{what}: {self.model} has no Mixture-of-Experts layers (fused experts); "
                f"{it} nothing for this model"
            )

    @property
    def devices(self) -> list[torch.device]:
        return [torch.device(d.strip()) for d in self.device.split(",")]


@dataclass
class SublayerReport:
    name: str
    shape: tuple[int, int]
    loss: float
    seconds: float
    damp: float
    cholesky_retries: int
    # inputs that are zero in every calibration token (None: --rtn, no calibration); their
    # weights are kept and rounded to nearest, see gptq.prepare
    dead_inputs: int | None = None
    # --refit: the sublayer's layer-wise loss Σ_rows (w − q)ᵀ H (w − q) with the column loop's
    # grid and after the refit (quantizer/refit.py); absent from the report without --refit
    refit_loss: tuple[float, float] | None = None
    # --moe-calibration routed: the calibration tokens the router sent this expert linear (its
    # Hessian's, unless below --moe-min-tokens: then in moe_fallbacks); absent otherwise
    routed_tokens: int | None = None


@dataclass
class Summary:
    out: str
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int  # the largest over the devices
    total_loss: float
    cholesky_retries: int
    layers: list[list[SublayerReport]] = field(default_factory=list)
    activation_bytes: int = 0  # of one layer's calibration inputs, as stored
    bos_token_id: int | None = None  # what every calibration window begins with (None: text)
    # weights of the decoder layers left unquantized: routers by rule, --skip matches
    # ({"name", "shape", "share" of its layer's parameters, "why"}); absent when none
    skipped: list[dict] = field(default_factory=list)
    # MoE expert linears calibrated on fewer than --moe-min-tokens tokens, which used their
    # all-token Hessian instead ({"name", "tokens"}); absent when none
    moe_fallbacks: list[dict] = field(default_factory=list)
    # source tensors not written: decoder layers beyond the model's (DeepSeek-V3's
    # multi-token-prediction layer), {"name", "tensors", "why"}; absent when none
    dropped: list[dict] = field(default_factory=list)
    # of the quantized linears (every SublayerReport), how many are MoE expert linears;
    # absent when none
    expert_linears: int = 0
    # --moe-calibration routed: min, median and max of the expert linears' routed_tokens
    # ({"min", "median", "max"}); absent otherwise
    moe_routed_tokens: dict = field(default_factory=dict)
    # what total_loss and the sublayers' loss measure when not GPTQ's loss error
    # Σ (w − q)²/U_ii² (RTN_LOSS under --rtn: no calibration, no U); absent otherwise
    loss_measure: str = ""


def summary_to_dict(summary: Summary) -> dict:
    """The summary as ``quantize_report.json`` holds it: fields of options that were off
    (``refit_loss`` without --refit) are left out, so such reports are as before them."""
    d = asdict(summary)
    # (reports of dense, calibrated models stay as before these fields)
    for key in (
        "skipped", "moe_fallbacks", "dropped", "expert_linears", "loss_measure",
        "moe_routed_tokens",
    ):  # fmt: skip
        if not d[key]:
            del d[key]
    for layer in d["layers"]:
        for r in layer:
            for key in ("refit_loss", "routed_tokens"):
                if r[key] is None:
                    del r[key]
    return d


def summary_from_dict(d: dict) -> Summary:
    d = dict(d)
    d["layers"] = [
        [
            SublayerReport(
                **{
                    **r,
                    "shape": tuple(r["shape"]),
                    **({"refit_loss": tuple(r["refit_loss"])} if r.get("refit_loss") else {}),
                }
            )
            for r in layer
        ]
        for layer in d["layers"]
    ]
    return Summary(**d)


def checkpoint_config(
    job: QuantizeJob, not_converted: list[str], moe: bool = False
) -> LeanQuantConfig:
    """The checkpoint's quantization_config for ``job``: its format fields, and in
    ``quantizer`` how it was made (method, fit, calibration; ``moe``: the model has experts,
    whose calibration settings are then recorded too, beside ``calib``)."""
    s = job.settings
    method = "rtn" if job.rtn else ("gptq" if s.fit == "minmax" else "leanquant")
    meta = {
        "method": method,
        "grid_fit": s.fit,  # informational: loaders read the tensors and ``grid``
        "damp": s.damp,
        "exponent": s.exponent,
        "blocksize": s.blocksize,
        "T": s.T,
        "shrink": s.shrink,
        "seed": s.seed,
    }
    if s.refit:  # (only when on: checkpoints made without it keep their bytes)
        meta["refit"] = True
    if not job.rtn:
        meta.update(calib=calib_name(job.calib), nsamples=job.nsamples, seqlen=job.seqlen)
        if job.calib_windows != "random":  # (only when not the default: bytes as before)
            meta["calib_windows"] = job.calib_windows
        if moe:
            meta.update(moe_calibration=job.moe_calibration, moe_min_tokens=job.moe_min_tokens)
    return LeanQuantConfig(
        bits=s.bits,
        group_size=s.group_size,
        grid=s.stored_grid,
        table=s.stored_table,
        desc_act=s.actorder and not job.rtn,
        static_groups=s.static_groups,
        modules_to_not_convert=tuple(not_converted),
        quantizer=meta,
    )


def calibration_windows(job: QuantizeJob, config) -> tuple[Tensor, int | None]:
    """The calibration windows (nsamples, seqlen) drawn with the job's seed, and the BOS id
    each begins with (None: none; see data.py). ``config``: the model's."""
    if job.calib is None:
        raise UserError(
            "--calib is required (a text file, folder, wiki-sample or a hub dataset name), or use --rtn"
        )
    if job.nsamples % job.batch_size:
        raise UserError(
            f"--nsamples {job.nsamples} is not a multiple of --batch-size {job.batch_size}"
        )
    check_seqlen(job.seqlen, config, job.model)
    vocab = model_vocab_size(config)
    if job.calib_windows == "document":
        docs, bos = document_tokens(job.model, job.calib, "calib", bos=job.bos, vocab_size=vocab)
        return document_windows(docs, job.nsamples, job.seqlen, job.settings.seed, bos), bos
    tokens, bos = text_tokens(job.model, job.calib, "calib", bos=job.bos, vocab_size=vocab)
    return random_windows(tokens, job.nsamples, job.seqlen, job.settings.seed, bos), bos


def calib_name(calib) -> str | None:
    """The calibration source as JSON can hold it: its name or path, or for a
    ``datasets.Dataset`` object its content fingerprint (``datasets``' own hash)."""
    if calib is None or isinstance(calib, str):
        return calib
    if isinstance(calib, Path):
        return str(calib)
    return f"datasets.Dataset:{getattr(calib, '_fingerprint', type(calib).__name__)}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(job: QuantizeJob, src: SourceModel, windows: Tensor | None) -> dict:
    """What a resumed run must share with the run it continues (as JSON data).

    The source model is identified by its resolved path, config.json and tensor names per
    file (not the tensor bytes, which would mean reading the whole model, and not the file
    sizes or times, so that a corrupt shard can be replaced and the run resumed)."""
    fp = {
        "model": str(Path(job.model).resolve()),
        "model_config_sha256": _sha256((Path(job.model) / "config.json").read_bytes()),
        "model_tensors_sha256": _sha256(json.dumps(sorted(src.weight_map.items())).encode()),
        "settings": asdict(job.settings),
        "rtn": job.rtn,
        "calib": None if job.rtn else calib_name(job.calib),
        "calib_windows": None if job.rtn else job.calib_windows,
        "nsamples": None if job.rtn else job.nsamples,
        "seqlen": None if job.rtn else job.seqlen,
        "batch_size": None if job.rtn else job.batch_size,
        "calib_windows_sha256": None if windows is None else _sha256(windows.numpy().tobytes()),
        "device": job.devices[0].type,  # not the count: rows split exactly across devices
        "dtype": job.dtype,
        "act_dtype": job.act_dtype or job.dtype,  # not where they live: that changes no value
        "skip": list(job.skip),
        "moe_calibration": job.moe_calibration,
        "moe_min_tokens": job.moe_min_tokens,
        "max_shard_bytes": job.max_shard_bytes,
    }
    return json.loads(json.dumps(fp))


@dataclass
class Run:
    """One quantization run: what the per-layer loop works with."""

    job: QuantizeJob
    src: SourceModel
    writer: JournaledWriter
    model: nn.Module
    layers_name: str
    layers: nn.ModuleList
    head_name: str | None
    qcfg: LeanQuantConfig
    outer_names: list[str]  # tensors outside the decoder layers, stored unchanged
    windows: Tensor | None  # calibration windows (None: RTN)
    bos_token_id: int | None  # their first token, if the tokenizer's BOS
    fingerprint: dict
    devices: list[torch.device]
    dtype: torch.dtype
    observer: Callable[[str, QuantizedWeight], None] | None
    t0: float
    skipped: list[dict] = field(default_factory=list)  # Summary.skipped
    expert_linears: int = 0  # Summary.expert_linears

    @property
    def device(self) -> torch.device:
        """The device of the layer forwards and of ``--activations device``."""
        return self.devices[0]

    @property
    def hessian_device(self) -> torch.device:
        """Where Hessians are accumulated and factored: the second device if there is one."""
        return self.devices[1] if len(self.devices) > 1 else self.devices[0]
