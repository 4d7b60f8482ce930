"""int8 x int8 matmul + dequant + all-reduce: aclnnQuantMatmulAllReduce
(seed 000) and the full-quantization mode of npu_mm_all_reduce_base (seed 004,
table 3), which share one primitive.

    out = allReduce(dequantScale * (x1_int8 @ x2_int8 + bias_int32) (* pertokenScale) + x3)

The int8 products accumulate exactly in int32 and the int32 bias is added
before any scale. ``dequant_scale`` is packed 64-bit words (see
``jax_mc2.quant.trans_quant_param``; float16 output), bfloat16 (bfloat16
output) or, with a float32 ``pertoken_scale`` (mm_all_reduce_base; the
V4 int8 rows' ``x1_scale``), float32 (float16 output) or bfloat16 (bfloat16
output); pertensor ``(1,)`` or
perchannel ``(n,)`` / ``(1, n)``. Each rank rounds the dequantized result to
the output dtype, adds x3 (a second rounding), and the all-reduce runs in the
output dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_mc2 import _compat, _ffi, reference, targets
from jax_mc2 import _validation as v
from jax_mc2.ops import lowp_quant_matmul as lowp
from jax_mc2.ops._batching import map_over_batch, move_batch_to_front
from jax_mc2.ops._lowering import register_implementations
from jax_mc2.ops.matmul_all_reduce import (
    check_matmul_shapes,
    check_reduce_op,
    collective_params,
    nz_weight_to_nd,
    reduced_result,
    x2_from_format,
)

OP = "quant_matmul_all_reduce"
_F32 = jnp.float32
_PACKED_WIDE = (np.dtype(np.int64), np.dtype(np.uint64))


def _scale_names(op):
    """The (dequant scale, pertoken scale) argument names of ``op``."""
    if op == "quant_matmul_all_reduce_v4":
        return "x2_scale", "x1_scale"
    return "dequant_scale", "pertoken_scale"


def scale_layout(op, name, scale, n, *, pertoken=False):
    """Checks a dequant scale; returns ``(output dtype, packed pair form?)``.

    Packed words (int64/uint64, or uint32 ``[..., 2]`` (low, high) pairs when
    x64 is off) give float16 output, bfloat16 scales bfloat16 output; with a
    pertoken scale, float32 gives float16 output (packed words are refused).
    The logical shape is ``(1,)``, ``(n,)`` or ``(1, n)``.
    """
    dtype = np.dtype(scale.dtype)
    pair = dtype == np.dtype(np.uint32) and scale.ndim >= 1 and scale.shape[-1] == 2
    if (dtype in _PACKED_WIDE or pair) and not pertoken:
        out_dtype = np.dtype(np.float16)
    elif dtype == np.dtype(jnp.bfloat16):
        out_dtype = np.dtype(jnp.bfloat16)
    elif dtype == np.dtype(np.float32) and pertoken:
        out_dtype = np.dtype(np.float16)
    elif pertoken:
        raise v.type_error(
            op,
            f"{name} dtype must be float32 (float16 output) or bfloat16 (bfloat16 output) with "
            f"{_scale_names(op)[1]}, got {dtype.name}{list(scale.shape)}",
        )
    else:
        raise v.type_error(
            op,
            f"{name} dtype must be int64/uint64 packed scales (or uint32 (low, high) pairs "
            f"[..., 2]) for float16 output, or bfloat16 for bfloat16 output, got "
            f"{dtype.name}{list(scale.shape)}"
            + (
                f"; a float32 scale needs {_scale_names(op)[1]} or quant.trans_quant_param"
                if dtype == np.dtype(np.float32)
                else ""
            ),
        )
    shape = tuple(scale.shape[:-1]) if pair else tuple(scale.shape)
    if shape not in ((1,), (n,), (1, n)):
        raise v.type_error(
            op,
            f"{name} must be pertensor (1,) or perchannel (n,) / (1, n) with n = {n}, got "
            f"{v.shape_str(shape)}{' (uint32 pairs)' if pair else ''}",
        )
    return out_dtype, pair


def decode_scale(scale):
    """float32 ``[1]`` or ``[n]`` scale the hardware applies: the fp19 field
    ``float32(low & 0xFFFFE000)`` of packed words, or ``float32(bf16)``."""
    dtype = np.dtype(scale.dtype)
    if dtype in (np.dtype(jnp.bfloat16), np.dtype(np.float32)):
        return scale.astype(_F32).reshape(-1)
    if dtype in _PACKED_WIDE:
        low = (scale.astype(jnp.uint64) & np.uint64(0xFFFFFFFF)).astype(jnp.uint32)
    else:
        low = scale[..., 0]
    return lax.bitcast_convert_type(low & np.uint32(0xFFFFE000), _F32).reshape(-1)


def check_int8_matmul(op, x1, x2, *, transpose_x2, bias=None):
    """x1: int8 [m, k] or [b, s, k]; x2: int8 [k, n] ([n, k] transposed);
    bias: int32 [n]. Returns the output shape."""
    targets.operator_support(op)
    v.check_rank(op, "x1", x1, (2, 3), "(m, k) or (b, s, k)")
    for name, aval in (("x1", x1), ("x2", x2)):
        if np.dtype(aval.dtype) != np.dtype(np.int8):
            raise v.type_error(op, f"{name} dtype must be int8, got {v.dtype_name(aval.dtype)}")
    out_shape = check_matmul_shapes(op, x1, x2, transpose_x2=transpose_x2)
    n = out_shape[-1]
    if bias is not None:
        v.check_shape(op, "bias", bias, (n,), "1-D (n,)")
        if np.dtype(bias.dtype) != np.dtype(np.int32):
            raise v.type_error(op, f"bias dtype must be int32, got {v.dtype_name(bias.dtype)}")
    return out_shape


quant_mm_all_reduce_p = _compat.new_primitive("mc2_quant_mm_all_reduce")


def _split(operands, has_pertoken, has_bias, has_x3, has_comm_scales=False):
    x1, x2, scale, *rest = operands
    pertoken = rest.pop(0) if has_pertoken else None
    bias = rest.pop(0) if has_bias else None
    x3 = rest.pop(0) if has_x3 else None
    comm = (rest.pop(0), rest.pop(0)) if has_comm_scales else None
    return x1, x2, scale, pertoken, bias, x3, comm


def _abstract_eval(
    *operands,
    op,
    transpose_x2,
    has_pertoken,
    has_bias,
    has_x3,
    has_comm_scales,
    axis_name,
    world_size,
    comm_turn,
    implementation,
):
    del implementation
    x1, x2, scale, pertoken, bias, x3, comm = _split(
        operands, has_pertoken, has_bias, has_x3, has_comm_scales
    )
    out_shape = check_int8_matmul(op, x1, x2, transpose_x2=transpose_x2, bias=bias)
    scale_name, pertoken_name = _scale_names(op)
    out_dtype, _ = scale_layout(op, scale_name, scale, out_shape[-1], pertoken=has_pertoken)
    if pertoken is not None:
        m = int(np.prod(x1.shape[:-1]))
        v.check_shape(op, pertoken_name, pertoken, (m,), "1-D (m,) (b * s for 3-D x1)")
        if np.dtype(pertoken.dtype) != np.dtype(np.float32):
            raise v.type_error(
                op, f"{pertoken_name} dtype must be float32, got {v.dtype_name(pertoken.dtype)}"
            )
    if x3 is not None:
        v.check_shape(op, "x3", x3, out_shape, "the output shape")
        if np.dtype(x3.dtype) != out_dtype:
            raise v.type_error(
                op,
                f"x3 dtype must equal the output dtype {out_dtype.name} (set by {scale_name}), "
                f"got {v.dtype_name(x3.dtype)}",
            )
    if comm is not None:
        n = out_shape[-1]
        for name, s in zip(("comm_quant_scale_1", "comm_quant_scale_2"), comm):
            if tuple(s.shape) not in ((n,), (1, n)):
                raise v.type_error(
                    op, f"{name} must be (n,) or (1, n) with n = {n}, got {v.shape_str(s.shape)}"
                )
            if np.dtype(s.dtype) != out_dtype:
                raise v.type_error(
                    op,
                    f"{name} dtype must equal the output dtype {out_dtype.name}, got "
                    f"{v.dtype_name(s.dtype)}",
                )
        if comm[0].shape != comm[1].shape:
            raise v.type_error(
                op,
                "comm_quant_scale_1 and comm_quant_scale_2 must have one shape, got "
                f"{v.shape_str(comm[0].shape)} and {v.shape_str(comm[1].shape)}",
            )
    return reduced_result(
        op,
        x1,
        out_shape,
        out_dtype,
        operands,
        comm_turn=comm_turn,
        world_size=world_size,
        axis_name=axis_name,
        x2=x2,
    )


quant_mm_all_reduce_p.def_effectful_abstract_eval(_abstract_eval)


def _out_dtype(scale):
    return jnp.bfloat16 if np.dtype(scale.dtype) == np.dtype(jnp.bfloat16) else jnp.float16


def local_int8_matmul(x1, x2, scale_f32, pertoken, bias, x3, *, transpose_x2, out_dtype):
    """One rank's dequantized int8 matmul with lax ops (the ``xla`` numerics):
    ``f32(acc + bias) * scale * pertoken`` left to right in float32."""
    dims = (((x1.ndim - 1,), (1 if transpose_x2 else 0,)), ((), ()))
    acc = lax.dot_general(x1, x2, dims, preferred_element_type=jnp.int32)
    if bias is not None:
        acc = acc + bias
    y = acc.astype(_F32) * scale_f32
    if pertoken is not None:
        y = y * pertoken.reshape(*x1.shape[:-1], 1)
    y = y.astype(out_dtype)
    if x3 is not None:
        y = (y.astype(_F32) + x3.astype(_F32)).astype(out_dtype)
    return y


def _composition(local_fn, operands, flags, axis_name, comm_turn):
    """Row chunks (comm_turn) of ``local_fn(x1, x2, scale, pertoken, bias, x3,
    out_dtype, comm_scale)``, each all-reduced; with comm scales ``local_fn``
    returns the int8 quantized result and the int8 low-bit communication chain
    reduces it. x3 and the pertoken scales follow their rows."""
    x1, x2, scale, pertoken, bias, x3, comm = _split(operands, *flags)
    scale_f32, out_dtype = decode_scale(scale), _out_dtype(scale)
    reduce, s1 = None, None
    if comm is not None:
        s1, s2 = (s.reshape(-1) for s in comm)

        def reduce(q):
            y = reference.int8_comm_all_reduce(
                q.reshape(-1, q.shape[-1]), s1, s2, out_dtype=out_dtype, axis_name=axis_name
            )
            return y.reshape(q.shape)

    return reference.chunked_matmul_all_reduce(
        lambda a, c, token: local_fn(a, x2, scale_f32, token, bias, c, out_dtype, s1),
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

    def local(x1, x2, scale_f32, pertoken, bias, x3, out_dtype, comm_scale):
        c = local_int8_matmul(
            x1, x2, scale_f32, pertoken, bias, x3, transpose_x2=transpose_x2, out_dtype=out_dtype
        )
        return c if comm_scale is None else reference.comm_quantize(c, comm_scale)

    return _composition(local, operands, _flags(params), axis_name, comm_turn)


def _ffi_composition(*operands, op, transpose_x2, axis_name, comm_turn, parallelism, **params):
    del op

    def local(x1, x2, scale_f32, pertoken, bias, x3, out_dtype, comm_scale):
        return _ffi.int8_matmul(
            x1,
            x2,
            scale_f32,
            pertoken,
            bias,
            x3,
            out_dtype=out_dtype,
            transpose_x2=transpose_x2,
            parallelism=parallelism,
            comm_scale=comm_scale,
        )

    return _composition(local, operands, _flags(params), axis_name, comm_turn)


register_implementations(
    quant_mm_all_reduce_p,
    lambda params: params["op"],
    ffi=_ffi_composition,
    xla=_xla_composition,
    multiple_results=False,
)


def _jvp(primals, tangents, *, op, **params):
    raise NotImplementedError(
        f"{op}: the int8 quantized mode is not differentiable (int8 operands and packed "
        "scales); differentiate the floating-point model and quantize after training"
    )


_compat.ad.primitive_jvps[quant_mm_all_reduce_p] = _jvp


def _batch(args, dims, **params):
    not_mapped = _compat.NOT_MAPPED
    flags = params["has_pertoken"], params["has_bias"], params["has_x3"]
    if params["has_comm_scales"]:
        raise NotImplementedError(
            f"{params['op']}: vmap of the low-bit communication mode (comm_quant_scale_*) is "
            "not supported; its all-to-all splits the rows of one matmul across ranks"
        )
    x1, x2, scale, pertoken, bias, x3, _ = _split(list(args), *flags)
    d1, d2, ds, dp, db, d3, _ = _split(list(dims), *flags)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not not_mapped)
    if d2 is not_mapped and ds is not_mapped and db is not_mapped:
        # Only row operands are batched: fold the batch into the rows.
        x1, x3, pertoken = move_batch_to_front([x1, x3, pertoken], [d1, d3, dp], size)
        x1f = x1.reshape(-1, *x1.shape[2:]) if x1.ndim == 4 else x1
        x3f = None if x3 is None else (x3.reshape(-1, *x3.shape[2:]) if x3.ndim == 4 else x3)
        tf = None if pertoken is None else pertoken.reshape(-1)
        ops = [x1f, x2, scale] + [a for a in (tf, bias, x3f) if a is not None]
        out = quant_mm_all_reduce_p.bind(*ops, **params)
        return out.reshape(*x1.shape[:-1], out.shape[-1]), 0
    out = map_over_batch(
        lambda *a: quant_mm_all_reduce_p.bind(*[o for o in a if o is not None], **params),
        [x1, x2, scale, pertoken, bias, x3],
        [d1, d2, ds, dp, db, d3],
    )
    return out, 0


_compat.register_batching_rule(quant_mm_all_reduce_p, lambda params: params["op"], _batch)


def quant_matmul_all_reduce(
    x1,
    x2,
    axis_name,
    *,
    dequant_scale,
    bias=None,
    x3=None,
    reduce_op="sum",
    comm_turn=0,
    transpose_x2=False,
    x2_format=None,
    implementation=None,
):
    """int8 matmul + dequant + x3 + all-reduce (aclnnQuantMatmulAllReduce).

    Args:
      x1: int8 [m, k] or [b, s, k].
      x2: int8 [k, n], or [n, k] with ``transpose_x2=True``; with
        ``x2_format="FRACTAL_NZ"`` the NZ layout of that matrix
        (``quant.to_fractal_nz``; see :func:`mm_all_reduce_base`).
      axis_name: mesh axis name(s) bound by ``shard_map``, or None.
      dequant_scale: packed 64-bit scales from ``quant.trans_quant_param``
        (int64/uint64, or uint32 [..., 2] pairs without x64) -> float16
        output, or bfloat16 -> bfloat16 output; shape (1,), (n,) or (1, n).
      bias: int32 [n], added to the int32 accumulator on every rank.
      x3: the output shape and dtype, added on every rank before the reduction.
      comm_turn: 0, or t > 0 rows chunks with separate all-reduces.

    Returns:
      [m, n] or [b, s, n] float16 or bfloat16, replicated over ``axis_name``.
    """
    x2 = x2_from_format(OP, x1, x2, x2_format, transpose_x2=transpose_x2, dtypes=(np.int8,))
    return bind_int8_matmul_all_reduce(
        OP,
        x1,
        x2,
        axis_name,
        dequant_scale=dequant_scale,
        pertoken_scale=None,
        comm_quant_scales=None,
        bias=bias,
        x3=x3,
        reduce_op=reduce_op,
        comm_turn=comm_turn,
        transpose_x2=transpose_x2,
        implementation=implementation,
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
):
    """Canonicalizes the arguments and binds the int8 primitive for ``op``."""
    check_reduce_op(op, reduce_op)
    params = collective_params(op, axis_name, comm_turn, implementation)
    scale = dequant_scale if isinstance(dequant_scale, np.ndarray) else jnp.asarray(dequant_scale)
    if isinstance(scale, np.ndarray) and scale.dtype in _PACKED_WIDE:
        from jax_mc2.quant import packed_scale_words

        low, high = packed_scale_words(scale)
        scale = jnp.stack([low, high], axis=-1)  # NumPy words survive with x64 off
    operands = [jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(scale)]
    operands += [jnp.asarray(a) for a in (pertoken_scale, bias, x3) if a is not None]
    operands += [jnp.asarray(a) for a in comm_quant_scales or ()]
    return quant_mm_all_reduce_p.bind(
        *operands,
        op=op,
        transpose_x2=bool(transpose_x2),
        has_pertoken=pertoken_scale is not None,
        has_bias=bias is not None,
        has_x3=x3 is not None,
        has_comm_scales=comm_quant_scales is not None,
        **params,
    )


OP_V4 = "quant_matmul_all_reduce_v4"
_V4_FORMATS = (None, "ND", "FRACTAL_NZ", "hifloat8")
_V4_X1_FORMATS = (None, "ND", "hifloat8")


def quant_matmul_all_reduce_v4(
    x1,
    x2,
    axis_name,
    *,
    x2_scale,
    x1_scale=None,
    bias=None,
    x3=None,
    comm_quant_scale_1=None,
    comm_quant_scale_2=None,
    reduce_op="sum",
    comm_turn=0,
    group_size=0,
    comm_quant_mode=0,
    out_dtype=None,
    x1_format=None,
    x2_format=None,
    transpose_x2=False,
    implementation=None,
):
    """Quantized matmul + all-reduce, aclnnQuantMatmulAllReduceV4 (seed 003).

    Every row of the seed's tables (Atlas A2: the int8 rows; Ascend 950: all):

    int8 x1/x2, int32 bias, ``out = allReduce(x2_scale * (x1 @ x2 + bias) (* x1_scale) + x3)``
      - packed int64/uint64 ``x2_scale`` (or uint32 pairs) -> float16;
      - float32 ``x2_scale`` with float32 pertoken ``x1_scale`` [m] -> float16;
      - bfloat16 ``x2_scale`` (optionally with ``x1_scale``) -> bfloat16;
      with optional int8 low-bit communication (``comm_quant_scale_1/2`` in
      the output dtype, ascend-semantics §5.1). The output dtype is the one
      the scales select (``out_dtype`` may only repeat it).
    fp8 (float8_e4m3fn / float8_e5m2) or hifloat8 (uint8 codes with
    ``x1_format=x2_format="hifloat8"``) x1/x2, float32 bias, output float16,
    bfloat16 or float32 (``out_dtype``, default bfloat16):
      - pertoken: float32 ``x1_scale`` (m,) and float32 ``x2_scale`` (1,),
        (n,) or (1, n): ``y = f32(x1 @ x2 + bias) * x2_scale * x1_scale``;
      - perchannel / pertensor: packed ``x2_scale`` words, no ``x1_scale``,
        output float16 / bfloat16 (float32 too under the generic target):
        ``y = f32(x1 @ x2 + bias) * fp19(x2_scale)``;
      - perblock: float32 ``x1_scale`` (ceil(m/128), ceil(k/128)) ((b,
        ceil(s/128), ceil(k/128)) for 3-D x1), ``x2_scale`` (ceil(k/128),
        ceil(n/128)) ((ceil(n/128), ceil(k/128)) transposed), no bias,
        ``group_size`` resolving to (128, 128, 128) (``quant.group_size``;
        a 0 field is inferred as dim / scale extent and must divide):
        ``y = sum_kb (x1[:, kb] @ x2[kb, :]) * (x1_scale[i//128, kb] * x2_scale[kb, j//128])``,
        accumulated in fp32 block after block; tail blocks are shorter.
    MX: float8_e4m3fn / float8_e5m2 / float4_e2m1fn x1/x2 with
    float8_e8m0fnu ``x1_scale`` [m, ceil(k/64), 2] and ``x2_scale``
    [n, ceil(k/64), 2] (``quant.mx_quantize``), ``transpose_x2=True`` only,
    ``group_size`` resolving to (1, 1, 32), float4 needs ceil(k/32) even:
    ``y = (x1 * x1_scale) @ (x2 * x2_scale) + bias``.
    Each rank rounds ``y`` half to even to the output dtype, adds ``x3`` in
    fp32 (float16, bfloat16 or float32, the output shape) and rounds again;
    the all-reduce runs in the output dtype. ``comm_quant_mode=1`` (fp8
    x1/x2 with float32 scales: pertoken or perblock) replaces it by the fp8
    pertile chain of ascend-semantics §5.2: ``C = y + x3`` in fp32,
    quantized per 1 x 128 tile (``sc = FP8_MAX / max|tile|``) into x1's fp8
    format, an fp8 all-to-all of the codes with the tile scales appended,
    dequantized (``f32(q) / sc``) and summed in rank order in fp32,
    requantized, an fp8 all-gather, dequantized and rounded to the output.

    Choices where the seed is silent or inconsistent: ``x3`` may have any of
    the three float dtypes in the fp8 / hifloat8 / MX rows (the tables list
    them independently of the output); the hifloat8 perchannel / pertensor
    row accepts a null bias and x3 like the fp8 rows beside it (the table
    omits "null" there); comm_quant_scale_1/2 exist only in the int8 rows;
    with low-bit communication the seed's x3 entry asks for bfloat16 output
    and a non-null x3 while its A2 int8 table lists float16 rows with comm
    scales, so both output dtypes are accepted and x3 stays optional; the
    fp8 / hifloat8 packed rows take int64 as well as uint64 words (the seed
    lists uint64; the bits are the same).
    The fp8 / hifloat8 / MX rows and ``comm_quant_mode=1`` exist on the
    ``ascend-950`` and ``generic`` targets; ``atlas-a2`` raises
    NotImplementedError. Under ``implementation="xla"`` on CPU, XLA may fuse
    ``a * b + c`` into an FMA where no rounding separates them (fp32 output
    with x3, the perblock accumulation), a difference of at most 1 fp32 ulp
    there; the ``ffi`` kernel rounds every step.

    Args:
      x1: [m, k] or [b, s, k]; x2: [k, n] ([n, k] if transpose_x2).
      axis_name: mesh axis name (or tuple of names) bound by an enclosing
        ``shard_map``; None for a group of one (no communication).
      x2_scale, x1_scale: see above.
      bias: [n] (optional), int32 in the int8 rows, float32 in the others
        (none in perblock).
      x3: the output shape (optional), added on every rank before the
        reduction.
      out_dtype: None (the int8 rows' dtype, bfloat16 for the others) or
        float16 / bfloat16 / float32 as the row allows.
      group_size: 0, or ``quant.group_size(m, n, k)`` for perblock / MX.
      comm_quant_mode: 0, or 1 for the fp8 pertile communication.
      x1_format / x2_format: None / "ND", or "hifloat8" for uint8 HiFloat8
        codes (both); ``x2_format="FRACTAL_NZ"`` takes an int8 x2 in the NZ
        layout of ``quant.to_fractal_nz`` (the int8 rows, as seed 003's
        sample; its tables list ND for the other rows): (ceil(n/32),
        ceil(k/16), 16, 32) for x2 (k, n), (ceil(k/32), ceil(n/16), 16, 32)
        for a transposed (n, k); n is the padded extent (n1 * 32, or n1 * 16
        transposed) and the operator converts it back with
        ``quant.from_fractal_nz``.

    Returns:
      [m, n] or [b, s, n], replicated over ``axis_name``: float16 / bfloat16
      as the int8 rows' scales select; ``out_dtype`` (default bfloat16) in
      the other rows.
    """
    for name, value, allowed in (
        ("x1_format", x1_format, _V4_X1_FORMATS),
        ("x2_format", x2_format, _V4_FORMATS),
    ):
        if value not in allowed:
            raise v.value_error(OP_V4, f"{name} must be one of {allowed}, got {value!r}")
    if isinstance(comm_quant_mode, bool) or comm_quant_mode not in (0, 1):
        raise v.value_error(OP_V4, f"comm_quant_mode must be 0 or 1, got {comm_quant_mode!r}")
    if (comm_quant_scale_1 is None) != (comm_quant_scale_2 is None):
        raise v.value_error(
            OP_V4, "comm_quant_scale_1 and comm_quant_scale_2 must be given together"
        )
    hif8 = "hifloat8" in (x1_format, x2_format)
    if hif8 and x1_format != x2_format:
        raise v.type_error(
            OP_V4,
            "x1_format and x2_format must both be 'hifloat8' (the tables pair hifloat8 x1 with "
            f"hifloat8 x2), got {x1_format!r} and {x2_format!r}",
        )
    x1 = x1 if hasattr(x1, "dtype") else jnp.asarray(x1)
    if lowp.is_low_precision(x1, x1_format, x2_format):
        if x2_format == "FRACTAL_NZ":
            raise v.value_error(
                OP_V4,
                "x2_format='FRACTAL_NZ' is accepted for int8 x2 only (seed 003 lists ND x2 for "
                f"the fp8 / hifloat8 / MX rows), got {np.dtype(x1.dtype).name} x1",
            )
        if comm_quant_scale_1 is not None:
            raise v.type_error(
                OP_V4,
                "comm_quant_scale_1/2 (int8 low-bit communication) exist only in the int8 rows; "
                "the fp8 rows communicate in fp8 with comm_quant_mode=1",
            )
        check_reduce_op(OP_V4, reduce_op)
        params = collective_params(OP_V4, axis_name, comm_turn, implementation)
        if out_dtype is None:
            out_dtype = jnp.bfloat16
        try:
            out_dtype = np.dtype(out_dtype)
        except TypeError:
            raise v.type_error(OP_V4, f"out_dtype must be a dtype, got {out_dtype!r}") from None
        return lowp.bind_low_precision(
            x1,
            x2,
            x2_scale=x2_scale,
            x1_scale=x1_scale,
            bias=bias,
            x3=x3,
            hif8=hif8,
            transpose_x2=transpose_x2,
            out_dtype=out_dtype,
            group_size=v.check_int(OP_V4, "group_size", group_size, minimum=0),
            comm_quant_mode=comm_quant_mode,
            params=params,
        )
    if x2_format == "FRACTAL_NZ":
        x2 = nz_weight_to_nd(OP_V4, x1, x2, transpose_x2=transpose_x2, dtypes=(np.int8,))
    if comm_quant_mode == 1:
        raise v.value_error(
            OP_V4, "comm_quant_mode=1 (fp8 pertile communication) needs fp8 x1 and x2, got int8"
        )
    if group_size != 0:
        raise v.value_error(
            OP_V4,
            f"group_size must be 0 unless both scales are at least 2-D (perblock/MX), got "
            f"{group_size!r}",
        )
    comm = None if comm_quant_scale_1 is None else (comm_quant_scale_1, comm_quant_scale_2)
    if out_dtype is not None and np.ndim(x2) == 2:
        # Checked before anything runs (an eager call would compute first).
        scale = x2_scale if isinstance(x2_scale, np.ndarray) else jnp.asarray(x2_scale)
        n = np.shape(x2)[0 if transpose_x2 else 1]
        selected, _ = scale_layout(OP_V4, "x2_scale", scale, n, pertoken=x1_scale is not None)
        if np.dtype(out_dtype) != selected:
            raise v.type_error(
                OP_V4,
                f"out_dtype {np.dtype(out_dtype).name} does not match the int8 row the scales "
                f"select, whose output is {selected.name}",
            )
    out = bind_int8_matmul_all_reduce(
        OP_V4,
        x1,
        x2,
        axis_name,
        dequant_scale=x2_scale,
        pertoken_scale=x1_scale,
        comm_quant_scales=comm,
        bias=bias,
        x3=x3,
        reduce_op=reduce_op,
        comm_turn=comm_turn,
        transpose_x2=transpose_x2,
        implementation=implementation,
    )
    return out
