"""Regression tests for silent wrong results: each input here once produced a
wrong value (or an internal error on one implementation only) without any
error; xla and ffi must agree with the documented semantics."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import ALL_IMPLEMENTATIONS, IMPLEMENTATIONS, make_mesh
from jax.sharding import PartitionSpec as P

import jax_mc2

# --- grouped_matmul: group sizes whose int32 sum overflows (semantics §6) ---


def _np_grouped(x, w, sizes):
    """Reference: sizes clipped to [0, m] in exact integers, cumulated and
    capped at m."""
    m = x.shape[0]
    y = np.zeros((m, w.shape[2]))
    start = 0
    for g, s in enumerate(int(v) for v in sizes):
        stop = min(start + min(max(s, 0), m), m)
        y[start:stop] = x[start:stop].astype(np.float64) @ w[g].astype(np.float64)
        start = stop
    return y


def _gmm_case(groups):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    w = rng.standard_normal((groups, 4, 3)).astype(np.float32)
    return x, w


OVERFLOW_SIZES = [
    np.int64([2**31, 1]),
    np.uint32([3, 2**32 - 1]),
    np.int32([3, 2**31 - 1]),
    np.int32([2**31 - 1, 2**31 - 1]),
    np.uint64([2**64 - 1, 5]),
    [3, 2**31 - 1],
    [2**40, 1],  # a Python list past int32: read by NumPy, then clipped
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("sizes", OVERFLOW_SIZES, ids=lambda s: f"{np.asarray(s).dtype}{list(s)}")
def test_grouped_matmul_sizes_overflowing_int32(impl, sizes):
    x, w = _gmm_case(2)
    y = jax_mc2.grouped_matmul(x, w, sizes, implementation=impl)
    np.testing.assert_allclose(np.asarray(y), _np_grouped(x, w, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint32])
def test_grouped_matmul_traced_sizes_overflowing_int32(impl, dtype):
    x, w = _gmm_case(2)
    sizes = np.array([3, np.iinfo(dtype).max], np.int64)
    f = jax.jit(lambda s: jax_mc2.grouped_matmul(x, w, s, implementation=impl))
    y = f(jnp.asarray(sizes.astype(dtype)))
    np.testing.assert_allclose(np.asarray(y), _np_grouped(x, w, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("traced", [False, True])
def test_grouped_matmul_int64_sizes_under_x64(impl, traced):
    prior = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        x, w = _gmm_case(3)
        sizes = np.int64([4, 2**32 + 4, 4])
        if traced:
            y = jax.jit(lambda s: jax_mc2.grouped_matmul(x, w, s, implementation=impl))(
                jnp.asarray(sizes)
            )
        else:
            y = jax_mc2.grouped_matmul(x, w, sizes, implementation=impl)
        np.testing.assert_allclose(np.asarray(y), _np_grouped(x, w, sizes), rtol=1e-5, atol=1e-5)
    finally:
        jax.config.update("jax_enable_x64", prior)


# --- add + RMSNorm: an epsilon that vanishes in float32 (semantics §7) ---

_RMS_OPS = (
    jax_mc2.matmul_all_reduce_add_rms_norm,
    jax_mc2.inplace_matmul_all_reduce_add_rms_norm,
)


def _rms_call(op, residual, epsilon, impl):
    m = residual.shape[0] * residual.shape[1]
    n = residual.shape[2]
    return op(
        np.zeros((m, 2), np.float32),
        np.zeros((2, n), np.float32),
        residual,
        np.ones(n, np.float32),
        None,
        epsilon=epsilon,
        implementation=impl,
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("op", _RMS_OPS)
@pytest.mark.parametrize("epsilon", [1e-50, 1e-40, 1e-45])
def test_rms_norm_epsilon_vanishing_in_float32_is_rejected(impl, op, epsilon):
    residual = np.zeros((1, 2, 8), np.float32)
    with pytest.raises(ValueError, match=repr(epsilon)):
        _rms_call(op, residual, epsilon, impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("op", _RMS_OPS)
def test_rms_norm_smallest_normal_epsilon_keeps_zero_rows_finite(impl, op):
    residual = np.zeros((1, 2, 8), np.float32)
    y, norm = _rms_call(op, residual, float(np.finfo(np.float32).tiny), impl)
    assert np.all(np.asarray(norm) == 0.0) and np.all(np.asarray(y) == 0.0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("op", _RMS_OPS)
def test_rms_norm_epsilon_dominates(impl, op):
    # |y|^2 = 1e-12 << epsilon = 1e-2: norm_out = y / sqrt(1e-12 + 1e-2) ~ y / 0.1.
    residual = np.full((1, 2, 8), 1e-6, np.float32)
    residual[0, 1] = -3e-6
    _, norm = _rms_call(op, residual, 1e-2, impl)
    yf = residual.astype(np.float64)
    want = yf / np.sqrt(np.mean(yf * yf, axis=-1, keepdims=True) + np.float32(1e-2))
    np.testing.assert_allclose(np.asarray(norm), want, rtol=1e-6)


# --- int8 matmul: int32 accumulator + int32 bias wraps (semantics §10.2) ---


def _int8_on_one_rank(x1, x2, bias, scale, impl):
    """quant_matmul_all_reduce on a one-device "tp" mesh (the ascend
    implementation runs inside shard_map only)."""
    f = jax.shard_map(
        lambda a, b, c, d: jax_mc2.quant_matmul_all_reduce(
            a, b, "tp", dequant_scale=d, bias=c, implementation=impl
        ),
        mesh=make_mesh((1,), ("tp",)),
        in_specs=(P(),) * 4,
        out_specs=P(),
    )
    return np.asarray(jax.jit(f)(x1, x2, bias, scale), np.float32)


def _wrapping_operands(m, k, n, bias_value):
    """int8 x1 [m, k] and x2 [k, n] at the int8 extremes that push x1 @ x2
    toward ``bias_value``'s sign, and the int32 bias [n] of that value."""
    x1 = np.full((m, k), 127 if bias_value > 0 else -128, np.int8)
    return x1, np.full((k, n), 127, np.int8), np.full(n, bias_value, np.int32)


def _acc_and_wrapped(x1, x2, bias):
    """``x1 @ x2 + bias`` exactly (int64) and in two's-complement int32."""
    acc = x1.astype(np.int64) @ x2.astype(np.int64) + bias.astype(np.int64)
    return acc, ((acc + 2**31) % 2**32 - 2**31).astype(np.int32)


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
@pytest.mark.parametrize("bias_value", [2**31 - 1, -(2**31)])
def test_int8_accumulator_plus_bias_wraps_in_int32(impl, bias_value):
    n = 4
    x1, x2, bias = _wrapping_operands(2, 64, n, bias_value)
    x2[:, 1] = -128
    scale = np.ones(n, jnp.bfloat16)
    acc, wrapped = _acc_and_wrapped(x1, x2, bias)
    assert (wrapped != acc).any()
    want = wrapped.astype(np.float32).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(_int8_on_one_rank(x1, x2, bias, scale, impl), want)


@pytest.mark.parametrize("engine", ["blas", "xla"])
@pytest.mark.parametrize("bias_value", [2**31 - 1, -(2**31)])
def test_int8_wrap_on_either_gemm_of_the_ffi_implementation(monkeypatch, engine, bias_value):
    """The wrap of acc + bias in the C++ epilogue after sgemm and in the lax
    epilogue after XLA's int8 dot, with x3 and a pertoken scale."""
    monkeypatch.setenv("JAX_MC2_GEMM", engine)
    m, n = 3, 4
    x1, x2, bias = _wrapping_operands(m, 64, n, bias_value)
    scale = np.full(n, 1.3e-5, np.float32)  # finite float16 results near 2^31 * scale
    pertoken = np.array([1.0, 1.5, 0.25], np.float32)
    x3 = np.full((m, n), 3.0, np.float16)
    out = jax.jit(
        lambda a, b: jax_mc2.mm_all_reduce_base(
            a,
            b,
            None,
            bias=bias,
            x3=x3,
            dequant_scale=scale,
            pertoken_scale=pertoken,
            implementation="ffi",
        )
    )(x1, x2)
    acc, wrapped = _acc_and_wrapped(x1, x2, bias)
    assert (wrapped != acc).all()
    y = (wrapped.astype(np.float32) * scale * pertoken[:, None]).astype(np.float16)
    want = (y.astype(np.float32) + x3.astype(np.float32)).astype(np.float16)
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(np.asarray(out), want)


# --- quant: non-finite values in a perblock tile / MX block (semantics §3.2, §4.3) ---

_PERBLOCK_DTYPES = [jnp.float8_e4m3fn, jnp.float8_e5m2, "hifloat8"]


def _perblock_x():
    x = np.linspace(-300, 300, 16 * 16).astype(np.float32).reshape(16, 16)
    x[1, 1] = 1000.0  # the tile's finite amax
    return x


@pytest.mark.parametrize("dtype", _PERBLOCK_DTYPES, ids=str)
def test_perblock_quantize_tiny_tile_stays_finite(dtype):
    """A tile whose amax / fmax is below float32's smallest normal number (a
    scale XLA:CPU would flush to 0) gets the scale 2^-126: zeros stay zero,
    the values keep finite codes that dequantize back to them."""
    x = np.zeros((4, 4), np.float32)
    x[0, 0], x[1, 1] = 1e-37, -5e-38
    v, s = jax_mc2.quant.perblock_quantize(x, block=4, dtype=dtype)
    s = np.asarray(s)
    assert s.shape == (1, 1) and s[0, 0] == np.finfo(np.float32).tiny
    v = np.asarray(v)
    decoded = (np.asarray(jax_mc2.quant.hifloat8_decode(v)) if dtype == "hifloat8" else v).astype(
        np.float64
    ) * np.float64(s[0, 0])
    assert np.all(np.isfinite(decoded))
    mask = x != 0
    np.testing.assert_array_equal(decoded[~mask], 0.0)
    np.testing.assert_allclose(decoded[mask], x[mask], rtol=0.13)


@pytest.mark.parametrize("dtype", _PERBLOCK_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_perblock_quantize_non_finite_keeps_finite_neighbours(dtype, bad):
    x = _perblock_x()
    clean_v, clean_s = jax_mc2.quant.perblock_quantize(x, block=8, dtype=dtype)
    y = x.copy()
    y[0, 0] = bad
    v, s = jax_mc2.quant.perblock_quantize(y, block=8, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(clean_s))  # finite amax
    assert np.all(np.isfinite(np.asarray(s)))
    v, clean_v = np.asarray(v), np.asarray(clean_v)
    mask = np.ones(x.shape, bool)
    mask[0, 0] = False
    np.testing.assert_array_equal(v[mask], clean_v[mask])
    if dtype == "hifloat8":
        got = np.asarray(jax_mc2.quant.hifloat8_decode(v))
        fmax = 32768.0
    else:
        got = v.astype(np.float32)
        fmax = float(ml_dtypes.finfo(np.dtype(dtype)).max)
    if np.isnan(bad):
        assert np.isnan(got[0, 0])
    else:
        assert got[0, 0] == np.sign(bad) * fmax  # +-Inf saturates
    # Dequantized: the finite values are intact (1000 is not saturated to 448).
    deq = got * np.repeat(np.repeat(np.asarray(s), 8, 0), 8, 1)
    assert np.all(np.isfinite(deq[mask]))
    np.testing.assert_allclose(deq[1, 1], 1000.0, rtol=0.07)


_MX_DTYPES = [jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float4_e2m1fn]


@pytest.mark.parametrize("dtype", _MX_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_mx_quantize_non_finite_block_has_nan_scale(dtype, bad):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    clean_v, clean_s = jax_mc2.quant.mx_quantize(x, dtype=dtype)
    y = x.copy()
    y[0, 35] = bad  # block 1 of row 0
    v, s = jax_mc2.quant.mx_quantize(y, dtype=dtype)
    codes = np.array(s).view(np.uint8).reshape(2, -1)
    clean_codes = np.asarray(clean_s).view(np.uint8).reshape(2, -1)
    assert codes[0, 1] == 0xFF  # the OCP MX NaN scale
    codes[0, 1] = clean_codes[0, 1]
    np.testing.assert_array_equal(codes, clean_codes)  # other blocks untouched
    # The other 31 values of the block are not flushed to 0: their codes are
    # those of the block without the non-finite value.
    v32, clean32 = np.asarray(v).astype(np.float32), np.asarray(clean_v).astype(np.float32)
    mask = np.ones(x.shape, bool)
    mask[0, 35] = False
    np.testing.assert_array_equal(v32[mask], clean32[mask])
    assert np.count_nonzero(v32[0, 32:64]) >= 16
    # Dequantized, the whole block is NaN (e8m0 0xFF decodes to NaN).
    scale = np.asarray(s).astype(np.float32).reshape(2, -1)
    deq = v32 * np.repeat(scale, 32, axis=1)[:, :96]
    assert np.all(np.isnan(deq[0, 32:64]))
    assert np.all(np.isfinite(deq[0, :32])) and np.all(np.isfinite(deq[0, 64:]))


# --- alltoallv_grouped_matmul: traced counts (semantics §6.6) ---


def _ep(world, fn, args, n_out):
    from conftest import make_mesh
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh((world,), ("ep",))
    specs = tuple(P("ep") for _ in args)
    return jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=tuple(P("ep") for _ in range(n_out)))
    )(*args)


def _dispatch_traced(impl, table, xs, ws, recv=None, **kwargs):
    def f(x, w, s, *rc):
        y, _, p = jax_mc2.alltoallv_grouped_matmul(
            x[0],
            w[0],
            "ep",
            send_counts=s[0],
            recv_counts=rc[0][0] if rc else None,
            permute_out_flag=True,
            implementation=impl,
            **kwargs,
        )
        return y[None], p[None]

    args = [xs, ws, jnp.asarray(table)] + ([jnp.asarray(recv)] if recv is not None else [])
    y, p = _ep(len(xs), f, args, 2)
    return np.asarray(y), np.asarray(p)


def _a2a_case(rows=4, world=2, experts=2, h=4):
    rng = np.random.default_rng(7)
    xs = rng.integers(-4, 5, size=(world, rows, h)).astype(np.float32)
    ws = np.broadcast_to(np.eye(h, dtype=np.float32), (world, experts, h, h)).copy()
    return xs, ws


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_alltoallv_traced_counts_overflowing_int32_clip_like_large_counts(impl):
    xs, ws = _a2a_case()
    big = np.array([[2**31 - 1, 2**31 - 1, 0, 0], [1, 1, 1, 1]], np.int32)
    hundred = np.array([[100, 100, 0, 0], [1, 1, 1, 1]], np.int32)
    y_big, p_big = _dispatch_traced(impl, big, xs, ws)
    y_100, p_100 = _dispatch_traced(impl, hundred, xs, ws)
    np.testing.assert_array_equal(y_big, y_100)
    np.testing.assert_array_equal(p_big, p_100)
    # Rank 0 receives its own 4 rows (expert 0) and one row of rank 1 per expert.
    np.testing.assert_array_equal(p_big[0, :4], xs[0])
    np.testing.assert_array_equal(p_big[0, 4], xs[1, 0])
    other = {}
    for name in IMPLEMENTATIONS:
        other[name] = _dispatch_traced(name, big, xs, ws)
    np.testing.assert_array_equal(other["xla"][0], other["ffi"][0])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_alltoallv_traced_send_counts_past_the_rows_are_clipped(impl):
    """A rank sends only the rows it has: rank 0's counts [2, 100 | 0, 5]
    on 4 rows send 2 rows to expert 0 and 2 to expert 1 of rank 0, and
    nothing to rank 1 (no zero rows inside the received region)."""
    xs, ws = _a2a_case()
    table = np.array([[2, 100, 0, 5], [1, 1, 1, 1]], np.int32)
    clipped = np.array([[2, 2, 0, 0], [1, 1, 1, 1]], np.int32)
    y, p = _dispatch_traced(impl, table, xs, ws)
    y_c, p_c = _dispatch_traced(impl, clipped, xs, ws)
    np.testing.assert_array_equal(p, p_c)
    np.testing.assert_array_equal(y, y_c)
    # Rank 1 receives 2 rows (from itself) only, then zeros.
    np.testing.assert_array_equal(p[1, :2], xs[1, 2:4])
    assert not p[1, 2:].any()


def test_alltoallv_traced_recv_counts_disagreeing_xla_uses_the_peers_counts():
    xs, ws = _a2a_case()
    table = np.array([[1, 1, 1, 1], [2, 0, 1, 1]], np.int32)
    good_recv = np.array([[1, 1, 2, 0], [1, 1, 1, 1]], np.int32)
    bad_recv = good_recv.copy()
    bad_recv[0, 2] = 0  # claims rank 1 sends nothing to expert 0
    y, p = _dispatch_traced("xla", table, xs, ws, recv=bad_recv)
    y_ok, p_ok = _dispatch_traced("xla", table, xs, ws, recv=good_recv)
    np.testing.assert_array_equal(p, p_ok)
    np.testing.assert_array_equal(y, y_ok)


def test_alltoallv_traced_recv_counts_disagreeing_ffi_raises():
    xs, ws = _a2a_case()
    table = np.array([[1, 1, 1, 1], [2, 0, 1, 1]], np.int32)
    bad_recv = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.int32)
    with pytest.raises(Exception, match=r"rank 0 recv_counts\[2\] = 0 but its peer sends 2"):
        _dispatch_traced("ffi", table, xs, ws, recv=bad_recv)


def _combine_traced(impl, send, recv, xs, ws):
    def f(x, w, s, rc):
        (y, _) = jax_mc2.grouped_matmul_alltoallv(
            x[0], w[0], "ep", send_counts=s[0], recv_counts=rc[0], implementation=impl
        )
        return (y[None],)

    (y,) = _ep(len(xs), f, [xs, ws, jnp.asarray(send), jnp.asarray(recv)], 1)
    return np.asarray(y)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_alltoallv_combine_traced_counts_past_the_rows_read_zero_rows(impl):
    """Combine stays the exact transpose of a dispatch whose max_recv_tokens
    dropped rows: counts laying out more rows than gmm_x read the missing
    rows as zero rows, in both implementations."""
    xs, ws = _a2a_case(rows=4)
    # Rank 0 keeps [3, 1] (capacity 4) for itself and 1 row for rank 1: 5 > 4 rows.
    send = np.array([[3, 3, 1, 0], [1, 1, 1, 1]], np.int32)
    recv = np.array([[3, 3, 1, 1], [1, 0, 1, 1]], np.int32)
    y = _combine_traced(impl, send, recv, xs, ws)
    np.testing.assert_array_equal(y[0, :3], xs[0, :3])
    assert not y[0, 3:6].any()
    other = _combine_traced("xla" if impl == "ffi" else "ffi", send, recv, xs, ws)
    np.testing.assert_array_equal(y, other)


def test_alltoallv_combine_traced_recv_counts_disagreeing_ffi_raises():
    xs, ws = _a2a_case(rows=4)
    send = np.array([[1, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    recv = np.array([[1, 1, 1, 1], [1, 1, 1, 3]], np.int32)
    with pytest.raises(Exception, match=r"rank 1 recv_counts\[3\] = 3 but its peer sends 1"):
        _combine_traced("ffi", send, recv, xs, ws)
    y = _combine_traced("xla", send, recv, xs, ws)
    ok = _combine_traced("xla", send, np.ones_like(recv), xs, ws)
    np.testing.assert_array_equal(y, ok)


# --- vmap with nothing mapped: what jacfwd binds and a vmapped closure makes ---


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_grouped_matmul_vmapped_closure(impl):
    """JAX calls a primitive's vmap rule with no operand mapped too (here a
    vmapped function that only closes over the operands; jacfwd's primal
    below): it used to fail inside lax.map ("scan got no values")."""
    x, w = _gmm_case(2)
    sizes = np.array([3, 5])
    shifts = np.arange(2, dtype=np.float32)
    got = jax.vmap(lambda b: b + jax_mc2.grouped_matmul(x, w, sizes, implementation=impl))(shifts)
    want = _np_grouped(x, w, sizes) + shifts[:, None, None]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_grouped_matmul_jacfwd_and_hessian(impl):
    x, w = _gmm_case(2)
    sizes = np.array([3, 5])
    gmm = lambda x_: jax_mc2.grouped_matmul(x_, w, sizes, implementation=impl)  # noqa: E731
    jac = jax.jacfwd(gmm)(x)
    np.testing.assert_allclose(np.asarray(jac), np.asarray(jax.jacrev(gmm)(x)), atol=1e-6)
    hess = jax.hessian(lambda x_: jnp.sum(gmm(x_) ** 2))(x)
    np.testing.assert_allclose(
        np.asarray(hess),
        np.asarray(jax.jacrev(jax.grad(lambda x_: jnp.sum(gmm(x_) ** 2)))(x)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_add_rms_norm_jacfwd_matches_jacrev(impl):
    rng = np.random.default_rng(3)
    x1 = rng.standard_normal((4, 8)).astype(np.float32)
    x2 = rng.standard_normal((8, 16)).astype(np.float32)
    gamma = rng.standard_normal(16).astype(np.float32)

    def norm(residual):
        return jax_mc2.matmul_all_reduce_add_rms_norm(
            x1, x2, residual, gamma, None, implementation=impl
        )[1]

    residual = rng.standard_normal((1, 4, 16)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(jax.jacfwd(norm)(residual)),
        np.asarray(jax.jacrev(norm)(residual)),
        rtol=1e-5,
        atol=1e-5,
    )


# --- divisions XLA:CPU turned into reciprocal multiplications ---


def test_comm_quantize_divides_by_huge_bfloat16_scales():
    """q = int8(fp16(c / scale_1)): 1 / 2^127 is subnormal and flushed to 0
    on CPU, so a reciprocal multiplication gave q = 0 where the quotient is
    about 1."""
    from jax_mc2.implementations import xla

    bf16 = ml_dtypes.bfloat16
    scale_1 = np.array([1.5 * 2.0**126, 2.0**127, 3.0], bf16)
    c = np.array([[2.0**127, 1.5 * 2.0**127, 3.0]] * 4, bf16)
    q = np.asarray(jax.jit(xla.comm_quantize)(c, scale_1))
    np.testing.assert_array_equal(q, [[1, 2, 1]] * 4)


def test_w8a8_scales_are_amax_over_127():
    from jax_mc2.parallel import quantize_weight_int8

    rng = np.random.default_rng(4)
    w = (rng.standard_normal((8, 8192)) * rng.uniform(0.1, 10, 8192)).astype(np.float32)
    _, scale = quantize_weight_int8(w)
    want = np.max(np.abs(w), axis=0) / np.float32(127.0)
    np.testing.assert_array_equal(np.asarray(scale).view(np.uint32), want.view(np.uint32))


def test_quantize_weight_int8_infinite_column_saturates_with_scale_1():
    """A column holding an infinity takes scale 1 like a NaN column (its scale
    was inf and its finite values 0, which dequantize to 0 * inf = NaN)."""
    from jax_mc2.parallel import quantize_weight_int8

    w = np.array([[np.inf, 1.0], [2.0, 3.0], [-np.inf, -300.0]], np.float32)
    q, scale = quantize_weight_int8(w)
    np.testing.assert_array_equal(np.asarray(scale), [1.0, 300.0 / np.float32(127)])
    np.testing.assert_array_equal(np.asarray(q)[:, 0], [127, 2, -127])


def test_quantize_weight_int8_needs_2d():
    from jax_mc2.parallel import quantize_weight_int8

    with pytest.raises(TypeError, match=r"^quantize_weight_int8: w must be 2-D \(k, n\)"):
        quantize_weight_int8(np.ones((2, 3, 4), np.float32))


def test_row_parallel_linear_w8a8_list_bias():
    """A list bias with quant=W8A8, as without quant (it had failed in the
    quant check before the list became an array)."""
    from jax_mc2 import parallel

    x = np.ones((4, 16), np.float32)
    wq, ws = parallel.quantize_weight_int8(np.ones((16, 8), np.float32))
    mesh = make_mesh((2,), ("tp",))
    kw = dict(mesh=mesh, axis="tp", quant=parallel.W8A8(ws, out_dtype=jnp.bfloat16))
    got = parallel.row_parallel_linear(x, wq, bias=[1.0] * 8, **kw)
    want = parallel.row_parallel_linear(x, wq, bias=np.ones(8, np.float32), **kw)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# --- a per-rank result varying over only some axes of a tuple axis_name ---


@pytest.mark.slow  # 4-10 s a case (eager shard_map and its gradient)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("op", ["mm_all_reduce_base", "add_rms_norm"])
def test_all_reduce_over_axes_the_result_varies_over_in_part(impl, op):
    """x1 varies over "i" only, the all-reduce runs over ("i", "j"): lax.psum
    refuses an operand that varies over some of its axes, which broke the
    xla forward and every gradient ("psum can only accept axis_name ...")."""
    from conftest import make_mesh
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh((2, 2), ("i", "j"))
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal((4, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)

    def per_rank(a):
        return jax.lax.pcast(a, ("i",), to="varying") * (1.0 + jax.lax.axis_index("i"))

    def ours(a):
        if op == "mm_all_reduce_base":
            return jax_mc2.mm_all_reduce_base(per_rank(a), w, ("i", "j"), implementation=impl)
        return jax_mc2.matmul_all_reduce_add_rms_norm(
            per_rank(a), w, np.zeros((1, 4, 8), np.float32), np.ones(8, np.float32), ("i", "j"),
            implementation=impl,
        )[1].reshape(4, 8)  # fmt: skip

    def reference(a):
        partial = jax.lax.pcast(per_rank(a) @ w, ("j",), to="varying")  # as psum needs
        mm = jax.lax.psum(partial, ("i", "j"))
        if op == "mm_all_reduce_base":
            return mm
        return mm * jax.lax.rsqrt(jnp.mean(mm * mm, axis=-1, keepdims=True) + 1e-6)

    def run(fn):
        f = jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P())
        return f(x1), jax.grad(lambda a: jnp.sum(jnp.sin(f(a))))(x1)

    (got, dgot), (want, dwant) = run(ours), run(reference)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dgot), np.asarray(dwant), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_dispatch_counts_give_the_combine_what_the_dispatch_sent(impl):
    """Traced send counts past a rank's rows (rank 0 asks to send [3, 1] of
    its 2 rows): the dispatch clips them, so counts built with
    exchange_counts(send_counts) are not what the peers send, while those of
    dispatch_counts make the round trip the identity."""
    xs = np.array([[[10.0], [11.0]], [[20.0], [21.0]]], np.float32)
    eye = np.ones((1, 1, 1), np.float32)
    table = np.array([[3, 1], [1, 1]], np.int32)
    mesh = make_mesh((2,), ("ep",))

    def round_trip(x, c, clipped):
        if clipped:
            sent, received = jax_mc2.dispatch_counts(c[0], 2, "ep")
        else:
            sent, received = c[0], jax_mc2.exchange_counts(c[0], "ep")
        y, _, _ = jax_mc2.alltoallv_grouped_matmul(
            x[0], eye, "ep", send_counts=c[0], recv_counts=received, implementation=impl
        )
        back, _ = jax_mc2.grouped_matmul_alltoallv(
            y, eye, "ep", send_counts=received, recv_counts=sent, max_out_tokens=2,
            implementation=impl,
        )  # fmt: skip
        return back[None], sent[None], received[None]

    def run(clipped):
        f = jax.shard_map(
            functools.partial(round_trip, clipped=clipped),
            mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=(P("ep"),) * 3,
        )  # fmt: skip
        return [np.asarray(a) for a in jax.jit(f)(xs, table)]

    back, sent, received = run(clipped=True)
    np.testing.assert_array_equal(sent, [[2, 0], [1, 1]])
    np.testing.assert_array_equal(received, [[2, 1], [0, 1]])
    np.testing.assert_array_equal(back, xs)
    # The unclipped counts: ffi refuses the dispatch's recv_counts (they are
    # not what the peers send); xla, which cannot fail at run time, misroutes.
    if impl == "ffi":
        with pytest.raises(Exception, match=r"recv_counts\[0\] = 3 but its peer sends 2"):
            run(clipped=False)
    else:
        wrong, _, _ = run(clipped=False)
        assert not np.array_equal(wrong, xs)


def test_dispatch_counts_validation():
    with pytest.raises(ValueError, match="^dispatch_counts: rows must be >= 0, got -1"):
        jax_mc2.dispatch_counts(np.array([1, 2]), -1, None)
    with pytest.raises(TypeError, match=r"^dispatch_counts: send_counts must be a 1-D integer"):
        jax_mc2.dispatch_counts(np.ones(2, np.float32), 4, None)
    sent, received = jax_mc2.dispatch_counts(np.array([3, -1, 2]), 4, None)
    np.testing.assert_array_equal(sent, [3, 0, 1])
    np.testing.assert_array_equal(received, sent)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("combine", [False, True])
def test_alltoallv_gradient_of_rows_replicated_over_the_axis(impl, combine):
    """gmm_x replicated over the EP axis: each rank sends the same rows, so
    its gradient is the sum of the gradients of the copies. Reverse mode
    raised "Expected cotangent type float32[8,3] but got float32[8,3]{V:ep}"."""
    from jax import lax

    world = 4
    mesh = make_mesh((world,), ("ep",))
    table = np.full((world, 2 * world), 1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 3, 3)), jnp.float32)
    op = jax_mc2.grouped_matmul_alltoallv if combine else jax_mc2.alltoallv_grouped_matmul

    def loss(rows, w):
        y = op(rows, w, "ep", send_counts=table, implementation=impl)[0]
        return lax.psum(jnp.sum(jnp.sin(y)), "ep")

    def grads(x_spec, rows):
        f = jax.shard_map(loss, mesh=mesh, in_specs=(x_spec, P()), out_specs=P())
        return jax.grad(jax.jit(f), argnums=(0, 1))(rows, w)

    gx, gw = grads(P(), x)
    copies_gx, copies_gw = grads(P("ep"), jnp.tile(x, (world, 1)))
    want_gx = np.asarray(copies_gx).reshape(world, *x.shape).sum(0)
    np.testing.assert_allclose(np.asarray(gx), want_gx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(copies_gw), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_alltoallv_gradient_without_vma_checking(impl):
    """Under ``shard_map(check_vma=False)`` the operators' avals carried the
    EP axis as varying, and reverse mode raised "Expected cotangent type
    float32[4,4]{V:ep} but got float32[4,4]". The gradients now equal those
    of the same program with vma checking."""
    mesh = make_mesh((2,), ("ep",))
    table = np.full((2, 2), 2)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 1, 8, 4)), jnp.float32)
    mm_x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    mm_w = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)

    def per_rank(x, w, mm_x, mm_w):
        h, mm_y, _ = jax_mc2.alltoallv_grouped_matmul(
            x[0], w[0], "ep", send_counts=table, mm_x=mm_x, mm_weight=mm_w, implementation=impl
        )
        w_back = jnp.swapaxes(w[0], 1, 2)
        y, _ = jax_mc2.grouped_matmul_alltoallv(
            h, w_back, "ep", send_counts=table.T, implementation=impl
        )
        return y[None], mm_y

    def grads(check_vma):
        f = jax.shard_map(
            per_rank,
            mesh=mesh,
            in_specs=(P("ep"), P("ep"), P(), P()),
            out_specs=(P("ep"), P()),
            check_vma=check_vma,
        )

        def loss(*args):
            y, mm_y = f(*args)
            return jnp.sum(jnp.sin(y)) + jnp.sum(mm_y**2)

        return jax.grad(jax.jit(loss), argnums=(0, 1, 2, 3))(x, w, mm_x, mm_w)

    for got, want in zip(grads(False), grads(True)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
