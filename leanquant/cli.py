"""``leanquant``: quantize a Hugging Face model with LeanQuant, evaluate it, fetch the offline assets.

Ctrl-C and SIGTERM end any command with one line on stderr saying what was kept (exit codes 130
and 143), wherever they land: :func:`main` installs the SIGTERM handler before anything heavy
is imported (torch and transformers take a minute to import on a loaded machine), so this
module imports only light modules at the top and the rest where it is used.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from quantizer.errors import UserError  # (light: neither imports torch)
from quantizer.flags import add_flags, given

log = logging.getLogger("leanquant")
BUNDLED_MODEL = "smollm2"  # SmolLM2-135M-Instruct, fetched offline through pip (see assets)


def _bundled_model_names() -> list[str]:
    from quantizer.assets import BUNDLED_MODELS

    return list(BUNDLED_MODELS)


def _bundled_names() -> str:
    return ", ".join(repr(n) for n in _bundled_model_names())


def _cmd_quantize(a: argparse.Namespace) -> None:
    from leanquant_serve.format import check_output
    from quantizer.gptq import GPTQSettings
    from quantizer.pipeline import QuantizeJob, quantize_model

    from .api import quantize_job

    out = Path(a.out)
    try:  # the dataclasses validate their fields and the combinations (UserError: ValueError)
        job = quantize_job(
            a.model, out, GPTQSettings(**given(a, GPTQSettings)), **given(a, QuantizeJob)
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    check_output(out, job.overwrite, flag="--overwrite")  # before any work
    s = quantize_model(job)  # interrupted: main() says where the partial run was kept
    worst = max(
        ((i, r) for i, layer in enumerate(s.layers) for r in layer), key=lambda x: x[1].loss
    )
    # RTN's loss is Σ (w − q)², not the calibrated runs' Σ (w − q)²/U_ii²: labelled apart
    loss = "total weight error (unweighted)" if s.loss_measure else "total loss error"
    print(
        f"wrote {s.out} in {s.seconds:.1f} s, peak RSS {s.peak_rss_bytes / 2**30:.2f} GiB"
        + (f", peak GPU {s.peak_gpu_bytes / 2**30:.2f} GiB" if s.peak_gpu_bytes else "")
        + f"; {loss} {s.total_loss:.4g}, largest layer {worst[0]} {worst[1].name} "
        f"{worst[1].loss:.4g}; Cholesky retries {s.cholesky_retries} (details: quantize_report.json)"
    )
    print(_coverage_line(s))
    refit = [r.refit_loss for layer in s.layers for r in layer if r.refit_loss]
    if refit:
        before, after = (sum(x) for x in zip(*refit, strict=True))
        print(
            f"refit: layer-wise loss Σ (w − q)ᵀ H (w − q) {before:.4g} -> {after:.4g} "
            f"({100 * (after / before - 1):+.1f}%)"
        )
    print(
        ("weight error per layer (unweighted): " if s.loss_measure else "loss error per layer: ")
        + ", ".join(f"{i}: {sum(r.loss for r in layer):.3g}" for i, layer in enumerate(s.layers))
    )
    for d in s.dropped:  # e.g. DeepSeek-V3's multi-token-prediction layer
        print(f"not written: {d['name']} ({d['tensors']} tensors), {d['why']}")


def _coverage_line(s) -> str:
    """What a quantize run (Summary ``s``) quantized and kept 16-bit, in one line: linears
    quantized (expert linears among them, and those on their all-token Hessian), then what
    the report's ``skipped`` holds by kind (routers, expert gates, --skip, modules beside a
    multimodal wrapper's text decoder). Embeddings, norms and the head are always 16-bit."""
    n = sum(len(layer) for layer in s.layers)
    parts = []
    if s.expert_linears:
        parts.append(f"{s.expert_linears} of them expert linears")
    if s.moe_fallbacks:
        parts.append(
            f"{len(s.moe_fallbacks)} expert linears on their all-token Hessian (too few routed "
            "tokens: moe_fallbacks)"
        )
    line = f"quantized {n} linears" + (f" ({'; '.join(parts)})" if parts else "")
    kinds = {"routers": 0, "expert gates": 0, "by --skip": 0}
    beside = []
    for e in s.skipped:
        if "parameters" in e:
            beside.append(e["name"])
        elif e["why"] == "--skip":
            kinds["by --skip"] += 1
        elif e["why"].startswith("router"):
            kinds["routers"] += 1
        else:
            kinds["expert gates"] += 1
    kept = [f"{k} {what}" for what, k in kinds.items() if k]
    kept += [f"{', '.join(beside)} (outside the text decoder)"] if beside else []
    return line + (
        f"; kept 16-bit besides embeddings, norms and head: {', '.join(kept)}" if kept else ""
    )


def _cmd_eval(a: argparse.Namespace) -> None:
    from quantizer.evaluate import EvalJob

    from .api import evaluate

    r = evaluate(a.model, **given(a, EvalJob))
    bos = "" if r["bos_token_id"] is None else ", each beginning with BOS"
    ref = (
        ""
        if "ref" not in r
        else f"; against {r['ref']} (perplexity {r['ref_perplexity']:.3f}): KL "
        f"{r['kl_to_ref']:.4f} nats per token, top-1 agreement {100 * r['top1_agreement']:.1f}%"
    )
    print(
        json.dumps(r)
        if a.json
        else f"{r['model']}: perplexity {r['perplexity']:.3f} on {r['tokens']} tokens "
        f"({r['windows']} windows of {r['seqlen']}{bos}) of {r['data']}{ref}"
    )
    for task, metrics in r.get("tasks", {}).items() if not a.json else ():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _cmd_fetch_assets(a: argparse.Namespace) -> None:
    from quantizer.assets import bundled_model_dir, wiki_splits

    models = [bundled_model_dir(name) for name in a.models or [BUNDLED_MODEL]]
    wiki = wiki_splits()
    print(
        "".join(f"model: {m}\n" for m in models)
        + f"calibration text: {wiki.calib}\nevaluation text: {wiki.eval}"
    )


def _export(a: argparse.Namespace, name: str, target: str, **kw):
    """The API's ``export(name, checkpoint, out)`` with the CLI's refusals: an existing output
    without --overwrite, and what the target cannot hold exactly (ExportError), as one-line
    errors."""
    from leanquant_serve.export import ExportError
    from leanquant_serve.format import check_output

    from .api import export

    out = Path(a.out)
    check_output(out, a.overwrite, flag="--overwrite")
    try:
        return export(name, a.checkpoint, out, overwrite=a.overwrite, **kw)
    except ExportError as e:
        raise UserError(f"cannot export {a.checkpoint} {target}: {e}") from e


def _cmd_export_compressed_tensors(a: argparse.Namespace) -> None:
    r = _export(a, "compressed-tensors", "as compressed-tensors")
    w = r.quantization_config["config_groups"]["group_0"]["weights"]
    grouping = f"group size {w['group_size']}" if w["strategy"] == "group" else "per channel"
    print(
        f"wrote {r.out}: {r.layers} linears as compressed-tensors pack-quantized "
        f"W{w['num_bits']}A16, {'symmetric' if w['symmetric'] else 'asymmetric'}, {grouping}"
    )


def _cmd_export_bnb_nf4(a: argparse.Namespace) -> None:
    r = _export(a, "bnb-nf4", "as bitsandbytes NF4")
    print(
        f"wrote {r.out}: {r.layers} linears as bitsandbytes NF4, blocksize "
        f"{'/'.join(map(str, r.blocksizes))}, "
        f"compute dtype {r.quantization_config['bnb_4bit_compute_dtype']}"
    )


def _cmd_export_exllamav2(a: argparse.Namespace) -> None:
    r = _export(a, "exllamav2", "for exllamav2", format=a.target_format)
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
                expert_parallel=a.expert_parallel,
            )
        )
    except PlanError as e:
        raise UserError(str(e)) from e
    print(json.dumps(r.to_dict(), indent=2) if a.json else format_plan(r))
    if a.check and not r.fits:
        raise SystemExit(1)


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as every other error of this CLI: one line, exit code 2
    (subcommand parsers are made of the same class)."""

    def error(self, message: str):
        self.exit(2, f"leanquant: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from quantizer.evaluate import EvalJob
    from quantizer.gptq import GPTQSettings
    from quantizer.pipeline import QuantizeJob

    p = _Parser(prog="leanquant", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model folder into a LeanQuant checkpoint")
    q.add_argument(
        "model",
        help=f"Hugging Face model folder, or a bundled model ({_bundled_names()}; "
        "see fetch-assets)",
    )
    q.add_argument(
        "out",
        help="output checkpoint folder (appears only when complete; after a failure or a kill "
        "the finished layers stay in the hidden .OUT.partial next to it, for --resume)",
    )
    add_flags(q, GPTQSettings)
    add_flags(q, QuantizeJob)
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or LeanQuant checkpoint")
    e.add_argument(
        "model", help=f"model or checkpoint folder, or a bundled model ({_bundled_names()})"
    )
    add_flags(e, EvalJob)
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
    xb = formats.add_parser(
        "bnb-nf4",
        help="bitsandbytes pre-quantized NF4 (from --grid nf --bits 4, groups of 64), loaded by "
        "transformers with bitsandbytes, exactly",
    )
    xb.add_argument("checkpoint", help="LeanQuant checkpoint folder (--grid nf --bits 4)")
    xb.add_argument("out", help="output folder (written only when complete)")
    xb.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    xb.set_defaults(func=_cmd_export_bnb_nf4)

    f = sub.add_parser(
        "fetch-assets",
        help="fetch the offline Wikipedia sample and bundled models (default: SmolLM2-135M)",
    )
    f.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        choices=_bundled_model_names(),
        help=f"bundled model to fetch instead of {BUNDLED_MODEL!r} (repeatable): "
        f"{_bundled_names()}",
    )
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
        help="preset (llama-3.1-8b, llama-3.1-70b, llama-3.1-405b, mixtral-8x22b, "
        "qwen3-235b-a22b, deepseek-v3), a config.json, or a model "
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
    pl.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="default 8192, capped at the model's max_position_embeddings",
    )
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
        "--expert-parallel",
        action="store_true",
        help="MoE: whole experts per rank (vLLM --enable-expert-parallel) instead of each "
        "expert split over the tensor-parallel ranks",
    )
    pl.add_argument(
        "--reserve-gib", type=float, default=None, help="replace the estimated overhead per GPU"
    )
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--check", action="store_true", help="exit with status 1 if it does not fit")
    pl.set_defaults(func=_cmd_plan)

    from leanquant.demo import add_parser as add_demo_parser  # quantize, eval, serve, ask

    add_demo_parser(sub)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by :func:`main`'s handler as Ctrl-C raises
    KeyboardInterrupt, so that a terminated run unwinds the same way (a quantization's partial
    run kept or removed, its lock released) instead of ending without a word."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run the ``leanquant`` command ``argv`` (default: ``sys.argv[1:]``). Returns 0, or 2 after
    a user error (one line ``leanquant: error: ...`` on stderr), 130 after Ctrl-C and 143 after
    SIGTERM (one line: ``leanquant: interrupted; `` or ``leanquant: terminated (SIGTERM); ``
    then where the partial run was kept and how to resume it, or that nothing was written).
    SIGTERM's handler is installed (main thread only) for the call and restored after it."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return _main(argv)
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        # the quantizer notes where it kept a partial run (quantizer.pipeline._user_errors)
        kept = "; ".join(getattr(e, "__notes__", ())) or "nothing was written"
        print(f"leanquant: {what}; {kept}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    from leanquant_serve.format import FormatError  # (imports torch)

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
