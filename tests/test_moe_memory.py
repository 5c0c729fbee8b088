"""Memory of a Mixture-of-Experts layer's quantization (issue 15 item 3) on the tiny random
Qwen3-MoE (tests/conftest.py: 2 layers, 4 experts, top-2): each expert linear's result goes to
the writer before the next linear is quantized (a group of every expert's gate/up sharing one
H included), the column loop reads each expert linear straight from its fused parameter (no
per-linear copy of the fused tensors), and ``--moe-calibration all`` with a minimum above the
calibration tokens reports no fallback (every expert sees every token: nothing to fall back
to) and writes the same bytes as with a minimum it meets.
"""

from __future__ import annotations

import logging
import weakref

import torch
from conftest import quantize_observed
from safetensors.torch import load_file

from leanquant_serve.format import checkpoint
from quantizer import layer_step
from quantizer.gptq import GPTQSettings

NSAMPLES, SEQLEN, LAYERS, EXPERTS = 4, 32, 2, 4
SETTINGS = GPTQSettings(bits=4, group_size=32, blocksize=32)


def quantize(model, out, calib, **kw):
    job = dict(settings=SETTINGS, nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=2)
    return quantize_observed(model, out, calib=str(calib), **job, **kw)


def test_each_result_reaches_the_writer_before_the_next_weight_is_quantized(
    tiny_model, calib_text, tmp_path, monkeypatch
):
    """Events in order: every column-loop call (one device: one per weight) is followed by
    the writer receiving that weight's qweight before the next call, and no earlier call's
    result (its Q) is still alive when the next begins."""
    events, alive = [], []
    real_quantize, real_add = layer_step.quantize_weight, checkpoint.CheckpointWriter.add

    def quantize_weight(W, *args, **kw):
        held = [r for r in alive if r() is not None]
        events.append(("quantize", len(held)))
        r = real_quantize(W, *args, **kw)
        alive.append(weakref.ref(r.Q))
        return r

    def add(self, tensors):
        events.extend(("write", n) for n in tensors if n.endswith(".qweight"))
        return real_add(self, tensors)

    monkeypatch.setattr(layer_step, "quantize_weight", quantize_weight)
    monkeypatch.setattr(checkpoint.CheckpointWriter, "add", add)
    quantize(tiny_model("qwen3_moe"), tmp_path / "q", calib_text, moe_calibration="all")
    kinds = [e[0] for e in events]
    per_layer = 4 + 3 * EXPERTS  # q, k, v, o and every expert linear
    assert kinds == ["quantize", "write"] * LAYERS * per_layer
    assert all(held == 0 for kind, held in events if kind == "quantize")
    written = [n for kind, n in events if kind == "write"]
    assert len(set(written)) == len(written)
    assert sum(".mlp.experts." in n for n in written) == LAYERS * 3 * EXPERTS


def test_expert_linears_are_quantized_from_their_fused_parameter(
    tiny_model, calib_text, tmp_path, monkeypatch
):
    """Every expert weight the column loop gets shares the storage of its layer's fused
    parameters (a view, no copy)."""
    fused: list[set[int]] = []  # the fused parameters' storages, while their experts are done
    views = []  # per expert weight quantized: a view of them?
    real_experts, real_quantize = layer_step.quantize_experts, layer_step.quantize_weight

    def quantize_experts(run, prefix, i, layer, fe, *args):
        fused.append({p.untyped_storage().data_ptr() for p in fe.params.values()})
        yield from real_experts(run, prefix, i, layer, fe, *args)
        fused.pop()

    def quantize_weight(W, *args, **kw):
        if fused:
            views.append(W.untyped_storage().data_ptr() in fused[-1])
        return real_quantize(W, *args, **kw)

    monkeypatch.setattr(layer_step, "quantize_experts", quantize_experts)
    monkeypatch.setattr(layer_step, "quantize_weight", quantize_weight)
    quantize(tiny_model("qwen3_moe"), tmp_path / "q", calib_text, moe_calibration="routed")
    assert views == [True] * LAYERS * 3 * EXPERTS


def test_all_mode_below_the_minimum_reports_no_fallback(tiny_model, calib_text, tmp_path, caplog):
    """--moe-calibration all sends every calibration token to every expert: with a minimum
    above the calibration tokens nothing falls back (no report entry, a log line saying so)
    and the checkpoint is the one a minimum it meets gives."""
    model = tiny_model("qwen3_moe")
    met, above = tmp_path / "met", tmp_path / "above"
    _, report_met = quantize(model, met, calib_text, moe_calibration="all", moe_min_tokens=1)
    with caplog.at_level(logging.WARNING, logger="quantizer"):
        _, report = quantize(
            model, above, calib_text, moe_calibration="all", moe_min_tokens=NSAMPLES * SEQLEN + 1
        )
    assert "moe_fallbacks" not in report and "moe_fallbacks" not in report_met
    said = [r.getMessage() for r in caplog.records if "nothing to fall back to" in r.getMessage()]
    assert len(said) == LAYERS, said  # once per layer, with the token count
    assert all(f"every one of the {NSAMPLES * SEQLEN} calibration tokens" in m for m in said)
    assert not any("used their all-token Hessian" in r.getMessage() for r in caplog.records)
    a, b = load_file(above / "model.safetensors"), load_file(met / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _load(model_dir, monkeypatch=None):
    """Layer 0 of ``model_dir`` loaded as the pipeline loads it (fp32), and the model names
    SourceModel.get was asked for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantizer.capture import load_layer
    from quantizer.moe import find_fused_experts
    from quantizer.source import SourceModel

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    src = SourceModel(model_dir)
    src.bind(model)
    asked = []
    real = src.get
    src.get = lambda name: asked.append(name) or real(name)
    layer, prefix = model.model.layers[0], "model.layers.0"
    fused = find_fused_experts(model, layer, prefix)
    blocks = layer_step.stored_blocks(fused, prefix)
    load_layer(src, layer, prefix, torch.device("cpu"), torch.float32, set(), blocks)
    return dict(layer.named_parameters()), asked


def test_fused_experts_are_filled_one_stored_linear_at_a_time(tiny_model, tmp_path):
    """Hub layout: the fused parameters are filled from each expert linear's own tensor (never
    asked for whole, so transformers' stacking never runs) and equal what its conversion
    builds; the fused layout is read whole. Both give the same layer."""
    from test_moe import fused_copy

    hub = tiny_model("qwen3_moe")
    fused_dir = fused_copy(hub, tmp_path / "fused")
    got, asked = _load(hub)
    want, asked_fused = _load(fused_dir)
    experts = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert not {f"model.layers.0.{p}" for p in experts} & set(asked)
    assert {f"model.layers.0.{p}" for p in experts} <= set(asked_fused)
    assert got.keys() == want.keys() and experts <= set(got)
    for name in got:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want[name]), name
