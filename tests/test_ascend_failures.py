"""The ascend launch layer under injected CANN failures (the CANN test
double's CANN_DOUBLE_* variables): each gives a Python exception naming the
operator, the aclnn function, the status code and CANN's message, nothing
hangs, and the process keeps working afterwards (communicators broken by a
failed collective are re-created). Missing libraries and symbols are checked
in fresh processes."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import oracle
import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2

RNG = np.random.default_rng(0)
X1 = RNG.standard_normal((8, 32)).astype(oracle.BF16)
X2 = (RNG.standard_normal((32, 8)) * 0.5).astype(oracle.BF16)
WANT = X1.astype(np.float64) @ X2.astype(np.float64)


def _sharded(world):
    mesh = make_mesh((world,), ("tp",))
    return jax.jit(
        jax.shard_map(
            lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", implementation="ascend"),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None)),
            out_specs=P(),
        )
    )


def _single():
    return jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None, implementation="ascend"))


def _works(f):
    got = np.asarray(f(X1, X2), np.float64)
    np.testing.assert_allclose(got, WANT, atol=0.25, rtol=0.02)


@pytest.mark.parametrize("world", [1, 2])
def test_phase1_status(monkeypatch, world):
    f = _sharded(world)
    _works(f)
    monkeypatch.setenv("CANN_DOUBLE_FAIL_PHASE", "aclnnMatmulAllReduceGetWorkspaceSize:561002")
    with pytest.raises(
        Exception,
        match=r"mm_all_reduce_base: aclnnMatmulAllReduceGetWorkspaceSize"
        r" failed with status 561002: \S",
    ):
        np.asarray(f(X1, X2))
    monkeypatch.delenv("CANN_DOUBLE_FAIL_PHASE")
    _works(f)


@pytest.mark.parametrize("world", [1, 4])
def test_phase2_status(monkeypatch, world):
    f = _sharded(world)
    _works(f)
    monkeypatch.setenv("CANN_DOUBLE_FAIL_PHASE", "aclnnMatmulAllReduce:361001")
    with pytest.raises(
        Exception,
        match=r"mm_all_reduce_base: aclnnMatmulAllReduce failed with "
        r"status 361001: \S",
    ):
        np.asarray(f(X1, X2))
    monkeypatch.delenv("CANN_DOUBLE_FAIL_PHASE")
    _works(f)


def test_allocation_failure(monkeypatch):
    mc2.ascend.shutdown()  # empty pools: the next call allocates
    f = _single()
    monkeypatch.setenv("CANN_DOUBLE_FAIL_MALLOC", "1")
    with pytest.raises(
        Exception,
        match=r"mm_all_reduce_base: aclnnMatmulAllReduce: aclrtMalloc "
        r"of \d+ bytes failed with status 207001: \S",
    ):
        np.asarray(f(X1, X2))
    monkeypatch.delenv("CANN_DOUBLE_FAIL_MALLOC")
    _works(f)


def test_sync_timeout(monkeypatch):
    f = _single()
    _works(f)
    monkeypatch.setenv("CANN_DOUBLE_SYNC_TIMEOUT", "1")
    with pytest.raises(
        Exception,
        match=r"mm_all_reduce_base: aclnnMatmulAllReduce did not finish "
        r"within \d+ ms .*status 507046",
    ):
        np.asarray(f(X1, X2))
    monkeypatch.delenv("CANN_DOUBLE_SYNC_TIMEOUT")
    _works(f)


def test_stalled_rank(monkeypatch):
    f = _sharded(2)
    _works(f)
    monkeypatch.setenv("CANN_DOUBLE_STALL_RANK", "*:1")
    with pytest.raises(
        Exception,
        match=r"mm_all_reduce_base: aclnnMatmulAllReduce .*(failed|"
        r"did not finish).*status \d+",
    ):
        np.asarray(f(X1, X2))
    monkeypatch.delenv("CANN_DOUBLE_STALL_RANK")
    _works(f)  # the broken communicator is re-created
    _works(_sharded(2))


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
    env = dict(os.environ, JAX_MC2_CANN_LIBRARY_PATH=str(libdir))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


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
