"""Matmul + all-reduce (seed 004, ``torch_npu.npu_mm_all_reduce_base``).

``out = allReduce(x1 @ x2 + bias + x3)`` over ``axis_name``. ``bias`` and
``x3`` are added on every rank before the reduction, as the CANN kernels do.
"""

from __future__ import annotations

from jax_mc2.framework import _compat, numerics
from jax_mc2.framework.primitive import (
    FOLD_MATRIX,
    FOLD_ROWS,
    NzWeight,
    Operand,
    PrimitiveSpec,
    register,
    split_operands,
)
from jax_mc2.implementations import ffi, xla
from jax_mc2.primitives.matmul_family import check_matmul, reduced_result

OP = "mm_all_reduce_base"


# --------------------------------------------------------------------------
# The primitive


OPERANDS = (
    Operand("x1", fold=FOLD_MATRIX),
    Operand("x2"),
    Operand("bias", flag="has_bias"),
    Operand("x3", flag="has_x3", fold=FOLD_MATRIX),
)


def _split_operands(operands, has_bias, has_x3):
    named = split_operands(OPERANDS, operands, {"has_bias": has_bias, "has_x3": has_x3})
    return named["x1"], named["x2"], named["bias"], named["x3"]


def _abstract_eval(*operands, transpose_x2, has_bias, has_x3, **collective):
    x1, x2, bias, x3 = _split_operands(operands, has_bias, has_x3)
    out_shape = check_matmul(OP, x1, x2, transpose_x2=transpose_x2, bias=bias, x3=x3)
    return reduced_result(OP, x1, out_shape, x1.dtype, operands, collective)


def _ffi_composition(*operands, has_bias, has_x3, **params):
    """``params``: transpose_x2, axis_name, comm_turn, parallelism."""
    return ffi.matmul_all_reduce(*_split_operands(operands, has_bias, has_x3), **params)


def _xla_composition(*operands, has_bias, has_x3, **params):
    """``params``: transpose_x2, axis_name, comm_turn."""
    return xla.matmul_all_reduce(*_split_operands(operands, has_bias, has_x3), **params)


def _jvp(primals, tangents, *, transpose_x2, has_bias, has_x3, axis_name, **params):
    out = mm_all_reduce_p.bind(
        *primals,
        transpose_x2=transpose_x2,
        has_bias=has_bias,
        has_x3=has_x3,
        axis_name=axis_name,
        **params,
    )
    x1, x2, _, _ = _split_operands(primals, has_bias, has_x3)
    tangents = [_compat.ad.instantiate_zeros(t) for t in tangents]
    dx1, dx2, dbias, dx3 = _split_operands(tangents, has_bias, has_x3)
    # The op is bilinear in (x1, x2) and linear in bias and x3; the tangent
    # is the same all-reduce of the fp32 sum of the linear parts. It is built
    # from lax ops so reverse mode transposes it with JAX's own rules.
    acc = xla.product_tangent(x1, x2, dx1, dx2, transpose_x2=transpose_x2)
    if dbias is not None:
        acc = acc + numerics.widened(dbias)
    if dx3 is not None:
        acc = acc + numerics.widened(dx3)
    return out, xla.all_reduce(acc.astype(out.dtype), axis_name)


mm_all_reduce_p = register(
    PrimitiveSpec(
        name="mc2_mm_all_reduce",
        operator=OP,
        operands=OPERANDS,
        abstract_eval=_abstract_eval,
        xla=_xla_composition,
        ffi=_ffi_composition,
        batching=FOLD_ROWS,
        fold_like="x1",
        jvp=_jvp,
        nz_weight=NzWeight(),
    )
)
