"""implementation="ascend" over 2 processes x 2 CPU devices (jax.distributed
on 127.0.0.1): each process binds its devices to its own NPUs of the CANN
test double, the HCCL communicator spans both processes (root info through
JAX's key-value store), and the results equal one process with 4 devices:
the all-reduce operators, and the gradients of both AlltoAllv operators
(their data movement is HcclAlltoAllV across the two processes)."""

import jax
import numpy as np
import pytest
from ascend_multiprocess_worker import GRAD_NAMES, grad_case, grad_fn
from conftest import make_mesh
from jax.sharding import PartitionSpec as P
from multiprocess_case import make_case, run_workers

import jax_mc2 as mc2


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    run_workers("ascend_multiprocess_worker.py", tmp_path)

    mesh = make_mesh((4,), ("tp",))
    x1, x2, bias, residual, gamma = make_case(4)

    def f(a, b, c, r, g):
        out = mc2.mm_all_reduce_base(a, b, "tp", bias=c, implementation="ascend")
        y, norm = mc2.matmul_all_reduce_add_rms_norm(
            a, b, r, g, "tp", bias=c, implementation="ascend"
        )
        return out, y, norm

    want = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P(None, None, "tp"), P("tp", None), P(), P(), P()),
            out_specs=(P(), P(), P()),
        )
    )(x1, x2, bias, residual, gamma)
    for i in range(2):
        got = np.load(tmp_path / f"ascend_result_{i}.npz")
        for name, w in zip(("out", "y", "norm"), want):
            np.testing.assert_array_equal(got[name], np.asarray(w), err_msg=f"{name} rank {i}")

    # The gradients of the AlltoAllv operators: each process saved its
    # shards by global rank; together they equal one process's.
    table, operands = grad_case(4)
    grads = jax.jit(
        jax.shard_map(
            grad_fn(table),
            mesh=make_mesh((4,), ("ep",)),
            in_specs=(P("ep"),) * len(operands),
            out_specs=(P("ep"),) * len(GRAD_NAMES),
        )
    )(*operands)
    for name, w in zip(GRAD_NAMES, grads):
        w = np.asarray(w)
        assert np.any(w != 0), name
        for rank in range(4):
            got = np.load(tmp_path / f"ascend_result_{rank // 2}.npz")[f"{name}_{rank}"]
            np.testing.assert_array_equal(got[0], w[rank], err_msg=f"{name} rank {rank}")
