"""Weight-only quantized matmul + all-reduce: the antiquant mode of
npu_mm_all_reduce_base (seed 004 table 2, aclnnWeightQuantMatmulAllReduce).

    out = allReduce(x1 @ ((x2_int8 + antiquant_offset) * antiquant_scale) + bias + x3)

The int8 weights are dequantized to x1's dtype with the Ascend weight-quant
arithmetic (docs/semantics.md §8): for float16 in fp16 steps (the add and the
multiply each rounded to fp16), for bfloat16 in fp32 and rounded once to
bf16. The matmul then runs as the non-quantized one (fp32 accumulation,
+ bias + x3, one rounding) and the all-reduce is in x1's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_mc2.framework import numerics, targets, validation
from jax_mc2.framework.primitive import (
    FOLD_MATRIX,
    FOLD_ROWS,
    NzWeight,
    Operand,
    PrimitiveSpec,
    register,
    split_operands,
)
from jax_mc2.framework.validation import dtype_name, shape_str
from jax_mc2.implementations import ffi, xla
from jax_mc2.primitives.matmul_family import (
    check_bias_x3,
    check_matmul_shapes,
    reduced_result,
)

OP = "mm_all_reduce_base"
_F32 = jnp.float32


def check_antiquant_group_size(op, antiquant_group_size, k):
    """0 (no groups), or a multiple of 32 in [32, k - 1]."""
    antiquant_group_size = validation.check_int(
        op, "antiquant_group_size", antiquant_group_size, minimum=0
    )
    if antiquant_group_size and (
        antiquant_group_size % 32 or not 32 <= antiquant_group_size <= k - 1
    ):
        raise validation.value_error(
            op,
            "antiquant_group_size must be 0 or a multiple of 32 in [32, k - 1] = "
            f"[32, {k - 1}], got {antiquant_group_size}",
        )
    return antiquant_group_size


def antiquant_scale_shape(scale_shape, n, k, antiquant_group_size):
    """The canonical (rows, cols) of a pertensor / perchannel / pergroup scale,
    or None when the shape fits none of them."""
    if antiquant_group_size:
        return (
            (-(-k // antiquant_group_size), n)
            if tuple(scale_shape) == (-(-k // antiquant_group_size), n)
            else None
        )
    if tuple(scale_shape) == (1,):
        return (1, 1)
    if tuple(scale_shape) in ((n,), (1, n)):
        return (1, n)
    return None


def dequantize_weights(x2, scale, offset, *, dtype, antiquant_group_size, transpose_x2):
    """The int8 x2 (stored (k, n), or (n, k) transposed) dequantized to
    ``dtype`` with the kernel's arithmetic (lax ops: the ``xla`` numerics)."""
    k = x2.shape[1] if transpose_x2 else x2.shape[0]
    n = x2.shape[0] if transpose_x2 else x2.shape[1]
    rows, cols = antiquant_scale_shape(scale.shape, n, k, antiquant_group_size)

    def expand(a):  # scale/offset broadcast to the (k, n) weight
        a = numerics.widened(a.reshape(rows, cols))
        if antiquant_group_size:
            a = jnp.repeat(a, antiquant_group_size, axis=0)[:k]
        return a.T if transpose_x2 else a

    w = x2.astype(_F32)
    if np.dtype(dtype) == np.dtype(np.float16):
        if offset is not None:
            w = numerics.rounded_to(w + expand(offset), dtype)
        return (w * expand(scale)).astype(dtype)
    if offset is not None:
        w = w + expand(offset)
    return (w * expand(scale)).astype(dtype)


OPERANDS = (
    Operand("x1", fold=FOLD_MATRIX),
    Operand("x2"),
    Operand("scale"),
    Operand("offset", flag="has_offset"),
    Operand("bias", flag="has_bias"),
    Operand("x3", flag="has_x3", fold=FOLD_MATRIX),
)


def _split(operands, has_offset, has_bias, has_x3):
    flags = {"has_offset": has_offset, "has_bias": has_bias, "has_x3": has_x3}
    return tuple(split_operands(OPERANDS, operands, flags).values())


def _abstract_eval(
    *operands, transpose_x2, has_offset, has_bias, has_x3, antiquant_group_size, **collective
):
    x1, x2, scale, offset, bias, x3 = _split(operands, has_offset, has_bias, has_x3)
    targets.operator_support(OP)
    validation.check_rank(OP, "x1", x1, (2, 3), "(m, k) or (b, s, k)")
    targets.check_float_dtype(OP, "x1", x1)
    if np.dtype(x2.dtype) != np.dtype(np.int8):
        raise validation.type_error(
            OP, f"x2 dtype must be int8 with antiquant_scale, got {dtype_name(x2.dtype)}"
        )
    out_shape = check_matmul_shapes(OP, x1, x2, transpose_x2=transpose_x2)
    k, n = x1.shape[-1], out_shape[-1]
    check_antiquant_group_size(OP, antiquant_group_size, k)
    if antiquant_scale_shape(scale.shape, n, k, antiquant_group_size) is None:
        g = antiquant_group_size
        rule = (
            f"pergroup (ceil(k / {g}), n) = ({-(-k // g)}, {n})"
            if g
            else f"pertensor (1,) or perchannel (n,) / (1, n) with n = {n}"
        )
        raise validation.type_error(
            OP, f"antiquant_scale must be {rule}, got {shape_str(scale.shape)}"
        )
    validation.check_same_dtype(OP, "antiquant_scale", scale, "x1", x1)
    if offset is not None:
        validation.check_shape(
            OP, "antiquant_offset", offset, scale.shape, "antiquant_scale's shape"
        )
        validation.check_same_dtype(OP, "antiquant_offset", offset, "x1", x1)
    check_bias_x3(OP, x1, out_shape, bias=bias, x3=x3)
    return reduced_result(OP, x1, out_shape, x1.dtype, operands, collective, x2=x2, limit_n=True)


def _xla_composition(
    *operands, transpose_x2, has_offset, has_bias, has_x3, antiquant_group_size, **params
):
    """``params``: axis_name, comm_turn."""
    x1, x2, scale, offset, bias, x3 = _split(operands, has_offset, has_bias, has_x3)
    w = dequantize_weights(
        x2,
        scale,
        offset,
        dtype=x1.dtype,
        antiquant_group_size=antiquant_group_size,
        transpose_x2=transpose_x2,
    )
    return xla.matmul_all_reduce(x1, w, bias, x3, transpose_x2=transpose_x2, **params)


def _ffi_composition(*operands, has_offset, has_bias, has_x3, antiquant_group_size, **params):
    """``params``: transpose_x2, axis_name, comm_turn, parallelism."""
    x1, x2, scale, offset, bias, x3 = _split(operands, has_offset, has_bias, has_x3)
    antiquant = {
        "antiquant_scale": scale,
        "antiquant_offset": offset,
        "antiquant_group_size": antiquant_group_size,
    }
    return ffi.matmul_all_reduce(x1, x2, bias, x3, **params, **antiquant)


weight_quant_mm_all_reduce_p = register(
    PrimitiveSpec(
        name="mc2_weight_quant_mm_all_reduce",
        operator=OP,
        operands=OPERANDS,
        abstract_eval=_abstract_eval,
        xla=_xla_composition,
        ffi=_ffi_composition,
        batching=FOLD_ROWS,
        fold_like="x1",
        nz_weight=NzWeight(),
        not_differentiable=(
            "the weight-only quantized mode (antiquant_scale) is not differentiable; "
            "differentiate the floating-point model and quantize the weights after training"
        ),
    )
)
