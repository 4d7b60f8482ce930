"""Lifetimes in the ascend launch layer, checked through the CANN test double:
which thread and device each CANN call runs on, what a communicator's
destruction needs, what shutdown may free after a stream wait failed, and
that every aclrtSetDevice is balanced by an aclrtResetDevice."""

import ast
import os
import re
import textwrap
import threading

import jax
import numpy as np
import oracle
import pytest
from conftest import (
    ascend_mm_all_reduce,
    cann_double_comm_counts,
    cann_double_device_sys_param,
    cann_double_live_counts,
    cann_double_report,
    run_python,
)
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2

RNG = np.random.default_rng(0)
X1 = RNG.standard_normal((8, 32)).astype(oracle.BF16)
X2 = (RNG.standard_normal((32, 8)) * 0.5).astype(oracle.BF16)
WANT = X1.astype(np.float64) @ X2.astype(np.float64)


def _sharded(devices):
    """mm_all_reduce_base over a one-axis mesh of `devices` (in rank order)."""
    return ascend_mm_all_reduce(Mesh(np.array(devices), ("tp",)))


def _check(got):
    np.testing.assert_allclose(np.asarray(got, np.float64), WANT, atol=0.25, rtol=0.02)


def _live_comms_and_violations():
    report = cann_double_report()
    return (
        int(re.search(r" comms=(\d+)", report).group(1)),
        re.search(r"violations: \d+", report).group(),
    )


def test_recovery_destroys_the_old_communicators(monkeypatch):
    """A failed collective marks the group broken and the next call re-creates
    it: the old communicators are destroyed, each from its own device (HCCL
    looks a communicator up in the calling thread's device's table; from
    another device HcclCommDestroy fails and destroys nothing), so no
    communicator is left behind and CANN sees no misuse."""
    f = _sharded(jax.devices()[:2])
    _check(f(X1, X2))
    before = _live_comms_and_violations()
    monkeypatch.setenv("CANN_DOUBLE_FAIL_PHASE", "aclnnMatmulAllReduce:361001")
    with pytest.raises(Exception, match="aclnnMatmulAllReduce failed with status 361001"):
        np.asarray(f(X1, X2))
    monkeypatch.delenv("CANN_DOUBLE_FAIL_PHASE")
    _check(f(X1, X2))  # re-creates the group
    assert _live_comms_and_violations() == before


def test_a_new_python_thread_creates_a_group():
    """A Python thread that never ran a call lowers a call whose replica group
    is new (HcclCommInitAll) over devices whose state exists already: the
    launch layer gives the thread a device first (HcclCommInitAll reads the
    calling thread's current device and fails without one)."""
    mc2.ascend.shutdown()  # no group of this test exists yet
    devices = jax.devices()[:2]
    _check(_sharded(devices)(X1, X2))
    out = {}

    def other_thread():
        try:
            out["got"] = np.asarray(_sharded(devices[::-1])(X1, X2))  # a new group: 1-0
        except Exception as e:  # reported below
            out["error"] = e

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert "error" not in out, out.get("error")
    _check(out["got"])


_PRELUDE = textwrap.dedent(
    """
    import ctypes, os, threading, time
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jax_mc2 as mc2
    lib = ctypes.CDLL(
        os.path.join(os.environ["JAX_MC2_CANN_LIBRARY_PATH"], "libcann_double_core.so")
    )
    lib.cann_double_report.restype = ctypes.c_char_p

    def report():
        return lib.cann_double_report().decode().replace(chr(10), " | ")

    def set_counts():
        counts = (ctypes.c_int64 * 8)()
        lib.cann_double_device_set_counts(counts, 8)
        return list(counts)

    x1, x2 = np.ones((8, 32), np.float16), np.ones((32, 8), np.float16)
    single = jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None, implementation="ascend"))
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    sharded = jax.jit(jax.shard_map(
        lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", implementation="ascend"),
        mesh=mesh, in_specs=(P(None, "tp"), P("tp", None)), out_specs=P()))
    """
)

_SHUTDOWN_AFTER_TIMEOUT = _PRELUDE + textwrap.dedent(
    """
    mc2.ascend.configure(timeout_ms=300)
    os.environ["CANN_DOUBLE_LAUNCH_DELAY_MS"] = "1500"  # every stream task waits 1.5 s
    try:
        single(x1, x2)
        print("NO ERROR")
    except Exception as e:
        print("ERROR", str(e).splitlines()[0])
    del os.environ["CANN_DOUBLE_LAUNCH_DELAY_MS"]
    mc2.ascend.shutdown()  # the kernel of the timed-out call has not run yet
    time.sleep(2.5)  # now it has
    print("REPORT", report())
    print("COUNT", set_counts()[0])
    print("RESULT", float(np.asarray(single(x1, x2))[0, 0]))  # the process goes on
    """
)


def test_shutdown_after_a_timed_out_call_frees_nothing_its_kernel_uses(tmp_path):
    """A call whose stream wait timed out leaves its kernel queued, holding the
    call's (quarantined) buffers, its stream and its communicator: shutdown
    frees none of them on that device, nor resets it (its kernel would write
    into freed memory), and the process keeps working."""
    env = dict(os.environ)
    env.pop("JAX_MC2_ASCEND_TIMEOUT_MS", None)  # configure() sets it
    out = run_python(_SHUTDOWN_AFTER_TIMEOUT, env, tmp_path)
    assert re.search(r"ERROR .*did not finish within 300 ms", out), out
    report = out.split("REPORT", 1)[1].split("\n", 1)[0]
    assert "violations: 0 " in report, out
    assert "COUNT 1\n" in out, out  # the device was not reset
    assert "RESULT 32.0" in out, out


_SET_DEVICE_BALANCE = _PRELUDE + textwrap.dedent(
    """
    os.environ["CANN_DOUBLE_FAIL_PHASE"] = "aclrtCreateStream:207001"
    try:
        single(x1, x2)  # device 0's state cannot be made
        print("NO ERROR")
    except Exception as e:
        print("ERROR", str(e).splitlines()[0])
    del os.environ["CANN_DOUBLE_FAIL_PHASE"]
    print("AFTER_FAILURE", set_counts())
    for _ in range(3):
        np.asarray(sharded(x1, x2))
    worker = threading.Thread(target=lambda: np.asarray(sharded(x1, x2)))
    worker.start()
    worker.join()
    print("IN_USE", set_counts())
    mc2.ascend.shutdown()
    print("AFTER_SHUTDOWN", set_counts())
    print("REPORT", report())
    """
)


def test_every_set_device_is_reset_by_shutdown(tmp_path):
    """The launch layer sets each device once (when it makes the device's
    state; a thread then only adopts the device's context), undoes that when
    making the state fails, and shutdown resets it: CANN's count of each
    device is back to 0, so its default context is released."""
    out = run_python(_SET_DEVICE_BALANCE, dict(os.environ), tmp_path)
    assert re.search(r"ERROR .*aclrtCreateStream failed with status 207001", out), out
    assert "AFTER_FAILURE [0, 0, 0, 0, 0, 0, 0, 0]\n" in out, out
    assert "IN_USE [1, 1, 0, 0, 0, 0, 0, 0]\n" in out, out
    assert "AFTER_SHUTDOWN [0, 0, 0, 0, 0, 0, 0, 0]\n" in out, out
    assert "violations: 0 " in out.split("REPORT", 1)[1], out


def test_pooled_blocks_go_back_under_their_own_size():
    """A cached block handed to a smaller request goes back to the pool under
    its own size, so a later request of that size finds it: alternating a
    large and a smaller call allocates nothing after the first of each (the
    block was once filed under the smaller request, and the pool grew on
    every large call after a small one)."""

    def call(m, n):
        f = jax.jit(
            jax.shard_map(
                lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", implementation="ascend"),
                mesh=Mesh(np.array(jax.devices()[7:8]), ("tp",)),
                in_specs=(P(), P()),
                out_specs=P(),
            )
        )
        x1 = np.ones((m, 1024), oracle.BF16)
        jax.block_until_ready(f(x1, np.ones((1024, n), oracle.BF16)))
        return cann_double_live_counts()["allocations"]

    call(1024, 1024)
    settled = call(600, 600)
    assert [call(1024, 1024), call(600, 600), call(1024, 1024)] == [settled] * 3


def test_hccl_settings_change_only_without_communicators():
    """HCCL reads HCCL_DETERMINISTIC and HCCL_BUFFSIZE when it creates a
    communicator, so configure() refuses to change either while any exists
    (the setting would reach the device contexts and the tiling but not the
    communicators); after shutdown() it applies, and the compiled call
    creates its communicator anew with ACL_OPT_DETERMINISTIC (option 0) on
    its new context and HCCL_DETERMINISTIC set; once it is turned off again,
    a new context and a new communicator are made without either (HCCL's
    setting is process-wide, so it is set back to 0)."""

    def option():  # JAX device 6 is NPU 6 here
        return cann_double_device_sys_param(6, 0)

    def deterministic_comms():
        live, deterministic = cann_double_comm_counts()
        assert live > 0
        return deterministic

    f = _sharded(jax.devices()[6:7])
    _check(f(X1, X2))
    assert option() == 0
    assert deterministic_comms() == 0
    refused = r"configure: {}={} would not reach the \d+ HCCL communicator.*shutdown\(\) first"
    with pytest.raises(ValueError, match=refused.format("deterministic", "True")):
        mc2.ascend.configure(deterministic=True)
    buffsize = os.environ.get("HCCL_BUFFSIZE")
    with pytest.raises(ValueError, match=refused.format("hccl_buffsize_mb", "300")):
        mc2.ascend.configure(hccl_buffsize_mb=300)
    assert os.environ.get("HCCL_BUFFSIZE") == buffsize
    mc2.ascend.configure(deterministic=False)  # no change: accepted
    _check(f(X1, X2))
    assert option() == 0
    try:
        mc2.ascend.shutdown()
        mc2.ascend.configure(deterministic=True)
        _check(f(X1, X2))
        assert option() == 1
        assert deterministic_comms() == cann_double_comm_counts()[0]
    finally:
        mc2.ascend.shutdown()
        mc2.ascend.configure(deterministic=False)
    _check(f(X1, X2))
    assert option() == 0
    assert deterministic_comms() == 0


_SHUTDOWN_DURING_CALLS = _PRELUDE + textwrap.dedent(
    """
    np.asarray(single(x1, x2))
    for rnd in range(3):
        os.environ["CANN_DOUBLE_LAUNCH_DELAY_MS"] = "600"
        outcomes = []

        def call():
            try:
                outcomes.append(float(np.asarray(single(x1, x2))[0, 0]))
            except Exception as e:
                outcomes.append(str(e).splitlines()[0])

        first = threading.Thread(target=call)  # holds device 0 for 600 ms
        first.start()
        time.sleep(0.2)
        stopper = threading.Thread(target=mc2.ascend.shutdown)  # waits for device 0
        stopper.start()
        time.sleep(0.2)
        second = threading.Thread(target=call)  # found device 0's state, waits for it
        second.start()
        for t in (first, stopper, second):
            t.join()
        del os.environ["CANN_DOUBLE_LAUNCH_DELAY_MS"]
        print("OUTCOMES", rnd, outcomes)
    print("AFTER", float(np.asarray(single(x1, x2))[0, 0]))
    print("REPORT", report())
    """
)


def test_a_call_waiting_for_its_device_during_shutdown(tmp_path):
    """shutdown() freed every device's state while a call that had looked its
    device up could still be waiting for the state's lock; that call then
    used a destroyed stream in freed memory. The state is now kept and marked:
    such a call fails with an error naming shutdown (or runs first, if it
    takes the lock first), and the next call makes the state afresh."""
    out = run_python(_SHUTDOWN_DURING_CALLS, dict(os.environ), tmp_path)
    for line in re.findall(r"OUTCOMES \d+ (.*)", out):
        for outcome in ast.literal_eval(line):  # a list of floats and messages
            assert outcome == 32.0 or "shutdown() ran while this call waited" in outcome, out
    assert "AFTER 32.0" in out, out
    assert "violations: 0 " in out.split("REPORT", 1)[1], out
