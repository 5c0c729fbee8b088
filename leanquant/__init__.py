"""``leanquant``: the product's entry points over the quantizer and the engines' packages.

``leanquant.cli`` is the ``leanquant`` command (``quantize``, ``eval``, ``export``, ``plan``,
``fetch-assets``): a thin layer that builds its flags from the dataclasses below and calls them,
so the library and the command share every default and every check.

Python API (the same calls the CLI makes):

- :class:`quantizer.pipeline.QuantizeJob` + :func:`quantizer.pipeline.quantize_model`
- :class:`quantizer.gptq.GPTQSettings` (the grid, bits, groups, act-order, ...)
- :class:`quantizer.evaluate.EvalJob` + :func:`quantizer.evaluate.evaluate`
"""
