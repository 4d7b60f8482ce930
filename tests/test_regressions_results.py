"""Regression tests for silent wrong results: each input here once produced a
wrong value (or an internal error on one implementation only) without any
error; xla and ffi must agree with the documented semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMPLEMENTATIONS

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
