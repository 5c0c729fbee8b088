"""compressed-tensors: :mod:`.export` writes a LeanQuant checkpoint as compressed-tensors
``pack-quantized`` tensors that stock vLLM loads without this project's plugin."""
