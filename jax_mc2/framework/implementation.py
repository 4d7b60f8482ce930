"""Implementation selection: ``xla`` (lax ops + lax collectives), ``ffi``
(C++ CPU kernels + XLA collectives) and ``ascend`` (CANN MC2 kernels).

Precedence: the ``implementation=`` argument of a call, then the
``JAX_MC2_IMPLEMENTATION`` environment variable (the ``jax_mc2_implementation``
config option), then the platform default chosen at lowering time: ``ffi`` on
CPU, ``xla`` on GPU/TPU. An implementation that cannot serve a call raises
``NotImplementedError``; none falls back silently to other numerics.
"""

from __future__ import annotations

from jax_mc2.framework import _compat

XLA = "xla"
FFI = "ffi"
ASCEND = "ascend"
IMPLEMENTATIONS = (XLA, FFI, ASCEND)


_implementation_state = _compat.config_optional_enum_state(
    "jax_mc2_implementation",
    list(IMPLEMENTATIONS),
    _compat.env_choice("JAX_MC2_IMPLEMENTATION", IMPLEMENTATIONS, None),
    "Default jax_mc2 implementation (None: ffi on CPU, xla elsewhere).",
)


_AVAILABILITY: dict[str, object] = {}


def register_availability(impl: str, check) -> None:
    """Registers ``check(op)`` for ``impl``: called when a call requests
    ``impl``, it raises (naming what is missing) if the backend cannot run
    here. A backend registers it when its module is imported."""
    _AVAILABILITY[impl] = check


def requested(op: str, implementation: str | None) -> str | None:
    """The implementation a call asks for (None: the platform default).

    Validates the name and asks the backend whether it can run (the
    ``ascend`` backend checks that the CANN libraries load), so a missing
    backend is an error at trace time, not a crash at run time.
    """
    impl = implementation if implementation is not None else _implementation_state.value
    if impl is None:
        return None
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: implementation must be one of {IMPLEMENTATIONS} or None, got {impl!r}"
        )
    check = _AVAILABILITY.get(impl)
    if check is not None:
        check(op)
    return impl


def for_platform(op: str, requested_impl: str | None, platforms: tuple[str, ...]) -> str:
    """The implementation that lowers a call on ``platforms``."""
    on_cpu = all(p == "cpu" for p in platforms)
    if requested_impl is None:
        return FFI if on_cpu else XLA
    return requested_impl
