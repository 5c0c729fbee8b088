"""Reading an unquantized Hugging Face model folder tensor by tensor (never the whole model),
under the model's own parameter names: transformers' checkpoint conversion for the
architecture (renamings, per-expert tensors merged into fused experts) is applied per tensor
(leanquant_serve.format.hf_names).

FP8 block-quantized sources (DeepSeek-V3/R1, Qwen3-*-FP8: ``quantization_config``
``{quant_method: "fp8", fmt: "e4m3", weight_block_size: [128, 128], activation_scheme:
"dynamic"}``, each float8_e4m3fn weight ``X`` beside its per-block ``X_scale_inv``) are read
too: every consumer gets W dequantized (:func:`dequantize_fp8_blocks`) in the source's 16-bit
dtype, and never sees a ``*_scale_inv`` key or an fp8 tensor.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from leanquant_serve.format.hf_names import (
    ROUTING_TRANSFORMERS_RUNS,
    Source,
    from_checkpoint,
    routing_keys,
    to_checkpoint,
)

from .errors import UserError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"

SCALE_SUFFIX = "_scale_inv"  # key of X's block scales: X + SCALE_SUFFIX (X.weight_scale_inv)
FP8 = torch.float8_e4m3fn  # the "e4m3" of quantization_config.fmt
_FP8_HEADER = "F8_E4M3"  # its dtype name in safetensors headers
_OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FP8Blocks:
    """The FP8 scheme of a block-quantized source: W = fp8 weight × its block's scale.

    ``block``: (rows, columns) of a scale block (``weight_block_size``); ``dtype``: what the
    dequantized weights are handed out in, the source's own 16-bit dtype (config.json
    ``torch_dtype``/``dtype``; bfloat16 if absent), as DeepSeek's ``fp8_cast_bf16.py`` writes
    them: quantizing the FP8 release equals quantizing that bf16 conversion, byte for byte."""

    block: tuple[int, int]
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config: dict, where: Path) -> FP8Blocks:
        """The scheme of ``config`` (a config.json dict whose ``quantization_config`` has
        ``quant_method`` "fp8"); UserError (one line) for a scheme not read here: per-tensor
        or per-channel scales (no ``weight_block_size``: their scale tensors' names and shapes
        vary by producer, and no such release is tested), ``activation_scheme`` other than
        "dynamic" (static FP8 activation scales, calibrated for FP8 activations that a
        weight-only checkpoint does not have; no DeepSeek or Qwen release uses them), a
        ``fmt`` other than "e4m3"."""
        qc = config["quantization_config"]
        block = qc.get("weight_block_size")
        if not (
            isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):  # fmt: skip
            raise UserError(
                f"{where} is FP8 without block scales (quantization_config.weight_block_size "
                f"{block!r}): only block-wise FP8 sources (DeepSeek-V3/R1, Qwen3 FP8: "
                "weight_block_size [128, 128]) are read; give the 16-bit model"
            )
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise UserError(
                f"{where} is FP8 with activation_scheme {scheme!r}: only 'dynamic' (no "
                "activation scales, as DeepSeek-V3/R1 and Qwen3 FP8 ship) is read; give the "
                "16-bit model"
            )
        if qc.get("fmt", "e4m3") != "e4m3":
            raise UserError(
                f"{where} is FP8 in format {qc['fmt']!r}: only e4m3 (float8_e4m3fn) is read"
            )
        name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        if name not in _OUT_DTYPES:
            raise UserError(
                f"{where}: config.json dtype {name!r} of an FP8 source is not one of "
                f"{', '.join(_OUT_DTYPES)} (the dtype its weights are dequantized to)"
            )
        return cls((block[0], block[1]), _OUT_DTYPES[name])


def dequantize_fp8_blocks(
    q: Tensor, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """W of an FP8 block-quantized weight: ``q`` (..., rows, cols) float8_e4m3fn times
    ``scale_inv`` (..., ceil(rows / block[0]), ceil(cols / block[1])) floating, each scale
    applied to its block; blocks at the right and bottom edges cropped where the block does
    not divide the shape (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows = 4.5 blocks of 128).
    Computed in float32, returned in ``dtype``.

    The formula of DeepSeek's ``weight_dequant`` (DeepSeek-V3, inference/kernel.py: the scale
    of block (i // 128, j // 128), masked edges; its fp8_cast_bf16.py stores the result in
    bf16). transformers' ``Fp8Dequantize`` (integrations/finegrained_fp8.py, 5.19) is not used:
    it derives the block from the scale grid's shape (rows // scale_rows), so a cropped edge
    raises (576 rows, 5 scale rows) or, where the division happens to be exact (130 rows,
    2 scale rows: blocks of 65), gives wrong values. Raises UserError if ``q`` is not fp8 or
    the shapes disagree."""
    if q.dtype != FP8 or q.dim() < 2:
        raise UserError(f"an FP8 weight is a float8_e4m3fn matrix, not {q.dtype} {tuple(q.shape)}")
    rows, cols = q.shape[-2:]
    want = (*q.shape[:-2], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != want or not scale_inv.is_floating_point():
        raise UserError(
            f"block scales {tuple(scale_inv.shape)} ({scale_inv.dtype}) do not fit an FP8 "
            f"weight {tuple(q.shape)} in blocks of {list(block)}: expected {want} floating"
        )
    # s[i // block[0], j // block[1]] spread over its block, cropped at the edges
    s = scale_inv.to(torch.float32).repeat_interleave(block[0], dim=-2)[..., :rows, :]
    s = s.repeat_interleave(block[1], dim=-1)[..., :cols]
    return q.to(torch.float32).mul_(s).to(dtype)  # (in place: one float32 copy fewer)


class SourceModel:
    """A model folder: config.json plus model.safetensors or sharded safetensors with an index;
    unquantized, or FP8 block-quantized (``fp8``; see the module docstring).

    UserError (one line) for a quantized source of another kind, an FP8 scheme not read
    (:meth:`FP8Blocks.from_config`), an fp8 weight without its ``*_scale_inv`` (or fp8
    weights in a source whose config has no FP8 ``quantization_config``), a scale without
    its weight, a router setting transformers does not run (:meth:`_state_routing`).
    ``config`` is its config.json with the routing transformers runs written in where absent."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"model folder {self.path} does not exist")
        if not (self.path / "config.json").is_file():
            raise UserError(f"{self.path} has no config.json: not a Hugging Face model folder")
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.path / 'config.json'} is not valid JSON: {e}") from e
        self._state_routing()
        self.fp8: FP8Blocks | None = None
        if "quantization_config" in self.config:
            method = self.config["quantization_config"].get("quant_method", "?")
            if method != "fp8":
                raise UserError(
                    f"{self.path} is already quantized ({method}): give an unquantized model"
                )
            self.fp8 = FP8Blocks.from_config(self.config, self.path)
        self._files = self._weight_map()  # every checkpoint key -> file (scales included)
        self._fp8_keys = self._check_fp8()
        # checkpoint key -> file of the tensors consumers see: no block scales
        self.weight_map = {k: f for k, f in self._files.items() if not self._is_scale(k)}
        # model tensor name -> how it is read (identity until bind())
        self.sources: dict[str, Source] = {k: Source([(k, k)]) for k in self.weight_map}

    def _state_routing(self) -> None:
        """The routing transformers' model runs (and calibration sees) stated in ``config``,
        which the checkpoint's config.json copies and vLLM builds its router from
        (:func:`~leanquant_serve.format.hf_names.routing_keys`): keys the source lacks are
        written in with one warning; keys it states otherwise are a UserError, since
        transformers ignores them and vLLM would serve another routing than was calibrated."""
        absent, contrary = routing_keys(self.config)
        runs = ROUTING_TRANSFORMERS_RUNS.get(self.config.get("model_type"), {})
        where, kind = self.path / "config.json", self.config.get("model_type")
        if contrary:
            raise UserError(
                f"{where}: {_keys(contrary)}: transformers' {kind} routes only with "
                f"{_keys(runs)} (it ignores these keys), so calibration would not see the "
                "routing vLLM serves from this config; not supported"
            )
        if absent:
            log.warning(
                "%s states no %s: the checkpoint's config.json gets %s, the routing transformers' "
                "%s runs and calibrates with (without them vLLM builds a softmax router without "
                "e_score_correction_bias)", where, "/".join(absent), _keys(absent), kind,
            )  # fmt: skip
            self.config.update(absent)

    def bind(self, model) -> None:
        """Name tensors as ``model`` (a transformers model, e.g. a meta skeleton) names its
        parameters, through transformers' checkpoint conversion for its architecture."""
        self.sources = from_checkpoint(model, self.weight_map)

    def as_stored(self, model, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` (model names, unchanged values) under the names to write them: a tensor
        read from one checkpoint tensor as is keeps that tensor's name (copied unchanged, e.g.
        a vision tower's ``vision_tower.vision_model.*``, which transformers renames on load
        and would save as ``vision_tower.*``); others under ``to_checkpoint``'s names."""
        out, converted = {}, {}
        for name, t in tensors.items():
            src = self.sources.get(name)
            if src is not None and src.converter is None and len(src.keys) == 1:
                out[src.keys[0][0]] = t.contiguous()
            else:
                converted[name] = t
        return {**out, **to_checkpoint(model, converted)} if converted else out

    def _is_scale(self, key: str) -> bool:
        return self.fp8 is not None and key.endswith(SCALE_SUFFIX)

    def _check_fp8(self) -> set[str]:
        """An FP8 source's fp8 tensors (keys), read from the shards' headers before any work:
        each must have its scales and each scale its fp8 tensor. Not read for other sources
        (a shard that cannot be read fails when its layer is reached, and a resumed run
        continues once it is replaced): an fp8 tensor there is refused when read (_read)."""
        if self.fp8 is None:
            return set()
        fp8 = set()
        by_file: dict[str, list[str]] = {}
        for k, f in self._files.items():
            by_file.setdefault(f, []).append(k)
        for f, keys in by_file.items():
            try:
                with safe_open(self.path / f, "pt") as h:
                    fp8 |= {k for k in keys if h.get_slice(k).get_dtype() == _FP8_HEADER}
            except Exception as e:  # safetensors raises its own error types
                raise UserError(f"cannot read weight shard {self.path / f}: {e}") from e
        for k in sorted(fp8):
            if k + SCALE_SUFFIX not in self._files:
                raise UserError(
                    f"{self.path}: FP8 tensor {k} has no block scales {k}{SCALE_SUFFIX} "
                    "(an FP8 source needs every fp8 weight's scales)"
                )
        for k in sorted(k for k in self._files if self._is_scale(k)):
            if k.removesuffix(SCALE_SUFFIX) not in fp8:
                raise UserError(
                    f"{self.path}: block scales {k} belong to no float8_e4m3fn tensor "
                    f"{k.removesuffix(SCALE_SUFFIX)}"
                )
        return fp8

    def model_config(self):
        """The transformers config the model is built from (a meta skeleton): an FP8
        source's ``quantization_config`` dropped, since :meth:`get` hands out its weights
        dequantized, so transformers builds plain ``nn.Linear`` layers, never its FP8 ones."""
        config = load_config(self.path)
        if self.fp8 is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        return config

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(
                f"{self.path} has no *.safetensors weights (.bin checkpoints are not supported)"
            )
        names: dict[str, str] = {}
        for f in files:
            with safe_open(f, "pt") as h:
                names.update(dict.fromkeys(h.keys(), f.name))
        return names

    def names(self, prefix: str = "") -> list[str]:
        """Model tensor names (see bind) beginning with ``prefix``."""
        return [n for n in self.sources if n.startswith(prefix)]

    def get(self, name: str) -> Tensor:
        """The model tensor ``name`` (see bind), built from its checkpoint tensors."""
        if name not in self.sources:
            raise UserError(f"tensor {name} is missing from {self.path}")
        return self.sources[name].build(name, self.get_key)

    def get_key(self, name: str) -> Tensor:
        """The checkpoint tensor ``name``; an fp8 one dequantized with its block scales
        (:func:`dequantize_fp8_blocks`, in ``fp8.dtype``): the one place FP8 is read."""
        if name not in self.weight_map:
            raise UserError(f"tensor {name} is missing from {self.path}")
        t = self._read(name)
        if name in self._fp8_keys:
            try:
                return dequantize_fp8_blocks(
                    t, self._read(name + SCALE_SUFFIX), self.fp8.block, self.fp8.dtype
                )
            except UserError as e:
                raise UserError(f"tensor {name} in {self.path}: {e}") from e
        return t

    def _read(self, name: str) -> Tensor:
        """The stored tensor ``name``, read from its shard, which is opened for this read and
        closed after it: safetensors memory-maps shards, and every page read stays in this process's resident
        memory until unmapped, so a kept handle would make reading the whole model show as
        RSS of the model's size."""
        f = self.path / self._files[name]
        try:
            shard = safe_open(f, "pt")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"cannot read weight shard {f}: {e}") from e
        with shard:
            try:
                t = shard.get_tensor(name)
            except Exception as e:
                raise UserError(f"cannot read tensor {name} from {f.name}: {e}") from e
        if t.dtype == FP8 and name not in self._fp8_keys:
            raise UserError(
                f"{self.path}: tensor {name} is float8_e4m3fn but config.json has no FP8 "
                "quantization_config (its block size): give the model as published"
            )
        return t

    def get_finite(self, name: str) -> Tensor:
        """The tensor, refusing NaN/Inf (a corrupt or diverged checkpoint)."""
        return _finite(name, self.get(name))

    def get_finite_key(self, key: str) -> Tensor:
        """The checkpoint tensor ``key`` (see get_key), refusing NaN/Inf as get_finite does."""
        return _finite(key, self.get_key(key))

    def keys_of(self, name: str) -> set[str]:
        """The checkpoint keys model tensor ``name`` (see bind) is built from."""
        return {key for key, _ in self.sources[name].keys}


def _keys(d: dict) -> str:
    """``{"topk_method": "noaux_tc"}`` as ``topk_method 'noaux_tc'`` (comma-separated)."""
    return ", ".join(f"{k} {v!r}" for k, v in d.items())


def _finite(name: str, t: Tensor) -> Tensor:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise UserError(f"tensor {name} contains NaN or Inf values")
    return t


def load_config(path: Path):
    """The transformers config of the model or checkpoint folder ``path``."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot read the model config in {path}: {e}") from e
