"""Independent NumPy model of seed 001 (aclnnAlltoAllvGroupedMatMul) and its
inverse (aclnnGroupedMatMulAlltoAllv), simulating every rank.

Written from the seed and docs/semantics.md §6, never calling jax_mc2:
``send[r][d*E + e]`` rows go from rank r to expert e of rank d; rank r's
gmm_x rows are grouped by global expert id; rank d's received rows are
regrouped expert-major, source-rank-minor; group e uses weight[e].
"""

from __future__ import annotations

import numpy as np


def recv_table(send, experts):
    """recv[r][s*E + e] = send[s][r*E + e]."""
    send = np.asarray(send)
    world = send.shape[0]
    return np.array(
        [
            [send[s][r * experts + e] for s in range(world) for e in range(experts)]
            for r in range(world)
        ]
    )


def _round_matmul(x, w, dtype, trans):
    w = np.asarray(w, np.float64)
    if trans:
        w = w.T
    return (np.asarray(x, np.float64) @ w).astype(dtype)


def dispatch(xs, ws, send, *, trans=False, dtype):
    """Per rank (permute_out [A_r, H1], gmm_y [A_r, N1]).

    xs[r]: rank r's gmm_x (rows past sum(send[r]) ignored); ws[r]: [E, H1, N1]
    (or [E, N1, H1] with trans)."""
    send = np.asarray(send)
    world = send.shape[0]
    experts = send.shape[1] // world
    out = []
    for r in range(world):
        blocks, ys = [], []
        for e in range(experts):
            for s in range(world):
                start = send[s][: r * experts + e].sum()
                rows = np.asarray(xs[s])[start : start + send[s][r * experts + e]]
                blocks.append(rows)
                ys.append(_round_matmul(rows, ws[r][e], dtype, trans))
        h1 = np.asarray(xs[0]).shape[1]
        n1 = ws[r].shape[1] if trans else ws[r].shape[2]
        perm = np.concatenate(blocks) if blocks else np.zeros((0, h1), dtype)
        gmm_y = np.concatenate(ys) if ys else np.zeros((0, n1), dtype)
        out.append((perm.astype(dtype), gmm_y))
    return out


def combine(xs, ws, send, *, trans=False, dtype):
    """Per rank y [BSK_r, N1]: rank r gets back, for each source rank s and
    its expert e in order, the rows of s's expert-major block (e, r) times
    w_s[e]. ``send[s][d*E + e]``: rows of s's expert e going to rank d."""
    send = np.asarray(send)
    world = send.shape[0]
    experts = send.shape[1] // world

    def block_start(s, e, d):
        # expert-major, destination-minor position of block (e, d) on rank s
        order = [(ee, dd) for ee in range(experts) for dd in range(world)]
        return sum(send[s][dd * experts + ee] for ee, dd in order[: order.index((e, d))])

    out = []
    for r in range(world):
        ys = []
        for s in range(world):
            for e in range(experts):
                start = block_start(s, e, r)
                rows = np.asarray(xs[s])[start : start + send[s][r * experts + e]]
                ys.append(_round_matmul(rows, ws[s][e], dtype, trans))
        out.append(np.concatenate(ys))
    return out


def zipf_counts(rng, world, experts, rows, *, a=1.5):
    """A (W, E*W) table: each rank routes ``rows`` rows over the E*W global
    experts with Zipf-like skew (expert popularity ~ 1/rank^a)."""
    g = world * experts
    p = 1.0 / np.arange(1, g + 1) ** a
    p = p[rng.permutation(g)]
    p /= p.sum()
    return np.stack([rng.multinomial(rows, p) for _ in range(world)])


def dispatched_rows(send, experts, *, peer_capacity=None, out_rows=None):
    """For each destination rank, the (source rank, source row) of every row
    it receives, in permute_out order, with the fixed-capacity drops: each
    (source, destination) chunk keeps its first ``peer_capacity`` rows, each
    destination its first ``out_rows`` rows."""
    send = np.asarray(send)
    world = send.shape[0]
    out = []
    for d in range(world):
        rows = []
        for e in range(experts):
            for s in range(world):
                chunk_start = send[s][: d * experts].sum()
                block_start = send[s][: d * experts + e].sum()
                for i in range(send[s][d * experts + e]):
                    in_chunk = block_start + i - chunk_start
                    if peer_capacity is None or in_chunk < peer_capacity:
                        rows.append((s, block_start + i))
        out.append(rows if out_rows is None else rows[:out_rows])
    return out
