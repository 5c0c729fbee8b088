"""The streaming quantization job on tiny random models of every supported architecture.

Expectations are computed here, independently of the pipeline: the original model with the
observed quantized weights substituted, the source safetensors, hooks on the original model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import SUPPORTED
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from leanquant_serve.format import (
    QUANT_SUFFIXES,
    Checkpoint,
    FormatError,
    load_reference_model,
    unpack_linear,
)
from quantizer import layer_step, pipeline
from quantizer.data import load_text, random_windows, tokenize
from quantizer.errors import UserError
from quantizer.gptq import GPTQSettings
from quantizer.model_walk import (
    find_decoder_layers,
    find_linears,
    sequential_groups,
    shared_input_groups,
)
from quantizer.pipeline import REPORT_FILE, QuantizeJob, quantize_model

NSAMPLES, SEQLEN = 8, 48  # SEQLEN exceeds the sliding window (16) of Mistral and Gemma

# (actorder, static_groups): plain GPTQ order, act-order with g_idx, act-order with static groups.
ORDERS = {"plain": (False, False), "actorder": (True, False), "static": (True, True)}
GRID_GROUP = {"minmax": 32, "affine": 32, "nonuniform": -1}
# Every architecture with every grid; the column orders rotate so each architecture and each
# grid meets all three of them without the full cross product.
CASES = [
    (arch, grid, list(ORDERS)[(i + j) % len(ORDERS)])
    for i, arch in enumerate(SUPPORTED)
    for j, grid in enumerate(GRID_GROUP)
]


def settings(grid: str, order: str = "plain", **kw) -> GPTQSettings:
    actorder, static = ORDERS[order]
    return GPTQSettings(
        bits=4,
        group_size=GRID_GROUP[grid],
        fit=grid,
        actorder=actorder,
        static_groups=static,
        blocksize=32,
        **kw,
    )


def load_original(path: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def decoder_linears(model: nn.Module) -> set[str]:
    """Every nn.Linear except the output head: the decoder linears of the tested architectures."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def input_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@dataclass
class Run:
    src: Path
    out: Path
    settings: GPTQSettings
    Q: dict[str, torch.Tensor]  # sublayer name -> dense quantized weight seen by the observer
    W: dict[str, torch.Tensor] | None = None  # sublayer name -> the W given to quantize_weight
    H: dict[str, torch.Tensor] | None = None  # sublayer name -> the H its group factored


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def run(request, tiny_model, calib_text, tmp_path_factory) -> Run:
    arch, grid, order = request.param
    src, s = tiny_model(arch), settings(grid, order)
    out = tmp_path_factory.mktemp("out") / "ckpt"
    Q: dict[str, torch.Tensor] = {}
    W: dict[str, torch.Tensor] = {}
    H: dict[str, torch.Tensor] = {}
    given_W, group_H = [], []  # quantize_weight's W in call order; the current group's H

    def spy_prepare(h, s):
        group_H[:] = [h.H.clone()]
        return real_prepare(h, s)

    def spy(W, prep, s, rows=None):
        assert rows == (0, W.shape[0])  # one device: whole weights
        given_W.append(W.clone())
        return real(W, prep, s, rows)

    def observer(name, r):  # called per sublayer in group order, after the group's loop
        assert name not in Q, f"{name} quantized twice"
        Q[name] = r.Q.clone()
        W[name], H[name] = given_W.pop(0), group_H[0]

    real, real_prepare = layer_step.quantize_weight, layer_step.prepare
    job = QuantizeJob(
        model=src,
        out=out,
        settings=s,
        calib=str(calib_text),
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        batch_size=2,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_step, "quantize_weight", spy)
        mp.setattr(layer_step, "prepare", spy_prepare)
        quantize_model(job, observer)
    assert not given_W
    return Run(src, out, s, Q, W, H)


def test_checkpoint_validates_and_describes_the_settings(run: Run):
    ckpt = Checkpoint(run.out)
    ckpt.validate()
    q = ckpt.qcfg
    assert (q.bits, q.group_size) == (4, run.settings.group_size)
    assert q.grid == ("nonuniform" if run.settings.fit == "nonuniform" else "affine")
    assert (q.desc_act, q.static_groups) == (run.settings.actorder, run.settings.static_groups)
    uses_g_idx = run.settings.actorder and not run.settings.static_groups and q.group_size != -1
    assert any(n.endswith(".g_idx") for n in ckpt.tensor_names()) == uses_g_idx
    report = json.loads((run.out / REPORT_FILE).read_text())
    assert sum(len(layer) for layer in report["layers"]) == len(run.Q)


def test_reference_model_is_the_original_with_the_observed_weights(run: Run):
    ckpt = Checkpoint(run.out)
    expected = load_original(run.src)
    assert set(run.Q) == decoder_linears(expected)
    for name, Q in run.Q.items():
        assert torch.equal(ckpt.dequantized_weight(name), Q), name
    state = expected.state_dict()
    state.update({f"{n}.weight": Q for n, Q in run.Q.items()})
    expected.load_state_dict(state)
    ids = input_ids(expected.config.vocab_size)
    want = logits(expected, ids)
    got = logits(load_reference_model(run.out), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_hessians_come_from_the_quantized_upstream(run: Run, calib_text):
    """True-sequential GPTQ: each sublayer's H is built from the inputs it gets in the original
    model with every quantized weight substituted (later sublayers do not change its input),
    on the calibration windows; its W is the original weight."""
    model = load_original(run.src)
    state = model.state_dict()
    for name, W in run.W.items():
        assert torch.equal(W, state[f"{name}.weight"]), name
    state.update({f"{n}.weight": Q for n, Q in run.Q.items()})
    model.load_state_dict(state)
    tokens = tokenize(AutoTokenizer.from_pretrained(run.src), load_text(str(calib_text)))
    windows = random_windows(tokens, NSAMPLES, SEQLEN, run.settings.seed)
    sums = {n: torch.zeros(H.shape, dtype=torch.float64) for n, H in run.H.items()}

    def accumulate(name):
        def hook(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] += x.T @ x

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(accumulate(n)) for n in sums]
    for batch in windows.split(2):
        logits(model, batch)
    for h in handles:
        h.remove()
    for name, H in run.H.items():
        expected = (2 / windows.numel() * sums[name]).float()  # H = (2/n) Σ x xᵀ
        scale = float(expected.diag().mean())
        torch.testing.assert_close(H, expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_only_decoder_linears_are_quantized(run: Run):
    ckpt = Checkpoint(run.out)
    names = set(ckpt.tensor_names())
    linears = decoder_linears(load_original(run.src))
    for name in linears:
        assert f"{name}.qweight" in names and f"{name}.weight" not in names, name
    source = load_file(run.src / "model.safetensors")
    kept = {n: t for n, t in source.items() if n.removesuffix(".weight") not in linears}
    assert any("embed" in n for n in kept) and any("norm" in n for n in kept)
    for name, t in kept.items():  # embeddings, norms, biases, lm_head: exactly as in the source
        stored = ckpt.get(name)
        assert stored.dtype == t.dtype == torch.bfloat16 and torch.equal(stored, t), name
    quantized = {f"{n}.{s}" for n in linears for s in QUANT_SUFFIXES}
    assert names - quantized == set(kept)
    assert ckpt.qcfg.is_skipped("lm_head")


def text_windows(src: Path, text: Path, n: int | None = None) -> torch.Tensor:
    """Consecutive SEQLEN-token windows of ``text`` (the first ``n``, or all)."""
    ids = AutoTokenizer.from_pretrained(src)(text.read_text())["input_ids"]
    windows = torch.tensor(ids[: len(ids) // SEQLEN * SEQLEN]).view(-1, SEQLEN)
    return windows[:n]


def test_quantized_model_is_close_to_the_original_but_not_equal(run: Run, calib_text):
    original = load_original(run.src)
    ids = text_windows(run.src, calib_text, 4)  # GPTQ fits the calibration distribution
    want, got = logits(original, ids), logits(load_reference_model(run.out), ids)
    assert not torch.equal(got, want)
    corr = torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]
    assert corr > 0.95, f"logits correlation {corr:.3f}"
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.3, f"relative logits error {rel:.3f}"
    weights = original.state_dict()
    for name, Q in run.Q.items():
        W = weights[f"{name}.weight"]
        rel = float((Q - W).norm() / W.norm())
        assert 0.01 < rel < 0.25, f"{name}: relative weight error {rel:.3f}"


# ----------------------------------------------------------------------------- model walk


@pytest.mark.parametrize("arch", SUPPORTED)
def test_true_sequential_groups(arch, tiny_model):
    model = load_original(tiny_model(arch))
    name, layers = find_decoder_layers(model)
    assert name == "model.layers" and len(layers) == model.config.num_hidden_layers
    groups = sequential_groups(find_linears(layers[0]), lambda: model(input_ids=input_ids(64)))
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("arch", SUPPORTED)
def test_shared_input_groups_of_a_skeleton_match_the_real_model(arch, tiny_model):
    """The exporters' and the plugin's fused groups come from one traced pass of a weightless
    (meta) skeleton; they must be the real model's multi-member sequential groups, every layer."""
    model = load_original(tiny_model(arch))
    name, layers = find_decoder_layers(model)
    want = []
    for i, layer in enumerate(layers):
        groups = sequential_groups(find_linears(layer), lambda: model(input_ids=input_ids(64)))
        want += [[f"{name}.{i}.{n}" for n in g] for g in groups if len(g) > 1]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    assert shared_input_groups(skeleton) == want
    assert len(want) == 2 * len(layers)  # q/k/v and gate/up of every layer


def test_shared_input_groups_say_when_a_model_cannot_be_traced():
    class NoMeta(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, input_ids):
            x = torch.zeros(1, 4, device=input_ids.device)
            float(x.sum())  # data-dependent: no meta kernel gives a value
            return self.a(x) + self.b(x)

    with torch.device("meta"):
        m = NoMeta()
    with pytest.raises(UserError, match=r"cannot trace NoMeta to find the linears that share"):
        shared_input_groups(m)
    assert shared_input_groups(NoMeta()) == [["a", "b"]]


class SharedAndReused(nn.Module):
    """a and b read the same tensor; c reads a tensor that is then changed in place for d."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        t = x.clone()
        y = self.a(t) + self.b(t)
        t = torch.zeros_like(y)
        self.c(t)
        t.add_(y)  # same memory, shape and strides; different values
        return self.d(t)


def test_sequential_groups_tell_in_place_updates_apart():
    block = SharedAndReused()
    linears = dict(block.named_children())
    groups = sequential_groups(linears, lambda: block(torch.randn(3, 8)))
    assert groups == [["a", "b"], ["c"], ["d"]]


class NoDecoderStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))


def test_model_without_decoder_stack_is_refused():
    with pytest.raises(UserError, match=r"NoDecoderStack.*found none.*blocks: ModuleList"):
        find_decoder_layers(NoDecoderStack())


@pytest.mark.parametrize("rtn", [True, False])
def test_conv1d_blocks_are_refused(rtn, tiny_model, calib_text, tmp_path):
    job = QuantizeJob(
        model=tiny_model("gpt2"),
        out=tmp_path / "out",
        settings=settings("minmax"),
        rtn=rtn,
        calib=str(calib_text),
        nsamples=2,
        seqlen=16,
    )
    with pytest.raises(UserError, match=r"GPT2LMHeadModel.*transformer\.h \(GPT2Block\).*Conv1D"):
        quantize_model(job)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- output safety


def marker_folder(path: Path) -> Path:
    path.mkdir()
    (path / "marker").write_text("old")
    return path


def test_failure_midway_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    calls = []

    def fail_after_first(*args, **kw):
        if calls:
            raise RuntimeError("boom")
        calls.append(args)
        return real(*args, **kw)

    real = layer_step.quantize_weight
    monkeypatch.setattr(layer_step, "quantize_weight", fail_after_first)
    job = QuantizeJob(
        model=tiny_model("llama"), out=tmp_path / "out", settings=settings("minmax"), rtn=True
    )
    with pytest.raises(RuntimeError, match="boom"):
        quantize_model(job)
    assert len(calls) == 1 and list(tmp_path.iterdir()) == []

    # With overwrite, a failed run keeps the previous output as it was.
    marker_folder(tmp_path / "out")
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        quantize_model(replace(job, overwrite=True))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["marker"]


def test_existing_output_needs_overwrite(tiny_model, tmp_path):
    out = marker_folder(tmp_path / "out")
    job = QuantizeJob(model=tiny_model("llama"), out=out, settings=settings("minmax"), rtn=True)
    with pytest.raises((UserError, FormatError), match="exists"):
        quantize_model(job)
    assert [p.name for p in out.iterdir()] == ["marker"]
    quantize_model(replace(job, overwrite=True))
    assert not (out / "marker").exists()
    Checkpoint(out).validate()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ----------------------------------------------------------------------------- RTN vs GPTQ


@pytest.fixture(scope="module")
def rtn_run(tiny_model, tmp_path_factory) -> Run:
    src, s = tiny_model("llama"), settings("minmax", "static")
    out = tmp_path_factory.mktemp("rtn") / "ckpt"
    Q: dict[str, torch.Tensor] = {}
    quantize_model(
        QuantizeJob(model=src, out=out, settings=s, rtn=True),
        lambda name, r: Q.__setitem__(name, r.Q.clone()),
    )
    return Run(src, out, s, Q)


def test_rtn_needs_no_calibration_and_rounds_to_nearest(rtn_run: Run):
    ckpt = Checkpoint(rtn_run.out)
    ckpt.validate()
    assert ckpt.qcfg.desc_act is False and "calib" not in ckpt.qcfg.quantizer
    source = load_file(rtn_run.src / "model.safetensors")
    assert set(rtn_run.Q) == set(ckpt.quantized_prefixes())
    for name in ckpt.quantized_prefixes():
        W = source[f"{name}.weight"].float()
        Q = ckpt.dequantized_weight(name)
        assert torch.equal(Q, rtn_run.Q[name])
        # Every stored grid point of the weight's (group, row), from the stored scales/zeros:
        # RTN must pick the nearest one for every weight.
        t, G = ckpt.linear_tensors(name), rtn_run.settings.group_size
        scales = t["scales"].float().t().repeat_interleave(G, dim=1)  # (out, in)
        zeros = unpack_linear(ckpt.qcfg, t)["zeros"].t().repeat_interleave(G, dim=1).float()
        codes = torch.arange(2.0**rtn_run.settings.bits)[:, None, None]
        levels = (codes - zeros) * scales  # (2^bits, out, in)
        nearest = (levels - W).abs().min(dim=0).values
        assert torch.all((Q - W).abs() <= nearest + 1e-7), name


def layer0_inputs(src: Path, calib_text: Path, name: str) -> torch.Tensor:
    """Inputs of sublayer ``name`` of the original model over the calibration text."""
    model = load_original(src)
    windows = text_windows(src, calib_text)
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    logits(model, windows)
    handle.remove()
    return torch.cat(seen).reshape(-1, seen[0].shape[-1])


def test_gptq_beats_rtn_on_layer_output_error(rtn_run: Run, calib_text, tmp_path):
    name = "model.layers.0.self_attn.q_proj"  # its input does not depend on other quantized layers
    Q = {}
    job = QuantizeJob(
        model=rtn_run.src,
        out=tmp_path / "out",
        settings=rtn_run.settings,
        calib=str(calib_text),
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
    )
    quantize_model(job, lambda n, r: Q.__setitem__(n, r.Q))
    X = layer0_inputs(rtn_run.src, calib_text, name)
    W = load_file(rtn_run.src / "model.safetensors")[f"{name}.weight"].float()

    def err(Q):
        return float((X @ (W - Q).T).norm())

    assert err(Q[name]) < 0.9 * err(rtn_run.Q[name])


# ----------------------------------------------------------------------------- streaming


def test_streams_one_decoder_layer_at_a_time(tiny_model, calib_text, tmp_path, monkeypatch):
    found = {}

    def spy(model):
        found["model"] = model
        found["name"], found["layers"] = real(model)
        return found["name"], found["layers"]

    real = pipeline.find_decoder_layers
    monkeypatch.setattr(pipeline, "find_decoder_layers", spy)

    def materialised(module: nn.Module) -> bool:
        return any(p.device.type != "meta" for p in module.parameters())

    seen: dict[str, list[int]] = {}

    def observer(name, _r):
        layers = found["layers"]
        seen[name] = [i for i, layer in enumerate(layers) if materialised(layer)]
        assert not materialised(found["model"].get_output_embeddings()), "lm_head was loaded"

    job = QuantizeJob(
        model=tiny_model("llama"),
        out=tmp_path / "out",
        settings=settings("minmax"),
        calib=str(calib_text),
        nsamples=2,
        seqlen=SEQLEN,
    )
    quantize_model(job, observer)
    n = len(found["layers"])
    assert len(seen) == 7 * n
    for name, loaded in seen.items():
        index = int(name.removeprefix(found["name"] + ".").split(".")[0])
        assert loaded == [index], f"during {name}: layers {loaded} materialised"
    assert not any(materialised(layer) for layer in found["layers"])


def test_summary_round_trips_through_its_json_with_every_optional_field():
    """What a resume reads back (journal.summary_from_state) is what was written: --refit's
    refit_loss and routed MoE runs' routed_tokens included (a refit report once failed to
    load: refit_loss passed twice)."""
    from quantizer.job import SublayerReport, Summary, summary_from_dict, summary_to_dict

    r = SublayerReport("mlp.experts.0.down_proj", (8, 4), 0.5, 1.0, 0.01, 0, 0, (2.0, 1.5), 7)
    s = Summary("out", 3.0, 1, 0, 0.5, 0, [[r]], expert_linears=1, loss_measure="x")
    s.moe_routed_tokens = {"min": 7, "median": 7, "max": 7}
    d = json.loads(json.dumps(summary_to_dict(s)))
    assert d["layers"][0][0]["refit_loss"] == [2.0, 1.5]
    assert d["layers"][0][0]["routed_tokens"] == 7
    assert summary_from_dict(d) == s
    plain = Summary("out", 3.0, 1, 0, 0.5, 0, [[SublayerReport("q", (8, 4), 0.5, 1, 0, 0)]])
    d = summary_to_dict(plain)  # options off: their fields absent, as before them
    assert set(d["layers"][0][0]) == {
        "name", "shape", "loss", "seconds", "damp", "cholesky_retries", "dead_inputs"
    }  # fmt: skip
    assert not {"expert_linears", "loss_measure", "moe_routed_tokens", "skipped"} & set(d)
