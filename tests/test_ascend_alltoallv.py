"""implementation="ascend" of the expert-parallel operators
(aclnnAlltoAllvGroupedMatMul / aclnnGroupedMatMulAlltoAllv) through the CANN
test double: the static-count tests of the operator matrix, and the
ascend-specific errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_alltoallv_grouped_matmul as t
from ascend_matrix import for_ascend
from conftest import make_mesh
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2

# "zeros": ranks that send nothing, which CANN refuses (see below).
test_dispatch_matches_oracle = for_ascend(t.test_dispatch_matches_oracle, drop=("zeros",))
test_combine_matches_oracle = for_ascend(t.test_combine_matches_oracle, drop=("zeros",))


def test_traced_counts_are_refused_at_trace_time():
    mesh = make_mesh((2,), ("ep",))
    x = jnp.ones((8, 16), jnp.bfloat16)
    w = jnp.ones((2, 16, 8), jnp.bfloat16)

    def f(x, w, counts):
        return mc2.alltoallv_grouped_matmul(
            x, w, "ep", send_counts=counts, max_recv_tokens=16, implementation="ascend"
        )[0]

    g = jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep")), out_specs=P("ep"))
    )
    with pytest.raises(NotImplementedError, match="needs static send_counts.*aclIntArray"):
        g.lower(jnp.tile(x, (2, 1)), jnp.tile(w, (2, 1, 1)), jnp.full((8,), 2, jnp.int32))

    # With traced recv_counts too, the check of the given counts lowers first:
    # the refusal is the same (not "no ascend lowering of mc2_check_counts").
    def given(x, w, counts):
        return mc2.alltoallv_grouped_matmul(
            x, w, "ep", send_counts=counts, recv_counts=counts, max_recv_tokens=16,
            implementation="ascend",
        )[0]  # fmt: skip

    g = jax.jit(
        jax.shard_map(given, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep")), out_specs=P("ep"))
    )
    with pytest.raises(
        NotImplementedError,
        match=r"alltoallv_grouped_matmul: implementation='ascend' needs static send_counts",
    ):
        g.lower(jnp.tile(x, (2, 1)), jnp.tile(w, (2, 1, 1)), jnp.full((8,), 2, jnp.int32))


def test_lowering_is_one_custom_call():
    mesh = make_mesh((4,), ("ep",))
    counts = np.full((4, 8), 1)

    def f(x, w):
        return mc2.alltoallv_grouped_matmul(x, w, "ep", send_counts=counts, implementation="ascend")

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")))
    text = g.lower(jnp.ones((32, 16), jnp.float16), jnp.ones((8, 16, 8), jnp.float16)).as_text()
    assert text.count("mc2_ascend_host_bridge") == 1 and "aclnnAlltoAllvGroupedMatMul" in text
    assert "stablehlo.all_to_all" not in text and "stablehlo.all_gather" not in text


def test_trans_mm_weight_without_a_shared_expert_runs():
    """The flag means nothing without mm_x; CANN refuses transMmWeight = true
    there, so the lowering passes false."""
    mesh = make_mesh((2,), ("ep",))
    counts = np.full((2, 4), 2)
    x = np.arange(16 * 8, dtype=np.float32).reshape(16, 8).astype(np.float16) / 64
    w = np.ones((4, 8, 4), np.float16)

    def run(impl):
        def f(x_, w_):
            return mc2.alltoallv_grouped_matmul(
                x_, w_, "ep", send_counts=counts, trans_mm_weight=True, implementation=impl
            )[0]

        g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")))
        return np.asarray(g(x, w))

    np.testing.assert_array_equal(run("ascend"), run("xla"))


def test_a_rank_sending_nothing_is_refused_at_trace_time():
    mesh = make_mesh((2,), ("ep",))
    counts = np.array([[0, 0, 0, 0], [1, 1, 1, 1]])

    def f(x, w):
        return mc2.alltoallv_grouped_matmul(
            x, w, "ep", send_counts=counts, implementation="ascend"
        )[0]

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")))
    with pytest.raises(NotImplementedError, match="rank 0 sends none"):
        g.lower(jnp.ones((8, 16), jnp.float16), jnp.ones((4, 16, 8), jnp.float16))


@pytest.mark.parametrize(
    "op, function",
    [
        (mc2.alltoallv_grouped_matmul, "aclnnAlltoAllvGroupedMatMul"),
        (mc2.grouped_matmul_alltoallv, "aclnnGroupedMatMulAlltoAllv"),
    ],
    ids=["dispatch", "combine"],
)
def test_float32_is_refused_at_lowering(op, function):
    """The 'generic' target accepts float32 gmm_x; CANN's AlltoAllv grouped
    matmuls take fp16/bf16 only, so the ascend lowering refuses it."""
    mesh = make_mesh((2,), ("ep",))
    counts = np.full((2, 4), 1)

    def f(x, w):
        return op(x, w, "ep", send_counts=counts, implementation="ascend")[0]

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")))
    with pytest.raises(
        NotImplementedError,
        match=rf"^{op.__name__}: implementation='ascend' takes gmm_x as float16 or bfloat16 "
        rf"\({function} has no float32 kernel\), got float32\(4, 16\)",
    ):
        g.lower(jnp.ones((8, 16), jnp.float32), jnp.ones((4, 16, 8), jnp.float32))


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_dispatch_then_combine_returns_input_order(world):
    experts, h = 2, 8
    rng = np.random.default_rng(world)
    table = t.count_table("random", world, experts, rng)
    table[:, 0] += 1  # every rank sends something (CANN's rule)
    recv = t.ep_oracle.recv_table(table, experts)
    bsk = int(table.sum(1).max())
    xs = rng.integers(-8, 8, size=(world, bsk, h)).astype(jnp.bfloat16)
    eye = np.broadcast_to(np.eye(h), (world, experts, h, h)).astype(jnp.bfloat16)
    mesh = make_mesh((world,), ("ep",))

    def f(x, w):
        y, _, _ = mc2.alltoallv_grouped_matmul(
            x[0], w[0], "ep", send_counts=table, implementation="ascend"
        )
        back, _ = mc2.grouped_matmul_alltoallv(
            y,
            w[0],
            "ep",
            send_counts=recv,
            recv_counts=table,
            max_out_tokens=bsk,
            implementation="ascend",
        )
        return back[None]

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")))
    back = np.asarray(g(xs, eye), np.float32)
    for r in range(world):
        n = table[r].sum()
        np.testing.assert_array_equal(back[r][:n], np.asarray(xs[r][:n], np.float32))
        assert not back[r][n:].any()
