"""HCCL communicators: one per replica group a lowering derives from its mesh
axis, created when the call is lowered ("first use") and cached for the
process; destroyed at exit.

One process holding every device of a group: ``HcclCommInitAll``. Several
processes (``jax.distributed``): the process holding the group's rank 0 calls
``HcclGetRootInfo`` and publishes the root info through JAX's distributed
key-value store; every process then joins with ``HcclCommInitRootInfo``, one
thread per local rank. The launch core looks a communicator up by (group key,
JAX device ordinal) and passes its ``HcclGetCommName`` name as ``group``.

A group whose collective failed is re-created by the next call, compiled or
not (the launch core does it): in one process with ``HcclCommInitAll``; across
processes as a new *generation* ``"<epoch>.<call>"`` whose root info travels
under its own key (:func:`_exchange`, called from the launch core), so every
process re-creates the same generation at the same call and none can join a
stale one.
"""

from __future__ import annotations

import atexit
import threading
import time

import jax
import numpy as np

from jax_mc2.ascend._native import native as _mc2_ascend
from jax_mc2.framework import _compat

_LOCK = threading.Lock()
_CREATED: set[str] = set()
KV_TIMEOUT_MS = 300_000
#: The processes of each group spanning processes, by group key.
_PROCESSES: dict[str, list[int]] = {}


def _ordinal(device) -> int:
    """The device ordinal XLA:CPU gives the handler (ffi::DeviceOrdinal): the
    device's id (process p's CPU devices are numbered from p * 2048)."""
    return int(device.id)


def _process_index() -> int:
    return jax.process_index()


def replica_groups(mesh, axis_name: tuple[str, ...]) -> list[list]:
    """The device groups of ``axis_name`` over ``mesh``: rank = the linear
    index over the named axes in the given order (as ``lax.axis_index``)."""
    names = list(mesh.axis_names)
    devices = np.asarray(mesh.devices)
    others = [a for a in names if a not in axis_name]
    order = [names.index(a) for a in others] + [names.index(a) for a in axis_name]
    size = int(np.prod([mesh.shape[a] for a in axis_name])) if axis_name else 1
    return [list(row) for row in devices.transpose(order).reshape(-1, size)]


def group_key(devices) -> str:
    return "jax_mc2/" + "-".join(str(d.id) for d in devices)


def ensure(devices) -> str:
    """Creates (once) the communicator of the group ``devices`` (in rank
    order) for this process's devices in it; returns its key."""
    key = group_key(devices)
    with _LOCK:
        if key in _CREATED:
            return key
        me = _process_index()
        local = [(r, _ordinal(d)) for r, d in enumerate(devices) if d.process_index == me]
        if not local:
            return key
        if len(local) == len(devices):
            _mc2_ascend.comm_init_all(key, [o for _, o in local])
        else:
            if _compat.distributed_client() is None:
                raise RuntimeError(
                    f"implementation='ascend': replica group {key} spans several processes; "
                    "initialize jax.distributed first"
                )
            _PROCESSES[key] = sorted({d.process_index for d in devices})
            _mc2_ascend.set_root_info_exchange(_exchange)
            _mc2_ascend.comm_join(key, len(devices), local, KV_TIMEOUT_MS)
        _CREATED.add(key)
    return key


def root_info_key(key: str, generation: str) -> str:
    """The key-value store key of a group's root info for one generation."""
    return f"jax_mc2/hccl_root_info/{key}/{generation}"


def _exchange(key: str, generation: str, root: bytes | None, timeout_ms: int) -> bytes:
    """Publishes (``root`` given: this process holds rank 0) or fetches the
    root info of ``generation`` of group ``key``, then waits until every
    process of the group has it, so that all call HcclCommInitRootInfo
    together (a process that failed early must not start HCCL's rendezvous
    timer long before the others arrive). Raises past ``timeout_ms``; the
    launch core calls it (from XLA's threads when a compiled call re-creates
    a group) and reports the error with the operator."""
    client = _compat.distributed_client()
    if client is None:
        raise RuntimeError("jax.distributed is not initialized (or was shut down)")
    deadline = time.monotonic() + timeout_ms / 1000
    kv_key = root_info_key(key, generation)
    me = _process_index()
    if root is not None:
        _compat.kv_set_bytes(client, kv_key, root)
    else:
        try:
            root = _compat.kv_get_bytes(client, kv_key, timeout_ms)
        except Exception as e:  # jax's own error type varies by version
            raise TimeoutError(
                f"process {me} got no root info under key-value store key {kv_key!r} from the "
                f"process holding rank 0 within {timeout_ms} ms ({type(e).__name__}: {e})"
            ) from None
    _compat.kv_set_bytes(client, f"{kv_key}/has/{me}", b"1")
    for p in _PROCESSES.get(key, ()):
        left = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            _compat.kv_get_bytes(client, f"{kv_key}/has/{p}", left)
        except Exception as e:
            raise TimeoutError(
                f"process {p} did not reach generation {generation} of the group within "
                f"{timeout_ms} ms ({type(e).__name__}: {e})"
            ) from None
    return bytes(root)


def generation(key: str) -> str:
    """The generation of a group's current communicators in this process
    ("" if it has none): ``"<epoch>.<call>"``."""
    return _mc2_ascend.comm_generation(key)


def for_lowering(ctx, axis_name: tuple[str, ...]) -> str:
    """The group key of this lowering's replica groups, creating every group's
    communicator. Each device finds its own group's communicator by ordinal,
    so the lowering passes every group's key ('|'-separated)."""
    mesh = _compat.lowering_mesh(ctx)
    if axis_name:
        if mesh is None:
            raise NotImplementedError(
                "implementation='ascend' needs a concrete Mesh under shard_map to derive the "
                f"HCCL replica groups of axis {axis_name}"
            )
        groups = replica_groups(mesh, tuple(axis_name))
    else:
        devices = _compat.lowering_device_assignment(ctx)
        if devices is None:
            devices = jax.local_devices()
        groups = [[d] for d in devices]
    # The handler tries each key for its device ordinal.
    return "|".join(ensure(g) for g in groups)


def reset() -> None:
    """Forgets the created communicators (after shutdown)."""
    with _LOCK:
        _CREATED.clear()


# The exchange refers to this module: drop it before the interpreter goes.
atexit.register(lambda: _mc2_ascend.set_root_info_exchange(None))
