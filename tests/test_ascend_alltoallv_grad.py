"""Gradients of the AlltoAllv grouped-matmul operators with
implementation="ascend" (through the CANN test double).

Reverse mode binds the other operator (a CANN MC2 kernel), the data movement
alone (``has_weight=False``: HcclAlltoAllV plus the permute / unpermute) and
the local grouped weight gradient (host kernel). Values are small integers in
float16, so every product and sum is exact: the gradients must equal the
``ffi`` implementation's and the NumPy model's bit for bit."""

import os
import subprocess

import ep_oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh, run_python
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2
from jax_mc2.framework.implementation import requested
from jax_mc2.primitives import alltoallv_grouped_matmul as a2a

F16 = np.float16
EXPERTS, H, N = 2, 8, 4


def _table(world, seed):
    """A (W, E*W) send table with zero counts for some (rank, expert) pairs
    and a rank pair with no rows at all, where every rank still sends and
    receives rows (CANN's MC2 kernels need sum(send_counts) > 0 on every rank;
    the gradients bind both operators)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 4, size=(world, EXPERTS * world))
    t[:, 1::3] = 0
    for r in range(world):
        t[r, r * EXPERTS] = max(1, t[r, r * EXPERTS])  # to itself: sends and receives
    if world > 1:
        t[0, EXPERTS : 2 * EXPERTS] = 0  # rank 0 sends rank 1 nothing
    return t


def _ints(rng, shape, lo=-2, hi=3):
    return rng.integers(lo, hi, size=shape).astype(F16)


def _f64(a):
    return np.asarray(a, np.float64)


def _weight_grad(a, b, sizes, trans):
    """dw[e] = a_e^T @ b_e over the expert-major row groups of ``sizes``
    (transposed for a transposed weight)."""
    out, at = [], 0
    for g in sizes:
        dw = _f64(a[at : at + g]).T @ _f64(b[at : at + g])
        out.append(dw.T if trans else dw)
        at += g
    return np.stack(out)


def _padded(rows, total):
    return np.concatenate([rows, np.zeros((total - rows.shape[0], rows.shape[1]))])


# --------------------------------------------------------------------------
# The gradient cases


def _dispatch_case(world, trans, permute_out, impl, seed):
    rng = np.random.default_rng(seed)
    table = _table(world, seed)
    recv = ep_oracle.recv_table(table, EXPERTS)
    bsk, a = int(table.sum(1).max()), int(recv.sum(1).max())
    xs = _ints(rng, (world, bsk, H))
    ws = _ints(rng, (world, EXPERTS, N, H) if trans else (world, EXPERTS, H, N))
    ct = _ints(rng, (world, a, N))
    ctp = _ints(rng, (world, a, H))

    def f(x, w, ct, ctp):
        def fwd(xx, ww):
            y, _, p = mc2.alltoallv_grouped_matmul(
                xx,
                ww,
                "ep",
                send_counts=table,
                trans_gmm_weight=trans,
                permute_out_flag=permute_out,
                implementation=impl,
            )
            return (y, p) if permute_out else (y,)

        outs, vjp = jax.vjp(fwd, x[0], w[0])
        dx, dw = vjp((ct[0], ctp[0]) if permute_out else (ct[0],))
        return dx[None], dw[None]

    g = jax.jit(
        jax.shard_map(
            f,
            mesh=make_mesh((world,), ("ep",)),
            in_specs=(P("ep"),) * 4,
            out_specs=(P("ep"), P("ep")),
        )
    )
    got = g(xs, ws, ct, ctp)

    # The NumPy model: dx is the combine of ct through the transposed weights
    # (plus the combine of ct_permute_out), dw the grouped x^T @ ct.
    xs_np = [xs[r][: table[r].sum()] for r in range(world)]
    fwd = ep_oracle.dispatch(xs_np, ws, table, trans=trans, dtype=np.float64)
    a_r = [int(recv[r].sum()) for r in range(world)]
    back = ep_oracle.combine(
        [ct[r][: a_r[r]] for r in range(world)], ws, recv, trans=not trans, dtype=np.float64
    )
    if permute_out:
        eye = np.broadcast_to(np.eye(H), (world, EXPERTS, H, H))
        moved = ep_oracle.combine(
            [ctp[r][: a_r[r]] for r in range(world)], eye, recv, dtype=np.float64
        )
        back = [b + m for b, m in zip(back, moved)]
    want_dx = np.stack([_padded(back[r], bsk) for r in range(world)])
    sizes = [[int(recv[r][e::EXPERTS].sum()) for e in range(EXPERTS)] for r in range(world)]
    want_dw = np.stack(
        [_weight_grad(fwd[r][0], ct[r][: a_r[r]], sizes[r], trans) for r in range(world)]
    )
    return got, (want_dx, want_dw)


def _combine_case(world, trans, impl, seed):
    rng = np.random.default_rng(seed)
    table = _table(world, seed)  # the combine's send table
    recv = ep_oracle.recv_table(table, EXPERTS)
    rows, out_rows = int(table.sum(1).max()), int(recv.sum(1).max())
    xs = _ints(rng, (world, rows, H))
    ws = _ints(rng, (world, EXPERTS, N, H) if trans else (world, EXPERTS, H, N))
    ct = _ints(rng, (world, out_rows, N))

    def f(x, w, ct):
        def fwd(xx, ww):
            return mc2.grouped_matmul_alltoallv(
                xx, ww, "ep", send_counts=table, trans_gmm_weight=trans, implementation=impl
            )[0]

        _, vjp = jax.vjp(fwd, x[0], w[0])
        dx, dw = vjp(ct[0])
        return dx[None], dw[None]

    g = jax.jit(
        jax.shard_map(
            f,
            mesh=make_mesh((world,), ("ep",)),
            in_specs=(P("ep"),) * 3,
            out_specs=(P("ep"), P("ep")),
        )
    )
    got = g(xs, ws, ct)

    # The NumPy model: ct travels back as the dispatch does (expert-major on
    # each rank); dx is it times the transposed weights, dw the grouped x^T @ it.
    o_r = [int(recv[r].sum()) for r in range(world)]
    back = ep_oracle.dispatch(
        [ct[r][: o_r[r]] for r in range(world)], ws, recv, trans=not trans, dtype=np.float64
    )
    want_dx = np.stack([_padded(back[r][1], rows) for r in range(world)])
    sizes = [[int(table[r][e::EXPERTS].sum()) for e in range(EXPERTS)] for r in range(world)]
    want_dw = np.stack(
        [_weight_grad(xs[r][: table[r].sum()], back[r][0], sizes[r], trans) for r in range(world)]
    )
    return got, (want_dx, want_dw)


CASES = {
    "dispatch": dict(op="dispatch", trans=False, permute_out=False),
    "dispatch-permute_out-trans": dict(op="dispatch", trans=True, permute_out=True),
    "combine": dict(op="combine", trans=False),
    "combine-trans": dict(op="combine", trans=True),
}


def _run(case, world, impl):
    case = dict(case)
    op = case.pop("op")
    seed = 100 * world + len(op)
    if op == "dispatch":
        return _dispatch_case(world, impl=impl, seed=seed, **case)
    return _combine_case(world, impl=impl, seed=seed, **case)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradients_equal_ffi_and_numpy(case, world):
    (dx, dw), (want_dx, want_dw) = _run(case, world, "ascend")
    ffi_dx, ffi_dw = _run(case, world, "ffi")[0]
    np.testing.assert_array_equal(_f64(dx), want_dx)
    np.testing.assert_array_equal(_f64(dw), want_dw)
    np.testing.assert_array_equal(_f64(dx), _f64(ffi_dx))
    np.testing.assert_array_equal(_f64(dw), _f64(ffi_dw))


@pytest.mark.slow
def test_jax_grad_of_a_moe_layer_equals_ffi():
    """jax.grad of dispatch -> combine (the expert layer of an MoE block)
    with respect to the tokens and both weights."""
    world = 4
    table = _table(world, 7)
    recv = ep_oracle.recv_table(table, EXPERTS)
    bsk = int(table.sum(1).max())
    rng = np.random.default_rng(7)
    xs = _ints(rng, (world, bsk, H))
    w1 = _ints(rng, (world, EXPERTS, H, N))
    w2 = _ints(rng, (world, EXPERTS, N, H))

    def grads(impl):
        def loss(x, w1, w2):
            y, _, _ = mc2.alltoallv_grouped_matmul(
                x, w1, "ep", send_counts=table, implementation=impl
            )
            back, _ = mc2.grouped_matmul_alltoallv(
                y, w2, "ep", send_counts=recv, max_out_tokens=bsk, implementation=impl
            )
            return jnp.sum(back.astype(jnp.float32) * jnp.arange(H, dtype=jnp.float32))

        def f(x, w1, w2):
            g = jax.grad(loss, argnums=(0, 1, 2))(x[0], w1[0], w2[0])
            return tuple(a[None] for a in g)

        spec = (P("ep"),) * 3
        g = jax.jit(
            jax.shard_map(f, mesh=make_mesh((world,), ("ep",)), in_specs=spec, out_specs=spec)
        )
        return [_f64(a) for a in g(xs, w1, w2)]

    for got, want in zip(grads("ascend"), grads("ffi")):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("trans", [False, True])
def test_grouped_matmul_runs_the_host_kernels(trans, monkeypatch):
    """The local grouped matmul (no communication) and its gradients run on
    the host as the ffi implementation does: values, gradients and lowered
    text (on the C++ kernels with ``JAX_MC2_GEMM=blas``; with static sizes
    the ffi rules may multiply on XLA's GEMM instead, the same program)."""
    rng = np.random.default_rng(1)
    x = _ints(rng, (9, H))
    w = _ints(rng, (3, N, H) if trans else (3, H, N))
    sizes = np.array([4, 0, 3])
    ct = _ints(rng, (9, N))

    def f(impl):
        def run(x, w):
            fwd = lambda a, b: mc2.grouped_matmul(  # noqa: E731
                a, b, sizes, trans_weight=trans, implementation=impl
            )
            y, vjp = jax.vjp(fwd, x, w)
            return (y, *vjp(ct))

        return jax.jit(run)

    got, want = f("ascend")(x, w), f("ffi")(x, w)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(_f64(a), _f64(b))
    assert f("ascend").lower(x, w).as_text() == f("ffi").lower(x, w).as_text()
    monkeypatch.setenv("JAX_MC2_GEMM", "blas")
    text = f("ascend").lower(x, w).as_text()
    assert "mc2_grouped_matmul_ffi" in text and "mc2_grouped_matmul_wgrad_ffi" in text
    assert "mc2_ascend_host_bridge" not in text


# --------------------------------------------------------------------------
# The data-movement call itself


def _bind_data_movement(prim, x, table, world, out_rows, impl):
    """The has_weight=False primitive (what the transposes bind)."""
    return prim.bind(
        x,
        send_table=tuple(tuple(int(c) for c in row) for row in table),
        experts=EXPERTS,
        peer_capacity=max(int(table.reshape(world, world, EXPERTS).sum(-1).max()), 1),
        out_rows=out_rows,
        trans_weight=False,
        trans_mm_weight=False,
        has_weight=False,
        has_mm=False,
        permute_out=False,
        axis_name=("ep",),
        world_size=world,
        implementation=requested("test", impl),
    )[0]


def _moved(op, world, table, impl):
    """Rank-tagged rows through the data movement of ``op``; returns the
    jitted call, its input and the NumPy model of its output."""
    recv = ep_oracle.recv_table(table, EXPERTS)
    rows, out_rows = int(table.sum(1).max()), int(recv.sum(1).max())
    rows, out_rows = max(rows, 1), max(out_rows, 1)
    xs = np.stack(
        [(100 * r + np.arange(rows * H).reshape(rows, H) % 97).astype(F16) for r in range(world)]
    )
    prim = a2a.dispatch_p if op == "dispatch" else a2a.combine_p
    eye = np.broadcast_to(np.eye(H), (world, EXPERTS, H, H))
    if op == "dispatch":
        model = [p for p, _ in ep_oracle.dispatch(xs, eye, table, dtype=np.float64)]
    else:
        model = ep_oracle.combine(
            [xs[r][: table[r].sum()] for r in range(world)], eye, table, dtype=np.float64
        )
    want = np.stack([_padded(np.asarray(m).reshape(-1, H), out_rows) for m in model])

    def f(x):
        return _bind_data_movement(prim, x[0], table, world, out_rows, impl)[None]

    g = jax.jit(
        jax.shard_map(f, mesh=make_mesh((world,), ("ep",)), in_specs=P("ep"), out_specs=P("ep"))
    )
    return g, xs, want


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_data_movement_matches_the_model(op, world):
    """HcclAlltoAllV with the permute (dispatch) or unpermute (combine)
    moves every row where the NumPy model says, the padding rows are zero,
    and a rank that sends or receives nothing is fine (HCCL takes zero
    counts)."""
    table = _table(world, 3 + world)
    if world > 1:
        table[-1] = 0  # the last rank sends nothing at all
    g, xs, want = _moved(op, world, table, "ascend")
    got = _f64(g(xs))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _f64(_moved(op, world, table, "ffi")[0](xs)))


@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_data_movement_lowers_to_hccl_alltoallv(op):
    world = 4
    g, xs, _ = _moved(op, world, _table(world, 5), "ascend")
    text = g.lower(xs).as_text()
    assert text.count("mc2_ascend_host_bridge") == 1
    assert 'function = "HcclAlltoAllV"' in text
    assert "stablehlo.all_to_all" not in text and "stablehlo.all_gather" not in text


def test_gradient_lowering_uses_hccl_alltoallv_and_the_mc2_kernel():
    """The combine and its weight gradient: the forward is CANN's kernel, the
    gradient's data movement HcclAlltoAllV and its grouped weight gradient a
    host kernel; no XLA collective."""
    world = 4
    table = _table(world, 9)
    recv = ep_oracle.recv_table(table, EXPERTS)
    rows, out_rows = int(table.sum(1).max()), int(recv.sum(1).max())

    def f(x, w, ct):
        fwd = lambda ww: mc2.grouped_matmul_alltoallv(  # noqa: E731
            x[0], ww, "ep", send_counts=table, implementation="ascend"
        )[0]
        y, vjp = jax.vjp(fwd, w[0])
        return y[None], vjp(ct[0])[0][None]

    g = jax.jit(
        jax.shard_map(
            f,
            mesh=make_mesh((world,), ("ep",)),
            in_specs=(P("ep"),) * 3,
            out_specs=(P("ep"), P("ep")),
        )
    )
    text = g.lower(
        np.ones((world, rows, H), F16),
        np.ones((world, EXPERTS, H, N), F16),
        np.ones((world, out_rows, N), F16),
    ).as_text()
    assert 'function = "HcclAlltoAllV"' in text
    assert 'function = "aclnnGroupedMatMulAlltoAllv"' in text
    assert "mc2_grouped_matmul_wgrad_ffi" in text
    assert "stablehlo.all_to_all" not in text and "stablehlo.all_gather" not in text


# --------------------------------------------------------------------------
# Failures of HcclAlltoAllV


FAILURES = {
    "status": (
        "CANN_DOUBLE_FAIL_PHASE",
        "HcclAlltoAllV:4",
        r"alltoallv_grouped_matmul: HcclAlltoAllV failed with HcclResult 4 \(HCCL_E_INTERNAL\):"
        r" injected failure of HcclAlltoAllV",
    ),
    "stalled-rank": (
        "CANN_DOUBLE_STALL_RANK",
        "*:1",
        r"alltoallv_grouped_matmul: HcclAlltoAllV (did not finish|failed).* status 507046: "
        r"HcclAlltoAllV: HCCL_E_TIMEOUT",
    ),
    "sync-timeout": (
        "CANN_DOUBLE_SYNC_TIMEOUT",
        "1",
        r"alltoallv_grouped_matmul: HcclAlltoAllV did not finish within \d+ ms .*status 507046",
    ),
}


@pytest.mark.parametrize("case", FAILURES.values(), ids=FAILURES.keys())
def test_injected_failure(monkeypatch, case):
    """An injected HcclAlltoAllV failure is an exception naming the operator,
    HcclAlltoAllV and the status (nothing hangs); then the same call and a
    freshly traced one work again (a broken communicator is re-created)."""
    variable, value, match = case
    world = 2
    table = _table(world, 11)
    g, xs, want = _moved("dispatch", world, table, "ascend")
    np.testing.assert_array_equal(_f64(g(xs)), want)
    monkeypatch.setenv(variable, value)
    with pytest.raises(Exception, match=match):
        np.asarray(g(xs))
    monkeypatch.delenv(variable)
    np.testing.assert_array_equal(_f64(g(xs)), want)
    g2, _, _ = _moved("dispatch", world, table, "ascend")
    np.testing.assert_array_equal(_f64(g2(xs)), want)


# --------------------------------------------------------------------------
# An HCCL without HcclAlltoAllV

_PROBE = """
import numpy as np, jax, jax.numpy as jnp, jax_mc2 as mc2
from jax.sharding import Mesh, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()[:2]), ("ep",))
table = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
def f(x, w):
    fwd = lambda ww: mc2.grouped_matmul_alltoallv(
        x[0], ww, "ep", send_counts=table, implementation="ascend")[0]
    y, vjp = jax.vjp(fwd, w[0])
    return y[None], vjp(y)[0][None]
g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=(P("ep"),) * 2))
x, w = jnp.ones((2, 4, 8), jnp.float16), jnp.ones((2, 2, 8, 4), jnp.float16)
print("FORWARD", float(np.asarray(jax.jit(jax.shard_map(
    lambda x, w: mc2.grouped_matmul_alltoallv(x[0], w[0], "ep", send_counts=table,
                                              implementation="ascend")[0][None],
    mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")))(x, w)).sum()))
try:
    g.lower(x, w)
    print("LOWERED")
except Exception as e:
    print("ERROR", type(e).__name__, e)
"""


def test_hccl_without_alltoallv(tmp_path):
    """The MC2 operators still run; differentiating one through its data
    movement is a trace-time NotImplementedError naming HcclAlltoAllV."""
    src = os.environ["JAX_MC2_CANN_LIBRARY_PATH"]
    d = tmp_path / "cann"
    d.mkdir()
    for name in os.listdir(src):
        if name.endswith(".so") and name != "libhccl.so":
            os.symlink(os.path.join(src, name), d / name)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cann_double")
    subprocess.run(
        [
            os.environ.get("CXX", "g++"),
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-DCANN_DOUBLE_WITHOUT_ALLTOALLV",
            f"-I{here}",
            os.path.join(here, "hccl.cc"),
            "-o",
            str(d / "libhccl.so"),
            "-Wl,-soname,libhccl.so",
            f"-L{src}",
            "-l:libcann_double_core.so",
            f"-Wl,-rpath,{src}",
        ],
        check=True,
    )
    env = dict(
        os.environ,
        JAX_MC2_CANN_LIBRARY_PATH=str(d),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_MC2_TARGET="generic",
    )
    out = run_python(_PROBE, env, tmp_path)
    assert "FORWARD 256.0" in out, out
    # The weight gradient of the combine moves rows as the dispatch does.
    assert (
        "ERROR NotImplementedError alltoallv_grouped_matmul: implementation='ascend' runs " in out
    )
    assert "CANN symbol HcclAlltoAllV not found in libhccl.so" in out
