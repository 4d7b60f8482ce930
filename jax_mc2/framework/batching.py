"""vmap helpers shared by the operator families' batching rules."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jax_mc2.framework import _compat


def move_batch_to_front(args, dims, size):
    """Every operand with its batch dimension first (unbatched ones broadcast)."""
    out = []
    for a, d in zip(args, dims):
        if a is None:
            out.append(None)
        elif d is _compat.NOT_MAPPED:
            out.append(jnp.broadcast_to(a, (size, *a.shape)))
        else:
            out.append(jnp.moveaxis(a, d, 0))
    return out


def map_over_batch(fn, args, dims):
    """Applies ``fn`` to each batch element with ``lax.map``: the rule for
    operands (weights, bias, gamma) that cannot be folded into rows."""
    not_mapped = _compat.NOT_MAPPED
    mapped_idx = [i for i, d in enumerate(dims) if d is not not_mapped and args[i] is not None]
    mapped = [jnp.moveaxis(args[i], dims[i], 0) for i in mapped_idx]

    def body(slices):
        full = list(args)
        for i, s in zip(mapped_idx, slices):
            full[i] = s
        return fn(*full)

    return lax.map(body, mapped)
