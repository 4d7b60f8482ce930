"""The primitive pattern: one declarative :class:`PrimitiveSpec` per primitive,
wired by :func:`register`.

A spec names the primitive (``"mc2_mm_all_reduce"``, ...), its operands in
binding order (an optional operand is present when its presence parameter,
e.g. ``has_bias``, is true), the operator it serves (for error messages), its
abstract evaluation, its batching (fold the batch into the rows, map over it,
or a custom rule), its differentiation (JVP / transpose rules, or a reason it
is not differentiable) and its ``xla`` / ``ffi`` lowering entries. A spec
with an ``nz_weight`` takes that operand in the ND or the FRACTAL_NZ layout
(the static ``x2_format``); :func:`register` derives everything but the
backends' own rules for the NZ layout from the ND ones.

:data:`SPECS` maps each primitive name to its spec, so a backend registering
its own lowering (``jax_mc2.framework.lowering.register``) can read a call's
operands by name with ``SPECS[name].split(operands, params)`` without
importing the primitive's module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_mc2.framework import _compat, lowering, validation, weight_format
from jax_mc2.framework.batching import map_over_batch, move_batch_to_front
from jax_mc2.framework.quant import from_fractal_nz

#: How a fold-rows batching rule folds a batched row operand into its rows.
FOLD_MATRIX = "matrix"  # [B, b, s, c] -> [B * b, s, c]; [B, m, c] stays a 3-D [b, s, c]
FOLD_LEADING = "leading"  # [B, r, ...] -> [B * r, ...]
FOLD_VECTOR = "vector"  # [B, m] -> [B * m]

#: Batching kinds.
MAP = "map"
FOLD_ROWS = "fold rows"


@dataclasses.dataclass(frozen=True)
class Operand:
    """One operand of a primitive.

    ``flag``: the boolean parameter that says whether an optional operand is
    present (operands sharing a flag come and go together); ``present``: a
    predicate of the parameters instead, for operands whose presence another
    parameter implies. Neither: always present. ``fold``: how a fold-rows
    batching rule folds it into the rows (``FOLD_*``); None: the rule folds
    only when this operand is not batched.
    """

    name: str
    flag: str | None = None
    present: Callable[[Mapping[str, Any]], bool] | None = None
    fold: str | None = None

    def is_present(self, params: Mapping[str, Any]) -> bool:
        if self.flag is not None:
            return bool(params[self.flag])
        if self.present is not None:
            return bool(self.present(params))
        return True


@dataclasses.dataclass(frozen=True)
class NzWeight:
    """The matmul weight operand ``name`` of a primitive that takes it in
    either layout, as the static ``x2_format`` parameter says
    (``jax_mc2.framework.weight_format``): the stored matrix is (k, n), or
    (n, k) when the boolean parameter ``transpose`` is true, with k the last
    dimension of operand ``k_from``.

    :func:`register` gives such a primitive one meaning for an NZ call, that
    of the ND call with the weight converted by ``from_fractal_nz``: abstract
    evaluation, the ``xla`` / ``ffi`` compositions and the JVP convert it and
    run the spec's ND rules (the conversion is linear, so reverse mode returns
    the weight's cotangent in the NZ layout, its padding zero). Batching
    keeps the layout (a mapped call slices NZ weights into NZ weights).
    Rules a backend registers itself (the ``ascend`` ones) get the NZ operand
    and ``x2_format``.
    """

    name: str = "x2"
    k_from: str = "x1"
    transpose: str = "transpose_x2"


@dataclasses.dataclass(frozen=True)
class PrimitiveSpec:
    """Everything :func:`register` needs to define a primitive.

    ``operator``: the operator name in errors, or a function of the
    parameters for a primitive several operators share. ``abstract_eval``
    takes ``(*operands, **params)`` and returns ``(avals, effects)`` (the
    avals alone when not ``effectful``).
    ``xla`` / ``ffi``: the implementations' compositions (see
    :func:`jax_mc2.framework.lowering.register_implementations`).
    ``batching``: :data:`MAP`, :data:`FOLD_ROWS` (fold the batch into the
    rows when only the ``Operand.fold`` operands are batched, else map;
    ``fold_like`` names the operand whose leading shape the outputs take) or
    a custom rule ``(spec, primitive) -> rule(args, dims, **params)``.
    Differentiation: ``jvp`` (and ``transpose``) rules, or
    ``not_differentiable``, the reason a JVP raises ``NotImplementedError``.
    ``nz_weight``: the operand that may come in the FRACTAL_NZ layout
    (:class:`NzWeight`); every rule above is written for the ND layout.
    """

    name: str
    operator: str | Callable[[Mapping[str, Any]], str]
    operands: tuple[Operand, ...]
    abstract_eval: Callable[..., Any]
    xla: Callable[..., Any]
    ffi: Callable[..., Any]
    multiple_results: bool = False
    effectful: bool = True
    pass_context: bool = False
    batching: str | Callable[..., Callable[..., Any]] = MAP
    fold_like: str | None = None
    jvp: Callable[..., Any] | None = None
    transpose: Callable[..., Any] | None = None
    not_differentiable: str | None = None
    nz_weight: NzWeight | None = None

    def operator_name(self, params: Mapping[str, Any]) -> str:
        return self.operator(params) if callable(self.operator) else self.operator

    def split(self, operands: Sequence[Any], params: Mapping[str, Any]) -> dict[str, Any]:
        """The bound operands by name; an absent optional operand is None."""
        return split_operands(self.operands, operands, params)

    def join(self, named: Mapping[str, Any]) -> list[Any]:
        """The present operands of ``named`` in binding order."""
        return [named[o.name] for o in self.operands if named.get(o.name) is not None]

    def presence(self, named: Mapping[str, Any]) -> dict[str, bool]:
        """The presence parameters (``has_bias=...``) of the operands in ``named``."""
        flags: dict[str, bool] = {}
        for operand in self.operands:
            if operand.flag is not None:
                flags[operand.flag] = named.get(operand.name) is not None
        return flags


def split_operands(
    specs: Sequence[Operand], operands: Sequence[Any], params: Mapping[str, Any]
) -> dict[str, Any]:
    """``operands`` (as bound) by name, per ``specs``; an absent optional
    operand is None. The one operand splitter of every primitive."""
    rest = list(operands)
    named = {}
    for operand in specs:
        named[operand.name] = rest.pop(0) if operand.is_present(params) else None
    if rest:
        raise ValueError(f"{len(rest)} operands more than {[o.name for o in specs]}")
    return named


#: Every registered primitive's spec, by primitive name.
SPECS: dict[str, PrimitiveSpec] = {}


def bind(primitive: _compat.core.Primitive, named: Mapping[str, Any], **params: Any) -> Any:
    """Binds ``primitive`` with the present operands of ``named`` as JAX
    arrays and their presence parameters added to ``params``: the one
    canonicalizer of the operators' calls."""
    spec = SPECS[primitive.name]
    if spec.nz_weight is not None:
        params.setdefault("x2_format", weight_format.ND)
    op = spec.operator_name(params)
    required = [o.name for o in spec.operands if o.flag is None and o.present is None]
    validation.check_given(op, **{name: named[name] for name in required if name in named})
    _check_not_narrowed(op, named)
    arrays = {k: None if a is None else jnp.asarray(a) for k, a in named.items()}
    return primitive.bind(*spec.join(arrays), **spec.presence(arrays), **params)


def _check_not_narrowed(op: str, named: Mapping[str, Any]) -> None:
    """A 64-bit integer operand is reported as the caller passed it: with
    ``jax_enable_x64`` off ``jnp.asarray`` would narrow it to 32 bits and the
    dtype rules would name a dtype the caller never passed (and accept an
    int64 that x64 on rejects)."""
    if jax.config.jax_enable_x64:
        return
    for name, a in named.items():
        dtype = getattr(a, "dtype", None)
        if dtype is not None and np.dtype(dtype) in (np.dtype(np.int64), np.dtype(np.uint64)):
            narrow = np.dtype(np.int32 if np.dtype(dtype).kind == "i" else np.uint32)
            raise TypeError(
                f"{op}: {name} dtype {np.dtype(dtype).name} is not accepted (with "
                f"jax_enable_x64 off JAX would narrow it to {narrow.name}); pass the dtype the "
                "operator documents for it"
            )


def _is_nz(spec: PrimitiveSpec, params: Mapping[str, Any]) -> bool:
    """Whether the call's weight comes in the FRACTAL_NZ layout (``x2_format``
    checked)."""
    op, fmt = spec.operator_name(params), params.get("x2_format", weight_format.ND)
    return weight_format.check_x2_format(op, fmt) == weight_format.FRACTAL_NZ


def _stored_shape(spec: PrimitiveSpec, named: Mapping[str, Any], params) -> tuple[int, int]:
    """The 2-D matrix the NZ weight in ``named`` stores."""
    w = spec.nz_weight
    op, k_from = spec.operator_name(params), named[w.k_from]
    if k_from.ndim < 1:
        raise validation.type_error(
            op, f"{w.k_from} must be at least 1-D (its last dimension is k), got shape ()"
        )
    return weight_format.nz_stored_shape(
        op, named[w.name], k_from.shape[-1], transpose_x2=bool(params[w.transpose])
    )


def _as_nd(spec: PrimitiveSpec, operands, params, convert) -> list[Any]:
    """``operands`` with the NZ weight replaced by ``convert(weight, stored shape)``."""
    named = spec.split(operands, params)
    name = spec.nz_weight.name
    named[name] = convert(named[name], _stored_shape(spec, named, params))
    return spec.join(named)


def _nd_abstract_eval(spec: PrimitiveSpec) -> Callable[..., Any]:
    """The spec's abstract evaluation on the weight's logical (ND) aval."""

    def abstract_eval(*operands, **params):
        nz = _is_nz(spec, params)
        params.pop("x2_format", None)
        if nz:
            operands = _as_nd(spec, operands, params, lambda a, shape: a.update(shape=shape))
        return spec.abstract_eval(*operands, **params)

    return abstract_eval


def _nd_composition(spec: PrimitiveSpec, fn: Callable[..., Any]) -> Callable[..., Any]:
    """An ``xla`` / ``ffi`` composition of the ND layout, run on the weight
    converted from FRACTAL_NZ when the call has one."""

    def composed(*operands, x2_format=weight_format.ND, **params):
        if x2_format == weight_format.FRACTAL_NZ:
            operands = _as_nd(spec, operands, params, from_fractal_nz)
        return fn(*operands, **params)

    return composed


def _nd_jvp(spec: PrimitiveSpec, jvp: Callable[..., Any]) -> Callable[..., Any]:
    """The JVP of an NZ call: the ND call's, the weight and its tangent
    converted (a symbolic zero stays one, of the ND shape)."""

    def rule(primals, tangents, **params):
        if not _is_nz(spec, params):
            return jvp(primals, tangents, **params)
        name = spec.nz_weight.name
        named = spec.split(primals, params)
        shape = _stored_shape(spec, named, params)
        dnamed = spec.split(tangents, params)
        dw = dnamed[name]
        if isinstance(dw, _compat.ad.Zero):
            dnamed[name] = _compat.ad.Zero(dw.aval.update(shape=shape))
        else:
            dnamed[name] = from_fractal_nz(dw, shape)
        named[name] = from_fractal_nz(named[name], shape)
        nd = {**params, "x2_format": weight_format.ND}
        return jvp(spec.join(named), spec.join(dnamed), **nd)

    return rule


def _refuse_jvp(spec: PrimitiveSpec) -> Callable[..., Any]:
    def jvp(primals, tangents, **params):
        raise NotImplementedError(f"{spec.operator_name(params)}: {spec.not_differentiable}")

    return jvp


def map_rule(spec: PrimitiveSpec, primitive: _compat.core.Primitive) -> Callable[..., Any]:
    """Each batch element its own call (``lax.map``)."""

    def rule(args, dims, **params):
        names = [o.name for o in spec.operands]
        named_args = spec.split(args, params)
        named_dims = spec.split(dims, params)

        def one(*sliced):
            outs = primitive.bind(*spec.join(dict(zip(names, sliced))), **params)
            return tuple(outs) if spec.multiple_results else outs

        out = map_over_batch(one, [named_args[n] for n in names], [named_dims[n] for n in names])
        if spec.multiple_results:
            return list(out), [0] * len(out)
        return out, 0

    return rule


def _fold(x: Any, how: str) -> Any:
    if how == FOLD_VECTOR:
        return x.reshape(-1)
    if how == FOLD_LEADING or x.ndim == 4:
        return x.reshape(-1, *x.shape[2:])
    return x


def fold_rows_rule(spec: PrimitiveSpec, primitive: _compat.core.Primitive) -> Callable[..., Any]:
    """Folds the batch into the rows when only row operands are batched (one
    call), else maps over it."""
    mapped = map_rule(spec, primitive)
    row_names = [o.name for o in spec.operands if o.fold is not None]

    def rule(args, dims, **params):
        not_mapped = _compat.NOT_MAPPED
        named_args = spec.split(args, params)
        named_dims = spec.split(dims, params)
        if any(named_dims[o.name] is not not_mapped for o in spec.operands if o.fold is None):
            return mapped(args, dims, **params)
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not not_mapped)
        moved = move_batch_to_front(
            [named_args[n] for n in row_names], [named_dims[n] for n in row_names], size
        )
        folded = dict(named_args)
        for operand in spec.operands:
            if operand.fold is not None:
                x = moved[row_names.index(operand.name)]
                folded[operand.name] = None if x is None else _fold(x, operand.fold)
        lead = moved[row_names.index(spec.fold_like)].shape[:-1]
        outs = primitive.bind(*spec.join(folded), **params)
        if spec.multiple_results:
            return [o.reshape(*lead, o.shape[-1]) for o in outs], [0] * len(outs)
        return outs.reshape(*lead, outs.shape[-1]), 0

    return rule


def register(spec: PrimitiveSpec) -> _compat.core.Primitive:
    """Defines the primitive ``spec`` describes: abstract evaluation, the
    lowering table entries and the dispatching rule, differentiation and
    batching. Returns the primitive."""
    if spec.name in SPECS:
        raise ValueError(f"primitive {spec.name!r} is already registered")
    primitive = _compat.new_primitive(spec.name, multiple_results=spec.multiple_results)
    abstract_eval, xla, ffi, jvp = spec.abstract_eval, spec.xla, spec.ffi, spec.jvp
    if spec.nz_weight is not None:
        abstract_eval = _nd_abstract_eval(spec)
        xla, ffi = _nd_composition(spec, xla), _nd_composition(spec, ffi)
        jvp = None if jvp is None else _nd_jvp(spec, jvp)
    if spec.effectful:
        primitive.def_effectful_abstract_eval(abstract_eval)
    else:
        primitive.def_abstract_eval(abstract_eval)
    lowering.register_implementations(
        primitive,
        spec.operator,
        ffi=ffi,
        xla=xla,
        multiple_results=spec.multiple_results,
        pass_context=spec.pass_context,
    )
    if jvp is not None:
        _compat.ad.primitive_jvps[primitive] = jvp
    elif spec.not_differentiable is not None:
        _compat.ad.primitive_jvps[primitive] = _refuse_jvp(spec)
    if spec.transpose is not None:
        _compat.ad.primitive_transposes[primitive] = spec.transpose
    if spec.batching == MAP:
        rule = map_rule(spec, primitive)
    elif spec.batching == FOLD_ROWS:
        rule = fold_rows_rule(spec, primitive)
    else:
        rule = spec.batching(spec, primitive)
    _compat.register_batching_rule(primitive, spec.operator_name, rule)
    SPECS[spec.name] = spec
    return primitive
