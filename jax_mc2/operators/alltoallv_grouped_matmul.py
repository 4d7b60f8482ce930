"""The public AlltoAllv + grouped matmul entry points for MoE expert
parallelism (seed 001): ``alltoallv_grouped_matmul`` (dispatch),
``grouped_matmul_alltoallv`` (combine) and ``exchange_counts``. The layout
and the exchange are described in
:mod:`jax_mc2.primitives.alltoallv_grouped_matmul`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_mc2.framework import validation
from jax_mc2.framework.collective import exchange_counts
from jax_mc2.framework.typing import Array, ArrayLike, AxisName, Implementation
from jax_mc2.framework.validation import check_bool, shape_str
from jax_mc2.primitives.alltoallv_grouped_matmul import (
    OP_DISPATCH,
    bind_operator,
    combine_p,
    dispatch_p,
)
from jax_mc2.primitives.grouped_matmul import offsets_from_sizes

__all__ = [
    "alltoallv_grouped_matmul",
    "dispatch_counts",
    "exchange_counts",
    "grouped_matmul_alltoallv",
]


def dispatch_counts(send_counts: ArrayLike, rows: int, axis_name: AxisName) -> tuple[Array, Array]:
    """The counts a dispatch of ``rows`` gmm_x rows a rank uses with the
    traced ``send_counts`` (e*W,): ``(sent, received)``, int32 (e*W,).

    A rank sends only rows it has: its counts are clipped in order so that
    their running sum stops at ``rows`` (negative counts send nothing,
    docs/semantics.md §6.6), and ``received`` is the all-to-all of every
    rank's ``sent``. The combine that returns the dispatch's rows takes
    ``send_counts=received, recv_counts=sent``. Counts that never exceed the
    rows give ``(send_counts, exchange_counts(send_counts, axis_name))``.
    """
    op = "dispatch_counts"
    rows = validation.check_int32(op, "rows", rows, minimum=0)
    counts = jnp.asarray(send_counts)
    if counts.ndim != 1 or not jnp.issubdtype(counts.dtype, jnp.integer):
        raise validation.type_error(
            op,
            f"send_counts must be a 1-D integer array (e*W,), got "
            f"{counts.dtype.name}{shape_str(counts.shape)}",
        )
    sent = jnp.diff(offsets_from_sizes(counts, rows))
    return sent, exchange_counts(sent, axis_name)


def alltoallv_grouped_matmul(
    gmm_x: ArrayLike,
    gmm_weight: ArrayLike,
    axis_name: AxisName,
    *,
    send_counts: ArrayLike,
    recv_counts: ArrayLike | None = None,
    mm_x: ArrayLike | None = None,
    mm_weight: ArrayLike | None = None,
    trans_gmm_weight: bool = False,
    trans_mm_weight: bool = False,
    permute_out_flag: bool = False,
    max_recv_tokens: int | None = None,
    max_tokens_per_peer: int | None = None,
    implementation: Implementation = None,
) -> tuple[Array, Array | None, Array | None]:
    """AlltoAllv + Permute + grouped matmul (MoE dispatch), with an optional
    shared-expert matmul alongside (aclnnAlltoAllvGroupedMatMul).

    Args:
      gmm_x: [BSK, H1] float16/bfloat16 (float32 on the generic target), rows
        grouped by global expert id ``d*e + j``. With static counts BSK is
        the largest rank's ``sum(send_counts)``; rows past a rank's own sum
        are ignored.
      gmm_weight: [e, H1, N1], or [e, N1, H1] with ``trans_gmm_weight``;
        e local experts per rank.
      axis_name: the expert-parallel mesh axis (or tuple of axes) bound by
        ``shard_map``; None for a group of one.
      send_counts: rows to expert j of rank d at ``[d*e + j]``. Static: a
        NumPy/Python ``(W, e*W)`` per-rank matrix or one ``(e*W,)`` row for
        every rank. Traced: an integer JAX array ``(e*W,)`` per shard, of
        any integer dtype; a rank sends only the rows it has: its traced
        counts are clipped in order so that their running sum stops at BSK
        (no int32 overflow whatever their values, docs/semantics.md §6.6).
      recv_counts: rows from rank s for local expert j at ``[s*e + j]``;
        optional (derived from send_counts: statically, or by a small
        all-to-all of the traced counts). Checked against send_counts when
        static. Traced: the rows received are always what the peers send
        (the all-to-all of their clipped send_counts, :func:`dispatch_counts`);
        given traced recv_counts that disagree with them raise a run-time
        error naming ``recv_counts`` under ``implementation="ffi"`` and are
        ignored under ``"xla"`` (docs/semantics.md §6.6).
      mm_x: [BS, H2], with mm_weight [H2, N2] ([N2, H2] with
        ``trans_mm_weight``): the shared expert, ``mm_y = mm_x @ mm_weight``.
      permute_out_flag: also return ``permute_out`` [A_cap, H1].
      max_recv_tokens: A_cap, the static row count of the outputs (rows past
        a rank's received count are zero). Default: the exact maximum for
        static counts, ``W * max_tokens_per_peer`` for traced ones.
      max_tokens_per_peer: rows one rank sends one peer in the fixed-capacity
        all-to-all (at least 1). Default: the exact maximum for static
        counts, BSK for traced ones (always enough; smaller values drop rows
        past it). Negative traced counts count as 0.
      implementation: "xla", "ffi", "ascend" or None (platform default).

    Returns:
      ``(gmm_y [A_cap, N1], mm_y [BS, N2] or None, permute_out [A_cap, H1] or
      None)``; gmm_y and permute_out are expert-major, source-rank-minor.
    """
    outs = bind_operator(
        dispatch_p,
        gmm_x,
        gmm_weight,
        axis_name,
        send_counts=send_counts,
        recv_counts=recv_counts,
        mm_x=mm_x,
        mm_weight=mm_weight,
        trans_gmm_weight=trans_gmm_weight,
        trans_mm_weight=trans_mm_weight,
        permute_out=check_bool(OP_DISPATCH, "permute_out_flag", permute_out_flag),
        max_out=max_recv_tokens,
        max_tokens_per_peer=max_tokens_per_peer,
        implementation=implementation,
    )
    mm_y = outs[1] if mm_x is not None else None
    return outs[0], mm_y, outs[-1] if permute_out_flag else None


def grouped_matmul_alltoallv(
    gmm_x: ArrayLike,
    gmm_weight: ArrayLike,
    axis_name: AxisName,
    *,
    send_counts: ArrayLike,
    recv_counts: ArrayLike | None = None,
    mm_x: ArrayLike | None = None,
    mm_weight: ArrayLike | None = None,
    trans_gmm_weight: bool = False,
    trans_mm_weight: bool = False,
    max_out_tokens: int | None = None,
    max_tokens_per_peer: int | None = None,
    implementation: Implementation = None,
) -> tuple[Array, Array | None]:
    """Grouped matmul + Unpermute + AlltoAllv (MoE combine), the exact
    inverse layout of :func:`alltoallv_grouped_matmul`, with an optional
    shared-expert matmul (aclnnGroupedMatMulAlltoAllv).

    Args:
      gmm_x: [A_cap, H1], expert-major, rank-minor (like ``permute_out``):
        group j has ``sum_d send_counts[d*e + j]`` rows and uses
        ``gmm_weight[j]``; rows past the groups are ignored. With a
        ``max_tokens_per_peer`` that clips, the blocks hold only the rows the
        dispatch with the same capacity kept (the rows of each peer's chunk
        past the capacity are absent, not skipped), so a combine follows
        the dispatch it inverts.
      gmm_weight: [e, H1, N1], or [e, N1, H1] with ``trans_gmm_weight``.
      send_counts: rows of local expert j going back to rank d at
        ``[d*e + j]`` (the dispatch's recv_counts); static or traced as in
        :func:`alltoallv_grouped_matmul`.
      recv_counts: rows from rank s's expert j at ``[s*e + j]`` (the
        dispatch's send_counts); optional, derived from send_counts; traced,
        checked as in :func:`alltoallv_grouped_matmul`. Traced send_counts
        whose kept rows (after max_tokens_per_peer) exceed gmm_x's A rows
        read the missing rows as zero rows, in both implementations (so the
        combine stays the transpose of a dispatch that dropped rows past
        max_recv_tokens; docs/semantics.md §6.6).
      mm_x, mm_weight, trans_mm_weight: the shared expert, ``mm_y = mm_x @
        mm_weight``.
      max_out_tokens: BSK_cap, the static row count of ``y``. Default: the
        exact maximum for static counts, ``W * max_tokens_per_peer`` for
        traced ones.
      max_tokens_per_peer: as in :func:`alltoallv_grouped_matmul` (at least
        1); default the exact maximum for static counts, A_cap for traced
        ones.

    Returns:
      ``(y [BSK_cap, N1], mm_y [BS, N2] or None)``: y's rows are grouped by
      global expert id, the order of the dispatch's gmm_x; padding rows 0.
    """
    outs = bind_operator(
        combine_p,
        gmm_x,
        gmm_weight,
        axis_name,
        send_counts=send_counts,
        recv_counts=recv_counts,
        mm_x=mm_x,
        mm_weight=mm_weight,
        trans_gmm_weight=trans_gmm_weight,
        trans_mm_weight=trans_mm_weight,
        permute_out=False,
        max_out=max_out_tokens,
        max_tokens_per_peer=max_tokens_per_peer,
        implementation=implementation,
    )
    return outs[0], (outs[1] if mm_x is not None else None)
