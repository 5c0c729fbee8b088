"""The EXL2 scale ladder: the affine grids of exllamav2's EXL2 family, as a contract concept.

An affine LeanQuant grid is *on the EXL2 ladder* when its codes are symmetric (every zero point
is 2^(bits−1)) and, per group g, every row's scale is one of the 16 fp16 values
``exl2_scales(M_g)`` = (i+1)²·M_g/256 for one fp16 maximum M_g. Such a checkpoint is an
ordinary affine checkpoint (every loader reads it unchanged); it is also exactly expressible as
EXL2 tensors. The quantizer's ``exl2`` fit produces it (``quantizer/grids.py fit_exl2``) and
the exllamav2 exporter recognises it from the stored tensors (:func:`on_exl2_ladder`), so both
depend on this module and neither on the other. Nothing in ``quantization_config`` says a grid
is on the ladder: the tensors do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checkpoint import Checkpoint
from .packing import unpack_codes

EXL2_SCALE_LEVELS = 16  # q_scale is 4-bit (exllamav2 conversion/adaptivegptq.py: scale_bits 4)


def exl2_scales(scale_max: Tensor) -> Tensor:
    """The 16 scales EXL2 offers the outputs of a group with fp16 maximum ``scale_max`` (shape
    (...,) -> (..., 16) fp16), in exllamav2's arithmetic: ``ext.py make_q_matrix`` multiplies
    q_scale_max by 1/256 in fp16, ``cuda/quant/qdq_util.cuh dq_scale`` forms
    fp16((qs+1)²) · that in fp16 for the 4-bit level qs. Weights are then (q − 2^(b−1))·scale,
    one fp16 product (``reconstruct_kernel``: ``__hmul2(dq, qs_h2)``)."""
    m = scale_max.to(torch.float16) * (1 / 256)  # fp16 tensor × scalar: rounded to fp16
    levels = torch.arange(1, EXL2_SCALE_LEVELS + 1, device=m.device).square().to(torch.float16)
    return m[..., None] * levels  # fp16 × fp16, correctly rounded (the exact product fits fp32)


def ladder_levels(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(q_scale_max (G,) fp16, level (G, out) in [0, 16), found (G,) bool) with
    ``exl2_scales(q_scale_max)[g, level[g, n]] == scales[g, n]`` for every group g that is
    ``found``; scales that are not positive and finite are found nowhere.

    The maximum is recovered from each group's largest scale s_top: for every level i (15
    first) the fp16 values next to s_top/(i+1)² are tried as M/256 (M = 256·m is exact in
    fp16 and gives m back), and the first under which every scale of the group is on the
    ladder is taken. Several may fit (e.g. when every level used is odd); each gives the same
    scales, hence the same weights."""
    s = scales.to(torch.float16)
    found = torch.zeros(s.shape[0], dtype=torch.bool)
    scale_max = torch.zeros(s.shape[0], dtype=torch.float16)
    level = torch.zeros(s.shape, dtype=torch.long)
    if not (torch.isfinite(s).all() and (s > 0).all()):
        return scale_max, level, found
    s = s.float()  # fp16 values, compared exactly
    top = s.amax(1)  # (G,)
    levels = torch.arange(1, EXL2_SCALE_LEVELS + 1, dtype=torch.float32).square()
    m0 = (top[:, None] / levels).to(torch.float16).view(torch.int16)  # (G, 16) fp16 bit patterns
    for i in reversed(range(EXL2_SCALE_LEVELS)):  # the largest scale is usually level 15
        for ulps in (0, -1, 1, -2, 2):  # positive fp16: the bit pattern orders the values
            m = (m0[:, i].int() + ulps).clamp(1, 0x7BFF).to(torch.int16).view(torch.float16)
            M = m * 256  # exact: a power-of-two multiple, below fp16's maximum
            ladder = exl2_scales(M).float()  # (G, 16)
            idx = torch.searchsorted(ladder, s).clamp_max(EXL2_SCALE_LEVELS - 1)
            ok = (ladder.gather(1, idx) == s).all(1) & ~found
            scale_max = torch.where(ok, M, scale_max)
            level = torch.where(ok[:, None], idx, level)
            found |= ok
        if found.all():
            break
    return scale_max, level, found


def on_exl2_ladder(ckpt: Checkpoint) -> bool:
    """Whether every quantized linear of ``ckpt`` has an affine grid on the EXL2 ladder
    (symmetric zero points, every group's scales on one ladder). Reads the scales and zero
    points only, and stops at the first linear that is off the ladder."""
    cfg = ckpt.qcfg
    prefixes = ckpt.quantized_prefixes()
    if cfg.grid != "affine" or not prefixes:
        return False
    for prefix in prefixes:
        zeros = unpack_codes(ckpt.get(f"{prefix}.zero_points"), cfg.bits, dim=1)
        if not bool((zeros == 1 << (cfg.bits - 1)).all()):
            return False
        if not bool(ladder_levels(ckpt.get(f"{prefix}.scales"))[2].all()):
            return False
    return True
