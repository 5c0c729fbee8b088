"""Memory benchmark: quantize a synthetic Llama-shaped model larger than half of this machine's
RAM with ``leanquant quantize`` and report its peak resident memory next to the model's size,
one decoder layer's size and the calibration activations' size.

    python benchmarks/memory.py --shape llama3-8b --rtn      # all 32 layers, round to nearest
    python benchmarks/memory.py --shape llama3-8b --layers 2 # LeanQuant with calibration, 2 layers
    python benchmarks/memory.py --shape tiny                 # seconds; what the test runs

On this 2-core CPU a calibrated layer of the 8B shape takes minutes (GPTQ's column loop over
14336 columns), so the whole 32-layer model is measured with ``--rtn`` (the same streaming,
writer and shard handling, no activations or Hessians) and the calibrated path on the first
``--layers`` layers of the same model (a view of its shards): one layer at a time means the
peak does not grow with the number of layers, which the two runs show side by side.

The model (random bf16 weights, written one layer per shard so that writing it is bounded
too) goes to ``--model-dir`` (default runs/synthetic-<shape>, reused when present); its
tokenizer is the bundled SmolLM2's (token ids fit any vocabulary this large). The quantizer
runs as a subprocess; its memory is sampled from /proc every 0.2 s (VmRSS split into
anonymous memory and mapped file pages) and its kernel-reported peak (ru_maxrss of the child)
is the headline figure. A loader that holds the whole model, as the paper's reference does,
needs at least the model's size: the ratio column compares with that.
Results: benchmarks/results/memory-<shape>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantizer.activations import PLACES  # noqa: E402

SHAPES = {  # hidden, intermediate, heads, kv heads, layers, vocab
    "llama3-8b": (4096, 14336, 32, 8, 32, 128256),  # Llama-3.1-8B
    "tiny": (128, 384, 4, 2, 3, 49152),
}


def write_model(path: Path, shape: str, layers: int, seed: int = 0) -> None:
    """A Llama with random bf16 weights, one safetensors shard per decoder layer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from quantizer.assets import smollm2_dir

    hidden, inter, heads, kv, _, vocab = SHAPES[shape]
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=vocab,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    head_dim = hidden // heads
    shards = [  # (file contents) in order: embeddings, layers..., final norm + head
        lambda: {"model.embed_tokens.weight": rand(vocab, hidden)},
        *[
            (lambda i=i: {
                f"model.layers.{i}.{k}": v
                for k, v in {
                    "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                    "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                    "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                    "self_attn.k_proj.weight": rand(kv * head_dim, hidden),
                    "self_attn.v_proj.weight": rand(kv * head_dim, hidden),
                    "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                    "mlp.gate_proj.weight": rand(inter, hidden),
                    "mlp.up_proj.weight": rand(inter, hidden),
                    "mlp.down_proj.weight": rand(hidden, inter),
                }.items()
            })
            for i in range(layers)
        ],
        lambda: {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                 "lm_head.weight": rand(vocab, hidden)},
    ]  # fmt: skip
    weight_map, total = {}, 0
    for n, make in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"\rwriting {path.name}: shard {n}/{len(shards)}", end="", flush=True)
    print()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(tmp)
    tmp.rename(path)


def layer_view(full: Path, path: Path, layers: int) -> None:
    """The first ``layers`` decoder layers of ``full`` (one shard per layer) as a model folder
    of symlinks: no second copy of the weights."""
    from transformers import AutoConfig

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = json.loads((full / "model.safetensors.index.json").read_text())
    keep = {
        n: f
        for n, f in index["weight_map"].items()
        if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers
    }
    for f in sorted(set(keep.values())):
        (tmp / f).symlink_to((full / f).resolve())
    index = {"metadata": {}, "weight_map": keep}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg = AutoConfig.from_pretrained(full)
    cfg.num_hidden_layers = layers
    cfg.save_pretrained(tmp)
    for f in full.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, tmp / f.name)
    tmp.rename(path)


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of a process, in bytes (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def quantize(model: Path, out: Path, flags: list[str]) -> dict:
    """Run ``leanquant quantize`` on ``model``; its time and memory."""
    cmd = [sys.executable, "-m", "leanquant.cli", "quantize", str(model), str(out), *flags]
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status(p.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = p.wait()
    done.set()
    sampler.join()
    if rc != 0:
        sys.exit(f"benchmarks/memory.py: leanquant quantize failed ({rc})")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    return {
        "seconds": time.time() - t,
        "peak_rss_bytes": maxrss,  # kernel-reported peak of the child
        "sampled_peak_anon_bytes": peaks["RssAnon"],
        "sampled_peak_file_bytes": peaks["RssFile"],
        "sampled_peak_hwm_bytes": peaks["VmHWM"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="quantize only the first N decoder layers")
    ap.add_argument("--rtn", action="store_true", help="round to nearest (no calibration)")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--grid", default="affine")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--activations", default="disk", choices=PLACES)
    ap.add_argument("--act-dtype", default="bfloat16")
    ap.add_argument("--max-shard-size", default="4GiB")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the quantized checkpoint")
    a = ap.parse_args()

    hidden, inter, heads, kv, all_layers, vocab = SHAPES[a.shape]
    full = a.model_dir or ROOT / "runs" / f"synthetic-{a.shape}-{all_layers}l"
    if not full.exists():
        write_model(full, a.shape, all_layers)
    full_bytes = sum(f.stat().st_size for f in full.glob("*.safetensors"))
    n_layers, model = all_layers, full
    if a.layers and a.layers < all_layers:
        n_layers, model = a.layers, full.with_name(f"{full.name}-first{a.layers}")
        if not model.exists():
            layer_view(full, model, a.layers)
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    head_dim = hidden // heads
    layer_params = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    act_bytes = a.nsamples * a.seqlen * hidden * getattr(torch, a.act_dtype).itemsize

    out = full.parent / f"memory-bench-{a.shape}"  # removed afterwards unless --keep
    flags = ["--grid", a.grid, "--group-size", str(a.group_size),
             "--max-shard-size", a.max_shard_size, "--overwrite", "--fresh"]  # fmt: skip
    if a.rtn:
        flags.append("--rtn")
        act_bytes = 0
    else:
        flags += ["--calib", "wiki-sample", "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                  "--activations", a.activations, "--act-dtype", a.act_dtype]  # fmt: skip
    r = quantize(model, out, flags)
    report = json.loads((out / "quantize_report.json").read_text())
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if not a.keep:
        shutil.rmtree(out)

    gib = 2**30
    result = {
        "machine_ram_bytes": ram,
        "model": str(model), "shape": a.shape, "layers": n_layers, "rtn": a.rtn,
        "model_bytes": model_bytes, "full_model_bytes": full_bytes,
        "layer_bytes_bf16": layer_params * 2, "layer_bytes_fp32": layer_params * 4,
        "activation_bytes": act_bytes, "report_activation_bytes": report.get("activation_bytes"),
        "quantized_bytes": out_bytes, "flags": flags, **r,
        "torch": torch.__version__,
    }  # fmt: skip
    what = "round to nearest" if a.rtn else f"LeanQuant {a.grid} with calibration"
    cmd = f"python benchmarks/memory.py --shape {a.shape}" + (f" --layers {n_layers}" if a.layers else "")
    cmd += f" --grid {a.grid}" if a.grid != "affine" else ""
    cmd += f" --max-shard-size {a.max_shard_size}" if a.max_shard_size != "4GiB" else ""
    cmd += " --rtn" if a.rtn else f" --nsamples {a.nsamples} --seqlen {a.seqlen} --activations {a.activations} --act-dtype {a.act_dtype}"
    act = "none (RTN)" if a.rtn else f"{a.nsamples} x {a.seqlen} x {hidden}, {a.act_dtype}"
    lines = [
        f"## {a.shape}-shaped, {n_layers} of {all_layers} layers, {what}",
        "",
        f"`{cmd}` (passes `{' '.join(flags)}` to `leanquant quantize`)",
        "",
        "| what | GiB | x this run's model |",
        "|---|---|---|",
        f"| this machine's RAM | {ram / gib:.2f} | {ram / model_bytes:.2f} |",
        f"| the whole synthetic model on disk (bf16, {all_layers} layers) | {full_bytes / gib:.2f} | {full_bytes / model_bytes:.2f} |",
        f"| this run's model (bf16, {n_layers} layers + embeddings + head) | {model_bytes / gib:.2f} | 1.00 |",
        f"| one decoder layer, bf16 / fp32 (the compute dtype here) | {layer_params * 2 / gib:.2f} / {layer_params * 4 / gib:.2f} | {layer_params * 4 / model_bytes:.3f} |",
        f"| calibration activations ({act}) | {act_bytes / gib:.3f} | {act_bytes / model_bytes:.4f} |",
        f"| **peak RSS of `leanquant quantize`** (ru_maxrss) | **{r['peak_rss_bytes'] / gib:.2f}** | **{r['peak_rss_bytes'] / model_bytes:.3f}** |",
        f"| sampled peak: anonymous / mapped file pages | {r['sampled_peak_anon_bytes'] / gib:.2f} / {r['sampled_peak_file_bytes'] / gib:.2f} | |",
        "",
        f"Took {r['seconds'] / 60:.1f} min (4-bit, {a.grid}, group {a.group_size}); the checkpoint is"
        f" {out_bytes / gib:.2f} GiB. A loader that materialises the whole model (the paper's"
        " reference) needs at least the model's size in RAM: 1.00 in the last column.",
    ]
    a.out.mkdir(parents=True, exist_ok=True)
    tag = f"memory-{a.shape}-{n_layers}l" + ("-rtn" if a.rtn else "")
    tag += f"-shard{a.max_shard_size}" if a.max_shard_size != "4GiB" else ""
    (a.out / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
