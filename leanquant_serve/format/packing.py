"""Packing of ``bits``-wide integer codes into int32 words (the GPTQ / vLLM convention).

Along the packed dimension the codes form a little-endian bitstream: code j occupies bits
[j * bits, (j + 1) * bits) of the stream, and word k holds stream bits [32 k, 32 k + 32),
lowest bit first. At 2, 4 and 8 bits a word holds 16, 8 or 4 whole codes
(word = sum_j code_j << (bits * j)); at 3 bits 32 codes fill 3 words and codes 10 and 21 of
each chunk straddle a word boundary (GPTQ's 3-bit layout). Words are stored as int32, so
words >= 2**31 appear negative.
"""

from __future__ import annotations

from math import gcd

import torch
from torch import Tensor

from .config import SUPPORTED_BITS, FormatError

_WORD = 32
_LOW32 = (1 << _WORD) - 1


def chunk_size(bits: int) -> int:
    """Number of codes that fill a whole number of words: 32 // gcd(32, bits)."""
    _check_bits(bits)
    return _WORD // gcd(_WORD, bits)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits: {bits!r} is not one of {', '.join(map(str, SUPPORTED_BITS))}")


def _layout(bits: int, device: torch.device) -> tuple[int, int, Tensor, Tensor]:
    """(codes per chunk, words per chunk, word index of each code, bit shift of each code)."""
    n = chunk_size(bits)
    offset = torch.arange(n, device=device, dtype=torch.int64) * bits
    return n, n * bits // _WORD, offset // _WORD, offset % _WORD


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_aligned(t: Tensor, dim: int, multiple: int, what: str) -> int:
    if t.dim() == 0:
        raise FormatError(f"{what}: a 0-d tensor cannot be packed or unpacked")
    dim = dim % t.dim()
    if t.shape[dim] % multiple:
        raise FormatError(
            f"{what}: size {t.shape[dim]} along dim {dim} is not a multiple of {multiple}"
        )
    return dim


def check_code_range(name: str, codes: Tensor, bits: int) -> None:
    """Raise ``FormatError`` naming ``name`` unless every code is in [0, 2**bits)."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise FormatError(
            f"{name}: values span [{int(codes.min())}, {int(codes.max())}], "
            f"outside [0, {(1 << bits) - 1}]"
        )


def pack_codes(codes: Tensor, bits: int, dim: int) -> Tensor:
    """Pack integer ``codes`` in [0, 2**bits) along ``dim`` into int32 words.

    The size along ``dim`` must be a multiple of ``chunk_size(bits)`` and becomes
    ``size * bits // 32``; other dimensions are unchanged. Runs on the codes' device.
    """
    n, n_words, word, shift = _layout(bits, codes.device)
    if not _is_integer(codes.dtype):
        raise FormatError(f"codes: dtype {codes.dtype} is not an integer type")
    dim = _check_aligned(codes, dim, n, f"codes ({bits}-bit)")
    check_code_range("codes", codes, bits)
    c = codes.movedim(dim, -1).to(torch.int64)
    c = c.reshape(*c.shape[:-1], -1, n) << shift  # every code shifted to its place in its word
    # Fields never overlap, so adding is OR-ing: the low 32 bits land in `word`, any spill
    # past bit 31 (a straddling code) lands in the next word. One spare word catches
    # the (always zero) spill past the chunk's end.
    words = torch.zeros(*c.shape[:-1], n_words + 1, dtype=torch.int64, device=c.device)
    words.index_add_(-1, word, c & _LOW32).index_add_(-1, word + 1, c >> _WORD)
    words = words[..., :n_words]
    words = torch.where(words > _LOW32 >> 1, words - (1 << _WORD), words)  # wrap to int32
    return words.to(torch.int32).flatten(-2).movedim(-1, dim).contiguous()


def unpack_codes(packed: Tensor, bits: int, dim: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int32 codes in [0, 2**bits) along ``dim``."""
    n, n_words, word, shift = _layout(bits, packed.device)
    if packed.dtype != torch.int32:
        raise FormatError(f"packed: dtype {packed.dtype} is not torch.int32")
    dim = _check_aligned(packed, dim, n_words, f"packed ({bits}-bit)")
    if n_words == 1:  # 2, 4, 8 bits: whole codes per word, code j at shift j * bits
        w = packed.movedim(dim, -1).unsqueeze(-1) >> shift.to(torch.int32)
        codes = w & ((1 << bits) - 1)  # the mask also clears an arithmetic shift's sign bits
        return codes.flatten(-2).movedim(-1, dim).contiguous()
    w = packed.movedim(dim, -1).to(torch.int64) & _LOW32  # words as unsigned
    w = w.reshape(*w.shape[:-1], -1, n_words)
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # spare word for the gather below
    # A code is at most 8 bits wide at a shift <= 31: word's bits plus 8 bits of the next word.
    pair = w[..., word] | ((w[..., word + 1] & 0xFF) << _WORD)
    codes = (pair >> shift) & ((1 << bits) - 1)
    return codes.to(torch.int32).flatten(-2).movedim(-1, dim).contiguous()
