"""The fused-MoE method of the ``leanquant`` vLLM plugin: LeanQuant experts in vLLM's
``FusedMoE`` layers (``RoutedExperts``).

The quantizer stores every expert linear as its own linear of the contract
(``leanquant_serve.format``), under the per-expert names vLLM's ``expert_params_mapping``
loads (Mixtral ``…experts.E.w1|w2|w3``, Qwen3-MoE ``…experts.E.gate_proj|up_proj|down_proj``).
This method creates vLLM's stacked per-layer parameters for them, so the checkpoint name
``…experts.E.<gate>.qweight`` lands in ``…experts.w13_qweight[E]`` (shard ``w1``):

==================  ===================================  ===============================
parameter           shape (per rank)                     sharded (tensor parallel)
==================  ===================================  ===============================
``w13_qweight``     (E, H*b/32, S*I) int32               output (I), gate then up
``w13_scales``      (E, G_H, S*I) fp16                   output
``w13_zero_points`` (E, G_H, S*I*b/32) int32             output (packed words)
``w13_g_idx``       (E, S, H) int32 (one per part)       not sharded
``w13_lut``         (E, S*I, 2**b) fp16                  output rows
``w2_qweight``      (E, I*b/32, H) int32                 input (I)
``w2_scales``       (E, G_I, H) fp16                     input groups (all, when
                                                         ``scales_on_every_rank``)
``w2_zero_points``  (E, G_I, H*b/32) int32               as ``w2_scales``
``w2_g_idx``        (E, I) int32                         input
``w2_lut``          (E, H, 2**b) fp16                    not sharded
==================  ===================================  ===============================

H is the hidden size, I the expert intermediate size of this rank, S = 2 for gated
activations (w1 = gate, w3 = up) and 1 otherwise, E the experts of this rank (expert
parallelism maps global to local ids through vLLM's expert map). qweight, scales and zero
points go through vLLM's own ``RoutedExperts.weight_loader`` (GPTQ's K-first layout:
``is_transposed``); g_idx and lut, which that loader does not know, through loaders here that
slice them the same way. A shard that would split a group or a packed word is refused by the
contract's rule (``format.shard_misfits``), as for dense layers.

Compute, chosen per layer by :func:`moe_method` (the reason logged once per kind of layer):

- **vLLM's WNA16 MoE kernels** (CUDA; affine 4- or 8-bit experts without ``g_idx``, 16-bit
  activations): after loading, the experts are handed to vLLM's own compressed-tensors WNA16
  MoE method (``CompressedTensorsWNA16MoEMethod``, asymmetric ``QuantizationArgs``), whose
  oracle picks the kernel (Marlin MoE on sm75+ for int4, else Triton WNA16, ...) and whose
  ``process_weights_after_loading`` repacks for it (Marlin: ``gptq_marlin_moe_repack``,
  ``marlin_moe_permute_scales``, ``moe_packed_to_marlin_zero_points``). Our tensors become
  its N-first layout by a transpose (:func:`to_compressed_tensors`: the codes, words and
  values do not change); the experts stay packed on the GPU. Written against vLLM 0.32's API,
  not run on a GPU. vLLM 0.32's int8 MoE kernels are symmetric only, so 8-bit experts (which
  store zero points) find no backend there and run the portable path.
- **portable** (every other case, and on every other platform): after loading, every
  expert is dequantized with the reference dequantizer's arithmetic (``kernels.portable``)
  to the activation dtype, and vLLM's unquantized fused-MoE path runs the dense experts (on
  CPU its grouped-GEMM kernel). The experts then take the memory of an unquantized model (the
  quantized tensors are freed). ``LEANQUANT_MOE_KERNEL=portable`` forces it everywhere.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_wna16 import (  # noqa: E501
    CompressedTensorsWNA16MoEMethod,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from ..compressed_tensors.layout import to_pack_quantized
from ..format import FormatError, fused_misfit
from ..format.tensors import scales_on_every_rank
from ..kernels import portable
from .linear import KERNEL_ACT_DTYPES, PORTABLE, _LeanQuantLinearMethod, _log_once
from .moe_kernels import wna16_moe_config_misfit

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

    from ..format import LeanQuantConfig
    from .config import LeanQuantVLLMConfig

logger = init_logger(f"vllm.{__name__}")

SHARD_NAMES = {"w1": "gate", "w3": "up", "w2": "down"}
MOE_KERNEL_ENV = "LEANQUANT_MOE_KERNEL"  # auto (default) | portable


def expert_linears(layer: RoutedExperts, prefix: str) -> list[str]:
    """Checkpoint names of every expert linear of MoE layer ``prefix`` (``…experts``):
    ``prefix.E.<gate|up|down>`` for each logical expert E, with the layer's own checkpoint
    projection names (``ckpt_gate_proj_name`` etc.: Mixtral w1/w3/w2)."""
    parts = [layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name, layer.ckpt_down_proj_name]
    n = layer.moe_config.num_logical_experts
    return [f"{prefix}.{e}.{p}" for e in range(n) for p in parts if p]


def experts_quantized(config: LeanQuantVLLMConfig, layer: RoutedExperts, prefix: str) -> bool:
    """Whether the experts of MoE layer ``prefix`` are stored quantized: all of them or none
    (the contract's ``fused_misfit`` rule: vLLM runs them as one layer); a mix is an error."""
    names = expert_linears(layer, prefix)
    if config.quantized is None:
        quantized = {n for n in names if not config.qcfg.is_skipped(n)}
    else:
        quantized = config.quantized
    done = [n for n in names if n in quantized]
    if done and len(done) < len(names):
        dense = [n.removeprefix(prefix + ".") for n in names if n not in quantized]
        why = fused_misfit(names, quantized) or ""
        raise FormatError(
            f"{prefix}: vLLM runs all {len(names)} expert linears as one fused-MoE layer; "
            f"{len(dense)} are stored dense ({', '.join(dense[:4])}{', …' if len(dense) > 4 else ''}) "
            f"and {len(done)} quantized ({why}); quantize all experts or none"
        )
    return bool(done)


def moe_kernel_mode() -> str:
    """``auto`` (vLLM's WNA16 MoE kernels where they take the experts) or ``portable``
    (always the portable path); ``LEANQUANT_MOE_KERNEL`` sets it. Raises ValueError otherwise."""
    mode = os.environ.get(MOE_KERNEL_ENV, "auto")
    if mode not in ("auto", "portable"):
        raise ValueError(f"{MOE_KERNEL_ENV}={mode!r}: expected auto or portable")
    return mode


def wna16_misfit(qcfg: LeanQuantConfig, moe: FusedMoEConfig) -> str | None:
    """Why these experts cannot go to vLLM's WNA16 MoE kernels (None: they are handed to
    vLLM's oracle, which may still find no kernel: :func:`moe_method`). One home for the
    conditions vLLM's oracle does not check itself or checks only by failing."""
    if moe_kernel_mode() == "portable":
        return f"{MOE_KERNEL_ENV}=portable"
    if not current_platform.is_cuda():
        return "vLLM's WNA16 MoE kernels are used on CUDA only (CPU int4 MoE: symmetric, AMX)"
    if why := wna16_moe_config_misfit(qcfg):
        return why
    if moe.in_dtype not in KERNEL_ACT_DTYPES:
        return (
            f"vLLM's WNA16 MoE kernels compute in float16/bfloat16, not {moe.in_dtype} "
            "(serve with --dtype float16 to use them)"
        )
    if moe.has_bias:
        return "expert biases are not handed to vLLM's WNA16 MoE kernels"
    return None


def compressed_tensors_args(qcfg: LeanQuantConfig) -> QuantizationArgs:
    """Our affine experts as compressed-tensors weight arguments: ``num_bits``, asymmetric
    (the contract always stores zero points; z = 2**(b-1) everywhere gives the same weights),
    ``group`` with ``group_size`` or ``channel`` for group_size -1, no act-order (static
    groups keep the original column order, so the layout is that of plain groups)."""
    from compressed_tensors.quantization import QuantizationArgs

    per_channel = qcfg.group_size == -1
    return QuantizationArgs(
        num_bits=qcfg.bits, type="int", symmetric=False,
        strategy="channel" if per_channel else "group",
        group_size=None if per_channel else qcfg.group_size,
    )  # fmt: skip


def to_compressed_tensors(
    qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stacked expert projection (w13 or w2) of the contract, (E, K*b/32, N) int32
    ``qweight``, (E, G, N) fp16 ``scales`` and (E, G, N*b/32) int32 ``zero_points``, as
    compressed-tensors ``pack-quantized`` MoE tensors (what ``CompressedTensorsWNA16MoEMethod``
    allocates, N-first): ``weight_packed`` (E, N, K*b/32), ``weight_scale`` (E, N, G) in
    ``dtype`` and ``weight_zero_point`` (E, N*b/32, G).

    A transpose of each (the rule's one home: ``compressed_tensors/layout.py``, which the
    per-linear export uses too). The scale cast is exact for ``float16``."""
    return to_pack_quantized(qweight, scales, zero_points, scale_dtype=dtype)


def moe_method(config: LeanQuantVLLMConfig, layer: RoutedExperts, prefix: str):
    """The quant method for a ``RoutedExperts`` layer: vLLM's unquantized one when its experts
    are all dense; :class:`LeanQuantWNA16MoEMethod` when vLLM's WNA16 MoE oracle finds a
    kernel for them (:func:`wna16_misfit` first); else :class:`LeanQuantMoEMethod` (portable),
    which logs why."""
    if not experts_quantized(config, layer, prefix):
        return UnquantizedFusedMoEMethod(layer.moe_config)
    why = wna16_misfit(config.qcfg, layer.moe_config)
    if why is None:
        try:
            return LeanQuantWNA16MoEMethod(config, layer.moe_config, prefix)
        except (NotImplementedError, ValueError, AssertionError) as e:
            why = f"vLLM's WNA16 MoE oracle: {str(e).strip() or type(e).__name__}"
    return LeanQuantMoEMethod(config, layer.moe_config, why)


def _moe_loader(vllm_loader, param_name: str, dtype: torch.dtype):
    """Wrap a loader of MoE parameter ``param_name``: a checkpoint tensor of the wrong kind or
    shape fails naming the expert, the projection and the tensor, not with a bare assertion."""

    def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        where = f"{weight_name} (expert {expert_id}, {shard_id} = {SHARD_NAMES.get(shard_id, '?')})"
        if dtype.is_floating_point != loaded_weight.dtype.is_floating_point:
            raise FormatError(f"{where}: checkpoint dtype {loaded_weight.dtype}, expected {dtype}")
        try:
            return vllm_loader(
                param, loaded_weight, weight_name, shard_id, expert_id, return_success
            )
        except (AssertionError, RuntimeError, IndexError) as e:
            raise FormatError(
                f"{where}: checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit "
                f"this rank's {param_name} of shape {tuple(param.shape[1:])} per expert "
                f"({e or 'shape mismatch'})"
            ) from None

    return load


class _StoredExperts:
    """The contract's expert tensors on a ``RoutedExperts`` layer (table in the module
    docstring), loaded through vLLM's MoE loader: what both MoE methods share. Needs
    ``self.qcfg`` and ``self.moe`` (vLLM's ``FusedMoEConfig``)."""

    qcfg: LeanQuantConfig
    moe: FusedMoEConfig

    def _check_partition(self, layer, tp: int, hidden: int, inter: int, parts: int) -> None:
        """Gate/up (w13) read all H inputs and give this rank ``inter`` outputs per part; down
        (w2) reads this rank's ``inter`` inputs: the dense method's checks, with its messages."""
        prefix = getattr(layer, "layer_name", "?")
        check = _LeanQuantLinearMethod._check_partition  # reads self.qcfg only
        check(
            self,
            SimpleNamespace(prefix=f"{prefix} (w13: expert gate/up)", tp_size=tp),
            hidden,
            [inter] * parts,
        )
        check(
            self, SimpleNamespace(prefix=f"{prefix} (w2: expert down)", tp_size=tp), inter, [hidden]
        )

    def _create_stored(
        self,
        layer: RoutedExperts,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        extra_weight_attrs: dict,
    ) -> None:
        """Register the stored expert tensors of this rank, in the checkpoint's (unpadded)
        sizes; remembers ``padded`` (H, I as vLLM's backend sized them), ``act_dtype``,
        ``parts`` (S). Raises FormatError when this rank's slice would split a group or word."""
        qcfg, b = self.qcfg, self.qcfg.bits
        hidden = self.moe.hidden_dim_unpadded
        inter = self.moe.intermediate_size_per_partition_unpadded
        self.padded = (hidden_size, intermediate_size_per_partition)
        parts = self.moe.w13_num_shards
        tp = self.moe.moe_parallel_config.tp_size
        self._check_partition(layer, tp, hidden, inter, parts)
        self.act_dtype = params_dtype
        self.parts = parts
        extra_weight_attrs = dict(extra_weight_attrs)
        loader = extra_weight_attrs.pop("weight_loader")
        E = num_experts
        replicated = scales_on_every_rank(qcfg)
        groups_h = qcfg.n_groups(hidden)
        groups_i = qcfg.n_groups(inter * tp) if replicated else inter // qcfg.group_size
        strategy = (
            FusedMoeWeightScaleSupported.CHANNEL
            if replicated
            else FusedMoeWeightScaleSupported.GROUP
        ).value
        shapes = {
            "w13_qweight": ((E, hidden * b // 32, parts * inter), torch.int32),
            "w2_qweight": ((E, inter * b // 32, hidden), torch.int32),
        }
        if qcfg.grid in ("affine", "table"):
            shapes["w13_scales"] = ((E, groups_h, parts * inter), torch.float16)
            shapes["w2_scales"] = ((E, groups_i, hidden), torch.float16)
        if qcfg.grid == "affine":
            shapes["w13_zero_points"] = ((E, groups_h, parts * inter * b // 32), torch.int32)
            shapes["w2_zero_points"] = ((E, groups_i, hidden * b // 32), torch.int32)
        for name, (shape, dtype) in shapes.items():
            param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, extra_weight_attrs)
            set_weight_attrs(
                param,
                {
                    "quant_method": strategy,
                    "is_transposed": True,  # K-first (GPTQ) layout: vLLM flips its shard dims
                    "weight_loader": _moe_loader(loader, name, dtype),
                },
            )
        own = {}
        if qcfg.uses_g_idx:
            own["w13_g_idx"] = torch.empty(E, parts, hidden, dtype=torch.int32)
            own["w2_g_idx"] = torch.empty(E, inter, dtype=torch.int32)
        if qcfg.grid == "nonuniform":
            own["w13_lut"] = torch.empty(E, parts * inter, 1 << b, dtype=torch.float16)
            own["w2_lut"] = torch.empty(E, hidden, 1 << b, dtype=torch.float16)
        for name, data in own.items():
            param = torch.nn.Parameter(data, requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, extra_weight_attrs)
            set_weight_attrs(
                param,
                {"weight_loader": _moe_loader(self._own_loader(layer, name), name, data.dtype)},
            )

    def _own_loader(self, layer: RoutedExperts, name: str):
        """Loader for the per-expert tensors vLLM's MoE loader does not know (g_idx, lut),
        sliced as it slices the rest: gate/up outputs and down inputs split across ranks."""

        def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:  # another rank's expert (expert parallelism)
                return False if return_success else None
            if shard_id not in SHARD_NAMES:
                raise FormatError(f"{weight_name}: shard_id {shard_id!r}, expected w1, w2 or w3")
            dst = param.data[local]
            rank = self.moe.tp_rank
            part = 0 if shard_id in ("w1", "w2") else 1
            if name == "w13_g_idx":  # (S, H): input of gate/up, never split
                dst = dst[part]
            elif name == "w2_g_idx":  # (I,): down's input, split
                n = dst.shape[0]
                loaded_weight = loaded_weight.narrow(0, rank * n, n)
            elif name == "w13_lut":  # (S*I, 2**b): rows are gate/up outputs, split
                n = dst.shape[0] // self.parts
                loaded_weight = loaded_weight.narrow(0, rank * n, n)
                dst = dst.narrow(0, part * n, n)
            if tuple(dst.shape) != tuple(loaded_weight.shape):
                raise RuntimeError(f"{tuple(loaded_weight.shape)} into {tuple(dst.shape)}")
            dst.copy_(loaded_weight)
            return True if return_success else None

        return load


class LeanQuantWNA16MoEMethod(_StoredExperts, CompressedTensorsWNA16MoEMethod):
    """Affine 4/8-bit LeanQuant experts on vLLM's WNA16 MoE kernels (CUDA; Marlin MoE where
    it fits), through vLLM's own compressed-tensors WNA16 MoE method: the contract's tensors
    at load (module docstring), handed over in its layout after it (:meth:`hand_over`), then
    its repack, quant config and ``apply``. Written against vLLM 0.32's API, not run on a GPU.

    Construction runs vLLM's WNA16 MoE oracle and raises what it raises when no kernel takes
    the experts (NotImplementedError, ValueError; :func:`moe_method` falls back). Raises
    FormatError in ``create_weights`` for a rank slice that splits a group or a packed word,
    or when vLLM pads the hidden size (an all-to-all backend's alignment)."""

    def __init__(self, config: LeanQuantVLLMConfig, moe: FusedMoEConfig, layer_name: str) -> None:
        self.qcfg = config.qcfg
        super().__init__(compressed_tensors_args(config.qcfg), None, moe, layer_name)

    @property
    def supports_eplb(self) -> bool:
        return False  # vLLM's says True for its Triton backend; with our hand-over, untested

    def create_weights(
        self,
        layer: RoutedExperts,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        qcfg = self.qcfg
        if hidden_size != self.moe.hidden_dim_unpadded:
            raise FormatError(
                f"{getattr(layer, 'layer_name', '?')}: vLLM pads the MoE hidden size "
                f"{self.moe.hidden_dim_unpadded} to {hidden_size}, which the hand-over to its "
                f"WNA16 MoE kernels does not do; set {MOE_KERNEL_ENV}=portable"
            )
        self._create_stored(
            layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
            extra_weight_attrs,
        )  # fmt: skip
        # what CompressedTensorsWNA16MoEMethod.create_weights sets besides its tensors
        inter = self.moe.intermediate_size_per_partition_unpadded
        layer.num_groups_w13 = qcfg.n_groups(self.moe.hidden_dim_unpadded)
        layer.num_groups_w2 = 1 if qcfg.group_size == -1 else inter // qcfg.group_size
        layer.a13_scale = None
        layer.a2_scale = None
        layer.leanquant_kernel = (
            f"{self.experts_cls.__name__} (vLLM WNA16 MoE, backend {self.wna16_backend.value})"
        )
        g = "pc" if qcfg.group_size == -1 else qcfg.group_size
        _log_once(
            f"affine {qcfg.bits}-bit g{g} MoE expert layers use {layer.leanquant_kernel}",
            "written against vLLM 0.32's API, not run on a GPU by this project",
        )

    def hand_over(self, layer: RoutedExperts) -> None:
        """Replace our stored expert tensors by vLLM's compressed-tensors MoE parameters
        (``w13_weight_packed``, ``w13_weight_scale``, ``w13_weight_zero_point`` and the
        ``w2_`` twins; :func:`to_compressed_tensors`), in the activation dtype for scales."""
        for stem in ("w13", "w2"):
            t = [getattr(layer, f"{stem}_{s}").data for s in ("qweight", "scales", "zero_points")]
            converted = to_compressed_tensors(*t, self.act_dtype)
            for suffix in ("qweight", "scales", "zero_points"):
                delattr(layer, f"{stem}_{suffix}")
            for suffix, data in zip(("packed", "scale", "zero_point"), converted, strict=True):
                layer.register_parameter(
                    f"{stem}_weight_{suffix}", torch.nn.Parameter(data, requires_grad=False)
                )

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        self.hand_over(layer)
        super().process_weights_after_loading(layer)  # vLLM's repack and kernel


class LeanQuantMoEMethod(_StoredExperts, UnquantizedFusedMoEMethod):
    """LeanQuant experts (any grid, any bits) on vLLM's fused-MoE layer: quantized parameters
    at load (table in the module docstring), dense experts in the activation dtype after it,
    computed by vLLM's unquantized fused-MoE path (whatever it selects on this platform).
    ``why``: the reason the WNA16 kernels do not take them, logged once.

    Raises FormatError at construction when this rank's intermediate slice would split a
    group or a packed word, and while loading when a checkpoint tensor does not fit."""

    def __init__(self, config: LeanQuantVLLMConfig, moe, why: str | None = None) -> None:
        super().__init__(moe)
        self.qcfg = config.qcfg
        self.why = why

    @property
    def supports_eplb(self) -> bool:
        return False  # EPLB moves expert weights after load; ours are rebuilt then, untested

    def create_weights(
        self,
        layer: RoutedExperts,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        # quantized tensors hold the checkpoint's sizes; padding (if the backend rounds up)
        # is added when the dense experts are formed
        self._create_stored(
            layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
            extra_weight_attrs,
        )  # fmt: skip
        qcfg = self.qcfg
        self.portable = "dense"
        layer.leanquant_kernel = f"{PORTABLE} (dense experts, vLLM fused MoE)"
        _log_once(
            f"{qcfg.grid} {qcfg.bits}-bit MoE expert layers use {layer.leanquant_kernel}",
            f"dequantized once at load to the activation dtype: {self.why}"
            if self.why
            else "dequantized once at load to the activation dtype",
        )

    def dense_experts(self, layer: RoutedExperts) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 (E, S*I_pad, H_pad), w2 (E, H_pad, I_pad)) in the activation dtype: every
        expert linear of this rank dequantized by ``kernels.portable`` (the reference
        dequantizer's values, cast), zeros in any padding vLLM's backend asked for."""
        qcfg, b = self.qcfg, self.qcfg.bits
        E, hidden = layer.w13_qweight.shape[0], layer.w2_qweight.shape[2]
        inter = layer.w13_qweight.shape[2] // self.parts
        h_pad, i_pad = self.padded
        dev, dt = layer.w13_qweight.device, self.act_dtype
        w13 = torch.zeros(E, self.parts * i_pad, h_pad, dtype=dt, device=dev)
        w2 = torch.zeros(E, h_pad, i_pad, dtype=dt, device=dev)
        words = inter * b // 32
        for e in range(E):
            for s in range(self.parts):
                cols = slice(s * inter, (s + 1) * inter)
                t = {"qweight": layer.w13_qweight[e][:, cols]}
                if qcfg.grid in ("affine", "table"):
                    t["scales"] = layer.w13_scales[e][:, cols]
                if qcfg.grid == "affine":
                    t["zero_points"] = layer.w13_zero_points[e][:, s * words : (s + 1) * words]
                if qcfg.uses_g_idx:
                    t["g_idx"] = layer.w13_g_idx[e, s]
                if qcfg.grid == "nonuniform":
                    t["lut"] = layer.w13_lut[e][cols]
                w13[e, s * i_pad : s * i_pad + inter, :hidden] = self._dequantize_t(t).t()
            t = {"qweight": layer.w2_qweight[e]}
            for suffix in ("scales", "zero_points", "g_idx", "lut"):
                if hasattr(layer, f"w2_{suffix}"):
                    t[suffix] = getattr(layer, f"w2_{suffix}")[e]
            w2[e, :hidden, :inter] = self._dequantize_t(t).t()
        return w13, w2

    def _dequantize_t(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """W^T (in, out) of one expert linear's stored tensors ``t``, in the activation dtype."""
        qcfg, dt = self.qcfg, self.act_dtype
        q = t["qweight"].contiguous()
        g_idx = t.get("g_idx")
        if qcfg.grid == "nonuniform":
            return portable.dequantize_lut_t(q, t["lut"], qcfg.bits, dt)
        scales = t["scales"].contiguous()
        if qcfg.grid == "table":
            table = torch.tensor(qcfg.table, dtype=torch.float32, device=q.device)
            return portable.dequantize_table_t(q, scales, table, qcfg.bits, g_idx, dt)
        zp = t["zero_points"].contiguous()
        return portable.dequantize_affine_t(q, scales, zp, qcfg.bits, g_idx, dt)

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        w13, w2 = self.dense_experts(layer)
        for grid_suffix in ("qweight", "scales", "zero_points", "g_idx", "lut"):
            for stem in ("w13", "w2"):
                if hasattr(layer, f"{stem}_{grid_suffix}"):
                    delattr(layer, f"{stem}_{grid_suffix}")
        layer.register_parameter("w13_weight", torch.nn.Parameter(w13, requires_grad=False))
        layer.register_parameter("w2_weight", torch.nn.Parameter(w2, requires_grad=False))
        super().process_weights_after_loading(layer)
