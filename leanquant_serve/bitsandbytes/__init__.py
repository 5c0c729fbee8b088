"""bitsandbytes: :mod:`.export` writes a LeanQuant ``--grid nf --bits 4`` checkpoint as the
pre-quantized NF4 tensors that transformers' bitsandbytes integration (and vLLM's bitsandbytes
loader) read, bit-exact."""
