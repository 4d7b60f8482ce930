"""expert_parallel_moe against a dense single-device NumPy MoE: the no-drop
mode, the capacity factor (drops counted and modelled), the shared expert,
ep=8 and dp=2 x ep=4 meshes, both implementations, and gradients."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMPLEMENTATIONS, make_mesh

import jax_mc2 as mc2
from jax_mc2.parallel import SharedExpert

T, H, F, G, K = 64, 16, 24, 8, 2


def _case(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(dtype)
    rw = rng.standard_normal((H, G)).astype(dtype)
    wg, wu = ((rng.standard_normal((G, H, F)) * 0.3).astype(dtype) for _ in range(2))
    wd = (rng.standard_normal((G, F, H)) * 0.3).astype(dtype)
    shared = SharedExpert(
        *(
            (rng.standard_normal(s) * 0.3).astype(dtype)
            for s in ((H, 2 * F), (H, 2 * F), (2 * F, H))
        )
    )
    return x, rw, wg, wu, wd, shared


def _silu(a):
    return a / (1 + np.exp(-a))


def dense_moe(x, rw, wg, wu, wd, *, shards, capacity_factor=None, shared=None):
    """NumPy model: top-k softmax routing; with a capacity, each of the
    ``shards`` token shards sends each expert at most ceil(c * t * k / G)
    assignments in token order (later ones dropped)."""
    x, rw = np.asarray(x, np.float64), np.asarray(rw, np.float64)
    logits = x @ rw
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    top = np.take_along_axis(logits, ids, 1)
    wts = np.exp(top - top.max(1, keepdims=True))
    wts /= wts.sum(1, keepdims=True)
    t_local = T // shards
    cap = None
    if capacity_factor is not None:  # ceil(c t K / G) with c as written (1.1 = 11/10)
        cap = -(-Fraction(str(capacity_factor)) * t_local * K // G)
    y = np.zeros((T, H))
    dropped = 0
    for shard in range(shards):
        used = np.zeros(G, int)
        for t in range(shard * t_local, (shard + 1) * t_local):
            for j in range(K):
                g = ids[t, j]
                if cap is not None and used[g] >= cap:
                    dropped += 1
                    continue
                used[g] += 1
                a, b = x[t] @ wg[g], x[t] @ wu[g]
                y[t] += wts[t, j] * ((_silu(a) * b) @ wd[g])
    if shared is not None:
        sg, su, sd = (np.asarray(w, np.float64) for w in shared)
        y += (_silu(x @ sg) * (x @ su)) @ sd
    return y, dropped, np.bincount(ids.reshape(-1), minlength=G)


MESHES = {"ep8": ((8,), ("ep",)), "dp2xep4": ((2, 4), ("dp", "ep"))}


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("with_shared", [False, True])
def test_no_drop_matches_dense(impl, mesh_name, with_shared):
    x, rw, wg, wu, wd, shared = _case(1)
    mesh = make_mesh(*MESHES[mesh_name])
    shared = shared if with_shared else None
    out = jax.jit(
        lambda *a: mc2.parallel.expert_parallel_moe(
            *a, mesh=mesh, axis="ep", top_k=K, shared_expert=shared, implementation=impl
        )
    )(x, rw, wg, wu, wd)
    want, _, per_expert = dense_moe(x, rw, wg, wu, wd, shards=8, shared=shared)
    np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-4)
    assert int(out.dropped) == 0
    np.testing.assert_array_equal(out.tokens_per_expert, per_expert)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_factor_drops_like_the_model(impl, capacity_factor):
    x, rw, wg, wu, wd, _ = _case(2)
    mesh = make_mesh((2, 4), ("dp", "ep"))
    out = jax.jit(
        lambda *a: mc2.parallel.expert_parallel_moe(
            *a,
            mesh=mesh,
            axis="ep",
            top_k=K,
            capacity_factor=capacity_factor,
            implementation=impl,
        )
    )(x, rw, wg, wu, wd)
    want, dropped, _ = dense_moe(x, rw, wg, wu, wd, shards=8, capacity_factor=capacity_factor)
    assert int(out.dropped) == dropped
    assert dropped > 0 or capacity_factor > 1
    np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-4)


def test_capacities():
    caps = mc2.parallel.moe_capacities(64, 2, 8, 4, 1.0)
    assert caps == (16, 32, 128, 128)  # per expert, per peer, recv, assignments
    assert mc2.parallel.moe_capacities(64, 2, 8, 4, None) == (128, 128, 512, 128)
    # 1.1 * 1000 / 10 is 110.00000000000001 in floats: the factor is taken as
    # written, 11/10, so 110 assignments per expert, not 111.
    assert mc2.parallel.moe_capacities(500, 2, 10, 2, 1.1).per_expert == 110
    assert mc2.parallel.moe_capacities(500, 2, 10, 2, np.float32(1.1)).per_expert == 110


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bf16_close_to_dense(impl):
    x, rw, wg, wu, wd, shared = _case(3)
    mesh = make_mesh((8,), ("ep",))
    args = [jnp.asarray(a, jnp.bfloat16) for a in (x, rw, wg, wu, wd)]
    sh = SharedExpert(*(jnp.asarray(w, jnp.bfloat16) for w in shared))
    out = mc2.parallel.expert_parallel_moe(
        *args, mesh=mesh, axis="ep", top_k=K, shared_expert=sh, implementation=impl
    )
    f32 = [np.asarray(a, np.float32) for a in args]
    want, _, _ = dense_moe(*f32, shards=8, shared=[np.asarray(w, np.float32) for w in sh])
    err = np.abs(np.asarray(out.y, np.float32) - want).max() / np.abs(want).max()
    assert out.y.dtype == jnp.bfloat16 and err < 3e-2


def _dense_jnp(x, rw, wg, wu, wd, shared):
    logits = x @ rw
    top, ids = jax.lax.top_k(logits, K)
    wts = jax.nn.softmax(top, axis=-1)
    combine = jnp.zeros((T, G)).at[jnp.arange(T)[:, None], ids].set(wts)
    h = jax.nn.silu(jnp.einsum("th,ghf->tgf", x, wg)) * jnp.einsum("th,ghf->tgf", x, wu)
    y = jnp.einsum("tg,tgh->th", combine, jnp.einsum("tgf,gfh->tgh", h, wd))
    sg, su, sd = shared
    return y + (jax.nn.silu(x @ sg) * (x @ su)) @ sd


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_gradients_match_dense(impl, mesh_name):
    x, rw, wg, wu, wd, shared = _case(4)
    mesh = make_mesh(*MESHES[mesh_name])

    def loss_ep(x, rw, wg, wu, wd, shared):
        out = mc2.parallel.expert_parallel_moe(
            x,
            rw,
            wg,
            wu,
            wd,
            mesh=mesh,
            axis="ep",
            top_k=K,
            shared_expert=shared,
            implementation=impl,
        )
        return jnp.sum(out.y**2)

    def loss_dense(x, rw, wg, wu, wd, shared):
        return jnp.sum(_dense_jnp(x, rw, wg, wu, wd, shared) ** 2)

    args = (x, rw, wg, wu, wd, SharedExpert(*shared))
    got = jax.jit(jax.grad(loss_ep, argnums=(0, 1, 2, 3, 4, 5)))(*args)
    want = jax.jit(jax.grad(loss_dense, argnums=(0, 1, 2, 3, 4, 5)))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(axis="tp"), ValueError, "mesh has no axis 'tp'"),
        (dict(top_k=9), ValueError, r"top_k must be in \[1, G = 8\]"),
        (dict(capacity_factor=0.0), ValueError, "capacity_factor must be None or a finite"),
        (dict(capacity_factor=float("inf")), ValueError, "capacity_factor must be None or a"),
        (dict(data_axes=("ep",)), ValueError, "data_axes must be other axes"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    x, rw, wg, wu, wd, _ = _case(0)
    mesh = make_mesh((8,), ("ep",))
    kwargs = dict(dict(axis="ep"), **kwargs)
    with pytest.raises(error, match=match):
        mc2.parallel.expert_parallel_moe(x, rw, wg, wu, wd, mesh=mesh, **kwargs)


@pytest.mark.parametrize("which", ["w_gate", "w_down", "shared_expert.w_up"])
def test_weight_dtype_errors_name_the_wrapper_and_argument(which):
    """A weight of another dtype than x is refused by expert_parallel_moe in
    its own argument names (not by the inner grouped matmul's gmm_weight)."""
    x, rw, wg, wu, wd, shared = _case(0)
    args = dict(w_gate=wg, w_up=wu, w_down=wd)
    if which.startswith("shared_expert."):
        shared = shared._replace(w_up=shared.w_up.astype(np.float16))
    else:
        args[which] = args[which].astype(np.float16)
    mesh = make_mesh((8,), ("ep",))
    with pytest.raises(
        TypeError,
        match=rf"^expert_parallel_moe: {which} dtype must equal x dtype float32, got float16",
    ):
        mc2.parallel.expert_parallel_moe(x, rw, **args, mesh=mesh, axis="ep", shared_expert=shared)


def test_more_than_32_local_experts_is_the_wrappers_error():
    rng = np.random.default_rng(0)
    g = 33
    x = rng.standard_normal((8, H)).astype(np.float32)
    rw = rng.standard_normal((H, g)).astype(np.float32)
    wg = np.zeros((g, H, F), np.float32)
    wd = np.zeros((g, F, H), np.float32)
    with pytest.raises(ValueError, match=r"^expert_parallel_moe: G = 33 experts .* at most 32"):
        mc2.parallel.expert_parallel_moe(
            x, rw, wg, wg, wd, mesh=make_mesh((1,), ("ep",)), axis="ep"
        )


def test_data_axes_may_be_one_name():
    """data_axes="dp" is the one axis "dp" (it had been split into "d" and
    "p"): the call traces as with ("dp",)."""
    x, rw, wg, wu, wd, _ = _case(0)
    mesh = make_mesh((2, 4), ("dp", "ep"))

    def moe(axes):
        return jax.eval_shape(
            lambda *a: mc2.parallel.expert_parallel_moe(
                *a, mesh=mesh, axis="ep", top_k=2, data_axes=axes
            ).y,
            x, rw, wg, wu, wd,
        )  # fmt: skip

    assert moe("dp") == moe(("dp",)) == jax.ShapeDtypeStruct(x.shape, x.dtype)


def test_invalid_shapes():
    x, rw, wg, wu, wd, _ = _case(0)
    mesh = make_mesh((8,), ("ep",))
    with pytest.raises(TypeError, match=r"w_down must be \(G, F, H\)"):
        mc2.parallel.expert_parallel_moe(x, rw, wg, wu, wd[:, :5], mesh=mesh, axis="ep")
    with pytest.raises(ValueError, match="G = 6 experts must be a multiple of the 'ep' size 8"):
        mc2.parallel.expert_parallel_moe(x, rw[:, :6], wg[:6], wu[:6], wd[:6], mesh=mesh, axis="ep")
    with pytest.raises(ValueError, match="T = 60 tokens must be a positive multiple of the 8"):
        mc2.parallel.expert_parallel_moe(x[:60], rw, wg, wu, wd, mesh=mesh, axis="ep")
    _, _, _, _, _, shared = _case(0)
    for bad in (
        shared._replace(w_down=shared.w_down[:, :1]),
        shared._replace(w_up=shared.w_up[:, :4]),
    ):
        with pytest.raises(TypeError, match=r"shared_expert must have w_gate, w_up \(H, Fs\)"):
            mc2.parallel.expert_parallel_moe(
                x, rw, wg, wu, wd, mesh=mesh, axis="ep", shared_expert=bad
            )
