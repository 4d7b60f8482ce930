"""implementation="ascend" of matmul_all_reduce_add_rms_norm and its in-place
variant (aclnnMatmulAllReduceAddRmsNorm / aclnnInplaceMatmulAllReduceAddRmsNorm)
through the CANN test double, against the NumPy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P
from test_add_rms_norm import OPS, _case, _check, _oracle

import jax_mc2 as mc2

DTYPES = (np.float16, oracle.BF16)


def _fn(variant, world, *, x3d, transpose_x2, with_bias, donate=False):
    mesh = make_mesh((world,), ("tp",))
    x_spec = P(None, None, "tp") if x3d else P(None, "tp")
    w_spec = P(None, "tp") if transpose_x2 else P("tp", None)

    def f(x1, x2, r, g, b):
        return OPS[variant](
            x1,
            x2,
            r,
            g,
            "tp",
            bias=b if with_bias else None,
            epsilon=1e-5,
            transpose_x2=transpose_x2,
            implementation="ascend",
        )

    return jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=(x_spec, w_spec, P(), P(), P()), out_specs=(P(), P())),
        donate_argnums=(2,) if donate else (),
    )


@pytest.mark.parametrize("variant", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_values_sharded(variant, dtype, world):
    rng = np.random.default_rng(world)
    x3d = world in (1, 4)
    transpose_x2 = world in (2, 4)
    x1, x2, residual, gamma, bias = _case(rng, world, dtype, x3d=x3d, transpose_x2=transpose_x2)
    for with_bias in (False, True):
        fn = _fn(variant, world, x3d=x3d, transpose_x2=transpose_x2, with_bias=with_bias)
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


@pytest.mark.parametrize("variant", OPS)
def test_single_device_no_axis(variant):
    rng = np.random.default_rng(1)
    x1, x2, residual, gamma, bias = _case(rng, 1, np.float16, x3d=False, transpose_x2=False)
    got = OPS[variant](x1, x2, residual, gamma, None, bias=bias, implementation="ascend")
    want = _oracle(x1, x2, residual, gamma, bias, 1, transpose_x2=False, epsilon=1e-6)
    _check(got, want, np.float16, 1)


def test_inplace_aliases_residual_onto_y():
    fn = _fn("inplace", 2, x3d=False, transpose_x2=False, with_bias=False, donate=True)
    rng = np.random.default_rng(4)
    x1, x2, residual, gamma, bias = _case(rng, 2, oracle.BF16, x3d=False, transpose_x2=False)
    text = fn.lower(x1, x2, residual, gamma, bias).as_text()
    assert text.count("mc2_ascend_host_bridge") == 1
    assert "aclnnInplaceMatmulAllReduceAddRmsNorm" in text
    assert "stablehlo.all_reduce" not in text
    assert "output_operand_aliases" in text
    want = _oracle(x1, x2, residual, gamma, None, 2, transpose_x2=False, epsilon=1e-5)
    y, norm_out = fn(x1, x2, jnp.asarray(residual), gamma, bias)
    _check((y, norm_out), want, oracle.BF16, 2)


def test_plain_lowering():
    fn = _fn("plain", 4, x3d=True, transpose_x2=True, with_bias=True)
    x1, x2, residual, gamma, bias = _case(
        np.random.default_rng(0), 4, np.float16, x3d=True, transpose_x2=True
    )
    text = fn.lower(x1, x2, residual, gamma, bias).as_text()
    assert text.count("mc2_ascend_host_bridge") == 1
    assert "aclnnMatmulAllReduceAddRmsNorm" in text and "stablehlo.all_reduce" not in text


@pytest.mark.parametrize(
    "variant, function",
    [
        ("plain", "aclnnMatmulAllReduceAddRmsNorm"),
        ("inplace", "aclnnInplaceMatmulAllReduceAddRmsNorm"),
    ],
)
def test_float32_is_refused_at_lowering(variant, function):
    """float32 passes abstract evaluation under the 'generic' target, but
    CANN's kernels take fp16/bf16 only: the ascend lowering refuses it."""
    fn = _fn(variant, 2, x3d=False, transpose_x2=False, with_bias=True)
    args = _case(np.random.default_rng(0), 2, np.float32, x3d=False, transpose_x2=False)
    op = OPS[variant].__name__
    with pytest.raises(
        NotImplementedError,
        match=rf"^{op}: implementation='ascend' takes x1 as float16 or bfloat16 \({function} "
        r"has no float32 kernel\), got float32\(12, 16\)",
    ):
        fn.lower(*args)


def test_grad_matches_ffi():
    world = 2
    mesh = make_mesh((world,), ("tp",))
    rng = np.random.default_rng(3)
    x1, x2, residual, gamma, bias = _case(rng, world, np.float16, x3d=False, transpose_x2=False)

    def grads(impl):
        def loss(a, b, r, g):
            y, n = mc2.matmul_all_reduce_add_rms_norm(a, b, r, g, "tp", implementation=impl)
            return jnp.sum(n.astype(jnp.float32) ** 2) + jnp.sum(y.astype(jnp.float32))

        f = jax.shard_map(
            loss, mesh=mesh, in_specs=(P(None, "tp"), P("tp", None), P(), P()), out_specs=P()
        )
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x1, x2, residual, gamma)

    for a, b in zip(grads("ascend"), grads("ffi")):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=3e-2, atol=3e-1
        )
