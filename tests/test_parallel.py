"""The tensor-parallel wrappers: global arrays in, bias added exactly once."""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from conftest import IMPLEMENTATIONS, make_mesh

import jax_mc2 as mc2


def _rand(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "mesh_shape,names,data_axis",
    [((8,), ("tp",), None), ((2, 4), ("dp", "tp"), "dp"), ((4, 2), ("dp", "tp"), "dp")],
)
@pytest.mark.parametrize("x_rank", [2, 3])
def test_row_parallel_linear(impl, mesh_shape, names, data_axis, x_rank):
    rng = np.random.default_rng(0)
    mesh = make_mesh(mesh_shape, names)
    x = _rand(rng, (8, 64) if x_rank == 2 else (4, 2, 64))
    w = _rand(rng, (64, 24), scale=0.2)
    b = _rand(rng, (24,))
    out = jax.jit(
        lambda x, w, b: mc2.parallel.row_parallel_linear(
            x, w, mesh=mesh, axis="tp", bias=b, data_axis=data_axis, implementation=impl
        )
    )(x, w, b)
    np.testing.assert_allclose(np.asarray(out), x @ w + b, atol=1e-4)
    out_t = mc2.parallel.row_parallel_linear(
        x, w.T, mesh=mesh, axis="tp", transpose_w=True, implementation=impl
    )
    np.testing.assert_allclose(np.asarray(out_t), x @ w, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
def test_row_parallel_linear_add_rms_norm(impl, inplace, dtype):
    rng = np.random.default_rng(1)
    mesh = make_mesh((2, 4), ("dp", "tp"))
    x = _rand(rng, (4, 3, 64), dtype)
    w = _rand(rng, (64, 32), dtype, 0.2)
    residual = _rand(rng, (4, 3, 32), dtype)
    gamma = _rand(rng, (32,), dtype)
    b = _rand(rng, (32,), dtype)
    y, norm = mc2.parallel.row_parallel_linear_add_rms_norm(
        x,
        w,
        residual,
        gamma,
        mesh=mesh,
        axis="tp",
        bias=b,
        data_axis="dp",
        inplace=inplace,
        implementation=impl,
    )
    # The same math with the bias once: four per-rank partial products (the
    # first rank adds the bias), summed, rounded, then add + RMSNorm.
    xs = [x[..., r * 16 : (r + 1) * 16] for r in range(4)]
    ws = [w[r * 16 : (r + 1) * 16] for r in range(4)]
    mm = oracle.mm_all_reduce_base(xs, ws, [b, None, None, None]).astype(dtype)
    want_y, want_norm = oracle.add_rms_norm(mm, residual, gamma, 1e-6)
    for got, want in ((y, want_y), (norm, want_norm)):
        tol = oracle.tolerance(dtype, 4, scale=np.abs(want).max(initial=0) + 1)
        np.testing.assert_allclose(np.asarray(got).astype(np.float64), want, atol=tol)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_row_parallel_linear_add_rms_norm_2d_x(impl):
    """A 2-D x [m, k] takes a residual [b, s, n] with b * s == m; data_axis
    splits x's rows and residual's b alike."""
    rng = np.random.default_rng(3)
    mesh = make_mesh((2, 2), ("dp", "tp"))
    x = _rand(rng, (8, 32), np.float16)
    w = _rand(rng, (32, 16), np.float16, 0.2)
    residual = _rand(rng, (4, 2, 16), np.float16)
    gamma = _rand(rng, (16,), np.float16)
    y, norm = mc2.parallel.row_parallel_linear_add_rms_norm(
        x, w, residual, gamma, mesh=mesh, axis="tp", data_axis="dp", implementation=impl
    )
    xs = [x[:, r * 16 : (r + 1) * 16] for r in range(2)]
    ws = [w[r * 16 : (r + 1) * 16] for r in range(2)]
    mm = oracle.mm_all_reduce_base(xs, ws, [None, None]).astype(np.float16)
    want_y, want_norm = oracle.add_rms_norm(mm.reshape(4, 2, 16), residual, gamma, 1e-6)
    for got, want in ((y, want_y), (norm, want_norm)):
        assert got.shape == (4, 2, 16)
        tol = oracle.tolerance(np.float16, 2, scale=np.abs(want).max(initial=0) + 1)
        np.testing.assert_allclose(np.asarray(got).astype(np.float64), want, atol=tol)
    with pytest.raises(TypeError, match=r"residual must be 3-D \(b, s, n\) with b \* s == m == 8"):
        mc2.parallel.row_parallel_linear_add_rms_norm(
            x, w, residual.reshape(8, 16), gamma, mesh=mesh, axis="tp"
        )
    with pytest.raises(
        ValueError, match=r"residual.shape\[0\] = 1 must be a multiple of the 2 ranks of data_axis"
    ):
        mc2.parallel.row_parallel_linear_add_rms_norm(
            x, w, residual.reshape(1, 8, 16), gamma, mesh=mesh, axis="tp", data_axis="dp"
        )


def test_wrapper_errors():
    mesh = make_mesh((2, 4), ("dp", "tp"))
    x, w = np.ones((8, 16), np.float32), np.ones((16, 4), np.float32)
    with pytest.raises(ValueError, match=r"row_parallel_linear: mesh has no axis 'model'"):
        mc2.parallel.row_parallel_linear(x, w, mesh=mesh, axis="model")
    with pytest.raises(ValueError, match=r"mesh has no axis 'data'"):
        mc2.parallel.row_parallel_linear(x, w, mesh=mesh, axis="tp", data_axis="data")
    with pytest.raises(ValueError, match="quant must be None or jax_mc2.parallel.W8A8"):
        mc2.parallel.row_parallel_linear(x, w, mesh=mesh, axis="tp", quant="w8a8")
    with pytest.raises(ValueError, match="W8A8.out_dtype must be float16 or bfloat16, got float32"):
        mc2.parallel.row_parallel_linear(
            x, w, mesh=mesh, axis="tp", quant=mc2.parallel.W8A8(np.ones(4), np.float32)
        )
    with pytest.raises(TypeError, match="bias must be a float array with quant=W8A8, .*got int32"):
        mc2.parallel.row_parallel_linear(
            x,
            w,
            mesh=mesh,
            axis="tp",
            bias=np.ones(4, np.int32),
            quant=mc2.parallel.W8A8(np.ones(4)),
        )
    with pytest.raises(TypeError, match=r"x must be 2-D \(m, k\) or 3-D \(b, s, k\)"):
        mc2.parallel.row_parallel_linear(np.ones(16, np.float32), w, mesh=mesh, axis="tp")


@pytest.mark.slow
def test_wrapper_grads_match_dense():
    rng = np.random.default_rng(2)
    mesh = make_mesh((2, 4), ("dp", "tp"))
    x = _rand(rng, (4, 3, 32))
    w = _rand(rng, (32, 8), scale=0.3)
    residual = _rand(rng, (4, 3, 8))
    gamma = _rand(rng, (8,))
    b = _rand(rng, (8,))

    def loss(x, w, residual, gamma, b):
        y, norm = mc2.parallel.row_parallel_linear_add_rms_norm(
            x, w, residual, gamma, mesh=mesh, axis="tp", bias=b, data_axis="dp"
        )
        out = mc2.parallel.row_parallel_linear(
            norm, jnp.eye(8, dtype=norm.dtype), mesh=mesh, axis="tp", data_axis="dp"
        )
        return jnp.sum(jnp.sin(out)) + 0.1 * jnp.sum(y * y)

    def loss_ref(x, w, residual, gamma, b):
        y = x @ w + b + residual
        norm = y / jnp.sqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6) * gamma
        return jnp.sum(jnp.sin(norm)) + 0.1 * jnp.sum(y * y)

    args = (x, w, residual, gamma, b)
    got = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*args)
    want = jax.grad(loss_ref, argnums=tuple(range(5)))(*args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-4, rtol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
def test_row_parallel_linear_w8a8(impl, dtype):
    rng = np.random.default_rng(6)
    mesh = make_mesh((2, 4), ("dp", "tp"))
    x = _rand(rng, (4, 3, 128), dtype)
    w = _rand(rng, (128, 16), np.float32, 0.1)
    wq, ws = mc2.parallel.quantize_weight_int8(w)
    wq, ws = np.asarray(wq), np.asarray(ws)
    np.testing.assert_array_equal(wq, np.clip(np.round(w / (np.abs(w).max(0) / 127)), -127, 127))
    b = _rand(rng, (16,), np.float32)
    out = mc2.parallel.row_parallel_linear(
        x,
        wq,
        mesh=mesh,
        axis="tp",
        bias=b,
        data_axis="dp",
        quant=mc2.parallel.W8A8(ws, out_dtype=dtype),
        implementation=impl,
    )
    assert out.dtype == dtype and out.shape == (4, 3, 16)
    # NumPy model: each tp rank quantizes its k-slice of x per token, the
    # int8 partial products are dequantized by the weight and token scales,
    # rounded to the dtype, and summed.
    scale = ws.astype(oracle.BF16 if dtype == oracle.BF16 else np.float32).astype(np.float32)
    want = 0
    for r in range(4):
        xr = x[..., r * 32 : (r + 1) * 32].astype(np.float32).reshape(-1, 32)
        t = np.abs(xr).max(-1) / np.float32(127)
        q = np.clip(np.round(xr / t[:, None]), -127, 127)
        acc = q @ wq[r * 32 : (r + 1) * 32].astype(np.float64)
        part = (acc.astype(np.float32) * scale * t[:, None]).astype(dtype)
        want = want + part.astype(np.float64)
    # The float bias once, added to the reduced result in the output dtype.
    want = want.astype(dtype).astype(np.float64) + b.astype(dtype).astype(np.float64)
    want = want.reshape(4, 3, 16)
    tol = oracle.tolerance(dtype, 4, scale=np.abs(want).max() + 1)
    np.testing.assert_allclose(np.asarray(out).astype(np.float64), want, atol=tol)
    # And close to the float product.
    ref = x.astype(np.float32) @ w + b
    assert np.abs(np.asarray(out, np.float32) - ref).max() <= 0.03 * np.abs(ref).max()
