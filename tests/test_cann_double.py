"""The CANN test double's runtime, driven through its C API with ctypes.

Builds the double into a temporary folder once per session (or uses
JAX_MC2_CANN_LIBRARY_PATH when set) and never imports jax_mc2.
"""

import ctypes
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "cann_double" / "build.py"

ACL_SUCCESS = 0
ACL_ERROR_RT_PARAM_INVALID = 107000
ACL_ERROR_RT_MEMORY_ALLOCATION = 207001
ACL_ERROR_RT_STREAM_SYNC_TIMEOUT = 507046
ACL_ERROR_REPEAT_INITIALIZE = 100002
ACLNN_ERR_PARAM_INVALID = 161002
HCCL_E_PARA, HCCL_E_PTR, HCCL_E_INTERNAL, HCCL_E_TIMEOUT, HCCL_E_RUNTIME = 1, 2, 4, 9, 15
ACL_ERROR_RT_AICORE_EXCEPTION = 507015
MEMCPY_HOST_TO_DEVICE, MEMCPY_DEVICE_TO_HOST = 1, 2
ACL_FLOAT = 0
ACL_FORMAT_ND = 2


def _declare(lib, name, restype, *argtypes):
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)


class Cann:
    """ctypes handles on the double's libraries."""

    def __init__(self, folder):
        def load(name):
            return ctypes.CDLL(str(Path(folder) / name), mode=ctypes.RTLD_GLOBAL)

        self.core = load("libcann_double_core.so")
        self.acl = load("libascendcl.so")
        self.nn = load("libnnopbase.so")
        self.hccl = load("libhccl.so")
        p, i32, i64, u64, sz = (
            ctypes.c_void_p,
            ctypes.c_int32,
            ctypes.c_int64,
            ctypes.c_uint64,
            ctypes.c_size_t,
        )
        pp = ctypes.POINTER(ctypes.c_void_p)
        for name, args in {
            "aclInit": [ctypes.c_char_p],
            "aclFinalize": [],
            "aclrtSetDevice": [i32],
            "aclrtResetDevice": [i32],
            "aclrtMalloc": [pp, sz, ctypes.c_int],
            "aclrtFree": [p],
            "aclrtMemcpy": [p, sz, p, sz, ctypes.c_int],
            "aclrtMemcpyAsync": [p, sz, p, sz, ctypes.c_int, p],
            "aclrtCreateStream": [pp],
            "aclrtDestroyStream": [p],
            "aclrtSynchronizeStream": [p],
            "aclrtSynchronizeStreamWithTimeout": [p, i32],
            "aclrtCreateEvent": [pp],
            "aclrtDestroyEvent": [p],
            "aclrtRecordEvent": [p, p],
            "aclrtStreamWaitEvent": [p, p],
            "aclrtGetDevice": [ctypes.POINTER(i32)],
            "aclrtSetCurrentContext": [p],
            "aclrtGetCurrentContext": [pp],
        }.items():
            _declare(self.acl, name, ctypes.c_int, *args)
        _declare(self.acl, "aclGetRecentErrMsg", ctypes.c_char_p)
        _declare(self.acl, "aclrtGetSocName", ctypes.c_char_p)
        _declare(
            self.nn,
            "aclCreateTensor",
            p,
            ctypes.POINTER(i64),
            u64,
            ctypes.c_int,
            ctypes.POINTER(i64),
            i64,
            ctypes.c_int,
            ctypes.POINTER(i64),
            u64,
            p,
        )
        _declare(self.nn, "aclDestroyTensor", ctypes.c_int, p)
        _declare(self.nn, "aclCreateIntArray", p, ctypes.POINTER(i64), u64)
        _declare(self.nn, "aclDestroyIntArray", ctypes.c_int, p)
        _declare(self.nn, "aclSetAclOpExecutorRepeatable", ctypes.c_int, p)
        _declare(
            self.hccl, "HcclCommInitAll", ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(i32), pp
        )
        _declare(self.hccl, "HcclGetRootInfo", ctypes.c_int, ctypes.c_char_p)
        _declare(
            self.hccl,
            "HcclCommInitRootInfo",
            ctypes.c_int,
            ctypes.c_uint32,
            ctypes.c_char_p,
            ctypes.c_uint32,
            pp,
        )
        _declare(self.hccl, "HcclGetCommName", ctypes.c_int, p, ctypes.c_char_p)
        _declare(self.hccl, "HcclCommDestroy", ctypes.c_int, p)
        _declare(self.hccl, "HcclGetRankId", ctypes.c_int, p, ctypes.POINTER(ctypes.c_uint32))
        _declare(self.hccl, "HcclBarrier", ctypes.c_int, p, p)
        # sendBuf, sendCounts, sdispls, sendType, recvBuf, recvCounts, rdispls,
        # recvType, comm, stream (counts and displacements: host uint64_t arrays).
        _declare(self.hccl, "HcclAlltoAllV", ctypes.c_int, p, p, p, i32, p, p, p, i32, p, p)
        _declare(self.core, "cann_double_live_counts", None, *[ctypes.POINTER(i64)] * 4)
        _declare(self.core, "cann_double_report", ctypes.c_char_p)
        _declare(self.core, "cann_double_clear_report", None)
        _declare(self.core, "cann_double_check_device_range", ctypes.c_int, p, sz)
        _declare(
            self.core,
            "cann_double_device_set_counts",
            ctypes.c_int,
            ctypes.POINTER(i64),
            ctypes.c_int,
        )
        _declare(
            self.core,
            "cann_double_test_all_gather",
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            p,
            sz,
            p,
            sz,
            ctypes.POINTER(sz),
        )
        _declare(self.core, "cann_double_test_new_executor", p, ctypes.c_char_p, u64, ctypes.c_int)
        _declare(self.core, "cann_double_test_launch", ctypes.c_int, ctypes.c_char_p, p, u64, p, p)
        _declare(self.core, "cann_double_test_injected_status", ctypes.c_int, ctypes.c_char_p)

    def error(self):
        return (self.acl.aclGetRecentErrMsg() or b"").decode()

    def report(self):
        return self.core.cann_double_report().decode()

    def malloc(self, size):
        pointer = ctypes.c_void_p()
        assert self.acl.aclrtMalloc(ctypes.byref(pointer), size, 0) == ACL_SUCCESS, self.error()
        return pointer.value

    def stream(self):
        handle = ctypes.c_void_p()
        assert self.acl.aclrtCreateStream(ctypes.byref(handle)) == ACL_SUCCESS
        return handle.value

    def live_counts(self):
        counts = [ctypes.c_int64() for _ in range(4)]
        self.core.cann_double_live_counts(*map(ctypes.byref, counts))
        return tuple(count.value for count in counts)

    def set_counts(self):
        """Every device's aclrtSetDevice count (sets minus resets)."""
        counts = (ctypes.c_int64 * 64)()
        devices = self.core.cann_double_device_set_counts(counts, 64)
        return list(counts[:devices])

    def current_device(self):
        """The calling thread's device (aclrtGetDevice), -1 without one."""
        device = ctypes.c_int32(-1)
        return device.value if self.acl.aclrtGetDevice(ctypes.byref(device)) == 0 else -1

    def comm_name(self, comm):
        name = ctypes.create_string_buffer(128)
        assert self.hccl.HcclGetCommName(comm, name) == 0
        return name.value

    def all_gather(self, name, device, payload):
        out = ctypes.create_string_buffer(4096)
        size = ctypes.c_size_t()
        result = self.core.cann_double_test_all_gather(
            name, device, payload, len(payload), out, len(out), ctypes.byref(size)
        )
        return result, out.raw[: size.value]


@pytest.fixture(scope="session")
def library_dir(tmp_path_factory):
    folder = os.environ.get("JAX_MC2_CANN_LIBRARY_PATH")
    if folder:
        return folder
    folder = tmp_path_factory.mktemp("cann_double")
    # The runtime alone: these tests need no operator, and the build stays short.
    subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), str(folder), "--runtime-only"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return str(folder)


@pytest.fixture(scope="session")
def cann(library_dir):
    cann = Cann(library_dir)
    # What others in this process hold when these tests start (the ascend
    # launch layer's pooled memory, kept until its shutdown, which the
    # session-end check in conftest.py covers): these tests must return to it.
    cann.baseline = cann.live_counts()
    return cann


@pytest.fixture
def device(cann, monkeypatch):
    """Device 0 set on the test thread; the report starts empty."""
    for name in (
        "CANN_DOUBLE_FAIL_MALLOC",
        "CANN_DOUBLE_SYNC_TIMEOUT",
        "CANN_DOUBLE_STALL_RANK",
        "CANN_DOUBLE_LAUNCH_DELAY_MS",
        "CANN_DOUBLE_FAIL_PHASE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert cann.acl.aclrtSetDevice(0) == ACL_SUCCESS
    cann.core.cann_double_clear_report()
    yield 0
    cann.core.cann_double_clear_report()


def test_init_soc_and_device(cann, device):
    first = cann.acl.aclInit(None)
    assert first in (ACL_SUCCESS, ACL_ERROR_REPEAT_INITIALIZE)
    assert cann.acl.aclInit(None) == ACL_ERROR_REPEAT_INITIALIZE
    assert cann.acl.aclrtGetSocName() == b"Ascend910B1"
    current = ctypes.c_int32(-1)
    assert cann.acl.aclrtGetDevice(ctypes.byref(current)) == ACL_SUCCESS
    assert current.value == 0


def test_malloc_alignment_and_garbage(cann, device):
    pointer = cann.malloc(100)
    assert pointer % 64 == 0
    assert ctypes.string_at(pointer, 100) == b"\xff" * 100  # not zeroed
    assert cann.acl.aclrtFree(pointer) == ACL_SUCCESS


def test_async_memcpy_lands_only_after_sync(cann, device, monkeypatch):
    stream = cann.stream()
    buffer = cann.malloc(16)
    source = ctypes.create_string_buffer(b"A" * 16)
    result = ctypes.create_string_buffer(16)
    monkeypatch.setenv("CANN_DOUBLE_LAUNCH_DELAY_MS", "100")
    assert (
        cann.acl.aclrtMemcpyAsync(buffer, 16, source, 16, MEMCPY_HOST_TO_DEVICE, stream)
        == ACL_SUCCESS
    )
    assert (
        cann.acl.aclrtMemcpyAsync(result, 16, buffer, 16, MEMCPY_DEVICE_TO_HOST, stream)
        == ACL_SUCCESS
    )
    before = result.raw
    assert cann.acl.aclrtSynchronizeStream(stream) == ACL_SUCCESS
    assert before == b"\0" * 16
    assert result.raw == b"A" * 16
    cann.acl.aclrtFree(buffer)
    cann.acl.aclrtDestroyStream(stream)


def test_sync_timeout_real_and_injected(cann, device, monkeypatch):
    stream = cann.stream()
    buffer = cann.malloc(8)
    source = ctypes.create_string_buffer(8)
    monkeypatch.setenv("CANN_DOUBLE_LAUNCH_DELAY_MS", "300")
    cann.acl.aclrtMemcpyAsync(buffer, 8, source, 8, MEMCPY_HOST_TO_DEVICE, stream)
    assert (
        cann.acl.aclrtSynchronizeStreamWithTimeout(stream, 20) == ACL_ERROR_RT_STREAM_SYNC_TIMEOUT
    )
    assert "not done" in cann.error()
    assert cann.acl.aclrtSynchronizeStreamWithTimeout(stream, -1) == ACL_SUCCESS
    monkeypatch.setenv("CANN_DOUBLE_LAUNCH_DELAY_MS", "0")
    monkeypatch.setenv("CANN_DOUBLE_SYNC_TIMEOUT", "1")
    assert (
        cann.acl.aclrtSynchronizeStreamWithTimeout(stream, 1000) == ACL_ERROR_RT_STREAM_SYNC_TIMEOUT
    )
    assert cann.acl.aclrtSynchronizeStreamWithTimeout(stream, 1000) == ACL_SUCCESS
    cann.acl.aclrtFree(buffer)
    cann.acl.aclrtDestroyStream(stream)


def test_event_orders_streams(cann, device, monkeypatch):
    producer, consumer = cann.stream(), cann.stream()
    event = ctypes.c_void_p()
    assert cann.acl.aclrtCreateEvent(ctypes.byref(event)) == ACL_SUCCESS
    buffer = cann.malloc(8)
    source = ctypes.create_string_buffer(b"12345678")
    result = ctypes.create_string_buffer(8)
    monkeypatch.setenv("CANN_DOUBLE_LAUNCH_DELAY_MS", "50")
    cann.acl.aclrtMemcpyAsync(buffer, 8, source, 8, MEMCPY_HOST_TO_DEVICE, producer)
    cann.acl.aclrtRecordEvent(event, producer)
    cann.acl.aclrtStreamWaitEvent(consumer, event)
    cann.acl.aclrtMemcpyAsync(result, 8, buffer, 8, MEMCPY_DEVICE_TO_HOST, consumer)
    assert cann.acl.aclrtSynchronizeStream(consumer) == ACL_SUCCESS
    assert result.raw == b"12345678"
    for stream in (producer, consumer):
        cann.acl.aclrtDestroyStream(stream)
    cann.acl.aclrtDestroyEvent(event)
    cann.acl.aclrtFree(buffer)


def test_guard_overflow_detected(cann, device):
    pointer = cann.malloc(100)
    ctypes.memset(pointer + 100, 0, 1)  # one byte past the end
    assert cann.acl.aclrtFree(pointer) == ACL_SUCCESS
    assert "guard corruption (out-of-bounds write) at offset 100" in cann.report()


def test_double_and_unknown_free_detected(cann, device):
    pointer = cann.malloc(32)
    assert cann.acl.aclrtFree(pointer) == ACL_SUCCESS
    assert cann.acl.aclrtFree(pointer) == ACL_ERROR_RT_PARAM_INVALID
    assert "double free" in cann.report()
    host = ctypes.create_string_buffer(32)
    assert cann.acl.aclrtFree(ctypes.addressof(host)) == ACL_ERROR_RT_PARAM_INVALID
    assert "free of unknown pointer" in cann.report()


def test_use_after_free_detected(cann, device):
    pointer = cann.malloc(64)
    assert cann.core.cann_double_check_device_range(pointer + 8, 8) == 1
    assert cann.core.cann_double_check_device_range(pointer + 8, 64) == 0  # past the end
    assert cann.acl.aclrtFree(pointer) == ACL_SUCCESS
    assert cann.core.cann_double_check_device_range(pointer, 8) == 0
    assert "use after free" in cann.report()
    host = ctypes.create_string_buffer(8)
    assert (
        cann.acl.aclrtMemcpy(pointer, 8, host, 8, MEMCPY_HOST_TO_DEVICE)
        == ACL_ERROR_RT_PARAM_INVALID
    )


def test_malloc_failure_injection(cann, device, monkeypatch):
    monkeypatch.setenv("CANN_DOUBLE_FAIL_MALLOC", "2")
    first = cann.malloc(16)
    pointer = ctypes.c_void_p()
    assert cann.acl.aclrtMalloc(ctypes.byref(pointer), 16, 0) == ACL_ERROR_RT_MEMORY_ALLOCATION
    assert "CANN_DOUBLE_FAIL_MALLOC" in cann.error()
    third = cann.malloc(16)  # only the N-th fails
    for allocation in (first, third):
        cann.acl.aclrtFree(allocation)


def test_tensor_validation_and_live_counts(cann, device):
    baseline = cann.live_counts()
    buffer = cann.malloc(4 * 6)
    dims = (ctypes.c_int64 * 2)(2, 3)
    strides = (ctypes.c_int64 * 2)(3, 1)

    def create(data, storage=dims):
        return cann.nn.aclCreateTensor(
            dims, 2, ACL_FLOAT, strides, 0, ACL_FORMAT_ND, storage, 2, data
        )

    tensor = create(buffer)
    assert tensor
    assert not create(buffer + 4)
    assert "32-byte aligned" in cann.error()
    assert not create(buffer, (ctypes.c_int64 * 2)(4, 3))
    assert "past the end" in cann.error()
    values = (ctypes.c_int64 * 3)(1, 2, 3)
    array = cann.nn.aclCreateIntArray(values, 3)
    assert cann.live_counts()[1:] == (baseline[1] + 1, baseline[2], baseline[3] + 1)
    assert cann.nn.aclDestroyTensor(tensor) == 0
    assert cann.nn.aclDestroyTensor(tensor) == ACLNN_ERR_PARAM_INVALID
    assert "double destroy of aclTensor" in cann.report()
    assert cann.nn.aclDestroyIntArray(array) == 0
    assert cann.acl.aclrtFree(buffer) == ACL_SUCCESS
    assert cann.live_counts() == baseline


def test_executor_single_use_and_kernel_failure(cann, device):
    stream = cann.stream()
    executor = cann.core.cann_double_test_new_executor(b"aclnnTest", 0, 0)
    assert cann.nn.aclSetAclOpExecutorRepeatable(executor) != 0
    assert cann.core.cann_double_test_launch(b"aclnnTest", None, 0, executor, stream) == 0
    assert (
        cann.core.cann_double_test_launch(b"aclnnTest", None, 0, executor, stream)
        == ACLNN_ERR_PARAM_INVALID
    )
    assert "single-use" in cann.error()
    failing = cann.core.cann_double_test_new_executor(b"aclnnTest", 0, 561000)
    assert cann.core.cann_double_test_launch(b"aclnnTest", None, 0, failing, stream) == 0
    assert cann.acl.aclrtSynchronizeStream(stream) == 561000
    assert cann.error() == "test kernel failed"
    assert cann.acl.aclrtSynchronizeStream(stream) == ACL_SUCCESS
    assert cann.live_counts()[2] == 0
    cann.acl.aclrtDestroyStream(stream)


def test_phase_failure_injection(cann, device, monkeypatch):
    monkeypatch.setenv("CANN_DOUBLE_FAIL_PHASE", "aclnnA:561002,aclnnAGetWorkspaceSize:161002")
    assert cann.core.cann_double_test_injected_status(b"aclnnA") == 561002
    assert cann.core.cann_double_test_injected_status(b"aclnnAGetWorkspaceSize") == 161002
    assert cann.core.cann_double_test_injected_status(b"aclnnB") == 0


def _run_ranks(count, work):
    """Runs work(rank) on `count` threads; returns their results by rank."""
    results = [None] * count
    threads = [
        threading.Thread(target=lambda r=r: results.__setitem__(r, work(r))) for r in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    return results


def _init_all(cann, count):
    devices = (ctypes.c_int32 * count)(*range(count))
    comms = (ctypes.c_void_p * count)()
    assert cann.hccl.HcclCommInitAll(count, devices, comms) == 0
    return list(comms)


def _destroy_all(cann, comms):
    """Destroys _init_all's communicators, each from a thread on its own
    device (HCCL looks a communicator up in the calling device's table);
    returns HcclCommDestroy's results."""

    def destroy(rank):
        cann.acl.aclrtSetDevice(rank)
        result = cann.hccl.HcclCommDestroy(comms[rank])
        cann.acl.aclrtResetDevice(rank)
        return result

    return _run_ranks(len(comms), destroy)


def test_comm_init_all_all_gather_v(cann, device):
    comms = _init_all(cann, 4)
    name = cann.comm_name(comms[0])
    assert all(cann.comm_name(comm) == name for comm in comms)

    def rank_work(rank):
        cann.acl.aclrtSetDevice(rank)
        first = cann.all_gather(name, rank, bytes([rank]) * (rank + 1))
        stream = cann.stream()
        barrier = cann.hccl.HcclBarrier(comms[rank], stream)
        synced = cann.acl.aclrtSynchronizeStream(stream)
        cann.acl.aclrtDestroyStream(stream)
        return first, barrier, synced

    expected = b"".join(bytes([rank]) * (rank + 1) for rank in range(4))
    assert _run_ranks(4, rank_work) == [((0, expected), 0, 0)] * 4
    assert _destroy_all(cann, comms) == [0] * 4


def test_root_info_across_threads(cann, device):
    root_info = ctypes.create_string_buffer(4108)
    assert cann.hccl.HcclGetRootInfo(root_info) == 0

    def rank_work(rank):
        cann.acl.aclrtSetDevice(rank)
        comm = ctypes.c_void_p()
        assert cann.hccl.HcclCommInitRootInfo(2, root_info.raw, rank, ctypes.byref(comm)) == 0
        gathered = cann.all_gather(cann.comm_name(comm), rank, b"rank%d" % rank)
        assert cann.hccl.HcclCommDestroy(comm) == 0
        return gathered

    assert _run_ranks(2, rank_work) == [(0, b"rank0rank1")] * 2


def test_stalled_rank_times_out_every_rank(cann, device, monkeypatch):
    monkeypatch.setenv("CANN_DOUBLE_HCCL_TIMEOUT_MS", "300")
    comms = _init_all(cann, 3)
    name = cann.comm_name(comms[0])
    monkeypatch.setenv("CANN_DOUBLE_STALL_RANK", "*:1")

    def rank_work(rank):
        cann.acl.aclrtSetDevice(rank)
        start = time.monotonic()
        result, _ = cann.all_gather(name, rank, b"x")
        return result, time.monotonic() - start

    results = _run_ranks(3, rank_work)
    assert [result for result, _ in results] == [HCCL_E_TIMEOUT] * 3
    assert all(elapsed < 2.0 for _, elapsed in results)
    assert _destroy_all(cann, comms) == [0] * 3


def test_comm_destroy_needs_the_comms_device(cann, device):
    """HCCL looks a communicator up in the table of the calling thread's
    device: destroyed from another device it is HCCL_E_PARA, reported, and
    still alive; from its own device it goes."""
    comms = _init_all(cann, 2)
    assert cann.hccl.HcclCommDestroy(comms[1]) == HCCL_E_PARA  # this thread is on device 0
    assert (
        "HcclCommDestroy: the communicator of device 1 destroyed from a thread whose current "
        "device is 0" in cann.report()
    )
    rank = ctypes.c_uint32()
    assert cann.hccl.HcclGetRankId(comms[1], ctypes.byref(rank)) == 0 and rank.value == 1
    cann.core.cann_double_clear_report()
    assert _destroy_all(cann, comms) == [0, 0]
    assert cann.report().startswith("violations: 0\n")


def test_init_all_and_root_info_need_a_device(cann, device):
    """HcclCommInitAll and HcclGetRootInfo read the calling thread's device
    first: a thread without one gets HCCL_E_RUNTIME; one that adopted a
    context (aclrtSetCurrentContext, no aclrtSetDevice) has its device."""
    context = ctypes.c_void_p()
    assert cann.acl.aclrtGetCurrentContext(ctypes.byref(context)) == ACL_SUCCESS

    def fresh_thread(_):
        devices = (ctypes.c_int32 * 2)(0, 1)
        comms = (ctypes.c_void_p * 2)()
        root_info = ctypes.create_string_buffer(4108)
        refused = (
            cann.hccl.HcclCommInitAll(2, devices, comms),
            cann.error(),
            cann.hccl.HcclGetRootInfo(root_info),
            cann.error(),
        )
        assert cann.acl.aclrtSetCurrentContext(context) == ACL_SUCCESS
        return refused, cann.hccl.HcclCommInitAll(2, devices, comms), list(comms)

    [(refused, adopted, comms)] = _run_ranks(1, fresh_thread)
    assert refused == (
        HCCL_E_RUNTIME,
        "HcclCommInitAll: no device set on this thread (call aclrtSetDevice or "
        "aclrtSetCurrentContext first)",
        HCCL_E_RUNTIME,
        "HcclGetRootInfo: no device set on this thread (call aclrtSetDevice or "
        "aclrtSetCurrentContext first)",
    )
    assert adopted == 0
    assert _destroy_all(cann, comms) == [0, 0]


def test_set_current_context_switches_the_device(cann, device):
    """A context of another device makes that device the thread's."""
    context = ctypes.c_void_p()
    assert cann.acl.aclrtGetCurrentContext(ctypes.byref(context)) == ACL_SUCCESS

    def other_thread(_):
        cann.acl.aclrtSetDevice(1)
        before = cann.current_device()
        assert cann.acl.aclrtSetCurrentContext(context) == ACL_SUCCESS
        after = cann.current_device()
        cann.acl.aclrtResetDevice(1)
        return before, after

    assert _run_ranks(1, other_thread) == [(1, 0)]


def test_set_device_is_counted(cann, device):
    """Every aclrtSetDevice counts (from any thread) and every
    aclrtResetDevice takes one off, as ACL counts them."""
    before = cann.set_counts()
    assert len(before) == 8
    assert cann.acl.aclrtSetDevice(5) == ACL_SUCCESS
    assert _run_ranks(1, lambda _: cann.acl.aclrtSetDevice(5)) == [ACL_SUCCESS]
    assert cann.set_counts()[5] == before[5] + 2
    assert cann.acl.aclrtResetDevice(5) == ACL_SUCCESS
    assert cann.acl.aclrtResetDevice(5) == ACL_SUCCESS
    assert cann.set_counts() == before
    assert cann.acl.aclrtSetDevice(0) == ACL_SUCCESS  # back on the fixture's device


def test_last_reset_releases_the_default_context(library_dir):
    """The default context lives until the device's count returns to 0 (in a
    fresh process: the count starts at 0 there)."""
    script = textwrap.dedent(f"""
        import ctypes, sys
        sys.path.insert(0, {str(HERE)!r})
        from test_cann_double import Cann
        cann = Cann({library_dir!r})
        cann.acl.aclrtSetDevice(3)
        cann.acl.aclrtSetDevice(3)
        context = ctypes.c_void_p()
        cann.acl.aclrtGetCurrentContext(ctypes.byref(context))
        cann.acl.aclrtResetDevice(3)
        alive = cann.acl.aclrtSetCurrentContext(context)
        cann.acl.aclrtResetDevice(3)
        gone = cann.acl.aclrtSetCurrentContext(context)
        print(alive, gone, cann.set_counts()[3], cann.current_device())
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=20
    )
    assert out.stdout.split() == ["0", str(ACL_ERROR_RT_PARAM_INVALID), "0", "-1"]


CHILD_RANK = textwrap.dedent("""
    import ctypes, os, sys
    sys.path.insert(0, {tests!r})
    from test_cann_double import Cann
    cann = Cann({folder!r})
    cann.acl.aclrtSetDevice(1)
    print("ready", flush=True)
    info = bytes.fromhex(sys.stdin.readline())
    comm = ctypes.c_void_p()
    result = cann.hccl.HcclCommInitRootInfo(2, info, 1, ctypes.byref(comm))
    if result:
        print("init", result, flush=True)
        sys.exit(0)
    name = cann.comm_name(comm)
    result, gathered = cann.all_gather(name, 1, b"child")
    print(name.decode(), result, gathered.hex(), flush=True)
    cann.hccl.HcclCommDestroy(comm)
""")


def _spawn_child(library_dir, root_info, env):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_RANK.format(tests=str(HERE), folder=library_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert child.stdout.readline() == "ready\n"  # so a short timeout covers only the rendezvous
    child.stdin.write(root_info.hex() + "\n")
    child.stdin.flush()
    return child


def _root_rank(cann, library_dir, child_env):
    root_info = ctypes.create_string_buffer(4108)
    assert cann.hccl.HcclGetRootInfo(root_info) == 0
    child = _spawn_child(library_dir, root_info.raw, child_env)
    comm = ctypes.c_void_p()
    assert cann.hccl.HcclCommInitRootInfo(2, root_info.raw, 0, ctypes.byref(comm)) == 0
    return child, comm.value


def test_root_info_across_processes(cann, library_dir, device):
    child, comm = _root_rank(cann, library_dir, {})
    name = cann.comm_name(comm)
    result, gathered = cann.all_gather(name, 0, b"root!")
    out, _ = child.communicate(timeout=20)
    assert (result, gathered) == (0, b"root!child")
    assert out.split() == [name.decode(), "0", b"root!child".hex()]
    rank = ctypes.c_uint32()
    assert cann.hccl.HcclGetRankId(comm, ctypes.byref(rank)) == 0 and rank.value == 0
    assert cann.hccl.HcclCommDestroy(comm) == 0


def test_stalled_rank_across_processes(cann, library_dir, device, monkeypatch):
    monkeypatch.setenv("CANN_DOUBLE_HCCL_TIMEOUT_MS", "300")
    child, comm = _root_rank(cann, library_dir, {"CANN_DOUBLE_STALL_RANK": "*:1"})
    start = time.monotonic()
    result, _ = cann.all_gather(cann.comm_name(comm), 0, b"root!")
    assert result == HCCL_E_TIMEOUT
    assert time.monotonic() - start < 2.0
    out, _ = child.communicate(timeout=20)
    assert out.split()[1] == str(HCCL_E_TIMEOUT)
    cann.hccl.HcclCommDestroy(comm)


def test_missing_rank_times_out_init(cann, device, monkeypatch):
    monkeypatch.setenv("CANN_DOUBLE_HCCL_TIMEOUT_MS", "200")
    root_info = ctypes.create_string_buffer(4108)
    assert cann.hccl.HcclGetRootInfo(root_info) == 0
    comm = ctypes.c_void_p()
    start = time.monotonic()
    assert cann.hccl.HcclCommInitRootInfo(2, root_info.raw, 0, ctypes.byref(comm)) == HCCL_E_TIMEOUT
    assert time.monotonic() - start < 2.0


# --------------------------------------------------------------------------
# HcclAlltoAllV

#: HcclDataType code -> the NumPy dtype of its elements.
HCCL_TYPES = {0: np.int8, 1: np.int16, 3: np.float16, 4: np.float32, 5: np.int64, 11: np.uint16}


def _u64(values):
    return (ctypes.c_uint64 * len(values))(*values)


def _alltoallv(cann, comm, stream, send, counts, sdispls, recv, rcounts, rdispls, dtype=3):
    """HcclAlltoAllV with Python lists for the count and displacement arrays
    (None passes a null array)."""
    arrays = [None if a is None else _u64(a) for a in (counts, sdispls, rcounts, rdispls)]
    return cann.hccl.HcclAlltoAllV(
        send, arrays[0], arrays[1], dtype, recv, arrays[2], arrays[3], dtype, comm, stream
    )


@pytest.fixture
def one_rank(cann, device):
    """A one-rank communicator on device 0, a stream and two 16-byte buffers."""
    (comm,) = _init_all(cann, 1)
    stream, send, recv = cann.stream(), cann.malloc(16), cann.malloc(16)
    yield comm, stream, send, recv
    for pointer in (send, recv):
        cann.acl.aclrtFree(pointer)
    cann.acl.aclrtDestroyStream(stream)
    cann.hccl.HcclCommDestroy(comm)


def test_alltoallv_one_rank_moves_its_block(cann, one_rank):
    comm, stream, send, recv = one_rank
    source = ctypes.create_string_buffer(bytes(range(16)))
    cann.acl.aclrtMemcpy(send, 16, source, 16, MEMCPY_HOST_TO_DEVICE)
    # Three float16 elements from element 2 of send to element 4 of recv.
    assert _alltoallv(cann, comm, stream, send, [3], [2], recv, [3], [4]) == 0
    assert cann.acl.aclrtSynchronizeStream(stream) == ACL_SUCCESS
    out = ctypes.create_string_buffer(16)
    cann.acl.aclrtMemcpy(out, 16, recv, 16, MEMCPY_DEVICE_TO_HOST)
    assert out.raw == b"\xff" * 8 + bytes(range(4, 10)) + b"\xff" * 2  # the rest untouched


ALLTOALLV_REFUSED = {
    # name: (arguments changed from a valid one-rank call, HcclResult, message)
    "null-send-counts": (dict(counts=None), HCCL_E_PTR, "a count or displacement array is null"),
    "null-sdispls": (dict(sdispls=None), HCCL_E_PTR, "a count or displacement array is null"),
    "null-recv-counts": (dict(rcounts=None), HCCL_E_PTR, "a count or displacement array is null"),
    "null-rdispls": (dict(rdispls=None), HCCL_E_PTR, "a count or displacement array is null"),
    "send-count-past-the-end": (
        dict(counts=[9], rcounts=[9]),
        HCCL_E_PARA,
        "send block 0 (displacement 0, count 9) is not in live device memory",
    ),
    "send-displacement-past-the-end": (
        dict(sdispls=[7]),
        HCCL_E_PARA,
        "send block 0 (displacement 7, count 2) is not in live device memory",
    ),
    "receive-displacement-past-the-end": (
        dict(rdispls=[8]),
        HCCL_E_PARA,
        "receive block 0 (displacement 8, count 2) is not in live device memory",
    ),
    "null-send-buffer": (
        dict(send=None),
        HCCL_E_PARA,
        "send block 0 (displacement 0, count 2) is not in live device memory",
    ),
    "null-receive-buffer": (
        dict(recv=None),
        HCCL_E_PARA,
        "receive block 0 (displacement 0, count 2) is not in live device memory",
    ),
    "same-buffer": (dict(recv="send"), HCCL_E_PARA, "recvBuf and sendBuf must differ"),
    "int128": (dict(dtype=12), HCCL_E_PARA, "unsupported HcclDataType 12"),
    "hifloat8": (dict(dtype=14), HCCL_E_PARA, "unsupported HcclDataType 14"),
    "reserved": (dict(dtype=255), HCCL_E_PARA, "unsupported HcclDataType 255"),
    "negative": (dict(dtype=-1), HCCL_E_PARA, "unsupported HcclDataType -1"),
}


@pytest.mark.parametrize("case", ALLTOALLV_REFUSED.values(), ids=ALLTOALLV_REFUSED.keys())
def test_alltoallv_refuses_bad_arguments(cann, one_rank, case):
    """Refused at the call with HCCL's status and the recent error, and
    nothing enqueued (the stream stays clean)."""
    comm, stream, send, recv = one_rank
    changes, status, message = case
    args = dict(send=send, counts=[2], sdispls=[0], recv=recv, rcounts=[2], rdispls=[0], dtype=3)
    args.update(changes)
    if args["recv"] == "send":
        args["recv"] = send
    assert _alltoallv(cann, comm, stream, **args) == status
    assert cann.error().startswith("HcclAlltoAllV: " + message)
    assert cann.acl.aclrtSynchronizeStream(stream) == ACL_SUCCESS


def test_alltoallv_refuses_mismatched_types_host_memory_and_dead_comms(cann, one_rank):
    comm, stream, send, recv = one_rank
    one = _u64([1])
    zero = _u64([0])
    assert cann.hccl.HcclAlltoAllV(send, one, zero, 3, recv, one, zero, 4, comm, stream) == 1
    assert cann.error() == "HcclAlltoAllV: sendType and recvType differ"
    host = ctypes.create_string_buffer(16)
    assert _alltoallv(cann, comm, stream, ctypes.addressof(host), [1], [0], recv, [1], [0]) == 1
    assert "send block 0 (displacement 0, count 1) is not in live device memory" in cann.error()
    (dead,) = _init_all(cann, 1)
    assert cann.hccl.HcclCommDestroy(dead) == 0
    assert _alltoallv(cann, dead, stream, send, [1], [0], recv, [1], [0]) == HCCL_E_PTR
    assert cann.error() == "HcclAlltoAllV: not a live communicator"
    # Zero counts touch no memory: null buffers are fine then.
    assert _alltoallv(cann, comm, stream, None, [0], [0], None, [0], [0]) == 0
    assert cann.acl.aclrtSynchronizeStream(stream) == ACL_SUCCESS


def test_alltoallv_refuses_another_devices_thread(cann, one_rank):
    comm, stream, send, recv = one_rank

    def other_thread(_):
        cann.acl.aclrtSetDevice(1)
        result = _alltoallv(cann, comm, None, send, [1], [0], recv, [1], [0])
        return result, cann.error()

    assert _run_ranks(1, other_thread) == [
        (
            HCCL_E_PARA,
            "HcclAlltoAllV: the communicator belongs to device 0, the thread's device is 1",
        )
    ]


def test_alltoallv_injected_status(cann, one_rank, monkeypatch):
    comm, stream, send, recv = one_rank
    monkeypatch.setenv("CANN_DOUBLE_FAIL_PHASE", "HcclAlltoAllV:4")
    assert _alltoallv(cann, comm, stream, send, [1], [0], recv, [1], [0]) == HCCL_E_INTERNAL
    assert cann.acl.aclrtSynchronizeStream(stream) == ACL_SUCCESS  # nothing enqueued
    monkeypatch.delenv("CANN_DOUBLE_FAIL_PHASE")
    assert _alltoallv(cann, comm, stream, send, [1], [0], recv, [1], [0]) == 0
    assert cann.acl.aclrtSynchronizeStream(stream) == ACL_SUCCESS


def _exchange(cann, comms, counts, dtype, recv_counts=None, stall=None):
    """Every rank r sends counts[r][d] elements to rank d (displacements with
    gaps) and receives them source-major with gaps; returns per rank (call
    status, stream status, error, received array, expected array)."""
    world = len(comms)
    counts = np.asarray(counts)
    recv_counts = counts.T if recv_counts is None else np.asarray(recv_counts)
    item = np.dtype(HCCL_TYPES[dtype])

    def layout(sizes):
        displs = np.concatenate([[0], np.cumsum(np.asarray(sizes) + 1)[:-1]])  # one gap each
        return [int(v) for v in displs], int(displs[-1] + sizes[-1] + 1)

    def rank_work(rank):
        cann.acl.aclrtSetDevice(rank)
        stream = cann.stream()
        sdispls, send_len = layout(counts[rank])
        rdispls, recv_len = layout(recv_counts[rank])
        data = np.zeros(send_len, item)
        for d in range(world):
            block = 1000 * rank + 100 * d + np.arange(counts[rank][d])
            data[sdispls[d] : sdispls[d] + counts[rank][d]] = block.astype(item)
        send, recv = cann.malloc(data.nbytes), cann.malloc(recv_len * item.itemsize)
        cann.acl.aclrtMemcpy(send, data.nbytes, data.ctypes.data, data.nbytes, 1)
        result = _alltoallv(
            cann,
            comms[rank],
            stream,
            send,
            [int(c) for c in counts[rank]],
            sdispls,
            recv,
            [int(c) for c in recv_counts[rank]],
            rdispls,
            dtype,
        )
        synced = cann.acl.aclrtSynchronizeStreamWithTimeout(stream, 5000)
        error = cann.error()
        out = np.empty(recv_len, item)
        cann.acl.aclrtMemcpy(out.ctypes.data, out.nbytes, recv, out.nbytes, 2)
        want = np.frombuffer(b"\xff" * out.nbytes, item).copy()
        for s in range(world):
            block = 1000 * s + 100 * rank + np.arange(recv_counts[rank][s])
            want[rdispls[s] : rdispls[s] + recv_counts[rank][s]] = block.astype(item)
        for pointer in (send, recv):
            cann.acl.aclrtFree(pointer)
        cann.acl.aclrtDestroyStream(stream)
        return result, synced, error, out, want

    return _run_ranks(world, rank_work)


@pytest.mark.parametrize("dtype", HCCL_TYPES, ids=[np.dtype(t).name for t in HCCL_TYPES.values()])
def test_alltoallv_exchange_across_ranks(cann, device, dtype):
    """Three ranks, zero counts for some pairs (and a rank sending itself
    nothing): each receives its blocks source-major where rdispls say, in
    elements of the data type; the gaps stay untouched."""
    comms = _init_all(cann, 3)
    counts = [[2, 0, 3], [1, 4, 0], [0, 2, 2]]
    for result, synced, error, out, want in _exchange(cann, comms, counts, dtype):
        assert (result, synced) == (0, ACL_SUCCESS), error
        np.testing.assert_array_equal(out.view(np.uint8), want.view(np.uint8))
    assert _destroy_all(cann, comms) == [0] * 3


def test_alltoallv_exchange_across_processes(cann, library_dir, device):
    """The root rank here, the other in a child process (through the hub):
    the child sends 3 int16 elements, receives 2."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_ALLTOALLV.format(tests=str(HERE), folder=library_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "ready\n"
    root_info = ctypes.create_string_buffer(4108)
    assert cann.hccl.HcclGetRootInfo(root_info) == 0
    child.stdin.write(root_info.raw.hex() + "\n")
    child.stdin.flush()
    comm = ctypes.c_void_p()
    assert cann.hccl.HcclCommInitRootInfo(2, root_info.raw, 0, ctypes.byref(comm)) == 0
    stream = cann.stream()
    data = np.array([10, 11, 12, 13], np.int16)  # 1 to itself, 2 to the child (from element 2)
    send, recv = cann.malloc(8), cann.malloc(8)
    cann.acl.aclrtMemcpy(send, 8, data.ctypes.data, 8, MEMCPY_HOST_TO_DEVICE)
    assert _alltoallv(cann, comm.value, stream, send, [1, 2], [0, 2], recv, [1, 3], [0, 1], 1) == 0
    assert cann.acl.aclrtSynchronizeStreamWithTimeout(stream, 5000) == ACL_SUCCESS, cann.error()
    out = np.empty(4, np.int16)
    cann.acl.aclrtMemcpy(out.ctypes.data, 8, recv, 8, MEMCPY_DEVICE_TO_HOST)
    np.testing.assert_array_equal(out, [10, 20, 21, 22])
    child_out, _ = child.communicate(timeout=20)
    assert child_out.split() == ["0", "0", "12,13"]
    for pointer in (send, recv):
        cann.acl.aclrtFree(pointer)
    cann.acl.aclrtDestroyStream(stream)
    assert cann.hccl.HcclCommDestroy(comm.value) == 0


CHILD_ALLTOALLV = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_cann_double import Cann, _alltoallv
    cann = Cann({folder!r})
    cann.acl.aclrtSetDevice(1)
    print("ready", flush=True)
    info = bytes.fromhex(sys.stdin.readline())
    comm = ctypes.c_void_p()
    assert cann.hccl.HcclCommInitRootInfo(2, info, 1, ctypes.byref(comm)) == 0
    stream = cann.stream()
    data = np.array([20, 21, 22], np.int16)  # all 3 to the root
    send, recv = cann.malloc(6), cann.malloc(4)
    cann.acl.aclrtMemcpy(send, 6, data.ctypes.data, 6, 1)
    result = _alltoallv(cann, comm.value, stream, send, [3, 0], [0, 3], recv, [2, 0], [0, 2], 1)
    synced = cann.acl.aclrtSynchronizeStreamWithTimeout(stream, 5000)
    out = np.empty(2, np.int16)
    cann.acl.aclrtMemcpy(out.ctypes.data, 4, recv, 4, 2)
    print(result, synced, ",".join(str(v) for v in out), flush=True)
    for pointer in (send, recv):
        cann.acl.aclrtFree(pointer)
    cann.acl.aclrtDestroyStream(stream)
    cann.hccl.HcclCommDestroy(comm)
""")


def test_alltoallv_recv_counts_must_match_the_senders(cann, device):
    """Rank 1 expects 3 elements from rank 0, which sends it 1: its stream
    fails with the mismatch named; the others are unaffected."""
    comms = _init_all(cann, 2)
    counts = [[1, 1], [2, 2]]
    recv_counts = [[1, 2], [3, 2]]
    results = _exchange(cann, comms, counts, 1, recv_counts=recv_counts)
    assert results[0][:2] == (0, ACL_SUCCESS)
    result, synced, error, _, _ = results[1]
    assert (result, synced) == (0, ACL_ERROR_RT_AICORE_EXCEPTION)
    assert error == ("HcclAlltoAllV: recvCounts[0] = 3 on rank 1 but rank 0 sends it 1 elements")
    assert _destroy_all(cann, comms) == [0] * 2


def test_alltoallv_stalled_rank_fails_every_rank_and_breaks_the_comm(cann, device, monkeypatch):
    """A stalled rank: every rank's stream fails with the stream timeout
    (507046) within the communicator timeout; the communicator stays failed
    (the next exchange fails at once with the same status), and a new one
    works."""
    monkeypatch.setenv("CANN_DOUBLE_HCCL_TIMEOUT_MS", "300")
    comms = _init_all(cann, 2)
    counts = [[1, 2], [3, 1]]
    monkeypatch.setenv("CANN_DOUBLE_STALL_RANK", "*:1")
    start = time.monotonic()
    for result, synced, error, _, _ in _exchange(cann, comms, counts, 3):
        assert (result, synced) == (0, ACL_ERROR_RT_STREAM_SYNC_TIMEOUT)
        assert error.startswith("HcclAlltoAllV: HCCL_E_TIMEOUT")
    assert time.monotonic() - start < 3.0
    monkeypatch.delenv("CANN_DOUBLE_STALL_RANK")
    start = time.monotonic()
    for result, synced, error, _, _ in _exchange(cann, comms, counts, 3):
        assert (result, synced) == (0, ACL_ERROR_RT_STREAM_SYNC_TIMEOUT)  # at once
        assert error.startswith("HcclAlltoAllV: HCCL_E_TIMEOUT")
    assert time.monotonic() - start < 0.3
    assert _destroy_all(cann, comms) == [0] * 2
    comms = _init_all(cann, 2)
    for result, synced, error, out, want in _exchange(cann, comms, counts, 3):
        assert (result, synced) == (0, ACL_SUCCESS), error
        np.testing.assert_array_equal(out.view(np.uint8), want.view(np.uint8))
    assert _destroy_all(cann, comms) == [0] * 2


def test_exit_report_lists_leaks(library_dir, tmp_path):
    report = tmp_path / "report.txt"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from test_cann_double import Cann
        cann = Cann({library_dir!r})
        cann.acl.aclrtSetDevice(0)
        cann.malloc(48)  # never freed
    """)
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        capture_output=True,
        env={**os.environ, "CANN_DOUBLE_REPORT": str(report)},
        timeout=20,
    )
    text = report.read_text()
    assert "allocations=1 " in text
    assert "leaked allocation #1 (48 bytes" in text


def test_everything_released(cann, device):
    assert cann.live_counts() == cann.baseline
    assert cann.report().startswith("violations: 0\n")
