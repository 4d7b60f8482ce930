"""The local grouped matmul primitive (the MoE operators' expert GEMM and its
weight gradient) against NumPy, both implementations, with gradients."""

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401  (check_grads)
import numpy as np
import oracle
import pytest
from conftest import IMPLEMENTATIONS

import jax_mc2 as mc2
from jax_mc2.implementations.ffi import grouped_matmul_wgrad
from jax_mc2.primitives.grouped_matmul import grouped_matmul_offsets as grouped_matmul

SIZES = [3, 0, 5, 1]  # an empty group, and 2 rows past the groups


def _case(rng, dtype, trans):
    rows, k, n = 11, 6, 4
    x = rng.standard_normal((rows, k)).astype(dtype)
    w = (rng.standard_normal((len(SIZES), n, k) if trans else (len(SIZES), k, n)) * 0.5).astype(
        dtype
    )
    offsets = np.concatenate([[0], np.cumsum(SIZES)]).astype(np.int32)
    return x, w, offsets


def _np_gmm(x, w, offsets, trans):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y = np.zeros((x.shape[0], w.shape[1] if trans else w.shape[2]))
    for g in range(len(offsets) - 1):
        wg = w64[g].T if trans else w64[g]
        y[offsets[g] : offsets[g + 1]] = x64[offsets[g] : offsets[g + 1]] @ wg
    return y


def _np_wgrad(x, dy, offsets, trans):
    out = []
    for g in range(len(offsets) - 1):
        xs, ds = x[offsets[g] : offsets[g + 1]], dy[offsets[g] : offsets[g + 1]]
        dw = xs.astype(np.float64).T @ ds.astype(np.float64)
        out.append(dw.T if trans else dw)
    return np.stack(out)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16, np.float32])
@pytest.mark.parametrize("trans", [False, True])
def test_values(impl, dtype, trans):
    x, w, offsets = _case(np.random.default_rng(1), dtype, trans)
    y = jax.jit(lambda *a: grouped_matmul(*a, trans_weight=trans, implementation=impl))(
        x, w, offsets
    )
    want = _np_gmm(x, w, offsets, trans).astype(dtype)
    tol = {np.float16: 2e-3, np.float32: 1e-6}.get(dtype, 1.6e-2)
    np.testing.assert_allclose(
        np.asarray(y, np.float32), want.astype(np.float32), rtol=tol, atol=tol
    )
    assert not np.asarray(y[sum(SIZES) :], np.float32).any()


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("trans", [False, True])
def test_weight_gradient_values(impl, trans):
    rng = np.random.default_rng(2)
    x, w, offsets = _case(rng, np.float32, trans)
    dy = rng.standard_normal((x.shape[0], w.shape[1] if trans else w.shape[2])).astype(np.float32)
    _, vjp = jax.vjp(
        lambda w_: grouped_matmul(x, w_, offsets, trans_weight=trans, implementation=impl), w
    )
    (dw,) = jax.jit(vjp)(dy)
    np.testing.assert_allclose(dw, _np_wgrad(x, dy, offsets, trans), rtol=1e-5, atol=1e-5)
    assert not np.asarray(dw[1]).any()  # the empty group


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("trans", [False, True])
def test_check_grads(impl, trans):
    x, w, offsets = _case(np.random.default_rng(3), np.float32, trans)
    fn = jax.jit(
        lambda a, b: grouped_matmul(a, b, offsets, trans_weight=trans, implementation=impl)
    )
    jax.test_util.check_grads(fn, (x, w), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("trans", [False, True])
def test_second_order(impl, trans):
    """Hessian-vector products differentiate the weight-gradient kernel (its
    JVP and transposes are grouped matmuls)."""
    x, w, offsets = _case(np.random.default_rng(8), np.float32, trans)

    def loss(a, b):
        y = grouped_matmul(a, b, offsets, trans_weight=trans, implementation=impl)
        return jnp.sum(jnp.sin(y))

    jax.test_util.check_grads(loss, (x, w), order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)


def test_ffi_lowers_to_the_kernels():
    x, w, offsets = _case(np.random.default_rng(4), np.float32, False)

    def loss(x, w):
        return jnp.sum(grouped_matmul(x, w, offsets, implementation="ffi") ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert text.count("mc2_grouped_matmul_ffi") == 2  # forward and the x gradient
    assert text.count("mc2_grouped_matmul_wgrad_ffi") == 1
    assert "ragged" not in text


def test_vmap():
    rng = np.random.default_rng(5)
    x, w, offsets = _case(rng, np.float32, False)
    xs = np.stack([x, x * 2])
    y = jax.vmap(lambda a: grouped_matmul(a, w, offsets))(xs)
    np.testing.assert_allclose(y[1], 2 * _np_gmm(x, w, offsets, False), rtol=1e-5, atol=1e-5)


def test_invalid_offsets():
    x, w, _ = _case(np.random.default_rng(6), np.float32, False)
    with pytest.raises(TypeError, match=r"group_offsets must be int32 \(G \+ 1,\) = \(5,\)"):
        grouped_matmul(x, w, np.zeros(4, np.int32))
    with pytest.raises(TypeError, match=r"w must be 3-D \(G, k, n\) with k == 6"):
        grouped_matmul(x, w[:, :5], np.zeros(5, np.int32))
    bad = np.array([0, 3, 2, 8, 9], np.int32)
    with pytest.raises(Exception, match="group_offsets must be non-decreasing"):
        jax.block_until_ready(
            jax.jit(
                lambda a, d, o: grouped_matmul_wgrad(a, d, o, transpose_w=False, parallelism=1)
            )(x, np.ones((x.shape[0], 4), np.float32), bad)
        )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_public_grouped_matmul_matches_ragged_dot_layout(impl):
    rng = np.random.default_rng(7)
    x, w, _ = _case(rng, np.float32, False)
    sizes = np.array(SIZES, np.int32)
    got = jax.jit(lambda a, b, g: mc2.grouped_matmul(a, b, g, implementation=impl))(x, w, sizes)
    want = jax.lax.ragged_dot(x, w, sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # sizes past the rows are clipped
    over = np.array([3, 0, 5, 20], np.int32)
    got = mc2.grouped_matmul(x, w, over, implementation=impl)
    want = _np_gmm(x, w, np.array([0, 3, 3, 8, 11], np.int32), False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dw = jax.grad(lambda b: jnp.sum(mc2.grouped_matmul(x, b, sizes, implementation=impl) ** 2))(w)
    dw_ref = jax.grad(lambda b: jnp.sum(jax.lax.ragged_dot(x, b, sizes) ** 2))(w)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="group_sizes must be a 1-D integer array"):
        mc2.grouped_matmul(x, w, np.ones(4, np.float32))
    with pytest.raises(TypeError, match=r"group_sizes must have one size per group of w: \(G,\)"):
        mc2.grouped_matmul(x, w, np.ones(3, np.int32), implementation=impl)
    with pytest.raises(TypeError, match="x dtype must be float16, bfloat16 or float32, got int8"):
        jax.eval_shape(
            lambda a: mc2.grouped_matmul(a, w.astype(np.int8), sizes, implementation=impl),
            jax.ShapeDtypeStruct(x.shape, np.int8),
        )
    # negative sizes are empty groups
    got = mc2.grouped_matmul(x, w, np.array([3, -2, 4, 1], np.int32), implementation=impl)
    want = _np_gmm(x, w, np.array([0, 3, 3, 7, 8], np.int32), False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gemm", ["xla", "blas"])
@pytest.mark.parametrize("dtype", [oracle.BF16, np.float32])
@pytest.mark.parametrize("trans", [False, True])
def test_static_sizes_on_either_gemm(gemm, dtype, trans, monkeypatch):
    """Sizes known while tracing (NumPy): the ffi implementation multiplies
    one group at a time on XLA's GEMM, or runs the C++ kernels; the values
    and both gradients equal NumPy's either way (sizes past the rows
    clipped), and the lowering shows which ran."""
    monkeypatch.setenv("JAX_MC2_GEMM", gemm)
    rng = np.random.default_rng(9)
    x, w, _ = _case(rng, dtype, trans)
    sizes = np.array([3, 0, 5, 20], np.int64)  # the last clipped to the 3 rows left
    offsets = np.array([0, 3, 3, 8, 11])
    dy = rng.standard_normal((x.shape[0], w.shape[1] if trans else w.shape[2])).astype(dtype)

    def f(a, b):
        return mc2.grouped_matmul(a, b, sizes, trans_weight=trans, implementation="ffi")

    y, vjp = jax.vjp(jax.jit(f), x, w)
    dx, dw = jax.jit(vjp)(dy)
    tol = 1.6e-2 if dtype == oracle.BF16 else 1e-5
    for got, want in (
        (y, _np_gmm(x, w, offsets, trans)),
        (dx, _np_gmm(dy, w, offsets, not trans)),
        (dw, _np_wgrad(x, dy, offsets, trans)),
    ):
        want = want.astype(dtype).astype(np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)
    text = jax.jit(lambda a, b, d: jax.vjp(f, a, b)[1](d)).lower(x, w, dy).as_text()
    kernels = text.count("mc2_grouped_matmul_ffi") + text.count("mc2_grouped_matmul_wgrad_ffi")
    assert kernels == (0 if gemm == "xla" else 2)
    # traced sizes keep the kernels on either GEMM
    traced = jax.jit(
        lambda a, b, g: mc2.grouped_matmul(a, b, g, trans_weight=trans, implementation="ffi")
    )
    assert "mc2_grouped_matmul_ffi" in traced.lower(x, w, sizes).as_text()


@pytest.mark.slow
def test_static_sizes_second_order_on_xla_gemm(monkeypatch):
    """Hessian-vector products with static sizes on XLA's GEMM (the weight
    gradient's JVP and transposes carry the sizes)."""
    monkeypatch.setenv("JAX_MC2_GEMM", "xla")
    x, w, _ = _case(np.random.default_rng(10), np.float32, False)

    def loss(a, b):
        return jnp.sum(jnp.sin(mc2.grouped_matmul(a, b, np.array(SIZES), implementation="ffi")))

    jax.test_util.check_grads(loss, (x, w), order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)


def test_static_sizes_are_checked():
    x, w, offsets = _case(np.random.default_rng(11), np.float32, False)
    with pytest.raises(ValueError, match=r"static_sizes must hold G = 4 sizes >= 0 summing"):
        grouped_matmul(x, w, offsets, static_sizes=((3, 0, 5),))
    with pytest.raises(ValueError, match=r"at most the 11 rows per rank, got \(9, 0, 5, 1\)"):
        grouped_matmul(x, w, offsets, static_sizes=((9, 0, 5, 1),))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_non_finite_weight_stays_in_its_group(impl):
    """An inf in expert 0's weight reaches only expert 0's rows (lax.ragged_dot
    on CPU would spread NaN = 0 * inf into every row); rows past the groups
    stay 0."""
    x = np.ones((5, 2), np.float32)
    w = np.ones((2, 2, 2), np.float32)
    w[0, 0, 0] = np.inf
    got = np.asarray(mc2.grouped_matmul(x, w, np.array([2, 2], np.int32), implementation=impl))
    want = np.array([[np.inf, 2], [np.inf, 2], [2, 2], [2, 2], [0, 0]], np.float32)
    np.testing.assert_array_equal(got, want)
    batched = jax.vmap(lambda a: mc2.grouped_matmul(a, w, np.array([2, 2]), implementation=impl))
    np.testing.assert_array_equal(np.asarray(batched(np.stack([x, x]))[1]), want)
