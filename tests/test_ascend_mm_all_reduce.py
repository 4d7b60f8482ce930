"""implementation="ascend" of mm_all_reduce_base (aclnnMatmulAllReduce / V2)
through the CANN test double: values against the NumPy oracle on 1/2/4/8
devices, the lowered text, eval_shape, jit, vmap and gradients."""

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401
import numpy as np
import oracle
import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P
from test_mm_all_reduce import _assert_close, _case, _oracle_sharded, _sharded_mm

import jax_mc2 as mc2

DTYPES = (np.float16, oracle.BF16)
_dt = {"ids": lambda d: np.dtype(d).name}


@pytest.mark.parametrize("dtype", DTYPES, **_dt)
@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("x3d", [False, True], ids=["x1_2d", "x1_3d"])
@pytest.mark.parametrize("transpose_x2", [False, True])
def test_values_sharded(dtype, world, x3d, transpose_x2):
    rng = np.random.default_rng(world * 10 + x3d)
    x1, x2, bias, x3 = _case(rng, world, dtype, x3d=x3d, transpose_x2=transpose_x2)
    for with_bias, with_x3 in [(False, False), (True, True), (True, False)]:
        f = _sharded_mm(
            world,
            "ascend",
            x3d=x3d,
            transpose_x2=transpose_x2,
            with_bias=with_bias,
            with_x3=with_x3,
        )
        got = f(x1, x2, bias, x3)
        assert got.dtype == dtype and got.shape == x1.shape[:-1] + (20,)
        want = _oracle_sharded(
            x1, x2, bias, x3, world, transpose_x2=transpose_x2, with_bias=with_bias, with_x3=with_x3
        )
        _assert_close(got, want, dtype, world, x1.shape[-1] // world)


@pytest.mark.parametrize("dtype", DTYPES, **_dt)
def test_single_device_eager_and_jit(dtype):
    rng = np.random.default_rng(1)
    x1, x2, bias, x3 = _case(rng, 1, dtype, x3d=False, transpose_x2=False, k_local=40)
    want = oracle.mm_all_reduce_base([x1], [x2], [bias], [x3])
    got = mc2.mm_all_reduce_base(x1, x2, None, bias=bias, x3=x3, implementation="ascend")
    _assert_close(got, want, dtype, 1, x1.shape[-1])
    f = jax.jit(
        lambda a, b, c, d: mc2.mm_all_reduce_base(a, b, None, bias=c, x3=d, implementation="ascend")
    )
    _assert_close(f(x1, x2, bias, x3), want, dtype, 1, x1.shape[-1])


def _lowered(world, *, with_x3):
    f = _sharded_mm(world, "ascend", x3d=False, transpose_x2=False, with_bias=True, with_x3=with_x3)
    x1, x2, bias, x3 = _case(
        np.random.default_rng(0), world, oracle.BF16, x3d=False, transpose_x2=False
    )
    return f.lower(x1, x2, bias, x3).as_text()


def test_lowering_is_one_custom_call_and_no_collective():
    text = _lowered(4, with_x3=False)
    assert text.count("mc2_ascend_host_bridge") == 1
    assert "aclnnMatmulAllReduce" in text and "aclnnMatmulAllReduceV2" not in text
    for collective in (
        "all_reduce",
        "all_gather",
        "all_to_all",
        "reduce_scatter",
        "collective_permute",
    ):
        assert f"stablehlo.{collective}" not in text
    assert "aclnnMatmulAllReduceV2" in _lowered(4, with_x3=True)


def test_eval_shape_and_vma():
    x1 = jax.ShapeDtypeStruct((8, 16), jnp.bfloat16)
    x2 = jax.ShapeDtypeStruct((16, 4), jnp.bfloat16)
    out = jax.eval_shape(
        lambda a, b: mc2.mm_all_reduce_base(a, b, None, implementation="ascend"), x1, x2
    )
    assert out.shape == (8, 4) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("with_x3", [False, True], ids=["v1", "v2_x3"])
def test_float32_is_refused_at_lowering(with_x3):
    """The 'generic' target accepts float32 (for xla / ffi) but CANN's matmul
    kernels take fp16/bf16 only: the ascend lowering refuses it, naming the
    operator, the argument and the aclnn function, before any CANN call."""
    x = jnp.ones((4, 8), jnp.float32)
    w = jnp.ones((8, 4), jnp.float32)
    x3 = jnp.ones((4, 4), jnp.float32) if with_x3 else None
    function = "aclnnMatmulAllReduceV2" if with_x3 else "aclnnMatmulAllReduce"
    f = jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None, x3=x3, implementation="ascend"))
    assert jax.eval_shape(f, x, w).dtype == jnp.float32  # abstract evaluation accepts it
    with pytest.raises(
        NotImplementedError,
        match=rf"^mm_all_reduce_base: implementation='ascend' takes x1 as float16 or bfloat16 "
        rf"\({function} has no float32 kernel\), got float32\(4, 8\)",
    ):
        f.lower(x, w)
    with pytest.raises(NotImplementedError, match="takes x1 as float16 or bfloat16"):
        mc2.mm_all_reduce_base(x, w, None, x3=x3, implementation="ascend")  # eager, too


def test_vmap():
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal((3, 6, 16)).astype(np.float16)
    x2 = (rng.standard_normal((16, 8)) * 0.5).astype(np.float16)
    got = jax.vmap(lambda a: mc2.mm_all_reduce_base(a, x2, None, implementation="ascend"))(x1)
    want = np.stack([oracle.mm_all_reduce_base([x1[i]], [x2]) for i in range(3)])
    _assert_close(got, want, np.float16, 1, x1.shape[-1])


def test_grad_sharded_matches_ffi():
    world = 2
    mesh = make_mesh((world,), ("tp",))
    rng = np.random.default_rng(9)
    x1 = rng.standard_normal((8, 32)).astype(oracle.BF16)
    x2 = (rng.standard_normal((32, 8)) * 0.5).astype(oracle.BF16)

    def loss(impl):
        def inner(a, b):
            y = mc2.mm_all_reduce_base(a, b, "tp", implementation=impl)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        f = jax.shard_map(
            lambda a, b: inner(a, b),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None)),
            out_specs=P(),
        )
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    ga = loss("ascend")(x1, x2)
    gf = loss("ffi")(x1, x2)
    for a, b in zip(ga, gf):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-1
        )


@pytest.mark.parametrize("axes", [("tp",), ("dp", "tp")])
def test_sub_groups_of_a_dp_x_tp_mesh(axes):
    """One communicator per tp group inside dp x tp (or one over both axes)."""
    mesh = make_mesh((2, 4), ("dp", "tp"))
    rng = np.random.default_rng(11)
    x1 = rng.standard_normal((2, 6, 64)).astype(oracle.BF16)  # dp-batched rows
    x2 = (rng.standard_normal((64, 8)) * 0.5).astype(oracle.BF16)
    k_spec = axes if len(axes) > 1 else "tp"

    def f(a, b):
        return mc2.mm_all_reduce_base(a[0], b, axes, implementation="ascend")[None]

    in_specs = (P("dp", None, k_spec), P(k_spec, None))
    if len(axes) > 1:
        in_specs = (P(None, None, k_spec), P(k_spec, None))
    g = jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=P("dp") if len(axes) == 1 else P())
    )
    got = np.asarray(g(x1, x2), np.float64)
    text = g.lower(x1, x2).as_text()
    assert text.count("mc2_ascend_host_bridge") == 1 and "stablehlo.all_reduce" not in text
    world = 4 if len(axes) == 1 else 8
    kl = 64 // world
    for d in range(got.shape[0]):
        xs = x1[d] if len(axes) == 1 else x1[0]
        want = oracle.mm_all_reduce_base(
            [xs[:, r * kl : (r + 1) * kl] for r in range(world)],
            [x2[r * kl : (r + 1) * kl] for r in range(world)],
        )
        _assert_close(got[d], want, oracle.BF16, world, kl)
