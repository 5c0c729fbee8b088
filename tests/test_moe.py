"""Mixture-of-Experts checkpoints (issue 15 items 1-3) on tiny random Mixtral, Qwen3-MoE and
Qwen2-MoE (shared expert) models, 4 experts, top-2, in the hub layout (one tensor per expert
linear, what transformers' save_pretrained writes) and the fused layout transformers holds in
memory (``mlp.experts.gate_up_proj`` (E, 2I, H)).

Expectations are computed independently of the quantizer: expert names from the source
files' keys, the in-memory quantized model loaded by transformers' own from_pretrained from
the source tensors with the observed Q substituted.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_reference_logits_equal, quantize_observed
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from leanquant_serve.format import Checkpoint
from quantizer import layer_step, moe
from quantizer.errors import UserError
from quantizer.gptq import GPTQSettings

NSAMPLES, SEQLEN = 4, 32
LAYERS, EXPERTS = 2, 4
# each architecture's per-expert checkpoint linears (vLLM's expert_params_mapping names)
EXPERT_LINEARS = {
    "mixtral": r"block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)",
    "qwen3_moe": r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)",
    "qwen2_moe": r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)",
}
ROUTER = {"mixtral": "block_sparse_moe.gate", "qwen3_moe": "mlp.gate", "qwen2_moe": "mlp.gate"}
SETTINGS = GPTQSettings(bits=4, group_size=32, blocksize=32)


def fused_copy(hub: Path, dest: Path) -> Path:
    """The hub-layout model ``hub`` saved with the names transformers holds in memory."""
    shutil.copytree(hub, dest)
    model = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight.data
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@dataclass
class MoeRun:
    arch: str
    src: Path
    hub: Path  # the same weights in the hub layout
    out: Path
    Q: dict[str, torch.Tensor]
    report: dict
    calibration: str  # --moe-calibration


def quantize(src: Path, out: Path, **kw) -> tuple[dict[str, torch.Tensor], dict]:
    job = dict(settings=SETTINGS, nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=2)
    return quantize_observed(src, out, **job, **kw)


CASES = [
    ("mixtral", "hub", "all"),
    ("mixtral", "fused", "routed"),
    ("qwen3_moe", "hub", "routed"),
    ("qwen3_moe", "fused", "all"),
    ("qwen2_moe", "hub", "all"),
]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def moe_run(request, tiny_model, calib_text, tmp_path_factory) -> MoeRun:
    arch, layout, calibration = request.param
    hub = tiny_model(arch)
    src = hub if layout == "hub" else fused_copy(hub, tmp_path_factory.mktemp("fused") / "m")
    out = tmp_path_factory.mktemp("out") / "ckpt"
    Q, report = quantize(src, out, calib=str(calib_text), moe_calibration=calibration)
    return MoeRun(arch, src, hub, out, Q, report, calibration)


def test_source_layouts_differ(moe_run: MoeRun):
    """The fixture's two layouts really are different files."""
    keys = set(load_file(moe_run.src / "model.safetensors"))
    hub = any(re.search(EXPERT_LINEARS[moe_run.arch], k) for k in keys)
    assert hub == (moe_run.src == moe_run.hub)


def test_every_expert_linear_is_quantized_under_the_hub_names(moe_run: MoeRun):
    ckpt = Checkpoint(moe_run.out)
    ckpt.validate()
    names = set(ckpt.tensor_names())
    hub_experts = {
        k.removesuffix(".weight")
        for k in load_file(moe_run.hub / "model.safetensors")
        if re.search(EXPERT_LINEARS[moe_run.arch], k)
    }
    assert len(hub_experts) == LAYERS * EXPERTS * 3
    for e in hub_experts:
        assert f"{e}.qweight" in names and f"{e}.scales" in names, e
        assert f"{e}.weight" not in names, e
    assert hub_experts <= set(moe_run.Q)
    assert not any(re.search(r"experts\.(gate_up_proj|down_proj)", n) for n in names)
    # every weight of at least 2 dimensions in the decoder layers is quantized, except routers
    dense = {n for n in names if n.endswith(".weight") and ".layers." in n and "norm" not in n}
    routers = {f"model.layers.{i}.{ROUTER[moe_run.arch]}.weight" for i in range(LAYERS)}
    if moe_run.arch == "qwen2_moe":
        routers |= {f"model.layers.{i}.mlp.shared_expert_gate.weight" for i in range(LAYERS)}
        for i in range(LAYERS):  # the shared expert is a normal MLP: quantized
            for p in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{i}.mlp.shared_expert.{p}.qweight" in names
    assert dense == routers
    not_converted = set(ckpt.qcfg.modules_to_not_convert)
    assert {r.removesuffix(".weight") for r in routers} <= not_converted
    # the report names them as the checkpoint does (not transformers' in-memory mlp.gate)
    reported = {s["name"] for s in moe_run.report["skipped"]}
    assert reported == {r.removesuffix(".weight") for r in routers}


def test_reference_model_is_the_source_with_the_observed_weights(moe_run: MoeRun, tmp_path):
    ckpt = Checkpoint(moe_run.out)
    for name, Q in moe_run.Q.items():
        assert torch.equal(ckpt.dequantized_weight(name), Q), name
    # transformers' own loader builds the expected model from the hub tensors with Q put in
    expected_dir = shutil.copytree(moe_run.hub, tmp_path / "expected")
    state = load_file(expected_dir / "model.safetensors")
    assert {f"{n}.weight" for n in moe_run.Q} <= set(state)
    state.update({f"{n}.weight": Q.to(torch.float32) for n, Q in moe_run.Q.items()})
    assert_reference_logits_equal(state, expected_dir, moe_run.out)


def test_report_counts_every_expert_linear(moe_run: MoeRun):
    reported = {r["name"] for layer in moe_run.report["layers"] for r in layer}
    per_layer = {m.group(0) for n in reported if (m := re.search(EXPERT_LINEARS[moe_run.arch], n))}
    assert len(per_layer) == EXPERTS * 3
    assert all(len(layer) == len(moe_run.report["layers"][0]) for layer in moe_run.report["layers"])


def test_calibration_settings_recorded(moe_run: MoeRun):
    """config.json's quantizer metadata holds the MoE calibration beside calib; a routed run's
    report holds every expert linear's routed token count and their min/median/max."""
    meta = Checkpoint(moe_run.out).qcfg.quantizer
    calibration = moe_run.calibration
    assert meta["calib"] and meta["moe_min_tokens"] == 64
    assert meta["moe_calibration"] == calibration
    reports = [r for layer in moe_run.report["layers"] for r in layer]
    experts = [r for r in reports if re.search(EXPERT_LINEARS[moe_run.arch], r["name"])]
    assert moe_run.report["expert_linears"] == len(experts) == LAYERS * EXPERTS * 3
    if calibration == "all":
        assert not any("routed_tokens" in r for r in reports)
        assert "moe_routed_tokens" not in moe_run.report
        return
    tokens = sorted(r["routed_tokens"] for r in experts)
    assert not any("routed_tokens" in r for r in reports if r not in experts)
    # top-2 of 4 experts: each token reaches two experts, each expert's 3 linears see the same
    assert sum(tokens) == LAYERS * 3 * 2 * NSAMPLES * SEQLEN
    stats = moe_run.report["moe_routed_tokens"]
    assert (stats["min"], stats["max"]) == (tokens[0], tokens[-1])
    assert stats["median"] == (tokens[len(tokens) // 2 - 1] + tokens[len(tokens) // 2]) / 2
    fallen = {f["name"]: f["tokens"] for f in moe_run.report.get("moe_fallbacks", [])}
    by_name = {
        f"model.layers.{i}.{r['name']}": r.get("routed_tokens")
        for i, layer in enumerate(moe_run.report["layers"])
        for r in layer
    }
    assert all(by_name[n] == t for n, t in fallen.items())


@pytest.fixture(scope="module")
def mixtral_all(tiny_model, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("all") / "ckpt"
    quantize(tiny_model("mixtral"), out, calib=str(calib_text), moe_calibration="all")
    return out


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def test_starved_experts_fall_back_to_their_all_token_hessian(
    tiny_model, calib_text, tmp_path, mixtral_all
):
    """routed with a minimum no expert reaches: every expert linear falls back, is reported,
    and the checkpoint is exactly the all-token one (the same Hessians)."""
    out = tmp_path / "starved"
    _, report = quantize(
        tiny_model("mixtral"), out, calib=str(calib_text), moe_calibration="routed",
        moe_min_tokens=NSAMPLES * SEQLEN + 1,
    )  # fmt: skip
    fallbacks = report["moe_fallbacks"]
    assert len(fallbacks) == LAYERS * EXPERTS * 3
    assert all(0 < f["tokens"] <= NSAMPLES * SEQLEN for f in fallbacks)
    # top-2 of 4: each token reaches 2 experts, so the routed tokens of one layer's experts
    # add up to 2 x the calibration tokens (counted once per expert: its w1 entry)
    w1 = [
        f["tokens"]
        for f in fallbacks
        if f["name"].startswith("model.layers.0.") and f["name"].endswith("w1")
    ]
    assert sum(w1) == 2 * NSAMPLES * SEQLEN
    a, b = _tensors(out), _tensors(mixtral_all)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_experts_calibrated_one_at_a_time_give_the_same_bytes(
    tiny_model, calib_text, tmp_path, mixtral_all, monkeypatch
):
    """A per-expert Hessian budget below one expert's: one expert per pass (routed, every
    expert starved: the shared input H handed out once per expert), the same checkpoint."""
    monkeypatch.setattr(moe, "EXPERT_HESSIAN_BYTES", 1)
    passes = []
    real = layer_step.ExpertFeeds.hessians
    monkeypatch.setattr(
        layer_step.ExpertFeeds, "hessians",
        lambda self, params, route, experts=None: passes.append(experts) or real(self, params, route, experts),
    )  # fmt: skip
    out = tmp_path / "one-by-one"
    _, report = quantize(
        tiny_model("mixtral"), out, calib=str(calib_text), moe_calibration="routed",
        moe_min_tokens=NSAMPLES * SEQLEN + 1,
    )  # fmt: skip
    assert len(report["moe_fallbacks"]) == LAYERS * EXPERTS * 3
    assert {len(e) for e in passes} == {1}
    a, b = _tensors(out), _tensors(mixtral_all)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_routed_and_all_differ_and_both_validate(tiny_model, calib_text, tmp_path, mixtral_all):
    out = tmp_path / "routed"
    _, report = quantize(
        tiny_model("mixtral"),
        out,
        calib=str(calib_text),
        moe_calibration="routed",
        moe_min_tokens=1,
    )
    assert "moe_fallbacks" not in report
    Checkpoint(out).validate()
    Checkpoint(mixtral_all).validate()
    a, b = _tensors(out), _tensors(mixtral_all)
    experts = [k for k in a if ".experts." in k and k.endswith(".qweight")]
    assert experts and any(not torch.equal(a[k], b[k]) for k in experts)


def test_an_unrecognised_large_weight_is_an_error_unless_skipped(
    tiny_model, calib_text, tmp_path, monkeypatch
):
    monkeypatch.setattr(layer_step, "find_fused_experts", lambda *a: [])  # experts unrecognised
    with pytest.raises(UserError) as e:
        quantize(tiny_model("mixtral"), tmp_path / "a", calib=str(calib_text))
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(
        r"model\.layers\.0\.mlp\.experts\.\w+_proj \(4, \d+, \d+\) \(\d+\.\d% of the layer", msg
    ), msg
    assert "--skip" in msg
    out = tmp_path / "b"
    _, report = quantize(tiny_model("mixtral"), out, calib=str(calib_text), skip=(r"mlp\.experts",))
    skipped = {s["name"]: s for s in report["skipped"]}
    for i in range(LAYERS):  # under the checkpoint's per-expert names, each its share
        for e in range(EXPERTS):
            for w in ("w1", "w2", "w3"):
                s = skipped[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}"]
                assert s["why"] == "--skip" and 0.002 < s["share"] < 0.25
    assert not any("mlp.experts" in n for n in skipped)
    names = set(Checkpoint(out).tensor_names())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names  # dense, hub names
    assert not any(".experts." in n and n.endswith(".qweight") for n in names)
    assert (
        "model.layers.1.block_sparse_moe.experts.0.w1"
        in Checkpoint(out).qcfg.modules_to_not_convert
    )


def test_skipping_the_experts_keeps_them_dense(tiny_model, calib_text, tmp_path):
    out = tmp_path / "c"
    _, report = quantize(
        tiny_model("qwen3_moe"), out, calib=str(calib_text), skip=(r"mlp\.experts",)
    )
    ckpt = Checkpoint(out)
    ckpt.validate()
    src = load_file(tiny_model("qwen3_moe") / "model.safetensors")
    got = _tensors(out)
    for k, v in src.items():
        if ".experts." in k:
            assert torch.equal(got[k], v), k
    assert any(s["why"] == "--skip" for s in report["skipped"])


def test_rtn_quantizes_every_expert(tiny_model, tmp_path):
    out = tmp_path / "rtn"
    quantize(tiny_model("qwen3_moe"), out, rtn=True)
    names = set(Checkpoint(out).tensor_names())
    assert (
        sum(1 for n in names if ".experts." in n and n.endswith(".qweight")) == LAYERS * EXPERTS * 3
    )


SKIP_CASES = [  # (architecture, --skip, expert linears kept dense per layer)
    ("mixtral", r"block_sparse_moe\.experts", EXPERTS * 3),  # checkpoint names
    ("mixtral", r"mlp\.experts", EXPERTS * 3),  # transformers' in-memory names
    ("mixtral", r"experts\.\d+\.w[123]$", EXPERTS * 3),  # every expert linear, one by one
    ("qwen3_moe", r"mlp\.experts\.\d+\.", EXPERTS * 3),
    ("mixtral", r"self_attn\.o_proj", 0),
]


@pytest.mark.parametrize("arch,skip,dense", SKIP_CASES, ids=[c[1] for c in SKIP_CASES])
def test_skip_matches_checkpoint_or_model_names(tiny_model, tmp_path, arch, skip, dense):
    out = tmp_path / "out"
    _, report = quantize(tiny_model(arch), out, rtn=True, skip=(skip,))
    names = set(Checkpoint(out).tensor_names())
    experts = {n.rpartition(".")[0] for n in names if re.search(EXPERT_LINEARS[arch], n)}
    kept = {n.removesuffix(".weight") for n in names if n.endswith(".weight")}
    assert len(experts & kept) == LAYERS * dense
    assert len(experts - kept) == LAYERS * (EXPERTS * 3 - dense)  # the rest quantized
    skipped = {s["name"] for s in report["skipped"] if s["why"] == "--skip"}
    assert skipped == {n for n in kept if ".layers." in n and "norm" not in n} - {
        f"model.layers.{i}.{ROUTER[arch]}" for i in range(LAYERS)
    }
    assert skipped <= set(Checkpoint(out).qcfg.modules_to_not_convert)
    if "o_proj" in skip:
        assert skipped == {f"model.layers.{i}.self_attn.o_proj" for i in range(LAYERS)}


@pytest.mark.parametrize(
    "skip,count",
    [(r"experts\.1\.", 3), (r"experts\.\d+\.w2", EXPERTS), (r"\.w1$", EXPERTS)],
)
def test_skip_of_part_of_fused_experts_is_refused(tiny_model, tmp_path, skip, count):
    with pytest.raises(UserError) as e:
        quantize(tiny_model("mixtral"), tmp_path / "out", rtn=True, skip=(skip,))
    msg = str(e.value)
    assert "\n" not in msg and f"--skip '{skip}' matches" in msg
    assert f"matches {count} of the {EXPERTS * 3} expert linears" in msg
    assert "model.layers.0.mlp.experts" in msg
    assert msg.endswith(r"--skip 'block_sparse_moe\.experts\.' keeps them all")
    assert not (tmp_path / "out").exists()


def test_skip_matching_nothing_is_refused(tiny_model, tmp_path):
    with pytest.raises(UserError) as e:
        quantize(tiny_model("qwen3_moe"), tmp_path / "out", rtn=True, skip=(r"mlp\.expertz",))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(r"--skip 'mlp\.expertz' matches no linear or weight of the decoder")
    assert "mlp.experts.0.gate_proj" in msg and "mlp.gate" in msg
    assert not (tmp_path / "out").exists()


def test_skip_of_a_router_by_its_checkpoint_name(tiny_model, tmp_path):
    """A router (transformers 5's Mixtral: mlp.gate, not an nn.Linear) is kept anyway; a regex
    naming it as the checkpoint does matches it, so it is not refused as matching nothing."""
    _, report = quantize(
        tiny_model("mixtral"), tmp_path / "out", rtn=True, skip=(r"block_sparse_moe\.gate",)
    )
    assert {s["name"] for s in report["skipped"]} == {
        f"model.layers.{i}.block_sparse_moe.gate" for i in range(LAYERS)
    }
