"""The ``quantization_config`` of a LeanQuant checkpoint, validated.

Layout convention used throughout ``leanquant_serve.format``: a linear weight W is
(out_features, in_features) = (rows, columns); codes are integers in [0, 2**bits).
Groups run along the input dimension (columns); each (group, row) pair has its own
affine grid, or each row has its own 2**bits-entry table (non-uniform grid), or each
(group, row) pair has its own scale of one fixed 2**bits-entry table (table grid: NormalFloat,
Student-Float).
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 8)
GRIDS = ("affine", "nonuniform", "table")
CHECKPOINT_FORMAT = "leanquant/v1"
KNOWN_CHECKPOINT_FORMATS = (CHECKPOINT_FORMAT,)
QUANT_METHOD = "leanquant"


class FormatError(ValueError):
    """A violation of the checkpoint contract; the message names the field or tensor."""


def _fail(name: str, problem: str) -> FormatError:
    return FormatError(f"quantization_config.{name}: {problem}")


def group_misfit(group_size: int, in_features: int) -> str | None:
    """The rule "the group size divides in_features" (group size -1: one group per row), for
    every place that applies it (the contract's tensor specs, the quantizer's up-front shape
    check and its column loop): None when it holds, else why not."""
    if group_size != -1 and in_features % group_size:
        return f"in_features={in_features} is not a multiple of group_size={group_size}"
    return None


def fused_misfit(parts: Sequence[str], quantized: Container[str]) -> str | None:
    """The rule "linears an engine runs as one layer are all quantized or none" (vLLM fuses
    q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; exllamav2 loads a block's
    attention as one module), for every place that applies it (the vLLM plugin at load, each
    exporter before writing): None when it holds, else which parts break it. ``parts``: full
    module names; ``quantized``: the names stored quantized."""
    done = [p in quantized for p in parts]
    if not any(done) or all(done):
        return None
    parent = parts[0].rpartition(".")[0]
    same = all(p.rpartition(".")[0] == parent for p in parts)
    names = [p.rpartition(".")[2] if same else p for p in parts]
    return f"{parent if same else 'layers'}: {', '.join(names)} are quantized only in part"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _table_misfit(table: object, bits: int) -> str | None:
    """Why ``table`` is not a table grid's table (None: it is): 2**bits JSON numbers, each a
    float32 value, finite, strictly ascending, within [-1, 1]."""
    if not isinstance(table, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in table
    ):
        return f"{table!r} is not a list of numbers"
    if len(table) != 1 << bits:
        return f"{len(table)} entries, expected 2**bits = {1 << bits}"
    values = [float(v) for v in table]
    if not all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in values):
        return "entries must be finite and within [-1, 1]"
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        return "entries must be strictly ascending"
    import struct

    if any(struct.unpack("f", struct.pack("f", v))[0] != v for v in values):
        return "entries must be float32 values"
    return None


@dataclass(frozen=True)
class LeanQuantConfig:
    """Settings a loader needs to interpret the quantized tensors of a checkpoint.

    ``group_size == -1`` means one group per output row (per channel). ``grid`` is how the
    grid is stored: "affine" (fp16 scale + integer zero per (group, row)), "nonuniform"
    (fp16 per-row table of 2**bits values) or "table" (fp16 scale per (group, row) times one
    fixed table: ``table``, 2**bits float32 values, strictly ascending, in [-1, 1]; given for
    "table" only, and then written to ``quantization_config``; NormalFloat / Student-Float
    tables, quantizer/tables.py). ``static_groups`` means groups were fitted up front
    in the original column order, so no ``g_idx`` is stored even with ``desc_act``.
    ``modules_to_not_convert`` lists module names (exact, or prefixes at a "." boundary) kept
    in the original dtype. ``quantizer`` is free-form JSON metadata about how the
    checkpoint was made; loaders ignore it.
    """

    bits: int
    group_size: int = -1
    grid: str = "affine"
    desc_act: bool = False
    static_groups: bool = False
    modules_to_not_convert: tuple[str, ...] = ("lm_head",)
    checkpoint_format: str = CHECKPOINT_FORMAT
    quant_method: str = QUANT_METHOD
    quantizer: Mapping[str, Any] = field(default_factory=dict, hash=False)
    table: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in SUPPORTED_BITS:
            raise _fail(
                "bits", f"{self.bits!r} is not one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise _fail("group_size", f"{self.group_size!r} is neither -1 nor a positive int")
        if self.grid not in GRIDS:
            raise _fail("grid", f"{self.grid!r} is not one of {', '.join(GRIDS)}")
        if self.grid == "nonuniform" and self.group_size != -1:
            raise _fail("group_size", f"{self.group_size} with grid 'nonuniform' (needs -1)")
        if self.grid == "table":
            why = _table_misfit(self.table, self.bits)
            if why:
                raise _fail("table", why if self.table is not None else "missing (grid 'table')")
            object.__setattr__(self, "table", tuple(float(v) for v in self.table))
        elif self.table is not None:
            raise _fail("table", f"given with grid {self.grid!r} (only grid 'table' has one)")
        for name in ("desc_act", "static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, f"{getattr(self, name)!r} is not a bool")
        modules = self.modules_to_not_convert
        if not isinstance(modules, (list, tuple)) or not all(
            isinstance(m, str) and m for m in modules
        ):
            raise _fail("modules_to_not_convert", f"{modules!r} is not a list of module names")
        object.__setattr__(self, "modules_to_not_convert", tuple(modules))
        if self.checkpoint_format not in KNOWN_CHECKPOINT_FORMATS:
            raise _fail(
                "checkpoint_format",
                f"{self.checkpoint_format!r} is not one of {', '.join(KNOWN_CHECKPOINT_FORMATS)}",
            )
        if self.quant_method != QUANT_METHOD:
            raise _fail("quant_method", f"{self.quant_method!r} is not {QUANT_METHOD!r}")
        if not isinstance(self.quantizer, Mapping):
            raise _fail("quantizer", f"{self.quantizer!r} is not a mapping")
        try:  # store a plain JSON copy so to_dict/from_dict round-trips exactly
            quantizer = json.loads(json.dumps(dict(self.quantizer), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise _fail("quantizer", f"not JSON-serialisable ({e})") from None
        object.__setattr__(self, "quantizer", quantizer)

    @property
    def uses_g_idx(self) -> bool:
        """Whether the checkpoint stores ``g_idx`` (act-order with dynamic groups)."""
        return (
            self.grid in ("affine", "table")
            and self.desc_act
            and not self.static_groups
            and self.group_size != -1
        )

    def n_groups(self, in_features: int) -> int:
        """Number of column groups of a linear with ``in_features`` columns."""
        if self.group_size == -1:
            return 1
        if group_misfit(self.group_size, in_features):
            raise _fail(
                "group_size", f"{self.group_size} does not divide in_features={in_features}"
            )
        return in_features // self.group_size

    def is_skipped(self, module_name: str) -> bool:
        """Whether ``module_name`` is kept unquantized (listed exactly or under a listed prefix)."""
        return any(
            module_name == m or module_name.startswith(m + ".") for m in self.modules_to_not_convert
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored as ``config.json["quantization_config"]``."""
        d = asdict(self)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        if self.table is None:
            del d["table"]  # only table grids have one (other checkpoints' bytes unchanged)
        else:
            d["table"] = list(self.table)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LeanQuantConfig:
        """Parse a ``quantization_config``; unknown or missing keys raise ``FormatError``."""
        if not isinstance(d, Mapping):
            raise FormatError(f"quantization_config: {type(d).__name__} is not a JSON object")
        method = d.get("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:  # another method's config: say so before its unknown keys
            raise _fail("quant_method", f"{method!r} is not {QUANT_METHOD!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FormatError(f"quantization_config: unknown key(s) {', '.join(unknown)}")
        if "bits" not in d:
            raise _fail("bits", "missing")
        return cls(**d)
