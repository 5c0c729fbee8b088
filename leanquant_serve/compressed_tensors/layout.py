"""One home for the layout rule between the LeanQuant contract and compressed-tensors
``pack-quantized``: each tensor is the other's transpose over its last two dimensions.

The contract stores ``qweight`` (…, K*b/32, N), ``scales`` (…, G, N), ``zero_points``
(…, G, N*b/32) (K inputs, N outputs, G groups; one linear, or E stacked experts in front);
compressed-tensors stores ``weight_packed`` (…, N, K*b/32), ``weight_scale`` (…, N, G),
``weight_zero_point`` (…, N*b/32, G). compressed-tensors' ``pack_to_int32`` puts 32/b codes per
int32 word, code j at bits [j*b, (j+1)*b), along K for weights and along N for zero points, and
stores the unsigned code (signed + 2**(b-1)) and the true zero point, w = (q - z)·s: for
b in {2, 4, 8} that is the contract's bitstream and values, so the transpose is exact. Checked
against compressed-tensors 0.17.0 and vLLM 0.32 (``CompressedTensorsWNA16`` and
``CompressedTensorsWNA16MoEMethod``). Used by the export (``export.py``, per linear) and the
vLLM plugin's hand-over of experts to vLLM's WNA16 MoE kernels (``vllm/moe.py``, stacked).
"""

from __future__ import annotations

import torch


def to_pack_quantized(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(``weight_packed``, ``weight_scale``, ``weight_zero_point``) from the contract's
    (``qweight``, ``scales``, ``zero_points``), each transposed over its last two dimensions
    and contiguous; scales cast to ``scale_dtype`` if given (exact for float16 and float32);
    ``zero_points`` None (symmetric export) gives None."""
    packed = qweight.transpose(-2, -1).contiguous()
    scale = scales.transpose(-2, -1)
    scale = (scale if scale_dtype is None else scale.to(scale_dtype)).contiguous()
    zp = None if zero_points is None else zero_points.transpose(-2, -1).contiguous()
    return packed, scale, zp
