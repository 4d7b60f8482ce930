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

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jax_mc2 import _validation as v
from jax_mc2.ops.matmul_all_reduce import mm_all_reduce_base
from jax_mc2.ops.matmul_all_reduce_add_rms_norm import (
    inplace_matmul_all_reduce_add_rms_norm,
    matmul_all_reduce_add_rms_norm,
)


def _bias_once(bias, axis):
    """``bias`` on the first rank of ``axis`` and zeros on the others."""
    first = lax.axis_index(axis) == 0
    return jnp.where(first, bias, jnp.zeros_like(bias))


def _x_spec(x, axis, data_axis, op):
    if x.ndim not in (2, 3):
        raise v.type_error(
            op, f"x must be 2-D (m, k) or 3-D (b, s, k), got shape {v.shape_str(x.shape)}"
        )
    return P(data_axis, axis) if x.ndim == 2 else P(data_axis, None, axis)


def _check_mesh(op, mesh, axis, data_axis):
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    for name in names + ((data_axis,) if data_axis is not None else ()):
        if name not in mesh.axis_names:
            raise v.value_error(op, f"mesh has no axis {name!r}; its axes are {mesh.axis_names}")


def row_parallel_linear(
    x,
    w,
    *,
    mesh,
    axis,
    bias=None,
    quant=None,
    data_axis=None,
    comm_turn=0,
    transpose_w=False,
    implementation=None,
):
    """``x @ w + bias`` with x and w sharded along ``axis`` (row parallel).

    Args:
      x: global [m, k] or [b, s, k]; sharded on k along ``axis`` (and on the
        first dimension along ``data_axis`` if given).
      w: global [k, n] ([n, k] with ``transpose_w``), sharded on k.
      mesh: the ``jax.sharding.Mesh``.
      axis: the tensor-parallel mesh axis (a name or tuple of names).
      bias: [n], added exactly once.
      quant: quantization options (not available in this version).

    Returns:
      [m, n] or [b, s, n], replicated along ``axis``.
    """
    op = "row_parallel_linear"
    if quant is not None:
        raise v.unsupported(op, "quant= is not implemented in this version of jax_mc2")
    _check_mesh(op, mesh, axis, data_axis)
    x_spec = _x_spec(x, axis, data_axis, op)
    w_spec = P(None, axis) if transpose_w else P(axis, None)
    out_spec = P(data_axis, None) if x.ndim == 2 else P(data_axis, None, None)

    def shard(x_s, w_s, *b):
        return mm_all_reduce_base(
            x_s,
            w_s,
            axis,
            bias=_bias_once(b[0], axis) if b else None,
            comm_turn=comm_turn,
            transpose_x2=transpose_w,
            implementation=implementation,
        )

    args = (x, w) + ((bias,) if bias is not None else ())
    specs = (x_spec, w_spec) + ((P(),) if bias is not None else ())
    return jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=True)(
        *args
    )


def row_parallel_linear_add_rms_norm(
    x,
    w,
    residual,
    gamma,
    *,
    mesh,
    axis,
    bias=None,
    epsilon=1e-6,
    data_axis=None,
    comm_turn=0,
    transpose_w=False,
    inplace=False,
    implementation=None,
):
    """``y = x @ w + bias + residual``, ``norm_out = RMSNorm(y) * gamma``.

    Args:
      x: global [m, k] or [b, s, k], sharded on k along ``axis``.
      w: global [k, n] ([n, k] with ``transpose_w``), sharded on k.
      residual: global [b, s, n]; gamma: [n]; bias: [n], added once.
      inplace: use the in-place operator (y reuses residual's buffer).

    Returns:
      ``(y, norm_out)``, [b, s, n], replicated along ``axis``.
    """
    op = "row_parallel_linear_add_rms_norm"
    _check_mesh(op, mesh, axis, data_axis)
    x_spec = _x_spec(x, axis, data_axis, op)
    w_spec = P(None, axis) if transpose_w else P(axis, None)
    r_spec = P(data_axis, None, None)
    fn = inplace_matmul_all_reduce_add_rms_norm if inplace else matmul_all_reduce_add_rms_norm

    def shard(x_s, w_s, r_s, g_s, *b):
        return fn(
            x_s,
            w_s,
            r_s,
            g_s,
            axis,
            bias=_bias_once(b[0], axis) if b else None,
            epsilon=epsilon,
            comm_turn=comm_turn,
            transpose_x2=transpose_w,
            implementation=implementation,
        )

    args = (x, w, residual, gamma) + ((bias,) if bias is not None else ())
    specs = (x_spec, w_spec, r_spec, P()) + ((P(),) if bias is not None else ())
    return jax.shard_map(
        shard, mesh=mesh, in_specs=specs, out_specs=(r_spec, r_spec), check_vma=True
    )(*args)
