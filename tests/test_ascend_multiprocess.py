"""implementation="ascend" over 2 processes x 2 CPU devices (jax.distributed
on 127.0.0.1): each process binds its devices to its own NPUs of the CANN
test double, the HCCL communicator spans both processes (root info through
JAX's key-value store), and the results equal one process with 4 devices:
the all-reduce operators, and the gradients of both AlltoAllv operators
(their data movement is HcclAlltoAllV across the two processes)."""

import json
import re

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


@pytest.mark.slow
def test_two_processes_recover_from_failed_calls(tmp_path, monkeypatch):
    """A failed call on a communicator spanning both processes (injected
    status in one process, a stalled rank, an injected HcclAlltoAllV status
    in the middle of a gradient) is an error in both, and the next call of
    the same jitted function works in both without a restart: every process
    re-creates the group as the same new generation (root info through the
    key-value store under that generation's key). A process that cannot get
    the new root info, or whose peer never arrives, fails within the
    timeout, naming it; the next call together works."""
    monkeypatch.setenv("ASCEND_WORKER_SCENARIO", "recovery")
    monkeypatch.setenv("CANN_DOUBLE_HCCL_TIMEOUT_MS", "3000")
    monkeypatch.setenv("JAX_MC2_ASCEND_TIMEOUT_MS", "6000")
    run_workers("ascend_multiprocess_worker.py", tmp_path)
    logs = [json.loads((tmp_path / f"recovery_{i}.json").read_text()) for i in range(2)]
    calls = [entry["call"] for entry in logs[0]]
    assert calls == [entry["call"] for entry in logs[1]]
    by = [{e["call"]: e for e in log} for log in logs]
    # Both processes name the same generation after every call.
    for a, b in zip(*logs):
        assert a["generation"] == b["generation"], (a, b)
    assert by[0]["first"]["generation"] == "0.0"
    for name in ("first", "gradient"):
        for log in by:
            assert log[name]["outcome"] == "ok", log[name]
    timed_out = (
        r"mm_all_reduce_base: aclnnMatmulAllReduce (did not finish|failed on the stream).*507046"
    )
    failures = {
        "injected status": (
            r"mm_all_reduce_base: aclnnMatmulAllReduce failed with status 4",
            timed_out,
        ),
        "stalled rank": (timed_out, timed_out),
        "HcclAlltoAllV status": (
            r"HcclAlltoAllV failed with HcclResult 4 \(HCCL_E_INTERNAL\)",
            r"HcclAlltoAllV (did not finish|failed on the stream).*507046",
        ),
    }
    for name, patterns in failures.items():
        for process, pattern in zip((1, 0), patterns):
            assert re.search(pattern, by[process][name]["outcome"]), by[process][name]
        for log in by:
            after = log[f"after {name}"]
            assert after["outcome"] == "ok" and after["same"], after
            assert after["generation"] != log[name]["generation"], after
    # Alone: process 1 gets no root info, process 0's peer never arrives.
    assert re.search(
        # whichever of its two ranks XLA reports: the one that tried, or the other
        r"mm_all_reduce_base: aclnnMatmulAllReduce: (re-creating the HCCL communicator of "
        r"replica group jax_mc2/0-1-2048-2049 \(.*\) failed|the HCCL communicator of replica "
        r"group jax_mc2/0-1-2048-2049 could not be re-created for this call): generation "
        r"0\.\d+ .*TimeoutError: process 1 got no root info under key-value store key "
        r"'jax_mc2/hccl_root_info/jax_mc2/0-1-2048-2049/0\.\d+' .* within 6000 ms",
        by[1]["alone"]["outcome"],
    ), by[1]["alone"]
    assert re.search(
        r"TimeoutError: process 1 did not reach generation 0\.\d+ of the group within 6000 ms",
        by[0]["alone"]["outcome"],
    ), by[0]["alone"]
    for log in by:
        assert log["together"]["outcome"] == "ok" and log["together"]["same"], log["together"]
    # A generation, once left, never comes back.
    made = [e["generation"] for e in logs[0]]
    changes = [g for i, g in enumerate(made) if i == 0 or g != made[i - 1]]
    assert len(changes) == len(set(changes)) == 5, changes
