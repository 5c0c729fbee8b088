"""Export a LeanQuant checkpoint as a GPTQ checkpoint that exllamav2 (v0.3.2) loads exactly.

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

Not exportable (:class:`ExportError`): nonuniform grids, 2/3/8-bit, group sizes other than -1
and powers of two ≥ 32 (when a layer has more than one group), in or out features not multiples
of 32, a g_idx exllamav2 would regroup differently, attention/MLP blocks quantized in part,
tensor dtypes exllamav2's loader does not know.

EXL2 (exllamav2's own format, and the only one ``ExLlamaV2.load_tp`` splits across GPUs:
``linear.py ExLlamaV2Linear.tp_split`` asserts EXL2 tensors and ``ext_qmatrix.cpp
make_q_matrix_split`` says "Tensor split not implemented for GPTQ matrices") is not written: see
:data:`EXL2_REASON`. What a mapping would cost, measured once with a throwaway script that is
not in this repository (so no command here reproduces these two figures), on
``out/smollm2-leanquant-w4g64``
(SmolLM2-135M, LeanQuant affine 4-bit, g64; squared weight error summed over all 210 linears,
relative to that checkpoint's own ‖W - Q‖²): keeping every q - z exactly in 5-bit EXL2 codes
and only moving each scale to the nearest EXL2 level (max = the group's largest scale) adds
29 % (‖W - Q̂‖² = 1.29×) at 5 bits per weight; re-rounding to 4-bit EXL2 (best of the 16
levels per output) adds 56 % (1.56×). A quantizer option that learns inside EXL2's family would
fit, per group, one fp16 maximum shared by all outputs and per output a 4-bit level index
(scale (qs+1)²·max/256) with the fixed zero 2**(b-1), search LeanQuant's loss-aware range over
those 16 admissible scales instead of free (s, z), and write q_weight / q_invperm / q_scale /
q_scale_max / q_groups (rows permuted, stored in bit-width order) as exllamav2's
``conversion`` code does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..format import (
    QUANT_SUFFIXES,
    Checkpoint,
    CheckpointWriter,
    LeanQuantConfig,
    infer_linear_shape,
    pack_codes,
    unpack_linear,
)
from . import ExportError, open_source

log = logging.getLogger(__name__)

__all__ = [
    "EXL2_REASON",
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
QUANTIZED_TOGETHER = (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj"))
CHECKPOINT_FORMAT = "gptq"  # v1 semantics: stored zero = z - 1 (not "gptq_v2")

EXL2_REASON = (
    "EXL2 is not written: its codes are symmetric (fixed zero 2**(b-1)) and its per-(group, "
    "output) scale is (qs+1)**2 * q_scale_max[g] / 256 with a 4-bit qs and one fp16 maximum "
    "per group shared by all outputs (conversion/adaptivegptq.py, cuda/quant/qdq_util.cuh "
    "dq_scale), so a LeanQuant affine grid (free fp16 scale and zero per group and output) maps "
    "onto it only approximately; exllamav2's tensor parallelism (load_tp) needs EXL2, GPTQ "
    "tensors can only be split by layers across GPUs (model.load(gpu_split) / load_autosplit)"
)


@dataclass(frozen=True)
class ExLlamaV2ExportResult:
    out: Path
    quantization_config: dict[str, Any]
    layers: int  # quantized linears written
    grids: int  # (group, output) affine grids written
    negated: int  # of which stored flipped with a negated scale (z = 0)
    g_idx_layers: int  # layers written with a g_idx (act-order with dynamic groups)


@dataclass(frozen=True)
class _ConfigForWriter:
    """What ``CheckpointWriter.finalize`` needs of its ``qcfg`` argument: ``to_dict()``."""

    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.config


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


def _is_sequential(cfg: LeanQuantConfig, g_idx: Tensor) -> bool:
    """Whether ``g_idx`` is the plain i // group_size (then it is not written)."""
    return torch.equal(g_idx.long().cpu(), torch.arange(g_idx.numel()) // cfg.group_size)


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
    counts = torch.bincount(g_idx.long().cpu(), minlength=groups)
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
    out_features, in_features = infer_linear_shape(cfg, tensors)
    g_idx = tensors.get("g_idx")
    if g_idx is not None and _is_sequential(cfg, g_idx):
        g_idx = None
    _check_layout(cfg, name, out_features, in_features, g_idx)
    u = unpack_linear(cfg, tensors)
    q, z, s = u["codes"], u["zeros"], u["scales"]  # (out, in), (G, out), (G, out)
    flip = z == 0  # (G, out)
    rows = _groups_of_rows(cfg, in_features, u.get("g_idx")).to(q.device)
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


def _check_together(quantized: set[str], present: set[str]) -> None:
    """exllamav2 asserts "Partially quantized attention layer" / "... MLP layer"."""
    for name in sorted(quantized):
        parent, dot, leaf = name.rpartition(".")
        for group in QUANTIZED_TOGETHER:
            if leaf not in group:
                continue
            parts = [f"{parent}{dot}{g}" for g in group if f"{parent}{dot}{g}" in present]
            if not all(p in quantized for p in parts):
                raise ExportError(
                    f"{parent}: {', '.join(p.rpartition('.')[2] for p in parts)} are quantized "
                    "only in part; exllamav2 needs all or none of them quantized"
                )


def _plan(src: Checkpoint, prefixes: list[str]) -> dict[str, bool]:
    """Check every layer (headers and g_idx only); prefix -> whether its g_idx is written."""
    cfg = src.qcfg
    if cfg.grid != "affine":
        raise ExportError(
            f"grid {cfg.grid!r} stores a lookup table per row; exllamav2 loads affine GPTQ "
            "(or its own EXL2) tensors only"
        )
    if cfg.bits != BITS:
        raise ExportError(
            f"{cfg.bits}-bit: exllamav2's GPTQ path reads 4-bit codes only "
            "(make_q_matrix: height = 8 * qweight rows, qzeros holds 8 zeros per word)"
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
    _check_together(set(prefixes), present)
    with_g_idx = {}
    for prefix in prefixes:
        t = src.linear_tensors(prefix, meta=True)
        out_features, in_features = infer_linear_shape(cfg, t)
        g_idx = src.get(f"{prefix}.g_idx") if "g_idx" in t else None
        if g_idx is not None and _is_sequential(cfg, g_idx):
            g_idx = None
        _check_layout(cfg, prefix, out_features, in_features, g_idx)
        with_g_idx[prefix] = g_idx is not None
    return with_g_idx


def _fp16_bias(name: str, t: Tensor) -> Tensor:
    """make_q_matrix takes a GPTQ layer's bias only as fp16 (exllamav2 casts dense biases too)."""
    b = t.to(torch.float16)
    if not torch.isfinite(b).all():
        raise ExportError(f"{name}: not finite in float16, which exllamav2 requires")
    return b


def export_exllamav2(
    src_dir: Path | str, out_dir: Path | str, *, overwrite: bool = False
) -> ExLlamaV2ExportResult:
    """Write LeanQuant checkpoint ``src_dir`` to ``out_dir`` as a GPTQ (v1) checkpoint that
    exllamav2 0.3.2 loads with every weight equal to the reference dequantizer's; layer by
    layer, atomically (nothing is left behind on failure).

    Raises :class:`ExportError` for what exllamav2 cannot hold exactly (see the module
    docstring), ``FormatError`` for a broken source or an existing ``out_dir`` without
    ``overwrite``.
    """
    src, out, prefixes = open_source(src_dir, out_dir)
    cfg = src.qcfg
    with_g_idx = _plan(src, prefixes)

    stored = {f"{p}.{s}" for p in prefixes for s in QUANT_SUFFIXES}
    biases = {f"{p}.bias" for p in prefixes}
    hf_config = {k: v for k, v in src.hf_config.items() if k != "quantization_config"}
    grids = negated = 0
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        for name in src.tensor_names():
            if name in biases:
                writer.add({name: _fp16_bias(name, src.get(name))})
            elif name not in stored:
                writer.add({name: src.get(name)})
            elif name.endswith(".qweight"):
                prefix = name.removesuffix(".qweight")
                tensors, flipped = convert_linear(cfg, src.linear_tensors(prefix), prefix)
                writer.add({f"{prefix}.{k}": v for k, v in tensors.items()})
                grids += tensors["scales"].numel()
                negated += flipped
        meta = {
            "exporter": "leanquant-serve export exllamav2",
            "target": "exllamav2 0.3.2 GPTQ path",
            "negated_scale_grids": negated,
            "grids": grids,
            "source_quantization_config": cfg.to_dict(),
        }
        desc_act = any(with_g_idx.values())
        qconfig = gptq_quantization_config(cfg.group_size, desc_act, cfg.static_groups, meta)
        writer.finalize(hf_config, _ConfigForWriter(qconfig), copy_from=src.path)
    log.info(
        "exported %d quantized linears to %s (GPTQ for exllamav2; %d of %d grids negated)",
        len(prefixes),
        out,
        negated,
        grids,
    )
    return ExLlamaV2ExportResult(
        out=out,
        quantization_config=qconfig,
        layers=len(prefixes),
        grids=grids,
        negated=negated,
        g_idx_layers=sum(with_g_idx.values()),
    )
