"""Every touch of JAX internals in jax_mc2 lives here.

The primitives follow jax's own collectives (``jax/_src/lax/parallel.py``):
``core.Primitive`` with ``def_impl(dispatch.apply_primitive)``, effectful
abstract evaluation with ``NamedAxisEffect``, ``vma`` typing through the
aval's manual-axis type, and ``mlir.lower_fun`` lowerings. Tested with
jax/jaxlib 0.10.x (pinned in pyproject.toml).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable

from jax import lax
from jax._src import config as _config
from jax._src import core, dispatch
from jax._src import mesh as _mesh
from jax._src.interpreters import ad, batching, mlir

__all__ = [
    "NOT_MAPPED",
    "ad",
    "config_enum_state",
    "config_optional_enum_state",
    "lower_fun",
    "lowering_parallelism",
    "lowering_platforms",
    "match_vma",
    "named_axis_effects",
    "new_primitive",
    "register_batching_rule",
    "register_lowering",
    "result_aval",
]

#: The batch dimension of an operand that ``vmap`` does not map.
NOT_MAPPED = None


def new_primitive(name: str, *, multiple_results: bool = False) -> core.Primitive:
    """A primitive whose eager calls go through jit (so they validate too)."""
    prim = core.Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(functools.partial(dispatch.apply_primitive, prim))
    return prim


def named_axis_effects(axis_names: Iterable[str]) -> set:
    return {core.NamedAxisEffect(a) for a in axis_names}


def register_batching_rule(prim: core.Primitive, op_name, rule: Callable) -> None:
    """Registers ``rule(args, dims, **params)`` as ``prim``'s vmap rule.

    A collective over an axis that ``vmap`` itself binds (``vmap(...,
    axis_name=...)``) has no rule: it raises NotImplementedError naming the
    axis instead of failing inside JAX. ``op_name(params)`` names the operator.
    """

    def fancy_rule(axis_data, args, dims, **params):
        if axis_data.name is not None and axis_data.name in params.get("axis_name", ()):
            raise NotImplementedError(
                f"{op_name(params)}: axis_name {axis_data.name!r} is bound by jax.vmap; the "
                "all-reduce runs over mesh axes only: bind the axis with jax.shard_map"
            )
        if all(d is NOT_MAPPED for d in dims):
            # JAX calls a fancy rule with nothing mapped too (jacfwd binds the
            # primal unbatched, a vmapped closure over the operands): one call.
            outs = prim.bind(*args, **params)
            return outs, [NOT_MAPPED] * len(outs) if prim.multiple_results else NOT_MAPPED
        return rule(args, dims, **params)

    batching.fancy_primitive_batchers[prim] = fancy_rule


def lower_fun(fun: Callable, *, multiple_results: bool) -> Callable:
    return mlir.lower_fun(fun, multiple_results=multiple_results)


def register_lowering(prim: core.Primitive, rule: Callable, platform: str | None = None) -> None:
    mlir.register_lowering(prim, rule, platform=platform)


def lowering_platforms(ctx) -> tuple[str, ...]:
    """The platforms a lowering context lowers for, e.g. ``("cpu",)``."""
    return tuple(ctx.module_context.platforms)


def lowering_parallelism(ctx) -> int:
    """How many programs XLA runs at once for this lowering.

    Inside ``shard_map`` that is the number of this process's devices in the
    mesh (every simulated CPU device runs its shard concurrently); outside it
    is one. The CPU kernels divide the cores among them.
    """
    axis_context = ctx.module_context.axis_context
    mesh = getattr(axis_context, "mesh", None)
    if mesh is None:
        return 1
    return max(1, len(mesh.local_devices))


def _drop_empty_env(name: str) -> None:
    """jax's config reads ``NAME`` from the environment itself; an empty
    variable means unset (as the shells' ``VAR= cmd`` idiom intends)."""
    if os.environ.get(name.upper()) == "":
        del os.environ[name.upper()]


def env_choice(variable: str, choices: tuple[str, ...], default: str | None) -> str | None:
    """The environment variable's value, one of ``choices``; unset or empty
    gives ``default``. Raises ValueError for any other value."""
    value = os.environ.get(variable) or default
    if value is not None and value not in choices:
        raise ValueError(f"{variable} must be one of {choices}, got {value!r}")
    return value


def config_enum_state(name: str, values: list[str], default: str, help: str):
    """A jax config option that is part of the jit cache key."""
    _drop_empty_env(name)
    return _config.enum_state(
        name, values, default, help, include_in_jit_key=True, include_in_trace_context=True
    )


def config_optional_enum_state(name: str, values: list[str], default: str | None, help: str):
    _drop_empty_env(name)
    return _config.optional_enum_state(
        name, values, default, help, include_in_jit_key=True, include_in_trace_context=True
    )


def varying_over(x, axes: Iterable[str]):
    """``x`` cast to varying over all of ``axes`` where it varies over some
    of them only (``pcast``): a collective over several mesh axes takes an
    operand that varies over all of them or none, and an operator's per-rank
    result may vary over only some (an x1 sharded over one axis of a tuple
    axis_name). An operand varying over none of them stays as it is."""
    return varying_over_all(x, axes) if core.typeof(x).mat.varying & set(axes) else x


def varying_over_all(x, axes: Iterable[str]):
    """``x`` cast to varying over every one of ``axes`` that is a manual
    (``shard_map``) mesh axis here (``pcast``); in reverse mode the cast sums
    the cotangent over the axes it added. Axes bound otherwise (``vmap``) are
    left to the primitive's rules."""
    if not _config._check_vma.value:
        return x
    manual = set(_mesh.get_abstract_mesh().manual_axes)
    have = core.typeof(x).mat.varying
    missing = tuple(a for a in axes if a in manual and a not in have)
    return lax.pcast(x, missing, to="varying") if missing else x


def match_vma(*args):
    """The operands with invariant ones cast to the union of their varying
    mesh axes (``pvary``), as lax ops do before binding, so the transposes
    psum the cotangents of invariant operands."""
    return core.auto_insert_reshard(*args)


def result_aval(
    template,
    shape,
    dtype,
    inputs,
    reduced_axes: Iterable[str] = (),
    varying_axes: Iterable[str] = (),
):
    """An output aval of ``shape``/``dtype`` whose ``vma`` is the union of the
    inputs' varying axes, less the axes an all-reduce made invariant, plus
    the axes an all-to-all makes varying (each rank receives other rows).
    Under ``shard_map(check_vma=False)`` no aval carries varying axes, as
    with lax's collectives."""
    varying = frozenset().union(*(a.mat.varying for a in inputs)) - frozenset(reduced_axes)
    if _config._check_vma.value:
        varying = varying | frozenset(varying_axes)
    aval = template.update(shape=tuple(shape), dtype=dtype, weak_type=False)
    return aval.update(manual_axis_type=aval.mat.update(varying=varying))


# --------------------------------------------------------------------------
# The ascend backend's touches (jax_mc2.ascend)


def lowering_mesh(ctx):
    """The concrete mesh a lowering runs under (shard_map's), or None."""
    mesh = getattr(ctx.module_context.axis_context, "mesh", None)
    if mesh is None or not hasattr(mesh, "devices"):
        return None
    return mesh


def lowering_device_assignment(ctx):
    """The devices a lowering outside shard_map runs on, or None if unknown."""
    axis_context = ctx.module_context.axis_context
    devices = getattr(axis_context, "device_assignment", None)
    if devices is None:
        mesh = getattr(axis_context, "mesh", None)
        if mesh is not None and hasattr(mesh, "devices"):
            devices = tuple(mesh.devices.flat)
    return devices


def distributed_client():
    """JAX's distributed key-value store client, or None outside jax.distributed."""
    from jax._src import distributed

    return distributed.global_state.client


def kv_set_bytes(client, key: str, value: bytes) -> None:
    client.key_value_set_bytes(key, value)


def kv_get_bytes(client, key: str, timeout_ms: int) -> bytes:
    return client.blocking_key_value_get_bytes(key, timeout_ms)
