"""Tensor-parallel (row-parallel) linear layers over a mesh axis.

The activations ``x`` are sharded on their last (contraction) dimension and
the weight on its first along ``axis``; every shard multiplies its slice and
the partial products are all-reduced by the MC2 operator, so the output is
replicated along ``axis``. An optional ``data_axis`` shards the leading
(batch/rows) dimension for data parallelism.

The raw operators add ``bias`` on every rank (the CANN contract); these
wrappers add it exactly once, on the first rank of ``axis``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mc2.framework import numerics, validation
from jax_mc2.framework.typing import Array, ArrayLike, DTypeLike, Implementation
from jax_mc2.framework.validation import dtype_name, shape_str
from jax_mc2.operators.matmul_all_reduce import mm_all_reduce_base
from jax_mc2.operators.matmul_all_reduce_add_rms_norm import (
    inplace_matmul_all_reduce_add_rms_norm,
    matmul_all_reduce_add_rms_norm,
)


def _bias_once(bias, axis):
    """``bias`` on the first rank of ``axis`` and zeros on the others."""
    first = lax.axis_index(axis) == 0
    return jnp.where(first, bias, jnp.zeros_like(bias))


def _x_spec(x, axis, data_axis, op):
    if x.ndim not in (2, 3):
        raise validation.type_error(
            op, f"x must be 2-D (m, k) or 3-D (b, s, k), got shape {shape_str(x.shape)}"
        )
    return P(data_axis, axis) if x.ndim == 2 else P(data_axis, None, axis)


def _as_array(a):
    """Lists and tuples become arrays, as the operators' ``jnp.asarray``."""
    return jnp.asarray(a) if isinstance(a, (list, tuple)) else a


def check_mesh_type(op, mesh):
    """Rejects a ``mesh`` that is not a ``jax.sharding.Mesh``; returns it."""
    if not isinstance(mesh, Mesh):
        raise validation.type_error(op, f"mesh must be a jax.sharding.Mesh, got {mesh!r}")
    return mesh


def _explicit_part(mesh, spec):
    """``spec`` with only ``mesh``'s Explicit axes named (``reshard`` refuses
    Auto and Manual axes; shard_map itself splits those)."""
    explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}

    def keep(entry):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(n for n in names if n in explicit)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return P(*(keep(entry) for entry in spec))


def shard_map_global(fn, mesh, in_specs, out_specs, args, **kwargs):
    """``jax.shard_map(fn, ...)(*args)`` on global arrays. On a mesh with
    Explicit axes (``jax.make_mesh``'s default) shard_map requires inputs
    already sharded as ``in_specs`` over those axes; they are resharded to
    them first (as JAX's own error advises), so every kind of mesh, mixed
    ones too, gives the same result."""
    if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        args = jax.tree.map(
            lambda spec, arg: jax.tree.map(
                lambda a: jax.sharding.reshard(a, NamedSharding(mesh, _explicit_part(mesh, spec))),
                arg,
            ),
            tuple(in_specs),
            tuple(args),
            is_leaf=lambda s: s is None or isinstance(s, P),
        )
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kwargs)(*args)


def _check_mesh(op, mesh, axis, data_axis):
    check_mesh_type(op, mesh)
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    for name in names + ((data_axis,) if data_axis is not None else ()):
        if not isinstance(name, str) or name not in mesh.axis_names:
            raise validation.value_error(
                op, f"mesh has no axis {name!r}; its axes are {mesh.axis_names}"
            )
    if data_axis is not None and data_axis in names:
        raise validation.value_error(
            op, f"data_axis must differ from axis, got {data_axis!r} for both"
        )
    return mesh


def _check_global(op, mesh, axis, data_axis, x, w, bias, transpose_w):
    """The global shapes: x (m, k) / (b, s, k), w (k, n) / (n, k), bias (n,),
    k over the ``axis`` ranks and the rows over the ``data_axis`` ranks;
    returns n."""
    k = x.shape[-1]
    if np.ndim(w) != 2 or np.shape(w)[1 if transpose_w else 0] != k:
        layout = "(n, k) (transpose_w)" if transpose_w else "(k, n)"
        raise validation.type_error(
            op,
            f"w must be 2-D {layout} with k == x.shape[-1] == {k}, got {shape_str(np.shape(w))}",
        )
    n = np.shape(w)[0 if transpose_w else 1]
    if bias is not None and np.shape(bias) != (n,):
        raise validation.type_error(
            op, f"bias must be (n,) = {shape_str((n,))}, got {shape_str(np.shape(bias))}"
        )
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    ranks = math.prod(mesh.shape[a] for a in names)
    if k % ranks:
        raise validation.value_error(
            op, f"k = {k} (x.shape[-1]) must be a multiple of the {ranks} ranks of axis {axis!r}"
        )
    _check_data_split(op, mesh, data_axis, "x", x.shape[0])
    return n


def _check_data_split(op, mesh, data_axis, name, rows):
    """``name``'s first dimension, ``rows``, splits evenly over the
    ``data_axis`` ranks (if any)."""
    if data_axis is not None and rows % mesh.shape[data_axis]:
        raise validation.value_error(
            op,
            f"{name}.shape[0] = {rows} must be a multiple of the {mesh.shape[data_axis]} ranks "
            f"of data_axis {data_axis!r}",
        )


@dataclasses.dataclass(frozen=True)
class W8A8:
    """Int8 weights and activations for :func:`row_parallel_linear`.

    ``weight_scale`` [n] is the per-channel dequant scale of the int8 weight
    (``w ~= w_int8 * weight_scale``; see :func:`quantize_weight_int8`). The
    activations are quantized per token on each rank (symmetric, ``amax /
    127``) and passed to ``mm_all_reduce_base`` as ``pertoken_scale``. The
    output dtype is ``out_dtype`` (float16 or bfloat16). ``comm_quant_scales``
    ``(scale_1, scale_2)`` [n] of the output dtype switch the all-reduce to
    the int8 low-bit communication chain.
    """

    weight_scale: ArrayLike
    out_dtype: DTypeLike = jnp.bfloat16
    comm_quant_scales: tuple[ArrayLike, ArrayLike] | None = None


def quantize_weight_int8(w: ArrayLike) -> tuple[Array, Array]:
    """Per-output-channel symmetric int8 quantization of w [k, n].

    Returns ``(w_int8 [k, n], scale float32 [n])`` with
    ``w_int8 = round(w / scale)`` clipped to [-127, 127],
    ``scale = max|w[:, j]| / 127`` (1 for an all-zero column or one holding a
    NaN or an infinity, whose other values then saturate).
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise validation.type_error(
            "quantize_weight_int8", f"w must be 2-D (k, n), got shape {shape_str(w.shape)}"
        )
    w = numerics.widened(w)
    amax = numerics.nan_max(jnp.abs(w), axis=0)
    usable = (amax > 0) & jnp.isfinite(amax)
    scale = jnp.where(usable, numerics.divide(amax, np.float32(127.0)), np.float32(1.0))
    return jnp.clip(jnp.round(numerics.divide(w, scale)), -127, 127).astype(jnp.int8), scale


def _quantize_tokens(x):
    """Per-row symmetric int8 quantization of x [..., k]: (int8, f32 [rows])."""
    xf = numerics.widened(x)
    amax = numerics.nan_max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, numerics.divide(amax, np.float32(127.0)), np.float32(1.0))
    q = jnp.clip(jnp.round(numerics.divide(xf, scale[..., None])), -127, 127).astype(jnp.int8)
    return q, scale.reshape(-1)


def _check_quant(op, quant, bias):
    """``quant`` is None or a :class:`W8A8` with a float16 / bfloat16 output;
    with it, ``bias`` is a float array (added to the dequantized result)."""
    if quant is None:
        return
    if not isinstance(quant, W8A8):
        raise validation.value_error(
            op, f"quant must be None or jax_mc2.parallel.W8A8, got {quant!r}"
        )
    if bias is not None and not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
        raise validation.type_error(
            op,
            f"bias must be a float array with quant=W8A8, added to the dequantized result; "
            f"got {jnp.result_type(bias)}",
        )
    out_dtype = validation.check_dtype(op, "W8A8.out_dtype", quant.out_dtype)
    if out_dtype not in (jnp.float16, jnp.bfloat16):
        raise validation.value_error(
            op, f"W8A8.out_dtype must be float16 or bfloat16, got {out_dtype}"
        )


def _check_float_x(op, x):
    """Without ``quant`` x is a float array (an int8 x is the operator's full
    quantization mode, which the wrapper reaches through W8A8)."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise validation.type_error(
            op,
            f"x dtype must be a float dtype, got {dtype_name(jnp.result_type(x))} (int8 "
            "weights take a float x and quant=W8A8(weight_scale))",
        )


def _check_w8a8_operands(op, quant, x, w, n):
    """With W8A8: a float x, an int8 w (quantize_weight_int8's), and the
    scales, in the wrapper's terms (the operator would name its own x1 / x2
    / dequant_scale / comm_quant_scale_*)."""
    _check_float_x(op, x)
    if jnp.result_type(w) != jnp.int8:
        raise validation.type_error(
            op,
            f"w dtype must be int8 with quant=W8A8 (quantize_weight_int8 makes it), got "
            f"{dtype_name(jnp.result_type(w))}",
        )
    _check_w8a8_scales(op, quant, n)
    out_dtype = jnp.dtype(quant.out_dtype)
    for i, scale in enumerate(quant.comm_quant_scales or ()):
        if jnp.result_type(scale) != out_dtype:
            raise validation.type_error(
                op,
                f"W8A8.comm_quant_scales[{i}] dtype must be W8A8.out_dtype "
                f"{dtype_name(out_dtype)}, got {dtype_name(jnp.result_type(scale))}",
            )


def _check_w8a8_scales(op, quant, n):
    """W8A8's weight scale and communication scales: one per output column,
    named in the wrapper's terms (the operator would name its own
    dequant_scale / comm_quant_scale_*)."""
    scales = {"W8A8.weight_scale": quant.weight_scale}
    if quant.comm_quant_scales is not None:
        if len(quant.comm_quant_scales) != 2:
            raise validation.value_error(
                op,
                "W8A8.comm_quant_scales must be None or a pair (scale_1, scale_2), got "
                f"{len(quant.comm_quant_scales)} arrays",
            )
        for i, scale in enumerate(quant.comm_quant_scales):
            scales[f"W8A8.comm_quant_scales[{i}]"] = scale
    for name, scale in scales.items():
        if np.shape(scale) != (n,):
            raise validation.type_error(
                op, f"{name} must be (n,) = {shape_str((n,))}, got {shape_str(np.shape(scale))}"
            )


def _w_spec(axis, transpose_w):
    """w is sharded on its k dimension: the first, or the second transposed."""
    return P(None, axis) if transpose_w else P(axis, None)


def _plain_shard(axis, **options):
    """The per-shard body without quantization: ``bias`` (the optional third
    operand) on the first rank of ``axis``; ``options`` are the operator's
    comm_turn, transpose_x2 and implementation."""

    def shard(x_s, w_s, *b):
        bias = _bias_once(b[0], axis) if b else None
        return mm_all_reduce_base(x_s, w_s, axis, bias=bias, **options)

    return shard


def _w8a8_shard(axis, quant, has_bias, **options):
    """The per-shard body with :class:`W8A8`: per-token int8 activations,
    full quantization, and the float bias added once to the result. The
    operands after x and w: the bias (if any), the weight scale, and the two
    communication scales (if any)."""
    out_dtype = jnp.dtype(quant.out_dtype)
    # Table 3 of npu_mm_all_reduce_base: bf16 scale -> bf16, fp32 -> fp16.
    scale_dtype = jnp.bfloat16 if out_dtype == jnp.bfloat16 else jnp.float32

    def shard(x_s, w_s, *extra):
        b = extra[0] if has_bias else None
        w_scale, *comm = extra[1 if has_bias else 0 :]
        q, token = _quantize_tokens(x_s)
        out = mm_all_reduce_base(
            q,
            w_s,
            axis,
            dequant_scale=w_scale.astype(scale_dtype),
            pertoken_scale=token,
            comm_quant_scale_1=comm[0] if comm else None,
            comm_quant_scale_2=comm[1] if comm else None,
            **options,
        )
        # The operator's int32 bias would be scaled by one rank's per-token
        # activation scale; a float bias is added once to the result.
        return out if b is None else out + b.astype(out_dtype)

    return shard


def row_parallel_linear(
    x: ArrayLike,
    w: ArrayLike,
    *,
    mesh: Mesh,
    axis: str | tuple[str, ...],
    bias: ArrayLike | None = None,
    quant: W8A8 | None = None,
    data_axis: str | None = None,
    comm_turn: int = 0,
    transpose_w: bool = False,
    implementation: Implementation = None,
) -> Array:
    """``x @ w + bias`` with x and w sharded along ``axis`` (row parallel).

    Args:
      x: global [m, k] or [b, s, k]; sharded on k along ``axis`` (and on the
        first dimension along ``data_axis`` if given).
      w: global [k, n] ([n, k] with ``transpose_w``), sharded on k.
      mesh: the ``jax.sharding.Mesh``.
      axis: the tensor-parallel mesh axis (a name or tuple of names).
      bias: [n], added exactly once: on the first rank of ``axis`` before
        the reduction, or with ``quant`` (a float bias in the units of the
        output) to the reduced, dequantized result.
      quant: None, or :class:`W8A8` with ``w`` the int8 weight: int8 x int8
        with per-token activation and per-channel weight scales
        (``mm_all_reduce_base`` full quantization).
      data_axis: None, or a mesh axis (not ``axis``) sharding x's first
        dimension.
      comm_turn, implementation: as in ``mm_all_reduce_base``.
      transpose_w: w is [n, k] (``mm_all_reduce_base``'s ``transpose_x2``).

    Returns:
      [m, n] or [b, s, n], replicated along ``axis``.
    """
    op = "row_parallel_linear"
    x, w, bias = _as_array(x), _as_array(w), _as_array(bias)
    _check_quant(op, quant, bias)
    transpose_w = validation.check_bool(op, "transpose_w", transpose_w)
    mesh = _check_mesh(op, mesh, axis, data_axis)
    x_spec = _x_spec(x, axis, data_axis, op)
    n = _check_global(op, mesh, axis, data_axis, x, w, bias, transpose_w)
    if quant is None:
        _check_float_x(op, x)
        _check_like_x(op, x, w=w, bias=bias)
    else:
        _check_w8a8_operands(op, quant, x, w, n)
    options = {
        "comm_turn": comm_turn,
        "transpose_x2": transpose_w,
        "implementation": implementation,
    }
    args = (x, w) + ((bias,) if bias is not None else ())
    specs = (x_spec, _w_spec(axis, transpose_w)) + ((P(),) if bias is not None else ())
    if quant is None:
        shard = _plain_shard(axis, **options)
    else:
        shard = _w8a8_shard(axis, quant, bias is not None, **options)
        comm = tuple(quant.comm_quant_scales or ())
        args += (jnp.asarray(quant.weight_scale),) + comm
        specs += (P(),) * (1 + len(comm))
    out_spec = P(data_axis, None) if x.ndim == 2 else P(data_axis, None, None)
    return shard_map_global(shard, mesh, specs, out_spec, args, check_vma=True)


def _check_norm_operands(op, mesh, data_axis, x, residual, gamma, n):
    """The global residual: (b, s, n) = x's leading dimensions for a 3-D x,
    any (b, s, n) with b * s == m for a 2-D x (its b a multiple of the
    ``data_axis`` ranks, which split it as they split x's rows); gamma (n,);
    both in x's dtype (the operator's rule, checked here in the wrapper's
    terms)."""
    shape = np.shape(residual)
    if x.ndim == 3:
        ok = shape == (*x.shape[:-1], n)
        rule = f"3-D (b, s, n) = {shape_str((*x.shape[:-1], n))}"
    else:
        ok = len(shape) == 3 and shape[0] * shape[1] == x.shape[0] and shape[2] == n
        rule = f"3-D (b, s, n) with b * s == m == {x.shape[0]} and n == {n}"
    if not ok:
        raise validation.type_error(op, f"residual must be {rule}, got {shape_str(shape)}")
    _check_data_split(op, mesh, data_axis, "residual", shape[0])
    if np.shape(gamma) != (n,):
        raise validation.type_error(
            op, f"gamma must be (n,) = {shape_str((n,))}, got {shape_str(np.shape(gamma))}"
        )
    _check_like_x(op, x, residual=residual, gamma=gamma)


def _check_like_x(op, x, **operands):
    """Each of ``operands`` (None: absent) has x's dtype (the operators'
    rule for the float modes, checked here in the wrapper's terms)."""
    dtype = jnp.result_type(x)
    for name, operand in operands.items():
        if operand is not None and jnp.result_type(operand) != dtype:
            raise validation.type_error(
                op,
                f"{name} dtype must equal x dtype {dtype_name(dtype)}, got "
                f"{dtype_name(jnp.result_type(operand))}",
            )


def row_parallel_linear_add_rms_norm(
    x: ArrayLike,
    w: ArrayLike,
    residual: ArrayLike,
    gamma: ArrayLike,
    *,
    mesh: Mesh,
    axis: str | tuple[str, ...],
    bias: ArrayLike | None = None,
    epsilon: float = 1e-6,
    data_axis: str | None = None,
    comm_turn: int = 0,
    transpose_w: bool = False,
    inplace: bool = False,
    implementation: Implementation = None,
) -> tuple[Array, Array]:
    """``y = x @ w + bias + residual``, ``norm_out = RMSNorm(y) * gamma``.

    Args:
      x: global [m, k] or [b, s, k], sharded on k along ``axis``.
      w: global [k, n] ([n, k] with ``transpose_w``), sharded on k.
      residual: global [b, s, n] (x's leading dimensions, or b * s == m for
        a 2-D x); gamma: [n]; both in x's dtype.
      bias: [n], added once (on the first rank of ``axis``).
      epsilon: as in ``matmul_all_reduce_add_rms_norm``.
      mesh, axis, data_axis, comm_turn, transpose_w, implementation: as in
        :func:`row_parallel_linear`.
      inplace: use the in-place operator (y reuses residual's buffer).

    Returns:
      ``(y, norm_out)``, [b, s, n], replicated along ``axis``.
    """
    op = "row_parallel_linear_add_rms_norm"
    transpose_w = validation.check_bool(op, "transpose_w", transpose_w)
    inplace = validation.check_bool(op, "inplace", inplace)
    mesh = _check_mesh(op, mesh, axis, data_axis)
    x, w, residual, gamma, bias = (_as_array(a) for a in (x, w, residual, gamma, bias))
    x_spec = _x_spec(x, axis, data_axis, op)
    n = _check_global(op, mesh, axis, data_axis, x, w, bias, transpose_w)
    _check_norm_operands(op, mesh, data_axis, x, residual, gamma, n)
    _check_like_x(op, x, w=w, bias=bias)
    r_spec = P(data_axis, None, None)
    fn = inplace_matmul_all_reduce_add_rms_norm if inplace else matmul_all_reduce_add_rms_norm
    options = {
        "epsilon": epsilon,
        "comm_turn": comm_turn,
        "transpose_x2": transpose_w,
        "implementation": implementation,
    }

    def shard(x_s, w_s, r_s, g_s, *b):
        bias_s = _bias_once(b[0], axis) if b else None
        return fn(x_s, w_s, r_s, g_s, axis, bias=bias_s, **options)

    args = (x, w, residual, gamma) + ((bias,) if bias is not None else ())
    specs = (x_spec, _w_spec(axis, transpose_w), r_spec, P()) + ((P(),) if bias is not None else ())
    return shard_map_global(shard, mesh, specs, (r_spec, r_spec), args, check_vma=True)
