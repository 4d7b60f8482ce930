"""alltoallv_grouped_matmul and grouped_matmul_alltoallv against the NumPy
model of every rank (tests/ep_oracle.py): static and traced counts, uniform,
random, skewed and zero counts, the shared expert, transposed weights,
permute_out, 1/2/4/8 devices, both implementations, round trips, gradients,
vmap, vma typing and the lowered HLO."""

import functools

import ep_oracle
import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401  (check_grads)
import numpy as np
import oracle
import pytest
from conftest import IMPLEMENTATIONS, make_mesh, slow
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2

TOL = {
    np.dtype(np.float16): dict(rtol=2e-3, atol=2e-3),
    oracle.BF16: dict(rtol=1.6e-2, atol=1.6e-2),
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-5),
}


def count_table(kind, world, experts, rng):
    """A (W, E*W) send-count table of the named kind."""
    g = world * experts
    if kind == "uniform":
        return np.full((world, g), 3)
    if kind == "random":
        return rng.integers(0, 5, size=(world, g))
    if kind == "skewed":
        return ep_oracle.zipf_counts(rng, world, experts, rows=4 * g)
    if kind == "zeros":  # empty experts, and a rank that sends nothing
        t = rng.integers(0, 4, size=(world, g))
        t[:, ::2] = 0
        t[-1] = 0
        if world == 1:
            t[0, 1] = 2
        return t
    raise ValueError(kind)


def _rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _assert_close(got, want, dtype):
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[np.dtype(dtype)]
    )


def _check_padded(got, want, dtype):
    """got [cap, n]: its first rows are want, the rest zero."""
    got = np.asarray(got)
    assert got.shape[0] >= want.shape[0], (got.shape, want.shape)
    _assert_close(got[: want.shape[0]], want, dtype)
    assert not np.asarray(got[want.shape[0] :], np.float32).any()


def _ep_call(world, fn, args, in_specs, n_out):
    mesh = make_mesh((world,), ("ep",))
    return jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=tuple(P("ep") for _ in range(n_out))
        )
    )(*args)


def _dispatch_case(rng, world, experts, table, dtype, *, trans, h1=16, n1=12):
    bsk = int(table.sum(1).max())
    xs = _rand(rng, (world, bsk, h1), dtype)
    shape = (experts, n1, h1) if trans else (experts, h1, n1)
    ws = _rand(rng, (world, *shape), dtype, 0.3)
    return xs, ws


def run_dispatch(
    world,
    impl,
    table,
    xs,
    ws,
    *,
    traced,
    trans=False,
    mm=None,
    permute_out=False,
    trans_mm=False,
    **kwargs,
):
    """Every rank's outputs, stacked: [gmm_y, (mm_y), (permute_out)]."""
    shared = mm is not None
    mm_x, mm_w = mm if shared else (np.zeros((world, 1, 1), xs.dtype), np.zeros((1, 1), xs.dtype))

    def f(x, w, counts, mx, mw):
        y, mm_y, p = mc2.alltoallv_grouped_matmul(
            x[0],
            w[0],
            "ep",
            send_counts=counts[0] if traced else table,
            mm_x=mx[0] if shared else None,
            mm_weight=mw if shared else None,
            trans_gmm_weight=trans,
            trans_mm_weight=trans_mm,
            permute_out_flag=permute_out,
            implementation=impl,
            **kwargs,
        )
        return tuple(o[None] for o in (y, mm_y, p) if o is not None)

    n_out = 1 + shared + permute_out
    specs = (P("ep"), P("ep"), P("ep"), P("ep"), P())
    return _ep_call(world, f, (xs, ws, jnp.asarray(table, jnp.int32), mm_x, mm_w), specs, n_out)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "random", "skewed", "zeros"])
def test_dispatch_matches_oracle(impl, world, kind):
    rng = np.random.default_rng(world * 10 + len(kind))
    experts = 2
    table = count_table(kind, world, experts, rng)
    dtype = np.float16
    xs, ws = _dispatch_case(rng, world, experts, table, dtype, trans=False)
    y, perm = run_dispatch(world, impl, table, xs, ws, traced=False, permute_out=True)
    want = ep_oracle.dispatch(list(xs), list(ws), table, dtype=dtype)
    exact_rows = ep_oracle.recv_table(table, experts).sum(1).max()
    assert y.shape == (world, exact_rows, 12)  # default capacity: the exact maximum
    for r in range(world):
        _check_padded(perm[r], want[r][0], dtype)
        _check_padded(y[r], want[r][1], dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float16, slow(oracle.BF16), slow(np.float32)])
@pytest.mark.parametrize("trans", [False, True])
def test_dispatch_traced_counts_and_shared_expert(impl, dtype, trans):
    world, experts = 4, 3
    rng = np.random.default_rng(7)
    table = count_table("random", world, experts, rng)
    xs, ws = _dispatch_case(rng, world, experts, table, dtype, trans=trans)
    mm_x = _rand(rng, (world, 5, 16), dtype)
    mm_w = _rand(rng, (6, 16) if trans else (16, 6), dtype, 0.3)
    y, mm_y, perm = run_dispatch(
        world,
        impl,
        table,
        xs,
        ws,
        traced=True,
        trans=trans,
        trans_mm=trans,
        mm=(mm_x, mm_w),
        permute_out=True,
    )
    bsk = xs.shape[1]
    assert y.shape == (world, world * bsk, ws.shape[2] if trans else ws.shape[3])
    want = ep_oracle.dispatch(list(xs), list(ws), table, trans=trans, dtype=dtype)
    for r in range(world):
        _check_padded(perm[r], want[r][0], dtype)
        _check_padded(y[r], want[r][1], dtype)
        w = mm_w.astype(np.float64).T if trans else mm_w.astype(np.float64)
        _assert_close(mm_y[r], (mm_x[r].astype(np.float64) @ w).astype(dtype), dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_dispatch_traced_recv_counts_given(impl):
    world, experts = 2, 2
    rng = np.random.default_rng(3)
    table = count_table("random", world, experts, rng)
    recv = ep_oracle.recv_table(table, experts)
    xs, ws = _dispatch_case(rng, world, experts, table, np.float32, trans=False)

    def f(x, w, s, rc):
        y, _, _ = mc2.alltoallv_grouped_matmul(
            x[0],
            w[0],
            "ep",
            send_counts=s[0],
            recv_counts=rc[0],
            max_recv_tokens=20,
            implementation=impl,
        )
        return (y[None],)

    (y,) = _ep_call(world, f, (xs, ws, jnp.asarray(table), jnp.asarray(recv)), (P("ep"),) * 4, 1)
    want = ep_oracle.dispatch(list(xs), list(ws), table, dtype=np.float32)
    assert y.shape == (world, 20, 12)
    for r in range(world):
        _check_padded(y[r], want[r][1], np.float32)


def run_combine(world, impl, table, xs, ws, *, traced, trans=False, mm=None, **kwargs):
    shared = mm is not None
    mm_x, mm_w = mm if shared else (np.zeros((world, 1, 1), xs.dtype), np.zeros((1, 1), xs.dtype))

    def f(x, w, counts, mx, mw):
        y, mm_y = mc2.grouped_matmul_alltoallv(
            x[0],
            w[0],
            "ep",
            send_counts=counts[0] if traced else table,
            mm_x=mx[0] if shared else None,
            mm_weight=mw if shared else None,
            trans_gmm_weight=trans,
            implementation=impl,
            **kwargs,
        )
        return tuple(o[None] for o in (y, mm_y) if o is not None)

    specs = (P("ep"), P("ep"), P("ep"), P("ep"), P())
    return _ep_call(
        world, f, (xs, ws, jnp.asarray(table, jnp.int32), mm_x, mm_w), specs, 1 + shared
    )


def _combine_case(rng, world, experts, table, dtype, *, trans, h1=16, n1=12):
    """Per-rank expert-major inputs with garbage padding rows past A_r."""
    a_cap = int(table.sum(1).max()) + 3
    xs = _rand(rng, (world, a_cap, h1), dtype)
    shape = (experts, n1, h1) if trans else (experts, h1, n1)
    return xs, _rand(rng, (world, *shape), dtype, 0.3)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "random", "skewed", "zeros"])
def test_combine_matches_oracle(impl, world, kind):
    rng = np.random.default_rng(world * 100 + len(kind))
    experts = 2
    table = count_table(kind, world, experts, rng)
    dtype = oracle.BF16
    xs, ws = _combine_case(rng, world, experts, table, dtype, trans=False)
    (y,) = run_combine(world, impl, table, xs, ws, traced=False)
    want = ep_oracle.combine(list(xs), list(ws), table, dtype=dtype)
    for r in range(world):
        _check_padded(y[r], want[r], dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("trans", [False, True])
def test_combine_traced_counts_and_shared_expert(impl, trans):
    world, experts = 4, 2
    dtype = np.float16
    rng = np.random.default_rng(11)
    table = count_table("skewed", world, experts, rng)
    xs, ws = _combine_case(rng, world, experts, table, dtype, trans=trans)
    mm_x = _rand(rng, (world, 3, 16), dtype)
    mm_w = _rand(rng, (16, 4), dtype, 0.3)
    cap = int(ep_oracle.recv_table(table, experts).sum(1).max()) + 5
    y, mm_y = run_combine(
        world, impl, table, xs, ws, traced=True, trans=trans, mm=(mm_x, mm_w), max_out_tokens=cap
    )
    want = ep_oracle.combine(list(xs), list(ws), table, trans=trans, dtype=dtype)
    assert y.shape[1] == cap
    for r in range(world):
        _check_padded(y[r], want[r], dtype)
        _assert_close(mm_y[r], (mm_x[r].astype(np.float64) @ mm_w).astype(dtype), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("world", [2, 8])
def test_dispatch_then_combine_returns_input_order(impl, traced, world):
    experts, h = 2, 8
    rng = np.random.default_rng(world)
    table = count_table("random", world, experts, rng)
    recv = ep_oracle.recv_table(table, experts)
    bsk = int(table.sum(1).max())
    xs = rng.integers(-8, 8, size=(world, bsk, h)).astype(np.float32)
    eye = np.broadcast_to(np.eye(h, dtype=np.float32), (world, experts, h, h))

    def f(x, w, s, rc):
        sc = s[0] if traced else table
        rcv = rc[0] if traced else recv
        y, _, _ = mc2.alltoallv_grouped_matmul(
            x[0], w[0], "ep", send_counts=sc, implementation=impl
        )
        back, _ = mc2.grouped_matmul_alltoallv(
            y, w[0], "ep", send_counts=rcv, recv_counts=sc, max_out_tokens=bsk, implementation=impl
        )
        return (back[None],)

    (back,) = _ep_call(
        world, f, (xs, eye, jnp.asarray(table), jnp.asarray(recv)), (P("ep"),) * 4, 1
    )
    for r in range(world):
        n = table[r].sum()
        np.testing.assert_array_equal(back[r][:n], xs[r][:n])
        assert not back[r][n:].any()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_traced_capacity_drops_rows_past_it(impl):
    """A chunk keeps its first max_tokens_per_peer rows; combine drops the
    same rows, so dispatch + combine returns exactly the kept rows."""
    world, experts, h, cap = 4, 2, 8, 3
    rng = np.random.default_rng(5)
    table = count_table("random", world, experts, rng) + 1
    bsk = int(table.sum(1).max())
    xs = rng.integers(-8, 8, size=(world, bsk, h)).astype(np.float32)
    eye = np.broadcast_to(np.eye(h, dtype=np.float32), (world, experts, h, h))

    def f(x, w, s):
        y, _, _ = mc2.alltoallv_grouped_matmul(
            x[0], w[0], "ep", send_counts=s[0], max_tokens_per_peer=cap, implementation=impl
        )
        rc = mc2.exchange_counts(s[0], ("ep",))
        back, _ = mc2.grouped_matmul_alltoallv(
            y,
            w[0],
            "ep",
            send_counts=rc,
            recv_counts=s[0],
            max_tokens_per_peer=cap,
            max_out_tokens=bsk,
            implementation=impl,
        )
        return y[None], back[None]

    y, back = _ep_call(world, f, (xs, eye, jnp.asarray(table)), (P("ep"),) * 3, 2)
    assert y.shape == (world, world * cap, h)
    kept_table = np.zeros_like(table)
    for r in range(world):
        start = 0
        for d in range(world):
            chunk = table[r, d * experts : (d + 1) * experts]
            ends = np.minimum(np.cumsum(chunk), cap)
            kept_table[r, d * experts : (d + 1) * experts] = np.diff(ends, prepend=0)
            n_kept = ends[-1]
            want = np.zeros((chunk.sum(), h), np.float32)
            want[:n_kept] = xs[r, start : start + n_kept]
            np.testing.assert_array_equal(back[r, start : start + chunk.sum()], want)
            start += chunk.sum()
    kept_x = [
        np.concatenate(
            [
                xs[r, table[r, : d * experts].sum() :][
                    : kept_table[r, d * experts : (d + 1) * experts].sum()
                ]
                for d in range(world)
            ]
        )
        for r in range(world)
    ]
    want = ep_oracle.dispatch(kept_x, list(eye), kept_table, dtype=np.float32)
    for r in range(world):
        _check_padded(y[r], want[r][1], np.float32)


def test_axis_name_none_is_a_group_of_one():
    rng = np.random.default_rng(0)
    x = _rand(rng, (7, 4), np.float32)
    w = _rand(rng, (3, 4, 5), np.float32)
    counts = np.array([2, 0, 5])
    for impl in IMPLEMENTATIONS:
        y, mm_y, perm = mc2.alltoallv_grouped_matmul(
            x, w, None, send_counts=counts, permute_out_flag=True, implementation=impl
        )
        want = ep_oracle.dispatch([x], [w], counts[None], dtype=np.float32)[0]
        _assert_close(perm, want[0], np.float32)
        _assert_close(y, want[1], np.float32)
        assert mm_y is None


@pytest.mark.slow
def test_multi_axis_ep_group():
    """axis_name may be a tuple of mesh axes, like lax.psum."""
    world, experts = 4, 2
    rng = np.random.default_rng(9)
    table = count_table("random", world, experts, rng)
    xs, ws = _dispatch_case(rng, world, experts, table, np.float32, trans=False)
    mesh = make_mesh((2, 2), ("a", "b"))

    def f(x, w):
        y, _, _ = mc2.alltoallv_grouped_matmul(x[0], w[0], ("a", "b"), send_counts=table)
        return y[None]

    y = jax.jit(
        jax.shard_map(
            f, mesh=mesh, in_specs=(P(("a", "b")), P(("a", "b"))), out_specs=P(("a", "b"))
        )
    )(xs, ws)
    want = ep_oracle.dispatch(list(xs), list(ws), table, dtype=np.float32)
    for r in range(world):
        _check_padded(y[r], want[r][1], np.float32)


# --------------------------------------------------------------------------
# Transformations


def _grad_case(world, traced, impl, op):
    experts, h, n = 2, 6, 5
    rng = np.random.default_rng(21)
    table = count_table("random", world, experts, rng) + (op == "combine")
    recv = ep_oracle.recv_table(table, experts)
    rows = int(table.sum(1).max()) if op == "dispatch" else int(recv.sum(1).max()) + 2
    x = _rand(rng, (world, rows, h), np.float32)
    w = _rand(rng, (world, experts, h, n), np.float32, 0.5)
    mm_x = _rand(rng, (world, 3, h), np.float32)
    mm_w = _rand(rng, (h, 4), np.float32, 0.5)
    mesh = make_mesh((world,), ("ep",))

    def f(x, w, mm_x, mm_w, s):
        sc = s[0] if traced else (table if op == "dispatch" else recv)
        if op == "dispatch":
            y, mm_y, p = mc2.alltoallv_grouped_matmul(
                x[0],
                w[0],
                "ep",
                send_counts=sc,
                mm_x=mm_x[0],
                mm_weight=mm_w,
                permute_out_flag=True,
                max_recv_tokens=None if not traced else 24,
                implementation=impl,
            )
            return y[None], mm_y[None], p[None]
        y, mm_y = mc2.grouped_matmul_alltoallv(
            x[0],
            w[0],
            "ep",
            send_counts=sc,
            mm_x=mm_x[0],
            mm_weight=mm_w,
            max_out_tokens=None if not traced else 24,
            implementation=impl,
        )
        return y[None], mm_y[None]

    counts = jnp.asarray(table if op == "dispatch" else recv, jnp.int32)
    n_out = 3 if op == "dispatch" else 2
    g = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P("ep"), P("ep"), P("ep"), P(), P("ep")),
            out_specs=(P("ep"),) * n_out,
        )
    )
    return functools.partial(lambda c, *a: g(*a, c), counts), (x, w, mm_x, mm_w)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("op", ["dispatch", "combine"])
@pytest.mark.parametrize("traced", [False, True])
def test_grads(impl, op, traced):
    fn, args = _grad_case(4, traced, impl, op)
    jax.test_util.check_grads(fn, args, order=1, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_grads_static_counts_on_xla_gemm(op, monkeypatch):
    """Static counts with XLA's GEMM chosen: the gradients (in gmm_x the
    other operator, in the weights the grouped weight gradient, each with
    every rank's group sizes) check numerically, and no grouped kernel is
    left in the gradient's program."""
    monkeypatch.setenv("JAX_MC2_GEMM", "xla")
    fn, args = _grad_case(4, False, "ffi", op)
    jax.test_util.check_grads(fn, args, order=1, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)

    def loss(*a):
        return sum(jnp.sum(jnp.sin(o)) for o in fn(*a))

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).as_text()
    assert "mc2_grouped_matmul" not in text
    assert text.count("stablehlo.case") >= 3  # forward, gmm_x and weight gradients


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_transpose_of_dispatch_is_combine(impl):
    """The VJP of the dispatch data movement in gmm_x is the combine with the
    counts swapped and the weight transposed (checked against the combine
    operator itself)."""
    world, experts, h, n = 4, 2, 6, 5
    rng = np.random.default_rng(4)
    table = count_table("random", world, experts, rng)
    recv = ep_oracle.recv_table(table, experts)
    bsk = int(table.sum(1).max())
    x = _rand(rng, (world, bsk, h), np.float32)
    w = _rand(rng, (world, experts, h, n), np.float32)
    ct = _rand(rng, (world, int(recv.sum(1).max()), n), np.float32)
    mesh = make_mesh((world,), ("ep",))

    def f(x, w, ct):
        fwd = lambda xx: mc2.alltoallv_grouped_matmul(  # noqa: E731
            xx, w[0], "ep", send_counts=table, implementation=impl
        )[0]
        _, vjp = jax.vjp(fwd, x[0])
        (grad,) = vjp(ct[0])
        direct, _ = mc2.grouped_matmul_alltoallv(
            ct[0],
            w[0],
            "ep",
            send_counts=recv,
            trans_gmm_weight=True,
            max_out_tokens=bsk,
            implementation=impl,
        )
        return grad[None], direct[None]

    grad, direct = jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"), P("ep")))
    )(x, w, ct)
    np.testing.assert_allclose(grad, direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap_over_a_batch_of_dispatches(impl):
    world, experts = 2, 2
    rng = np.random.default_rng(8)
    table = count_table("random", world, experts, rng)
    bsk = int(table.sum(1).max())
    xs = _rand(rng, (world, 3, bsk, 8), np.float32)
    ws = _rand(rng, (world, experts, 8, 4), np.float32)
    mesh = make_mesh((world,), ("ep",))

    def f(x, w):
        one = lambda xx: mc2.alltoallv_grouped_matmul(  # noqa: E731
            xx, w[0], "ep", send_counts=table, implementation=impl
        )[0]
        return jax.vmap(one)(x[0])[None]

    y = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")))(xs, ws)
    for b in range(3):
        want = ep_oracle.dispatch(list(xs[:, b]), list(ws), table, dtype=np.float32)
        for r in range(world):
            _check_padded(y[r, b], want[r][1], np.float32)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("batched_counts", [False, True], ids=["shared-counts", "batched-counts"])
def test_vmap_over_a_batch_of_combines_with_traced_counts(impl, batched_counts):
    """vmap of the combine whose send counts are traced: one table for the
    whole batch, or each batch element with its own table."""
    world, experts, batch = 2, 2, 3
    rng = np.random.default_rng(18)
    tables = np.stack([count_table("random", world, experts, rng) for _ in range(batch)])
    if not batched_counts:
        tables[:] = tables[0]
    cap = int(max(ep_oracle.recv_table(t, experts).sum(1).max() for t in tables)) + 2
    a_cap = int(tables.sum(2).max()) + 3
    xs = _rand(rng, (world, batch, a_cap, 8), np.float32)
    ws = _rand(rng, (world, experts, 8, 4), np.float32, 0.3)
    # counts[r, b]: rank r's send-count row of batch element b.
    counts = jnp.asarray(tables.transpose(1, 0, 2), jnp.int32)

    def f(x, w, c):
        def one(xx, cc):
            return mc2.grouped_matmul_alltoallv(
                xx, w[0], "ep", send_counts=cc, max_out_tokens=cap, implementation=impl
            )[0]

        if batched_counts:
            return jax.vmap(one)(x[0], c[0])[None]
        return jax.vmap(one, in_axes=(0, None))(x[0], c[0, 0])[None]

    y = jax.jit(
        jax.shard_map(
            f, mesh=make_mesh((world,), ("ep",)), in_specs=(P("ep"),) * 3, out_specs=P("ep")
        )
    )(xs, ws, counts)
    assert y.shape == (world, batch, cap, 4)
    for b in range(batch):
        want = ep_oracle.combine(list(xs[:, b]), list(ws), tables[b], dtype=np.float32)
        for r in range(world):
            _check_padded(y[r, b], want[r], np.float32)


def test_vmap_over_the_ep_axis_is_refused():
    x = jnp.ones((2, 4, 3))
    w = jnp.ones((1, 3, 2))
    with pytest.raises(NotImplementedError, match="bound by jax.vmap"):
        jax.vmap(
            lambda xx: mc2.alltoallv_grouped_matmul(xx, w, "b", send_counts=jnp.array([2, 2]))[0],
            axis_name="b",
        )(x)


@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_vma_typing_and_eval_shape(op):
    """The exchanged rows vary along ep; the replicated shared expert's output
    does not."""
    world, experts = 4, 2
    table = np.full((world, experts * world), 2)
    mesh = make_mesh((world,), ("ep",))
    seen = {}

    def f(x, w, mx, mw):
        if op == "dispatch":
            y, mm_y, _ = mc2.alltoallv_grouped_matmul(
                x, w[0], "ep", send_counts=table, mm_x=mx, mm_weight=mw, permute_out_flag=True
            )
        else:
            y, mm_y = mc2.grouped_matmul_alltoallv(
                x, w[0], "ep", send_counts=table, mm_x=mx, mm_weight=mw, trans_mm_weight=True
            )
        seen["y"], seen["mm"] = str(jax.typeof(y)), str(jax.typeof(mm_y))
        return y

    mm_w = (8, 3) if op == "dispatch" else (3, 8)
    jax.eval_shape(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P("ep"), P("ep"), P(), P()),
            out_specs=P("ep"),
            check_vma=True,
        ),
        jnp.ones((world * 16, 8), jnp.bfloat16),
        jnp.ones((world, experts, 8, 4), jnp.bfloat16),
        jnp.ones((5, 8), jnp.bfloat16),
        jnp.ones(mm_w, jnp.bfloat16),
    )
    assert seen["y"] == "bfloat16[16,4]{V:ep}"
    assert seen["mm"] == "bfloat16[5,3]"


def _round_trip_hlo(impl, table, experts):
    """The StableHLO of a dispatch and its combine with the static ``table``."""
    world = table.shape[0]
    recv = ep_oracle.recv_table(table, experts)  # the combine sends back what came
    mesh = make_mesh((world,), ("ep",))

    def f(x, w):
        y, _, _ = mc2.alltoallv_grouped_matmul(
            x, w[0], "ep", send_counts=table, implementation=impl
        )
        back, _ = mc2.grouped_matmul_alltoallv(y, w[0], "ep", send_counts=recv, implementation=impl)
        return back

    return (
        jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")))
        .lower(
            jnp.ones((world * int(table.sum(1).max()), 8), jnp.float16),
            jnp.ones((world, experts, 8, 8), jnp.float16),
        )
        .as_text()
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_lowered_hlo(impl, monkeypatch):
    monkeypatch.setenv("JAX_MC2_GEMM", "blas")
    world, experts = 4, 2
    text = _round_trip_hlo(impl, np.full((world, experts * world), 2), experts)
    assert text.count("all_to_all") == 2
    assert "all_gather" not in text and "all_reduce" not in text
    assert text.count("mc2_grouped_matmul_ffi") == (2 if impl == "ffi" else 0)


@pytest.mark.parametrize("kind", ["uniform", "zeros"])
def test_static_counts_lower_to_one_dot_a_group_on_xla_gemm(kind, monkeypatch):
    """With static counts and XLA's GEMM chosen, the ffi implementation's
    grouped products are one dot a non-empty group, the rank's group sizes
    picked by a switch on the rank when ranks' sizes differ; no grouped
    custom call."""
    monkeypatch.setenv("JAX_MC2_GEMM", "xla")
    world, experts = 4, 2
    table = count_table(kind, world, experts, np.random.default_rng(1))
    text = _round_trip_hlo("ffi", table, experts)
    assert text.count("all_to_all") == 2
    assert "mc2_grouped_matmul_ffi" not in text
    # Rank r's groups (the same rows for the dispatch's output and the
    # combine's input): what it receives for each of its experts.
    groups = ep_oracle.recv_table(table, experts).reshape(world, world, experts).sum(1)
    distinct = np.unique(groups, axis=0)
    if kind == "uniform":
        assert len(distinct) == 1 and "stablehlo.case" not in text
    else:
        assert len(distinct) > 1 and text.count("stablehlo.case") == 2
    assert text.count("stablehlo.dot_general") == 2 * int((distinct > 0).sum())


@pytest.mark.parametrize("gemm", ["xla", "blas"])
@pytest.mark.parametrize("op", ["dispatch", "combine"])
@pytest.mark.parametrize(
    "world, kind, dtype",
    [(1, "skewed", oracle.BF16), (4, "zeros", np.float32), slow(2, "random", np.float16)],
)
def test_static_counts_on_either_gemm(gemm, op, world, kind, dtype, monkeypatch):
    """The ffi implementation with static counts on XLA's GEMM (one dot a
    group) and on the C++ kernel: both match the oracle, transposed weights
    and permute_out included."""
    monkeypatch.setenv("JAX_MC2_GEMM", gemm)
    rng = np.random.default_rng(world + len(kind))
    experts = 2
    table = count_table(kind, world, experts, rng)
    if op == "dispatch":
        xs, ws = _dispatch_case(rng, world, experts, table, dtype, trans=True)
        y, perm = run_dispatch(
            world, "ffi", table, xs, ws, traced=False, trans=True, permute_out=True
        )
        want = ep_oracle.dispatch(list(xs), list(ws), table, trans=True, dtype=dtype)
        for r in range(world):
            _check_padded(perm[r], want[r][0], dtype)
            _check_padded(y[r], want[r][1], dtype)
    else:
        xs, ws = _combine_case(rng, world, experts, table, dtype, trans=True)
        (y,) = run_combine(world, "ffi", table, xs, ws, traced=False, trans=True)
        want = ep_oracle.combine(list(xs), list(ws), table, trans=True, dtype=dtype)
        for r in range(world):
            _check_padded(y[r], want[r], dtype)


# --------------------------------------------------------------------------
# Validation and chip rules (abstract evaluation over an AbstractMesh, so
# any world size can be checked without devices)

_S = jax.ShapeDtypeStruct


def _shape_check(
    world,
    *,
    op="dispatch",
    dtype=jnp.float16,
    experts=2,
    h1=8,
    n1=4,
    rows=None,
    counts=None,
    mm=None,
    **kwargs,
):
    """eval_shape of one operator call on a (world,) 'ep' AbstractMesh."""
    counts = np.full((world, experts * world), 1) if counts is None else counts
    rows = int(np.asarray(counts).sum(-1).max()) if rows is None else rows
    mesh = jax.sharding.AbstractMesh((world,), ("ep",))
    fn = mc2.alltoallv_grouped_matmul if op == "dispatch" else mc2.grouped_matmul_alltoallv

    def f(x, w, *shared):
        extra = dict(mm_x=shared[0], mm_weight=shared[1]) if shared else {}
        return fn(x, w[0], "ep", send_counts=counts, **extra, **kwargs)[0]

    args = [_S((world * rows, h1), dtype), _S((world, experts, h1, n1), dtype)]
    specs = [P("ep"), P("ep")]
    if mm is not None:
        args += [_S(mm[0], dtype), _S(mm[1], dtype)]
        specs += [P(), P()]
    return jax.eval_shape(
        jax.shard_map(f, mesh=mesh, in_specs=tuple(specs), out_specs=P("ep")), *args
    )


def _eager(x, w, counts, **kwargs):
    return mc2.alltoallv_grouped_matmul(x, w, None, send_counts=counts, **kwargs)


_X = np.zeros((4, 8), np.float16)
_W = np.zeros((2, 8, 3), np.float16)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: _eager(_X[0], _W, [2, 2]), TypeError, r"gmm_x must be 2-D \(BSK, H1\)"),
        (lambda: _eager(_X, _W[0], [2, 2]), TypeError, "gmm_weight must be 3-D"),
        (
            lambda: _eager(_X, np.zeros((2, 6, 3), np.float16), [2, 2]),
            TypeError,
            r"H1 == gmm_x.shape\[1\] == 8",
        ),
        (
            lambda: _eager(_X, _W.astype(oracle.BF16), [2, 2]),
            TypeError,
            "gmm_weight dtype must equal gmm_x dtype float16, got bfloat16",
        ),
        (lambda: _eager(_X.astype(np.int8), _W, [2, 2]), TypeError, "gmm_x dtype must be one of"),
        (
            lambda: _eager(_X, _W, [2, 2], mm_x=_X),
            ValueError,
            "mm_x and mm_weight .* together",
        ),
        (
            lambda: _eager(_X, _W, [2, 2], mm_x=_X, mm_weight=np.zeros((5, 2), np.float16)),
            TypeError,
            r"mm_weight must be 2-D \(H2, N2\) with H2 == mm_x.shape\[1\] == 8",
        ),
        (lambda: _eager(_X, _W, [1, 1, 2]), TypeError, r"send_counts must be \(e\*W,\) = \(2,\)"),
        (lambda: _eager(_X, _W, [5, -1]), ValueError, "send_counts must be >= 0"),
        (lambda: _eager(_X, _W, [1.0, 3.0]), TypeError, "send_counts must hold integers"),
        (lambda: _eager(_X, _W, [1, 2]), TypeError, r"gmm_x rows BSK = 4 must equal sum"),
        (
            lambda: _eager(_X, _W, [2, 2], recv_counts=[3, 1]),
            ValueError,
            "recv_counts disagree with send_counts",
        ),
        (
            lambda: _eager(_X, _W, [2, 2], recv_counts=jnp.array([2, 2])),
            TypeError,
            "both be static .* or both traced",
        ),
        (
            lambda: _eager(_X, _W, jnp.array([2.0, 2.0])),
            TypeError,
            "traced send_counts must be an integer array",
        ),
        (
            lambda: _eager(_X, _W, [2, 2], max_recv_tokens=3),
            ValueError,
            "max_recv_tokens = 3 is smaller than the 4 rows",
        ),
        (
            lambda: _eager(_X, _W, [2, 2], max_tokens_per_peer=2),
            ValueError,
            "max_tokens_per_peer = 2 is smaller than the 4 rows",
        ),
        (
            lambda: _eager(_X, np.zeros((33, 8, 3), np.float16), [0] * 32 + [4]),
            ValueError,
            r"e \(local experts\) must be in \[1, 32\], got 33",
        ),
        (
            lambda: _eager(_X, _W, jnp.asarray([2, 2]), implementation="ascend"),
            NotImplementedError,
            "implementation='ascend' needs static send_counts",
        ),
        (
            lambda: mc2.alltoallv_grouped_matmul(_X, _W, "nope", send_counts=[2, 2]),
            NameError,
            "nope",
        ),
        (
            lambda: mc2.grouped_matmul_alltoallv(_X, _W, None, send_counts=[3, 2]),
            TypeError,
            "gmm_x has 4 rows but rank 0 sends sum",
        ),
    ],
)
def test_invalid_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_capacity_and_exchange_count_arguments():
    with pytest.raises(ValueError, match="max_tokens_per_peer must be >= 1, got 0"):
        _eager(_X, _W, jnp.array([2, 2]), max_tokens_per_peer=0)
    with pytest.raises(ValueError, match="max_tokens_per_peer must be >= 1, got 0"):
        mc2.grouped_matmul_alltoallv(_X, _W, None, send_counts=[2, 2], max_tokens_per_peer=0)
    for bad in (np.ones((2, 2), np.int32), np.ones(2, np.float32)):
        with pytest.raises(TypeError, match="exchange_counts: send_counts must be a 1-D integer"):
            mc2.exchange_counts(bad, None)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_negative_traced_counts_are_empty(impl):
    """A negative traced count is an empty block in both implementations
    (static counts reject it)."""
    x = np.arange(1, 4, dtype=np.float32)[:, None]
    w = np.ones((2, 1, 1), np.float32)
    y, _, perm = mc2.alltoallv_grouped_matmul(
        x, w, None, send_counts=jnp.array([3, -1]), permute_out_flag=True, implementation=impl
    )
    np.testing.assert_array_equal(np.asarray(y)[:, 0], [1, 2, 3])
    np.testing.assert_array_equal(np.asarray(perm)[:, 0], [1, 2, 3])
    back, _ = mc2.grouped_matmul_alltoallv(
        x, w, None, send_counts=jnp.array([-2, 3]), max_out_tokens=3, implementation=impl
    )
    np.testing.assert_array_equal(np.asarray(back)[:, 0], [1, 2, 3])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_x64_enabled(impl):
    """With jax_enable_x64 the count arithmetic stays int32 (the C++ kernels
    take int32 index maps)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    w = rng.standard_normal((2, 4, 3)).astype(np.float32)
    want = np.concatenate([x[:2] @ w[0], x[2:] @ w[1]])
    with jax.enable_x64(True):
        for counts in ([2, 3], jnp.array([2, 3])):
            y, _, _ = mc2.alltoallv_grouped_matmul(
                x, w, None, send_counts=counts, implementation=impl
            )
            np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
            back, _ = mc2.grouped_matmul_alltoallv(
                x, w, None, send_counts=counts, implementation=impl
            )
            np.testing.assert_allclose(np.asarray(back), want, rtol=1e-5, atol=1e-5)
        got = mc2.grouped_matmul(x, w, jnp.array([2, 3]), implementation=impl)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_empty_shared_expert_hidden(impl):
    """H2 = 0 (generic target): the shared expert's output is zeros."""
    x, w = np.ones((4, 8), np.float32), np.ones((2, 8, 3), np.float32)
    _, mm_y, _ = mc2.alltoallv_grouped_matmul(
        x,
        w,
        None,
        send_counts=[2, 2],
        mm_x=np.ones((3, 0), np.float32),
        mm_weight=np.ones((0, 5), np.float32),
        implementation=impl,
    )
    np.testing.assert_array_equal(np.asarray(mm_y), np.zeros((3, 5), np.float32))


def test_counts_length_limit():
    with pytest.raises(ValueError, match=r"e \* W = 32 \* 16 = 512 exceeds 256"):
        _shape_check(16, experts=32)
    _shape_check(8, experts=32)  # 256 is the largest


@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_chip_rules(op):
    big = dict(rows=2048, h1=1024, n1=1024)  # 2048 * 1024 * 2 B = 4 MB a card
    counts = lambda w: np.full((w, 2 * w), 2048 // (2 * w))  # noqa: E731
    with mc2.target("atlas-a2"):
        with pytest.raises(NotImplementedError, match="not available on target 'atlas-a2'"):
            _shape_check(8, op=op, counts=counts(8), **big)
    with mc2.target("atlas-a3"):
        _shape_check(8, op=op, counts=counts(8), **big)
        _shape_check(64, op=op, counts=counts(64), experts=2, **big)
        with pytest.raises(NotImplementedError, match=r"world size 4 .* supported: 8, 16, 32, 64"):
            _shape_check(4, op=op, counts=counts(4), **big)
        with pytest.raises(NotImplementedError, match=r"per-card traffic .* \[2 MB, 100 MB\]"):
            _shape_check(8, op=op)
        # Every card's traffic counts, not only the busiest card's: rank 0
        # sends 4 MB, the others 16 KiB.
        uneven = counts(8)
        uneven[1:] = 0
        uneven[1:, 0] = 8
        with pytest.raises(NotImplementedError, match=r"rank 1's per-card traffic 16384 bytes"):
            _shape_check(8, op=op, counts=uneven, **big)
        with pytest.raises(TypeError, match="float32 is accepted only under the 'generic'"):
            _shape_check(8, op=op, counts=counts(8), dtype=jnp.float32, **big)
    with mc2.target("ascend-950"):
        _shape_check(4, op=op)  # no traffic rule on 950
        with pytest.raises(NotImplementedError, match=r"world size 2 .* supported: 4, 8, 16"):
            _shape_check(2, op=op)
        with pytest.raises(NotImplementedError, match=r"H1 = 65536 must be in \(0, 65535\]"):
            _shape_check(4, op=op, h1=65536)
        with pytest.raises(NotImplementedError, match=r"N1 = 0 must be in \(0, 65535\]"):
            _shape_check(4, op=op, n1=0)
        with pytest.raises(
            NotImplementedError, match=r"H2 = mm_x.shape.1. = 12289 must be in \(0, 12288\]"
        ):
            _shape_check(4, op=op, mm=((4, 12289), (12289, 4)))
        with pytest.raises(NotImplementedError, match=r"H2 = mm_x.shape.1. = 0 must be in"):
            _shape_check(4, op=op, mm=((4, 0), (0, 4)))
        with pytest.raises(NotImplementedError, match=r"N2 = 65536 must be in \(0, 65535\]"):
            _shape_check(4, op=op, mm=((4, 8), (8, 65536)))
        _shape_check(4, op=op, mm=((4, 12288), (12288, 4)))  # BSK = 8 = K * BS, K = 2
        for bs in (3, 8):  # K = 8 / 3, and K = 1
            with pytest.raises(
                NotImplementedError, match=rf"BSK = 8 must be K \* BS with BS = .* = {bs} and top-k"
            ):
                _shape_check(4, op=op, mm=((bs, 8), (8, 4)))
    # generic: the math only
    _shape_check(2, op=op, h1=65536, dtype=jnp.float32)


# --------------------------------------------------------------------------
# The GPU path (lax.ragged_all_to_all) checked on CPU through an emulation


def _emulated_ragged_all_to_all(world):
    """lax.ragged_all_to_all's documented semantics from all_gathers: slice i
    of rank s goes to rank i // per, at its output_offsets[i]. A receiver
    gets NaNs where its recv_sizes disagree with the senders' send_sizes, a
    slice reaches outside the operand or the output (XLA only checks that in
    debug builds), or two slices write one row."""

    def ragged(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
    ):
        per = input_offsets.shape[0] // world
        me = jax.lax.axis_index(axis_name)
        ops, io, ss, oo = (
            jax.lax.all_gather(a, axis_name)
            for a in (operand, input_offsets, send_sizes, output_offsets)
        )
        rows = jnp.arange(output.shape[0])
        out = output
        mismatch = jnp.zeros((), bool)
        writes = jnp.zeros(output.shape[0], jnp.int32)
        for s in range(world):
            for e in range(per):
                i = me * per + e
                off, size, src = oo[s, i], ss[s, i], io[s, i]
                mask = (rows >= off) & (rows < off + size)
                src_rows = jnp.clip(src + rows - off, 0, operand.shape[0] - 1)
                out = jnp.where(mask[:, None], ops[s][src_rows], out)
                writes = writes + mask
                mismatch |= recv_sizes[s * per + e] != size
                mismatch |= (src < 0) | (src > operand.shape[0]) | (src + size > operand.shape[0])
                mismatch |= (off < 0) | (off > output.shape[0]) | (off + size > output.shape[0])
        mismatch |= jnp.any(writes > 1)
        return jnp.where(mismatch, jnp.nan, out)

    return ragged


@pytest.fixture
def ragged_on_cpu(monkeypatch):
    from jax_mc2.primitives import alltoallv_grouped_matmul as mod

    def use(world):
        monkeypatch.setattr(mod, "ragged_all_to_all", _emulated_ragged_all_to_all(world))
        monkeypatch.setattr(mod, "RAGGED_PLATFORMS", {"cpu"})

    return use


@pytest.mark.slow
@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("kind", ["random", "zeros", "skewed"])
def test_ragged_path_equals_padded_path(ragged_on_cpu, traced, kind):
    world, experts = 4, 2
    rng = np.random.default_rng(31)
    table = count_table(kind, world, experts, rng)
    recv = ep_oracle.recv_table(table, experts)
    bsk = int(table.sum(1).max())
    xs, ws = _dispatch_case(rng, world, experts, table, np.float32, trans=False, n1=16)
    kwargs = dict(max_tokens_per_peer=3, max_recv_tokens=10) if traced else {}

    def f(x, w, s, rc, impl):
        sc, rcv = (s[0], rc[0]) if traced else (table, recv)
        y, _, p = mc2.alltoallv_grouped_matmul(
            x[0], w[0], "ep", send_counts=sc, permute_out_flag=True, implementation=impl, **kwargs
        )
        back, _ = mc2.grouped_matmul_alltoallv(
            y,
            w[0],
            "ep",
            send_counts=rcv,
            recv_counts=sc,
            trans_gmm_weight=True,
            max_out_tokens=bsk,
            max_tokens_per_peer=kwargs.get("max_tokens_per_peer"),
            implementation=impl,
        )
        return y[None], p[None], back[None]

    args = (xs, ws, jnp.asarray(table), jnp.asarray(recv))
    padded = _ep_call(world, functools.partial(f, impl="xla"), args, (P("ep"),) * 4, 3)
    ragged_on_cpu(world)
    ragged = _ep_call(world, functools.partial(f, impl="xla"), args, (P("ep"),) * 4, 3)
    text = (
        jax.jit(
            jax.shard_map(
                functools.partial(f, impl="xla"),
                mesh=make_mesh((world,), ("ep",)),
                in_specs=(P("ep"),) * 4,
                out_specs=(P("ep"),) * 3,
            )
        )
        .lower(*args)
        .as_text()
    )
    assert "all_gather" in text  # the emulation, i.e. the ragged path ran
    for got, want in zip(ragged, padded):
        assert not np.isnan(np.asarray(got)).any()
        np.testing.assert_array_equal(got, want)


def test_gpu_lowering_uses_ragged_all_to_all():
    """Lowered for CUDA (no GPU needed), the xla implementation exchanges with
    ragged all-to-alls and no fixed-capacity all-to-all of the rows."""
    world, experts = 4, 2
    table = np.full((world, experts * world), 2)
    mesh = make_mesh((world,), ("ep",))

    def f(x, w):
        y, _, _ = mc2.alltoallv_grouped_matmul(x, w[0], "ep", send_counts=table)
        back, _ = mc2.grouped_matmul_alltoallv(y, w[0], "ep", send_counts=table)
        return back

    traced = jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep"))
    ).trace(jnp.ones((world * 16, 8), jnp.bfloat16), jnp.ones((world, experts, 8, 8), jnp.bfloat16))
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("ragged_all_to_all") == 2
    # the only plain all-to-alls carry the (offset, size) replies: i32 [W, e, 2]
    for line in text.splitlines():
        if "all_to_all" in line and "ragged" not in line:
            assert "xi32>" in line and "bf16" not in line, line


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 4), min_size=32, max_size=32),
    peer_capacity=st.sampled_from([1, 3, 6, 40]),
    out_rows=st.sampled_from([2, 9, 40, 160]),
    impl=st.sampled_from(IMPLEMENTATIONS),
)
def test_property_traced_capacities(counts, peer_capacity, out_rows, impl):
    """Random traced counts and capacities: dispatch keeps exactly the rows
    of the NumPy model's fixed-capacity drops, and combine brings every kept
    row back to its place and zeros the dropped ones."""
    world, experts, h, bsk = 4, 2, 3, 40
    table = np.asarray(counts).reshape(world, experts * world)
    xs = (np.arange(world * bsk * h).reshape(world, bsk, h) % 251 + 1).astype(np.float32)
    perm, back = _capacity_round_trip(impl, peer_capacity, out_rows)(xs, jnp.asarray(table))
    kept = ep_oracle.dispatched_rows(table, experts, peer_capacity=peer_capacity, out_rows=out_rows)
    want_back = np.zeros_like(xs)
    for d in range(world):
        want = np.zeros((out_rows, h), np.float32)
        for p, (s, row) in enumerate(kept[d]):
            want[p] = xs[s, row]
            want_back[s, row] = xs[s, row]
        np.testing.assert_array_equal(perm[d], want)
    np.testing.assert_array_equal(back, want_back)


@functools.cache
def _capacity_round_trip(impl, peer_capacity, out_rows):
    world, experts, h, bsk = 4, 2, 3, 40
    eye = jnp.broadcast_to(jnp.eye(h, dtype=jnp.float32), (experts, h, h))

    def f(x, s):
        send = s[0]
        _, _, perm = mc2.alltoallv_grouped_matmul(
            x[0],
            eye,
            "ep",
            send_counts=send,
            permute_out_flag=True,
            max_tokens_per_peer=peer_capacity,
            max_recv_tokens=out_rows,
            implementation=impl,
        )
        recv = mc2.exchange_counts(send, ("ep",))
        back, _ = mc2.grouped_matmul_alltoallv(
            perm,
            eye,
            "ep",
            send_counts=recv,
            recv_counts=send,
            max_tokens_per_peer=peer_capacity,
            max_out_tokens=bsk,
            implementation=impl,
        )
        return perm[None], back[None]

    mesh = make_mesh((world,), ("ep",))
    return jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=(P("ep"), P("ep")))
    )


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_grads_with_tokens_replicated_over_the_ep_axis(impl):
    """gmm_x invariant along the EP axis (every rank routes the same tokens)
    under check_vma: its cotangent is summed over the ranks."""
    world, experts = 4, 2
    table = np.full((world, experts * world), 1)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    w = rng.standard_normal((world, experts, 3, 3)).astype(np.float32)
    mesh = make_mesh((world,), ("ep",))

    def f(x, w):
        y, _, _ = mc2.alltoallv_grouped_matmul(
            x, w[0], "ep", send_counts=table, implementation=impl
        )
        return jax.lax.psum(jnp.sum(y**2), "ep")

    fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("ep")), out_specs=P()))
    jax.test_util.check_grads(fn, (x, w), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_hessian_vector_product(impl):
    """Second order through the dispatch (the weight-gradient kernel has its
    own JVP and transposes)."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    w = rng.standard_normal((2, 4, 5)).astype(np.float32)
    v = rng.standard_normal((2, 4, 5)).astype(np.float32)

    def loss(ww):
        y = mc2.alltoallv_grouped_matmul(x, ww, None, send_counts=[2, 4], implementation=impl)[0]
        return jnp.sum(jnp.sin(y))

    def dense(ww):
        return jnp.sum(jnp.sin(x[:2] @ ww[0])) + jnp.sum(jnp.sin(x[2:] @ ww[1]))

    got = jax.jvp(jax.grad(loss), (w,), (v,))[1]
    want = jax.jvp(jax.grad(dense), (w,), (v,))[1]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
