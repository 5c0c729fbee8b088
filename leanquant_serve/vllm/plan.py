"""The vLLM part of ``leanquant plan`` (the core, shapes and checkpoint bytes are in
:mod:`leanquant_serve.plan`): weights, KV cache and capacity per GPU under ``vllm serve``.

**Sharding**, as vLLM's Llama-family model code does it. A decoder layer's linears come in
Megatron pairs, read off the model (:class:`~leanquant_serve.plan.LayerLinear`'s input
groups, in forward order): the linears of an even-numbered group (q/k/v, gate/up) read the
residual stream and are column parallel, fused into one vLLM layer (``qkv_proj``,
``gate_up_proj``) that holds one ``g_idx`` (as :mod:`leanquant_serve.vllm.linear` builds
them); each odd-numbered group (o, down) writes back to it and is row parallel (each rank
stores the groups of its slice of the input). In the first group, the parts of
``num_key_value_heads × head_dim`` outputs are K and V: when there are fewer KV heads than
ranks each rank holds one whole KV head (replicated ``tp / kv_heads`` times). The embedding
and ``lm_head`` are vocab-parallel (vocabulary padded to a multiple of 64, then split), norms
and row-parallel biases are replicated. Whether a rank's shard keeps whole packed words and
whole groups, and whether it keeps every group's scales, is the contract's rule
(:func:`~leanquant_serve.format.tensors.shard_misfits`,
:func:`~leanquant_serve.format.tensors.scales_on_every_rank`), the one the plugin applies at
load; vLLM's own head, intermediate and vocabulary splits are written here, once each
(``tests/test_plan.py`` compares the bytes with vLLM's layers rank by rank).

**MoE**: vLLM's ``FusedMoE`` holds every expert on every rank, each one's gate/up (``w13``)
split along its intermediate and its down (``w2``) along its input, like a dense MLP, so the
contract's partition rule applies to every expert linear (each expert's intermediate / TP must
be whole groups; the error says which group size or ``--expert-parallel`` would do); with
``--enable-expert-parallel`` (``PlanInput.expert_parallel``) each rank holds ``ceil(E / tp)``
whole experts instead. Experts are counted at the size of the path that serves them
(:func:`~leanquant_serve.vllm.moe_kernels.wna16_moe_config_misfit`, the plugin's rule): as
stored when vLLM's WNA16 MoE kernels take them (4-bit affine, no ``g_idx``), else at 16 bits,
what the plugin's portable path holds after dequantizing them at load; the verdict (and
``--check``) is then the served one, and ``Plan.as_stored`` the fit a kernel for the stored
experts would give. Routers are replicated 16-bit weights. **MLA** (DeepSeek-V2/V3,
``deepseek_v2.py``): ``q_a_proj`` and ``kv_a_proj_with_mqa`` are replicated
(``fused_qkv_a_proj``), ``q_b_proj`` and ``kv_b_proj`` column parallel over heads, ``o_proj``
row parallel (:func:`split_of`); the KV cache holds one latent of ``kv_lora_rank +
qk_rope_head_dim`` elements per token and layer on every rank (``MLAAttentionSpec``), and each
layer also keeps 16-bit ``W_UK_T``/``W_UV`` copies of its ``kv_b_proj`` shard.

**Multimodal wrappers** (Gemma 3, Mistral 3): the modules beside the text decoder (vision
tower, projector; 16-bit, :attr:`~leanquant_serve.plan.Architecture.towers`) are built on every
pipeline stage, and under tensor parallelism held as vLLM 0.32's ``siglip.py``,
``pixtral.py``, ``gemma3_mm.py`` and ``mistral3.py`` build them (:func:`tower_bytes_per_rank`):
each encoder layer's attention (``qkv_proj`` column, ``out_proj`` / ``o_proj`` row) and MLP
(``fc1`` / ``gate_up_proj`` column, ``fc2`` / ``down_proj`` row) and Mistral 3's projector
(``linear_1`` column, ``linear_2`` row) are split over the ranks; the patch convolution,
position embedding, norms, Mistral 3's patch merger and Gemma 3's projection matrix (a bare
parameter) are whole on every rank.

GPUs beyond the tensor-parallel size form pipeline stages (``--pipeline-parallel-size
gpus/tp``), with layers split as ``vllm.distributed.utils.get_pp_indices`` does; the embedding
lives on the first stage and ``lm_head`` + final norm on the last. Memory, per GPU, as vLLM
0.32's worker computes it (``gpu_worker.determine_available_memory``)::

    budget   = ceil(gpu_mem · gpu_memory_utilization)
    kv bytes = budget − weights − reserve
    blocks   = kv bytes // (block_size · KV bytes per token)   (block_size 16, vLLM's default)
    capacity = blocks · block_size tokens  (the smallest over pipeline stages)
    KV bytes per token = 2 (K and V) · layers on this GPU · KV heads on this GPU · head_dim · dtype bytes
                         (MLA: layers on this GPU · (kv_lora_rank + qk_rope_head_dim) · dtype bytes,
                          in blocks of 64)

and ``max_model_len × concurrency`` fits when ``blocks ≥ concurrency · ceil(max_model_len /
block_size)`` (every sequence at full length at once: the worst case; vLLM only *requires*
one full-length sequence to fit and preempts beyond that).

The **reserve** is an estimate, not a measurement (no GPU was used to write this module); it
stands for what vLLM's profile run finds inside the budget besides the weights:

- activations of one profile forward: ``max_num_batched_tokens × 2 B × (4·hidden +
  2·(q + k + v widths per rank) + 3·intermediate per rank)`` (hidden/residual buffers, the
  fused QKV and gate/up outputs, the activation; :func:`leanquant_serve.plan.activation_bytes`);
- sampler: ``max_num_seqs × vocab × 4 B × 4`` (fp32 logits and working copies);
- CUDA graphs: 1 GiB (vLLM 0.32 subtracts its CUDA-graph estimate from the KV budget by
  default; 0 with ``--enforce-eager``);
- other non-torch growth (cuBLAS/attention workspaces) and allocator fragmentation: 1 GiB.

``--reserve-gib`` replaces the sum. The CUDA context and NCCL communicators exist before
vLLM's memory snapshot, so they are *outside* the budget: vLLM refuses to start unless the
free memory at startup covers the budget, so ``(1 − utilization) · gpu_mem`` must hold them
(assumed 1 GiB; a warning says when it does not).

Imports no vLLM: planning runs where vLLM is not installed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from leanquant_serve.format import LeanQuantConfig, chunk_size
from leanquant_serve.format.tensors import (
    SHARD_GROUPS,
    SHARD_WORDS_IN,
    SHARD_WORDS_OUT,
    shard_misfits,
)
from leanquant_serve.plan import (
    ELEMENT_16BIT,
    Architecture,
    GiB,
    GPUPlan,
    LayerLinear,
    Plan,
    PlanError,
    PlanInput,
    Shard,
    activation_bytes,
    all_layer_bytes,
    experts_bytes,
    quantizer_tested,
)
from leanquant_serve.vllm.moe_kernels import wna16_moe_config_misfit

KV_DTYPES = {"fp16": 2.0, "bf16": 2.0, "fp8": 1.0}  # bytes per cached element (K or V)
BLOCK_SIZE = 16
# vLLM's CUDA MLA backends set their own block size: FlashMLA (Hopper) 64, CUTLASS MLA
# (Blackwell) 128, FlashInfer MLA 32/64; planned with 64.
MLA_BLOCK_SIZE = 64
VOCAB_PADDING = 64
CUDA_GRAPHS = 1 * GiB
NON_TORCH = 1 * GiB
OUTSIDE_BUDGET = 1 * GiB  # CUDA context + NCCL, before vLLM's memory snapshot


def default_batched_tokens(gpu_mem_gib: float) -> int:
    """``vllm serve``'s default max_num_batched_tokens in 0.32 (EngineArgs, by GPU memory)."""
    if gpu_mem_gib >= 160:
        return 16384
    return 8192 if gpu_mem_gib >= 70 else 2048


def kv_heads_per_rank(a: Architecture, tp: int) -> int:
    """KV heads on one rank: vLLM splits them over the ranks, or, when there are fewer than
    ranks, gives each rank one whole head (``QKVParallelLinear``)."""
    return max(1, a.num_kv_heads // tp)


def padded_vocab(a: Architecture) -> int:
    """The vocabulary as vLLM's ``VocabParallelEmbedding`` pads it before splitting it."""
    return -(-a.vocab_size // VOCAB_PADDING) * VOCAB_PADDING


COLUMN, ROW, REPLICATED = "column", "row", "replicated"


def tower_bytes_per_rank(a: Architecture, tp: int) -> int:
    """Bytes of a multimodal wrapper's towers (vision tower, projector: 16-bit) on each of
    ``tp`` tensor-parallel ranks; 0 for a causal LM. The structural rule that gives vLLM 0.32's
    choices for the tested wrappers (module docstring): the ``nn.Linear`` children of one module
    holding two or more are a Megatron pair, the last registered (``out_proj``, ``o_proj``,
    ``fc2``, ``down_proj``, ``linear_2``) row parallel (weight split along its input, bias whole
    on every rank), the others column parallel (weight and bias split along the output); every
    other parameter, a lone linear included, is whole on every rank. vLLM's
    ``--mm-encoder-tp-mode data`` (the vision tower whole on every rank) is not planned. Raises
    :class:`PlanError` when a split linear's split dimension is not a multiple of ``tp``."""
    split = 0  # elements split over the ranks
    for lin in a.tower_linears:
        if lin.siblings < 2:
            continue
        row = lin.sibling == lin.siblings - 1
        n = lin.in_features if row else lin.out_features
        if n % tp:
            raise PlanError(
                f"tensor parallel size {tp}: vLLM splits {lin.tower}.{lin.parent}.{lin.name}'s "
                f"{'input' if row else 'output'} ({n}) over the ranks, not a multiple of {tp}"
            )
        split += lin.in_features * lin.out_features + (
            lin.out_features if lin.bias and not row else 0
        )
    whole = sum(n for _, n in a.towers) - split
    return (whole + split // tp) * ELEMENT_16BIT


def _is_row_parallel(lin: LayerLinear) -> bool:
    """Megatron pairs: even input groups are column parallel, odd ones row parallel."""
    return lin.group % 2 == 1


def split_of(a: Architecture, lin: LayerLinear) -> str:
    """How vLLM splits dense linear ``lin`` over tensor-parallel ranks. Llama-family layers:
    Megatron pairs (:func:`_is_row_parallel`). MLA layers (``deepseek_v2.py``'s
    ``DeepseekV2MLAAttention``): the low-rank projections of the residual stream
    (``q_a_proj`` to q_lora_rank, ``kv_a_proj_with_mqa`` to kv_lora_rank + qk_rope_head_dim:
    ``fused_qkv_a_proj``, ``disable_tp``) are replicated, whatever writes back to the hidden
    size (``o_proj``, the MLPs' down) is row parallel, the rest (``q_b_proj``, ``kv_b_proj``,
    the MLPs' gate/up) column parallel."""
    if not a.is_mla:
        return ROW if _is_row_parallel(lin) else COLUMN
    if lin.out_features == a.hidden_size:
        return ROW
    latent = {a.kv_lora_rank + a.qk_rope_head_dim, a.q_lora_rank}
    if lin.in_features == a.hidden_size and lin.out_features in latent:
        return REPLICATED
    return COLUMN


def _is_kv(a: Architecture, lin: LayerLinear) -> bool:
    """A K or V part of the first (attention) group: one ``num_key_value_heads × head_dim``
    output."""
    return not a.is_mla and lin.group == 0 and lin.out_features == a.num_kv_heads * a.head_dim


def experts_per_rank(num_experts: int, ep: int) -> int:
    """Experts on the busiest rank under expert parallelism (vLLM's expert map gives the
    remainder of E / ep to the first ranks)."""
    return -(-num_experts // ep)


def _shard(a: Architecture, tp: int, ep: bool = False) -> Shard:
    def shape(lin: LayerLinear) -> tuple[int, int, int]:
        split = split_of(a, lin)
        if split == ROW:
            return lin.in_features // tp, lin.out_features, lin.out_features if lin.bias else 0
        if split == REPLICATED:
            return lin.in_features, lin.out_features, lin.out_features if lin.bias else 0
        out = kv_heads_per_rank(a, tp) * a.head_dim if _is_kv(a, lin) else lin.out_features // tp
        return lin.in_features, out, out if lin.bias else 0

    def shares_g_idx(lin: LayerLinear) -> bool:  # a later part of a fused layer
        if a.is_mla and split_of(a, lin) == REPLICATED:  # fused_qkv_a_proj: q_a then kv_a
            return lin.out_features != a.q_lora_rank
        return split_of(a, lin) == COLUMN and not lin.first_in_group

    def expert_shape(lin: LayerLinear) -> tuple[int, int, int]:
        """vLLM's FusedMoE: w13 (gate/up) split along the intermediate (output), w2 (down)
        along its input; under expert parallelism each expert whole."""
        if ep:
            return lin.in_features, lin.out_features, 0
        if lin.group == 0:
            return lin.in_features, lin.out_features // tp, 0
        return lin.in_features // tp, lin.out_features, 0

    return Shard(
        shape,
        shares_g_idx,
        expert_shape=expert_shape,
        experts_held=(lambda e: experts_per_rank(e, tp)) if ep else (lambda e: e),
    )


def _check_pairs(a: Architecture) -> None:
    """The layers must be the column/row pairs vLLM's Llama-family code shards (MLA layers:
    the split :func:`split_of` reads off their shapes)."""
    if a.is_mla:
        return
    kinds = a.kinds or (a.kind(0),)
    for kind in kinds:
        groups = 1 + max(lin.group for lin in kind.linears)
        for lin in kind.linears:
            row = _is_row_parallel(lin)
            if groups % 2 or (lin.out_features if row else lin.in_features) != a.hidden_size:
                raise PlanError(
                    f"{a.name}: {lin.name} ({lin.in_features} -> {lin.out_features}, input "
                    f"group {lin.group} of {groups}) does not fit vLLM's column/row-parallel "
                    "pairs (column parallel from the hidden size, row parallel back to it)"
                )


_EP_ADVICE = "; use --expert-parallel (whole experts per rank)"


def _advice(cfg: LeanQuantConfig, in_r: int) -> str:
    """What to change when a rank's slice of ``in_r`` input features of an expert linear
    splits a group: the largest group size that divides it, or whole experts per rank."""
    fits = [g for g in (128, 64, 32) if in_r % g == 0 and g % chunk_size(cfg.bits) == 0]
    if fits:
        return f"; use --group-size {fits[0]} or --expert-parallel (whole experts per rank)"
    return _EP_ADVICE


def check_tp(a: Architecture, cfg: LeanQuantConfig | None, tp: int, ep: bool = False) -> None:
    """Refuse a tensor-parallel size vLLM (its head, intermediate and vocabulary splits) or
    the checkpoint contract (:func:`~leanquant_serve.format.tensors.shard_misfits`, the
    plugin's rule at load) would refuse, with the reason. Routed experts are checked as vLLM's
    FusedMoE splits them: each expert's intermediate over the ranks (``ep`` False, vLLM's
    default) or whole experts per rank (``ep``: ``--enable-expert-parallel``)."""
    if a.num_heads % tp:
        raise PlanError(
            f"tensor parallel size {tp} does not divide the {a.num_heads} attention heads"
        )
    kv = a.num_kv_heads
    if not a.is_mla and ((kv >= tp and kv % tp) or (kv < tp and tp % kv)):
        raise PlanError(
            f"tensor parallel size {tp} and {kv} KV heads: one must divide the other "
            "(vLLM splits KV heads over ranks, or replicates whole heads)"
        )
    experts = a.all_experts()
    if not experts and a.intermediate_size % tp:
        raise PlanError(
            f"tensor parallel size {tp} does not divide intermediate_size={a.intermediate_size}"
        )
    for lin in a.all_linears() if experts or a.is_mla else ():
        split = split_of(a, lin)
        size = lin.in_features if split == ROW else lin.out_features
        if split != REPLICATED and not _is_kv(a, lin) and size % tp:
            raise PlanError(
                f"{lin.name}: tensor parallel size {tp} does not divide its {size} "
                f"{'input' if split == ROW else 'output'} features"
            )
    for e in experts:
        if ep and e.num_experts < tp:
            raise PlanError(f"expert parallelism over {tp} ranks: only {e.num_experts} experts")
        if not ep and e.intermediate_size % tp:
            raise PlanError(
                f"tensor parallel size {tp} does not divide the experts' intermediate size "
                f"{e.intermediate_size} (moe_intermediate_size){_EP_ADVICE}"
            )
    padded = padded_vocab(a)
    if padded % tp:
        raise PlanError(
            f"tensor parallel size {tp} does not divide the padded vocabulary {padded} "
            f"(vocab_size {a.vocab_size} padded to a multiple of {VOCAB_PADDING})"
        )
    if cfg is None:
        return
    n = chunk_size(cfg.bits)
    shard = _shard(a, tp, ep)
    checks = [(lin, shard.shape(lin), split_of(a, lin) == ROW, "") for lin in a.all_linears()]
    for e in experts:
        for lin in e.linears:
            what = f" (one expert's; moe_intermediate_size {e.intermediate_size} / tensor parallel size {tp})"
            checks.append((lin, shard.expert_shape(lin), not ep and lin.group == 1, what))
    for lin, (in_r, out_r, _), row, what in checks:
        lin = replace(lin, name=lin.name.replace("{e}", "*"))
        where = what or f" ({lin.in_features} / tensor parallel size {tp})"
        if row:
            problems = shard_misfits(cfg, in_r)
            if SHARD_GROUPS in problems:
                raise PlanError(
                    f"{lin.name}: group size {cfg.group_size} does not divide the {in_r} input "
                    f"features per rank{where}: a rank would hold part of a group"
                    + (_advice(cfg, in_r) if what else "")
                )
            if SHARD_WORDS_IN in problems:
                raise PlanError(
                    f"{lin.name}: {in_r} input features per rank are not a multiple of {n}, "
                    f"so {cfg.bits}-bit words of qweight would be split over ranks"
                    + (_EP_ADVICE if what else "")
                )
        elif SHARD_WORDS_OUT in shard_misfits(cfg, lin.in_features, [out_r]):
            raise PlanError(
                f"{lin.name}: {out_r} output features per rank are not a multiple of {n}, so "
                f"{cfg.bits}-bit words of zero_points would be split over ranks"
                + (_EP_ADVICE if what else "")
            )


def kv_bytes_per_token_per_layer(a: Architecture, tp: int, kv_elem: float) -> float:
    """KV-cache bytes one token takes in one layer on one rank: K and V of the rank's KV
    heads, or, for MLA, the one compressed latent (kv_lora_rank + qk_rope_head_dim elements,
    vLLM's ``MLAAttentionSpec``: ``num_kv_heads=1``, ``head_size_v=0``, not split over
    ranks)."""
    if a.is_mla:
        return (a.kv_lora_rank + a.qk_rope_head_dim) * kv_elem
    return 2 * kv_heads_per_rank(a, tp) * a.head_dim * kv_elem


def mla_absorbed_bytes(a: Architecture, tp: int) -> int:
    """Per MLA layer and rank: the 16-bit ``W_UK_T`` and ``W_UV`` vLLM builds from its
    ``kv_b_proj`` shard after loading (``MLAAttention.process_weights_after_loading``),
    kv_lora_rank × heads per rank × (qk_nope_head_dim + v_head_dim) elements; 0 without MLA."""
    if not a.is_mla:
        return 0
    heads = a.num_heads // tp
    return a.kv_lora_rank * heads * (a.qk_nope_head_dim + a.v_head_dim) * ELEMENT_16BIT


def _activations(a: Architecture, shard: Shard, tokens: int, tp: int) -> int:
    """The profile forward's activations (:func:`leanquant_serve.plan.activation_bytes`): a
    dense model as before; MLA with its q, k and v widths (heads × (qk_nope + qk_rope),
    twice, + heads × v_head_dim); MoE with the widest dense MLP (gate/up) per rank."""
    heads = a.num_heads // tp
    if not a.is_mla and not a.all_experts():
        return activation_bytes(
            a, tokens, heads, kv_heads_per_rank(a, tp), a.intermediate_size // tp
        )
    mlp = [
        shard.shape(lin)[1]
        for lin in a.all_linears()
        if split_of(a, lin) == COLUMN
        and lin.in_features == a.hidden_size
        and (a.is_mla or lin.group >= 2)
    ]
    qkv = None
    if a.is_mla:
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        qkv = heads * (2 * qk + a.v_head_dim)
    return activation_bytes(
        a, tokens, heads, kv_heads_per_rank(a, tp), max(mlp, default=0), qkv_width=qkv
    )


def _moe_workspace(a: Architecture, shard: Shard, tokens: int) -> int:
    """Fused-MoE buffers of the profile forward, estimated: tokens × 2 B × top-k ×
    (3 · expert intermediate per rank + hidden) (gate/up output, activation, down output)."""
    e = a.all_experts()[0]
    inter = max(shard.expert_shape(lin)[1] for lin in e.linears if lin.group == 0)
    top_k = a.experts_per_token or 1
    return tokens * ELEMENT_16BIT * top_k * (3 * inter + a.hidden_size)


def pp_partitions(layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, as vllm.distributed.utils.get_pp_indices splits them."""
    parts = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        parts[-i] += 1
    return parts


def plan_engine(
    inp: PlanInput, a: Architecture, cfg: LeanQuantConfig | None, common: dict[str, Any]
) -> Plan:
    """The vLLM plan of ``a`` (see the module docstring); ``common`` holds the core's fields."""
    tp = inp.tp if inp.tp is not None else inp.gpus
    if tp < 1 or inp.gpus % tp:
        raise PlanError(
            f"--tp {tp} does not divide --gpus {inp.gpus} (GPUs = tensor parallel × pipeline stages)"
        )
    pp = inp.gpus // tp
    if pp > a.num_layers:
        raise PlanError(f"{pp} pipeline stages for {a.num_layers} layers")
    experts = a.all_experts()
    ep = inp.expert_parallel
    if ep and not experts:
        raise PlanError(f"--expert-parallel: {a.name} has no routed experts")
    if ep and tp == 1:
        raise PlanError("--expert-parallel needs tensor parallel size > 1 (vLLM ignores it)")
    _check_pairs(a)
    check_tp(a, cfg, tp, ep)
    shard = _shard(a, tp, ep)
    kv_elem = KV_DTYPES[inp.kv_dtype]
    kv_heads_rank = kv_heads_per_rank(a, tp)
    batched = inp.max_num_batched_tokens or default_batched_tokens(inp.gpu_mem_gib)
    mem = common["gpu_mem_bytes"]
    budget = math.ceil(mem * inp.gpu_memory_utilization)
    if inp.reserve_gib is not None:
        reserve = {"stated (--reserve-gib)": int(inp.reserve_gib * GiB)}
    else:
        reserve = {
            "activations": _activations(a, shard, batched, tp),
            "sampler": inp.concurrency * a.vocab_size * 4 * 4,
            "cuda_graphs": 0 if inp.enforce_eager else CUDA_GRAPHS,
            "non_torch_and_fragmentation": NON_TORCH,
        }
        if experts:
            reserve["moe_workspace"] = _moe_workspace(a, shard, batched)
    reserve_total = sum(reserve.values())

    layer_bytes = all_layer_bytes(a, cfg, shard)
    towers_rank = tower_bytes_per_rank(a, tp)
    vocab_rank = padded_vocab(a) // tp
    emb_rank = vocab_rank * a.hidden_size * ELEMENT_16BIT
    parts = pp_partitions(a.num_layers, pp)
    block_tokens = MLA_BLOCK_SIZE if a.is_mla else BLOCK_SIZE
    # the routed experts per stage as stored, and at 16 bits: what the plugin's portable path
    # holds after dequantizing them at load (the path vllm/moe_kernels.py's rule sends them to)
    bounds = [(sum(parts[:s]), sum(parts[: s + 1])) for s in range(pp)]
    stored_experts = [sum(experts_bytes(a, cfg, i, shard) for i in range(*b)) for b in bounds]
    dense_experts = [sum(experts_bytes(a, None, i, shard) for i in range(*b)) for b in bounds]
    quantized_experts = stored_experts != dense_experts
    misfit = wna16_moe_config_misfit(cfg) if quantized_experts and cfg is not None else None
    stage_weights = []
    for s, (start, end) in enumerate(bounds):
        w = sum(layer_bytes[start:end]) + (end - start) * mla_absorbed_bytes(a, tp)
        w += towers_rank  # a multimodal wrapper's towers, on every stage
        if s == 0:
            w += emb_rank
        if s == pp - 1:
            w += a.hidden_size * ELEMENT_16BIT  # final norm
            if not (a.tie_word_embeddings and pp == 1):
                w += emb_rank  # lm_head (a tied one is a second copy on the last stage)
        stage_weights.append(w)
    seq_blocks = -(-inp.max_model_len // block_tokens)
    required = inp.concurrency * seq_blocks * block_tokens

    def gpu_plans(weights: list[int]) -> list[GPUPlan]:
        out = []
        for s, (n, w) in enumerate(zip(parts, weights, strict=True)):
            kv_tok = int(n * kv_bytes_per_token_per_layer(a, tp, kv_elem))
            kv_bytes = budget - w - reserve_total
            blocks = max(0, kv_bytes) // (block_tokens * kv_tok)
            ranks = f"ranks {s * tp}-{s * tp + tp - 1}" if tp > 1 else f"rank {s}"
            out.append(
                GPUPlan(
                    gpu=f"stage {s} ({ranks})" if pp > 1 else f"each of {tp} ({ranks})",
                    layers=n,
                    weight_bytes=w,
                    kv_bytes_per_token=kv_tok,
                    budget_bytes=budget,
                    reserve_bytes=reserve_total,
                    kv_cache_bytes=kv_bytes,
                    capacity_tokens=blocks * block_tokens,
                )
            )
        return out

    as_stored: dict[str, Any] = {}
    if misfit is None:
        per_gpu = gpu_plans(stage_weights)
    else:  # served at 16 bits: the fit counts them so; the stored size is the aside
        served = zip(stage_weights, dense_experts, stored_experts, strict=True)
        per_gpu = gpu_plans([w + d - e for w, d, e in served])
        stored_gpus = gpu_plans(stage_weights)
        stored_capacity = min(g.capacity_tokens for g in stored_gpus)
        as_stored = {
            "weight_bytes_per_gpu": max(stage_weights),
            "experts_bytes_per_gpu": max(stored_experts),
            "capacity_tokens": stored_capacity,
            "fits": stored_capacity >= required,
            "needs": f"a vLLM MoE kernel for these experts; none in vLLM 0.32: {misfit}",
        }
    capacity = min(g.capacity_tokens for g in per_gpu)

    args = [
        "--tensor-parallel-size",
        str(tp),
        *(["--pipeline-parallel-size", str(pp)] if pp > 1 else []),
        "--max-model-len",
        str(inp.max_model_len),
        "--max-num-seqs",
        str(inp.concurrency),
        "--max-num-batched-tokens",
        str(batched),
        "--gpu-memory-utilization",
        f"{inp.gpu_memory_utilization:g}",
        "--dtype",
        "float16",
        *(["--kv-cache-dtype", "fp8"] if inp.kv_dtype == "fp8" else []),
        *(["--enforce-eager"] if inp.enforce_eager else []),
        *(["--enable-expert-parallel"] if ep else []),
    ]
    assumptions = [
        f"weights: LeanQuant tensors as stored, sharded as vLLM shards them (tp={tp}, pp={pp}); "
        "embeddings, lm_head, norms and biases 16-bit"
        + (
            "; routed experts at 16 bits, as the plugin serves them (warnings)" if as_stored else ""
        ),
        (
            f"MLA: vLLM caches one latent of kv_lora_rank {a.kv_lora_rank} + qk_rope_head_dim "
            f"{a.qk_rope_head_dim} = {a.kv_lora_rank + a.qk_rope_head_dim} elements per token "
            "per layer (MLAAttentionSpec: one KV head, no separate V), the whole of it on every "
            f"rank; blocks of {MLA_BLOCK_SIZE} tokens (FlashMLA's); each layer also holds "
            "16-bit W_UK/W_UV copies of its kv_b_proj shard (split_kv_b_proj, for the absorbed "
            "decode)"
            if a.is_mla
            else f"KV heads per GPU: {kv_heads_rank} of {a.num_kv_heads}"
            + (f" (each replicated on {tp // a.num_kv_heads} ranks)" if a.num_kv_heads < tp else "")
        ),
        f"budget = ceil({inp.gpu_mem_gib:g} GiB × gpu_memory_utilization {inp.gpu_memory_utilization:g})",
        "reserve inside the budget is an ESTIMATE, not a measurement: "
        + (
            f"{inp.reserve_gib:g} GiB as given by --reserve-gib"
            if inp.reserve_gib is not None
            else f"activations of a {batched}-token profile forward "
            "(tokens × 2 B × (4·hidden + 2·qkv width per rank + 3·intermediate per rank)), "
            f"sampler {inp.concurrency} seqs × vocab × 16 B, "
            + ("no CUDA graphs (--enforce-eager), " if inp.enforce_eager else "CUDA graphs 1 GiB, ")
            + "non-torch workspaces + fragmentation 1 GiB"
        ),
        f"KV cache in blocks of {block_tokens} tokens; fits = every one of {inp.concurrency} "
        f"sequences at max_model_len {inp.max_model_len} at once (worst case)",
        "CUDA context + NCCL (~1 GiB assumed) sit outside the budget, in the "
        f"(1 − {inp.gpu_memory_utilization:g}) share",
        "no speculative decoding, LoRA, or other processes on the GPUs",
    ]
    if experts:
        e = experts[0]
        held = shard.experts_held(e.num_experts)
        assumptions.insert(
            1,
            f"routed experts ({a.moe_layers} layers × {e.num_experts}): "
            + (
                f"expert parallel (--enable-expert-parallel): {held} whole experts per rank "
                "(the busiest rank's)"
                if ep
                else f"tensor parallel as vLLM's FusedMoE does by default: every rank holds all "
                f"{e.num_experts} experts, each one's gate/up split along its intermediate "
                f"({e.intermediate_size} / {tp}) and its down along its input"
            )
            + (
                "; every expert linear 16-bit"
                + ("" if cfg is None else " (modules_to_not_convert), and served so")
                if not quantized_experts
                else "; each expert linear stored at its bits (the LeanQuant contract) and "
                f"dequantized to 16 bits at load by the plugin's portable path ({misfit})"
                if misfit is not None
                else "; each expert linear a linear of the LeanQuant contract at the stored bits"
            )
            + "; routers 16-bit and replicated; moe_workspace = profile tokens × 2 B × top-k × "
            "(3·expert intermediate per rank + hidden), an estimate of the fused-MoE buffers",
        )
    warnings = []
    if (1 - inp.gpu_memory_utilization) * mem < OUTSIDE_BUDGET:
        warnings.append(
            f"(1 − gpu_memory_utilization) × gpu_mem = "
            f"{(1 - inp.gpu_memory_utilization) * mem / GiB:.2f} GiB may not hold the CUDA "
            "context and NCCL buffers (~1 GiB): vLLM refuses to start when free memory is below "
            "the budget"
        )
    if cfg is not None and cfg.grid == "nonuniform":
        warnings.append("non-uniform (LUT) layers run this project's Triton kernel on GPUs")
    if quantized_experts:  # the stage holding the most expert bytes as stored
        s = max(range(pp), key=lambda i: stored_experts[i])
        dense, stored = dense_experts[s], stored_experts[s]
        extra = f"{dense / GiB:.2f} GiB per GPU (+{(dense - stored) / GiB:.2f} GiB)"
        warnings.append(
            f"experts are planned at their stored {cfg.bits}-bit size ({stored / GiB:.2f} GiB "
            "per GPU): on CUDA with 16-bit activations the plugin hands them to vLLM's WNA16 "
            "MoE kernels (written against vLLM 0.32, not run on a GPU); its portable path "
            f"(CPU, float32, LEANQUANT_MOE_KERNEL=portable) needs their 16-bit size, {extra}"
            if misfit is None
            else f"experts are planned at their served 16-bit size, {dense / GiB:.2f} GiB per "
            f"GPU ({stored / GiB:.2f} GiB as stored {cfg.bits}-bit, "
            f"+{(dense - stored) / GiB:.2f} GiB): the plugin serves these experts through its "
            f"portable path ({misfit}), which dequantizes them at load; the fit counts them so "
            "(--check too), and 'if served as stored' is the fit a kernel for them would give"
        )
    if a.towers:
        assumptions.insert(
            1,
            f"{a.wrapper} towers on every pipeline stage; under tensor parallelism as vLLM "
            "0.32 builds them: the linear pairs (each vision encoder layer's attention and MLP, "
            "Mistral 3's projector) split over the ranks; embeddings, norms, row-parallel "
            "biases, lone linears and bare weight matrices whole on every rank: "
            f"{towers_rank / GiB:.2f} GiB per GPU at tp={tp} ({a.tower_bytes / GiB:.2f} GiB "
            "whole); with --mm-encoder-tp-mode data the vision tower is whole on every rank "
            "(more than planned); --limit-mm-per-prompt '{\"image\": 0}' builds none (less)",
        )
    if not quantizer_tested(a.model_type):
        warnings.append(
            f"the quantizer's tests do not cover model_type {a.model_type!r} yet (docs/moe.md)"
        )
    return Plan(
        engine="vllm",
        tp=tp,
        pp=pp,
        gpu_memory_utilization=inp.gpu_memory_utilization,
        per_gpu=per_gpu,
        weight_bytes_per_gpu=max(g.weight_bytes for g in per_gpu),
        tower_bytes_per_gpu=towers_rank,
        kv_bytes_per_token_per_gpu=max(g.kv_bytes_per_token for g in per_gpu),
        capacity_tokens=capacity,
        required_tokens=required,
        fits=capacity >= required,
        fits_one_sequence=capacity >= seq_blocks * block_tokens,
        margin_tokens=capacity - required,
        as_stored=as_stored,
        margin_bytes=min(g.kv_cache_bytes - required * g.kv_bytes_per_token for g in per_gpu),
        max_full_length_sequences=capacity // (seq_blocks * block_tokens),
        reserve=reserve,
        engine_args=args,
        assumptions=assumptions,
        warnings=warnings,
        **common,
    )
