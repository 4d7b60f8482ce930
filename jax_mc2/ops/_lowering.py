"""Registers a primitive's ``xla`` and ``ffi`` compositions in the lowering
table (``jax_mc2.framework.lowering``) and its dispatching MLIR rule."""

from __future__ import annotations

from collections.abc import Callable

from jax_mc2 import _compat, _implementation
from jax_mc2.framework import lowering


def register_implementations(
    primitive,
    op_name: str | Callable[[dict], str],
    *,
    ffi: Callable,
    xla: Callable,
    multiple_results: bool,
    pass_context: bool = False,
) -> None:
    """``ffi`` (CPU only) gets the parameters plus ``parallelism``; ``xla``
    gets the parameters. With ``pass_context`` both also get ``world_size``
    and ``platforms``. ``op_name`` may be a function of the parameters, for
    primitives shared by several operators."""
    name = primitive.name
    lowering.register(
        name,
        _implementation.XLA,
        lowering.composition(xla, multiple_results=multiple_results, pass_context=pass_context),
    )
    lowering.register(
        name,
        _implementation.FFI,
        lowering.composition(
            ffi, multiple_results=multiple_results, pass_context=pass_context, parallelism=True
        ),
        platforms=("cpu",),
    )
    _compat.register_lowering(primitive, lowering.dispatching_rule(name, op_name))
