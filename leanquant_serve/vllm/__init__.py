"""vLLM integration: the ``leanquant`` quantization method.

``register()`` is the ``vllm.general_plugins`` entry point (see pyproject.toml). vLLM calls it
in every process it starts (API server, engine core, each tensor-parallel worker), so it is
idempotent and imports vLLM only when called. After it ran, a checkpoint whose
``quantization_config.quant_method`` is ``"leanquant"`` is served by ``vllm serve <dir>`` with
no flag; ``--quantization leanquant`` is accepted too.

Dense linears get the linear methods of ``linear.py``; the experts of fused-MoE layers
(Mixtral, Qwen3-MoE: vLLM's ``RoutedExperts``) the fused-MoE method of ``moe.py``.
"""

from __future__ import annotations

NAME = "leanquant"


def register() -> None:
    """Register the ``leanquant`` quantization config with vLLM (idempotent)."""
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        get_quantization_config,
        register_quantization_config,
    )

    from .config import LeanQuantVLLMConfig

    if NAME in QUANTIZATION_METHODS and get_quantization_config(NAME) is LeanQuantVLLMConfig:
        return
    register_quantization_config(NAME)(LeanQuantVLLMConfig)
