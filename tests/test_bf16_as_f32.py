"""A bfloat16 result handed to the all-reduce as float32 (the custom calls'
``bf16_as_f32``, docs/semantics.md §10.5): the float32 words are the
bfloat16 words widened, bit for bit (NaNs, infinities and signed zeros
included), on both GEMM engines; the all-reduce of them gives ``lax.psum``'s
bfloat16 bits; and the sharded bfloat16 operators ask for it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2
from jax_mc2 import _mc2_ffi, quant
from jax_mc2.implementations import ffi as _ffi
from jax_mc2.primitives import lowp_quant_mm_all_reduce as lowp

BF16 = jnp.bfloat16
F32 = np.float32
M, K, N = 6, 40, 12


def _widened(bf16):
    return np.asarray(bf16).view(np.uint16).astype(np.uint32) << 16


def _same_bits(call):
    """call(bf16_as_f32) under jit, both ways: the float32 result holds the
    bfloat16 result's values."""
    narrow = jax.jit(lambda: call(False))()
    wide = jax.jit(lambda: call(True))()
    assert narrow.dtype == BF16 and wide.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(wide).view(np.uint32), _widened(narrow))
    return np.asarray(wide)


def _with_specials(values):
    """values (float32) with an infinity, a value that overflows bfloat16, a
    NaN with a payload and a negative zero in the first row."""
    out = np.asarray(values, F32).copy()
    out[0, :4] = [np.inf, 3.3e38, np.nan, -0.0]
    out.view(np.uint32)[0, 2] = 0x7FC0_1234
    return out


@pytest.fixture(params=["blas", "xla"])
def engine(request, monkeypatch):
    monkeypatch.setenv("JAX_MC2_GEMM", request.param)
    return request.param


def test_matmul(engine):
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(_with_specials(rng.standard_normal((M, K))), BF16)
    x2 = jnp.asarray(rng.standard_normal((K, N)), BF16)
    bias = jnp.asarray(rng.standard_normal(N), BF16)
    x3 = jnp.asarray(_with_specials(rng.standard_normal((M, N))), BF16)

    def call(wide):
        return _ffi.matmul(x1, x2, bias, x3, transpose_x2=False, parallelism=1, bf16_as_f32=wide)

    got = _same_bits(call)
    assert np.isnan(got[0]).any() and np.isfinite(got[1:]).all()


def test_int8_matmul(engine):
    rng = np.random.default_rng(1)
    x1 = jnp.asarray(rng.integers(-128, 128, (M, K)), jnp.int8)
    x2 = jnp.asarray(rng.integers(-128, 128, (K, N)), jnp.int8)
    scale = rng.uniform(1e-4, 1e-3, N).astype(F32)
    scale[0] = 1e36  # overflows bfloat16
    pertoken = jnp.asarray(rng.uniform(0.5, 2.0, M), F32)
    bias = jnp.asarray(rng.integers(-1000, 1000, N), jnp.int32)
    x3 = jnp.asarray(_with_specials(rng.standard_normal((M, N))), BF16)

    def call(wide):
        return _ffi.int8_matmul(
            x1,
            x2,
            jnp.asarray(scale),
            pertoken,
            bias,
            x3,
            out_dtype=BF16,
            transpose_x2=False,
            parallelism=1,
            bf16_as_f32=wide,
        )

    got = _same_bits(call)
    assert np.isinf(got[1:, 0]).all() and np.isnan(got[0, 2])


def test_lowp_matmul():
    rng = np.random.default_rng(2)
    e4m3 = ml_dtypes.float8_e4m3fn
    x1 = jnp.asarray(rng.standard_normal((M, K)).astype(e4m3))
    x2 = jnp.asarray(rng.standard_normal((K, N)).astype(e4m3))
    x2_scale = jnp.asarray(rng.uniform(0.5, 2.0, N), F32)
    x1_scale = jnp.asarray(rng.uniform(0.5, 2.0, M), F32)
    bias = jnp.asarray(rng.standard_normal(N), F32)
    x3 = jnp.asarray(_with_specials(rng.standard_normal((M, N))), BF16)

    operands = (x1, x2, x2_scale, x1_scale, bias, x3)
    mode = _mc2_ffi.lowp_modes()[lowp.PERTOKEN]
    options = dict(transpose_x2=False, out_dtype=BF16, comm=False, block_k=128, parallelism=1)

    def call(wide):
        return _ffi.lowp_matmul(*operands, mode=mode, bf16_as_f32=wide, **options)

    got = _same_bits(call)
    assert np.isnan(got[0, 2]) and np.isinf(got[0, 0])


def _handler(target, out_dtype, *operands, **attrs):
    out = jax.ShapeDtypeStruct((2, 3), out_dtype)
    return jax.block_until_ready(jax.ffi.ffi_call(target, out)(*operands, **attrs))


def test_only_a_bfloat16_result_may_be_widened():
    matmul = dict(transpose_x2=False, has_bias=False, has_x3=False, antiquant=False)
    matmul |= dict(has_offset=False, antiquant_group_size=np.int64(0), parallelism=np.int64(1))
    x1, x2 = np.ones((2, 4), np.float16), np.ones((4, 3), np.float16)
    with pytest.raises(Exception, match="mc2_matmul_ffi: bf16_as_f32 needs a bfloat16 result"):
        _handler(_ffi.MATMUL, F32, x1, x2, bf16_as_f32=True, **matmul)
    with pytest.raises(Exception, match="mc2_matmul_ffi: bf16_as_f32 needs a float32 out"):
        _handler(_ffi.MATMUL, BF16, x1.astype(BF16), x2.astype(BF16), bf16_as_f32=True, **matmul)

    int8 = dict(transpose_x2=False, has_pertoken=False, has_bias=False, has_x3=False)
    int8 |= dict(bf16_as_f32=True, parallelism=np.int64(1))
    i1, i2, scale = np.ones((2, 4), np.int8), np.ones((4, 3), np.int8), np.ones(1, F32)
    with pytest.raises(Exception, match="bf16_as_f32 needs a float32 out and no comm scale"):
        _handler(_ffi.INT8_MATMUL, BF16, i1, i2, scale, has_comm_scale=False, **int8)
    with pytest.raises(Exception, match="bf16_as_f32 needs a bfloat16 result"):
        comm_scale = np.ones(3, BF16)
        _handler(_ffi.INT8_MATMUL, np.int8, i1, i2, scale, comm_scale, has_comm_scale=True, **int8)

    e4m3 = ml_dtypes.float8_e4m3fn
    lowp_attrs = dict(mode=np.int64(_mc2_ffi.lowp_modes()[lowp.PERTOKEN]), transpose_x2=False)
    lowp_attrs |= dict(has_x1_scale=False, has_bias=False, has_x3=False, block_k=np.int64(128))
    lowp_attrs |= dict(bf16_as_f32=True, parallelism=np.int64(1))
    f1, f2 = np.ones((2, 4), e4m3), np.ones((4, 3), e4m3)
    with pytest.raises(Exception, match="mc2_lowp_matmul_ffi: bf16_as_f32 needs a float32 out"):
        _handler(_ffi.LOWP_MATMUL, BF16, f1, f2, np.ones(1, F32), comm=False, **lowp_attrs)
    with pytest.raises(Exception, match="bf16_as_f32 needs a bfloat16 result"):
        out = jax.ShapeDtypeStruct((2, 3 + 4), e4m3)
        jax.block_until_ready(
            jax.ffi.ffi_call(_ffi.LOWP_MATMUL, out)(
                f1, f2, np.ones(1, F32), comm=True, **lowp_attrs
            )
        )


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("world", [2, 8])
def test_all_reduce_of_the_widened_values_is_psums(world, split, monkeypatch):
    """float32 holding bfloat16 values reduces to lax.psum's bfloat16 bits,
    through psum and through the reduce-scatter + all-gather."""
    if split:
        monkeypatch.setattr(_ffi, "SPLIT_ALL_REDUCE_MIN_ELEMENTS", 0)
    mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
    rng = np.random.default_rng(world)
    x = rng.standard_normal((world * 16, 24)) * np.exp2(rng.integers(-8, 8, (world * 16, 24)))
    x = _with_specials(x)
    x[1, :2] = [3.3e38, 3.3e38]  # a sum that overflows
    x = jnp.asarray(x, BF16)

    def run(fn):
        return jax.jit(
            jax.shard_map(fn, mesh=mesh, in_specs=P("tp"), out_specs=P(), check_vma=False)
        )

    wide = run(lambda a: _ffi.all_reduce(a.astype(jnp.float32), "tp", BF16))
    assert ("reduce_scatter" in wide.lower(x).as_text()) == split
    got = np.asarray(wide(x)).view(np.uint16)
    want = np.asarray(run(lambda a: lax.psum(a, "tp"))(x)).view(np.uint16)
    np.testing.assert_array_equal(got, want)


def test_all_reduce_refuses_other_widenings():
    with pytest.raises(TypeError, match="a float16 result held as float32"):
        _ffi.all_reduce(jnp.zeros(4, jnp.float32), "tp", jnp.float16)
    assert _ffi.all_reduce(jnp.zeros(4, jnp.float32), (), BF16).dtype == BF16


@pytest.mark.parametrize(
    "dtype, world, wide", [(BF16, 2, True), (jnp.float16, 2, False), (BF16, 1, False)]
)
def test_sharded_bfloat16_operators_widen(dtype, world, wide, monkeypatch):
    """The lowered ffi programs: bfloat16 over two ranks asks for float32;
    float16, and a group of one, do not."""
    monkeypatch.setenv("JAX_MC2_GEMM", "blas")
    mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
    x1, x2 = jnp.zeros((8, 16), dtype), jnp.zeros((16, 8), dtype)
    i1, i2 = jnp.zeros((8, 16), jnp.int8), jnp.zeros((16, 8), jnp.int8)
    # The dequant scale sets the int8 output dtype: bfloat16, or packed words for float16.
    scale = jnp.ones(8, BF16) if dtype == BF16 else quant.trans_quant_param(np.ones(8, F32))

    def lowered(fn, *args):
        sharded = jax.shard_map(
            fn, mesh=mesh, in_specs=(P(None, "tp"), P("tp", None)), out_specs=P(), check_vma=False
        )
        return jax.jit(sharded).lower(*args).as_text()

    texts = [
        lowered(lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", implementation="ffi"), x1, x2),
        lowered(
            lambda a, b: mc2.quant_matmul_all_reduce(
                a, b, "tp", dequant_scale=scale, implementation="ffi"
            ),
            i1,
            i2,
        ),
    ]
    for text in texts:
        assert f"bf16_as_f32 = {str(wide).lower()}" in text
