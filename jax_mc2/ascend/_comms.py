"""HCCL communicators: one per replica group a lowering derives from its mesh
axis, created when the call is lowered ("first use") and cached for the
process; destroyed at exit.

One process holding every device of a group: ``HcclCommInitAll``. Several
processes (``jax.distributed``): the process holding the group's rank 0 calls
``HcclGetRootInfo`` and publishes the root info through JAX's distributed
key-value store; every process then joins with ``HcclCommInitRootInfo``, one
thread per local rank. The launch core looks a communicator up by (group key,
JAX device ordinal) and passes its ``HcclGetCommName`` name as ``group``.
"""

from __future__ import annotations

import threading

import jax
import numpy as np

from jax_mc2.ascend._native import native as _mc2_ascend
from jax_mc2.framework import _compat

_LOCK = threading.Lock()
_CREATED: set[str] = set()
KV_TIMEOUT_MS = 300_000


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
            client = _compat.distributed_client()
            if client is None:
                raise RuntimeError(
                    f"implementation='ascend': replica group {key} spans several processes; "
                    "initialize jax.distributed first"
                )
            kv_key = f"jax_mc2/hccl_root_info/{key}"
            if devices[0].process_index == me:
                root = _mc2_ascend.get_root_info(_ordinal(devices[0]))
                _compat.kv_set_bytes(client, kv_key, root)
            else:
                root = _compat.kv_get_bytes(client, kv_key, KV_TIMEOUT_MS)
            _mc2_ascend.comm_init_root_info(key, len(devices), root, local)
        _CREATED.add(key)
    return key


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
