"""``leanquant``: quantize a Hugging Face model with LeanQuant, evaluate it, fetch the offline assets."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from leanquant_serve.format import SUPPORTED_BITS, FormatError, partial_dir

from .activations import PLACES
from .errors import UserError
from .grids import GRID_NAMES

log = logging.getLogger("leanquant")
DTYPES = ("float32", "bfloat16", "float16")  # of layer forwards and of stored activations
BUNDLED_MODEL = "smollm2"  # SmolLM2-135M-Instruct, fetched offline through pip (see assets)


def _model_path(name: str) -> Path:
    if name == BUNDLED_MODEL:
        from .assets import smollm2_dir

        return smollm2_dir()
    return Path(name)


def _size(text: str) -> int:
    """``4GB``, ``500MB``, ``64KiB``, ``1024`` (bytes) -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        n = int(float(number) * units[t[len(number) :]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GB or 500MB") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    return n


def _given(a: argparse.Namespace, *names: str) -> dict:
    """The flags among ``names`` that the command line set: the others are left to the job
    dataclass, whose field defaults are the only defaults (argparse's are None)."""
    return {n: getattr(a, n) for n in names if getattr(a, n) is not None}


def _cmd_quantize(a: argparse.Namespace) -> None:
    from .gptq import GPTQSettings
    from .pipeline import QuantizeJob, parse_skip, quantize_model

    try:  # GPTQSettings validates the combination (e.g. nonuniform needs --group-size -1)
        settings = GPTQSettings(
            bits=a.bits,
            group_size=a.group_size,
            fit=a.grid,
            actorder=a.act_order,
            static_groups=a.static_groups,
            damp=a.damp,
            exponent=a.exponent,
            T=a.T,
            shrink=a.shrink,
            seed=a.seed,
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise UserError(f"output folder {out} exists: pass --overwrite to replace it")
    if a.resume and a.fresh:
        raise UserError("--resume and --fresh exclude each other")
    job = QuantizeJob(
        model=_model_path(a.model),
        out=out,
        settings=settings,
        rtn=a.rtn,
        calib=a.calib,
        **_given(a, "nsamples", "seqlen", "batch_size", "bos"),
        device=a.device,
        dtype=a.dtype,
        activations=a.activations,
        act_dtype=a.act_dtype,
        skip=parse_skip(a.skip),
        overwrite=a.overwrite,
        max_shard_bytes=a.max_shard_size,
        resume=a.resume,
        fresh=a.fresh,
    )
    try:
        s = quantize_model(job)
    except KeyboardInterrupt:
        partial = partial_dir(out)
        if partial.exists():
            print(
                f"leanquant: interrupted; partial run kept at {partial}: rerun with --resume "
                "to continue it, or with --fresh to start over",
                file=sys.stderr,
            )
            raise SystemExit(130) from None
        raise
    worst = max(
        ((i, r) for i, layer in enumerate(s.layers) for r in layer), key=lambda x: x[1].loss
    )
    print(
        f"wrote {s.out} in {s.seconds:.1f} s, peak RSS {s.peak_rss_bytes / 2**30:.2f} GiB"
        + (f", peak GPU {s.peak_gpu_bytes / 2**30:.2f} GiB" if s.peak_gpu_bytes else "")
        + f"; total loss error {s.total_loss:.4g}, largest layer {worst[0]} {worst[1].name} "
        f"{worst[1].loss:.4g}; Cholesky retries {s.cholesky_retries} (details: quantize_report.json)"
    )
    print(
        "loss error per layer: "
        + ", ".join(f"{i}: {sum(r.loss for r in layer):.3g}" for i, layer in enumerate(s.layers))
    )


def _cmd_eval(a: argparse.Namespace) -> None:
    from .evaluate import EvalJob, evaluate

    job = EvalJob(
        _model_path(a.model),
        **_given(a, "data", "seqlen", "max_windows", "batch_size", "device", "bos"),
    )
    r = evaluate(job)
    bos = "" if r["bos_token_id"] is None else ", each beginning with BOS"
    print(
        json.dumps(r)
        if a.json
        else f"{r['model']}: perplexity {r['perplexity']:.3f} on {r['tokens']} tokens "
        f"({r['windows']} windows of {r['seqlen']}{bos}) of {r['data']}"
    )


def _cmd_fetch_assets(a: argparse.Namespace) -> None:
    from .assets import smollm2_dir, wiki_splits

    model, wiki = smollm2_dir(), wiki_splits()
    print(f"model: {model}\ncalibration text: {wiki.calib}\nevaluation text: {wiki.eval}")


def _export(a: argparse.Namespace, export, target: str, **kw):
    """Run ``export(checkpoint, out)`` with the CLI's refusals: an existing output without
    --overwrite, and what the target cannot hold exactly (ExportError), as one-line errors."""
    from leanquant_serve.export import ExportError

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise UserError(f"output folder {out} exists: pass --overwrite to replace it")
    try:
        return export(a.checkpoint, out, overwrite=a.overwrite, **kw)
    except ExportError as e:
        raise UserError(f"cannot export {a.checkpoint} {target}: {e}") from e


def _cmd_export_compressed_tensors(a: argparse.Namespace) -> None:
    from leanquant_serve.export.compressed_tensors import export_compressed_tensors

    r = _export(a, export_compressed_tensors, "as compressed-tensors")
    w = r.quantization_config["config_groups"]["group_0"]["weights"]
    grouping = f"group size {w['group_size']}" if w["strategy"] == "group" else "per channel"
    print(
        f"wrote {r.out}: {r.layers} linears as compressed-tensors pack-quantized "
        f"W{w['num_bits']}A16, {'symmetric' if w['symmetric'] else 'asymmetric'}, {grouping}"
    )


def _cmd_export_exllamav2(a: argparse.Namespace) -> None:
    from leanquant_serve.export.exllamav2 import export_exllamav2

    r = _export(a, export_exllamav2, "for exllamav2", format=a.target_format)
    g = r.quantization_config["group_size"]
    groups = "per channel" if g == -1 else f"group size {g}"
    if r.format == "exl2":
        bits = int(r.quantization_config["bits"])
        print(f"wrote {r.out}: {r.layers} linears as EXL2 {bits}-bit for exllamav2, {groups}")
        return
    print(
        f"wrote {r.out}: {r.layers} linears as GPTQ 4-bit for exllamav2, {groups}"
        f"{f', g_idx in {r.g_idx_layers}' if r.g_idx_layers else ''}; "
        f"{r.negated} of {r.grids} grids have z = 0 and are stored flipped (negated scale)"
    )


def _cmd_plan(a: argparse.Namespace) -> None:
    from leanquant_serve.plan import PlanError, PlanInput, format_plan, plan

    try:
        r = plan(
            PlanInput(
                model=a.model,
                bits=a.bits,
                group_size=a.group_size,
                grid=a.grid,
                gpus=a.gpus,
                gpu_mem_gib=a.gpu_mem,
                max_model_len=a.max_model_len,
                concurrency=a.concurrency,
                tp=a.tp,
                kv_dtype=a.kv_dtype,
                gpu_memory_utilization=a.gpu_memory_utilization,
                engine=a.engine,
                max_num_batched_tokens=a.max_num_batched_tokens,
                enforce_eager=a.enforce_eager,
                reserve_gib=a.reserve_gib,
            )
        )
    except PlanError as e:
        raise UserError(str(e)) from e
    print(json.dumps(r.to_dict(), indent=2) if a.json else format_plan(r))
    if a.check and not r.fits:
        raise SystemExit(1)


def _bos_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-bos",
        dest="bos",
        action="store_false",
        default=None,
        help="do not begin each window with the tokenizer's BOS token (by default windows "
        "begin with it when the tokenizer adds one to a text, as lm-eval's add_bos_token)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanquant", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model folder into a LeanQuant checkpoint")
    q.add_argument(
        "model",
        help=f"Hugging Face model folder, or {BUNDLED_MODEL!r} for the bundled SmolLM2-135M",
    )
    q.add_argument(
        "out",
        help="output checkpoint folder (appears only when complete; after a failure or a kill "
        "the finished layers stay in the hidden .OUT.partial next to it, for --resume)",
    )
    q.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS)
    q.add_argument(
        "--group-size", type=int, default=128, help="columns per group; -1: one group per row"
    )
    q.add_argument(
        "--grid",
        default="affine",
        choices=GRID_NAMES,
        help="affine/nonuniform: LeanQuant's learned grids; exl2: LeanQuant's objective inside "
        "exllamav2's EXL2 grid family (exact `export exllamav2` at 2/3/4/8 bits, stored as "
        "affine); minmax: plain GPTQ",
    )
    q.add_argument(
        "--rtn", action="store_true", help="round to nearest: no calibration, no GPTQ updates"
    )
    q.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize columns by decreasing Hessian diagonal",
    )
    q.add_argument(
        "--static-groups",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit group grids up front so act-order needs no g_idx (fast kernels)",
    )
    q.add_argument(
        "--calib",
        default=None,
        help="calibration text: a .txt/.jsonl file or folder, wiki-sample, wikitext2 or c4",
    )
    q.add_argument("--nsamples", type=int, help="calibration windows")
    q.add_argument("--seqlen", type=int, help="tokens per window, BOS included")
    q.add_argument("--batch-size", type=int, help="calibration windows per forward")
    _bos_flag(q)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--damp", type=float, default=0.01, help="λ of H += λ·mean(diag H)·I")
    q.add_argument("--exponent", type=float, default=4.0, help="p of LeanQuant's U_ii^-p weights")
    q.add_argument("--T", type=int, default=2048, help="affine range-search resolution")
    q.add_argument(
        "--shrink",
        type=float,
        default=None,
        help="affine search limit as a fraction of T (default 0.2/0.3/0.4/0.1 for 4/3/2/8 bits)",
    )
    q.add_argument(
        "--skip",
        action="append",
        default=[],
        help="regex of sublayer names (e.g. 'mlp\\.down_proj') to leave unquantized; repeatable",
    )
    q.add_argument(
        "--device",
        "--devices",
        dest="device",
        default="cpu",
        help="cpu, cuda, cuda:1, or a list such as cuda:0,cuda:1: the first runs the layer "
        "forwards, the second accumulates and factors the Hessians, and each group's rows are "
        "split over all of them (the result is the same for any list)",
    )
    q.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="dtype of layer forwards (and of the calibration activations unless --act-dtype)",
    )
    q.add_argument(
        "--activations",
        default="device",
        choices=PLACES,
        help="where the calibration activations (nsamples x seqlen x hidden) live between uses: "
        "on the first device (fastest), in host RAM, or spilled to the partial output folder "
        "one batch at a time (host memory: one batch)",
    )
    q.add_argument(
        "--act-dtype",
        default=None,
        choices=DTYPES,
        help="dtype the calibration activations are stored in (default: --dtype); bfloat16 "
        "halves them (8.6 GB for 405B at 128 x 2048)",
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument(
        "--resume",
        action="store_true",
        help="continue the partial run of OUT (kept in .OUT.partial next to it after a failure "
        "or kill) after its last finished layer; the model, calibration data and settings "
        "must be the same. The result is byte-identical to an uninterrupted run. Without a "
        "partial run, starts one",
    )
    q.add_argument(
        "--fresh",
        action="store_true",
        help="discard a partial run of OUT and start over (without --resume or --fresh, an "
        "existing partial run is an error)",
    )
    q.add_argument(
        "--max-shard-size",
        type=_size,
        default=4 * 1024**3,
        metavar="SIZE",
        help="largest checkpoint shard, e.g. 4GiB (default), 500MB or a byte count",
    )
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or LeanQuant checkpoint")
    e.add_argument("model", help=f"model or checkpoint folder, or {BUNDLED_MODEL!r}")
    e.add_argument("--data", help="text source (its evaluation split)")
    e.add_argument("--seqlen", type=int, help="tokens per window, BOS included")
    e.add_argument("--max-windows", type=int, help="at most this many windows")
    e.add_argument("--batch-size", type=int, help="windows per forward")
    e.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    _bos_flag(e)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", help="convert a LeanQuant checkpoint to a stock format")
    formats = x.add_subparsers(dest="format", required=True, metavar="FORMAT")
    xc = formats.add_parser(
        "compressed-tensors",
        help="compressed-tensors pack-quantized, loaded by stock vLLM (no plugin)",
    )
    xc.add_argument("checkpoint", help="LeanQuant checkpoint folder")
    xc.add_argument("out", help="output folder (written only when complete)")
    xc.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    xc.set_defaults(func=_cmd_export_compressed_tensors)
    xe = formats.add_parser(
        "exllamav2",
        help="EXL2 (from --grid exl2: 2/3/4/8-bit, tensor parallel) or GPTQ 4-bit (v1 zeros, "
        "layer split only) that exllamav2 loads exactly",
    )
    xe.add_argument("checkpoint", help="LeanQuant checkpoint folder (affine)")
    xe.add_argument(
        "--format",
        dest="target_format",
        default="auto",
        choices=("auto", "exl2", "gptq"),
        help="auto (default): EXL2 for a --grid exl2 checkpoint, else GPTQ",
    )
    xe.add_argument("out", help="output folder (written only when complete)")
    xe.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    xe.set_defaults(func=_cmd_export_exllamav2)

    f = sub.add_parser("fetch-assets", help="fetch the offline SmolLM2 model and Wikipedia sample")
    f.set_defaults(func=_cmd_fetch_assets)

    pl = sub.add_parser(
        "plan",
        help="weights, KV cache and capacity per GPU for serving a model (arithmetic, no GPU)",
        description="Size a LeanQuant checkpoint for serving: checkpoint bytes, weights and KV "
        "cache per GPU, KV-cache capacity in tokens, and whether max_model_len x concurrency "
        "fits. Every assumption is printed with the result (see leanquant_serve/plan.py).",
    )
    pl.add_argument(
        "model",
        help="preset (llama-3.1-8b, llama-3.1-70b, llama-3.1-405b), a config.json, or a model "
        "or checkpoint folder (a checkpoint's quantization_config gives the defaults)",
    )
    pl.add_argument("--bits", type=int, default=None, help="2, 3, 4, 8, or 16 (unquantized)")
    pl.add_argument("--group-size", type=int, default=None, help="default 128; -1: per row")
    pl.add_argument("--grid", default=None, choices=("affine", "nonuniform"))
    pl.add_argument("--engine", default="vllm", choices=("vllm", "exllamav2"))
    pl.add_argument("--gpus", type=int, default=1)
    pl.add_argument(
        "--gpu-mem", type=float, default=80.0, help="GiB per GPU, as nvidia-smi reports it"
    )
    pl.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: --gpus)")
    pl.add_argument("--max-model-len", type=int, default=8192)
    pl.add_argument("--concurrency", type=int, default=1, help="sequences at once (max_num_seqs)")
    pl.add_argument(
        "--kv-dtype", default="fp16", help="vllm: fp16, bf16, fp8; exllamav2: fp16, fp8, q8, q6, q4"
    )
    pl.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    pl.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="default: vLLM's for the GPU size"
    )
    pl.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (vLLM)")
    pl.add_argument(
        "--reserve-gib", type=float, default=None, help="replace the estimated overhead per GPU"
    )
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--check", action="store_true", help="exit with status 1 if it does not fit")
    pl.set_defaults(func=_cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except (UserError, FormatError) as e:
        print(f"leanquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanquant: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
