"""Matmul + all-reduce (seed 004, ``torch_npu.npu_mm_all_reduce_base``).

``out = allReduce(x1 @ x2 + bias + x3)`` over ``axis_name``. ``bias`` and
``x3`` are added on every rank before the reduction, as the CANN kernels do.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_mc2 import _compat, _ffi, _implementation, reference, targets
from jax_mc2 import _validation as v
from jax_mc2.ops._batching import map_over_batch, move_batch_to_front
from jax_mc2.ops._lowering import register_implementations

OP = "mm_all_reduce_base"
_F32 = jnp.float32


# --------------------------------------------------------------------------
# Validation shared by the matmul + all-reduce family


def check_matmul_shapes(op, x1, x2, *, transpose_x2):
    """x1: [m, k] or [b, s, k]; x2: [k, n] ([n, k] if transpose_x2); k >= 1.

    Returns the output shape [m, n] or [b, s, n]."""
    v.check_rank(op, "x1", x1, (2, 3), "(m, k) or (b, s, k)")
    k = x1.shape[-1]
    layout = "(n, k)" if transpose_x2 else "(k, n)"
    if x2.ndim != 2 or (x2.shape[1] if transpose_x2 else x2.shape[0]) != k:
        raise v.type_error(
            op,
            f"x2 must be 2-D {layout} with k == x1.shape[-1] == {k}"
            f"{' (transpose_x2=True)' if transpose_x2 else ''}, got {v.shape_str(x2.shape)}",
        )
    if k == 0:
        raise v.type_error(
            op, f"k must be >= 1 (empty k is not supported), got x1 {v.shape_str(x1.shape)}"
        )
    return (*x1.shape[:-1], x2.shape[0] if transpose_x2 else x2.shape[1])


def check_matmul(op, x1, x2, *, transpose_x2, bias=None, x3=None):
    """Checks the matmul operands; returns the output shape.

    x1: [m, k] or [b, s, k]; x2: [k, n] ([n, k] if transpose_x2); bias: [n];
    x3: the output shape. All share x1's dtype (fp16/bf16; fp32 on generic).
    """
    targets.operator_support(op)  # is the operator on this chip at all?
    v.check_rank(op, "x1", x1, (2, 3), "(m, k) or (b, s, k)")
    targets.check_float_dtype(op, "x1", x1)
    out_shape = check_matmul_shapes(op, x1, x2, transpose_x2=transpose_x2)
    v.check_same_dtype(op, "x2", x2, "x1", x1)
    n = out_shape[-1]
    if bias is not None:
        v.check_shape(op, "bias", bias, (n,), "1-D (n,)")
        v.check_same_dtype(op, "bias", bias, "x1", x1)
    if x3 is not None:
        v.check_shape(op, "x3", x3, out_shape, "the output shape")
        v.check_same_dtype(op, "x3", x3, "x1", x1)
    return out_shape


def check_chip_limits(
    op, x1, out_shape, *, comm_turn, world_size, axis_name, x2=None, limit_n=False
):
    """The current chip target's rules: operator availability, world size,
    comm_turn, size limits and empty tensors. With ``x2`` the quantized
    modes' limit applies to the last dimensions of x1 and x2 (so a transposed
    x2's n may exceed it); ``limit_n`` (weight-only) also applies it to n."""
    support = targets.operator_support(op)
    targets.check_world_size(op, world_size, axis_name)
    name = targets.get_target()
    if comm_turn != 0 and support.comm_turn_zero_only:
        raise v.unsupported(
            op,
            f"comm_turn={comm_turn} is not supported on target {name!r} (CANN accepts only "
            "comm_turn=0); use the 'generic' target to split the communication",
        )
    m = int(np.prod(x1.shape[:-1]))
    dims = {"m": m, "k": x1.shape[-1], "n": out_shape[-1]}
    if support.max_dim is not None:
        for dim, size in dims.items():
            if size > support.max_dim:
                raise v.unsupported(
                    op, f"{dim} = {size} exceeds {support.max_dim} on target {name!r}"
                )
    if support.max_last_dim is not None and x2 is not None:
        for arg, aval in (("x1", x1), ("x2", x2)):
            if aval.shape[-1] > support.max_last_dim:
                raise v.unsupported(
                    op,
                    f"{arg}.shape[-1] = {aval.shape[-1]} exceeds {support.max_last_dim} on "
                    f"target {name!r}",
                )
        if limit_n and out_shape[-1] > support.max_last_dim:
            raise v.unsupported(
                op,
                f"n = {out_shape[-1]} exceeds {support.max_last_dim} in the weight-only mode on "
                f"target {name!r}",
            )
    if support.nonempty_matmul and (m == 0 or dims["n"] == 0):
        raise v.unsupported(
            op,
            f"x1 and x2 must not be empty on target {name!r}, got m = {m}, n = {dims['n']}",
        )


_X2_FORMATS = (None, "ND", "FRACTAL_NZ")


def nz_weight_to_nd(op, x1, x2, *, transpose_x2, dtypes):
    """A FRACTAL_NZ weight x2 as the ND (k, n) (or (n, k)) matrix it holds.

    NZ of the stored 2-D matrix (r, c) is (ceil(c/c0), ceil(r/16), 16, c0)
    with c0 = 32 bytes / itemsize (32 for int8, 16 for fp16/bf16;
    ascend-semantics §9): for x2 (k, n) that is (ceil(n/c0), ceil(k/16), 16,
    c0), for a transposed x2 (n, k) (ceil(k/c0), ceil(n/16), 16, c0). k is
    x1's; n is the padded extent (n1 * c0, or n1 * 16 transposed).
    """
    from jax_mc2 import quant

    x2 = x2 if hasattr(x2, "dtype") else jnp.asarray(x2)
    if np.dtype(x2.dtype) not in tuple(np.dtype(d) for d in dtypes):
        names = ", ".join(np.dtype(d).name for d in dtypes)
        raise v.type_error(
            op, f"a FRACTAL_NZ x2 must be {names} here, got {v.dtype_name(x2.dtype)}"
        )
    c0 = 32 // np.dtype(x2.dtype).itemsize
    k = np.shape(x1)[-1]
    stored = "(n, k)" if transpose_x2 else "(k, n)"
    layout = (
        f"(ceil(k/{c0}), ceil(n/16), 16, {c0})"
        if transpose_x2
        else f"(ceil(n/{c0}), ceil(k/16), 16, {c0})"
    )
    k_blocks = -(-k // c0) if transpose_x2 else -(-k // 16)
    k_axis = 0 if transpose_x2 else 1
    if x2.ndim != 4 or tuple(x2.shape[2:]) != (16, c0) or x2.shape[k_axis] != k_blocks:
        raise v.type_error(
            op,
            f"a FRACTAL_NZ {v.dtype_name(x2.dtype)} x2 storing {stored} must be {layout} with "
            f"k == x1.shape[-1] == {k}, got {v.shape_str(x2.shape)}",
        )
    shape = (x2.shape[1] * 16, k) if transpose_x2 else (k, x2.shape[0] * c0)
    return quant.from_fractal_nz(x2, shape)


def x2_from_format(op, x1, x2, x2_format, *, transpose_x2, dtypes):
    """x2 as an ND matrix: itself for ``x2_format`` None / "ND", converted
    from FRACTAL_NZ (:func:`nz_weight_to_nd`) for "FRACTAL_NZ"."""
    if x2_format not in _X2_FORMATS:
        raise v.value_error(op, f"x2_format must be one of {_X2_FORMATS}, got {x2_format!r}")
    if x2_format != "FRACTAL_NZ":
        return x2
    return nz_weight_to_nd(op, x1, x2, transpose_x2=transpose_x2, dtypes=dtypes)


def check_comm_turn(op, comm_turn):
    return v.check_int(op, "comm_turn", comm_turn, minimum=0)


def reduced_result(
    op, x1, out_shape, out_dtype, operands, *, comm_turn, world_size, axis_name, **limits
):
    """The tail of every matmul + all-reduce abstract eval: the comm_turn and
    chip-target checks (``limits``: check_chip_limits' ``x2`` / ``limit_n``),
    then the output aval (reduced over ``axis_name``) and its effects."""
    check_comm_turn(op, comm_turn)
    check_chip_limits(
        op, x1, out_shape, comm_turn=comm_turn, world_size=world_size, axis_name=axis_name, **limits
    )
    out = _compat.result_aval(x1, out_shape, out_dtype, operands, axis_name)
    return out, _compat.named_axis_effects(axis_name)


def check_reduce_op(op, reduce_op):
    if reduce_op != "sum":
        raise v.value_error(
            op, f"reduce_op must be 'sum' (the only reduction CANN supports), got {reduce_op!r}"
        )


def world_size_of(axis_name: tuple[str, ...]) -> int:
    """Size of the communication group; NameError if a name is unbound."""
    return int(lax.axis_size(axis_name)) if axis_name else 1


def collective_params(op, axis_name, comm_turn, implementation) -> dict:
    """The canonical ``axis_name``, ``world_size``, ``comm_turn`` and
    ``implementation`` parameters every primitive of the family binds with."""
    axes = v.canonical_axis_name(op, axis_name)
    impl = _implementation.requested(op, implementation)
    comm_turn = check_comm_turn(op, comm_turn)
    return {
        "axis_name": axes,
        "world_size": world_size_of(axes),
        "comm_turn": comm_turn,
        "implementation": impl,
    }


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
        return _ffi.matmul(x1_c, x2, bias, x3_c, transpose_x2=transpose_x2, parallelism=parallelism)

    return reference.chunked_matmul_all_reduce(
        local, x1, x3, axis_name=axis_name, comm_turn=comm_turn
    )


def _xla_composition(*operands, transpose_x2, has_bias, has_x3, axis_name, comm_turn):
    x1, x2, bias, x3 = _split_operands(operands, has_bias, has_x3)
    return reference.matmul_all_reduce(
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
    return out, reference.all_reduce(acc.astype(out.dtype), axis_name)


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


# --------------------------------------------------------------------------
# Public function


def mm_all_reduce_base(
    x1,
    x2,
    axis_name,
    *,
    reduce_op="sum",
    bias=None,
    antiquant_scale=None,
    antiquant_offset=None,
    x3=None,
    dequant_scale=None,
    pertoken_scale=None,
    comm_quant_scale_1=None,
    comm_quant_scale_2=None,
    comm_turn=0,
    antiquant_group_size=0,
    transpose_x2=False,
    x2_format=None,
    implementation=None,
):
    """Matmul + all-reduce: ``allReduce(x1 @ x2 + bias + x3)`` over ``axis_name``.

    Modes: non-quantized (float x1 and x2); weight-only quantization (int8 x2
    with antiquant_scale); full quantization (int8 x1 and x2 with
    dequant_scale). Low-bit communication (comm_quant_scale_1/2, full
    quantization only) replaces the all-reduce with the int8 all-to-all,
    sum and all-gather chain.

    Args:
      x1: [m, k] or [b, s, k], float16 or bfloat16 (float32 on the generic target).
      x2: [k, n], or [n, k] with ``transpose_x2=True``; x1's dtype, or int8
        (weight-only and full quantization).
      axis_name: mesh axis name (or tuple of names) bound by an enclosing
        ``shard_map``; None for a group of one (no communication).
      bias: [n], added on every rank before the reduction; x1's dtype, int32
        in full quantization.
      x3: the output shape and dtype, added on every rank before the
        reduction (in full quantization after the dequantization).
      antiquant_scale: weight-only quantization, int8 x2 dequantized as
        ``(x2 + antiquant_offset) * antiquant_scale`` in x1's dtype; pertensor
        (1,), perchannel (n,) / (1, n), or pergroup (ceil(k / G), n) with
        ``antiquant_group_size`` G (a multiple of 32 in [32, k - 1]).
      antiquant_offset: antiquant_scale's shape and dtype (optional).
      dequant_scale: full quantization (int8 x1 and x2, int32 bias):
        ``allReduce(dequant_scale * (x1 @ x2 + bias) (* pertoken_scale) + x3)``
        with packed int64/uint64 words (or uint32 pairs; float16 output),
        bfloat16 (bfloat16 output) or, with pertoken_scale, float32 (float16
        output); shape (1,), (n,) or (1, n).
      pertoken_scale: float32 [m] ([b * s] for 3-D x1), with dequant_scale.
      comm_quant_scale_1, comm_quant_scale_2: (n,) or (1, n) in the output
        dtype, given together, full quantization only: the int8 low-bit
        communication (quantize by scale_1, all-to-all, sum, requantize by
        scale_2, all-gather, dequantize).
      comm_turn: 0, or t > 0 to split the m rows into t chunks, each with its
        own matmul and all-reduce (same result; CANN accepts only 0).
      x2_format: None / "ND", or "FRACTAL_NZ" for x2 in the NZ layout of
        ``quant.to_fractal_nz`` (seed 004 accepts NZ weights in every mode):
        (ceil(n/c0), ceil(k/16), 16, c0) for x2 (k, n), (ceil(k/c0),
        ceil(n/16), 16, c0) for a transposed (n, k), c0 = 32 for int8 and 16
        for float16/bfloat16 (8 for float32); n is the padded extent.
      implementation: "xla", "ffi", "ascend" or None (platform default).

    Returns:
      [m, n] or [b, s, n], replicated over ``axis_name``: x1's dtype
      (non-quantized and weight-only), float16 or bfloat16 as dequant_scale
      selects (full quantization).
    """
    check_reduce_op(OP, reduce_op)
    x2 = x2_from_format(
        OP,
        x1,
        x2,
        x2_format,
        transpose_x2=transpose_x2,
        dtypes=(np.int8, np.float16, jnp.bfloat16, np.float32),
    )
    comm_scales = None
    if comm_quant_scale_1 is not None or comm_quant_scale_2 is not None:
        if comm_quant_scale_1 is None or comm_quant_scale_2 is None:
            raise v.value_error(
                OP, "comm_quant_scale_1 and comm_quant_scale_2 must be given together"
            )
        if dequant_scale is None:
            raise v.value_error(
                OP,
                "low-bit communication (comm_quant_scale_1/2) exists only in the full-"
                "quantization mode (int8 x1 and x2 with dequant_scale)",
            )
        comm_scales = (comm_quant_scale_1, comm_quant_scale_2)
    if antiquant_scale is None and (antiquant_offset is not None or antiquant_group_size != 0):
        raise v.value_error(
            OP, "antiquant_offset and antiquant_group_size need antiquant_scale (weight-only mode)"
        )
    if antiquant_scale is not None:
        if dequant_scale is not None or pertoken_scale is not None:
            raise v.value_error(
                OP,
                "antiquant_scale (weight-only) and dequant_scale/pertoken_scale (full "
                "quantization) are different modes; pass one of them",
            )
        from jax_mc2.ops.weight_quant_matmul_all_reduce import bind_weight_quant

        return bind_weight_quant(
            x1,
            x2,
            scale=antiquant_scale,
            offset=antiquant_offset,
            bias=bias,
            x3=x3,
            group_size=v.check_int(OP, "antiquant_group_size", antiquant_group_size, minimum=0),
            transpose_x2=transpose_x2,
            **collective_params(OP, axis_name, comm_turn, implementation),
        )
    if dequant_scale is not None:
        from jax_mc2.ops.quant_matmul_all_reduce import bind_int8_matmul_all_reduce

        return bind_int8_matmul_all_reduce(
            OP,
            x1,
            x2,
            axis_name,
            dequant_scale=dequant_scale,
            pertoken_scale=pertoken_scale,
            comm_quant_scales=comm_scales,
            bias=bias,
            x3=x3,
            reduce_op=reduce_op,
            comm_turn=comm_turn,
            transpose_x2=transpose_x2,
            implementation=implementation,
        )
    if pertoken_scale is not None:
        raise v.type_error(OP, "pertoken_scale is only used with dequant_scale (full quantization)")
    if np.dtype(getattr(x1, "dtype", np.float32)) == np.dtype(np.int8):
        raise v.type_error(
            OP, "int8 x1 is the full-quantization mode: pass dequant_scale (and int8 x2)"
        )
    params = collective_params(OP, axis_name, comm_turn, implementation)
    operands = [jnp.asarray(a) for a in (x1, x2, bias, x3) if a is not None]
    return mm_all_reduce_p.bind(
        *operands,
        transpose_x2=bool(transpose_x2),
        has_bias=bias is not None,
        has_x3=x3 is not None,
        **params,
    )
