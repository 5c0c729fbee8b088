"""Export a LeanQuant checkpoint as a GPTQ or EXL2 checkpoint that exllamav2 (v0.3.2) loads exactly.

Checked against exllamav2's source at tag v0.3.2 (``6a2d8311``); nothing here imports it (it
builds CUDA code at import). W is (out, in); a LeanQuant affine layer stores ``qweight``
(in*b/32, out), ``scales`` (G, out) fp16 and ``zero_points`` (G, out*b/32) holding the true z,
w = (q - z)·s (see :mod:`leanquant_serve.format.tensors`).

How exllamav2 reads a GPTQ linear:

- ``ExLlamaV2Module.load_weight`` (``module.py``) takes the GPTQ path when ``<key>.qweight``
  exists and loads ``qweight``, ``qzeros``, ``scales`` (cast to fp16), ``g_idx`` and ``bias``
  (kept in its stored dtype; ``ext_qmatrix.cpp make_q_matrix`` requires fp16). ``quant_method``
  is never read; ``config.py ExLlamaV2Config.prepare`` reads only
  ``quantization_config.checkpoint_format`` ("gptq_v2" would make ``ext.py make_q_matrix``
  subtract 0x11111111 from every ``qzeros`` word). ``stloader.py convert_dtype`` knows only
  I32, I16, F16, BF16 and F32 tensors.
- ``ext_qmatrix.cpp make_q_matrix`` checks ``qzeros.size(1) * 8 == qweight.size(1)`` and
  ``scales.size(1) == qweight.size(1)`` and sets height = 8 · ``qweight.size(0)``: 4-bit only.
- ``cuda/q_matrix.cu QMatrix::QMatrix`` derives ``gptq_groupsize``: start at 1 and double while
  ``gptq_groupsize · groups < height``. Row k (in the sequential order below) belongs to group
  k // gptq_groupsize. ``reconstruct_gptq_kernel`` and ``gemm_half_q_half_gptq_kernel``
  (``cuda/q_gemm_kernel_gptq.cuh``) walk 32 rows per step and switch group only when the row
  index equals the next group start, in blocks of 128 rows. So with more than one group the
  group size must be a power of two ≥ 32 (for a LeanQuant group size dividing ``in`` exactly
  that makes ``gptq_groupsize`` equal to it); one group (per channel) always works.
- Zeros: ``MatrixView_q4_row::item4`` reads nibble n % 8 of word n // 8 of ``qzeros`` row g
  (low nibble first: our packing along the output dimension), and both kernels call
  ``dequant_4bit_8_prep_zero(zeros + 1, ...)``: the stored zero is z - 1, so z ∈ [1, 16].
  ``dequant_4bit_8_gptq`` (``cuda/quant/qdq_4.cuh``, unscaled variant, the only one the GPTQ
  kernels use) computes q - z exactly in fp16 ((1024 + q) - (1024 + z), and
  (1024 + 16q)/16 - (64 + z) for the high nibbles); the scale is applied afterwards:
  ``__hmul2(scales, dq)`` in the reconstruct kernel (``cuda/q_gemm.cu gemm_half_q_half_cuda``
  reconstructs and calls cuBLAS for more than 32 activation rows), or
  ``__hfma2(dot, scales, acc)`` on 8-row partial dot products in the GEMM kernel (up to 32
  rows). Nothing takes the absolute value of a scale or assumes its sign; ``ext.py
  make_q_matrix`` only multiplies the fp16 scales by the module's ``prescale`` (sign-symmetric).
- ``g_idx``: ``ext.py make_q_matrix`` uses it unless it is all zero; ``QMatrix::make_sequential``
  stably sorts the rows by group (a counting sort), stores the order as uint16 ``q_perm``
  (GEMM: activations gathered by it; reconstruct: rows written back through it) and then uses
  k // gptq_groupsize on the sorted rows. That matches g_idx exactly when every group has
  ``gptq_groupsize`` rows, which act-order with dynamic groups guarantees; heights above 65536
  would overflow the uint16 permutation.
- ``linear.py ExLlamaV2Linear.__init__`` pads ``out_features`` to a multiple of 32 and
  ``ext_qmatrix.cpp gemm_half_q_half`` then requires the matrix width to equal the padded width.
- ``attn.py`` / ``mlp.py`` assert a layer's q/k/v/o (and gate/up) are quantized all or none.

Exactness. A LeanQuant zero z ∈ [1, 15] is stored as z - 1. z = 0 would need -1, so for each
(group g, output n) with z = 0 the exporter flips that grid: q' = 15 - q, z' = 15, s' = -s.
Then (q' - z')·s' = (-q)·(-s) = q·s: integer differences are exact in fp16 and negation is exact,
and IEEE round-to-nearest is symmetric, so every product, fma and sum exllamav2 forms is the
exact negation of one it would form for (q, z=0, s), and a negation of a negation. The
dequantized fp16 weight therefore equals ``dequantize_linear(..., torch.float16)`` value for
value (fp32: also exact, since (q - z)·s of an fp16 s fits in fp32), and the GEMM kernel's
output equals what it would give for a representable z = 0. The one visible difference: code
q = 0 in a flipped grid dequantizes to -0.0 where the reference has +0.0 (equal as values).

Not exportable as GPTQ (:class:`ExportError`): nonuniform grids, 2/3/8-bit, group sizes other
than -1 and powers of two ≥ 32 (when a layer has more than one group), in or out features not
multiples of 32, a g_idx exllamav2 would regroup differently, attention/MLP blocks quantized in
part, tensor dtypes exllamav2's loader does not know.

EXL2 (exllamav2's own format, and the only one ``ExLlamaV2.load_tp`` splits across GPUs:
``linear.py ExLlamaV2Linear.tp_split`` asserts EXL2 tensors and ``ext_qmatrix.cpp
make_q_matrix_split`` says "Tensor split not implemented for GPTQ matrices"). Its grid family:
codes q ∈ [0, 2^b) with the fixed zero 2^(b-1), one fp16 maximum M per group shared by all
outputs, and per (group, output) a 4-bit level i with scale fp16(fp16((i+1)²)·fp16(M/256))
(:func:`leanquant_serve.format.exl2.exl2_scales`). A free LeanQuant affine grid is not in it, so ``--grid exl2`` fits
LeanQuant's loss-error-aware objective inside it (``quantizer/grids.py fit_exl2``) and stores the
result as an ordinary affine checkpoint (z = 2^(b-1), s on the group's ladder) that every other
loader reads unchanged. :func:`convert_linear_exl2` recovers M and the levels from the stored
scales (:func:`exl2_levels`) and writes ``q_weight`` / ``q_scale`` / ``q_scale_max`` /
``q_groups`` / ``q_invperm`` as ``conversion/adaptivegptq.py AdaptiveGPTQ.pack`` does, for 2, 3,
4 and 8 bits, with act-order rows permuted as EXL2 does it natively. Not exportable as EXL2:
grids outside the family (refused, not approximated), groups that are not multiples of 32
rows, in or out features not multiples of 32, more than 65536 input rows (uint16 permutation).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..export import Exporter, ExportError, check_fused_parts, export
from ..format import (
    Checkpoint,
    LeanQuantConfig,
    infer_linear_shape,
    pack_codes,
    unpack_linear,
)
from ..format.exl2 import ladder_levels, on_exl2_ladder

log = logging.getLogger(__name__)

__all__ = [
    "ExLlamaV2ExportResult",
    "ExportError",
    "convert_linear",
    "export_exllamav2",
    "exllamav2_group_size",
    "gptq_quantization_config",
]

BITS = 4  # ext_qmatrix.cpp make_q_matrix: height = 8 * qweight.size(0)
MAXQ = (1 << BITS) - 1
KERNEL_ROWS = 32  # rows per step of reconstruct_gptq_kernel / gemm_half_q_half_gptq_kernel
OUT_MULTIPLE = 32  # ExLlamaV2Linear pads out_features to this (pad32)
MAX_PERM_ROWS = 1 << 16  # q_perm / q_invperm are uint16 (QMatrix::make_sequential)
# stloader.py convert_dtype: the only safetensors dtypes exllamav2 can read
LOADABLE_DTYPES = (torch.int32, torch.int16, torch.float16, torch.bfloat16, torch.float32)
# attn.py ExLlamaV2Attention.load / mlp.py ExLlamaV2MLP.load: quantized all together or not at all
# exllamav2 asserts "Partially quantized attention layer" / "... MLP layer".
QUANTIZED_TOGETHER = (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj"))
TOGETHER_WHY = "exllamav2 needs all or none of them quantized"


def quantized_together(present: Iterable[str]) -> list[list[str]]:
    """The linears of ``present`` (full names) that exllamav2 loads as one module, grouped per
    parent: its attention (q/k/v/o) and its MLP's gate/up. These are exllamav2's own module keys
    (its architecture table addresses every layer by them), so the table is the engine's fact,
    not a guess about the model; a model without these names is not one exllamav2 loads."""
    present = set(present)
    parents = sorted({n.rpartition(".")[0] for n in present})
    groups = []
    for parent in parents:
        for keys in QUANTIZED_TOGETHER:
            parts = [f"{parent}.{k}" for k in keys if f"{parent}.{k}" in present]
            if len(parts) > 1:
                groups.append(parts)
    return groups
CHECKPOINT_FORMAT = "gptq"  # v1 semantics: stored zero = z - 1 (not "gptq_v2")

# EXL2 (exllamav2's own format)
EXL2_BITS = (2, 3, 4, 8)  # EXL2 also has 5 and 6, which LeanQuant checkpoints do not store
EXL2_GROUP_ROWS = 32  # reconstruct_kernel / the EXL2 GEMMs switch groups every 32 rows
EXL2_MAX_GROUP_ROWS = (1 << 16) - 1  # q_group_map holds a group's remaining rows as uint16


@dataclass(frozen=True)
class ExLlamaV2ExportResult:
    out: Path
    format: str  # "gptq" or "exl2"
    quantization_config: dict[str, Any]
    layers: int  # quantized linears written
    grids: int  # (group, output) affine grids written
    negated: int  # of which stored flipped with a negated scale (z = 0; GPTQ only)
    g_idx_layers: int  # layers written with a g_idx (act-order with dynamic groups)


def exllamav2_group_size(height: int, groups: int) -> int:
    """``gptq_groupsize`` as ``QMatrix::QMatrix`` (cuda/q_matrix.cu) derives it: the smallest
    power of two p with p · groups ≥ height."""
    p = 1
    while p * groups < height:
        p *= 2
    return p


def _groups_of_rows(cfg: LeanQuantConfig, in_features: int, g_idx: Tensor | None) -> Tensor:
    """Our group of each input row (column of W): g_idx, or i // group_size, or 0."""
    if g_idx is not None:
        return g_idx.long()
    if cfg.group_size == -1:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // cfg.group_size


LayoutCheck = Callable[[LeanQuantConfig, str, int, int, "Tensor | None"], None]


def _rows_per_group(cfg: LeanQuantConfig, in_features: int, g_idx: Tensor | None) -> Tensor:
    """How many input rows each group holds."""
    groups = _groups_of_rows(cfg, in_features, g_idx).cpu()
    return torch.bincount(groups, minlength=cfg.n_groups(in_features))


def _is_sequential(cfg: LeanQuantConfig, g_idx: Tensor) -> bool:
    """Whether ``g_idx`` is the plain i // group_size (then it is not written)."""
    return torch.equal(g_idx.long().cpu(), torch.arange(g_idx.numel()) // cfg.group_size)


def _checked_g_idx(
    cfg: LeanQuantConfig, tensors: Mapping[str, Tensor], name: str, check: LayoutCheck
) -> Tensor | None:
    """The linear's g_idx (None when it is the plain i // group_size), after ``check`` of its
    layout for the target format. ``tensors`` may be meta tensors except ``g_idx``."""
    out_features, in_features = infer_linear_shape(cfg, tensors)
    g_idx = tensors.get("g_idx")
    if g_idx is not None and _is_sequential(cfg, g_idx):
        g_idx = None
    check(cfg, name, out_features, in_features, g_idx)
    return g_idx


def _check_layout(
    cfg: LeanQuantConfig, prefix: str, out_features: int, in_features: int, g_idx: Tensor | None
) -> None:
    """Raise ExportError unless exllamav2 maps every row of this linear to its own group."""
    if in_features % KERNEL_ROWS or out_features % OUT_MULTIPLE:
        raise ExportError(
            f"{prefix}: in_features={in_features}, out_features={out_features}: exllamav2's GPTQ "
            f"kernels step {KERNEL_ROWS} input rows at a time and pad outputs to a multiple of "
            f"{OUT_MULTIPLE}, so both must be multiples of 32"
        )
    groups = cfg.n_groups(in_features)
    p = exllamav2_group_size(in_features, groups)
    if groups > 1 and (p != cfg.group_size or p % KERNEL_ROWS):
        raise ExportError(
            f"{prefix}: group_size {cfg.group_size} with in_features {in_features}: exllamav2 "
            f"uses groups of {p} rows (the smallest power of two p with p*groups >= in) and "
            f"switches groups only every {KERNEL_ROWS} rows; use -1 or a power of two >= 32"
        )
    if g_idx is None:
        return
    if in_features > MAX_PERM_ROWS or p >= 1 << 15:
        raise ExportError(
            f"{prefix}: in_features={in_features} with g_idx: exllamav2 builds its act-order "
            "permutation in uint16 (at most 65536 rows, groups under 32768 rows)"
        )
    counts = _rows_per_group(cfg, in_features, g_idx)
    expected = torch.full((groups,), p, dtype=counts.dtype)
    expected[-1] = in_features - p * (groups - 1)
    if not torch.equal(counts, expected):
        raise ExportError(
            f"{prefix}: g_idx groups hold {counts.min().item()}..{counts.max().item()} rows; "
            f"exllamav2 sorts rows by group and cuts groups of {p} rows, so each must hold {p}"
        )


def convert_linear(
    cfg: LeanQuantConfig, tensors: Mapping[str, Tensor], prefix: str = ""
) -> tuple[dict[str, Tensor], int]:
    """One LeanQuant affine 4-bit linear as exllamav2 GPTQ tensors (suffix -> tensor) and the
    number of (group, output) grids stored flipped.

    ``qweight`` int32 (in/8, out), ``qzeros`` int32 (G, out/8) holding z - 1, ``scales`` fp16
    (G, out), ``g_idx`` int32 (in,) when it is not the plain i // group_size. Grids with z = 0
    are stored as q' = 15 - q, z' = 15, s' = -s (see the module docstring).
    """
    name = prefix or "linear"
    if cfg.grid != "affine":
        raise ExportError(f"{name}: grid {cfg.grid!r} is not affine")
    if cfg.bits != BITS:
        raise ExportError(f"{name}: {cfg.bits}-bit; exllamav2 reads 4-bit GPTQ codes only")
    g_idx = _checked_g_idx(cfg, tensors, name, _check_layout)
    u = unpack_linear(cfg, tensors)
    q, z, s = u["codes"], u["zeros"], u["scales"]  # (out, in), (G, out), (G, out)
    flip = z == 0  # (G, out)
    rows = _groups_of_rows(cfg, q.shape[1], u.get("g_idx")).to(q.device)
    flip_q = flip.t()[:, rows]  # (out, in): this code's grid is flipped
    q = torch.where(flip_q, MAXQ - q, q)
    z = torch.where(flip, MAXQ, z)
    s = torch.where(flip, -s, s)
    out = {
        "qweight": pack_codes(q.t(), BITS, dim=0),
        "qzeros": pack_codes(z - 1, BITS, dim=1),
        "scales": s.to(torch.float16).contiguous(),
    }
    if g_idx is not None:
        out["g_idx"] = g_idx.to(torch.int32).contiguous()
    return out, int(flip.sum())


# ----------------------------------------------------------------------------- EXL2


def exl2_levels(scales: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """(q_scale_max (G,) fp16, level (G, out) in [0, 16)) with ``exl2_scales(q_scale_max)[g,
    level[g, n]] == scales[g, n]`` for every grid (:func:`ladder_levels`), or ExportError."""
    scale_max, level, found = ladder_levels(scales)
    if not bool(found.all()):
        s = scales.to(torch.float16)
        if not (torch.isfinite(s).all() and (s > 0).all()):
            raise ExportError(f"{name}: EXL2 scales are positive and finite; these are not")
        g = int((~found).nonzero()[0])
        raise ExportError(
            f"{name}: the scales of group {g} are not (i+1)²·M/256 for one fp16 M (EXL2 allows "
            "16 scales per group); quantize with --grid exl2 for an exact EXL2 export"
        )
    return scale_max, level


def _exl2_check_layout(
    cfg: LeanQuantConfig, prefix: str, out_features: int, in_features: int, g_idx: Tensor | None
) -> None:
    """Raise ExportError unless EXL2 holds this linear's groups as they are."""
    if in_features % EXL2_GROUP_ROWS or out_features % OUT_MULTIPLE:
        raise ExportError(
            f"{prefix}: in_features={in_features}, out_features={out_features}: EXL2 packs 32 "
            f"input rows at a time and exllamav2 pads outputs to a multiple of {OUT_MULTIPLE}, "
            "so both must be multiples of 32"
        )
    if in_features > MAX_PERM_ROWS:
        raise ExportError(
            f"{prefix}: in_features={in_features}: EXL2's row permutation is uint16 "
            f"(at most {MAX_PERM_ROWS} rows)"
        )
    rows = _rows_per_group(cfg, in_features, g_idx)
    bad = (rows % EXL2_GROUP_ROWS != 0) | (rows == 0) | (rows > EXL2_MAX_GROUP_ROWS)
    if bad.any():
        g = int(bad.nonzero()[0])
        raise ExportError(
            f"{prefix}: group {g} has {int(rows[g])} input rows; EXL2 groups hold a positive "
            f"multiple of {EXL2_GROUP_ROWS} rows, at most {EXL2_MAX_GROUP_ROWS} "
            "(use group size -1 or a multiple of 32)"
        )


def convert_linear_exl2(
    cfg: LeanQuantConfig, tensors: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """One LeanQuant affine linear with EXL2-family grids as EXL2 tensors (suffix -> tensor).

    ``q_weight`` int32 (in·b/32, out): the codes of the input rows in storage order (grouped by
    group), packed 32 rows into b words per output as ``pack_tensor.cu pack_columns_kernel``
    (code j of a 32-row chunk at bit j·b of the chunk's little-endian words, which is
    :func:`pack_codes` along dim 0); ``q_scale`` int32 (G, out/8): the 4-bit levels, low nibble
    first (``pack_rows_4_kernel`` stores qs − 1 for qs ∈ [1, 16], i.e. the level);
    ``q_scale_max`` fp16 (G,); ``q_groups`` int16 (2G,): (bits, first packed row) per group;
    ``q_invperm`` int32 (in,): storage position of each input row (``module.py`` loads
    q_perm = argsort(q_invperm)).
    """
    name = prefix or "linear"
    if cfg.grid != "affine" or cfg.bits not in EXL2_BITS:
        raise ExportError(f"{name}: {cfg.bits}-bit {cfg.grid}: EXL2 holds affine 2/3/4/8-bit")
    g_idx = _checked_g_idx(cfg, tensors, name, _exl2_check_layout)
    u = unpack_linear(cfg, tensors)
    q, z, s = u["codes"], u["zeros"], u["scales"]  # (out, in), (G, out), (G, out)
    if not (z == 1 << (cfg.bits - 1)).all():
        raise ExportError(
            f"{name}: zero points other than {1 << (cfg.bits - 1)}: EXL2 codes are symmetric "
            "around 2^(bits-1); quantize with --grid exl2 for an exact EXL2 export"
        )
    scale_max, level = exl2_levels(s, name)
    in_features = q.shape[1]
    # storage order: input rows grouped by group, groups in order (identity without g_idx)
    order = torch.sort(_groups_of_rows(cfg, in_features, g_idx).cpu(), stable=True).indices
    rows = _rows_per_group(cfg, in_features, g_idx)
    starts = torch.cumsum(rows, 0) - rows  # first storage row of each group
    q_groups = torch.stack([torch.full_like(starts, cfg.bits), starts * cfg.bits // 32], 1)
    return {
        "q_weight": pack_codes(q.t()[order.to(q.device)], cfg.bits, dim=0),
        "q_scale": pack_codes(level.to(torch.int32), 4, dim=1),
        "q_scale_max": scale_max.contiguous(),
        "q_groups": q_groups.flatten().to(torch.int16),
        "q_invperm": torch.argsort(order).to(torch.int32),
    }


def exl2_quantization_config(cfg: LeanQuantConfig, meta: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json["quantization_config"]`` of an EXL2 export (the keys exllamav2's converter
    writes, ``conversion/compile.py``; exllamav2 itself reads none of them)."""
    return {
        "quant_method": "exl2",
        "bits": float(cfg.bits),
        "head_bits": 16,  # lm_head stays unquantized
        "group_size": cfg.group_size,
        "meta": dict(meta),
    }


def gptq_quantization_config(
    group_size: int, desc_act: bool, static_groups: bool, meta: Mapping[str, Any]
) -> dict[str, Any]:
    """``config.json["quantization_config"]`` of an export: GPTQ v1 keys (AutoGPTQ / GPTQModel
    style). exllamav2 reads only ``checkpoint_format``."""
    return {
        "quant_method": "gptq",
        "bits": BITS,
        "group_size": group_size,
        "desc_act": desc_act,
        "static_groups": static_groups,
        "sym": False,
        "true_sequential": True,
        "checkpoint_format": CHECKPOINT_FORMAT,
        "meta": dict(meta),
    }


EXPORT_FORMATS = ("auto", "gptq", "exl2")


def choose_format(src: Checkpoint, format: str) -> str:
    """Resolve "auto" from the stored tensors: EXL2 for a checkpoint whose grids are all on the
    EXL2 ladder (what ``--grid exl2`` writes, :func:`~leanquant_serve.format.exl2.on_exl2_ladder`)
    at a bit width EXL2 holds, GPTQ otherwise. (The quantizer's metadata in
    ``quantization_config["quantizer"]`` is informational and not consulted.)"""
    if format not in EXPORT_FORMATS:
        raise ExportError(f"format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if format != "auto":
        return format
    return "exl2" if src.qcfg.bits in EXL2_BITS and on_exl2_ladder(src) else "gptq"


def _plan(src: Checkpoint, prefixes: list[str], format: str) -> dict[str, bool]:
    """Check every layer (headers and g_idx only); prefix -> whether its g_idx is written
    (GPTQ) or its rows are permuted (EXL2)."""
    cfg = src.qcfg
    if cfg.grid != "affine":
        raise ExportError(
            f"grid {cfg.grid!r} stores a lookup table per row; exllamav2 loads affine GPTQ "
            "and EXL2 tensors only"
        )
    if format == "gptq" and cfg.bits != BITS:
        raise ExportError(
            f"{cfg.bits}-bit: exllamav2's GPTQ path reads 4-bit codes only "
            "(make_q_matrix: height = 8 * qweight rows, qzeros holds 8 zeros per word); "
            "EXL2 (--format exl2, from a checkpoint quantized with --grid exl2) holds 2/3/4/8 bits"
        )
    names = src.tensor_names()
    for name in names:
        dtype = src.meta(name).dtype
        if dtype not in LOADABLE_DTYPES:
            raise ExportError(
                f"{name}: dtype {dtype} cannot be read by exllamav2 "
                "(stloader.convert_dtype: I32, I16, F16, BF16, F32)"
            )
    present = {n.rpartition(".")[0] for n in names if n.endswith((".weight", ".qweight"))}
    check_fused_parts(set(prefixes), quantized_together(present), TOGETHER_WHY)
    check = _exl2_check_layout if format == "exl2" else _check_layout
    with_g_idx = {}
    for prefix in prefixes:
        t = src.linear_tensors(prefix, meta=True)
        if "g_idx" in t:
            t["g_idx"] = src.get(f"{prefix}.g_idx")
        with_g_idx[prefix] = _checked_g_idx(cfg, t, prefix, check) is not None
    return with_g_idx


def _fp16_bias(name: str, t: Tensor) -> Tensor:
    """make_q_matrix takes a GPTQ layer's bias only as fp16 (exllamav2 casts dense biases too)."""
    b = t.to(torch.float16)
    if not torch.isfinite(b).all():
        raise ExportError(f"{name}: not finite in float16, which exllamav2 requires")
    return b


class ExLlamaV2Exporter(Exporter):
    """GPTQ v1 or EXL2 tensors for exllamav2 0.3.2 (see the module docstring); ``format``
    as :func:`export_exllamav2` takes it."""

    def __init__(self, src: Checkpoint, prefixes: list[str], format: str = "auto") -> None:
        super().__init__(src, prefixes)
        self.format = choose_format(src, format)
        self.with_g_idx = _plan(src, prefixes, self.format)
        self.biases = {f"{p}.bias" for p in prefixes}
        self.grids = self.negated = 0

    def convert_tensor(self, name: str, tensor: Tensor) -> Tensor:
        return _fp16_bias(name, tensor) if name in self.biases else tensor

    def convert_linear(self, prefix: str) -> dict[str, Tensor]:
        cfg, linear = self.src.qcfg, self.src.linear_tensors(prefix)
        if self.format == "exl2":
            tensors, flipped = convert_linear_exl2(cfg, linear, prefix), 0
            self.grids += tensors["q_scale"].numel() * 8
        else:
            tensors, flipped = convert_linear(cfg, linear, prefix)
            self.grids += tensors["scales"].numel()
        self.negated += flipped
        return {f"{prefix}.{k}": v for k, v in tensors.items()}

    def quantization_config(self) -> dict[str, Any]:
        cfg = self.src.qcfg
        meta = {
            "exporter": "leanquant-serve export exllamav2",
            "target": f"exllamav2 0.3.2 {self.format.upper()} path",
            "grids": self.grids,
            "source_quantization_config": cfg.to_dict(),
        }
        if self.format == "exl2":
            return exl2_quantization_config(cfg, meta)
        meta["negated_scale_grids"] = self.negated
        desc_act = any(self.with_g_idx.values())
        return gptq_quantization_config(cfg.group_size, desc_act, cfg.static_groups, meta)


def export_exllamav2(
    src_dir: Path | str, out_dir: Path | str, *, overwrite: bool = False, format: str = "auto"
) -> ExLlamaV2ExportResult:
    """Write LeanQuant checkpoint ``src_dir`` to ``out_dir`` as a checkpoint that exllamav2
    0.3.2 loads with every weight equal to the reference dequantizer's; layer by layer,
    atomically (nothing is left behind on failure). ``format``: "gptq" (GPTQ v1, 4-bit
    affine), "exl2" (EXL2, 2/3/4/8-bit grids of the EXL2 family: ``--grid exl2``), or "auto"
    (EXL2 for ``--grid exl2`` checkpoints, else GPTQ).

    Raises :class:`ExportError` for what exllamav2 cannot hold exactly (see the module
    docstring), ``FormatError`` for a broken source or an existing ``out_dir`` without
    ``overwrite``.
    """
    make = functools.partial(ExLlamaV2Exporter, format=format)
    ex, out, qconfig = export(make, src_dir, out_dir, overwrite=overwrite)
    log.info(
        "exported %d quantized linears to %s (%s for exllamav2; %d of %d grids negated)",
        len(ex.prefixes),
        out,
        ex.format.upper(),
        ex.negated,
        ex.grids,
    )
    return ExLlamaV2ExportResult(
        out=out,
        format=ex.format,
        quantization_config=qconfig,
        layers=len(ex.prefixes),
        grids=ex.grids,
        negated=ex.negated,
        g_idx_layers=sum(ex.with_g_idx.values()),
    )
