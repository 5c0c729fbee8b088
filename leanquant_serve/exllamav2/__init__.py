"""exllamav2: everything this project knows about that engine, in one folder.

- :mod:`.export`: ``leanquant export exllamav2``, a LeanQuant checkpoint as GPTQ or EXL2
  tensors that exllamav2 0.3.2 loads exactly.
- :mod:`.load`: :func:`load_exllamav2`, a ready model, cache, tokenizer and generator in one
  call (exports first when given a LeanQuant folder).
"""

from .load import ExLlamaV2Session, ExLlamaV2Unavailable, load_exllamav2

__all__ = ["ExLlamaV2Session", "ExLlamaV2Unavailable", "load_exllamav2"]
