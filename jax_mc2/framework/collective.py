"""The collective parameters every communicating primitive binds with."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from jax_mc2.framework import validation
from jax_mc2.framework.implementation import requested as requested_implementation
from jax_mc2.framework.typing import AxisName
from jax_mc2.framework.validation import shape_str


def world_size_of(op: str, axis_name: tuple[str, ...]) -> int:
    """Size of the communication group; a NameError naming ``op`` and the
    axis if a name is unbound."""
    if not axis_name:
        return 1
    try:
        return int(lax.axis_size(axis_name))
    except NameError as e:
        raise NameError(
            f"{op}: axis_name={axis_name!r} names an axis that is not bound here ({e}); call "
            "the operator inside shard_map over a mesh with that axis, or pass axis_name=None "
            "for a group of one"
        ) from None


def collective_params(
    op: str, axis_name: AxisName, comm_turn: int, implementation: str | None
) -> dict[str, Any]:
    """The canonical ``axis_name``, ``world_size``, ``comm_turn`` and
    ``implementation`` parameters every primitive of the family binds with."""
    axes = validation.canonical_axis_name(op, axis_name)
    impl = requested_implementation(op, implementation)
    comm_turn = validation.check_comm_turn(op, comm_turn)
    return {
        "axis_name": axes,
        "world_size": world_size_of(op, axes),
        "comm_turn": comm_turn,
        "implementation": impl,
    }


def exchange_counts(send_counts: ArrayLike, axis_name: AxisName) -> Array:
    """This rank's ``recv_counts[s*e + j]`` from every rank's traced
    ``send_counts[d*e + j]`` (e*W,): one small all-to-all over ``axis_name``.
    The dispatch derives them itself; a combine after it needs them as its
    ``send_counts`` (and the dispatch's send counts as its recv_counts)."""
    axis_name = validation.canonical_axis_name("exchange_counts", axis_name)
    send_counts = jnp.asarray(send_counts)
    world = world_size_of("exchange_counts", axis_name)
    if (
        send_counts.ndim != 1
        or not jnp.issubdtype(send_counts.dtype, jnp.integer)
        or send_counts.shape[0] % world
    ):
        raise validation.type_error(
            "exchange_counts",
            f"send_counts must be a 1-D integer array of e*W counts (W = {world}), got "
            f"{send_counts.dtype.name}{shape_str(send_counts.shape)}",
        )
    if not axis_name:
        return send_counts
    chunks = send_counts.reshape(world, -1)
    return lax.all_to_all(chunks, axis_name, 0, 0, tiled=True).reshape(-1)
