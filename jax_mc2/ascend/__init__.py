"""The ``ascend`` implementation: CANN's MC2 kernels through the launch layer
in ``ascend_kernels/`` (see docs/ascend.md).

A JAX program on an Ascend host runs on the CPU platform; each JAX CPU device
is bound to one NPU (device i to the i-th visible NPU unless
:func:`bind_devices` or ``JAX_MC2_ASCEND_DEVICES`` say otherwise) and every
operator is one custom call that copies its operands to that NPU, runs the
whole MC2 operator (compute and HCCL communication inside CANN's kernel) on
the device's stream and copies the results back.

CANN is loaded with dlopen when first needed, never at import: importing
jax_mc2 works without it, and ``implementation="ascend"`` then raises
``NotImplementedError`` at trace time naming the missing library or symbol.

Public API:

- :func:`is_available` -> bool, :func:`why_unavailable` -> the reason (None
  when available).
- :data:`ACL_DTYPE` (dtype name -> aclDataType code), :data:`ACL_FORMAT`,
  :data:`HCCL_DTYPE` (dtype name -> HcclDataType code).
- :func:`bind_devices`, :func:`configure`, :func:`shutdown`, :func:`soc_name`,
  :func:`chip_target`.
"""

from __future__ import annotations

import atexit
import os

import jax

from jax_mc2.ascend import (
    _comms,
    _rules,  # noqa: F401  (registers the lowering rules)
)
from jax_mc2.ascend._codes import ACL_DTYPE, ACL_FORMAT, HCCL_DTYPE
from jax_mc2.ascend._comms import _ordinal
from jax_mc2.ascend._native import native as _mc2_ascend
from jax_mc2.framework import implementation as _implementation
from jax_mc2.framework import targets
from jax_mc2.framework.validation import check_int, is_int

__all__ = [
    "ACL_DTYPE",
    "ACL_FORMAT",
    "HCCL_DTYPE",
    "bind_devices",
    "chip_target",
    "configure",
    "is_available",
    "shutdown",
    "soc_name",
    "why_unavailable",
]

#: The custom-call target of the host bridge (CPU platform).
HOST_BRIDGE = "mc2_ascend_host_bridge"
#: The device-mode target, for an Ascend PJRT platform named "ASCEND" (not
#: registered: no such platform exists in public JAX).
DEVICE_TARGET = "mc2_ascend_device"
DEVICE_PLATFORM = "ASCEND"

for _name, _capsule in _mc2_ascend.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


def why_unavailable() -> str | None:
    """Why the ascend implementation cannot run here (None if it can): the
    CANN library or symbol that failed to load, and where it was looked for."""
    ok, why = _mc2_ascend.load()
    return None if ok else why


def is_available() -> bool:
    """Whether CANN's libraries load (see :func:`why_unavailable`)."""
    return why_unavailable() is None


_USED = False


def _check(op: str) -> None:
    global _USED
    why = why_unavailable()
    if why is not None:
        raise NotImplementedError(f"{op}: implementation='ascend' is not available: {why}")
    _USED = True
    _apply_env_once(op)
    _apply_chip_target_once()


_TARGET_APPLIED = False


def _apply_chip_target_once() -> None:
    """Without an explicit target, the chip's own (from aclrtGetSocName)
    applies from the first ascend call on."""
    global _TARGET_APPLIED
    if _TARGET_APPLIED:
        return
    _TARGET_APPLIED = True
    if targets.explicitly_set():
        return
    try:
        name = chip_target()
    except RuntimeError:
        return
    if name is not None:
        jax.config.update("jax_mc2_target", name)


def bind_devices(npus) -> None:
    """Binds this process's i-th JAX CPU device (``jax.local_devices()[i]``)
    to NPU ``npus[i]`` (default: NPU i; env ``JAX_MC2_ASCEND_DEVICES="0,1,..."``).
    Call before the first ascend operator runs."""
    global _BOUND
    local = jax.local_devices(backend="cpu")
    npus = list(npus)
    if len(npus) < len(local):
        raise ValueError(
            f"bind_devices: {len(local)} local JAX CPU devices need {len(local)} NPU ids, got "
            f"{npus}"
        )
    used = npus[: len(local)]
    ints = all(is_int(n) for n in used)
    # One rank per NPU: HCCL refuses a communicator with an NPU twice.
    if not ints or min(used) < 0 or len(set(used)) != len(used):
        raise ValueError(
            f"bind_devices: NPU ids must be distinct non-negative ints, one per local JAX CPU "
            f"device, got {used}"
        )
    _mc2_ascend.bind_devices([(_ordinal(d), int(n)) for d, n in zip(local, used)])
    _BOUND = True


_BOUND = False


def configure(
    *,
    timeout_ms: int | None = None,
    deterministic: bool | None = None,
    hccl_buffsize_mb: int | None = None,
) -> None:
    """Launch-layer options (each also has an environment variable):

    - ``timeout_ms`` (``JAX_MC2_ASCEND_TIMEOUT_MS``, default 120000): how long
      a call waits for its stream (aclrtSynchronizeStreamWithTimeout); -1
      waits forever. A timeout is an error naming the operator.
    - ``deterministic`` (``JAX_MC2_ASCEND_DETERMINISTIC=1``): sets
      ACL_OPT_DETERMINISTIC on each device context and HCCL_DETERMINISTIC
      (HcclSetConfig) before communicators are created.
    - ``hccl_buffsize_mb`` (``HCCL_BUFFSIZE``, CANN's own; default 200): the
      HCCL window size MC2's tiling reads.

    HCCL takes ``deterministic`` and ``hccl_buffsize_mb`` when it creates a
    communicator, and every lowering of an ascend call creates its group's:
    changing either while communicators exist is a ValueError (call
    :func:`shutdown` first, on every process; later calls create them anew).
    """
    if timeout_ms is not None:
        timeout_ms = _timeout_ms(timeout_ms, "configure: timeout_ms")
    if deterministic is not None:
        deterministic = bool(deterministic)
        _refuse_with_communicators("deterministic", deterministic, deterministic != _DETERMINISTIC)
    if hccl_buffsize_mb is not None:
        buffsize = str(check_int("configure", "hccl_buffsize_mb", hccl_buffsize_mb, minimum=1))
        _refuse_with_communicators(
            "hccl_buffsize_mb", hccl_buffsize_mb, buffsize != os.environ.get("HCCL_BUFFSIZE", "200")
        )
    if timeout_ms is not None:
        _mc2_ascend.set_timeout_ms(timeout_ms)
    if deterministic is not None:
        _set_deterministic(deterministic)
    if hccl_buffsize_mb is not None:
        os.environ["HCCL_BUFFSIZE"] = buffsize


#: The determinism last asked for.
_DETERMINISTIC = False


def _set_deterministic(on: bool) -> None:
    global _DETERMINISTIC
    _mc2_ascend.set_deterministic(on)
    _DETERMINISTIC = on


def _refuse_with_communicators(name: str, value, changes: bool) -> None:
    """A ValueError if setting ``name`` to ``value`` changes it while HCCL
    communicators exist (they keep what they were created with)."""
    count = _mc2_ascend.comm_count()
    if changes and count:
        raise ValueError(
            f"configure: {name}={value!r} would not reach the {count} HCCL "
            f"communicator(s) that exist (HCCL reads it when it creates one, at the "
            f"lowering of an ascend call); call jax_mc2.ascend.shutdown() first, on "
            f"every process: later calls create them anew"
        )


def _timeout_ms(raw, name: str) -> int:
    """A stream timeout: -1 (wait forever) or a positive number of ms (an
    int, or its decimal string from the environment)."""
    value = raw
    if isinstance(raw, str):
        try:
            value = int(raw.strip())
        except ValueError:
            value = None
    if not is_int(value) or not (value == -1 or 0 < value < 2**31):
        raise ValueError(
            f"{name} must be -1 (wait forever) or a positive number of milliseconds, got {raw!r}"
        )
    return int(value)


_ENV_APPLIED = False


def _apply_env_once(op: str) -> None:
    """The environment's launch options, from the first ascend call on (a bad
    value is an error naming ``op`` and the variable, at every call until it
    is mended)."""
    global _ENV_APPLIED
    if _ENV_APPLIED:
        return
    devices = os.environ.get("JAX_MC2_ASCEND_DEVICES", "").strip()
    timeout = os.environ.get("JAX_MC2_ASCEND_TIMEOUT_MS", "").strip()
    try:
        npus = [int(x) for x in devices.split(",") if x.strip()] if devices else None
        if npus is not None:
            bind_devices(npus)
        elif not _BOUND:
            bind_devices(range(len(jax.local_devices(backend="cpu"))))
        if timeout:
            _mc2_ascend.set_timeout_ms(_timeout_ms(timeout, "JAX_MC2_ASCEND_TIMEOUT_MS"))
    except ValueError as e:
        raise ValueError(
            f"{op}: implementation='ascend': JAX_MC2_ASCEND_DEVICES={devices!r} / "
            f"JAX_MC2_ASCEND_TIMEOUT_MS={timeout!r}: {e}"
        ) from None
    if os.environ.get("JAX_MC2_ASCEND_DETERMINISTIC", "") not in ("", "0"):
        _set_deterministic(True)
    _ENV_APPLIED = True


def soc_name() -> str:
    """The SoC name CANN reports (aclrtGetSocName), e.g. "Ascend910B1"."""
    return _mc2_ascend.soc_name()


def chip_target(soc: str | None = None) -> str | None:
    """The jax_mc2 chip target of a SoC name: atlas-a2 (Ascend910B*),
    atlas-a3 (Ascend910_93*), ascend-950 (Ascend950*); None if unknown."""
    soc = soc_name() if soc is None else soc
    if soc.startswith("Ascend910_93"):
        return "atlas-a3"
    if soc.startswith("Ascend910B"):
        return "atlas-a2"
    if soc.startswith("Ascend950"):
        return "ascend-950"
    return None


def shutdown() -> None:
    """Destroys the HCCL communicators and frees the launch layer's device
    memory and streams (also run at exit). Later calls start afresh."""
    if _USED and is_available():
        _mc2_ascend.shutdown()
    _comms.reset()


atexit.register(shutdown)
_implementation.register_availability(_implementation.ASCEND, _check)
