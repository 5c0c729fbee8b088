"""Resuming a killed Mixture-of-Experts quantization (issue 15): a tiny random Qwen3-MoE
(2 layers, 4 experts, top-2; tests/conftest.py) killed after its first decoder layer, at the
start of the second or in the middle of its experts, and resumed with ``resume=True`` gives
the same files, byte for byte, as an uninterrupted run, and the same report (the expert
fallbacks of the layer done before the kill included), under ``--moe-calibration all`` and
``routed``. The kill is tests/test_resume.py's: an exception that nothing catches, raised
when the run hands a sublayer to the writer (``layer_step.store_sublayer``), so what is on
disk is what a SIGKILL at that moment leaves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_resume import Killed, assert_same_checkpoint, files_digest, layers_done

from quantizer import layer_step
from quantizer.errors import UserError
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import REPORT_FILE, QuantizeJob, quantize_model

EXPERTS = 4
# routed calibration over 4 x 32 tokens, top-2 of 4 experts: 64 tokens per expert on average,
# so this minimum starves some experts of each layer and not others (checked below)
MIN_TOKENS = 64
STORE_SUBLAYER = layer_step.store_sublayer


def job(model: Path, out: Path, calib: Path, calibration: str, **kw) -> QuantizeJob:
    """Small shards, so that a layer's tensors are flushed in several files mid-layer."""
    return QuantizeJob(
        model=model, out=out, settings=GPTQSettings(bits=4, group_size=32, blocksize=32),
        calib=str(calib), nsamples=4, seqlen=32, batch_size=2, max_shard_bytes=25_000,
        moe_calibration=calibration, moe_min_tokens=MIN_TOKENS, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["all", "routed"])
def reference(request, tiny_model, calib_text, tmp_path_factory) -> tuple[str, Path]:
    """An uninterrupted run of each calibration mode."""
    out = tmp_path_factory.mktemp(f"reference-{request.param}") / "ckpt"
    quantize_model(job(tiny_model("qwen3_moe"), out, calib_text, request.param))
    return request.param, out


def stored_prefixes(monkeypatch, kill_at=None) -> list[str]:
    """Record the sublayer names the run stores; raise Killed at the first one ``kill_at``
    accepts."""
    real, seen = STORE_SUBLAYER, []

    def store(run, prefix, name, *args):
        if kill_at is not None and kill_at(f"{prefix}.{name}"):
            raise Killed
        seen.append(f"{prefix}.{name}")
        return real(run, prefix, name, *args)

    monkeypatch.setattr(layer_step, "store_sublayer", store)
    return seen


def second_layer_start(name: str) -> bool:
    return name.startswith("model.layers.1.")


def second_layer_experts(name: str) -> bool:  # after some of its experts were stored
    return name.startswith("model.layers.1.mlp.experts.2.")


@pytest.mark.parametrize("kill_at", [second_layer_start, second_layer_experts])
def test_killed_after_the_first_layer_resumes_identically(
    kill_at, reference, tiny_model, calib_text, tmp_path, monkeypatch
):
    calibration, want = reference
    model = tiny_model("qwen3_moe")
    out, partial = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    first = stored_prefixes(monkeypatch, kill_at)
    with pytest.raises(Killed):
        quantize_model(job(model, out, calib_text, calibration))
    assert layers_done(partial) == 1 and not out.exists()
    assert any(n.startswith("model.layers.0.mlp.experts.") for n in first)
    if kill_at is second_layer_experts:  # the kill came in the middle of layer 1's experts
        assert any(n.startswith("model.layers.1.mlp.experts.") for n in first)

    resumed = stored_prefixes(monkeypatch)
    # another calibration mode may not continue it, and leaves it untouched
    other = {"all": "routed", "routed": "all"}[calibration]
    before = files_digest(partial)
    with pytest.raises(UserError, match=f"moe_calibration: '{calibration}' -> '{other}'"):
        quantize_model(job(model, out, calib_text, other, resume=True))
    assert files_digest(partial) == before

    assert resumed == []
    quantize_model(job(model, out, calib_text, calibration, resume=True))
    # the resumed run did only the second layer, all of it: 4 attention linears + 3 per expert
    assert resumed and all(n.startswith("model.layers.1.") for n in resumed)
    assert len(resumed) == 4 + 3 * EXPERTS
    assert_same_checkpoint(out, want)


def test_routed_reference_has_fallbacks_in_both_layers(reference):
    """The routed case above resumes a report whose first layer has starved experts (and
    experts that were not): what the journal must carry across the kill."""
    calibration, want = reference
    fallbacks = json.loads((want / REPORT_FILE).read_text()).get("moe_fallbacks", [])
    if calibration == "all":
        assert fallbacks == []
        return
    for i in (0, 1):
        starved = {f["name"] for f in fallbacks if f["name"].startswith(f"model.layers.{i}.")}
        assert 0 < len(starved) < 3 * EXPERTS, starved
        assert all(0 <= f["tokens"] < MIN_TOKENS for f in fallbacks)
