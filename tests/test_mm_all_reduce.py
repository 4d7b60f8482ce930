"""mm_all_reduce_base (non-quantized) against the NumPy oracle, both
implementations, 1/2/4/8 devices, and its JAX transformations."""

import functools

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401  (check_grads)
import numpy as np
import oracle
import pytest
from conftest import IMPLEMENTATIONS, make_mesh, slow
from hlo import reductions
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2

DTYPES = (np.float16, oracle.BF16, np.float32)


def _rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _sharded_mm(world, impl, *, x3d, transpose_x2, with_bias, with_x3, comm_turn=0):
    """A jitted shard_map of mm_all_reduce_base over a (world,) 'tp' mesh."""
    mesh = make_mesh((world,), ("tp",))
    x_spec = P(None, None, "tp") if x3d else P(None, "tp")
    w_spec = P(None, "tp") if transpose_x2 else P("tp", None)
    out_spec = P(None, None, None) if x3d else P(None, None)

    def f(x1, x2, bias, x3):
        return mc2.mm_all_reduce_base(
            x1,
            x2,
            "tp",
            bias=bias if with_bias else None,
            x3=x3 if with_x3 else None,
            transpose_x2=transpose_x2,
            comm_turn=comm_turn,
            implementation=impl,
        )

    return jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=(x_spec, w_spec, P(), P()), out_specs=out_spec)
    )


def _case(rng, world, dtype, *, x3d, transpose_x2, m=24, k_local=16, n=20):
    k = k_local * world
    x1 = _rand(rng, (2, m // 2, k) if x3d else (m, k), dtype)
    x2 = _rand(rng, (n, k) if transpose_x2 else (k, n), dtype, 0.5)
    bias = _rand(rng, (n,), dtype)
    x3 = _rand(rng, x1.shape[:-1] + (n,), dtype)
    return x1, x2, bias, x3


def _oracle_sharded(x1, x2, bias, x3, world, *, transpose_x2, with_bias, with_x3):
    k_local = x1.shape[-1] // world
    x1s = [x1[..., r * k_local : (r + 1) * k_local] for r in range(world)]
    x2s = [
        (
            x2[:, r * k_local : (r + 1) * k_local]
            if transpose_x2
            else x2[r * k_local : (r + 1) * k_local]
        )
        for r in range(world)
    ]
    return oracle.mm_all_reduce_base(
        x1s,
        x2s,
        [bias] * world if with_bias else None,
        [x3] * world if with_x3 else None,
        transpose_x2=transpose_x2,
    )


def _assert_close(got, want, dtype, world, k):
    got = np.asarray(got).astype(np.float64)
    # k: the dot products' length (each rank's k_local, + bias + x3), for
    # the fp32 accumulation-order term of the bound.
    tol = oracle.tolerance(dtype, world, scale=np.abs(want).max(initial=0) + 1, k=k + 2)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("x3d", [False, True], ids=["x1_2d", "x1_3d"])
def test_values_sharded(impl, dtype, world, x3d):
    rng = np.random.default_rng(world * 10 + x3d)
    transpose_x2 = world % 4 == 0  # cover both layouts across the grid
    x1, x2, bias, x3 = _case(rng, world, dtype, x3d=x3d, transpose_x2=transpose_x2)
    for with_bias, with_x3 in [(False, False), (True, True)]:
        f = _sharded_mm(
            world, impl, x3d=x3d, transpose_x2=transpose_x2, with_bias=with_bias, with_x3=with_x3
        )
        got = f(x1, x2, bias, x3)
        assert got.dtype == dtype and got.shape == x1.shape[:-1] + (20,)
        want = _oracle_sharded(
            x1, x2, bias, x3, world, transpose_x2=transpose_x2, with_bias=with_bias, with_x3=with_x3
        )
        _assert_close(got, want, dtype, world, x1.shape[-1] // world)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("transpose_x2", [False, True])
@pytest.mark.parametrize(
    "with_bias,with_x3", [(False, False), (True, False), (False, True), (True, True)]
)
def test_values_single_device(impl, dtype, transpose_x2, with_bias, with_x3):
    rng = np.random.default_rng(7)
    x1, x2, bias, x3 = _case(rng, 1, dtype, x3d=False, transpose_x2=transpose_x2, k_local=40)
    got = mc2.mm_all_reduce_base(
        x1,
        x2,
        None,
        bias=bias if with_bias else None,
        x3=x3 if with_x3 else None,
        transpose_x2=transpose_x2,
        implementation=impl,
    )
    want = oracle.mm_all_reduce_base(
        [x1],
        [x2],
        [bias] if with_bias else None,
        [x3] if with_x3 else None,
        transpose_x2=transpose_x2,
    )
    _assert_close(got, want, dtype, 1, x1.shape[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_ffi_and_xla_agree_bitwise_on_one_device(dtype):
    # Same fp32 accumulation and one rounding: only the order of the fp32
    # dot product may differ, so compare at fp32 resolution before rounding.
    rng = np.random.default_rng(3)
    x1, x2, bias, x3 = _case(rng, 1, dtype, x3d=True, transpose_x2=False)
    a = mc2.mm_all_reduce_base(x1, x2, None, bias=bias, x3=x3, implementation="ffi")
    b = mc2.mm_all_reduce_base(x1, x2, None, bias=bias, x3=x3, implementation="xla")
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    ulp = (
        np.abs(np.asarray(b, np.float64))
        * {np.dtype(np.float16): 2**-10, oracle.BF16: 2**-7, np.dtype(np.float32): 2**-22}[
            np.dtype(dtype)
        ]
    )
    if np.dtype(dtype) == np.dtype(np.float32):
        # No rounding to a narrower dtype hides the order of the fp32 sums:
        # two orders differ by at most k * 2**-24 * sum(|terms|) (BLAS and
        # XLA block k differently on each CPU), which bounds cancellation.
        f64 = [np.asarray(t, np.float64) for t in (x1, x2, bias, x3)]
        terms = np.abs(f64[0]) @ np.abs(f64[1]) + np.abs(f64[2]) + np.abs(f64[3])
        ulp = np.maximum(ulp, x1.shape[-1] * 2**-24 * terms)
    assert np.all(diff <= ulp + 1e-30)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("comm_turn", [slow(1), 3, slow(5), slow(100)])
def test_comm_turn_identical(impl, comm_turn):
    # Small k: one accumulation order; a larger GEMM may sum k in another
    # order for fewer rows (docs/api.md: equal up to that order).
    rng = np.random.default_rng(11)
    x1, x2, bias, x3 = _case(rng, 4, np.float16, x3d=True, transpose_x2=False)
    kwargs = dict(x3d=True, transpose_x2=False, with_bias=True, with_x3=True)
    base = _sharded_mm(4, impl, **kwargs)(x1, x2, bias, x3)
    split = _sharded_mm(4, impl, comm_turn=comm_turn, **kwargs)(x1, x2, bias, x3)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(split))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("comm_turn,chunks", [(0, 1), (1, 1), (3, 3), (5, 5)])
def test_lowered_collectives_and_custom_calls(impl, comm_turn, chunks):
    rng = np.random.default_rng(0)
    x1, x2, bias, x3 = _case(rng, 4, np.float16, x3d=False, transpose_x2=False)
    f = _sharded_mm(
        4, impl, x3d=False, transpose_x2=False, with_bias=True, with_x3=True, comm_turn=comm_turn
    )
    text = f.lower(x1, x2, bias, x3).as_text()
    assert reductions(text) == chunks
    assert text.count("custom_call @mc2_matmul_ffi") == (chunks if impl == "ffi" else 0)
    compiled = f.lower(x1, x2, bias, x3).compile().as_text()
    assert "all-gather" not in compiled
    # The all-reduce communicates in the output dtype (f16), as HCCL does.
    wire = [
        line.split("all-reduce(")[0].split("=")[-1].strip().split("[")[0]
        for line in compiled.splitlines()
        if " all-reduce(" in line
    ]
    assert wire and all("f16" in w for w in wire), wire


def test_eval_shape():
    x1 = jax.ShapeDtypeStruct((4, 128, 512), jnp.bfloat16)
    x2 = jax.ShapeDtypeStruct((64, 512), jnp.bfloat16)
    out = jax.eval_shape(
        functools.partial(mc2.mm_all_reduce_base, axis_name=None, transpose_x2=True), x1, x2
    )
    assert out.shape == (4, 128, 64) and out.dtype == jnp.bfloat16
    mesh = make_mesh((8,), ("tp",))
    f = jax.shard_map(
        lambda a, b: mc2.mm_all_reduce_base(a, b, "tp"),
        mesh=mesh,
        in_specs=(P(None, "tp"), P("tp", None)),
        out_specs=P(),
    )
    out = jax.eval_shape(
        f,
        jax.ShapeDtypeStruct((256, 1024), jnp.float16),
        jax.ShapeDtypeStruct((1024, 32), jnp.float16),
    )
    assert out.shape == (256, 32) and out.dtype == jnp.float16


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vma_typing(impl):
    mesh = make_mesh((2, 4), ("dp", "tp"))
    seen = {}

    def f(x1, x2, bias):
        out = mc2.mm_all_reduce_base(x1, x2, "tp", bias=bias, implementation=impl)
        seen["x1"], seen["out"] = jax.typeof(x1), jax.typeof(out)
        return out

    g = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P("dp", "tp"), P("tp", None), P()),
            out_specs=P("dp", None),
            check_vma=True,
        )
    )
    x1 = np.ones((8, 32), np.float32)
    g(x1, np.ones((32, 4), np.float32), np.zeros(4, np.float32))
    assert str(seen["x1"]) == "float32[4,8]{V:(dp,tp)}"
    assert str(seen["out"]) == "float32[4,4]{V:dp}"
    # Reduced over both axes: invariant everywhere.
    h = jax.jit(
        jax.shard_map(
            lambda a, b: mc2.mm_all_reduce_base(a, b, ("dp", "tp")),
            mesh=mesh,
            in_specs=(P(None, ("dp", "tp")), P(("dp", "tp"), None)),
            out_specs=P(),
            check_vma=True,
        )
    )
    np.testing.assert_allclose(np.asarray(h(x1, np.ones((32, 4), np.float32))), 32.0)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("transpose_x2,comm_turn", [(False, 0), (True, 3)])
def test_grads_sharded(impl, transpose_x2, comm_turn):
    mesh = make_mesh((2, 4), ("dp", "tp"))
    rng = np.random.default_rng(5)
    x1 = _rand(rng, (8, 3, 16), np.float32)
    x2 = _rand(rng, (16, 6), np.float32)
    bias = _rand(rng, (6,), np.float32)
    x3 = _rand(rng, (8, 3, 6), np.float32)

    def f(x1, x2, bias, x3):
        return jax.shard_map(
            lambda a, b, c, d: mc2.mm_all_reduce_base(
                a,
                b.T if transpose_x2 else b,
                "tp",
                bias=c,
                x3=d,
                transpose_x2=transpose_x2,
                comm_turn=comm_turn,
                implementation=impl,
            ),
            mesh=mesh,
            in_specs=(P("dp", None, "tp"), P("tp", None), P(), P("dp")),
            out_specs=P("dp"),
        )(x1, x2, bias, x3)

    jax.test_util.check_grads(
        f, (x1, x2, bias, x3), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2
    )

    def loss(x1, x2, bias, x3):
        return jnp.sum(jnp.sin(f(x1, x2, bias, x3)))

    def loss_ref(x1, x2, bias, x3):
        return jnp.sum(jnp.sin(x1 @ x2 + 4 * bias + 4 * x3))  # bias, x3 on every tp rank

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x1, x2, bias, x3)
    want = jax.grad(loss_ref, argnums=(0, 1, 2, 3))(x1, x2, bias, x3)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
def test_grads_sharded_16_bit(impl, dtype):
    """Gradients in float16 / bfloat16 inside shard_map, against float32
    gradients of the same math (within the 16-bit rounding)."""
    mesh = make_mesh((2, 4), ("dp", "tp"))
    rng = np.random.default_rng(6)
    x1, x2, bias = (_rand(rng, s, np.float32) for s in ((8, 3, 32), (32, 6), (6,)))

    def loss(x1, x2, bias):
        out = jax.shard_map(
            lambda a, b, c: mc2.mm_all_reduce_base(a, b, "tp", bias=c, implementation=impl),
            mesh=mesh,
            in_specs=(P("dp", None, "tp"), P("tp", None), P()),
            out_specs=P("dp"),
        )(x1, x2, bias)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    def loss_ref(x1, x2, bias):
        return jnp.sum((x1 @ x2 + 4 * bias) ** 2)  # the bias on every tp rank

    args16 = tuple(a.astype(dtype) for a in (x1, x2, bias))
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args16)
    want = jax.grad(loss_ref, argnums=(0, 1, 2))(*(a.astype(np.float32) for a in args16))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        b = np.asarray(b)
        np.testing.assert_allclose(
            np.asarray(a, np.float32), b, atol=3e-2 * (np.abs(b).max() + 1), rtol=0
        )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap(impl):
    rng = np.random.default_rng(9)
    x1 = _rand(rng, (3, 5, 8), np.float32)
    x2 = _rand(rng, (8, 4), np.float32)
    x2s = _rand(rng, (3, 8, 4), np.float32)
    x3 = _rand(rng, (3, 5, 4), np.float32)
    mm = functools.partial(mc2.mm_all_reduce_base, axis_name=None, implementation=impl)
    got = jax.vmap(lambda a, c: mm(a, x2, x3=c))(x1, x3)
    np.testing.assert_allclose(np.asarray(got), x1 @ x2 + x3, atol=1e-5)
    got = jax.vmap(lambda a, b: mm(a, b), in_axes=(1, 0))(x1.transpose(1, 0, 2)[:, :3], x2s)
    np.testing.assert_allclose(np.asarray(got), np.einsum("bmk,bkn->bmn", x1[:3], x2s), atol=1e-5)
    got = jax.vmap(jax.vmap(lambda a: mm(a, x2)))(x1[:, :, None, :].repeat(2, 2))
    assert got.shape == (3, 5, 2, 4)
    # vmap inside shard_map: batch over a leading axis of the per-shard data.
    mesh = make_mesh((4,), ("tp",))
    f = jax.jit(
        jax.shard_map(
            jax.vmap(
                lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", implementation=impl),
                in_axes=(0, None),
            ),
            mesh=mesh,
            in_specs=(P(None, None, "tp"), P("tp", None)),
            out_specs=P(),
        )
    )
    xs = _rand(rng, (3, 5, 16), np.float32)
    w = _rand(rng, (16, 4), np.float32)
    np.testing.assert_allclose(np.asarray(f(xs, w)), xs @ w, atol=1e-4)


@pytest.mark.parametrize(
    "op",
    [
        lambda x, w: mc2.mm_all_reduce_base(x, w, "i"),
        lambda x, w: mc2.matmul_all_reduce_add_rms_norm(
            x, w, jnp.ones((1, 3, 2)), jnp.ones(2), ("i",)
        )[1],
    ],
)
def test_vmap_named_axis_refused(op):
    xs, w = np.ones((4, 3, 8), np.float32), np.ones((8, 2), np.float32)
    with pytest.raises(NotImplementedError, match="axis_name 'i' is bound by jax.vmap"):
        jax.vmap(op, in_axes=(0, None), axis_name="i")(xs, w)


def test_unbound_axis_name():
    """An unbound axis is named with the operator and the argument (JAX alone
    says only "unbound axis name: tp")."""
    x = np.ones((4, 8), np.float16)
    with pytest.raises(
        NameError, match=r"^mm_all_reduce_base: axis_name=\('tp',\) .*unbound axis name: tp"
    ):
        mc2.mm_all_reduce_base(x, np.ones((8, 2), np.float16), "tp")
    with pytest.raises(NameError, match=r"^alltoallv_grouped_matmul: axis_name=\('ep',\)"):
        mc2.alltoallv_grouped_matmul(
            np.ones((2, 8), np.float16), np.ones((1, 8, 4), np.float16), "ep",
            send_counts=np.array([2]),
        )  # fmt: skip
    with pytest.raises(NameError, match=r"^exchange_counts: axis_name=\('ep',\)"):
        mc2.exchange_counts(np.array([2]), "ep")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_empty_m_and_n(impl):
    x1 = np.ones((0, 8), np.float16)
    out = mc2.mm_all_reduce_base(x1, np.ones((8, 3), np.float16), None, implementation=impl)
    assert out.shape == (0, 3)
    out = mc2.mm_all_reduce_base(
        np.ones((2, 8), np.float16), np.ones((8, 0), np.float16), None, implementation=impl
    )
    assert out.shape == (2, 0)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 40),
    n=st.integers(1, 40),
    batch=st.sampled_from([None, 1, 3]),
    dtype=st.sampled_from(DTYPES),
    transpose_x2=st.booleans(),
    with_bias=st.booleans(),
    with_x3=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_oracle(
    impl, m, k, n, batch, dtype, transpose_x2, with_bias, with_x3, seed
):
    rng = np.random.default_rng(seed)
    lead = (m,) if batch is None else (batch, m)
    x1 = _rand(rng, (*lead, k), dtype)
    x2 = _rand(rng, (n, k) if transpose_x2 else (k, n), dtype)
    bias = _rand(rng, (n,), dtype) if with_bias else None
    x3 = _rand(rng, (*lead, n), dtype) if with_x3 else None
    got = mc2.mm_all_reduce_base(
        x1, x2, None, bias=bias, x3=x3, transpose_x2=transpose_x2, implementation=impl
    )
    assert got.shape == (*lead, n) and got.dtype == dtype
    want = oracle.mm_all_reduce_base(
        [x1],
        [x2],
        [bias] if with_bias else None,
        [x3] if with_x3 else None,
        transpose_x2=transpose_x2,
    )
    _assert_close(got, want, dtype, 1, x1.shape[-1])
