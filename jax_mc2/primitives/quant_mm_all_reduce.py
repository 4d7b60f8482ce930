"""int8 x int8 matmul + dequant + all-reduce: aclnnQuantMatmulAllReduce
(seed 000) and the full-quantization mode of npu_mm_all_reduce_base (seed 004,
table 3), which share one primitive.

    out = allReduce(dequantScale * (x1_int8 @ x2_int8 + bias_int32) (* pertokenScale) + x3)

The int8 products accumulate exactly in int32 and the int32 bias is added
before any scale; both are two's-complement int32 and wrap past int32, as
CANN's int32 accumulators (docs/semantics.md §10.2). ``dequant_scale`` is packed 64-bit words (see
``jax_mc2.quant.trans_quant_param``; float16 output), bfloat16 (bfloat16
output) or, with a float32 ``pertoken_scale`` (mm_all_reduce_base; the
V4 int8 rows' ``x1_scale``), float32 (float16 output) or bfloat16 (bfloat16
output); pertensor ``(1,)`` or
perchannel ``(n,)`` / ``(1, n)``. Each rank rounds the dequantized result to
the output dtype, adds x3 (a second rounding), and the all-reduce runs in the
output dtype.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from jax_mc2.framework import targets, validation, weight_format
from jax_mc2.framework.collective import collective_params
from jax_mc2.framework.primitive import (
    FOLD_MATRIX,
    FOLD_VECTOR,
    NzWeight,
    Operand,
    PrimitiveSpec,
    bind,
    fold_rows_rule,
    register,
    split_operands,
)
from jax_mc2.framework.quant import PACKED_WIDE, canonical_packed_scale, decode_scale
from jax_mc2.framework.validation import dtype_name, shape_str
from jax_mc2.implementations import ffi, xla
from jax_mc2.primitives.matmul_family import (
    check_channel_scale,
    check_matmul_shapes,
    reduced_result,
)

OP = "quant_matmul_all_reduce"


def _scale_names(op):
    """The (dequant scale, pertoken scale) argument names of ``op``."""
    if op == "quant_matmul_all_reduce_v4":
        return "x2_scale", "x1_scale"
    return "dequant_scale", "pertoken_scale"


def _float32_scale_hint(op):
    """Where a float32 dequant scale without a pertoken scale can go instead."""
    if op == "quant_matmul_all_reduce":  # seed 000 has no pertoken scale
        return (
            "; pack a float32 scale with quant.trans_quant_param, or pass it with a pertoken "
            "scale to mm_all_reduce_base (pertoken_scale) or quant_matmul_all_reduce_v4 "
            "(x1_scale)"
        )
    return f"; a float32 scale needs {_scale_names(op)[1]} or quant.trans_quant_param"


def scale_layout(op, name, scale, n, *, pertoken=False):
    """Checks a dequant scale; returns ``(output dtype, packed pair form?)``.

    Packed words (int64/uint64, or uint32 ``[..., 2]`` (low, high) pairs when
    x64 is off) give float16 output, bfloat16 scales bfloat16 output; with a
    pertoken scale, float32 gives float16 output (packed words are refused).
    The logical shape is ``(1,)``, ``(n,)`` or ``(1, n)``.
    """
    dtype = np.dtype(scale.dtype)
    pair = dtype == np.dtype(np.uint32) and scale.ndim >= 1 and scale.shape[-1] == 2
    if (dtype in PACKED_WIDE or pair) and not pertoken:
        out_dtype = np.dtype(np.float16)
    elif dtype == np.dtype(jnp.bfloat16):
        out_dtype = np.dtype(jnp.bfloat16)
    elif dtype == np.dtype(np.float32) and pertoken:
        out_dtype = np.dtype(np.float16)
    elif pertoken:
        raise validation.type_error(
            op,
            f"{name} dtype must be float32 (float16 output) or bfloat16 (bfloat16 output) with "
            f"{_scale_names(op)[1]}, got {dtype.name}{list(scale.shape)}",
        )
    else:
        raise validation.type_error(
            op,
            f"{name} dtype must be int64/uint64 packed scales (or uint32 (low, high) pairs "
            f"[..., 2]) for float16 output, or bfloat16 for bfloat16 output, got "
            f"{dtype.name}{list(scale.shape)}"
            + (_float32_scale_hint(op) if dtype == np.dtype(np.float32) else ""),
        )
    check_channel_scale(op, name, scale, n, pair=pair)
    return out_dtype, pair


def check_int8_matmul(op, x1, x2, *, transpose_x2, bias=None):
    """x1: int8 [m, k] or [b, s, k]; x2: int8 [k, n] ([n, k] transposed);
    bias: int32 [n]. Returns the output shape."""
    targets.operator_support(op)
    validation.check_rank(op, "x1", x1, (2, 3), "(m, k) or (b, s, k)")
    for name, aval in (("x1", x1), ("x2", x2)):
        if np.dtype(aval.dtype) != np.dtype(np.int8):
            raise validation.type_error(
                op, f"{name} dtype must be int8, got {dtype_name(aval.dtype)}"
            )
    out_shape = check_matmul_shapes(op, x1, x2, transpose_x2=transpose_x2)
    n = out_shape[-1]
    if bias is not None:
        validation.check_shape(op, "bias", bias, (n,), "1-D (n,)")
        if np.dtype(bias.dtype) != np.dtype(np.int32):
            raise validation.type_error(
                op, f"bias dtype must be int32, got {dtype_name(bias.dtype)}"
            )
    return out_shape


OPERANDS = (
    Operand("x1", fold=FOLD_MATRIX),
    Operand("x2"),
    Operand("scale"),
    Operand("pertoken", flag="has_pertoken", fold=FOLD_VECTOR),
    Operand("bias", flag="has_bias"),
    Operand("x3", flag="has_x3", fold=FOLD_MATRIX),
    Operand("comm_scale_1", flag="has_comm_scales"),
    Operand("comm_scale_2", flag="has_comm_scales"),
)


def _split(operands, has_pertoken, has_bias, has_x3, has_comm_scales=False):
    flags = {
        "has_pertoken": has_pertoken,
        "has_bias": has_bias,
        "has_x3": has_x3,
        "has_comm_scales": has_comm_scales,
    }
    *named, comm_1, comm_2 = split_operands(OPERANDS, operands, flags).values()
    return (*named, None if comm_1 is None else (comm_1, comm_2))


def _abstract_eval(
    *operands,
    op,
    transpose_x2,
    has_pertoken,
    has_bias,
    has_x3,
    has_comm_scales,
    **collective,
):
    x1, x2, scale, pertoken, bias, x3, comm = _split(
        operands, has_pertoken, has_bias, has_x3, has_comm_scales
    )
    out_shape = check_int8_matmul(op, x1, x2, transpose_x2=transpose_x2, bias=bias)
    scale_name, pertoken_name = _scale_names(op)
    out_dtype, _ = scale_layout(op, scale_name, scale, out_shape[-1], pertoken=has_pertoken)
    if pertoken is not None:
        m = int(np.prod(x1.shape[:-1]))
        validation.check_shape(op, pertoken_name, pertoken, (m,), "1-D (m,) (b * s for 3-D x1)")
        if np.dtype(pertoken.dtype) != np.dtype(np.float32):
            raise validation.type_error(
                op,
                f"{pertoken_name} dtype must be float32, got {dtype_name(pertoken.dtype)}",
            )
    if x3 is not None:
        validation.check_shape(op, "x3", x3, out_shape, "the output shape")
        if np.dtype(x3.dtype) != out_dtype:
            raise validation.type_error(
                op,
                f"x3 dtype must equal the output dtype {out_dtype.name} (set by {scale_name}), "
                f"got {dtype_name(x3.dtype)}",
            )
    if comm is not None:
        n = out_shape[-1]
        for name, s in zip(("comm_quant_scale_1", "comm_quant_scale_2"), comm):
            if tuple(s.shape) not in ((n,), (1, n)):
                raise validation.type_error(
                    op,
                    f"{name} must be (n,) or (1, n) with n = {n}, got {shape_str(s.shape)}",
                )
            if np.dtype(s.dtype) != out_dtype:
                raise validation.type_error(
                    op,
                    f"{name} dtype must equal the output dtype {out_dtype.name}, got "
                    f"{dtype_name(s.dtype)}",
                )
        if comm[0].shape != comm[1].shape:
            raise validation.type_error(
                op,
                "comm_quant_scale_1 and comm_quant_scale_2 must have one shape, got "
                f"{shape_str(comm[0].shape)} and {shape_str(comm[1].shape)}",
            )
    return reduced_result(op, x1, out_shape, out_dtype, operands, collective, x2=x2)


def _out_dtype(scale):
    return jnp.bfloat16 if np.dtype(scale.dtype) == np.dtype(jnp.bfloat16) else jnp.float16


def _composition(local_fn, operands, flags, axis_name, comm_turn, reduce=None):
    """Row chunks (comm_turn) of ``local_fn(x1, x2, scale, pertoken, bias, x3,
    out_dtype=, comm_scale=)``, each reduced by ``reduce`` (a function of the
    array; default the ``xla`` all-reduce over ``axis_name``); with comm
    scales ``local_fn`` returns the int8 quantized result and the int8
    low-bit communication chain reduces it. x3 and the pertoken scales
    follow their rows."""
    x1, x2, scale, pertoken, bias, x3, comm = _split(operands, *flags)
    scale_f32, out_dtype = decode_scale(scale), _out_dtype(scale)
    s1 = None
    if comm is not None:
        s1, s2 = (s.reshape(-1) for s in comm)

        def reduce(q):
            rows = math.prod(q.shape[:-1])  # reshape(-1, 0) cannot infer the rows
            y = xla.int8_comm_all_reduce(
                q.reshape(rows, q.shape[-1]), s1, s2, out_dtype=out_dtype, axis_name=axis_name
            )
            return y.reshape(q.shape)

    return xla.chunked_matmul_all_reduce(
        lambda a, c, token: local_fn(
            a, x2, scale_f32, token, bias, c, out_dtype=out_dtype, comm_scale=s1
        ),
        x1,
        x3,
        pertoken,
        axis_name=axis_name,
        comm_turn=comm_turn,
        reduce=reduce,
    )


def _flags(params):
    return (
        params.pop("has_pertoken"),
        params.pop("has_bias"),
        params.pop("has_x3"),
        params.pop("has_comm_scales"),
    )


def _xla_composition(*operands, op, transpose_x2, axis_name, comm_turn, **params):
    del op
    local = functools.partial(xla.local_int8_matmul, transpose_x2=transpose_x2)
    return _composition(local, operands, _flags(params), axis_name, comm_turn)


def _ffi_composition(*operands, op, transpose_x2, axis_name, comm_turn, parallelism, **params):
    del op
    out_dtype = _out_dtype(operands[2])  # the dequant scale's
    wide = ffi.widened_for_all_reduce(out_dtype, axis_name)

    def local(*args, comm_scale, **kw):
        return ffi.int8_matmul(
            *args,
            comm_scale=comm_scale,
            transpose_x2=transpose_x2,
            parallelism=parallelism,
            bf16_as_f32=wide and comm_scale is None,
            **kw,
        )

    reduce = ffi.reducer(axis_name, out_dtype)
    return _composition(local, operands, _flags(params), axis_name, comm_turn, reduce)


def _batching(spec, primitive):
    fold_rows = fold_rows_rule(spec, primitive)

    def rule(args, dims, **params):
        if params["has_comm_scales"]:
            raise NotImplementedError(
                f"{params['op']}: vmap of the low-bit communication mode (comm_quant_scale_*) "
                "is not supported; its all-to-all splits the rows of one matmul across ranks"
            )
        return fold_rows(args, dims, **params)

    return rule


quant_mm_all_reduce_p = register(
    PrimitiveSpec(
        name="mc2_quant_mm_all_reduce",
        operator=lambda params: params["op"],
        operands=OPERANDS,
        abstract_eval=_abstract_eval,
        xla=_xla_composition,
        ffi=_ffi_composition,
        batching=_batching,
        fold_like="x1",
        nz_weight=NzWeight(),
        not_differentiable=(
            "the int8 quantized mode is not differentiable (int8 operands and packed "
            "scales); differentiate the floating-point model and quantize after training"
        ),
    )
)


def bind_int8_matmul_all_reduce(
    op,
    x1,
    x2,
    axis_name,
    *,
    dequant_scale,
    pertoken_scale,
    comm_quant_scales,
    bias,
    x3,
    reduce_op,
    comm_turn,
    transpose_x2,
    implementation,
    x2_format=weight_format.ND,
):
    """Canonicalizes the arguments and binds the int8 primitive for ``op``
    (x2 in the layout ``x2_format`` names)."""
    validation.check_reduce_op(op, reduce_op)
    if dequant_scale is None:
        raise validation.type_error(
            op, f"{_scale_names(op)[0]} is required for int8 x1 and x2 (the dequantization scale)"
        )
    params = collective_params(op, axis_name, comm_turn, implementation)
    comm_1, comm_2 = comm_quant_scales or (None, None)
    return bind(
        quant_mm_all_reduce_p,
        {
            "x1": x1,
            "x2": x2,
            "scale": canonical_packed_scale(dequant_scale),
            "pertoken": pertoken_scale,
            "bias": bias,
            "x3": x3,
            "comm_scale_1": comm_1,
            "comm_scale_2": comm_2,
        },
        op=op,
        transpose_x2=bool(transpose_x2),
        x2_format=x2_format,
        **params,
    )
