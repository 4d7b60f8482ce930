"""An expert-parallel mixture-of-experts layer over a mesh axis.

Tokens are sharded over every mesh axis (the data axes, then the expert
axis); the routed experts are sharded over the expert axis ``axis`` (expert
``g`` lives on rank ``g // e`` of it, with e = G / W local experts) and
replicated over the data axes. Each rank routes its own tokens:

    top-k routing -> per-expert counts -> alltoallv_grouped_matmul (dispatch,
    gate+up projection, shared expert alongside) -> SwiGLU ->
    grouped_matmul_alltoallv (down projection, combine) -> weighted sum

The counts are traced (routing happens at run time), so the all-to-alls run
at a static capacity. With ``capacity_factor`` c, every rank sends each
expert at most ``ceil(c * t * k / G)`` of its ``t * k`` token-expert
assignments (GShard's per-group capacity; later assignments, in token order,
are dropped and counted), and the all-to-all moves about ``c`` times the
useful bytes. ``capacity_factor=None`` is the exact no-drop mode: every
capacity is the worst case, ``t * k`` rows per peer (W times the useful
bytes).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_mc2.framework import numerics, validation
from jax_mc2.framework.typing import ArrayLike, Implementation
from jax_mc2.framework.validation import shape_str
from jax_mc2.operators.alltoallv_grouped_matmul import (
    alltoallv_grouped_matmul,
    exchange_counts,
    grouped_matmul_alltoallv,
)
from jax_mc2.parallel.tensor_parallel import (
    _as_array,
    _check_like_x,
    check_mesh_type,
    shard_map_global,
)
from jax_mc2.primitives.alltoallv_grouped_matmul import MAX_COUNTS, MAX_LOCAL_EXPERTS

OP = "expert_parallel_moe"
_F32 = jnp.float32


class SharedExpert(NamedTuple):
    """A SwiGLU shared expert every token goes through (replicated weights).

    w_gate, w_up: [H, Fs]; w_down: [Fs, H]."""

    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array


class MoEOutput(NamedTuple):
    """y: [T, H] like x. dropped: int32, token-expert assignments dropped by
    the capacity over the whole mesh. tokens_per_expert: int32 [G], the
    routed assignments per expert before dropping, over the whole mesh."""

    y: jax.Array
    dropped: jax.Array
    tokens_per_expert: jax.Array


class Capacities(NamedTuple):
    """Static sizes of one rank's exchange (see :func:`moe_capacities`)."""

    per_expert: int  # assignments one rank may send one expert
    per_peer: int  # rows one rank sends one peer in the all-to-all
    recv: int  # rows a rank can receive (the dispatch output rows)
    assignments: int  # t * k rows a rank routes


def moe_capacities(tokens, top_k, num_experts, world, capacity_factor):
    """The static sizes :func:`expert_parallel_moe` uses for one rank.

    Args:
      tokens: local tokens per rank; top_k: experts per token;
      num_experts: experts over the whole mesh (a multiple of ``world``);
      world: ranks on the expert-parallel axis;
      capacity_factor: None (exact, no drops: every capacity is the worst
        case) or c > 0 (GShard: ``ceil(c * tokens * top_k / num_experts)``
        assignments per expert and rank, exact for c as written: 1.1 is 11/10;
        at most ``tokens * top_k``, which drops nothing).

    Returns:
      :class:`Capacities` ``(per_expert, per_peer, recv, assignments)``.
    """
    op = "moe_capacities"
    for name, value, least in (("tokens", tokens, 0), ("top_k", top_k, 1), ("world", world, 1)):
        validation.check_int(op, name, value, minimum=least)
    validation.check_int(op, "num_experts", num_experts)
    if num_experts < world or num_experts % world:
        raise validation.value_error(
            op, f"num_experts must be a positive multiple of world = {world}, got {num_experts}"
        )
    if top_k > num_experts:
        raise validation.value_error(
            op, f"top_k must be at most num_experts = {num_experts}, got {top_k}"
        )
    _check_capacity_factor(op, capacity_factor)
    a = tokens * top_k
    local = num_experts // world
    if capacity_factor is None:
        return Capacities(a, a, world * a, a)
    # In exact arithmetic on the factor as written (1.1 is 11/10): in floats
    # 1.1 * 1000 / 10 is 110.00000000000001, whose ceiling is 111.
    factor = Fraction(str(capacity_factor))
    # A rank has at most a assignments for one expert: a larger capacity
    # drops nothing either.
    c = min(a, max(1, math.ceil(factor * a / num_experts)))
    per_peer = min(a, local * c)
    return Capacities(c, per_peer, min(world * per_peer, num_experts * c), a)


def swiglu(h):
    """[..., 2F] gate|up -> silu(gate) * up, computed in fp32."""
    gate, up = jnp.split(numerics.widened(h), 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(h.dtype)


def route(x, router_weight, top_k):
    """Top-k routing: (expert ids [t, k] int32, weights [t, k] fp32, the
    softmax over the k selected logits)."""
    # Full fp32 products on every backend (XLA:GPU's default is TF32, which
    # would move logits near a tie across it and route a token elsewhere).
    logits = jnp.dot(
        numerics.widened(x), numerics.widened(router_weight), precision=lax.Precision.HIGHEST
    )
    top, ids = lax.top_k(logits, top_k)
    return ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


def _local_moe(
    x,
    router_weight,
    w_gate_up,
    w_down,
    shared,
    *,
    axis,
    all_axes,
    top_k,
    num_experts,
    world,
    capacity_factor,
    implementation,
):
    t, _ = x.shape
    caps = moe_capacities(t, top_k, num_experts, world, capacity_factor)
    ids, weights = route(x, router_weight, top_k)
    flat = ids.reshape(-1)  # assignment i = token i // k, its (i % k)-th expert
    by_expert = jnp.argsort(flat, stable=True)
    sorted_ids = flat[by_expert]
    first = jnp.searchsorted(sorted_ids, jnp.arange(num_experts, dtype=jnp.int32))
    slot = (
        jnp.zeros_like(flat)
        .at[by_expert]
        .set(jnp.arange(flat.shape[0], dtype=jnp.int32) - first[sorted_ids])
    )
    keep = slot < caps.per_expert
    # Kept assignments grouped by expert id, then the dropped ones.
    order = jnp.argsort(jnp.where(keep, flat, num_experts), stable=True)
    send = jnp.zeros(num_experts, jnp.int32).at[flat].add(keep.astype(jnp.int32))
    recv = exchange_counts(send, (axis,))
    gmm_x = x[order // top_k]
    mm = {}
    if shared is not None:
        mm = dict(mm_x=x, mm_weight=jnp.concatenate([shared.w_gate, shared.w_up], axis=1))
    h, h_shared, _ = alltoallv_grouped_matmul(
        gmm_x,
        w_gate_up,
        axis,
        send_counts=send,
        recv_counts=recv,
        max_recv_tokens=caps.recv,
        max_tokens_per_peer=caps.per_peer,
        implementation=implementation,
        **mm,
    )
    if shared is not None:
        mm = dict(mm_x=swiglu(h_shared), mm_weight=shared.w_down)
    out, out_shared = grouped_matmul_alltoallv(
        swiglu(h),
        w_down,
        axis,
        send_counts=recv,
        recv_counts=send,
        max_out_tokens=caps.assignments,
        max_tokens_per_peer=caps.per_peer,
        implementation=implementation,
        **mm,
    )
    # Back to assignment order (dropped assignments come back as zero rows).
    per_assignment = numerics.widened(out[jnp.argsort(order)].reshape(t, top_k, -1))
    y = jnp.einsum("tk,tkh->th", weights, per_assignment, precision=lax.Precision.HIGHEST)
    if shared is not None:
        y = y + numerics.widened(out_shared)
    dropped = lax.psum(jnp.sum(~keep, dtype=jnp.int32), all_axes)
    per_expert = lax.psum(jnp.zeros(num_experts, jnp.int32).at[flat].add(1), all_axes)
    return y.astype(x.dtype), dropped, per_expert


def expert_parallel_moe(
    x: ArrayLike,
    router_weight: ArrayLike,
    w_gate: ArrayLike,
    w_up: ArrayLike,
    w_down: ArrayLike,
    *,
    mesh: Mesh,
    axis: str,
    top_k: int = 2,
    capacity_factor: float | None = None,
    shared_expert: SharedExpert | None = None,
    data_axes: str | tuple[str, ...] | None = None,
    implementation: Implementation = None,
) -> MoEOutput:
    """Mixture of SwiGLU experts with expert parallelism over ``axis``.

    Args:
      x: [T, H] float16/bfloat16 (float32 on the generic target); T is
        sharded over ``(*data_axes, axis)``.
      router_weight: [H, G], replicated; routing logits ``x @ router_weight``
        in fp32, top ``top_k`` experts per token, weights the softmax over
        the selected logits.
      w_gate, w_up: [G, H, F]; w_down: [G, F, H]; sharded over ``axis`` on
        their first dimension (G a multiple of the axis size W, G / W <= 32).
      mesh: the ``Mesh``; axis: its expert-parallel axis name.
      top_k: experts per token.
      capacity_factor: None for the exact no-drop mode, or c > 0: each rank
        sends each expert at most ``ceil(c * t * top_k / G)`` of its ``t *
        top_k`` assignments (t local tokens); the rest are dropped and
        counted in ``dropped``.
      shared_expert: an optional :class:`SharedExpert` (replicated weights),
        computed alongside the routed experts by the operators' shared-expert
        matmuls and added to every token.
      data_axes: the other mesh axes the tokens are sharded over, a name or
        a tuple of distinct names (default: every mesh axis but ``axis``).
      implementation: passed to the operators.

    Returns:
      :class:`MoEOutput` ``(y [T, H], dropped, tokens_per_expert [G])``.
    """
    check_mesh_type(OP, mesh)
    x, router_weight, w_gate, w_up, w_down = (
        _as_array(a) for a in (x, router_weight, w_gate, w_up, w_down)
    )
    data_axes = _check_mesh_axes(mesh, axis, data_axes)
    world = mesh.shape[axis]
    g = _check_weights(x, router_weight, w_gate, w_up, w_down)
    _check_moe_sizes(mesh, axis, data_axes, x.shape[0], g, world, top_k, capacity_factor)
    _check_shared_expert(shared_expert, x.shape[1])
    _check_expert_dtypes(x, w_gate, w_up, w_down, shared_expert)
    all_axes = (*data_axes, axis)
    token_spec = P(all_axes)
    w_gate_up = jnp.concatenate([w_gate, w_up], axis=2)
    shared_specs = None if shared_expert is None else SharedExpert(P(), P(), P())

    def body(x, router_weight, w_gate_up, w_down, shared):
        return _local_moe(
            x,
            router_weight,
            w_gate_up,
            w_down,
            shared,
            axis=axis,
            all_axes=all_axes,
            top_k=top_k,
            num_experts=g,
            world=world,
            capacity_factor=capacity_factor,
            implementation=implementation,
        )

    y, dropped, per_expert = shard_map_global(
        body,
        mesh,
        (token_spec, P(), P(axis), P(axis), shared_specs),
        (token_spec, P(), P()),
        (x, router_weight, w_gate_up, w_down, shared_expert),
    )
    return MoEOutput(y, dropped, per_expert)


def _check_mesh_axes(mesh, axis, data_axes):
    """The expert-parallel axis is the mesh's; returns the data axes (by
    default every other axis)."""
    if axis not in mesh.axis_names:
        raise validation.value_error(
            OP, f"mesh has no axis {axis!r}; its axes are {mesh.axis_names}"
        )
    if data_axes is None:
        data_axes = tuple(a for a in mesh.axis_names if a != axis)
    data_axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    for a in data_axes:
        if a not in mesh.axis_names or a == axis:
            raise validation.value_error(
                OP, f"data_axes must be other axes of the mesh {mesh.axis_names}, got {data_axes}"
            )
    if len(set(data_axes)) != len(data_axes):
        raise validation.value_error(OP, f"data_axes must not repeat an axis, got {data_axes}")
    return data_axes


def _check_weights(x, router_weight, w_gate, w_up, w_down):
    """x (T, H), router_weight (H, G), w_gate / w_up (G, H, F), w_down (G, F, H); returns G."""
    if x.ndim != 2:
        raise validation.type_error(OP, f"x must be 2-D (T, H), got shape {shape_str(x.shape)}")
    tokens, hidden = x.shape
    g = router_weight.shape[-1]
    if router_weight.shape != (hidden, g):
        raise validation.type_error(
            OP,
            f"router_weight must be (H, G) with H == {hidden}, got "
            f"{shape_str(router_weight.shape)}",
        )
    if w_gate.ndim != 3 or w_gate.shape[:2] != (g, hidden) or w_up.shape != w_gate.shape:
        raise validation.type_error(
            OP,
            f"w_gate and w_up must be (G, H, F) with G == {g}, H == {hidden}, got "
            f"{shape_str(w_gate.shape)} and {shape_str(w_up.shape)}",
        )
    ffn = w_gate.shape[2]
    if w_down.shape != (g, ffn, hidden):
        raise validation.type_error(
            OP,
            f"w_down must be (G, F, H) = {shape_str((g, ffn, hidden))}, got "
            f"{shape_str(w_down.shape)}",
        )
    return g


def _check_expert_dtypes(x, w_gate, w_up, w_down, shared_expert):
    """The expert weights (and the shared expert's) have x's dtype: the
    grouped matmuls take one dtype."""
    shared = {} if shared_expert is None else shared_expert._asdict()
    _check_like_x(
        OP,
        x,
        w_gate=w_gate,
        w_up=w_up,
        w_down=w_down,
        **{f"shared_expert.{k}": _as_array(v) for k, v in shared.items()},
    )


def _check_moe_sizes(mesh, axis, data_axes, tokens, g, world, top_k, capacity_factor):
    """G divides over the axis within the operators' expert counts, top_k fits
    G, T over the shards, capacity_factor > 0."""
    if g % world:
        raise validation.value_error(
            OP, f"G = {g} experts must be a multiple of the {axis!r} size {world}"
        )
    if g // world > MAX_LOCAL_EXPERTS or g > MAX_COUNTS:
        raise validation.value_error(
            OP,
            f"G = {g} experts over the {axis!r} size {world} must give at most "
            f"{MAX_LOCAL_EXPERTS} experts a rank and G <= {MAX_COUNTS}, got {g // world} a rank",
        )
    validation.check_int(OP, "top_k", top_k)
    if not 1 <= top_k <= g:
        raise validation.value_error(OP, f"top_k must be in [1, G = {g}], got {top_k}")
    shards = world * math.prod(mesh.shape[a] for a in data_axes)
    if tokens % shards or not tokens:
        raise validation.value_error(
            OP, f"T = {tokens} tokens must be a positive multiple of the {shards} shards of x"
        )
    _check_capacity_factor(OP, capacity_factor)
    caps = moe_capacities(tokens // shards, top_k, g, world, capacity_factor)
    for name, value in zip(caps._fields, caps):
        if value > validation.INT32_MAX:
            raise validation.value_error(
                OP,
                f"the {name} capacity {value} (t = {tokens // shards} tokens per rank, top_k = "
                f"{top_k}, G = {g}, W = {world}, capacity_factor = {capacity_factor}) must fit "
                f"int32 (<= {validation.INT32_MAX}); use more shards or a capacity_factor",
            )


def _check_capacity_factor(op, capacity_factor):
    if capacity_factor is not None and (
        isinstance(capacity_factor, (bool, np.bool_))
        or not isinstance(capacity_factor, (int, float, np.integer, np.floating))
        or not 0 < capacity_factor < math.inf
    ):
        raise validation.value_error(
            op, f"capacity_factor must be None or a finite number > 0, got {capacity_factor!r}"
        )


def _check_shared_expert(shared_expert, hidden):
    """None, or a SharedExpert of (H, Fs), (H, Fs) and (Fs, H) weights."""
    if shared_expert is None:
        return
    if not isinstance(shared_expert, SharedExpert):
        raise validation.type_error(
            OP, f"shared_expert must be a SharedExpert or None, got {type(shared_expert)}"
        )
    sg, su, sd = (np.shape(a) for a in shared_expert)
    if len(sg) != 2 or sg[0] != hidden or su != sg or sd != (sg[1], hidden):
        raise validation.type_error(
            OP,
            f"shared_expert must have w_gate, w_up (H, Fs) and w_down (Fs, H) with H = "
            f"{hidden}, got {shape_str(sg)}, {shape_str(su)} and {shape_str(sd)}",
        )
