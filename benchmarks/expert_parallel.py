"""Expert-parallel benchmark cases: the grouped matmul on one device and the
AlltoAllv dispatch operator on the simulated mesh (used by benchmarks.run).

- Grouped matmul, G groups of a [M, K] x [G, K, N] problem with uniform or
  Zipf-skewed group sizes: the ``ffi`` kernel (``mc2_grouped_matmul_ffi``,
  as the dispatch operator calls it), the dispatch operator itself on one
  device (``axis_name=None``, both implementations), ``jax.lax.ragged_dot``
  and a dense batched einsum ``gmk,gkn->gmn`` doing the same useful FLOPs
  (M / G rows per group).
- Dispatch on W devices: ``alltoallv_grouped_matmul`` with static counts
  (uniform, Zipf) and traced counts at a 1.25 capacity factor, ``ffi``
  against ``xla`` (the unfused lax composition: all_to_all + gather +
  ragged_dot). Bytes moved / useful bytes is the all-to-all's fixed-capacity
  payload over the rows the counts really send.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2
from jax_mc2.implementations import ffi as _ffi


def group_sizes(routing, m, groups, rng):
    """Rows per group summing to m: equal, or Zipf-skewed (p ~ 1/rank^1.2)."""
    if routing == "uniform":
        sizes = np.full(groups, m // groups)
        sizes[: m - sizes.sum()] += 1
        return sizes
    p = 1.0 / np.arange(1, groups + 1) ** 1.2
    return rng.multinomial(m, p / p.sum())


def grouped_matmul_case(m, k, n, groups, routing, dtype, impls, repeat, time_interleaved):
    """Median ms per contender and the group sizes."""
    rng = np.random.default_rng(5)
    sizes = group_sizes(routing, m, groups, rng)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((groups, k, n)) / np.sqrt(k), dtype)
    xb = jnp.asarray(rng.standard_normal((groups, m // groups, k)), dtype)
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]), jnp.int32)
    rows = jnp.arange(m, dtype=jnp.int32)
    gs = jnp.asarray(sizes, jnp.int32)

    def kernel(x, w, xb):
        return _ffi.grouped_matmul(
            x,
            w,
            offsets,
            rows,
            rows,
            out_rows=m,
            transpose_w=False,
            permute_out=False,
            parallelism=1,
        )

    def operator(impl):
        def f(x, w, xb):
            return mc2.alltoallv_grouped_matmul(x, w, None, send_counts=sizes, implementation=impl)[
                0
            ]

        return f

    fns = {"ffi grouped matmul kernel": kernel} if "ffi" in impls else {}
    fns.update({f"{impl} operator, 1 device": operator(impl) for impl in impls})
    fns["lax.ragged_dot"] = lambda x, w, xb: jax.lax.ragged_dot(
        x, w, gs, preferred_element_type=jnp.float32
    ).astype(x.dtype)
    fns["dense batched einsum"] = lambda x, w, xb: jnp.einsum(
        "gmk,gkn->gmn", xb, w, preferred_element_type=jnp.float32
    ).astype(x.dtype)
    times = time_interleaved({k_: jax.jit(f) for k_, f in fns.items()}, (x, w, xb), repeat)
    return times, sizes


def dispatch_case(world, bsk, h, n, experts, counts, dtype, impls, repeat, time_interleaved):
    """Median ms of the dispatch operator per implementation, and the
    all-to-all's bytes moved / useful bytes."""
    rng = np.random.default_rng(6)
    g = world * experts
    if counts == "uniform":
        table = np.full((world, g), bsk // g)
    elif counts == "zipf":
        p = 1.0 / np.arange(1, g + 1) ** 1.2
        p = p[rng.permutation(g)] / p.sum()
        table = np.stack([rng.multinomial(bsk, p) for _ in range(world)])
    else:  # traced, random routing
        table = np.stack([rng.multinomial(bsk, np.full(g, 1.0 / g)) for _ in range(world)])
    traced = counts.startswith("traced")
    cap = math.ceil(1.25 * bsk / world) if traced else None
    mesh = Mesh(np.array(jax.devices()[:world]), ("ep",))
    x = jnp.asarray(rng.standard_normal((world * bsk, h)), dtype)
    w = jnp.asarray(rng.standard_normal((g, h, n)) / np.sqrt(h), dtype)
    t = jnp.asarray(table, jnp.int32)

    def op(impl):
        def f(x, w, t):
            y, _, _ = mc2.alltoallv_grouped_matmul(
                x,
                w,
                "ep",
                send_counts=t[0] if traced else table,
                max_tokens_per_peer=cap,
                max_recv_tokens=None if not traced else world * cap,
                implementation=impl,
            )
            return y

        return jax.jit(
            jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep")), out_specs=P("ep"))
        )

    times = time_interleaved({impl: op(impl) for impl in impls}, (x, w, t), repeat)
    chunks = table.reshape(world, world, experts).sum(-1)  # rows rank r sends rank d
    per_peer = cap if traced else int(chunks.max())
    moved = world * world * per_peer  # rows in the all-to-all payload, all ranks
    useful = int(np.minimum(chunks, per_peer).sum())  # rows the counts really send
    flops = 2.0 * useful * h * n  # useful FLOPs over all ranks
    return times, moved / useful, flops
