"""benchmarks/moe.py: the Qwen3-30B-A3B shape it claims, the synthetic model it writes, the
arithmetic of its summary, and (slow) the whole script on a tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import moe as bench  # noqa: E402


def test_the_shape_is_qwen3_30b_a3b():
    """Qwen/Qwen3-30B-A3B's config.json: hidden 2048, 32 query / 4 KV heads of 128, 128
    experts of intermediate 768, top-8; one layer's parameters counted by hand."""
    cfg = bench.config("qwen3-30b-a3b", 48)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        2048, 32, 4, 128,
    )  # fmt: skip
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (128, 8, 768)
    assert cfg.norm_topk_prob and cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1
    h, q, kv, e, i = 2048, 32 * 128, 4 * 128, 128, 768
    attention = h * q + 2 * h * kv + q * h + 2 * 128  # q, k, v, o and the q/k norms
    experts = e * 3 * i * h
    assert bench.layer_params("qwen3-30b-a3b") == attention + experts + e * h + 2 * h
    assert bench.FULL_LAYERS["qwen3-30b-a3b"] == 48


def test_written_model_has_hub_names_one_shard_per_layer(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    bench.write_model(one, "tiny", 1)
    bench.write_model(two, "tiny", 2)
    index = json.loads((two / "model.safetensors.index.json").read_text())["weight_map"]
    experts = bench.SHAPES["tiny"]["num_experts"]
    for i in range(2):
        shard = {f for n, f in index.items() if n.startswith(f"model.layers.{i}.")}
        assert len(shard) == 1  # the layer is one file, and only it is in that file
        assert {n for n, f in index.items() if f in shard} == {
            n for n in index if n.startswith(f"model.layers.{i}.")
        }
        for e in range(experts):  # the hub layout: one tensor per expert linear
            for p in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{i}.mlp.experts.{e}.{p}.weight" in index
    assert not any("gate_up_proj" in n for n in index)
    # layer 0 (and the embeddings) do not depend on how many layers follow
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    with (
        safe_open(one / "model-00002-of-00002.safetensors", "pt") as a,
        safe_open(two / index[name], "pt") as b,
    ):
        x, y = a.get_tensor(name), b.get_tensor(name)
    assert x.dtype == torch.bfloat16 and x.shape == (128, 128) and torch.equal(x, y)
    assert 0.015 < float(x.float().std()) < 0.025


def test_a_reduced_layer_has_fewer_experts_of_the_same_shape():
    """--experts: the same linears, fewer of them (top-k at most the experts), named apart."""
    assert bench.shape_config("qwen3-30b-a3b", 16)["num_experts"] == 16
    assert bench.shape_config("qwen3-30b-a3b", 16)["num_experts_per_tok"] == 8
    assert bench.shape_config("qwen3-30b-a3b", 4)["num_experts_per_tok"] == 4
    assert bench.shape_config("qwen3-30b-a3b") == bench.SHAPES["qwen3-30b-a3b"]
    full, reduced = bench.layer_params("qwen3-30b-a3b"), bench.layer_params("qwen3-30b-a3b", 16)
    assert full - reduced == (128 - 16) * (3 * 768 * 2048 + 2048)  # experts and router rows
    assert bench.tag("qwen3-30b-a3b", 16) == "qwen3-30b-a3b-e16"
    assert bench.tag("qwen3-30b-a3b") == "qwen3-30b-a3b"


def test_runs_of_two_checkouts_are_summarized_apart_and_traced_steps_tabled():
    def run(code, peak, phases):
        trace = {"peak_rss_bytes": peak, "peak_phase": max(phases, key=phases.get),
                 "phases": phases}  # fmt: skip
        return {"mode": "all", "code": code, "layers": 1, "seconds": 10.0,
                "child_cpu_seconds": 20.0, "peak_rss_bytes": peak, "quantize_seconds": 5.0,
                "expert_linears_quantized": 24, "fallbacks": 0, "fallback_tokens": [],
                "load_before": [1.0], "load_after": [2.0], "rss_trace": trace}  # fmt: skip

    gib = 1 << 30
    runs = [
        run("old", 6 * gib, {"column loop 768x2048": 6 * gib, "load layer": 2 * gib}),
        run("new", 3 * gib, {"column loop 768x2048": 2 * gib, "load layer": 3 * gib}),
    ]
    summary = bench.summarize(runs, 48)
    assert sorted(summary) == ["all, new", "all, old"]
    assert summary["all, old"]["peak_rss_bytes_by_layers"] == {"1": 6 * gib}
    settings = {"shape": "qwen3-30b-a3b-e8", "experts": 8, "moe_intermediate_size": 768,
                "top_k": 8, "hidden_size": 2048, "layer_params": gib // 4, "bits": 4,
                "group_size": 128, "nsamples": 2, "seqlen": 128, "moe_min_tokens": 64,
                "grid": "minmax", "skip": "self_attn"}  # fmt: skip
    machine = {"cpu": "x", "avx512f": True, "logical_cpus": 2, "torch_threads": 2,
               "ram_bytes": 8 * gib, "torch": "2"}  # fmt: skip
    md = bench.markdown({"command": "c", "machine": machine, "settings": settings,
                         "full_layers": 48, "runs": runs, "summary": summary})  # fmt: skip
    text = "\n".join(md)
    assert "| all | old | 1 | 10 | 20 | 5 | 6.00 | 6.00 | 24 of 24 | 0 |" in text
    assert "| all | new | 1 | 10 | 20 | 5 | 3.00 | 3.00 | 24 of 24 | 0 |" in text
    assert "| column loop 768x2048 | 6.00* | 2.00 |" in text  # * the run's peak step
    assert "| load layer | 2.00 | 3.00* |" in text
    assert "minmax grid" in text and "--skip self_attn (left dense)" in text


def test_summary_arithmetic():
    runs = [
        {
            "mode": "all",
            "layers": 1,
            "seconds": 100.0,
            "child_cpu_seconds": 150.0,
            "peak_rss_bytes": 4 << 30,
        },
        {
            "mode": "all",
            "layers": 2,
            "seconds": 180.0,
            "child_cpu_seconds": 300.0,
            "peak_rss_bytes": 5 << 30,
        },
        {
            "mode": "routed",
            "layers": 1,
            "seconds": 150.0,
            "child_cpu_seconds": 250.0,
            "peak_rss_bytes": 6 << 30,
        },
    ]
    s = bench.summarize(runs, 48)
    assert s["all"]["seconds_per_layer"] == 90.0  # the 2-layer run
    assert s["all"]["projected_seconds"] == 90.0 * 48
    assert s["all"]["cpu_seconds_per_layer"] == 150.0
    assert s["all"]["projected_cpu_seconds"] == 150.0 * 48
    assert s["all"]["marginal_seconds_per_layer"] == 80.0
    assert s["all"]["projected_seconds_marginal"] == 100.0 + 80.0 * 47
    assert s["all"]["peak_rss_ratio"] == 1.25
    assert s["routed"] == {
        "seconds_per_layer": 150.0,
        "projected_seconds": 150.0 * 48,
        "cpu_seconds_per_layer": 250.0,
        "projected_cpu_seconds": 250.0 * 48,
        "peak_rss_bytes_by_layers": {"1": 6 << 30},
    }


@pytest.mark.slow  # the script end to end: three leanquant quantize processes
def test_tiny_end_to_end(tmp_path):
    nsamples, seqlen = 4, 32
    # routed with a minimum above the calibration tokens: every expert linear falls back
    common = [sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--shape", "tiny",
              "--nsamples", str(nsamples), "--seqlen", str(seqlen),
              "--moe-min-tokens", str(nsamples * seqlen + 1),
              "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results")]  # fmt: skip

    def bench_run(*args: str) -> str:
        p = subprocess.run([*common, *args], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    bench_run("--layers", "1", "--modes", "all,routed")
    # a second invocation adds the 2-layer row and reuses the 1-layer runs
    out = bench_run("--layers", "1,2", "--modes", "all")
    assert out.count("$ ") == 1 and "all, 1 layer(s): cached in" in out
    result = json.loads((tmp_path / "results" / "moe-tiny-layer.json").read_text())
    shape = bench.SHAPES["tiny"]
    experts, top_k = shape["num_experts"], shape["num_experts_per_tok"]
    runs = {(r["mode"], r["layers"]): r for r in result["runs"]}
    assert list(runs) == [("all", 1), ("routed", 1), ("all", 2)]
    for (mode, layers), r in runs.items():
        assert r["expert_linears_quantized"] == layers * experts * 3
        assert r["sublayers"] == layers * (4 + experts * 3)  # q, k, v, o + the experts
        assert r["peak_rss_bytes"] > 0 and r["child_cpu_seconds"] > 0
        if mode == "all":  # every expert sees every token: below the minimum, nothing to
            # fall back to, and nothing is reported as fallen back
            assert r["fallbacks"] == 0 and r["fallback_tokens"] == []
        else:  # every expert linear, with its routed tokens: top-k of every token, per linear
            assert r["fallbacks"] == layers * experts * 3
            assert sum(r["fallback_tokens"]) == layers * 3 * top_k * nsamples * seqlen
    s = result["summary"]
    assert s["all"]["projected_seconds"] == pytest.approx(runs["all", 2]["seconds"] / 2 * 48)
    assert s["all"]["peak_rss_bytes_by_layers"] == {
        "1": runs["all", 1]["peak_rss_bytes"],
        "2": runs["all", 2]["peak_rss_bytes"],
    }
    assert "marginal_seconds_per_layer" not in s["routed"]
    md = (tmp_path / "results" / "moe-tiny-layer.md").read_text()
    code = runs["routed", 1]["code"]
    assert f"| routed | {code} | 1 |" in md and f"| {experts * 3} of {experts * 3} |" in md
    assert not list((tmp_path / "work").glob("moe-bench-tiny.*"))  # checkpoints removed


@pytest.mark.slow  # a leanquant quantize process
def test_rss_phases_counts_each_step(tmp_path, tiny_model, calib_text):
    trace, out = tmp_path / "trace.json", tmp_path / "ckpt"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rss_phases.py"), str(trace), "quantize",
           str(tiny_model("qwen3_moe")), str(out), "--calib", str(calib_text), "--nsamples", "4",
           "--seqlen", "32", "--group-size", "32"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    t = json.loads(trace.read_text())
    assert t["rc"] == 0 and (out / "quantize_report.json").exists()
    phases = t["phases"]
    assert t["peak_rss_bytes"] == max(phases.values()) == phases[t["peak_phase"]]
    assert {"load layer", "Hessian", "factor H", "pack and check", "writer", "next inputs"} <= set(
        phases
    )
    assert any(p.startswith("column loop ") for p in phases)
    # (ru_maxrss and a psutil sample are two counters of the kernel's: not compared)
    assert 0 < t["first_layer_rss_bytes"] <= t["peak_rss_bytes"] and t["ru_maxrss_bytes"] > 0
