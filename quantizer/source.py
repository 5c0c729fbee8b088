"""Reading an unquantized Hugging Face model folder tensor by tensor (never the whole model),
under the model's own parameter names: transformers' checkpoint conversion for the
architecture (renamings, per-expert tensors merged into fused experts) is applied per tensor
(leanquant_serve.format.hf_names)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from leanquant_serve.format.hf_names import Source, from_checkpoint, to_checkpoint

from .errors import UserError

INDEX = "model.safetensors.index.json"


class SourceModel:
    """A model folder: config.json plus model.safetensors or sharded safetensors with an index."""

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
        if "quantization_config" in self.config:
            method = self.config["quantization_config"].get("quant_method", "?")
            raise UserError(
                f"{self.path} is already quantized ({method}): give an unquantized model"
            )
        self.weight_map = self._weight_map()  # checkpoint key -> file
        # model tensor name -> how it is read (identity until bind())
        self.sources: dict[str, Source] = {k: Source([(k, k)]) for k in self.weight_map}

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
        """The checkpoint tensor ``name``, read from its shard, which is opened for this read and closed after it:
        safetensors memory-maps shards, and every page read stays in this process's resident
        memory until unmapped, so a kept handle would make reading the whole model show as
        RSS of the model's size."""
        if name not in self.weight_map:
            raise UserError(f"tensor {name} is missing from {self.path}")
        f = self.path / self.weight_map[name]
        try:
            shard = safe_open(f, "pt")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"cannot read weight shard {f}: {e}") from e
        with shard:
            try:
                return shard.get_tensor(name)
            except Exception as e:
                raise UserError(f"cannot read tensor {name} from {f.name}: {e}") from e

    def get_finite(self, name: str) -> Tensor:
        """The tensor, refusing NaN/Inf (a corrupt or diverged checkpoint)."""
        return _finite(name, self.get(name))

    def get_finite_key(self, key: str) -> Tensor:
        """The checkpoint tensor ``key`` (see get_key), refusing NaN/Inf as get_finite does."""
        return _finite(key, self.get_key(key))

    def keys_of(self, name: str) -> set[str]:
        """The checkpoint keys model tensor ``name`` (see bind) is built from."""
        return {key for key, _ in self.sources[name].keys}


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
