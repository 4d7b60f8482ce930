"""Matmul + all-reduce (seed 004, ``torch_npu.npu_mm_all_reduce_base``).

``out = allReduce(x1 @ x2 + bias + x3)`` over ``axis_name``. ``bias`` and
``x3`` are added on every rank before the reduction, as the CANN kernels do.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jax_mc2.framework import _compat
from jax_mc2.framework.batching import map_over_batch, move_batch_to_front
from jax_mc2.framework.lowering import register_implementations
from jax_mc2.implementations import ffi, xla
from jax_mc2.primitives.matmul_family import check_matmul, reduced_result

OP = "mm_all_reduce_base"
_F32 = jnp.float32


# --------------------------------------------------------------------------
# The primitive


mm_all_reduce_p = _compat.new_primitive("mc2_mm_all_reduce")


def _split_operands(operands, has_bias, has_x3):
    x1, x2, *rest = operands
    bias = rest.pop(0) if has_bias else None
    x3 = rest.pop(0) if has_x3 else None
    return x1, x2, bias, x3


def _abstract_eval(
    *operands, transpose_x2, has_bias, has_x3, axis_name, world_size, comm_turn, implementation
):
    del implementation
    x1, x2, bias, x3 = _split_operands(operands, has_bias, has_x3)
    out_shape = check_matmul(OP, x1, x2, transpose_x2=transpose_x2, bias=bias, x3=x3)
    return reduced_result(
        OP,
        x1,
        out_shape,
        x1.dtype,
        operands,
        comm_turn=comm_turn,
        world_size=world_size,
        axis_name=axis_name,
    )


mm_all_reduce_p.def_effectful_abstract_eval(_abstract_eval)


def _ffi_composition(*operands, transpose_x2, has_bias, has_x3, axis_name, comm_turn, parallelism):
    x1, x2, bias, x3 = _split_operands(operands, has_bias, has_x3)

    def local(x1_c, x3_c):
        return ffi.matmul(x1_c, x2, bias, x3_c, transpose_x2=transpose_x2, parallelism=parallelism)

    return xla.chunked_matmul_all_reduce(local, x1, x3, axis_name=axis_name, comm_turn=comm_turn)


def _xla_composition(*operands, transpose_x2, has_bias, has_x3, axis_name, comm_turn):
    x1, x2, bias, x3 = _split_operands(operands, has_bias, has_x3)
    return xla.matmul_all_reduce(
        x1, x2, bias, x3, transpose_x2=transpose_x2, axis_name=axis_name, comm_turn=comm_turn
    )


register_implementations(
    mm_all_reduce_p, OP, ffi=_ffi_composition, xla=_xla_composition, multiple_results=False
)


def _jvp(
    primals,
    tangents,
    *,
    transpose_x2,
    has_bias,
    has_x3,
    axis_name,
    world_size,
    comm_turn,
    implementation,
):
    out = mm_all_reduce_p.bind(
        *primals,
        transpose_x2=transpose_x2,
        has_bias=has_bias,
        has_x3=has_x3,
        axis_name=axis_name,
        world_size=world_size,
        comm_turn=comm_turn,
        implementation=implementation,
    )
    x1, x2, _, _ = _split_operands(primals, has_bias, has_x3)
    tangents = [_compat.ad.instantiate_zeros(t) for t in tangents]
    dx1, dx2, dbias, dx3 = _split_operands(tangents, has_bias, has_x3)
    # The op is bilinear in (x1, x2) and linear in bias and x3; the tangent
    # is the same all-reduce of the fp32 sum of the linear parts. It is built
    # from lax ops so reverse mode transposes it with JAX's own rules.
    dims = (((x1.ndim - 1,), (1 if transpose_x2 else 0,)), ((), ()))
    acc = lax.dot_general(dx1, x2, dims, preferred_element_type=_F32)
    acc = acc + lax.dot_general(x1, dx2, dims, preferred_element_type=_F32)
    if dbias is not None:
        acc = acc + dbias.astype(_F32)
    if dx3 is not None:
        acc = acc + dx3.astype(_F32)
    return out, xla.all_reduce(acc.astype(out.dtype), axis_name)


_compat.ad.primitive_jvps[mm_all_reduce_p] = _jvp


def _batch(args, dims, **params):
    not_mapped = _compat.NOT_MAPPED
    x1, x2, bias, x3 = _split_operands(list(args), params["has_bias"], params["has_x3"])
    d1, d2, db, d3 = _split_operands(list(dims), params["has_bias"], params["has_x3"])
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not not_mapped)
    if d2 is not_mapped and db is not_mapped:
        # Only row operands are batched: fold the batch into the rows.
        x1, x3 = move_batch_to_front([x1, x3], [d1, d3], size)
        lead = x1.shape[:-1]
        x1f = x1.reshape(size * lead[1], *x1.shape[2:]) if x1.ndim == 4 else x1
        x3f = None
        if x3 is not None:
            x3f = x3.reshape(size * lead[1], *x3.shape[2:]) if x3.ndim == 4 else x3
        ops = [x1f, x2] + [a for a in (bias, x3f) if a is not None]
        out = mm_all_reduce_p.bind(*ops, **params)
        return out.reshape(*lead, out.shape[-1]), 0
    out = map_over_batch(
        lambda *a: mm_all_reduce_p.bind(*[o for o in a if o is not None], **params),
        [x1, x2, bias, x3],
        [d1, d2, db, d3],
    )
    return out, 0


_compat.register_batching_rule(mm_all_reduce_p, lambda params: OP, _batch)
