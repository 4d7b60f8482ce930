"""The handlers' passes around a GEMM (conversions to fp32, epilogues, add +
RMSNorm) are split by rows over jax_mc2's worker threads when a program has
the cores to itself (``parallelism`` 1 on a machine of two or more cores),
and run on the calling thread alone when the cores are shared. The bits never
depend on the split: the same call at both parallelisms gives the same
output, with subnormal operands where they reach the output (the workers run
in the calling thread's floating-point mode, docs/semantics.md §10.4).

The GEMM operands are small integers, so every sgemm sum is exact whatever
OpenBLAS's own thread count: a difference can only come from the passes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_mc2 import _mc2_ffi
from jax_mc2.implementations import ffi as _ffi

pytestmark = pytest.mark.skipif(
    (os.cpu_count() or 1) < 2, reason="a row split needs two cores or more"
)

SPLIT, SERIAL = np.int64(1), np.int64(1 << 20)
# Every pass of these shapes has more than twice RowParallel's minimum share
# (2^15 elements), so with two cores each pass is split in two.
M, K, N = 300, 256, 264
F32_TINY = np.finfo(np.float32).tiny


def _both(target, out, *operands, aliases=None, **attrs):
    """The handler's outputs split and serial (checked equal), as NumPy."""

    def call(parallelism):
        fn = jax.ffi.ffi_call(target, out, input_output_aliases=aliases)
        return jax.jit(lambda *ops: fn(*ops, **attrs, parallelism=parallelism))(*operands)

    split, serial = (jax.tree.map(np.asarray, call(p)) for p in (SPLIT, SERIAL))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), split, serial)
    return split


def _matmul_attrs(**flags):
    attrs = dict(transpose_x2=False, has_bias=False, has_x3=False, antiquant=False)
    attrs |= dict(has_offset=False, antiquant_group_size=np.int64(0), bf16_as_f32=False)
    return attrs | flags


def _ints(rng, shape, dtype, bound=8):
    return rng.integers(-bound, bound + 1, shape).astype(dtype)


def _with_subnormals(rng, values, dtype):
    """values with every fifth element replaced by a subnormal of float32."""
    out = np.asarray(values, np.float32).copy()
    flat = out.reshape(-1)
    flat[::5] = F32_TINY * rng.uniform(0.01, 0.99, flat[::5].shape)
    return out.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float32])
def test_matmul_with_bias_and_x3(dtype):
    rng = np.random.default_rng(0)
    x1 = _ints(rng, (M, K), dtype)
    x1[::3] = 0  # zero products: out = bias + x3 there
    x2 = _ints(rng, (K, N), dtype)
    bias = _ints(rng, (N,), dtype)
    bias[::4] = 0  # and out = x3 (subnormal or flushed) where both are zero
    x3 = _with_subnormals(rng, rng.standard_normal((M, N)), dtype)

    out = jax.ShapeDtypeStruct((M, N), dtype)
    attrs = _matmul_attrs(has_bias=True, has_x3=True)
    got = _both(_ffi.MATMUL, out, x1, x2, bias, x3, **attrs)
    exact = x1.astype(np.float64) @ x2.astype(np.float64)
    rows = np.arange(M) % 3 != 0  # away from the x3-only rows, mostly integers
    np.testing.assert_allclose(
        got[rows].astype(np.float64),
        (exact + bias.astype(np.float64) + x3.astype(np.float64))[rows],
        rtol=2.0**-7,
        atol=1.0,
    )


@pytest.mark.parametrize("transpose_x2", [False, True])
def test_matmul_antiquant_per_group(transpose_x2):
    rng = np.random.default_rng(1)
    x1 = _ints(rng, (M, K), np.float16, bound=4)
    x2 = rng.integers(-8, 8, (N, K) if transpose_x2 else (K, N)).astype(np.int8)
    groups = K // 64
    scale = (2.0 ** rng.integers(-2, 2, (groups, N))).astype(np.float16)
    offset = rng.integers(-2, 3, (groups, N)).astype(np.float16)

    attrs = _matmul_attrs(
        transpose_x2=transpose_x2,
        antiquant=True,
        has_offset=True,
        antiquant_group_size=np.int64(64),
    )
    out = jax.ShapeDtypeStruct((M, N), np.float16)
    _both(_ffi.MATMUL, out, x1, x2, scale, offset, **attrs)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float32])
@pytest.mark.parametrize("inplace", [False, True])
def test_add_rms_norm(dtype, inplace):
    rng = np.random.default_rng(2)
    mm = rng.standard_normal((M, N)).astype(dtype)
    mm[::3] = 0  # y = residual there, subnormals (or their flushed zeros) included
    residual = _with_subnormals(rng, rng.standard_normal((1, M, N)), dtype)
    gamma = rng.standard_normal(N).astype(dtype)

    out = jax.ShapeDtypeStruct(residual.shape, dtype)
    aliases = {1: 0} if inplace else None
    epsilon = np.float32(1e-6)
    _both(_ffi.ADD_RMS_NORM, (out, out), mm, residual, gamma, aliases=aliases, epsilon=epsilon)


def _lowp(mode, *operands, **flags):
    """mc2_lowp_matmul_ffi split and serial, bfloat16 out."""
    attrs = dict(mode=np.int64(_mc2_ffi.lowp_modes()[mode]), comm=False, block_k=np.int64(128))
    attrs["bf16_as_f32"] = False
    out = jax.ShapeDtypeStruct((M, N), jnp.bfloat16)
    return _both(_ffi.LOWP_MATMUL, out, *operands, **attrs, **flags)


@pytest.mark.parametrize("transpose_x2", [False, True])
def test_lowp_scaled_with_pertoken_bias_and_x3(transpose_x2):
    rng = np.random.default_rng(3)
    f8 = ml_dtypes.float8_e4m3fn
    x1 = _ints(rng, (M, K), f8)
    x2 = _ints(rng, (N, K) if transpose_x2 else (K, N), f8)
    x2_scale = rng.uniform(0.5, 2.0, N).astype(np.float32)
    x1_scale = rng.uniform(0.5, 2.0, M).astype(np.float32)
    bias = _ints(rng, (N,), np.float32)
    x3 = rng.standard_normal((M, N)).astype(jnp.bfloat16)
    flags = dict(transpose_x2=transpose_x2, has_x1_scale=True, has_bias=True, has_x3=True)
    _lowp("pertoken", x1, x2, x2_scale, x1_scale, bias, x3, **flags)


def test_lowp_mx():
    rng = np.random.default_rng(4)
    f8 = ml_dtypes.float8_e4m3fn
    blocks = K // 32
    x1 = _ints(rng, (M, K), f8)
    x2 = _ints(rng, (N, K), f8)
    # Scales 2^-2 .. 2^2: the products stay exact.
    x1_scale = rng.integers(125, 130, (M, blocks)).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)
    x2_scale = rng.integers(125, 130, (N, blocks)).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)
    flags = dict(transpose_x2=True, has_x1_scale=True, has_bias=False, has_x3=False)
    _lowp("mx", x1, x2, x2_scale, x1_scale, **flags)


@pytest.mark.parametrize("k", [K, 1500])  # one k-chunk; two (the int32 sums of the chunks)
@pytest.mark.parametrize("transpose_x2", [False, True])
def test_int8_matmul_with_pertoken_bias_and_x3(k, transpose_x2):
    rng = np.random.default_rng(5)
    x1 = rng.integers(-128, 128, (M, k)).astype(np.int8)
    x2 = rng.integers(-128, 128, (N, k) if transpose_x2 else (k, N)).astype(np.int8)
    scale = rng.uniform(1e-5, 1e-4, N).astype(np.float32)
    pertoken = rng.uniform(0.5, 2.0, M).astype(np.float32)
    bias = rng.integers(-1000, 1000, N).astype(np.int32)
    x3 = rng.standard_normal((M, N)).astype(np.float16)

    flags = dict(has_pertoken=True, has_bias=True, has_x3=True, has_comm_scale=False)
    flags["bf16_as_f32"] = False
    out = jax.ShapeDtypeStruct((M, N), np.float16)
    operands = (x1, x2, scale, pertoken, bias, x3)
    _both(_ffi.INT8_MATMUL, out, *operands, transpose_x2=transpose_x2, **flags)
