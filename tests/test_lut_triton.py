"""The Triton LUT matmul kernel, run by Triton's interpreter on CPU tensors.

TRITON_INTERPRET=1 only works if it is set before triton is imported (``tl.zeros`` and other
``triton.language`` helpers are jitted at import), and tests/conftest.py imports triton
through transformers. So the kernel runs in one spawned worker process that inherits the
variable and imports triton afresh; tests send it the inputs and check its outputs here.
Every kernel line runs in the interpreter: both LUT paths (global load and ``tl.gather``),
both multiply paths (GEMV at M == 1, ``tl.dot`` above), split-K and bias. What the interpreter
cannot tell is speed; that the GPU compiler accepts the kernel is checked separately by
compiling it for sm_90 (H100) with the ptxas that ships with triton. Argument checks, launch
plans and that compilation need no interpreter and run in this process.

Tolerance of the random tests: the kernel accumulates exact fp32 products (fp16 x fp16 and
bf16 x fp16 fit in fp32's mantissa) and rounds once to x's dtype, so against the fp32
reference x.float() @ W.T + b every element must satisfy
    |y - ref| <= u * |ref| + 2 * K * 2**-24 * (|x| @ |W|.T + |b|)
with u = 2**-11 (fp16 output: one rounding to nearest) or 2**-7 (bf16: a whole ulp, since the
interpreter casts fp32 to bf16 by truncation where the GPU rounds to nearest), plus a generous
bound on fp32 summation-order differences. A wrongly placed or dropped k term is ~0.1 * |x_k|,
far above it. The identity and integer tests are exact.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from leanquant_serve.format.config import LeanQuantConfig
from leanquant_serve.format.tensors import dequantize_linear, pack_linear
from leanquant_serve.kernels import lut_triton as lt

MODULE = "leanquant_serve.kernels.lut_triton"


def _interpreted(args, kwargs, entry="lut_matmul"):
    """``lut_triton.<entry>(*args, **kwargs)`` in the worker, where triton runs interpreted."""
    torch.set_num_threads(1)
    from triton.runtime.interpreter import InterpretedFunction

    from leanquant_serve.kernels import lut_triton

    assert isinstance(lut_triton._lut_matmul_kernel, InterpretedFunction)
    return getattr(lut_triton, entry)(*args, **kwargs)


@pytest.fixture(scope="module")
def lut_matmul():
    """``lut_matmul`` run by Triton's interpreter in a worker process."""
    pytest.importorskip("triton")
    env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:  # the worker starts on the first task and inherits the variables
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(os.getpid).result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def run(*args, **kwargs):
        return pool.submit(_interpreted, args, kwargs).result()

    run.table_matmul = lambda *a, **kw: pool.submit(_interpreted, a, kw, "table_matmul").result()
    yield run
    pool.shutdown()


def make_linear(bits: int, out_f: int, in_f: int, seed: int, integer_lut: bool = False):
    """Stored tensors (qweight, lut) of a random nonuniform linear and its dense fp32 weight."""
    g = torch.Generator().manual_seed(seed)
    cfg = LeanQuantConfig(bits=bits, group_size=-1, grid="nonuniform")
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    if integer_lut:  # integers in [-8, 8], distinct within a row at <= 4 bits
        shift = torch.randint(0, 17, (out_f, 1), generator=g)
        lut = ((torch.arange(1 << bits) + shift) % 17 - 8).float()
    else:
        lut = torch.randn(out_f, 1 << bits, generator=g).sort(dim=1).values * 0.1
    t = pack_linear(cfg, codes, lut=lut)
    return t["qweight"], t["lut"], dequantize_linear(cfg, t)


def check_close(y, x, w, bias=None):
    k = x.shape[-1]
    ref = x.float() @ w.T
    mag = x.float().abs() @ w.abs().T
    if bias is not None:
        ref, mag = ref + bias.float(), mag + bias.float().abs()
    u = 2.0**-11 if y.dtype == torch.float16 else 2.0**-7  # bf16: the interpreter truncates
    bound = u * ref.abs() + 2 * k * 2.0**-24 * mag
    err = (y.float() - ref).abs()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert bool((err <= bound).all()), (
        f"max err {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}"
    )


SHAPES = [(48, 64), (72, 96), (40, 128)]  # (out, in): out below / above BLOCK_N = 64


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("split", [1, 2], ids=["nosplit", "split"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_reference(lut_matmul, bits, m, shape, split, bias):
    out_f, in_f = shape
    qweight, lut, w = make_linear(bits, out_f, in_f, seed=bits * 100 + m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, in_f, generator=g).half()
    b = torch.randn(out_f, generator=g).half() if bias else None
    # BLOCK_K = 32 so that even in = 64 has two K ranges to split, and in = 96 a ragged one
    plan = lt.launch_plan(m, out_f, in_f, split_k=split, block_k=32)
    assert plan.split_k == split
    y = lut_matmul(x, qweight, lut, bits, bias=b, split_k=split, block_k=32)
    check_close(y, x, w, b)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lut_in_registers(lut_matmul, bits, m, split):
    """The tl.gather path (table tile held in registers), default block sizes."""
    qweight, lut, w = make_linear(bits, 72, 512, seed=bits)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(2, m, 512, generator=g).half()  # leading dims are flattened and restored
    b = torch.randn(72, generator=g).float()
    y = lut_matmul(x, qweight, lut, bits, bias=b, split_k=split, lut_in_registers=True)
    assert lt.launch_plan(2 * m, 72, 512, split_k=split).split_k == split
    assert y.shape == (2, m, 72)
    check_close(y, x, w, b)


@pytest.mark.parametrize("lut_in_registers", [False, True], ids=["global", "registers"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_identity_exact(lut_matmul, bits, lut_in_registers):
    """x = I gives y = W.T exactly: every code of every (k, n) position, 3-bit straddles
    included, through the tl.dot path (M = 96: two BLOCK_M = 64 row blocks, the second ragged)."""
    qweight, lut, w = make_linear(bits, 72, 96, seed=7)
    x = torch.eye(96, dtype=torch.float16)
    y = lut_matmul(x, qweight, lut, bits, lut_in_registers=lut_in_registers)
    assert torch.equal(y, w.T.half())


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_integer_exact(lut_matmul, bits, m, split):
    """Integer tables in [-8, 8] and x in {-1, 0, 1}: every partial sum is an integer below
    2048, exact in fp32 and fp16, so y must equal the reference bit for bit (the GEMV path's
    counterpart of the identity test, split or not)."""
    qweight, lut, w = make_linear(bits, 48, 128, seed=11, integer_lut=True)
    g = torch.Generator().manual_seed(m)
    x = torch.randint(-1, 2, (m, 128), generator=g).half()
    ref = x.float() @ w.T
    y = lut_matmul(x, qweight, lut, bits, split_k=split, block_k=32)
    assert torch.equal(y.float(), ref)


@pytest.mark.parametrize("m", [1, 16])
def test_bfloat16(lut_matmul, m):
    """bf16 x: fp32 products in the GEMV, tf32 tl.dot (exact for bf16 and the fp16 table)."""
    qweight, lut, w = make_linear(4, 72, 128, seed=3)
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    for split in (1, 2):
        check_close(lut_matmul(x, qweight, lut, 4, split_k=split, block_k=32), x, w)


def test_strided_operands(lut_matmul):
    """Non-contiguous x (a column slice, and a transpose) and a qweight column slice, as when
    one output projection is cut from a fused qkv weight."""
    qweight, lut, w = make_linear(3, 120, 96, seed=5)
    q_part, lut_part, w_part = qweight[:, 40:100], lut[40:100], w[40:100]
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(4, 200, generator=g).half()
    for x in (wide[:, 10:106], wide[:, :96].t().contiguous().t()):
        assert not x.is_contiguous()
        check_close(lut_matmul(x, q_part, lut_part, 3, split_k=2, block_k=32), x, w_part)
        check_close(lut_matmul(x[:1], q_part, lut_part, 3, split_k=2, block_k=32), x[:1], w_part)


def test_default_plan():
    """Split-K kicks in when the output tiles cannot fill the SMs (an H100 has 132)."""
    decode = lt.launch_plan(1, 16384, 16384, num_sms=132)  # 256 tiles of 64
    assert (decode.block_m, decode.block_n, decode.block_k) == (1, 64, 64)
    assert 2 * 132 <= 256 * decode.split_k <= 4 * 132  # 2 to 4 programs per SM
    assert decode.k_per_split * decode.split_k >= 16384 > decode.k_per_split * (decode.split_k - 1)
    assert lt.launch_plan(1, 53248, 16384, num_sms=132).split_k == 1  # 832 tiles suffice
    assert lt.launch_plan(16, 16384, 53248, num_sms=132).split_k >= 2
    assert lt.launch_plan(64, 16384, 16384, num_sms=132).block_m == 64
    assert lt.launch_plan(3, 48, 64).block_m == 16
    assert lt.launch_plan(1, 48, 64, split_k=8, block_k=32).split_k == 2  # never an empty range
    with pytest.raises(ValueError, match="block_k"):
        lt.launch_plan(1, 48, 64, block_k=48)


@pytest.mark.skipif(lt.triton is None, reason="triton is not installed")
def test_rejects_bad_arguments():
    qweight, lut, _ = make_linear(4, 48, 64, seed=0)
    x = torch.zeros(1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="x: last dim"):
        lt.lut_matmul(x[:, :32], qweight, lut, 4)
    with pytest.raises(ValueError, match="lut: shape"):
        lt.lut_matmul(x, qweight, lut[:, :8], 4)
    with pytest.raises(ValueError, match="x: dtype"):
        lt.lut_matmul(x.float(), qweight, lut, 4)
    with pytest.raises(ValueError, match="bits"):
        lt.lut_matmul(x, qweight, lut, 5)
    with pytest.raises(ValueError, match="bias"):
        lt.lut_matmul(x, qweight, lut, 4, bias=torch.zeros(47))
    assert lt.lut_matmul(x[:0], qweight, lut, 4).shape == (0, 48)
    assert not lt.is_available("cpu")


# (BITS, BLOCK_M, LUT_IN_REGISTERS, x dtype, HAS_BIAS): every bit width through both multiply
# paths, plus the tl.gather path, bf16 (tf32 tl.dot) and bias
SM90_VARIANTS = [(b, bm, False, "fp16", False) for b in (2, 3, 4, 8) for bm in (1, 16)] + [
    (4, 1, True, "fp16", True),
    (3, 16, True, "fp16", False),
    (4, 64, False, "bf16", True),
    (2, 1, False, "bf16", False),
    # table grids (NF/SF): LUT_IN_REGISTERS slot "table" = shared fp32 table + group scales
    (4, 1, "table", "fp16", False),
    (4, 16, "table", "fp16", True),
    (3, 64, "table", "bf16", False),
]


@pytest.mark.parametrize("variant", SM90_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_compiles_for_h100(variant, tmp_path, monkeypatch):
    """What the interpreter cannot show: the real compiler (Triton -> PTX -> ptxas cubin for
    sm_90) accepts the kernel. Needs no GPU: triton's wheel ships ptxas."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = lt._lut_matmul_kernel
    if not isinstance(fn, triton.runtime.JITFunction):
        pytest.skip("TRITON_INTERPRET is set in this process")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile afresh
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences its warning
    bits, block_m, regs, xdt, bias = variant
    sig = {name: "i32" for name in fn.arg_names}
    table = regs == "table"  # a table grid: fp32 shared table, fp16 scales per group
    sig.update(x_ptr=f"*{xdt}", qweight_ptr="*i32", lut_ptr="*fp32" if table else "*fp16")
    sig.update(out_ptr=f"*{xdt}", bias_ptr="*fp16", scales_ptr="*fp16")
    consts = dict(
        BITS=bits,
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=64,
        HAS_BIAS=bias,
        LUT_IN_REGISTERS=False if table else regs,
        X_IS_FP16=xdt == "fp16",
        HAS_SCALES=table,
        stride_xk=1,  # unit strides are specialised to constants at launch
        stride_qn=1,
        stride_on=1,
    )
    sig.update(dict.fromkeys(consts, "constexpr"))
    src = ASTSource(fn, sig, consts)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except FileNotFoundError as e:  # no ptxas / CUDA toolchain next to triton
        pytest.skip(f"no NVIDIA toolchain: {e}")
    assert kernel.asm["cubin"] and ".target sm_90" in kernel.asm["ptx"]


def test_importable_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        f"import {MODULE} as m\n"
        "import torch\n"
        "assert not m.is_available('cpu') and not m.is_available('cuda')\n"
        "try:\n"
        "    m.lut_matmul(torch.zeros(1, 32).half(), torch.zeros(4, 8, dtype=torch.int32),"
        " torch.zeros(8, 16).half(), 4)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- table grids


def make_table_linear(bits: int, out_f: int, in_f: int, group_size: int, seed: int):
    """Stored (qweight, scales, table) of a random table-grid (NF) linear and its fp32 weight."""
    from quantizer.tables import quantile_table

    g = torch.Generator().manual_seed(seed)
    table = quantile_table("nf", bits)
    cfg = LeanQuantConfig(
        bits=bits, group_size=group_size, grid="table", table=tuple(table.tolist())
    )
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    scales = torch.rand(cfg.n_groups(in_f), out_f, generator=g) * 0.1 + 0.01
    t = pack_linear(cfg, codes, scales=scales)
    return t["qweight"], t["scales"], table, dequantize_linear(cfg, t)


@pytest.mark.parametrize("split", [1, 2], ids=["nosplit", "split"])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (2, -1)])
def test_table_grid_matches_reference(lut_matmul, bits, group_size, m, split):
    """Table grids: the shared table (row stride 0) times each (group, row)'s scale, GEMV and
    tl.dot paths, split or not, with a bias; BLOCK_K = 32 crosses group boundaries at G = 32."""
    qweight, scales, table, w = make_table_linear(bits, 72, 128, group_size, seed=bits + m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 128, generator=g).half()
    b = torch.randn(72, generator=g).half()
    y = lut_matmul.table_matmul(
        x, qweight, scales, table, bits, group_size, b, split_k=split, block_k=32
    )
    # the GEMV multiplies by the fp32 weight; tl.dot takes fp16 x and W rounded to fp16 (the
    # portable path's fp16 weight), whose products are exact
    check_close(y, x, w if m == 1 else w.half().float(), b)


def test_table_grid_identity_exact(lut_matmul):
    """x = I through tl.dot: y = W.T rounded to fp16, every code and every group's scale."""
    qweight, scales, table, w = make_table_linear(4, 72, 96, 32, seed=3)
    y = lut_matmul.table_matmul(torch.eye(96, dtype=torch.float16), qweight, scales, table, 4, 32)
    assert torch.equal(y, w.T.half())


@pytest.mark.skipif(lt.triton is None, reason="triton is not installed")
def test_table_grid_rejects_bad_arguments():
    qweight, scales, table, _ = make_table_linear(4, 48, 64, 32, seed=0)
    x = torch.zeros(1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="scales: shape"):
        lt.table_matmul(x, qweight, scales[:1], table, 4, 32)
    with pytest.raises(ValueError, match="group_size"):
        lt.table_matmul(x, qweight, scales, table, 4, 48)
    with pytest.raises(ValueError, match="table: shape"):
        lt.table_matmul(x, qweight, scales, table[:8], 4, 32)
