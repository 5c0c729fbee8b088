"""``LeanQuantVLLMConfig``: vLLM's view of a LeanQuant checkpoint's ``quantization_config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

from ..format import Checkpoint, FormatError, LeanQuantConfig, fused_misfit
from . import NAME
from .linear import (
    LeanQuantAffineLinearMethod,
    LeanQuantLUTLinearMethod,
    LeanQuantTableLinearMethod,
)
from .moe import moe_method

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, so it is shown


class LeanQuantVLLMConfig(QuantizationConfig):
    """Wraps the contract's :class:`LeanQuantConfig`; every field is validated by it.

    When the model is a local folder, :meth:`maybe_update_config` validates every tensor
    header of the checkpoint (names, shapes, dtypes; no tensor data is read), so a broken
    checkpoint fails at load with the tensor's name, and records which linears are stored
    quantized. Fused vLLM layers (qkv_proj, gate_up_proj) are quantized iff all their parts are.
    """

    def __init__(self, qcfg: LeanQuantConfig) -> None:
        super().__init__()
        self.qcfg = qcfg
        self.quantized: set[str] | None = None  # checkpoint prefixes with a .qweight, if read

    def __repr__(self) -> str:
        return f"LeanQuantVLLMConfig({self.qcfg.to_dict()})"

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 60  # the portable path runs anywhere; each kernel checks its own capability

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the block lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LeanQuantVLLMConfig:
        return cls(LeanQuantConfig.from_dict(config))

    @staticmethod
    def get_checkpoint_weight_mapper():
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()  # keep g_idx: act-order layers need it (the default drops it)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        if not Path(model_name).is_dir():
            logger.warning(
                "leanquant: %s is not a local folder; its tensors are checked only as they "
                "load", model_name,
            )
            return
        ckpt = Checkpoint(model_name)
        if ckpt.qcfg != self.qcfg:
            raise FormatError(
                f"{ckpt.path}/config.json: quantization_config differs from the one vLLM parsed"
            )
        ckpt.validate()  # headers only: names, shapes, dtypes
        self.quantized = set(ckpt.quantized_prefixes())

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.quantized is not None:
            self.quantized = set(hf_to_vllm_mapper.apply_list(sorted(self.quantized)))

    def is_quantized(self, prefix: str) -> bool:
        """Whether vLLM layer ``prefix`` (possibly fused, e.g. ``...qkv_proj``) is stored
        quantized; a fused layer whose parts disagree is an error naming them."""
        parent, _, name = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(name, [name])
        names = [f"{parent}.{p}" if parent else p for p in parts]
        if self.quantized is None:
            quantized = {n for n in names if not self.qcfg.is_skipped(n)}
        else:
            quantized = self.quantized
        if fused_misfit(names, quantized):  # the contract's rule, in vLLM's words
            mixed = ", ".join(f"{n} ({'quantized' if n in quantized else 'dense'})" for n in names)
            raise FormatError(f"{prefix}: vLLM fuses {mixed}; they must all be quantized or none")
        return names[0] in quantized

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, RoutedExperts):  # a fused-MoE layer's experts
            return moe_method(self, layer, prefix)
        if not isinstance(layer, LinearBase):
            return None  # embeddings and lm_head stay as stored
        if not self.is_quantized(prefix):
            return UnquantizedLinearMethod()
        if self.qcfg.grid == "nonuniform":
            return LeanQuantLUTLinearMethod(self)
        if self.qcfg.grid == "table":
            return LeanQuantTableLinearMethod(self)
        return LeanQuantAffineLinearMethod(self)
