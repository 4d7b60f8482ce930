"""The lowering table: ``{primitive name: {implementation: rule}}``.

Every jax_mc2 primitive lowers through :func:`dispatching_rule`, which picks
the implementation for the call (the ``implementation`` parameter, else the
platform default) and runs the rule registered for it. A backend adds itself
by registering rules for the primitives it serves, the way a platform plugin
registers lowerings in JAX: no primitive module changes. A primitive without
a rule for the requested implementation raises ``NotImplementedError``
naming the operator, the implementation and the ones it has; nothing falls
back silently to other numerics.

A rule is called as ``rule(ctx, *operands, **params)`` with the primitive's
parameters except ``implementation`` (``world_size`` included) and returns
the lowered values, like any MLIR lowering rule.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from jax_mc2.framework import _compat
from jax_mc2.framework import implementation as _implementation


@dataclasses.dataclass(frozen=True)
class Entry:
    rule: Callable
    #: The platforms the rule lowers for (None: any).
    platforms: tuple[str, ...] | None = None


_TABLE: dict[str, dict[str, Entry]] = {}


def register(
    primitive_name: str,
    implementation: str,
    rule: Callable,
    *,
    platforms: tuple[str, ...] | None = None,
) -> None:
    """Registers ``rule`` as ``implementation``'s lowering of the primitive
    named ``primitive_name`` (e.g. ``"mc2_mm_all_reduce"``)."""
    if implementation not in _implementation.IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {_implementation.IMPLEMENTATIONS}, got "
            f"{implementation!r}"
        )
    _TABLE.setdefault(primitive_name, {})[implementation] = Entry(
        rule, None if platforms is None else tuple(platforms)
    )


def implementations(primitive_name: str) -> tuple[str, ...]:
    """The implementations with a rule for ``primitive_name``, in table order."""
    return tuple(_TABLE.get(primitive_name, {}))


def _entry(op: str, primitive_name: str, impl: str, platforms: tuple[str, ...]) -> Entry:
    entries = _TABLE.get(primitive_name, {})
    entry = entries.get(impl)
    if entry is None:
        raise NotImplementedError(
            f"{op}: implementation={impl!r} has no lowering of this operator (primitive "
            f"{primitive_name}); available: {', '.join(entries) or 'none'}"
        )
    if entry.platforms is not None and not all(p in entry.platforms for p in platforms):
        raise NotImplementedError(
            f"{op}: implementation={impl!r} lowers for {', '.join(entry.platforms)} only, "
            f"cannot lower for {', '.join(platforms)}; use implementation='xla'"
        )
    return entry


def dispatching_rule(primitive_name: str, op_name: str | Callable[[dict], str]) -> Callable:
    """The MLIR lowering rule of a primitive: it looks up the table entry of
    the chosen implementation. ``op_name`` (or ``op_name(params)``, for a
    primitive shared by several operators) names the operator in errors."""

    def rule(ctx, *operands, implementation, **params):
        op = op_name(params) if callable(op_name) else op_name
        platforms = _compat.lowering_platforms(ctx)
        impl = _implementation.for_platform(op, implementation, platforms)
        return _entry(op, primitive_name, impl, platforms).rule(ctx, *operands, **params)

    return rule


def composition(
    fn: Callable,
    *,
    multiple_results: bool,
    pass_context: bool = False,
    pass_parallelism: bool = False,
) -> Callable:
    """A table rule that lowers the JAX function ``fn`` with ``mlir.lower_fun``.

    ``fn`` gets the parameters less ``world_size`` (which only serves abstract
    evaluation); with ``pass_context`` also ``world_size`` and ``platforms``;
    with ``pass_parallelism`` also ``parallelism``, the number of programs
    XLA runs at once (for the CPU kernels to divide the cores among).
    """

    def rule(ctx, *operands, world_size, **params):
        if pass_context:
            params.update(world_size=world_size, platforms=_compat.lowering_platforms(ctx))
        if pass_parallelism:
            params["parallelism"] = _compat.lowering_parallelism(ctx)
        lowered = functools.partial(fn, **params)
        return _compat.lower_fun(lowered, multiple_results=multiple_results)(ctx, *operands)

    return rule


def register_implementations(
    primitive,
    op_name: str | Callable[[dict], str],
    *,
    ffi: Callable,
    xla: Callable,
    multiple_results: bool,
    pass_context: bool = False,
) -> None:
    """Registers a primitive's ``xla`` and ``ffi`` compositions in the table
    and its dispatching MLIR rule.

    ``ffi`` (CPU only) gets the parameters plus ``parallelism``; ``xla``
    gets the parameters. With ``pass_context`` both also get ``world_size``
    and ``platforms``. ``op_name`` may be a function of the parameters, for
    primitives shared by several operators."""
    name = primitive.name
    register(
        name,
        _implementation.XLA,
        composition(xla, multiple_results=multiple_results, pass_context=pass_context),
    )
    register(
        name,
        _implementation.FFI,
        composition(
            ffi, multiple_results=multiple_results, pass_context=pass_context, pass_parallelism=True
        ),
        platforms=("cpu",),
    )
    _compat.register_lowering(primitive, dispatching_rule(name, op_name))
