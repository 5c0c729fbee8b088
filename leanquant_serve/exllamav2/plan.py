"""The exllamav2 part of ``leanquant plan`` (the core, shapes and checkpoint bytes are in
:mod:`leanquant_serve.plan`): the layer split of the GPTQ tensors (4-bit affine) that
``leanquant export exllamav2`` (:mod:`leanquant_serve.exllamav2.export`) writes.

Not modelled: EXL2 exports of ``--grid exl2`` checkpoints and exllamav2's tensor parallelism
(``load_tp``), which needs them. Modelled as its ``load_autosplit`` does: modules fill GPU 0,
then GPU 1, ... in order, each decoder layer with its weights and its share of the KV cache;
``lm_head`` and the final norm go after the last layer; the token embedding stays in host
RAM. Budget per GPU = ``gpu_mem − reserve`` (exllamav2 has no utilization setting): the
reserve is the CUDA context (1 GiB assumed) + scratch for a ``max_chunk_size`` = 2048-token
prefill chunk (:func:`leanquant_serve.plan.activation_bytes`, unsharded). Quantized caches
(fp8, q8/q6/q4) also keep one fp16 layer-sized K/V buffer per GPU. Capacity is rounded down to
whole 256-token pages (the dynamic generator's page size). Its GPU footprint per linear is
taken to be the GPTQ tensors' bytes (the same shapes as the LeanQuant tensors).

Imports no exllamav2 (it needs CUDA to import).
"""

from __future__ import annotations

import math
from typing import Any

from leanquant_serve.format import LeanQuantConfig
from leanquant_serve.plan import (
    ELEMENT_16BIT,
    WHOLE,
    Architecture,
    GiB,
    GPUPlan,
    Plan,
    PlanError,
    PlanInput,
    activation_bytes,
    all_layer_bytes,
)

# ExLlamaV2Cache (fp16), ExLlamaV2Cache_8bit (fp8), ExLlamaV2Cache_Q8/Q6/Q4: codes
# (K bytes, V bytes per element) + one fp16 scale per 32 elements for each of K and V.
KV_DTYPES = {
    "fp16": (2.0, 2.0, 0.0),
    "fp8": (1.0, 1.0, 0.0),
    "q8": (1.0, 1.0, 2 / 32),
    "q6": (1.0, 0.5, 2 / 32),
    "q4": (0.5, 0.5, 2 / 32),
}
CACHE_CLASS = {
    "fp16": "ExLlamaV2Cache",
    "fp8": "ExLlamaV2Cache_8bit",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}
CONTEXT = 1 * GiB
CHUNK = 2048  # ExLlamaV2DynamicGenerator's default max_chunk_size
PAGE = 256  # ExLlamaV2DynamicGenerator's page size


def plan_engine(
    inp: PlanInput, a: Architecture, cfg: LeanQuantConfig | None, common: dict[str, Any]
) -> Plan:
    """The exllamav2 plan of ``a`` (see the module docstring); ``common`` holds the core's
    fields."""
    if a.all_experts() or a.is_mla or inp.expert_parallel:
        raise PlanError(
            "--engine exllamav2 models dense layers only: Mixture-of-Experts and MLA layers "
            "are not modelled (plan them with --engine vllm)"
        )
    if inp.tp not in (None, 1):
        raise PlanError(
            "--engine exllamav2 models the layer split (gpu_split) of GPTQ exports; "
            "exllamav2's tensor parallelism (EXL2 exports of --grid exl2 checkpoints) is not "
            "modelled; leave --tp out"
        )
    if cfg is None or cfg.bits != 4 or cfg.grid != "affine":
        raise PlanError(
            "--engine exllamav2 models GPTQ exports: 4 bits with an affine grid only "
            f"(got {'16-bit' if cfg is None else f'{cfg.bits}-bit {cfg.grid}'})"
        )
    g = cfg.group_size
    if g != -1 and (g < 32 or g & (g - 1)):
        raise PlanError(f"--group-size {g}: exllamav2 needs a power of two >= 32 (or -1)")
    k_b, v_b, scale_b = KV_DTYPES[inp.kv_dtype]
    kv_layer = a.num_kv_heads * a.head_dim * (k_b + v_b + 2 * scale_b)  # B per token per layer
    temp_per_token = 0 if inp.kv_dtype == "fp16" else 2 * a.num_kv_heads * a.head_dim * 2
    mem = common["gpu_mem_bytes"]
    scratch = activation_bytes(a, CHUNK, a.num_heads, a.num_kv_heads, a.intermediate_size)
    if inp.reserve_gib is not None:
        reserve = {"stated (--reserve-gib)": int(inp.reserve_gib * GiB)}
    else:
        reserve = {"cuda_context": CONTEXT, "scratch": scratch}
    reserve_total = sum(reserve.values())
    budget = mem - reserve_total
    layer_bytes = all_layer_bytes(a, cfg, WHOLE)
    head = a.vocab_size * a.hidden_size * ELEMENT_16BIT + a.hidden_size * ELEMENT_16BIT
    modules = [(w, True) for w in layer_bytes] + [(head, False)]

    def fill(cap: int) -> list[tuple[int, int]] | None:
        """Weights-only greedy fill in module order, at most ``cap`` bytes per GPU (as
        exllamav2 fills each gpu_split allocation): (layers, weight bytes) per GPU, or None."""
        layers, weights, dev = [0] * inp.gpus, [0] * inp.gpus, 0
        for w, is_layer in modules:
            while dev < inp.gpus and weights[dev] + w > cap:
                dev += 1
            if dev == inp.gpus:
                return None
            layers[dev] += is_layer
            weights[dev] += w
        return list(zip(layers, weights, strict=True))

    # Even split: the smallest per-GPU cap at which the modules fill the GPUs in order.
    lo, hi = max(w for w, _ in modules), sum(w for w, _ in modules)
    while lo < hi:
        mid = (lo + hi) // 2
        if fill(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    layout = fill(lo)
    assert layout is not None
    per_gpu: list[GPUPlan] = []
    for i, (n, w) in enumerate(layout):
        kv_tok = int(n * kv_layer)
        per_token = kv_tok + (temp_per_token if n else 0)
        free = budget - w
        cap = max(0, free) // per_token if per_token else (None if free >= 0 else 0)
        per_gpu.append(
            GPUPlan(
                gpu=f"GPU {i}",
                layers=n,
                weight_bytes=w,
                kv_bytes_per_token=kv_tok,
                budget_bytes=budget,
                reserve_bytes=reserve_total,
                kv_cache_bytes=free,
                capacity_tokens=-1 if cap is None else cap // PAGE * PAGE,
            )
        )
    capacity = min(g.capacity_tokens for g in per_gpu if g.capacity_tokens >= 0)
    seq_pages = -(-inp.max_model_len // PAGE)
    required = inp.concurrency * seq_pages * PAGE
    # gpu_split: GiB per GPU for weights plus the scratch exllamav2 counts in each allocation.
    split = [
        math.ceil((g.weight_bytes + scratch) / GiB * 4 + 1) / 4 if g.weight_bytes else 0.0
        for g in per_gpu
    ]
    worst = max(per_gpu, key=lambda g: g.kv_bytes_per_token)
    assumptions = [
        "exllamav2 layer split (no tensor parallelism), even: decoder layers fill GPU 0, "
        "GPU 1, ... in order, lm_head + final norm after the last layer; each layer's KV cache "
        "on its GPU",
        "token embedding in host RAM (exllamav2's default), not on a GPU",
        "GPU footprint of a linear = the GPTQ tensors leanquant export exllamav2 writes "
        "(qweight, qzeros, scales, g_idx if any), the same bytes as the LeanQuant tensors",
        "reserve per GPU is an ESTIMATE, not a measurement: "
        + (
            f"{inp.reserve_gib:g} GiB as given by --reserve-gib"
            if inp.reserve_gib is not None
            else f"CUDA context 1 GiB + scratch for a {CHUNK}-token prefill chunk "
            "(tokens × 2 B × (4·hidden + 2·qkv width + 3·intermediate))"
        ),
        f"KV cache {CACHE_CLASS[inp.kv_dtype]}"
        + ("" if inp.kv_dtype == "fp16" else " (+ one fp16 layer-sized K/V buffer per GPU)")
        + f", in pages of {PAGE} tokens; capacity = the smallest over GPUs",
        "gpu_split (GiB): weights + scratch + 0.25, rounded up to 0.25; exllamav2 fills each "
        "allocation greedily, so with small layers its split may differ slightly",
        "--gpu-memory-utilization does not apply to exllamav2",
    ]
    return Plan(
        engine="exllamav2",
        tp=1,
        pp=inp.gpus,
        gpu_memory_utilization=None,
        per_gpu=per_gpu,
        weight_bytes_per_gpu=max(g.weight_bytes for g in per_gpu),
        kv_bytes_per_token_per_gpu=worst.kv_bytes_per_token,
        capacity_tokens=capacity,
        required_tokens=required,
        fits=capacity >= required,
        fits_one_sequence=capacity >= seq_pages * PAGE,
        margin_tokens=capacity - required,
        margin_bytes=min(
            g.kv_cache_bytes
            - required * (g.kv_bytes_per_token + (temp_per_token if g.layers else 0))
            for g in per_gpu
        ),
        max_full_length_sequences=capacity // (seq_pages * PAGE),
        reserve=reserve,
        host_bytes=a.vocab_size * a.hidden_size * ELEMENT_16BIT,
        gpu_split_gib=split,
        assumptions=assumptions,
        warnings=[],
        **common,
    )
