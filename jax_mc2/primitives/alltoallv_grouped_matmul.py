"""AlltoAllv + grouped matmul for MoE expert parallelism (seed 001).

``alltoallv_grouped_matmul`` (aclnnAlltoAllvGroupedMatMul, *dispatch*:
communicate, then compute) and its exact inverse ``grouped_matmul_alltoallv``
(aclnnGroupedMatMulAlltoAllv, *combine*: compute, then communicate)::

    dispatch: ataOut = AlltoAllv(gmmX); permuteOut = Permute(ataOut);
              gmmY = GroupedMatMul(permuteOut, gmmWeight); mmY = mmX @ mmWeight
    combine:  y = AlltoAllv(Unpermute(GroupedMatMul(gmmX, gmmWeight))); mmY = mmX @ mmWeight

Layout (``docs/semantics.md`` §6), with E local experts per rank
and W ranks, global expert ``d*E + e`` living on rank ``d``:

- dispatch ``send_counts[d*E + e]``: rows this rank sends to expert e of rank
  d; ``gmm_x`` rows are grouped by global expert id in that order.
- dispatch ``recv_counts[s*E + e]``: rows it receives from rank s for its
  expert e. ``permute_out`` and ``gmm_y`` are expert-major, source-rank-minor
  (stable); expert e's group uses ``gmm_weight[e]``.
- combine takes the dispatch's layout back: its ``send_counts`` are the
  dispatch's ``recv_counts`` and its ``recv_counts`` the dispatch's
  ``send_counts``; ``y`` rows return to "grouped by global expert id" order.

Counts are static (NumPy/Python integers: a per-rank matrix ``(W, E*W)``, or
one ``(E*W,)`` row every rank uses, as CANN's host arrays) or traced (JAX
arrays of shape ``(E*W,)`` per shard: routing decided at run time).

XLA:CPU has no ragged all-to-all, so on CPU the exchange is XLA's
``all_to_all`` on fixed-capacity chunks: each rank sends every peer
``max_tokens_per_peer`` rows (the exact maximum for static counts). On GPU the
``xla`` implementation uses ``lax.ragged_all_to_all`` instead, one slice per
(peer, expert) block written straight to its place in ``permute_out`` (or, for
the combine, in ``y``), keeping exactly the same rows: identical results with
only the useful bytes on the wire. Outputs are padded to a static
number of rows (``max_recv_tokens`` / ``max_out_tokens``) with zero rows.
With traced counts, rows beyond a capacity are dropped: a chunk keeps its
first ``max_tokens_per_peer`` rows and an output its first rows; dispatch and
combine drop the same rows, so combine stays the exact transpose of dispatch.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_mc2.framework import _compat, targets, validation
from jax_mc2.framework.collective import exchange_counts, world_size_of
from jax_mc2.framework.implementation import FFI, XLA
from jax_mc2.framework.implementation import requested as requested_implementation
from jax_mc2.framework.primitive import MAP, Operand, PrimitiveSpec, register
from jax_mc2.framework.primitive import split_operands as framework_split
from jax_mc2.framework.validation import shape_str
from jax_mc2.implementations import ffi, xla
from jax_mc2.primitives.grouped_matmul import (
    grouped_matmul_offsets,
    grouped_matmul_xla,
    offsets_from_sizes,
    on_xla_gemm,
    static_grouped_matmul,
)

OP_DISPATCH = "alltoallv_grouped_matmul"
OP_COMBINE = "grouped_matmul_alltoallv"
_I32 = jnp.int32
MAX_LOCAL_EXPERTS = 32
MAX_COUNTS = 256


# --------------------------------------------------------------------------
# Counts


def is_static_counts(counts) -> bool:
    """Python/NumPy integers are static counts; JAX arrays are traced."""
    return isinstance(counts, (np.ndarray, list, tuple, int, np.integer, str))


def static_count_table(op, name, counts, *, world, experts) -> np.ndarray:
    """A ``(W, E*W)`` int64 table from a per-rank matrix or one shared row."""
    try:
        table = np.asarray(counts)
    except ValueError:  # NumPy refuses ragged nested lists
        raise validation.type_error(
            op, f"{name} must be a rectangular table of integers, got the ragged {counts!r}"
        ) from None
    if table.dtype.kind not in "iu":
        raise validation.type_error(
            op, f"{name} must hold integers, got {counts!r} (dtype {table.dtype.name})"
        )
    if table.ndim == 1:
        table = np.broadcast_to(table, (world, table.shape[0]))
    want = (world, experts * world)
    if table.shape != want:
        raise validation.type_error(
            op,
            f"{name} must be (e*W,) = ({experts * world},) or the per-rank matrix (W, e*W) = "
            f"{shape_str(want)} with e = {experts} local experts and world size W = {world}, "
            f"got {shape_str(np.shape(counts))}",
        )
    if (table < 0).any():
        raise validation.value_error(op, f"{name} must be >= 0, got {table.min()}")
    if (table > validation.INT32_MAX).any():
        raise validation.value_error(
            op, f"{name} must fit int32 (<= {validation.INT32_MAX}), got {table.max()}"
        )
    sent = table.sum(axis=1)
    received = table.reshape(world, world, experts).sum(axis=(0, 2))  # rank r: column block r
    if (sent > validation.INT32_MAX).any() or (received > validation.INT32_MAX).any():
        raise validation.value_error(
            op,
            f"{name}: every rank's sent and received rows must fit int32 "
            f"(<= {validation.INT32_MAX}), got sent {sent.tolist()} and received "
            f"{received.tolist()}",
        )
    return table.astype(np.int64)


def transpose_count_table(table: np.ndarray, *, world: int, experts: int) -> np.ndarray:
    """The receiving side of a count table: ``recv[r][s*E+e] = send[s][r*E+e]``."""
    t = np.asarray(table).reshape(world, world, experts)
    return t.transpose(1, 0, 2).reshape(world, world * experts)


def _max_chunk(table, experts):
    """The most rows one rank sends one peer."""
    table = np.asarray(table)
    if table.size == 0:
        return 0
    return int(table.reshape(table.shape[0], -1, experts).sum(-1).max())


# --------------------------------------------------------------------------
# Layout: index maps on this rank's int32 counts (shared by both
# implementations; cheap integer work on E*W counts and the row indices).


def _xp(counts):
    """NumPy for a static table's counts (known when tracing), jnp for traced ones."""
    return np if isinstance(counts, np.ndarray) else jnp


def _clip_chunks(counts, world, experts, capacity):
    """Per-peer counts by expert, [W, E], clipped so each peer's chunk holds
    at most ``capacity`` rows. Returns (kept rows, offset inside the chunk)."""
    xp = _xp(counts)
    c = counts.reshape(world, experts)
    end = xp.cumsum(c, axis=1, dtype=np.int32)
    start = xp.minimum(end - c, capacity)
    return xp.minimum(end, capacity) - start, start


def _expert_major(kept):
    """Start and end of each (expert e, peer r) block at flat index e*W + r
    in the expert-major, peer-minor order."""
    flat = kept.T.reshape(-1)
    end = jnp.cumsum(flat, dtype=_I32)
    return end - flat, end


def _group_offsets(kept, rows):
    """(E + 1,) int32 group boundaries of the expert-major rows, capped at
    ``rows`` (rows past the capacity are dropped)."""
    xp = _xp(kept)
    sizes = kept.sum(axis=0, dtype=np.int32)
    ends = xp.cumsum(sizes, dtype=np.int32)
    return xp.minimum(xp.concatenate([xp.zeros(1, np.int32), ends]), rows)


def group_offsets(counts, world, experts, capacity, rows):
    """The group boundaries of the expert-major rows the per-peer ``counts``
    (E*W,) lay out, each peer chunk clipped to ``capacity`` (NumPy for NumPy
    counts)."""
    return _group_offsets(_clip_chunks(counts, world, experts, capacity)[0], rows)


def _token_slots(counts, world, experts, capacity, rows):
    """Dispatch's send side: for each chunk slot ``[W * capacity]``, the
    token row (grouped by global expert id) it carries, or -1."""
    per_peer = counts.reshape(world, experts).sum(axis=1, dtype=_I32)
    start = jnp.cumsum(per_peer, dtype=_I32) - per_peer
    j = jnp.arange(capacity, dtype=_I32)
    row = start[:, None] + j[None, :]
    ok = (j[None, :] < jnp.minimum(per_peer, capacity)[:, None]) & (row < rows)
    return jnp.where(ok, row, -1).reshape(-1)


def _token_rows(counts, world, experts, capacity, rows):
    """Combine's receive side, the inverse map: for each of ``rows`` token
    rows, the chunk slot it came back in, or -1."""
    per_peer = counts.reshape(world, experts).sum(axis=1, dtype=_I32)
    end = jnp.cumsum(per_peer, dtype=_I32)
    i = jnp.arange(rows, dtype=_I32)
    peer = jnp.clip(jnp.searchsorted(end, i, side="right").astype(_I32), 0, world - 1)
    j = i - (end - per_peer)[peer]
    ok = (i < end[-1]) & (j < jnp.minimum(per_peer, capacity)[peer])
    return jnp.where(ok, peer * capacity + j, -1)


def _expert_rows_index(counts, world, experts, capacity, rows):
    """For each of ``rows`` expert-major rows, its chunk slot (peer * capacity
    + offset), or -1 past the data; plus the (E + 1,) group offsets."""
    kept, inner = _clip_chunks(counts, world, experts, capacity)
    start, end = _expert_major(kept)
    p = jnp.arange(rows, dtype=_I32)
    q = jnp.clip(jnp.searchsorted(end, p, side="right").astype(_I32), 0, world * experts - 1)
    e, peer = q // world, q % world
    slot = peer * capacity + inner[peer, e] + (p - start[q])
    return jnp.where(p < end[-1], slot, -1), _group_offsets(kept, rows)


def _slot_expert_rows(counts, world, experts, capacity, rows):
    """For each chunk slot ``[W * capacity]``, the expert-major row it
    carries, or -1 (combine's send side, the inverse of the map above)."""
    kept, inner = _clip_chunks(counts, world, experts, capacity)
    start, _ = _expert_major(kept)
    j = jnp.arange(capacity, dtype=_I32)
    chunk_end = inner + kept  # [W, E]
    e = (j[None, :, None] >= chunk_end[:, None, :]).sum(-1, dtype=_I32)  # [W, C]
    ok = e < experts
    e = jnp.minimum(e, experts - 1)
    peer = jnp.arange(world, dtype=_I32)[:, None]
    p = start[e * world + peer] + j[None, :] - inner[peer, e]
    return jnp.where(ok & (p < rows), p, -1).reshape(-1)


def take_rows(x, index):
    """``x[index]`` with zero rows where index is -1."""
    padded = jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])
    return padded[jnp.where(index < 0, x.shape[0], index)]


#: The ragged all-to-all the GPU path calls (tests substitute an emulation to
#: check the offsets on CPU, where XLA has no ragged all-to-all).
ragged_all_to_all = lax.ragged_all_to_all
#: Platforms whose XLA lowers ragged all-to-all; tests add "cpu".
RAGGED_PLATFORMS = {"cuda", "rocm"}


def uses_ragged_exchange(impl, platforms) -> bool:
    """The xla implementation on GPU exchanges exactly the rows the counts
    say (``lax.ragged_all_to_all``) instead of fixed-capacity chunks."""
    return impl == XLA and all(p in RAGGED_PLATFORMS for p in platforms)


def _zero_padded(x, rows):
    return jnp.concatenate([x, jnp.zeros((rows, *x.shape[1:]), x.dtype)])


def _fit(offsets, sizes, rows):
    """Receive slices clipped to an output of ``rows`` rows (an empty slice
    starts at most at ``rows``, inside the bounds XLA checks too)."""
    return jnp.minimum(offsets, rows), jnp.clip(jnp.minimum(sizes, rows - offsets), 0)


def _reply(offsets, sizes, world, axis_name):
    """Every receiver tells every sender where each of its (W*E,) slices
    lands and how many of its rows fit: one small all-to-all."""
    both = jnp.stack([offsets, sizes], axis=-1).reshape(world, -1, 2)
    got = lax.all_to_all(both, axis_name, 0, 0, tiled=True).reshape(-1, 2)
    return got[:, 0], got[:, 1]


def _ragged_dispatch(x, send_c, recv_c, world, experts, capacity, out_rows, axis_name):
    """``permute_out`` straight from one ragged all-to-all: block (d, e) of x
    lands at its expert-major place on rank d. The same rows as the
    fixed-capacity exchange (chunks clipped to ``capacity``, rows past
    ``out_rows`` dropped, rows past x zero)."""
    kept, _ = _clip_chunks(recv_c, world, experts, capacity)  # [s, e]
    start, _ = _expert_major(kept)  # at e*W + s
    recv_off = start.reshape(experts, world).T.reshape(-1)  # at s*E + e
    recv_off, recv_size = _fit(recv_off, kept.reshape(-1), out_rows)
    out_off, send_size = _reply(recv_off, recv_size, world, axis_name)
    in_off = jnp.minimum(jnp.cumsum(send_c, dtype=_I32) - send_c, x.shape[0])
    out = jnp.zeros((out_rows, x.shape[1]), x.dtype)
    return ragged_all_to_all(
        _zero_padded(x, capacity), out, in_off, send_size, out_off, recv_size, axis_name=axis_name
    )


def _ragged_combine(local, send_c, recv_c, world, experts, capacity, out_rows, axis_name):
    """The inverse: block (e, d) of the expert-major rows goes back to rank
    d, straight to its place in the token order."""
    kept_send, _ = _clip_chunks(send_c, world, experts, capacity)  # [d, e]
    start, _ = _expert_major(kept_send)  # at e*W + d
    in_off = jnp.minimum(start.reshape(experts, world).T.reshape(-1), local.shape[0])
    kept, inner = _clip_chunks(recv_c, world, experts, capacity)  # [s, e]
    per_peer = recv_c.reshape(world, experts).sum(axis=1, dtype=_I32)
    token_off = ((jnp.cumsum(per_peer, dtype=_I32) - per_peer)[:, None] + inner).reshape(-1)
    recv_off, recv_size = _fit(token_off, kept.reshape(-1), out_rows)
    out_off, send_size = _reply(recv_off, recv_size, world, axis_name)
    out = jnp.zeros((out_rows, local.shape[1]), local.dtype)
    return ragged_all_to_all(
        _zero_padded(local, capacity),
        out,
        in_off,
        send_size,
        out_off,
        recv_size,
        axis_name=axis_name,
    )


def _exchange(buf, axis_name):
    """Chunk r of ``buf`` [W * C, H] goes to rank r; returns the chunks
    received, source-rank-major (XLA's all-to-all)."""
    return lax.all_to_all(buf, axis_name, 0, 0, tiled=True) if axis_name else buf


# --------------------------------------------------------------------------
# Local compute


def _shared_matmul(mm_x, mm_w, *, trans, impl, parallelism):
    if mm_x.shape[1] == 0:  # H2 = 0 (generic target): an empty sum
        return jnp.zeros((mm_x.shape[0], mm_w.shape[0] if trans else mm_w.shape[1]), mm_x.dtype)
    if impl == FFI:
        return ffi.matmul(mm_x, mm_w, transpose_x2=trans, parallelism=parallelism)
    return xla.local_matmul(mm_x, mm_w, transpose_x2=trans)


# --------------------------------------------------------------------------
# Primitives. Both take: x, [weight], [send, recv] (traced counts),
# [mm_x, mm_weight]. ``has_weight=False`` is the data movement alone (the
# transpose of the other primitive's data movement).


def _traced_counts(params):
    return params["send_table"] is None


OPERANDS = (
    Operand("gmm_x"),
    Operand("gmm_weight", flag="has_weight"),
    Operand("send_counts", present=_traced_counts),
    Operand("recv_counts", present=_traced_counts),
    Operand("mm_x", flag="has_mm"),
    Operand("mm_weight", flag="has_mm"),
)


def split_operands(operands, params):
    """(gmm_x, gmm_weight, send, recv, mm_x, mm_weight), None where absent."""
    return tuple(framework_split(OPERANDS, operands, params).values())


def _join_operands(x, w, send, recv, mm_x, mm_w):
    return [a for a in (x, w, send, recv, mm_x, mm_w) if a is not None]


def _op_name(prim):
    return OP_DISPATCH if prim is dispatch_p else OP_COMBINE


def _check_counts_operand(op, name, aval, length):
    if aval.shape != (length,) or not jnp.issubdtype(aval.dtype, jnp.integer):
        raise validation.type_error(
            op,
            f"traced {name} must be an integer array of shape (e*W,) = ({length},) per shard, "
            f"got {aval.dtype.name}{shape_str(aval.shape)}",
        )


def _check_chip(op, x, n1, rows_sent, mm_x, n2, out_rows, params):
    support = targets.operator_support(op)
    targets.check_world_size(op, params["world_size"], params["axis_name"])
    limits = support.ep_limits
    if limits is None:
        return
    name = targets.get_target()
    h1 = x.shape[1]
    # Seed 001: H1, N1, N2 in (0, 65536); H2 in (0, 12288].
    sizes = {"H1": (h1, limits.max_hidden), "N1": (n1, limits.max_hidden)}
    if mm_x is not None:
        sizes["H2 = mm_x.shape[1]"] = (mm_x.shape[1], limits.max_shared_hidden)
        sizes["N2"] = (n2, limits.max_hidden)
    for dim, (size, limit) in sizes.items():
        if not 0 < size <= limit:
            raise validation.unsupported(
                op, f"{dim} = {size} must be in (0, {limit}] on target {name!r}"
            )
    bsk = x.shape[0] if op == OP_DISPATCH else out_rows
    if not 0 < bsk <= limits.max_tokens:
        raise validation.unsupported(
            op, f"BSK = {bsk} must be in (0, {limits.max_tokens + 1}) on target {name!r}"
        )
    # Seed 001: K = BSK / BS, the experts each of the shared expert's BS
    # tokens is routed to, in [2, 8].
    if mm_x is not None:
        bs = mm_x.shape[0]
        if bs < 1 or bsk % bs or not 2 <= bsk // bs <= 8:
            raise validation.unsupported(
                op,
                f"with the shared expert, BSK = {bsk} must be K * BS with BS = mm_x.shape[0] = "
                f"{bs} and top-k K in [2, 8] on target {name!r}",
            )
    if limits.traffic_bytes is not None:
        lo, hi = limits.traffic_bytes
        width, itemsize = (h1 if op == OP_DISPATCH else n1), np.dtype(x.dtype).itemsize
        # Every card's: a static table's rows of each rank, else the buffer's.
        for rank, sent in enumerate(rows_sent):
            traffic = int(sent) * width * itemsize
            if not lo <= traffic <= hi:
                card = f"rank {rank}'s " if len(rows_sent) > 1 else ""
                raise validation.unsupported(
                    op,
                    f"{card}per-card traffic {traffic} bytes ({int(sent)} rows x {width} x "
                    f"{itemsize} B) must be in [{lo // 2**20} MB, {hi // 2**20} MB] on target "
                    f"{name!r}",
                )


def _abstract_eval(prim, *operands, **params):
    op = _op_name(prim)
    x, w, send, recv, mm_x, mm_w = split_operands(operands, params)
    world, experts = params["world_size"], params["experts"]
    targets.operator_support(op)
    layout = "(BSK, H1)" if prim is dispatch_p else "(A, H1)"
    validation.check_rank(op, "gmm_x", x, (2,), layout)
    targets.check_float_dtype(op, "gmm_x", x)
    rows, h1 = x.shape
    n1 = h1 if w is None else _check_gmm_weight(op, x, w, experts, params["trans_weight"])
    if experts < 1 or experts > MAX_LOCAL_EXPERTS:
        raise validation.value_error(
            op, f"e (local experts) must be in [1, {MAX_LOCAL_EXPERTS}], got {experts}"
        )
    if experts * world > MAX_COUNTS:
        raise validation.value_error(
            op,
            f"e * W = {experts} * {world} = {experts * world} exceeds {MAX_COUNTS} (the "
            "length of send_counts / recv_counts)",
        )
    if send is not None:
        _check_counts_operand(op, "send_counts", send, experts * world)
        _check_counts_operand(op, "recv_counts", recv, experts * world)
        rows_sent = (rows,)
    else:
        rows_sent = _check_static_counts(prim, op, rows, params)
    mm_out, n2 = [], None
    if mm_x is not None:
        n2 = _check_shared_expert(op, x, mm_x, mm_w, params["trans_mm_weight"])
        mm_out = [_compat.result_aval(mm_x, (mm_x.shape[0], n2), mm_x.dtype, [mm_x, mm_w])]
    _check_chip(op, x, n1, rows_sent, mm_x, n2, params["out_rows"], params)
    axes = params["axis_name"]
    gmm_inputs = [a for a in (x, w, send, recv) if a is not None]
    y = _compat.result_aval(x, (params["out_rows"], n1), x.dtype, gmm_inputs, varying_axes=axes)
    outs = [y, *mm_out]
    if params["permute_out"]:
        outs.append(
            _compat.result_aval(x, (params["out_rows"], h1), x.dtype, gmm_inputs, varying_axes=axes)
        )
    return outs, _compat.named_axis_effects(axes)


def _check_gmm_weight(op, x, w, experts, trans):
    """gmm_weight [e, H1, N1] ([e, N1, H1] transposed) in gmm_x's dtype; returns N1."""
    h1 = x.shape[1]
    wl = "(e, N1, H1)" if trans else "(e, H1, N1)"
    k_w = w.shape[2] if (w.ndim == 3 and trans) else (w.shape[1] if w.ndim == 3 else None)
    if w.ndim != 3 or k_w != h1 or w.shape[0] != experts:
        raise validation.type_error(
            op,
            f"gmm_weight must be 3-D {wl} with H1 == gmm_x.shape[1] == {h1}"
            f"{' (trans_gmm_weight=True)' if trans else ''}, got {shape_str(w.shape)}",
        )
    validation.check_same_dtype(op, "gmm_weight", w, "gmm_x", x)
    return w.shape[1] if trans else w.shape[2]


def _check_static_counts(prim, op, rows, params):
    """A static count table against gmm_x's rows and the capacities; returns
    the rows each rank sends."""
    world, experts = params["world_size"], params["experts"]
    table = np.asarray(params["send_table"])
    sums = table.sum(axis=1)
    if sums.max(initial=0) > rows:
        r = int(sums.argmax())
        raise validation.type_error(
            op,
            f"gmm_x has {rows} rows but rank {r} sends sum(send_counts) = {int(sums[r])}",
        )
    recv_sums = transpose_count_table(table, world=world, experts=experts).sum(axis=1)
    if recv_sums.max(initial=0) > params["out_rows"]:
        arg = _out_arg(prim)
        raise validation.value_error(
            op,
            f"{arg} = {params['out_rows']} is smaller than the {int(recv_sums.max())} "
            "rows a rank receives with these static counts",
        )
    if _max_chunk(table, experts) > params["peer_capacity"]:
        raise validation.value_error(
            op,
            f"max_tokens_per_peer = {params['peer_capacity']} is smaller than the "
            f"{_max_chunk(table, experts)} rows one rank sends one peer with these counts",
        )
    return tuple(int(v) for v in sums)


def _check_shared_expert(op, x, mm_x, mm_w, trans):
    """mm_x [BS, H2] and mm_weight [H2, N2] ([N2, H2] transposed); returns N2."""
    validation.check_rank(op, "mm_x", mm_x, (2,), "(BS, H2)")
    validation.check_same_dtype(op, "mm_x", mm_x, "gmm_x", x)
    validation.check_same_dtype(op, "mm_weight", mm_w, "gmm_x", x)
    h2 = mm_x.shape[1]
    if mm_w.ndim != 2 or (mm_w.shape[1] if trans else mm_w.shape[0]) != h2:
        wl = "(N2, H2)" if trans else "(H2, N2)"
        raise validation.type_error(
            op,
            f"mm_weight must be 2-D {wl} with H2 == mm_x.shape[1] == {h2}, got "
            f"{shape_str(mm_w.shape)}",
        )
    return mm_w.shape[0] if trans else mm_w.shape[1]


def static_tables(params):
    """The static (send, recv) count tables [W, E*W] as int32 NumPy."""
    world, experts = params["world_size"], params["experts"]
    table = np.asarray(params["send_table"], np.int32)
    return table, transpose_count_table(table, world=world, experts=experts).astype(np.int32)


def rank_counts(params, send, recv):
    """This rank's (send, recv) int32 count vectors: the traced operands, or
    its row of the static tables."""
    if params["send_table"] is None:
        # Negative traced counts count as 0 in both implementations.
        return jnp.maximum(send.astype(_I32), 0), jnp.maximum(recv.astype(_I32), 0)
    table, recv_table = static_tables(params)
    if not params["axis_name"]:
        return jnp.asarray(table[0]), jnp.asarray(recv_table[0])
    rank = lax.axis_index(params["axis_name"])
    return jnp.asarray(table)[rank], jnp.asarray(recv_table)[rank]


def dispatch_group_offsets(params, send, recv):
    """The (E + 1,) group boundaries of the dispatch output rows."""
    _, recv_c = rank_counts(params, send, recv)
    world, experts, cap = params["world_size"], params["experts"], params["peer_capacity"]
    return group_offsets(recv_c, world, experts, cap, params["out_rows"])


def combine_group_offsets(params, send, rows):
    """The (E + 1,) group boundaries of the combine's ``rows`` input rows."""
    send_c, _ = rank_counts(params, send, send)
    world, experts, cap = params["world_size"], params["experts"], params["peer_capacity"]
    return group_offsets(send_c, world, experts, cap, rows)


def rank_group_sizes(params, rows, *, received):
    """Each rank's group sizes (one tuple of E Python ints per rank) of its
    ``rows`` expert-major rows when the counts are static, else None.
    ``received``: the dispatch's output rows (laid out by the received
    counts), else the combine's input rows (by the sent counts). Without an
    axis the rank alone uses row 0 (as :func:`rank_counts`)."""
    if params["send_table"] is None:
        return None
    world, experts, cap = params["world_size"], params["experts"], params["peer_capacity"]
    table = static_tables(params)[1 if received else 0]
    if not params["axis_name"]:
        table = table[:1]
    return tuple(
        tuple(int(v) for v in np.diff(group_offsets(row, world, experts, cap, rows)))
        for row in table
    )


def _xla_gemm_group_sizes(params, w, rows, parallelism, *, received):
    """:func:`rank_group_sizes` when the ``ffi`` implementation runs these
    grouped products on XLA's GEMM, one dot a group; None for the C++ kernel."""
    sizes = rank_group_sizes(params, rows, received=received)
    k, n = (w.shape[2], w.shape[1]) if params["trans_weight"] else (w.shape[1], w.shape[2])
    return sizes if on_xla_gemm(w.dtype, rows, k, n, parallelism, sizes) else None


def _grouped_matmul_by_rank(x, w, sizes, params):
    """The grouped matmul of x's expert-major rows on XLA's GEMM with each
    rank's static group sizes."""
    return static_grouped_matmul(
        x, w, sizes, params["axis_name"], trans_weight=params["trans_weight"]
    )


def _dispatch_composition(*operands, impl, parallelism, platforms, **params):
    x, w, send, recv, mm_x, mm_w = split_operands(operands, params)
    world, experts = params["world_size"], params["experts"]
    cap, out_rows = params["peer_capacity"], params["out_rows"]
    send_c, recv_c = rank_counts(params, send, recv)
    outs = []
    if uses_ragged_exchange(impl, platforms) and params["axis_name"]:
        permuted = _ragged_dispatch(
            x, send_c, recv_c, world, experts, cap, out_rows, params["axis_name"]
        )
        if w is not None:
            offsets = group_offsets(recv_c, world, experts, cap, out_rows)
            outs.append(
                grouped_matmul_xla(permuted, w, offsets, trans_weight=params["trans_weight"])
            )
        if w is None or params["permute_out"]:
            outs.append(permuted)
        return _with_shared(outs, mm_x, mm_w, params, impl, parallelism)
    slots = _token_slots(send_c, world, experts, cap, x.shape[0])
    received = _exchange(take_rows(x, slots), params["axis_name"])
    gather, offsets = _expert_rows_index(recv_c, world, experts, cap, out_rows)
    static = None
    if w is not None and impl == FFI:
        static = _xla_gemm_group_sizes(params, w, out_rows, parallelism, received=True)
    if w is None:
        outs.append(take_rows(received, gather))
    elif impl == FFI and static is None:
        res = ffi.grouped_matmul(
            received,
            w,
            offsets,
            gather,
            jnp.arange(out_rows, dtype=_I32),
            out_rows=out_rows,
            transpose_w=params["trans_weight"],
            permute_out=params["permute_out"],
            parallelism=parallelism,
        )
        outs += list(res) if params["permute_out"] else [res]
    else:
        permuted = take_rows(received, gather)
        if static is not None:
            outs.append(_grouped_matmul_by_rank(permuted, w, static, params))
        else:
            outs.append(
                grouped_matmul_xla(permuted, w, offsets, trans_weight=params["trans_weight"])
            )
        if params["permute_out"]:
            outs.append(permuted)
    return _with_shared(outs, mm_x, mm_w, params, impl, parallelism)


def _with_shared(outs, mm_x, mm_w, params, impl, parallelism):
    """Inserts the shared expert's ``mm_y`` after the first output."""
    if mm_x is not None:
        mm_y = _shared_matmul(
            mm_x, mm_w, trans=params["trans_mm_weight"], impl=impl, parallelism=parallelism
        )
        outs.insert(1, mm_y)
    return outs


def _combine_composition(*operands, impl, parallelism, platforms, **params):
    x, w, send, recv, mm_x, mm_w = split_operands(operands, params)
    world, experts = params["world_size"], params["experts"]
    cap, out_rows = params["peer_capacity"], params["out_rows"]
    send_c, recv_c = rank_counts(params, send, recv)
    rows = x.shape[0]
    static = None
    if w is not None and impl == FFI:
        static = _xla_gemm_group_sizes(params, w, rows, parallelism, received=False)
    if w is not None and impl == FFI and static is None:
        # The grouped matmul scatters its rows straight into the chunks.
        dst, offsets = _expert_rows_index(send_c, world, experts, cap, rows)
        buf = ffi.grouped_matmul(
            x,
            w,
            offsets,
            jnp.arange(rows, dtype=_I32),
            dst,
            out_rows=world * cap,
            transpose_w=params["trans_weight"],
            permute_out=False,
            parallelism=parallelism,
        )
    else:
        local = x
        if static is not None:
            local = _grouped_matmul_by_rank(x, w, static, params)
        elif w is not None:
            offsets = group_offsets(send_c, world, experts, cap, rows)
            local = grouped_matmul_xla(x, w, offsets, trans_weight=params["trans_weight"])
        if uses_ragged_exchange(impl, platforms) and params["axis_name"]:
            y = _ragged_combine(
                local, send_c, recv_c, world, experts, cap, out_rows, params["axis_name"]
            )
            return _with_shared([y], mm_x, mm_w, params, impl, parallelism)
        buf = take_rows(local, _slot_expert_rows(send_c, world, experts, cap, rows))
    received = _exchange(buf, params["axis_name"])
    rows_index = _token_rows(recv_c, world, experts, cap, out_rows)
    return _with_shared([take_rows(received, rows_index)], mm_x, mm_w, params, impl, parallelism)


def _ffi_lowering(composition):
    def fn(*operands, parallelism, **params):
        return composition(*operands, impl=FFI, parallelism=parallelism, **params)

    return fn


def _xla_lowering(composition):
    def fn(*operands, **params):
        return composition(*operands, impl=XLA, parallelism=1, **params)

    return fn


# --------------------------------------------------------------------------
# Autodiff. Each primitive is linear in gmm_x for a fixed weight, and its
# transpose in gmm_x is the other primitive with the transposed weight and
# the counts swapped: the transpose of dispatch is combine, and vice versa.


def swapped_params(params, *, out_rows):
    """The other primitive's parameters for the same exchange, reversed."""
    table = params["send_table"]
    if table is not None:
        table = transpose_count_table(
            np.asarray(table), world=params["world_size"], experts=params["experts"]
        )
        table = tuple(tuple(int(c) for c in row) for row in table)
    return dict(
        params,
        send_table=table,
        out_rows=out_rows,
        trans_weight=not params["trans_weight"],
        has_mm=False,
        permute_out=False,
    )


def _transpose(prim, cts, *operands, **params):
    other = combine_p if prim is dispatch_p else dispatch_p
    x, w, send, recv, mm_x, _ = split_operands(operands, params)
    ad = _compat.ad
    if not ad.is_undefined_primal(x) or (w is not None and ad.is_undefined_primal(w)):
        raise NotImplementedError(
            f"{_op_name(prim)}: transposition is defined in gmm_x only (for a fixed weight)"
        )
    if mm_x is not None:
        raise NotImplementedError(f"{_op_name(prim)}: the shared expert is not transposed here")
    cts = list(cts)
    ct_y = cts[0]
    ct_perm = cts[-1] if params["permute_out"] else ad.Zero(x.aval)
    sp = swapped_params(params, out_rows=x.aval.shape[0])
    swapped = (None, None) if send is None else (recv, send)
    ct_x = None
    if type(ct_y) is not ad.Zero:
        ct_x = other.bind(*_join_operands(ct_y, w, *swapped, None, None), **sp)[0]
    if type(ct_perm) is not ad.Zero:
        moved = other.bind(
            *_join_operands(ct_perm, None, *swapped, None, None), **dict(sp, has_weight=False)
        )[0]
        ct_x = moved if ct_x is None else ct_x + moved
    if ct_x is None:
        ct_x = ad.Zero(x.aval)
    return [ct_x] + [None] * (len(operands) - 1)


def _instantiate(t, primal):
    if t is None:
        return None
    if type(t) is _compat.ad.Zero:
        return jnp.zeros(primal.shape, primal.dtype)
    return t


def _jvp(prim, primals, tangents, **params):
    x, w, send, recv, mm_x, mm_w = split_operands(primals, params)
    dx, dw, _, _, dmm_x, dmm_w = split_operands(tangents, params)
    dx, dw, dmm_x, dmm_w = (
        _instantiate(t, p) for t, p in ((dx, x), (dw, w), (dmm_x, mm_x), (dmm_w, mm_w))
    )
    is_dispatch = prim is dispatch_p
    need_perm = is_dispatch and w is not None
    primal_params = dict(params, permute_out=params["permute_out"] or need_perm)
    outs = prim.bind(*primals, **primal_params)
    counts = (None, None) if send is None else (send, recv)
    lin = dict(params, has_mm=False)
    t_outs = prim.bind(*_compat.match_vma(*_join_operands(dx, w, *counts, None, None)), **lin)
    t_y = t_outs[0]
    if w is not None:
        # The weight's tangent runs through the local grouped-matmul
        # primitive, whose transpose is the grouped weight gradient.
        local = dict(
            trans_weight=params["trans_weight"],
            implementation=params["implementation"],
            rank_axis=params["axis_name"],
        )
        if is_dispatch:
            offsets = dispatch_group_offsets(params, send, recv)
            sizes = rank_group_sizes(params, params["out_rows"], received=True)
            t_y = t_y + grouped_matmul_offsets(outs[-1], dw, offsets, static_sizes=sizes, **local)
        else:
            offsets = combine_group_offsets(params, send, x.shape[0])
            sizes = rank_group_sizes(params, x.shape[0], received=False)
            z = grouped_matmul_offsets(x, dw, offsets, static_sizes=sizes, **local)
            t_y = (
                t_y
                + prim.bind(
                    *_join_operands(z, None, *counts, None, None), **dict(lin, has_weight=False)
                )[0]
            )
    result, tangent = [outs[0]], [t_y]
    if mm_x is not None:
        result.append(outs[1])
        trans = params["trans_mm_weight"]
        t_mm = xla.product_tangent(mm_x, mm_w, dmm_x, dmm_w, transpose_x2=trans)
        tangent.append(t_mm.astype(mm_x.dtype))
    if params["permute_out"]:
        result.append(outs[-1])
        tangent.append(t_outs[-1])
    return result, tangent


def _spec(name, operator, composition, primitive):
    """The spec of the dispatch or the combine; ``primitive()`` is the
    registered primitive (looked up when a rule runs)."""
    return PrimitiveSpec(
        name=name,
        operator=operator,
        operands=OPERANDS,
        abstract_eval=lambda *a, **p: _abstract_eval(primitive(), *a, **p),
        xla=_xla_lowering(composition),
        ffi=_ffi_lowering(composition),
        multiple_results=True,
        pass_context=True,
        batching=MAP,  # each batch element is its own exchange
        jvp=lambda primals, tangents, **p: _jvp(primitive(), primals, tangents, **p),
        transpose=lambda cts, *a, **p: _transpose(primitive(), cts, *a, **p),
    )


dispatch_p = register(
    _spec("mc2_alltoallv_grouped_matmul", OP_DISPATCH, _dispatch_composition, lambda: dispatch_p)
)
combine_p = register(
    _spec("mc2_grouped_matmul_alltoallv", OP_COMBINE, _combine_composition, lambda: combine_p)
)
# --------------------------------------------------------------------------
# The run-time check of traced counts (docs/semantics.md §6.6)


def _check_counts_abstract_eval(given, derived, total, used, **params):
    del given, derived, total, params
    return _compat.result_aval(used, used.shape, jnp.int32, [used])


def _check_counts_xla(given, derived, total, used, **params):
    """``xla`` cannot fail at run time: the counts used are the ones the
    peers send, whatever ``recv_counts`` says."""
    del given, derived, total, params
    return used


def _check_counts_ffi(given, derived, total, used, *, op, check_recv, rows, per_rank, parallelism):
    del parallelism
    return ffi.check_counts(
        given, derived, total, used, op=op, check_recv=check_recv, rows=rows, per_rank=per_rank
    )


check_counts_p = register(
    PrimitiveSpec(
        name="mc2_check_counts",
        operator=lambda params: params["op"],
        operands=(Operand("given"), Operand("derived"), Operand("total"), Operand("used")),
        abstract_eval=_check_counts_abstract_eval,
        effectful=False,
        xla=_check_counts_xla,
        ffi=_check_counts_ffi,
        batching=MAP,
        not_differentiable="integer counts",
    )
)


def _clip_in_dtype(counts, bound):
    """Counts clipped to [0, bound] in their own dtype, then int32."""
    counts = jnp.asarray(counts)
    hi = min(bound, int(jnp.iinfo(counts.dtype).max))
    return jnp.clip(counts, 0, hi).astype(_I32)


def traced_counts(
    prim, op, send, given_recv, *, rows, peer, out_rows, world, experts, axes, implementation
):
    """The (send, recv) int32 operands of traced counts (docs/semantics.md
    §6.6): each count clipped to [0, max(rows, peer, out_rows)] in its own
    dtype (no int32 sum can overflow, and no clipped count changes which
    rows are kept); a dispatch's send counts clipped further so that their
    running sum stops at the rows of gmm_x (a rank sends only rows it has);
    the receive counts are always what the peers send (one all-to-all of
    the clipped send counts). Given recv_counts are checked at run time by
    ``ffi`` (and ignored by ``xla``)."""
    bound = max(rows, peer, out_rows, 1)
    if experts * world * bound >= 2**31:
        raise validation.value_error(
            op,
            f"traced counts need e * W * max(rows, max_tokens_per_peer, output rows) < 2^31 "
            f"for int32 count arithmetic, got {experts} * {world} * {bound}",
        )
    send_c = _clip_in_dtype(send, bound)
    used_send = send_c
    if prim is dispatch_p:
        used_send = jnp.diff(offsets_from_sizes(send_c, rows))
    used_recv = exchange_counts(used_send, axes)
    if given_recv is None:
        return used_send, used_recv
    given_recv = jnp.asarray(given_recv)
    _check_counts_operand(op, "recv_counts", given_recv, experts * world)
    given = _clip_in_dtype(given_recv, bound)
    derived = used_recv  # what the peers send: a dispatch's counts clipped to its rows
    total = jnp.zeros((), _I32)  # no row check: rows past gmm_x read as zero rows
    if axes:
        # Every rank checks every rank's counts, so that all fail alike and
        # none is left waiting in a later collective.
        given, derived, total = (
            lax.all_gather(a, axes, tiled=a.ndim > 0) for a in (given, derived, total)
        )
    used_recv = check_counts_p.bind(
        *_compat.match_vma(given, derived, total, used_recv),
        op=op,
        check_recv=True,
        rows=-1,
        per_rank=experts * world,
        implementation=implementation,
        world_size=1,
    )
    return used_send, used_recv


# --------------------------------------------------------------------------
# Binding a public call


def _common_params(op, gmm_weight, axis_name, send_counts, recv_counts, implementation):
    axes = validation.canonical_axis_name(op, axis_name)
    impl = requested_implementation(op, implementation)
    world = world_size_of(op, axes)
    w_shape = np.shape(gmm_weight)
    if len(w_shape) != 3:
        raise validation.type_error(
            op, f"gmm_weight must be 3-D (e, H1, N1), got {shape_str(w_shape)}"
        )
    experts = int(w_shape[0])
    if experts < 1:
        raise validation.value_error(
            op, f"e (local experts) must be in [1, {MAX_LOCAL_EXPERTS}], got 0"
        )
    if send_counts is None:
        raise validation.type_error(
            op,
            "send_counts is required: a static (W, e*W) / (e*W,) integer table or a traced "
            "(e*W,) integer array, got None",
        )
    static = is_static_counts(send_counts)
    if recv_counts is not None and is_static_counts(recv_counts) != static:
        raise validation.type_error(
            op,
            "send_counts and recv_counts must both be static (NumPy) or both traced (JAX), got "
            f"{type(send_counts).__name__} send_counts and {type(recv_counts).__name__} "
            "recv_counts",
        )
    return axes, impl, world, experts


def _resolve_counts(op, send_counts, recv_counts, *, world, experts, axes):
    """(send table or None, send operand, recv operand)."""
    if is_static_counts(send_counts):
        table = static_count_table(op, "send_counts", send_counts, world=world, experts=experts)
        if recv_counts is not None:
            recv = static_count_table(op, "recv_counts", recv_counts, world=world, experts=experts)
            derived = transpose_count_table(table, world=world, experts=experts)
            if not np.array_equal(recv, derived):
                r, i = (int(a[0]) for a in np.nonzero(recv != derived))
                s, e = divmod(i, experts)
                raise validation.value_error(
                    op,
                    f"recv_counts disagree with send_counts: rank {r} recv_counts[{i}] = "
                    f"{int(recv[r, i])} but rank {s} send_counts[{r * experts + e}] = "
                    f"{int(derived[r, i])} (recv[s*e+j] must equal rank s's send[rank*e+j])",
                )
        return tuple(tuple(int(c) for c in row) for row in table), None, None
    send = jnp.asarray(send_counts)
    if not jnp.issubdtype(send.dtype, jnp.integer) or send.shape != (experts * world,):
        raise validation.type_error(
            op,
            f"traced send_counts must be an integer array of shape (e*W,) = "
            f"({experts * world},) per shard, got {send.dtype.name}{shape_str(send.shape)}",
        )
    recv = None if recv_counts is None else jnp.asarray(recv_counts)
    return None, send, recv


def _capacity(op, name, value, default, minimum=0):
    if value is None:
        if default > validation.INT32_MAX:
            raise validation.value_error(
                op,
                f"the default {name} = {default} must fit int32 (<= {validation.INT32_MAX}); "
                "pass a smaller one",
            )
        return default
    return validation.check_int32(op, name, value, minimum=minimum)


def _check_mm_pair(op, mm_x, mm_weight):
    if (mm_x is None) != (mm_weight is None):
        raise validation.value_error(
            op,
            "mm_x and mm_weight (the shared expert) must be given together or not at all, got "
            f"mm_x={validation.describe(mm_x)} and mm_weight={validation.describe(mm_weight)}",
        )


def _out_arg(prim):
    """The public name of the output-rows capacity."""
    return "max_recv_tokens" if prim is dispatch_p else "max_out_tokens"


def _static_capacities(prim, op, table, gmm_x, max_out, max_tokens_per_peer, *, world, experts):
    """With static counts: the dispatch's gmm_x has the largest rank's
    sum(send_counts) rows; returns the (max_tokens_per_peer, output rows)
    capacities, the exact maxima unless given."""
    sums = np.asarray(table).sum(axis=1)
    rows = int(np.shape(gmm_x)[0]) if np.ndim(gmm_x) == 2 else 0
    if prim is dispatch_p and np.ndim(gmm_x) == 2 and int(sums.max()) != rows:
        raise validation.type_error(
            op,
            f"gmm_x rows BSK = {rows} must equal sum(send_counts) = {int(sums.max())} (the "
            f"largest rank's; per rank: {sums.tolist()})",
        )
    peer = _capacity(
        op, "max_tokens_per_peer", max_tokens_per_peer, _max_chunk(table, experts), minimum=1
    )
    received = transpose_count_table(np.asarray(table), world=world, experts=experts)
    return peer, _capacity(op, _out_arg(prim), max_out, int(received.sum(1).max()))


def bind_operator(
    prim,
    gmm_x,
    gmm_weight,
    axis_name,
    *,
    send_counts,
    recv_counts,
    mm_x,
    mm_weight,
    trans_gmm_weight,
    trans_mm_weight,
    permute_out,
    max_out,
    max_tokens_per_peer,
    implementation,
):
    """Canonicalizes a public call (counts, capacities) and binds ``prim``."""
    op = _op_name(prim)
    validation.check_given(op, gmm_x=gmm_x, gmm_weight=gmm_weight, send_counts=send_counts)
    _check_mm_pair(op, mm_x, mm_weight)
    axes, impl, world, experts = _common_params(
        op, gmm_weight, axis_name, send_counts, recv_counts, implementation
    )
    table, send, recv = _resolve_counts(
        op, send_counts, recv_counts, world=world, experts=experts, axes=axes
    )
    rows = int(np.shape(gmm_x)[0]) if np.ndim(gmm_x) == 2 else 0
    if table is not None:
        peer, out_rows = _static_capacities(
            prim, op, table, gmm_x, max_out, max_tokens_per_peer, world=world, experts=experts
        )
    else:
        peer = _capacity(op, "max_tokens_per_peer", max_tokens_per_peer, rows, minimum=1)
        out_rows = _capacity(op, _out_arg(prim), max_out, world * peer)
        send, recv = traced_counts(
            prim,
            op,
            send,
            recv,
            rows=rows,
            peer=max(peer, 1),
            out_rows=out_rows,
            world=world,
            experts=experts,
            axes=axes,
            implementation=impl,
        )
    has_mm = mm_x is not None
    # Every rank's rows go out (and their cotangents come back) over the axes:
    # gmm_x varies over all of them, a replicated one by a cast whose
    # transpose sums its cotangent. Like lax ops, cast the other operands
    # invariant along an axis another one varies in (pvary), so reverse mode
    # psums their cotangents.
    operands = list(
        _compat.match_vma(
            _compat.varying_over_all(jnp.asarray(gmm_x), axes),
            jnp.asarray(gmm_weight),
            *([] if table is not None else [send, recv]),
        )
    )
    if has_mm:
        operands += list(_compat.match_vma(jnp.asarray(mm_x), jnp.asarray(mm_weight)))
    return prim.bind(
        *operands,
        send_table=table,
        experts=experts,
        peer_capacity=max(peer, 1),
        out_rows=out_rows,
        trans_weight=validation.check_bool(op, "trans_gmm_weight", trans_gmm_weight),
        trans_mm_weight=validation.check_bool(op, "trans_mm_weight", trans_mm_weight),
        has_weight=True,
        has_mm=has_mm,
        permute_out=permute_out,
        axis_name=axes,
        world_size=world,
        implementation=impl,
    )
