"""The LeanQuant checkpoint contract: config, packing, tensor layout and the HF folder.

The quantizer writes checkpoints through this package and every loader reads them through it;
nothing else defines tensor names, shapes, dtypes or packing. Layout convention: a linear
weight W is (out_features, in_features) = (rows, columns); codes are integers in [0, 2**bits).
"""

from .checkpoint import (
    Checkpoint,
    CheckpointWriter,
    check_output,
    load_reference_model,
    partial_dir,
)
from .config import (
    CHECKPOINT_FORMAT,
    GRIDS,
    SUPPORTED_BITS,
    FormatError,
    LeanQuantConfig,
    fused_misfit,
    group_misfit,
)
from .packing import chunk_size, pack_codes, unpack_codes
from .tensors import (
    QUANT_SUFFIXES,
    TensorSpec,
    check_linear,
    dequantize_linear,
    infer_linear_shape,
    linear_specs,
    pack_linear,
    unpack_linear,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "GRIDS",
    "QUANT_SUFFIXES",
    "SUPPORTED_BITS",
    "Checkpoint",
    "CheckpointWriter",
    "FormatError",
    "LeanQuantConfig",
    "TensorSpec",
    "check_linear",
    "check_output",
    "chunk_size",
    "dequantize_linear",
    "fused_misfit",
    "group_misfit",
    "infer_linear_shape",
    "linear_specs",
    "load_reference_model",
    "pack_codes",
    "pack_linear",
    "partial_dir",
    "unpack_codes",
    "unpack_linear",
]
