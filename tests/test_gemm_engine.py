"""The ``ffi`` implementation's GEMM choice (``JAX_MC2_GEMM``): XLA's own
dot_general or OpenBLAS sgemm inside the custom calls. The int8 results are
bit for bit the same either way (both accumulators are exact); the float
results keep fp32 accumulation and one rounding, and on XLA's GEMM equal the
``xla`` implementation's bits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from handler_attrs import matmul_attrs
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_quant_v4_lowp import ROW_IDS as LOWP_ROW_IDS
from test_quant_v4_lowp import ROWS as LOWP_ROWS
from test_quant_v4_lowp import call_kwargs as lowp_kwargs
from test_quant_v4_lowp import finish as lowp_finish
from test_quant_v4_lowp import rank_y as lowp_rank_y
from test_quant_v4_lowp import single_device_case as lowp_single_case

import jax_mc2 as mc2
from jax_mc2 import quant
from jax_mc2.framework import cpu
from jax_mc2.implementations import ffi as _ffi


def _lowered(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def test_env_choice_is_validated(monkeypatch):
    monkeypatch.setenv("JAX_MC2_GEMM", "mkl")
    with pytest.raises(ValueError, match=r"JAX_MC2_GEMM must be one of .*'mkl'"):
        _ffi.gemm_engine(jnp.int8)
    monkeypatch.setenv("JAX_MC2_GEMM", "")  # empty means unset: the table
    assert _ffi.gemm_engine(jnp.float32) == _ffi.BLAS


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8", _ffi.FLOAT8])
@pytest.mark.parametrize("k", [64, 4096])
@pytest.mark.parametrize("parallelism", [1, 8])
def test_auto_follows_the_cpu_feature_table(monkeypatch, dtype, k, parallelism):
    monkeypatch.delenv("JAX_MC2_GEMM", raising=False)
    flags = set(_ffi.cpu_flags())
    rules = _ffi.XLA_GEMM_RULES.get(dtype, ())
    want = any(
        features & flags and k >= (alone_k if parallelism == 1 else shared_k)
        for features, shared_k, alone_k in rules
    )
    assert _ffi.gemm_engine(dtype, k, parallelism) == (_ffi.XLA_DOT if want else _ffi.BLAS)


def test_the_table_by_cpu(monkeypatch):
    monkeypatch.delenv("JAX_MC2_GEMM", raising=False)
    avx2 = ("avx2", "fma", "f16c")
    avx512 = ("avx2", "avx512f")
    cases = [
        # (CPU flags, dtype, k, ranks sharing the cores, per-rank m*k*n or None, engine)
        (avx2, "bfloat16", 4096, 1, None, "blas"),
        (avx2, "int8", 512, 8, None, "blas"),
        (avx2, "int8", 2048, 8, None, "xla"),
        (avx2, "int8", 64, 1, None, "xla"),  # one rank: XLA's int8 GEMM at every k
        (avx2, "int8", 512, 2, None, "blas"),
        (avx2, "float16", 4096, 1, None, "blas"),
        (avx2, "float16", 512, 1, 512**3, "blas"),
        # Native bfloat16 / int8 GEMMs: XLA's, but for the large products of
        # ranks sharing the cores
        (("avx2", "avx512f", "avx512_vnni", "avx512_bf16"), "bfloat16", 64, 8, 2**20, "xla"),
        (("avx2", "avx512f", "avx512_vnni", "avx512_bf16"), "bfloat16", 256, 8, 2**30, "blas"),
        (("avx2", "avx512f", "avx512_vnni", "avx512_bf16"), "bfloat16", 4096, 1, 2**36, "xla"),
        (("avx2", "avx512f", "avx512_vnni"), "int8", 64, 8, 2**20, "xla"),
        (("avx2", "avx512f", "avx512_vnni"), "int8", 256, 8, 2**30, "blas"),
        (("avx2", "avx512f", "avx512_vnni"), "int8", 1024, 8, 2**32, "xla"),  # AVX2's k rule
        (("avx2", "avx512f", "avx512_vnni"), "int8", 2048, 1, 2**33, "xla"),
        (("avx2", "avx512f", "avx512_vnni", "avx512_bf16"), "float16", 4096, 1, None, "blas"),
        ((), "int8", 4096, 1, None, "blas"),
        # AVX-512: XLA's GEMM for small products (float16 for a rank alone)
        (avx512, "float16", 512, 1, 512**3, "xla"),
        (avx512, "float16", 768, 1, 768**3, "blas"),
        (avx512, "float16", 1024, 1, 1024**3, "blas"),
        (avx512, "float16", 512, 8, 2**29, "blas"),
        (avx2, _ffi.FLOAT8, 512, 1, 512**3, "blas"),
        (avx512, _ffi.FLOAT8, 1024, 1, 1024**3, "xla"),
        (avx512, _ffi.FLOAT8, 2048, 1, 2048**3, "blas"),
        (avx512, _ffi.FLOAT8, 512, 8, 2**29, "xla"),
        (avx512, _ffi.FLOAT8, 256, 8, 2**30, "blas"),
        (avx512, _ffi.FLOAT8, 64, 1, None, "blas"),  # the product unknown: by k alone
    ]
    for flags, dtype, k, ranks, product, engine in cases:
        monkeypatch.setattr(_ffi, "cpu_flags", lambda flags=flags: flags)
        got = _ffi.gemm_engine(dtype, k, ranks, product)
        assert got == engine, (flags, dtype, k, ranks, product)


def test_ranks_sharing_the_cores_decide_the_int8_lowering(monkeypatch):
    """With AVX2 alone and k < 1024 (512 on one rank, 256 a rank on two):
    XLA's int8 GEMM (and the epilogue in lax ops) for a program of one rank,
    sgemm inside mc2_int8_matmul_ffi when 2 ranks share the cores."""
    monkeypatch.delenv("JAX_MC2_GEMM", raising=False)
    monkeypatch.setattr(_ffi, "cpu_flags", lambda: ("avx2", "fma", "f16c"))
    x1, x2 = np.ones((8, 512), np.int8), np.ones((512, 16), np.int8)
    s = jnp.ones(16, jnp.bfloat16)
    one = _lowered(lambda a, b: mc2.quant_matmul_all_reduce(a, b, None, dequant_scale=s), x1, x2)
    assert "dot_general" in one and "custom_call" not in one
    two = _lowered(
        jax.shard_map(
            lambda a, b: mc2.quant_matmul_all_reduce(a, b, "tp", dequant_scale=s),
            mesh=Mesh(np.array(jax.devices()[:2]), ("tp",)),
            in_specs=(P(None, "tp"), P("tp", None)),
            out_specs=P(),
        ),
        x1,
        x2,
    )
    assert "mc2_int8_matmul_ffi" in two and "dot_general" not in two


def test_the_choice_decides_the_lowering(monkeypatch):
    x1 = np.ones((4, 8), np.int8)
    x2 = np.ones((8, 4), np.int8)
    s = np.ones(4, np.float32)

    def lowered():
        # A new function each time: the choice is read when a call is lowered,
        # and jit caches lowerings per function.
        return _lowered(
            lambda a, b: mc2.quant_matmul_all_reduce(
                a, b, None, dequant_scale=s.astype(jnp.bfloat16)
            ),
            x1,
            x2,
        )

    monkeypatch.setenv("JAX_MC2_GEMM", "xla")
    text = lowered()
    assert "dot_general" in text and "custom_call" not in text
    monkeypatch.setenv("JAX_MC2_GEMM", "blas")
    text = lowered()
    assert "mc2_int8_matmul_ffi" in text and "dot_general" not in text
    f = np.ones((4, 8), np.float16)
    monkeypatch.setenv("JAX_MC2_GEMM", "xla")
    assert "custom_call" not in _lowered(lambda a, b: mc2.mm_all_reduce_base(a, b, None), f, f.T)


def _int8_case(rng, lead, k, n, *, transpose):
    x1 = rng.integers(-128, 128, (*lead, k), dtype=np.int8)
    x2 = rng.integers(-128, 128, (n, k) if transpose else (k, n), dtype=np.int8)
    bias = rng.integers(-(2**20), 2**20, n, dtype=np.int32)
    # Non-power-of-two scales: the two scales' order shows in the bits.
    scale = (rng.random(n) * 3e-4 + 1e-5).astype(np.float32)
    return x1, x2, bias, scale


INT8_ROWS = [
    # (out dtype, pertoken, x3, comm quant, transpose, lead shape, k)
    ("bfloat16", False, False, False, False, (16,), 64),
    ("float16", False, True, False, True, (2, 8), 1500),  # two sgemm k-chunks
    ("float16", True, True, False, False, (24,), 96),  # float32 scale: float16 out
    ("float16", False, False, True, False, (12,), 40),
    ("float16", True, True, False, False, (1500,), 96),  # a tall output
]


def _op(kw):
    # A new function each time: the choice is read when a call is lowered.
    return jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None, **kw))


def _comm_quant_op(kw, n):
    """The int8 low-bit communication on 2 devices (the comm quantization is
    the epilogue's last step)."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    s1 = np.full(n, 4.0, np.float16)
    comm = dict(comm_quant_scale_1=s1, comm_quant_scale_2=s1 * 2)
    return jax.jit(
        jax.shard_map(
            lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", **kw, **comm),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None)),
            out_specs=P(),
        )
    )


@pytest.mark.parametrize("row", INT8_ROWS, ids=lambda r: "-".join(map(str, r[:5])))
def test_int8_results_do_not_depend_on_the_gemm(monkeypatch, row):
    out_dtype, pertoken, with_x3, comm, transpose, lead, k = row
    rng = np.random.default_rng(11)
    n = 48
    x1, x2, bias, raw = _int8_case(rng, lead, k, n, transpose=transpose)
    kw = dict(bias=bias, transpose_x2=transpose, implementation="ffi")
    if out_dtype == "float16":
        kw["dequant_scale"] = quant.trans_quant_param(raw)
    else:
        kw["dequant_scale"] = jnp.asarray(raw, jnp.bfloat16)
    if pertoken:  # with a pertoken scale the dequant scale is float32
        kw["dequant_scale"] = raw
        kw["pertoken_scale"] = (rng.random(int(np.prod(lead))) + 0.5).astype(np.float32)
    if with_x3:
        kw["x3"] = jnp.asarray(rng.standard_normal((*lead, n)), out_dtype)
    results = {}
    for engine in ("blas", "xla"):
        monkeypatch.setenv("JAX_MC2_GEMM", engine)
        fn = _comm_quant_op(kw, n) if comm else _op(kw)
        results[engine] = np.asarray(fn(x1, x2).astype(jnp.float32))
    np.testing.assert_array_equal(results["xla"], results["blas"])


@pytest.mark.parametrize("mode,kind,out_dtype", LOWP_ROWS, ids=LOWP_ROW_IDS)
def test_lowp_rows_on_either_gemm(monkeypatch, mode, kind, out_dtype):
    """quant_matmul_all_reduce_v4's fp8 / hifloat8 / MX rows: on XLA's GEMM
    the ``ffi`` implementation is the ``xla`` implementation's program; on
    sgemm it is the kernel. Both give
    the oracle's bits here (the sums are exact in fp32, in any order)."""
    rng = np.random.default_rng(len(mode) + 3 * len(kind))
    transpose_x2 = mode == "mx"
    x1, x2, s1, s2, bias = lowp_single_case(rng, mode, kind, transpose_x2=transpose_x2, pow2=True)
    kw = lowp_kwargs(mode, kind, s1, s2, bias, None, out_dtype, transpose_x2)
    want = lowp_finish(
        lowp_rank_y(mode, kind, x1, x2, s1, s2, bias, transpose_x2=transpose_x2), None, out_dtype
    )

    def op(impl):
        return jax.jit(
            lambda a, b: mc2.quant_matmul_all_reduce_v4(a, b, None, implementation=impl, **kw)
        )

    for engine in ("blas", "xla"):
        monkeypatch.setenv("JAX_MC2_GEMM", engine)
        kernel = engine == "blas"
        assert ("mc2_lowp_matmul_ffi" in op("ffi").lower(x1, x2).as_text()) == kernel
        got = np.asarray(op("ffi")(x1, x2))
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
        if not kernel:
            np.testing.assert_array_equal(got, np.asarray(op("xla")(x1, x2)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_float_matmul_on_xla_gemm_matches_xla_and_the_oracle(monkeypatch, dtype):
    rng = np.random.default_rng(5)
    x1 = jnp.asarray(rng.standard_normal((2, 12, 80)), dtype)
    x2 = jnp.asarray(rng.standard_normal((80, 40)) / 9, dtype)
    bias = jnp.asarray(rng.standard_normal(40), dtype)
    x3 = jnp.asarray(rng.standard_normal((2, 12, 40)), dtype)
    monkeypatch.setenv("JAX_MC2_GEMM", "xla")

    def op(impl):
        return jax.jit(
            lambda a, b: mc2.mm_all_reduce_base(a, b, None, bias=bias, x3=x3, implementation=impl)
        )

    got = np.asarray(op("ffi")(x1, x2).astype(jnp.float32))
    np.testing.assert_array_equal(got, np.asarray(op("xla")(x1, x2).astype(jnp.float32)))
    want = oracle.mm_all_reduce_base([x1], [x2], [bias], [x3])
    tol = oracle.tolerance(dtype, scale=np.abs(want).max() + 1, k=80 + 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_openblas_threads_sleep_soon_unless_the_user_says_otherwise():
    code = "import jax_mc2, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == _ffi.OPENBLAS_THREAD_TIMEOUT, out.stderr[-2000:]
    env["OPENBLAS_THREAD_TIMEOUT"] = "12"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "12", out.stderr[-2000:]


@pytest.mark.skipif(os.cpu_count() < 2, reason="one core: OpenBLAS runs every GEMM on one thread")
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_openblas_jobs_run_in_the_callers_floating_point_mode(dtype):
    """XLA's threads flush subnormals (docs/semantics.md §10.4); OpenBLAS's own
    worker threads did not, so the bits of a multithreaded sgemm depended on
    which thread computed a block: a subnormal x1 times an infinite x2 gave
    NaN in half the rows and inf in the other half, and products below the
    normal range survived in half of them. Every block now follows the
    caller's mode: all NaN, all zero, as XLA's own dot."""
    m = k = n = 256
    tiny = np.float32(1e-39) if dtype == np.float32 else np.float32(2.0**-130)
    x1 = np.zeros((m, k), np.float32)
    x1[:, 0] = tiny
    x2 = np.zeros((k, n), np.float32)
    x2[0, :] = np.inf
    out = jax.ShapeDtypeStruct((m, n), dtype)

    def matmul(a, b):
        # parallelism 1: OpenBLAS takes every core, so the GEMM is split.
        a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        return np.asarray(jax.ffi.ffi_call(_ffi.MATMUL, out)(a, b, **matmul_attrs()))

    assert np.isnan(matmul(x1, x2).astype(np.float32)).all()
    x1[:, 0], x2[0, :] = 1e-20, 1e-20  # products of 1e-40: below float32's normal range
    assert (matmul(x1, x2).astype(np.float32) == 0).all()
    assert (np.asarray(jnp.asarray(x1, dtype) @ jnp.asarray(x2, dtype)) == 0).all()


@pytest.mark.skipif(os.cpu_count() < 2, reason="one core: no call hands jobs to the workers")
def test_concurrent_calls_share_the_workers():
    """Calls from several threads at once, each splitting its GEMM and its
    row passes over the shared workers (parallelism 1), and calls that ask
    for another thread count (parallelism 2 waits for the others' scope to
    close): every result is the one a lone call with its thread count
    gives."""
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.standard_normal((384, 256)), jnp.bfloat16)
    x2 = jnp.asarray(rng.standard_normal((256, 320)), jnp.bfloat16)
    out = jax.ShapeDtypeStruct((384, 320), jnp.bfloat16)

    def matmul(parallelism):
        attrs = matmul_attrs(parallelism=np.int64(parallelism))
        return np.asarray(jax.ffi.ffi_call(_ffi.MATMUL, out)(x1, x2, **attrs))

    parallelisms = [1, 1, 2, 1, 1, 2] * 4
    want = {p: matmul(p) for p in set(parallelisms)}
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(matmul, parallelisms))
    for p, got in zip(parallelisms, results):
        np.testing.assert_array_equal(got, want[p])


def _dot_operand_types(text):
    return re.findall(r"stablehlo.dot_general.*?: \((tensor<[^)]*)\)", text)


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_xla_gemm_is_widened_without_a_native_gemm(monkeypatch, native):
    """XLA:CPU without AVX512-BF16 / AMX-BF16 gets bfloat16 operands widened
    to float32 (a faster GEMM, the same exact products); with them, and for
    float16, the mixed-precision dot stays."""
    flags = ("avx2", "avx512_bf16") if native else ("avx2",)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    x = jnp.ones((8, 16), jnp.bfloat16)

    def lowered(dtype):
        fn = jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None, implementation="xla"))
        return fn.lower(x.astype(dtype), x.T.astype(dtype)).as_text()

    (operands,) = _dot_operand_types(lowered(jnp.bfloat16))
    assert ("bf16" in operands) == native, operands
    (operands,) = _dot_operand_types(lowered(jnp.float16))
    assert "f16" in operands, operands


def test_widened_bfloat16_matches_the_oracle():
    rng = np.random.default_rng(8)
    x1 = jnp.asarray(rng.standard_normal((24, 96)), jnp.bfloat16)
    x2 = jnp.asarray(rng.standard_normal((96, 40)) / 9, jnp.bfloat16)
    got = mc2.mm_all_reduce_base(x1, x2, None, implementation="xla")
    want = oracle.mm_all_reduce_base([x1], [x2], [None], [None])
    tol = oracle.tolerance(jnp.bfloat16, scale=np.abs(want).max() + 1, k=96)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=0, atol=tol)
