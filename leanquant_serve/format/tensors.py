"""Names, shapes and dtypes of the tensors of one quantized linear, and the reference dequantizer.

Layout convention: the dense weight W is (out_features, in_features) = (rows, columns) and the
codes q are (out, in) integers in [0, 2**bits). A quantized linear ``prefix`` is stored as
``prefix + "." + suffix``:

- ``qweight``      int32 (in * bits // 32, out): q transposed to (in, out), packed along dim 0.
- ``scales``       float16 (n_groups, out)                               [affine, table]
- ``zero_points``  int32 (n_groups, out * bits // 32): integer zero points z packed along
  dim 1, stored as the true z; w = (q - z) * s                          [affine]
- ``g_idx``        int32 (in,): group of each input column               [cfg.uses_g_idx]
- ``lut``          float16 (out, 2**bits): w[o, i] = lut[o, q[o, i]]     [nonuniform]

A table grid stores ``qweight`` and ``scales`` (and ``g_idx``) only: w[o, i] =
float32(table[q[o, i]]) · float32(s[g, o]), the table from ``quantization_config.table``.

The zero points are deliberately not named ``qzeros``: loaders that key on GPTQ tensor names
(exllamav2) assume GPTQ v1's stored z - 1 and would silently load every zero off by one;
with a different name they fail loudly instead (see docs/engine-notes.md, E).

Without ``g_idx``, column i belongs to group i // group_size (group_size -1: a single group).
A bias, if any, is stored unquantized as ``prefix + ".bias"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import FormatError, LeanQuantConfig, group_misfit
from .packing import check_code_range, chunk_size, pack_codes, unpack_codes

QUANT_SUFFIXES = ("qweight", "scales", "zero_points", "g_idx", "lut")


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _name(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def _specs(
    cfg: LeanQuantConfig, in_features: int, out_features: int, prefix: str = ""
) -> dict[str, TensorSpec]:
    n = chunk_size(cfg.bits)
    if in_features <= 0 or in_features % n:
        raise FormatError(
            f"{_name(prefix, 'qweight')}: in_features={in_features} is not a positive multiple "
            f"of {n} ({cfg.bits}-bit packing)"
        )
    why = group_misfit(cfg.group_size, in_features)
    if why:
        raise FormatError(f"{_name(prefix, 'qweight')}: {why}")
    specs = {"qweight": TensorSpec((in_features * cfg.bits // 32, out_features), torch.int32)}
    if cfg.grid == "nonuniform":
        specs["lut"] = TensorSpec((out_features, 1 << cfg.bits), torch.float16)
        return specs
    groups = cfg.n_groups(in_features)
    if cfg.grid == "table":
        specs["scales"] = TensorSpec((groups, out_features), torch.float16)
        if cfg.uses_g_idx:
            specs["g_idx"] = TensorSpec((in_features,), torch.int32)
        return specs
    if out_features % n:
        raise FormatError(
            f"{_name(prefix, 'zero_points')}: out_features={out_features} is not a multiple "
            f"of {n} ({cfg.bits}-bit packing)"
        )
    groups = cfg.n_groups(in_features)
    specs["scales"] = TensorSpec((groups, out_features), torch.float16)
    specs["zero_points"] = TensorSpec((groups, out_features * cfg.bits // 32), torch.int32)
    if cfg.uses_g_idx:
        specs["g_idx"] = TensorSpec((in_features,), torch.int32)
    return specs


def linear_specs(
    cfg: LeanQuantConfig, in_features: int, out_features: int
) -> dict[str, TensorSpec]:
    """Suffix -> spec of every tensor a quantized (out_features, in_features) linear stores."""
    return _specs(cfg, in_features, out_features)


def _check_arg(name: str, t: Tensor, shape: tuple[int, ...], integer: bool) -> None:
    if tuple(t.shape) != shape:
        raise FormatError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
    if integer == (t.dtype.is_floating_point or t.dtype == torch.bool):
        raise FormatError(
            f"{name}: dtype {t.dtype} is not {'an integer' if integer else 'a float'} type"
        )


def _check_g_idx(g_idx: Tensor, groups: int, name: str = "g_idx") -> None:
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise FormatError(f"{name}: group indices outside [0, {groups})")


def _to_fp16(name: str, t: Tensor) -> Tensor:
    t = t.to(torch.float16).contiguous()
    if not torch.isfinite(t).all():
        raise FormatError(f"{name}: not finite in float16")
    return t


def pack_linear(
    cfg: LeanQuantConfig,
    codes: Tensor,
    *,
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    lut: Tensor | None = None,
    g_idx: Tensor | None = None,
) -> dict[str, Tensor]:
    """Suffix -> stored tensor for one linear, exactly as :func:`linear_specs` declares.

    ``codes`` (out, in) int; affine: ``scales`` (n_groups, out) float and ``zeros``
    (n_groups, out) int in [0, 2**bits), plus ``g_idx`` (in,) int iff ``cfg.uses_g_idx``;
    table: ``scales`` (and ``g_idx``) as affine, no zeros; nonuniform: ``lut`` (out, 2**bits)
    float. Floats are cast to float16.
    """
    if codes.dim() != 2:
        raise FormatError(f"codes: shape {tuple(codes.shape)} is not (out_features, in_features)")
    out_features, in_features = codes.shape
    specs = linear_specs(cfg, in_features, out_features)
    given = {"scales": scales, "zeros": zeros, "lut": lut, "g_idx": g_idx}
    wanted = {"nonuniform": {"lut"}, "table": {"scales"}}.get(cfg.grid, {"scales", "zeros"})
    if cfg.uses_g_idx:
        wanted.add("g_idx")
    for arg, value in given.items():
        if (value is None) == (arg in wanted):
            need = "requires" if arg in wanted else "does not take"
            raise FormatError(
                f"{arg}: grid {cfg.grid!r} (uses_g_idx={cfg.uses_g_idx}) {need} this argument"
            )
    out = {"qweight": pack_codes(codes.t(), cfg.bits, dim=0)}
    if cfg.grid == "nonuniform":
        _check_arg("lut", lut, specs["lut"].shape, integer=False)
        out["lut"] = _to_fp16("lut", lut)
        return out
    groups = specs["scales"].shape[0]
    _check_arg("scales", scales, specs["scales"].shape, integer=False)
    out["scales"] = _to_fp16("scales", scales)
    if cfg.grid == "affine":
        _check_arg("zeros", zeros, (groups, out_features), integer=True)
        check_code_range("zeros", zeros, cfg.bits)
        out["zero_points"] = pack_codes(zeros, cfg.bits, dim=1)
    if g_idx is not None:
        _check_arg("g_idx", g_idx, (in_features,), integer=True)
        _check_g_idx(g_idx, groups)
        out["g_idx"] = g_idx.to(torch.int32).contiguous()
    return out


def infer_linear_shape(cfg: LeanQuantConfig, tensors: Mapping[str, Tensor]) -> tuple[int, int]:
    """(out_features, in_features) implied by the stored ``qweight``."""
    qweight = tensors.get("qweight")
    if qweight is None:
        raise FormatError("qweight: missing")
    if qweight.dim() != 2 or (qweight.shape[0] * 32) % cfg.bits:
        raise FormatError(
            f"qweight: shape {tuple(qweight.shape)} is not "
            f"(in_features * {cfg.bits} // 32, out_features)"
        )
    return qweight.shape[1], qweight.shape[0] * 32 // cfg.bits


def check_linear(cfg: LeanQuantConfig, prefix: str, tensors: Mapping[str, Tensor]) -> None:
    """Check suffix -> tensor ``tensors`` of linear ``prefix`` against :func:`linear_specs`.

    Shapes are checked against those implied by ``qweight``; every error names the full
    tensor name ``prefix.suffix``.
    """
    qweight = _name(prefix, "qweight")
    try:
        out_features, in_features = infer_linear_shape(cfg, tensors)
    except FormatError as e:
        raise FormatError(f"{prefix + '.' if prefix else ''}{e}") from None
    specs = _specs(cfg, in_features, out_features, prefix)
    for suffix in sorted(set(specs) | set(tensors)):
        name = _name(prefix, suffix)
        if suffix not in tensors:
            raise FormatError(f"{name}: missing (grid {cfg.grid!r}, uses_g_idx={cfg.uses_g_idx})")
        if suffix not in specs:
            raise FormatError(
                f"{name}: unexpected (grid {cfg.grid!r}, uses_g_idx={cfg.uses_g_idx})"
            )
        t, spec = tensors[suffix], specs[suffix]
        if tuple(t.shape) != spec.shape:
            raise FormatError(
                f"{name}: shape {tuple(t.shape)}, expected {spec.shape} for {qweight} of shape "
                f"{tuple(tensors['qweight'].shape)} (out={out_features}, in={in_features})"
            )
        if t.dtype != spec.dtype:
            raise FormatError(f"{name}: dtype {t.dtype}, expected {spec.dtype}")


def scales_on_every_rank(cfg: LeanQuantConfig) -> bool:
    """The contract's scale-replication rule for a row-parallel (input-split) shard: per-channel
    and act-order (``g_idx``) affine layers keep every group's scales and zero points on every
    rank; otherwise a rank holds the groups of its input slice."""
    return cfg.grid in ("affine", "table") and (cfg.group_size == -1 or cfg.uses_g_idx)


SHARD_WORDS_IN, SHARD_GROUPS, SHARD_WORDS_OUT = "qweight words", "groups", "zero_point words"


def shard_misfits(cfg: LeanQuantConfig, in_part: int, out_parts: Sequence[int] = ()) -> list[str]:
    """The contract's tensor-parallel partition rule, pure: what a shard of ``in_part`` input
    features and ``out_parts`` output partitions would split, in this order:
    :data:`SHARD_WORDS_IN` (``in_part`` not a multiple of the codes per packed word),
    :data:`SHARD_GROUPS` (a group cut between ranks; ``g_idx`` layers keep all groups),
    :data:`SHARD_WORDS_OUT` (affine zero points are packed along the output). Empty: it fits.
    The vLLM plugin (at load) and the planner (before buying GPUs) both ask this."""
    n = chunk_size(cfg.bits)
    problems = []
    if in_part % n:
        problems.append(SHARD_WORDS_IN)
    if not cfg.uses_g_idx and group_misfit(cfg.group_size, in_part):
        problems.append(SHARD_GROUPS)
    if cfg.grid == "affine" and any(o % n for o in out_parts):
        problems.append(SHARD_WORDS_OUT)
    return problems


def unpack_linear(cfg: LeanQuantConfig, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`pack_linear`: ``codes`` (out, in) int32 and, as the grid has them,
    ``scales`` (n_groups, out) fp16, ``zeros`` (n_groups, out) int32 (affine), ``g_idx`` (in,)
    int32, ``lut`` (out, 2**bits) fp16."""
    check_linear(cfg, "", tensors)
    out = {"codes": unpack_codes(tensors["qweight"], cfg.bits, dim=0).t().contiguous()}
    if cfg.grid == "nonuniform":
        out["lut"] = tensors["lut"]
        return out
    out["scales"] = tensors["scales"]
    if cfg.grid == "affine":
        out["zeros"] = unpack_codes(tensors["zero_points"], cfg.bits, dim=1)
    if "g_idx" in tensors:
        _check_g_idx(tensors["g_idx"], out["scales"].shape[0])
        out["g_idx"] = tensors["g_idx"]
    return out


def dequantize_linear(
    cfg: LeanQuantConfig, tensors: Mapping[str, Tensor], dtype: torch.dtype = torch.float32
) -> Tensor:
    """The reference dequantizer: dense (out, in) weight of one stored linear.

    Affine: w[o, i] = (q[o, i] - z[g, o]) * s[g, o] with g = g_idx[i], or i // group_size without
    ``g_idx``. Table: w[o, i] = table[q[o, i]] * s[g, o] (the float32 product of the float32
    table entry and the fp16 scale, as bitsandbytes' ``dequantize_4bit`` forms it). Nonuniform:
    w[o, i] = lut[o, q[o, i]]. Computed in fp32, then cast to ``dtype``.
    """
    u = unpack_linear(cfg, tensors)
    q = u["codes"]
    if cfg.grid == "nonuniform":
        return torch.gather(u["lut"].float(), 1, q.long()).to(dtype)
    in_features = q.shape[1]
    if "g_idx" in u:
        g = u["g_idx"].long()
    elif cfg.group_size == -1:
        g = torch.zeros(in_features, dtype=torch.long, device=q.device)
    else:
        g = torch.arange(in_features, device=q.device) // cfg.group_size
    s = u["scales"].float().t()[:, g]  # (out, in)
    if cfg.grid == "table":
        table = torch.tensor(cfg.table, dtype=torch.float32, device=q.device)
        return (table[q.long()] * s).to(dtype)
    z = u["zeros"].t()[:, g]
    return ((q - z).float() * s).to(dtype)
