"""The lowering rule every jax_mc2 primitive uses: choose the implementation
for the platform, then lower its composition with ``mlir.lower_fun``."""

from __future__ import annotations

import functools
from collections.abc import Callable

from jax_mc2 import _compat, _implementation


def implementation_lowering(
    op_name: str | Callable[[dict], str],
    ffi_composition: Callable,
    xla_composition: Callable,
    *,
    multiple_results: bool,
    pass_context: bool = False,
) -> Callable:
    """A lowering rule for a primitive with ``implementation`` and
    ``world_size`` parameters (the latter only serves abstract evaluation).

    ``ffi_composition`` gets the other parameters plus ``parallelism`` (the
    number of programs XLA runs at once, to divide the CPU cores among);
    ``xla_composition`` gets the other parameters. With ``pass_context`` both
    also get ``world_size`` and ``platforms`` (what the lowering is for).
    ``op_name`` may be a function of the parameters, for primitives shared by
    several operators.
    """

    def rule(ctx, *operands, implementation, world_size, **params):
        op = op_name(params) if callable(op_name) else op_name
        platforms = _compat.lowering_platforms(ctx)
        impl = _implementation.for_platform(op, implementation, platforms)
        if pass_context:
            params.update(world_size=world_size, platforms=platforms)
        if impl == _implementation.FFI:
            parallelism = _compat.lowering_parallelism(ctx)
            fn = functools.partial(ffi_composition, **params, parallelism=parallelism)
        else:
            fn = functools.partial(xla_composition, **params)
        return _compat.lower_fun(fn, multiple_results=multiple_results)(ctx, *operands)

    return rule
