"""DeepSeek-V3 quantized end to end (issue 15): Multi-head Latent Attention, a first dense layer
then MoE layers with one shared and 8 routed experts (tiny random model, conftest's
``MLA_ARCHITECTURES``), in the hub layout ``save_pretrained`` writes (one tensor per expert
linear) and the fused layout transformers holds in memory (``mlp.experts.gate_up_proj``).

Expectations come from outside the quantizer: the linears from the source file's keys and
hand counts, the expert names from vLLM's own expert-parameter mapping (what deepseek_v2.py's
``load_weights`` matches), the in-memory quantized model from transformers' ``from_pretrained``
on the source tensors with the observed Q put in.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import MLA_ARCHITECTURES, VOCAB, assert_reference_logits_equal, quantize_observed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_moe import fused_copy
from transformers import AutoModelForCausalLM, DeepseekV3Config

from leanquant_serve.format import Checkpoint
from quantizer.gptq import GPTQSettings
from quantizer.model_walk import find_decoder_layers, find_linears, sequential_groups

NSAMPLES, SEQLEN = 4, 32
LAYERS, DENSE, EXPERTS, TOP_K = 3, 1, 8, 2  # layer 0 dense, layers 1-2 MoE
MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ROUTERS = {f"model.layers.{i}.mlp.gate" for i in range(DENSE, LAYERS)}
# act-order with dynamic groups: every linear stores g_idx (the fused parts must agree)
SETTINGS = GPTQSettings(bits=4, group_size=32, blocksize=32, static_groups=False)


def expected_linears() -> set[str]:
    """Every linear of the tiny model, counted by hand from its structure."""
    names = set()
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        names |= {f"{p}.self_attn.{n}" for n in MLA}
        if i < DENSE:
            names |= {f"{p}.mlp.{n}" for n in MLP}
        else:
            names |= {f"{p}.mlp.shared_experts.{n}" for n in MLP}
            names |= {f"{p}.mlp.experts.{e}.{n}" for e in range(EXPERTS) for n in MLP}
    return names


@pytest.fixture(scope="module")
def hub(tiny_model, tmp_path_factory) -> Path:
    """The tiny DeepSeek-V3 as save_pretrained writes it, with each router's
    e_score_correction_bias set to random float32 values (DeepSeek-V3's checkpoints store it in
    float32; transformers initialises it to zero) so that it steers the routing."""
    dest = shutil.copytree(tiny_model("deepseek_v3"), tmp_path_factory.mktemp("ds") / "hub")
    state = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for r in ROUTERS:
        state[f"{r}.e_score_correction_bias"] = torch.randn(EXPERTS, generator=g) * 0.05
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@dataclass
class DsRun:
    layout: str
    src: Path
    out: Path
    Q: dict[str, torch.Tensor]
    report: dict


def quantize(src: Path, out: Path, **kw) -> tuple[dict[str, torch.Tensor], dict]:
    job = dict(settings=SETTINGS, nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=2)
    return quantize_observed(src, out, **{**job, **kw})


_RUNS: dict[tuple, tuple[Path, dict, dict]] = {}  # one quantization per (source, options)


def quantize_once(src: Path, tmp_path_factory, **kw) -> tuple[Path, dict, dict]:
    """(output, observed Q, report) of quantizing ``src`` with ``kw``, run once per module."""
    key = (src, *sorted(kw.items()))
    if key not in _RUNS:
        out = tmp_path_factory.mktemp("out") / "ckpt"
        _RUNS[key] = (out, *quantize(src, out, **kw))
    return _RUNS[key]


CASES = [("hub", "all", {}), ("fused", "routed", {"moe_min_tokens": 8})]


@pytest.fixture(scope="module", params=CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def ds_run(request, hub, calib_text, tmp_path_factory) -> DsRun:
    layout, calibration, kw = request.param
    src = hub if layout == "hub" else fused_copy(hub, tmp_path_factory.mktemp("fused") / "m")
    out, Q, report = quantize_once(
        src, tmp_path_factory, calib=str(calib_text), moe_calibration=calibration, **kw
    )
    return DsRun(layout, src, out, Q, report)


def test_the_layouts_differ_and_the_structure_is_as_configured(ds_run: DsRun, hub: Path):
    keys = set(load_file(ds_run.src / "model.safetensors"))
    assert any(re.search(r"mlp\.experts\.\d+\.gate_proj", k) for k in keys) == (
        ds_run.layout == "hub"
    )
    model = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.bfloat16)
    _, layers = find_decoder_layers(model)
    assert [type(layer.mlp).__name__ for layer in layers] == [
        "DeepseekV3MLP", "DeepseekV3MoE", "DeepseekV3MoE"
    ]  # fmt: skip
    assert len(expected_linears()) == LAYERS * 5 + 3 + (LAYERS - DENSE) * (3 + EXPERTS * 3) == 72


def test_every_linear_is_quantized_and_only_the_routers_stay_dense(ds_run: DsRun, hub: Path):
    ckpt = Checkpoint(ds_run.out)
    ckpt.validate()
    names = set(ckpt.tensor_names())
    quantized = {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}
    hub_state = load_file(hub / "model.safetensors")
    hub_linears = {
        k.removesuffix(".weight")
        for k, v in hub_state.items()
        if ".layers." in k and k.endswith(".weight") and v.dim() == 2
    }
    assert quantized == expected_linears() == hub_linears - ROUTERS
    assert set(ds_run.Q) == quantized  # each observed once (quantize_observed checks)
    # the only dense weights of >= 2 dimensions in the decoder layers: the routers
    dense = {n for n in names if ".layers." in n and n.endswith(".weight") and "norm" not in n}
    assert dense == {f"{r}.weight" for r in ROUTERS}
    assert ROUTERS <= set(ckpt.qcfg.modules_to_not_convert)
    assert {s["name"] for s in ds_run.report["skipped"]} == ROUTERS  # checkpoint names
    # everything not quantized is the source's tensor, bit for bit and in its dtype: the
    # routers' weights and their float32 e_score_correction_bias, norms, embeddings, head
    src = load_file(ds_run.src / "model.safetensors")
    got = {n: ckpt.get(n) for n in names}
    kept = {k for k in hub_state if k.rpartition(".")[0] not in quantized}
    for k in kept:
        want = hub_state[k] if ds_run.layout == "hub" else src[k]
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    assert all(got[f"{r}.e_score_correction_bias"].abs().max() > 0 for r in ROUTERS)
    assert set(got) == kept | {n for n in names if n.rpartition(".")[0] in quantized}


def test_expert_names_are_those_vllm_deepseek_v2_loads(ds_run: DsRun):
    """Each stored expert linear matches exactly one entry of vLLM's expert-parameter mapping
    (built as deepseek_v2.py's load_weights builds it: gate_proj / down_proj / up_proj) and each
    entry one linear per MoE layer; the MLA projections vLLM fuses (fused_qkv_a_proj:
    q_a_proj + kv_a_proj_with_mqa) and the routers' tensors are under the names it reads; the
    config keeps what deepseek_v2.py needs to build the router with its bias."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.layer import fused_moe_make_expert_params_mapping

    mapping = fused_moe_make_expert_params_mapping(
        torch.nn.Module(), ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj",
        ckpt_up_proj_name="up_proj", num_experts=EXPERTS,
    )  # fmt: skip
    ckpt = Checkpoint(ds_run.out)
    names = set(ckpt.tensor_names())
    quantized = {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}
    for i in range(DENSE, LAYERS):
        experts = {n for n in quantized if n.startswith(f"model.layers.{i}.mlp.experts.")}
        assert len(experts) == EXPERTS * 3
        for n in experts:
            hits = [m for m in mapping if m[1] in f"{n}.qweight"]
            assert len(hits) == 1, (n, hits)
        for _, weight_name, _, _ in mapping:
            assert sum(weight_name in f"{n}." for n in experts) == 1, weight_name
        for r in ("weight", "e_score_correction_bias"):
            assert f"model.layers.{i}.mlp.gate.{r}" in names
    for i in range(LAYERS):
        for part in ("q_a_proj", "kv_a_proj_with_mqa"):
            assert f"model.layers.{i}.self_attn.{part}" in quantized
    config = json.loads((ds_run.out / "config.json").read_text())
    assert (config["topk_method"], config["scoring_func"]) == ("noaux_tc", "sigmoid")


def test_reference_model_is_the_source_with_the_observed_weights(
    ds_run: DsRun, hub: Path, tmp_path
):
    ckpt = Checkpoint(ds_run.out)
    for name, Q in ds_run.Q.items():
        assert torch.equal(ckpt.dequantized_weight(name), Q), name
    # transformers' own loader builds the expected model from the hub tensors with Q put in
    expected_dir = shutil.copytree(hub, tmp_path / "expected")
    state = load_file(expected_dir / "model.safetensors")
    assert {f"{n}.weight" for n in ds_run.Q} <= set(state)
    state.update({f"{n}.weight": Q for n, Q in ds_run.Q.items()})
    if ds_run.layout == "fused":  # its source held the routers' bias in bf16
        src = load_file(ds_run.src / "model.safetensors")
        state.update({f"{r}.e_score_correction_bias": src[f"{r}.e_score_correction_bias"]
                      for r in ROUTERS})  # fmt: skip
    assert_reference_logits_equal(state, expected_dir, ds_run.out)


def test_report_counts_every_linear(ds_run: DsRun):
    per_layer = [[r["name"] for r in layer] for layer in ds_run.report["layers"]]
    assert [len(n) for n in per_layer] == [5 + 3] + [5 + 3 + EXPERTS * 3] * (LAYERS - DENSE)
    assert all(len(set(n)) == len(n) for n in per_layer)


# ------------------------------------------------ MLA: q_a and kv_a read one input, one g_idx


def test_mla_projections_of_one_input_form_one_group(hub):
    """q_a_proj and kv_a_proj_with_mqa read the same normed hidden states, with q_b_proj
    called between them: one group (one H, one act-order permutation), placed first."""
    model = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.float32)
    _, layers = find_decoder_layers(model)
    ids = torch.zeros(1, 8, dtype=torch.long)
    want_attn = [
        ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"],
        ["self_attn.q_b_proj"], ["self_attn.kv_b_proj"], ["self_attn.o_proj"],
    ]  # fmt: skip
    for i, mlp in ((0, "mlp"), (1, "mlp.shared_experts")):
        groups = sequential_groups(find_linears(layers[i]), lambda: model(input_ids=ids))
        assert groups == [*want_attn, [f"{mlp}.gate_proj", f"{mlp}.up_proj"], [f"{mlp}.down_proj"]]


def test_fused_qkv_a_parts_store_one_g_idx(ds_run: DsRun):
    """vLLM loads q_a_proj and kv_a_proj_with_mqa into one fused_qkv_a_proj with one g_idx:
    the checkpoint's two g_idx are equal, and a real act-order permutation (not the identity's
    column // group), so that the check can fail."""
    ckpt = Checkpoint(ds_run.out)
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn"
        a, b = ckpt.get(f"{p}.q_a_proj.g_idx"), ckpt.get(f"{p}.kv_a_proj_with_mqa.g_idx")
        assert torch.equal(a, b)
        assert not torch.equal(a, torch.arange(a.numel(), dtype=a.dtype) // 32)
    order = [r["name"] for r in ds_run.report["layers"][0]]
    assert order[:2] == ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"]


# ------------------------------------------------------------- starved experts, RTN, the planner


@pytest.fixture(scope="module")
def hub_all(hub, calib_text, tmp_path_factory) -> Path:
    return quantize_once(hub, tmp_path_factory, calib=str(calib_text), moe_calibration="all")[0]


def test_starved_experts_fall_back_to_their_all_token_hessian(hub, calib_text, tmp_path, hub_all):
    """routed with a minimum no expert reaches: every routed expert linear (2 layers x 8 x 3)
    falls back and is reported with its routed token count, the shared experts never; the
    checkpoint is exactly the all-token one."""
    out = tmp_path / "starved"
    _, report = quantize(
        hub, out, calib=str(calib_text), moe_calibration="routed",
        moe_min_tokens=NSAMPLES * SEQLEN + 1,
    )  # fmt: skip
    fallbacks = report["moe_fallbacks"]
    assert len(fallbacks) == (LAYERS - DENSE) * EXPERTS * 3
    assert not any("shared_experts" in f["name"] for f in fallbacks)
    assert all(0 <= f["tokens"] <= NSAMPLES * SEQLEN for f in fallbacks)
    for i in range(DENSE, LAYERS):  # top-2: each token reaches 2 routed experts
        gate = [
            f["tokens"] for f in fallbacks
            if f["name"].startswith(f"model.layers.{i}.") and f["name"].endswith(".gate_proj")
        ]  # fmt: skip
        assert len(gate) == EXPERTS and sum(gate) == TOP_K * NSAMPLES * SEQLEN
    a, b = load_file(out / "model.safetensors"), load_file(hub_all / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_routed_without_fallback_differs_from_all(hub, calib_text, tmp_path, hub_all):
    out = tmp_path / "routed"
    _, report = quantize(
        hub, out, calib=str(calib_text), moe_calibration="routed", moe_min_tokens=1
    )
    Checkpoint(out).validate()
    a, b = load_file(out / "model.safetensors"), load_file(hub_all / "model.safetensors")
    experts = [k for k in a if ".mlp.experts." in k and k.endswith(".qweight")]
    assert len(experts) == (LAYERS - DENSE) * EXPERTS * 3
    assert any(not torch.equal(a[k], b[k]) for k in experts)
    # up to the first MoE layer's routed experts, nothing changed (later layers see its output)
    for k in a:
        layer = re.search(r"\.layers\.(\d+)\.", k)
        if layer and int(layer[1]) <= DENSE and ".mlp.experts." not in k:
            assert torch.equal(a[k], b[k]), k
    assert all(f["tokens"] == 0 for f in report.get("moe_fallbacks", []))


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}


def test_rtn_quantizes_every_linear_and_the_planner_counts_its_bytes(hub, tmp_path):
    """RTN (no calibration): the same 72 linears; ``leanquant plan`` reads the checkpoint
    (MoE and MLA shapes) and plans the bytes stored, but for the routers' biases."""
    from leanquant_serve.plan import Architecture, PlanInput, plan

    out = tmp_path / "rtn"
    quantize(hub, out, rtn=True)
    names = set(Checkpoint(out).tensor_names())
    assert {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")} == (
        expected_linears()
    )
    stored = 0
    with safe_open(out / "model.safetensors", "pt") as st:
        for name in st.keys():  # noqa: SIM118  (safe_open has no __iter__)
            t = st.get_slice(name)
            stored += math.prod(t.get_shape()) * _DTYPE_BYTES[t.get_dtype()]
    p = plan(PlanInput(str(out), max_model_len=64))
    # the routers' e_score_correction_bias (a persistent buffer, float32 here as in
    # DeepSeek-V3's checkpoints) counted at 4 bytes: MoE layers x experts x 4
    assert p.checkpoint_bytes["total"] == stored
    assert not any("do not cover" in w for w in p.warnings)  # deepseek_v3 is a tested type
    a = Architecture.from_config(MLA_ARCHITECTURES["deepseek_v3"](VOCAB).to_dict(), "ds")
    assert (a.num_experts, a.moe_layers, a.kv_lora_rank, a.qk_rope_head_dim) == (8, 2, 32, 16)
    buffers = [a.kind(i).layer_fp32_buffer_elements for i in range(a.num_layers)]
    assert buffers == [0] * DENSE + [EXPERTS] * (LAYERS - DENSE)


# ----------------------------------------------------------------------------- router settings

ROUTING = {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}  # DeepSeek-V3's config.json


def restated(hub: Path, dest: Path, **routing) -> Path:
    """A copy of ``hub`` whose config.json states ``routing`` instead of DeepSeek's
    topk_method / scoring_func (none: as ``DeepseekV3Config(...).save_pretrained`` writes)."""
    shutil.copytree(hub, dest)
    config = json.loads((dest / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ROUTING} | routing
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_transformers_routes_with_sigmoid_and_the_bias_whatever_the_config_states():
    """The premise of the rule below (transformers 5.19 modeling_deepseek_v3.py): its config
    writes no topk_method / scoring_func, and its router ignores them: sigmoid scores, the
    e_score_correction_bias steering the choice, not the weights (DeepSeek's noaux_tc)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = MLA_ARCHITECTURES["deepseek_v3"](VOCAB).to_dict()
    bare = {k: v for k, v in config.items() if k not in ROUTING}
    assert not set(ROUTING) & set(DeepseekV3Config(**bare).to_dict())
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    results = []
    for stated in ({}, ROUTING, {"topk_method": "greedy", "scoring_func": "softmax"}):
        torch.manual_seed(0)
        router = DeepseekV3TopkRouter(DeepseekV3Config(**bare, **stated)).float()
        torch.nn.init.normal_(router.weight)
        router.e_score_correction_bias[3] = 10.0  # expert 3 chosen for every token
        with torch.no_grad():
            logits, weights, chosen = router(x)
        results.append((weights, chosen))
        assert (chosen == 3).any(-1).all()
        scores = logits.sigmoid().gather(1, chosen)  # the bias is not in the weights
        assert torch.allclose(weights, scores / scores.sum(-1, keepdim=True) * 2.5)
    for weights, chosen in results[1:]:
        assert torch.equal(weights, results[0][0]) and torch.equal(chosen, results[0][1])


def test_a_config_without_the_router_keys_gets_those_transformers_ran(hub, tmp_path, caplog):
    """Saved by transformers, the config states no routing; vLLM's deepseek_v2.py would build
    a softmax router without the bias (its defaults). The checkpoint's config.json states the
    routing that was calibrated, said in one warning; nothing else of the config changes."""
    src = restated(hub, tmp_path / "bare")
    out = tmp_path / "rtn"
    with caplog.at_level("WARNING", logger="quantizer.source"):
        quantize(src, out, rtn=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "quantizer.source"]
    assert len(lines) == 1
    assert "states no topk_method/scoring_func" in lines[0]
    assert "topk_method 'noaux_tc', scoring_func 'sigmoid'" in lines[0]
    written = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert {k: written[k] for k in ROUTING} == ROUTING
    assert {k: v for k, v in written.items() if k not in ROUTING} == (
        source | {"quantization_config": written["quantization_config"]}
    )
    caplog.clear()  # a config stating them (DeepSeek's own) is copied without a word
    with caplog.at_level("WARNING", logger="quantizer.source"):
        quantize(hub, tmp_path / "rtn-stated", rtn=True)
    assert not [r for r in caplog.records if r.name == "quantizer.source"]


@pytest.mark.parametrize(
    "stated", [{"scoring_func": "softmax"}, {**ROUTING, "topk_method": "greedy"}]
)
def test_a_router_transformers_does_not_run_is_refused_in_one_line(stated, hub, tmp_path, capsys):
    from leanquant.cli import main

    src = restated(hub, tmp_path / "other", **stated)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--rtn"]) == 2
    err = capsys.readouterr().err
    key, value = next((k, v) for k, v in stated.items() if ROUTING[k] != v)
    assert err.count("\n") == 1 and err.startswith("leanquant: error: ")
    assert f"{key} {value!r}" in err and "topk_method 'noaux_tc', scoring_func 'sigmoid'" in err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_plan_warns_about_a_config_without_the_router_keys(hub, tmp_path):
    """``leanquant plan`` on such a source says what quantize writes; on a checkpoint made
    without them (before the rule) that vLLM routes otherwise; DeepSeek's own config: nothing."""
    from leanquant_serve.plan import PlanInput, plan

    def routing(model: Path, **kw) -> list[str]:
        warnings = plan(PlanInput(str(model), max_model_len=64, **kw)).warnings
        return [w for w in warnings if "topk_method" in w or "scoring_func" in w]

    src = restated(hub, tmp_path / "bare")
    assert routing(hub, group_size=32) == []
    assert routing(src, group_size=32) == [
        "the config states no topk_method/scoring_func: leanquant quantize writes topk_method "
        "'noaux_tc', scoring_func 'sigmoid' (what transformers runs); served as it is, vLLM "
        "would build a softmax router without e_score_correction_bias"
    ]
    out = tmp_path / "rtn"
    quantize(src, out, rtn=True)
    assert routing(out) == []
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: config[k] for k in config if k not in ROUTING}))
    [line] = routing(out)
    assert "vLLM builds a softmax router" in line and "add topk_method 'noaux_tc'" in line
    assert (
        "scoring_func 'softmax'"
        in routing(restated(hub, tmp_path / "other", scoring_func="softmax"), group_size=32)[0]
    )
