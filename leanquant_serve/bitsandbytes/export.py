"""Export a LeanQuant NF4 checkpoint (``--grid nf --bits 4``) as a pre-quantized bitsandbytes
NF4 checkpoint, exactly.

Layout, read from bitsandbytes 0.50.2 (``functional.QuantState.as_dict(packed=True)``,
``backends/default/ops.py`` ``quantize_4bit`` / ``_dequantize_4bit_compute``) and transformers
5 (``quantizers/quantizer_bnb_4bit.py`` ``get_weight_conversions``: the keys below are what its
``Bnb4bitDeserialize`` hands to ``Params4bit.from_prequantized``). For each quantized linear
``P`` with W (out, in):

- ``P.weight`` uint8 (out·in/2, 1): the codes of W flattened row-major, two per byte, the
  even-indexed code in the high nibble (``(q[2k] << 4) | q[2k+1]``).
- ``P.weight.absmax`` float32 (out·in/blocksize,): one scale per block of ``blocksize``
  consecutive flattened weights, i.e. per (row, group) in row-major order: ``scales``ᵀ
  flattened. Our fp16 scales are float32 values exactly.
- ``P.weight.quant_map`` float32 (16,): the NF4 table, :data:`NF4`.
- ``P.weight.quant_state.bitsandbytes__nf4`` uint8: the UTF-8 bytes of the JSON object
  ``{"quant_type": "nf4", "blocksize": B, "dtype": D, "shape": [out, in]}``
  (``pack_dict_to_tensor``), D the model's dtype (what ``dequantize_4bit`` returns).

bitsandbytes dequantizes w = float32(code[q]) · absmax[block], cast to D: the reference
dequantizer's arithmetic for a table grid, so the weights are bit-exact (tested with
bitsandbytes' own CPU ``dequantize_4bit``). No double quantization (the 8-bit quantized absmax
would not be exact). ``quantization_config``: transformers' ``BitsAndBytesConfig`` with
``load_in_4bit``, ``bnb_4bit_quant_type: nf4``, compute dtype = the model's dtype, and
``llm_int8_skip_modules`` = every ``nn.Linear`` of the architecture left unquantized.

Each layer's blocksize is the group size (per-row scales: in_features) and lives in its own
``quant_state``, so layers may differ. Refused (:class:`ExportError`, one line): grids other
than ``table``, tables other than NF4, bits other than 4, blocksizes bitsandbytes does not
have (64 .. 4096, powers of two), act-order with dynamic groups (``g_idx``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..export import Exporter, ExportError, check_fused_parts, export, model_linears
from ..format import Checkpoint, infer_linear_shape, unpack_codes

log = logging.getLogger(__name__)

QUANT_METHOD = "bitsandbytes"
QUANT_TYPE = "nf4"
# bitsandbytes' NF4 table (functional.get_4bit_type("nf4"), the values its CPU and CUDA
# kernels dequantize with), float32 values; quantizer/tables.py builds the same table.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit blocksizes
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ExportResult:
    out: Path
    quantization_config: dict[str, Any]
    layers: int  # quantized linears written
    blocksizes: tuple[int, ...]  # the layers' blocksizes, ascending


def _model_dtype(hf_config: Mapping[str, Any]) -> str:
    dtype = hf_config.get("dtype", hf_config.get("torch_dtype"))
    if dtype not in DTYPES:
        raise ExportError(f"model dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def quant_state_bytes(blocksize: int, dtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """``quant_state.bitsandbytes__nf4``: bitsandbytes' ``pack_dict_to_tensor`` of the
    non-tensor fields of ``QuantState.as_dict`` (same keys, same order)."""
    d = {"quant_type": QUANT_TYPE, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 4-bit packing of codes (out, in) in [0, 16): uint8 (out·in/2, 1), the
    even-indexed flattened code in the high nibble."""
    q = codes.reshape(-1).to(torch.uint8)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1).contiguous()


def _blocksizes(src: Checkpoint, prefixes: list[str]) -> dict[str, int]:
    """Check the checkpoint is NF4 that bitsandbytes holds exactly; returns each layer's
    blocksize."""
    cfg = src.qcfg
    if cfg.grid != "table":
        raise ExportError(
            f"grid {cfg.grid!r}: bitsandbytes NF4 is a fixed table times one scale per block; "
            "quantize with --grid nf --bits 4 --group-size 64"
        )
    if cfg.bits != 4:
        raise ExportError(f"{cfg.bits}-bit: bitsandbytes NF4 is 4-bit only")
    if cfg.table != NF4:
        raise ExportError(
            "the checkpoint's table is not bitsandbytes' NF4 table (a Student-Float or other "
            "table): bitsandbytes' kernels dequantize with their own NF4 values"
        )
    names = set(src.tensor_names())
    blocksizes = {}
    for prefix in prefixes:
        if f"{prefix}.g_idx" in names:
            g_idx = src.get(f"{prefix}.g_idx").long()
            if not torch.equal(g_idx, torch.arange(g_idx.numel()) // cfg.group_size):
                raise ExportError(
                    f"{prefix}: act-order with dynamic groups (g_idx): bitsandbytes blocks are "
                    "contiguous; re-quantize with --static-groups"
                )
        qweight = src.get(f"{prefix}.qweight")
        in_features = qweight.shape[0] * 32 // cfg.bits
        size = in_features if cfg.group_size == -1 else cfg.group_size
        if size not in BLOCKSIZES:
            what = f"{prefix}: per-row scales over" if cfg.group_size == -1 else "group size"
            raise ExportError(
                f"{what} {size}: bitsandbytes blocksizes are {', '.join(map(str, BLOCKSIZES))}"
            )
        blocksizes[prefix] = size
    return blocksizes


class BitsAndBytesNF4Exporter(Exporter):
    """bitsandbytes pre-quantized NF4 (see the module docstring)."""

    def __init__(self, src: Checkpoint, prefixes: list[str]) -> None:
        super().__init__(src, prefixes)
        self.blocksizes = _blocksizes(src, prefixes)
        self.dtype = _model_dtype(src.hf_config)
        linears, fused = model_linears(src.hf_config, src.path)
        strays = sorted(set(prefixes) - set(linears))
        if strays:
            raise ExportError(f"{strays[0]}: quantized, but not an nn.Linear of the architecture")
        quantized = set(prefixes)
        check_fused_parts(quantized, fused, "vLLM fuses them and needs one scheme for all")
        self.skip = [n for n in linears if n not in quantized]

    def convert_linear(self, prefix: str) -> dict[str, torch.Tensor]:
        t = self.src.linear_tensors(prefix)
        cfg = self.src.qcfg
        out_features, in_features = infer_linear_shape(cfg, t)
        codes = unpack_codes(t["qweight"], cfg.bits, dim=0).t()  # (out, in)
        absmax = t["scales"].float().t().reshape(-1)  # (out, G) row-major: block order
        w = f"{prefix}.weight"
        return {
            w: pack_nf4(codes),
            f"{w}.absmax": absmax.contiguous(),
            f"{w}.quant_map": torch.tensor(NF4, dtype=torch.float32),
            f"{w}.quant_state.bitsandbytes__{QUANT_TYPE}": quant_state_bytes(
                self.blocksizes[prefix], self.dtype, (out_features, in_features)
            ),
        }

    def quantization_config(self) -> dict[str, Any]:
        """transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=<model dtype>, llm_int8_skip_modules=<unquantized linears>)``
        as its ``to_dict`` writes it."""
        return {
            "quant_method": QUANT_METHOD,
            "_load_in_8bit": False,
            "_load_in_4bit": True,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": self.skip,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": QUANT_TYPE,
            "bnb_4bit_use_double_quant": False,
            "bnb_4bit_compute_dtype": self.dtype,
            "bnb_4bit_quant_storage": "uint8",
            "load_in_4bit": True,
            "load_in_8bit": False,
        }


def export_bnb_nf4(
    src_dir: Path | str, out_dir: Path | str, *, overwrite: bool = False
) -> ExportResult:
    """Write LeanQuant NF4 checkpoint ``src_dir`` to ``out_dir`` as pre-quantized bitsandbytes
    NF4 (layer by layer, atomically).

    Raises :class:`ExportError` for what bitsandbytes NF4 cannot hold exactly (see the module
    docstring), ``FormatError`` for a broken source or an existing ``out_dir`` without
    ``overwrite``."""
    exporter, out, qconfig = export(BitsAndBytesNF4Exporter, src_dir, out_dir, overwrite=overwrite)
    layers = len(exporter.prefixes)
    log.info("exported %d quantized linears to %s (bitsandbytes nf4)", layers, out)
    return ExportResult(out, qconfig, layers, tuple(sorted(set(exporter.blocksizes.values()))))
