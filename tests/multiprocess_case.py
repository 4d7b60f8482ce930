"""The data of the multi-process test, made identically in every process."""

import numpy as np


def make_case(world: int):
    rng = np.random.default_rng(1234)
    k = 16 * world
    x1 = rng.standard_normal((2, 8, k)).astype(np.float16)
    x2 = (rng.standard_normal((k, 24)) * 0.3).astype(np.float16)
    bias = rng.standard_normal(24).astype(np.float16)
    residual = rng.standard_normal((2, 8, 24)).astype(np.float16)
    gamma = rng.standard_normal(24).astype(np.float16)
    return x1, x2, bias, residual, gamma


def make_ep_case(world: int):
    """Counts (W, e*W), gmm_x (W, BSK, 8), gmm_weight (W, e, 8, 6) per rank."""
    rng = np.random.default_rng(77)
    experts = 2
    table = rng.integers(0, 4, size=(world, experts * world)).astype(np.int32)
    bsk = int(table.sum(1).max())
    x = rng.standard_normal((world, bsk, 8)).astype(np.float16)
    w = (rng.standard_normal((world, experts, 8, 6)) * 0.3).astype(np.float16)
    return table, x, w


def ep_round_trip(impl):
    """Per shard: dispatch with traced counts, then combine with the
    transposed weights; returns (gmm_y, combined) with a leading rank axis."""
    import jax_mc2 as mc2
    from jax_mc2.ops.alltoallv_grouped_matmul import exchange_counts

    def f(x, w, counts):
        send = counts[0]
        y, _, _ = mc2.alltoallv_grouped_matmul(
            x[0], w[0], "tp", send_counts=send, implementation=impl
        )
        back, _ = mc2.grouped_matmul_alltoallv(
            y,
            w[0],
            "tp",
            send_counts=exchange_counts(send, ("tp",)),
            recv_counts=send,
            trans_gmm_weight=True,
            max_out_tokens=x.shape[1],
            implementation=impl,
        )
        return y[None], back[None]

    return f
