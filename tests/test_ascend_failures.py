"""The ascend launch layer under injected CANN failures (the CANN test
double's CANN_DOUBLE_* variables): each gives a Python exception naming the
operator, the aclnn function, the status code and CANN's message, nothing
hangs, and the process keeps working afterwards (communicators broken by a
failed collective are re-created). Missing libraries and symbols are checked
in fresh processes."""

import os
import re
import subprocess
import textwrap
from typing import NamedTuple

import jax
import numpy as np
import oracle
import pytest
from conftest import ascend_mm_all_reduce, cann_double_report, make_mesh, run_python

import jax_mc2 as mc2

RNG = np.random.default_rng(0)
X1 = RNG.standard_normal((8, 32)).astype(oracle.BF16)
X2 = (RNG.standard_normal((32, 8)) * 0.5).astype(oracle.BF16)
WANT = X1.astype(np.float64) @ X2.astype(np.float64)


def _sharded(world):
    return ascend_mm_all_reduce(make_mesh((world,), ("tp",)))


def _single():
    return jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None, implementation="ascend"))


def _works(f):
    got = np.asarray(f(X1, X2), np.float64)
    np.testing.assert_allclose(got, WANT, atol=0.25, rtol=0.02)


class Failure(NamedTuple):
    variable: str  # the CANN_DOUBLE_* variable that injects the failure
    value: str
    match: str  # what the exception must say
    world: int | None = None  # devices of the sharded call; None: the single-device call
    empty_pools: bool = False  # start from empty pools (no working call first): the call allocates


_PHASE1 = Failure(
    "CANN_DOUBLE_FAIL_PHASE",
    "aclnnMatmulAllReduceGetWorkspaceSize:561002",
    r"mm_all_reduce_base: aclnnMatmulAllReduceGetWorkspaceSize failed with status 561002: \S",
)
_PHASE2 = Failure(
    "CANN_DOUBLE_FAIL_PHASE",
    "aclnnMatmulAllReduce:361001",
    r"mm_all_reduce_base: aclnnMatmulAllReduce failed with status 361001: \S",
)
FAILURES = {
    "phase1-world1": _PHASE1._replace(world=1),
    "phase1-world2": _PHASE1._replace(world=2),
    "phase2-world1": _PHASE2._replace(world=1),
    "phase2-world4": _PHASE2._replace(world=4),
    "allocation": Failure(
        "CANN_DOUBLE_FAIL_MALLOC",
        "1",
        r"mm_all_reduce_base: aclnnMatmulAllReduce: aclrtMalloc of \d+ bytes failed with status"
        r" 207001: \S",
        empty_pools=True,
    ),
    # Operands x1 and x2 and the result take the first three blocks.
    "workspace-allocation": Failure(
        "CANN_DOUBLE_FAIL_MALLOC",
        "4",
        r"mm_all_reduce_base: aclnnMatmulAllReduce: aclrtMalloc of the \d+-byte workspace failed"
        r" with status 207001: \S",
        empty_pools=True,
    ),
    "sync-timeout": Failure(
        "CANN_DOUBLE_SYNC_TIMEOUT",
        "1",
        r"mm_all_reduce_base: aclnnMatmulAllReduce did not finish within \d+ ms .*status 507046",
    ),
    "stalled-rank": Failure(
        "CANN_DOUBLE_STALL_RANK",
        "*:1",
        r"mm_all_reduce_base: aclnnMatmulAllReduce .*(failed|did not finish).*status \d+",
        world=2,
    ),
}


@pytest.mark.parametrize("case", FAILURES.values(), ids=FAILURES.keys())
def test_injected_failure(monkeypatch, case):
    """The failure comes back as an exception naming the aclnn function and
    its status (the call returns: nothing hangs), without a misuse of CANN on
    the way (e.g. destroying the executor a failed phase 2 already consumed);
    then the same call and a freshly traced one work again (a communicator
    broken by a failed collective is re-created)."""
    if case.empty_pools:
        mc2.ascend.shutdown()
    make = _single if case.world is None else lambda: _sharded(case.world)
    f = make()
    if not case.empty_pools:
        _works(f)
    violations = re.search(r"violations: \d+", cann_double_report()).group()
    monkeypatch.setenv(case.variable, case.value)
    with pytest.raises(Exception, match=case.match):
        np.asarray(f(X1, X2))
    monkeypatch.delenv(case.variable)
    assert re.search(r"violations: \d+", cann_double_report()).group() == violations
    _works(f)
    _works(make())


def test_add_rms_norm_phase1_names_its_operator(monkeypatch):
    residual = np.ones((2, 4, 8), oracle.BF16)
    gamma = np.ones((8,), oracle.BF16)
    monkeypatch.setenv(
        "CANN_DOUBLE_FAIL_PHASE", "aclnnInplaceMatmulAllReduceAddRmsNormGetWorkspaceSize:161002"
    )
    with pytest.raises(
        Exception,
        match=r"inplace_matmul_all_reduce_add_rms_norm: "
        r"aclnnInplaceMatmulAllReduceAddRmsNormGetWorkspaceSize "
        r"failed with status 161002",
    ):
        np.asarray(
            mc2.inplace_matmul_all_reduce_add_rms_norm(
                X1, X2, residual, gamma, None, implementation="ascend"
            )[0]
        )


# ---------------------------------------------------------------------------
# Missing library / symbol / operator, in fresh processes

_PROBE = textwrap.dedent(
    """
    import numpy as np, jax.numpy as jnp, jax_mc2 as mc2
    x = jnp.ones((4, 8), jnp.bfloat16); w = jnp.ones((8, 4), jnp.bfloat16)
    try:
        out = mc2.mm_all_reduce_base(x, w, None, implementation="ascend")
        print("RESULT", np.asarray(out)[0, 0])
    except Exception as e:
        print("ERROR", type(e).__name__, e)
    """
)


def _probe(libdir, tmp_path):
    return run_python(_PROBE, dict(os.environ, JAX_MC2_CANN_LIBRARY_PATH=str(libdir)), tmp_path)


def _partial_cann(tmp_path, replace: str):
    """A copy of the double's library directory with ``replace`` swapped for
    an empty shared library."""
    src = os.environ["JAX_MC2_CANN_LIBRARY_PATH"]
    d = tmp_path / "cann"
    d.mkdir()
    for name in os.listdir(src):
        if name.endswith(".so") and name != replace:
            os.symlink(os.path.join(src, name), d / name)
    stub = tmp_path / "stub.c"
    stub.write_text("int jax_mc2_stub_symbol;\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(d / replace), str(stub)], check=True)
    return d


def test_missing_library(tmp_path):
    out = _probe(tmp_path, tmp_path)
    assert "ERROR NotImplementedError mm_all_reduce_base: implementation='ascend' is not " in out
    assert "libascendcl.so" in out and "JAX_MC2_CANN_LIBRARY_PATH" in out


def test_missing_symbol(tmp_path):
    out = _probe(_partial_cann(tmp_path, "libhccl.so"), tmp_path)
    assert "ERROR NotImplementedError" in out
    assert "CANN symbol HcclGetRootInfo not found in libhccl.so" in out


def test_missing_operator(tmp_path):
    out = _probe(_partial_cann(tmp_path, "libopapi.so"), tmp_path)
    assert "ERROR" in out
    assert "mm_all_reduce_base: CANN operator aclnnMatmulAllReduceGetWorkspaceSize not found" in out


_COMM_NAME_FAILURE = textwrap.dedent(
    """
    import ctypes, os
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jax_mc2 as mc2
    lib = ctypes.CDLL(
        os.path.join(os.environ["JAX_MC2_CANN_LIBRARY_PATH"], "libcann_double_core.so")
    )
    lib.cann_double_report.restype = ctypes.c_char_p
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    f = jax.jit(jax.shard_map(
        lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", implementation="ascend"),
        mesh=mesh, in_specs=(P(None, "tp"), P("tp", None)), out_specs=P()))
    x1, x2 = np.ones((4, 32), np.float16), np.ones((32, 8), np.float16)
    os.environ["CANN_DOUBLE_FAIL_PHASE"] = "HcclGetCommName:5"
    try:
        f(x1, x2)
        print("NO ERROR")
    except Exception as e:
        print("ERROR", e)
    print("REPORT", lib.cann_double_report().decode().replace(chr(10), " "))
    del os.environ["CANN_DOUBLE_FAIL_PHASE"]
    print("RESULT", float(np.asarray(f(x1, x2))[0, 0]))
    """
)


def test_comm_name_failure_leaves_no_communicator(tmp_path):
    """HcclGetCommName failing after HcclCommInitAll: an error naming it, every
    communicator of the group destroyed (none left unowned), and the next
    call creates the group anew."""
    out = run_python(_COMM_NAME_FAILURE, dict(os.environ), tmp_path)
    assert "ERROR" in out and "HcclGetCommName failed with HcclResult 5" in out, out
    assert " comms=0 " in out.split("REPORT", 1)[1].split("RESULT")[0] + " ", out
    assert "RESULT 32.0" in out, out
