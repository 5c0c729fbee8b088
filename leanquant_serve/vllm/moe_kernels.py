"""Which stored experts vLLM's WNA16 MoE kernels take, from the checkpoint's config alone.

One home for the rule, read by the plugin's fused-MoE method (``moe.wna16_misfit``, at load,
which adds the runtime conditions: platform, activation dtype, biases) and by the planner
(``vllm/plan.py``: stored-size experts on GPUs vs the portable path's 16-bit experts). No
vLLM import, so the planner stays light.

Source: vLLM 0.32 ``fused_moe/oracle/int_wna16.py`` (the WNA16 MoE kernel selection) and
``compressed_tensors_moe_wna16.py``: 4-bit with zero points (asymmetric) is taken (Marlin MoE
on sm75+, else Triton WNA16); its int8 MoE kernels take symmetric weights only, and the
contract always stores zero points, so 8-bit experts are refused by the selection; no kernel
takes 2/3-bit weights, ``g_idx`` or learned/fixed tables.
"""

from __future__ import annotations

from ..format import LeanQuantConfig

WNA16_MOE_BITS = (4,)  # what vLLM 0.32's WNA16 MoE selection accepts with zero points


def wna16_moe_config_misfit(qcfg: LeanQuantConfig) -> str | None:
    """Why experts stored with ``qcfg`` cannot go to vLLM's WNA16 MoE kernels on CUDA
    (None: they can, subject to the runtime checks of ``moe.wna16_misfit``)."""
    if qcfg.grid == "nonuniform":
        return "no vLLM MoE kernel takes learned per-row tables"
    if qcfg.grid == "table":
        return "no vLLM MoE kernel takes a fixed table with a per-group scale"
    if qcfg.bits not in WNA16_MOE_BITS:
        return (
            f"vLLM's WNA16 MoE kernels take 4-bit weights with zero points, not {qcfg.bits}-bit"
            + (" (vLLM's int8 MoE kernels are symmetric only)" if qcfg.bits == 8 else "")
        )
    if qcfg.uses_g_idx:
        return "act-order with dynamic groups (g_idx): vLLM >= 0.32's MoE kernels take no g_idx"
    return None
