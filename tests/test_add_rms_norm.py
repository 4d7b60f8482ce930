"""matmul_all_reduce_add_rms_norm and its in-place variant against the NumPy
oracle, both implementations, and their JAX transformations."""

import functools

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401  (check_grads)
import ml_dtypes
import numpy as np
import oracle
import pytest
from conftest import IMPLEMENTATIONS, make_mesh
from hlo import reductions
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2

DTYPES = (np.float16, oracle.BF16, np.float32)
OPS = {
    "plain": mc2.matmul_all_reduce_add_rms_norm,
    "inplace": mc2.inplace_matmul_all_reduce_add_rms_norm,
}


def _rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _case(rng, world, dtype, *, x3d, transpose_x2, b=2, s=6, k_local=16, n=32):
    k = k_local * world
    x1 = _rand(rng, (b, s, k) if x3d else (b * s, k), dtype)
    x2 = _rand(rng, (n, k) if transpose_x2 else (k, n), dtype, 0.3)
    residual = _rand(rng, (b, s, n), dtype)
    gamma = _rand(rng, (n,), dtype)
    bias = _rand(rng, (n,), dtype)
    return x1, x2, residual, gamma, bias


def _oracle(x1, x2, residual, gamma, bias, world, *, transpose_x2, epsilon):
    kl = x1.shape[-1] // world
    x1s = [x1[..., r * kl : (r + 1) * kl] for r in range(world)]
    x2s = [
        (x2[:, r * kl : (r + 1) * kl] if transpose_x2 else x2[r * kl : (r + 1) * kl])
        for r in range(world)
    ]
    biases = None if bias is None else [bias] * world
    mm = oracle.mm_all_reduce_base(x1s, x2s, biases, transpose_x2=transpose_x2)
    mm = mm.astype(residual.dtype)  # the all-reduce result is in the dtype
    return oracle.add_rms_norm(mm, residual, gamma, epsilon)


def _check(got, want, dtype, world, k=64):
    """y: the all-reduced matmul's bound (k: each rank's dot-product length)
    plus the add's rounding; norm_out (values near |gamma|): y's error,
    amplified at most about twice through y / rms(y), plus the roundings of
    y * rstd and of the product with gamma."""
    y_scale = np.abs(want[0]).max(initial=0) + 1
    tol_y = oracle.tolerance(dtype, world, scale=y_scale, k=k + 1) + oracle.ulp(dtype, y_scale)
    n_scale = np.abs(want[1]).max(initial=0) + 1
    tol_n = 2 * tol_y / y_scale * n_scale + 2 * oracle.ulp(dtype, n_scale)
    for g, w, tol in zip(got, want, (tol_y, tol_n)):
        np.testing.assert_allclose(np.asarray(g).astype(np.float64), w, atol=tol, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", OPS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_values_sharded(variant, impl, dtype, world):
    rng = np.random.default_rng(world)
    x3d = world in (1, 4)
    transpose_x2 = world in (2, 4)
    x1, x2, residual, gamma, bias = _case(rng, world, dtype, x3d=x3d, transpose_x2=transpose_x2)
    mesh = make_mesh((world,), ("tp",))
    x_spec = P(None, None, "tp") if x3d else P(None, "tp")
    w_spec = P(None, "tp") if transpose_x2 else P("tp", None)
    for with_bias in (False, True):

        def f(x1, x2, r, g, b, with_bias=with_bias):
            return OPS[variant](
                x1,
                x2,
                r,
                g,
                "tp",
                bias=b if with_bias else None,
                epsilon=1e-5,
                transpose_x2=transpose_x2,
                implementation=impl,
            )

        fn = jax.jit(
            jax.shard_map(
                f, mesh=mesh, in_specs=(x_spec, w_spec, P(), P(), P()), out_specs=(P(), P())
            )
        )
        y, norm_out = fn(x1, x2, residual, gamma, bias)
        assert y.dtype == dtype and y.shape == residual.shape == norm_out.shape
        want = _oracle(
            x1,
            x2,
            residual,
            gamma,
            bias if with_bias else None,
            world,
            transpose_x2=transpose_x2,
            epsilon=1e-5,
        )
        _check((y, norm_out), want, dtype, world)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_values_single_device_no_axis(impl, dtype):
    rng = np.random.default_rng(1)
    x1, x2, residual, gamma, bias = _case(rng, 1, dtype, x3d=False, transpose_x2=False)
    got = mc2.matmul_all_reduce_add_rms_norm(
        x1, x2, residual, gamma, None, bias=bias, implementation=impl
    )
    want = _oracle(x1, x2, residual, gamma, bias, 1, transpose_x2=False, epsilon=1e-6)
    _check(got, want, dtype, 1)


@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
def test_y_rounded_before_statistics(dtype):
    # The kernel semantics: y is rounded to the dtype, norm_out is computed
    # from the rounded y, and y * rstd is rounded before gamma. A NumPy model
    # of exactly those steps agrees with both implementations to 1 ulp.
    rng = np.random.default_rng(2)
    x1, x2, residual, gamma, bias = _case(rng, 1, dtype, x3d=True, transpose_x2=False)
    mm = oracle.per_rank_matmul(x1, x2, bias, dtype=dtype)
    y = (mm.astype(np.float32) + residual.astype(np.float32)).astype(dtype)
    yf = y.astype(np.float32)
    ms = np.sum(yf * yf * np.float32(1 / yf.shape[-1]), axis=-1, keepdims=True, dtype=np.float32)
    t = (yf * (np.float32(1) / np.sqrt(ms + np.float32(1e-6)))).astype(dtype)
    want = (t.astype(np.float32) * gamma.astype(np.float32)).astype(dtype).astype(np.float64)
    ulp = np.abs(want) * (2**-10 if dtype == np.float16 else 2**-7) + 1e-7
    for impl in IMPLEMENTATIONS:
        got_y, got = mc2.matmul_all_reduce_add_rms_norm(
            x1, x2, residual, gamma, None, bias=bias, implementation=impl
        )
        np.testing.assert_array_equal(np.asarray(got_y), y)
        assert np.all(np.abs(np.asarray(got).astype(np.float64) - want) <= ulp)


@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("m, n", [(16384, 4), (4096, 64), (256, 512)])
def test_rstd_product_rounded_on_many_short_rows(dtype, m, n):
    """Integer y with n a power of two makes the statistics exact in any
    summation order, so both implementations must match the kernel's steps
    bit for bit: y * rstd rounded to the dtype, then times gamma. Many short
    rows are where XLA:CPU's YNNPACK fusion dropped a bf16 -> f32 convert
    pair (the rounding of y * rstd) in the ``xla`` implementation."""
    rng = np.random.default_rng(m + n)
    x1 = rng.integers(-3, 4, (1, m, 8)).astype(dtype)
    x2 = rng.integers(-3, 4, (8, n)).astype(dtype)
    residual = rng.integers(-20, 21, (1, m, n)).astype(dtype)
    gamma = rng.standard_normal(n).astype(dtype)
    f32 = np.float32
    y = (x1.astype(f32) @ x2.astype(f32) + residual.astype(f32)).astype(dtype)
    yf = y.astype(f32)
    ms = np.sum(yf * yf * f32(1 / n), axis=-1, keepdims=True, dtype=f32)
    t = (yf * (f32(1) / np.sqrt(ms + f32(1e-6)))).astype(dtype)
    want = (t.astype(f32) * gamma.astype(f32)).astype(dtype)
    for impl in IMPLEMENTATIONS:
        got_y, got = mc2.matmul_all_reduce_add_rms_norm(
            x1, x2, residual, gamma, None, implementation=impl
        )
        np.testing.assert_array_equal(np.asarray(got_y), y)
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 40, 1000])
def test_add_rms_norm_kernel_rounding(dtype, n):
    """The add + RMSNorm custom call on its own, at row lengths that leave
    every vector tail: y = round(mm + residual) bit for bit (ties to even,
    overflow to inf, NaN kept and quiet) and norm_out within an ulp or two of
    a NumPy model of the kernel's steps, non-finite rows included."""
    from jax_mc2.implementations import ffi as _ffi

    rng = np.random.default_rng(n)
    # Sums of two values of one binade: many land exactly halfway.
    mm = (rng.integers(1, 64, (4, n)) * rng.choice([-1.0, 1.0], (4, n))).astype(dtype)
    residual = (rng.integers(1, 64, (4, n)) * 2.0**-3).astype(dtype)
    big = ml_dtypes.finfo(dtype).max
    mm[2, 0], residual[2, 0] = big, big  # overflows to inf
    # A signalling NaN: the kernel's result must be a quiet one.
    bits = mm.view(np.uint32 if dtype == np.float32 else np.uint16)
    bits[3, n // 2] = {np.dtype(np.float16): 0x7C01, oracle.BF16: 0x7F81}.get(
        np.dtype(dtype), 0x7F800001
    )
    gamma = rng.uniform(0.5, 2.0, n).astype(dtype)
    f = jax.jit(
        lambda a, b, c: _ffi.add_rms_norm(
            a, b, c, epsilon=1e-6, alias_residual=False, parallelism=1
        )
    )
    got_y, got_norm = (np.asarray(v) for v in f(mm, residual, gamma))

    f32 = np.float32
    with np.errstate(all="ignore"):
        y = (mm.astype(f32) + residual.astype(f32)).astype(dtype)
        yf = y.astype(f32)
        ms = np.sum(yf * yf * f32(1 / n), axis=-1, keepdims=True, dtype=f32)
        t = (yf * (f32(1) / np.sqrt(ms + f32(1e-6)))).astype(dtype)
        want = (t.astype(f32) * gamma.astype(f32)).astype(dtype).astype(np.float64)
    assert got_y.dtype == y.dtype
    np.testing.assert_array_equal(got_y.astype(f32), y.astype(f32))  # NaN == NaN in f32
    assert np.isinf(got_y[2, 0]) and np.isnan(got_y[3, n // 2])
    quiet = {np.dtype(np.float16): 0x7E00, oracle.BF16: 0x7FC0}.get(np.dtype(dtype), 0x7FC00000)
    assert got_y.view(bits.dtype)[3, n // 2] & quiet == quiet
    got = got_norm.astype(np.float64)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    ulp = {np.dtype(np.float16): 2.0**-10, np.dtype(np.float32): 2.0**-22}.get(
        np.dtype(dtype), 2.0**-7
    )
    assert np.all(np.abs(got[~nan] - want[~nan]) <= np.abs(want[~nan]) * ulp)


@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("n", [7, 16, 40])
@pytest.mark.parametrize("alias", [False, True], ids=["out-of-place", "inplace"])
def test_add_rms_norm_kernel_takes_a_float32_accumulator(dtype, n, alias):
    """mm as one rank's float32 accumulator: the kernel rounds it to the
    dtype as it reads it, the same bits as given the rounded mm (halfway
    values, overflow to inf and NaN included); mm of a third dtype is refused."""
    from jax_mc2.implementations import ffi as _ffi

    rng = np.random.default_rng(n)
    acc = rng.standard_normal((3, n)).astype(np.float32) * 4
    acc[0, :] = (rng.integers(-200, 200, n) + 0.5) * 2.0**-6  # ties in both dtypes
    acc[1, 0] = 3.4e38 if dtype == oracle.BF16 else 7e4  # rounds to inf
    acc[2, n // 2] = np.nan
    residual = rng.standard_normal((3, n)).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, n).astype(dtype)

    def run(mm):
        f = functools.partial(_ffi.add_rms_norm, epsilon=1e-6, alias_residual=alias, parallelism=1)
        return [np.asarray(v).astype(np.float32) for v in jax.jit(f)(mm, residual, gamma)]

    with np.errstate(over="ignore"):
        rounded = acc.astype(dtype)
    assert np.isinf(rounded[1, 0].astype(np.float32))
    for got, want in zip(run(acc), run(rounded)):
        np.testing.assert_array_equal(got, want)
    other = np.float16 if dtype == oracle.BF16 else oracle.BF16
    with pytest.raises(Exception, match="mm must be in residual's dtype or float32"):
        run(acc.astype(other))


@pytest.mark.parametrize("gemm", ["xla", "blas"])
@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
def test_one_rank_on_xla_gemm_hands_the_accumulator_over(gemm, dtype, monkeypatch):
    """One rank on XLA's GEMM: the kernel gets the float32 accumulator (no
    rounding pass before it); on sgemm, the matmul kernel's rounded result.
    Both match the oracle."""
    monkeypatch.setenv("JAX_MC2_GEMM", gemm)
    rng = np.random.default_rng(3)
    x1, x2, residual, gamma, bias = _case(rng, 1, dtype, x3d=True, transpose_x2=False)
    f = jax.jit(
        lambda *a: mc2.matmul_all_reduce_add_rms_norm(*a, None, bias=bias, implementation="ffi")
    )
    text = f.lower(x1, x2, residual, gamma).as_text()
    call = next(line for line in text.splitlines() if "custom_call @mc2_add_rms_norm_ffi" in line)
    assert ("(tensor<2x6x32xf32>" in call) == (gemm == "xla"), call
    want = _oracle(x1, x2, residual, gamma, bias, 1, transpose_x2=False, epsilon=1e-6)
    _check(f(x1, x2, residual, gamma), want, dtype, 1)


@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
def test_nan_bits_do_not_depend_on_the_position(dtype):
    """A NaN's bits in y are the same in the vector body and the scalar tail
    of the ffi kernel (n = 9: one 8-wide vector and a tail of 1): quiet, the
    payload kept. float16 equals the xla implementation's bits; XLA's
    bfloat16 conversion drops the payload (0x7FC0), a NaN all the same."""
    from jax_mc2.implementations import ffi as _ffi
    from jax_mc2.implementations import xla as _xla

    residual = np.ones((1, 1, 9), dtype)
    bits = residual.view(np.uint16)
    bits[0, 0, [0, 8]] = 0x7D01 if dtype == np.float16 else 0x7F81  # signalling, payload 1
    zeros, gamma = np.zeros_like(residual), np.ones(9, dtype)
    got = jax.jit(
        lambda a, b, c: _ffi.add_rms_norm(
            a, b, c, epsilon=1e-6, alias_residual=False, parallelism=1
        )
    )(zeros, residual, gamma)[0]
    want = jax.jit(lambda a, b, c: _xla.add_rms_norm(a, b, c, epsilon=1e-6))(
        zeros, residual, gamma
    )[0]
    got_bits = np.asarray(got).view(np.uint16)[0, 0]
    want_bits = np.asarray(want).view(np.uint16)[0, 0]
    assert got_bits[0] == got_bits[8] == (0x7F01 if dtype == np.float16 else 0x7FC1)
    np.testing.assert_array_equal(got_bits[1:8], want_bits[1:8])
    assert np.isnan(np.asarray(want, np.float32)[0, 0, [0, 8]]).all()


def test_epsilon_is_used():
    z = np.zeros((1, 4, 8), np.float32)
    y, norm = mc2.matmul_all_reduce_add_rms_norm(
        np.zeros((4, 2), np.float32),
        np.zeros((2, 8), np.float32),
        z + 1e-3,
        np.ones(8, np.float32),
        None,
        epsilon=0.5,
    )
    np.testing.assert_allclose(np.asarray(norm), 1e-3 / np.sqrt(1e-6 + 0.5), rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_inplace_aliases_residual(impl):
    rng = np.random.default_rng(4)
    x1, x2, residual, gamma, _ = _case(rng, 1, np.float16, x3d=True, transpose_x2=False)
    f = jax.jit(
        functools.partial(
            mc2.inplace_matmul_all_reduce_add_rms_norm, axis_name=None, implementation=impl
        ),
        donate_argnums=(2,),
    )
    compiled = f.lower(x1, x2, residual, gamma).compile().as_text()
    # Output 0 (y) lives in parameter 2 (the donated residual).
    assert "input_output_alias={ {0}: (2, {}, may-alias) }" in compiled
    if impl == "ffi":
        # The custom call itself writes y into its residual operand.
        assert "output_to_operand_aliasing={{0}: (1, {})}" in compiled
    res = jax.device_put(residual)
    y, norm_out = f(x1, x2, res, gamma)
    assert res.is_deleted()
    want = mc2.matmul_all_reduce_add_rms_norm(x1, x2, residual, gamma, None, implementation=impl)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(norm_out), np.asarray(want[1]))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("comm_turn", [2, 7])
def test_comm_turn_identical_and_lowered(impl, comm_turn, monkeypatch):
    rng = np.random.default_rng(6)
    x1, x2, residual, gamma, bias = _case(rng, 4, oracle.BF16, x3d=True, transpose_x2=False)
    mesh = make_mesh((4,), ("tp",))

    def build(turn):
        return jax.jit(
            jax.shard_map(
                lambda a, b, r, g, c: mc2.matmul_all_reduce_add_rms_norm(
                    a, b, r, g, "tp", bias=c, comm_turn=turn, implementation=impl
                ),
                mesh=mesh,
                in_specs=(P(None, None, "tp"), P("tp", None), P(), P(), P()),
                out_specs=(P(), P()),
            )
        )

    args = (x1, x2, residual, gamma, bias)
    base, split = build(0)(*args), build(comm_turn)(*args)
    for a, b in zip(base, split):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = build(comm_turn).lower(*args).as_text()
    assert reductions(text) == comm_turn
    # The chunks' matmuls are custom calls on sgemm, XLA's dots on XLA's GEMM
    # (the CPU's flags pick one for bfloat16); add + RMSNorm is one custom call.
    for gemm in ("blas", "xla") if impl == "ffi" else ():
        monkeypatch.setenv("JAX_MC2_GEMM", gemm)
        text = build(comm_turn).lower(*args).as_text()
        assert text.count("custom_call @mc2_matmul_ffi") == (comm_turn if gemm == "blas" else 0)
        assert text.count("stablehlo.dot_general") == (0 if gemm == "blas" else comm_turn)
        assert text.count("custom_call @mc2_add_rms_norm_ffi") == 1
    text = build(0).lower(*args).as_text()
    assert reductions(text) == 1


def _grad_case(seed):
    """(x1, x2, residual, gamma, bias) in float32 for a (dp=2, tp=4) mesh."""
    rng = np.random.default_rng(seed)
    shapes = ((4, 3, 16), (16, 8), (4, 3, 8), (8,), (8,))
    return tuple(_rand(rng, s, np.float32, 0.3 if i == 1 else 1.0) for i, s in enumerate(shapes))


def _sharded(op, impl):
    """op over tp inside shard_map on a (dp=2, tp=4) mesh, global arrays in and out."""
    return jax.shard_map(
        lambda a, b, r, g, c: op(a, b, r, g, "tp", bias=c, implementation=impl),
        mesh=make_mesh((2, 4), ("dp", "tp")),
        in_specs=(P("dp", None, "tp"), P("tp", None), P("dp"), P(), P()),
        out_specs=(P("dp"), P("dp")),
    )


def _loss_of(y, norm):
    return jnp.sum(jnp.sin(norm)) + jnp.sum(y * y) * 0.1


def _loss_ref(x1, x2, residual, gamma, bias):
    y = x1 @ x2 + 4 * bias + residual  # the bias on every tp rank
    norm = y / jnp.sqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6) * gamma
    return _loss_of(y, norm)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_grads_sharded(impl):
    f = _sharded(mc2.matmul_all_reduce_add_rms_norm, impl)
    args = _grad_case(8)
    jax.test_util.check_grads(f, args, order=1, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)
    got = jax.jit(jax.grad(lambda *a: _loss_of(*f(*a)), argnums=tuple(range(5))))(*args)
    want = jax.grad(_loss_ref, argnums=tuple(range(5)))(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
def test_grads_sharded_16_bit(impl, inplace, dtype):
    """Gradients in float16 / bfloat16 inside shard_map, against float32
    gradients of the same math (within the 16-bit rounding)."""
    op = (
        mc2.inplace_matmul_all_reduce_add_rms_norm
        if inplace
        else mc2.matmul_all_reduce_add_rms_norm
    )
    f = _sharded(op, impl)

    def loss(*a):
        return _loss_of(*(o.astype(jnp.float32) for o in f(*a)))

    args16 = tuple(a.astype(dtype) for a in _grad_case(12))
    got = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*args16)
    want = jax.grad(_loss_ref, argnums=tuple(range(5)))(*(a.astype(np.float32) for a in args16))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        b = np.asarray(b)
        np.testing.assert_allclose(
            np.asarray(a, np.float32), b, atol=3e-2 * (np.abs(b).max() + 1), rtol=0
        )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap(impl):
    rng = np.random.default_rng(10)
    x1 = _rand(rng, (3, 6, 8), np.float32)
    x2 = _rand(rng, (8, 5), np.float32)
    residual = _rand(rng, (3, 2, 3, 5), np.float32)
    gamma = _rand(rng, (5,), np.float32)
    gammas = _rand(rng, (3, 5), np.float32)
    op = functools.partial(mc2.matmul_all_reduce_add_rms_norm, axis_name=None, implementation=impl)
    y, norm = jax.vmap(lambda a, r: op(a, x2, r, gamma))(x1, residual)
    for i in range(3):
        wy, wn = oracle.add_rms_norm(x1[i] @ x2, residual[i], gamma, 1e-6)
        np.testing.assert_allclose(np.asarray(y[i]), wy, atol=1e-5)
        np.testing.assert_allclose(np.asarray(norm[i]), wn, atol=1e-4)
    y, norm = jax.vmap(lambda a, r, g: op(a, x2, r, g))(x1, residual, gammas)
    for i in range(3):
        _, wn = oracle.add_rms_norm(x1[i] @ x2, residual[i], gammas[i], 1e-6)
        np.testing.assert_allclose(np.asarray(norm[i]), wn, atol=1e-4)


def test_eval_shape():
    args = (
        jax.ShapeDtypeStruct((2, 64, 256), jnp.float16),
        jax.ShapeDtypeStruct((256, 128), jnp.float16),
        jax.ShapeDtypeStruct((2, 64, 128), jnp.float16),
        jax.ShapeDtypeStruct((128,), jnp.float16),
    )
    y, norm = jax.eval_shape(
        functools.partial(mc2.matmul_all_reduce_add_rms_norm, axis_name=None), *args
    )
    assert y.shape == norm.shape == (2, 64, 128) and y.dtype == norm.dtype == jnp.float16


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vma_typing(impl):
    mesh = make_mesh((2, 4), ("dp", "tp"))
    seen = {}

    def f(x1, x2, residual, gamma):
        y, norm = mc2.matmul_all_reduce_add_rms_norm(
            x1, x2, residual, gamma, "tp", implementation=impl
        )
        seen["y"], seen["norm"] = jax.typeof(y), jax.typeof(norm)
        return y, norm

    g = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P("dp", None, "tp"), P("tp", None), P("dp"), P()),
            out_specs=(P("dp"), P("dp")),
            check_vma=True,
        )
    )
    g(
        np.ones((4, 3, 16), np.float32),
        np.ones((16, 8), np.float32),
        np.ones((4, 3, 8), np.float32),
        np.ones(8, np.float32),
    )
    assert str(seen["y"]) == str(seen["norm"]) == "float32[2,3,8]{V:dp}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vma_y_does_not_vary_with_gamma(impl):
    """y = allReduce(x1 @ x2) + residual does not depend on gamma: with gamma
    varying along dp, only norm_out varies along dp."""
    mesh = make_mesh((2, 4), ("dp", "tp"))

    def f(x1, x2, residual, gamma):
        g = gamma * (1 + jax.lax.axis_index("dp")).astype(gamma.dtype)
        y, norm = mc2.matmul_all_reduce_add_rms_norm(x1, x2, residual, g, "tp", implementation=impl)
        assert str(jax.typeof(y)) == "float32[1,3,8]"
        assert str(jax.typeof(norm)) == "float32[1,3,8]{V:dp}"
        return y, norm

    y, norm = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P(None, None, "tp"), P("tp", None), P(), P()),
            out_specs=(P(), P("dp")),
            check_vma=True,
        )
    )(
        np.ones((1, 3, 16), np.float32),
        np.ones((16, 8), np.float32),
        np.ones((1, 3, 8), np.float32),
        np.ones(8, np.float32),
    )
    np.testing.assert_allclose(np.asarray(y), np.full((1, 3, 8), 17.0))
    assert norm.shape == (2, 3, 8)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_empty_n(impl):
    """n = 0 (seed 002 allows empty b*s and n): empty outputs."""
    f16 = np.float16
    for op in (mc2.matmul_all_reduce_add_rms_norm, mc2.inplace_matmul_all_reduce_add_rms_norm):
        y, norm = op(
            np.ones((4, 8), f16),
            np.ones((8, 0), f16),
            np.ones((2, 2, 0), f16),
            np.ones((0,), f16),
            None,
            implementation=impl,
        )
        assert y.shape == norm.shape == (2, 2, 0)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(0, 3),
    s=st.integers(1, 9),
    k=st.integers(1, 48),
    n=st.integers(1, 48),
    x1_3d=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    transpose_x2=st.booleans(),
    with_bias=st.booleans(),
    epsilon=st.floats(1e-7, 0.5),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_oracle(
    impl, b, s, k, n, x1_3d, dtype, transpose_x2, with_bias, epsilon, seed
):
    rng = np.random.default_rng(seed)
    x1 = _rand(rng, (b, s, k) if x1_3d else (b * s, k), dtype)
    x2 = _rand(rng, (n, k) if transpose_x2 else (k, n), dtype, 0.3)
    residual = _rand(rng, (b, s, n), dtype)
    gamma = _rand(rng, (n,), dtype)
    bias = _rand(rng, (n,), dtype) if with_bias else None
    y, norm_out = mc2.matmul_all_reduce_add_rms_norm(
        x1,
        x2,
        residual,
        gamma,
        None,
        bias=bias,
        epsilon=epsilon,
        transpose_x2=transpose_x2,
        implementation=impl,
    )
    assert y.shape == norm_out.shape == (b, s, n)
    want = _oracle(x1, x2, residual, gamma, bias, 1, transpose_x2=transpose_x2, epsilon=epsilon)
    _check((y, norm_out), want, dtype, 1)
