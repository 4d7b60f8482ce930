"""The public quantized matmul + all-reduce entry points:
aclnnQuantMatmulAllReduce (seed 000, int8) and aclnnQuantMatmulAllReduceV4
(seed 003: the int8 rows on the int8 primitive, the fp8 / hifloat8 / MX rows
on the low-precision one)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_mc2.framework import validation
from jax_mc2.framework.collective import collective_params
from jax_mc2.framework.typing import Array, ArrayLike, AxisName, DTypeLike, Format, Implementation
from jax_mc2.operators._weight_format import x2_with_format
from jax_mc2.primitives.lowp_quant_mm_all_reduce import bind_low_precision, is_low_precision
from jax_mc2.primitives.quant_mm_all_reduce import bind_int8_matmul_all_reduce, scale_layout

OP = "quant_matmul_all_reduce"


def quant_matmul_all_reduce(
    x1: ArrayLike,
    x2: ArrayLike,
    axis_name: AxisName,
    *,
    dequant_scale: ArrayLike | None,
    bias: ArrayLike | None = None,
    x3: ArrayLike | None = None,
    reduce_op: str = "sum",
    comm_turn: int = 0,
    transpose_x2: bool = False,
    x2_format: Format = None,
    implementation: Implementation = None,
) -> Array:
    """int8 matmul + dequant + x3 + all-reduce (aclnnQuantMatmulAllReduce).

    Args:
      x1: int8 [m, k] or [b, s, k].
      x2: int8 [k, n], or [n, k] with ``transpose_x2=True``; with
        ``x2_format="FRACTAL_NZ"`` the NZ layout of that matrix
        (``quant.to_fractal_nz``), bound in that layout (see
        :func:`mm_all_reduce_base`).
      axis_name: mesh axis name(s) bound by ``shard_map``, or None.
      dequant_scale: packed 64-bit scales from ``quant.trans_quant_param``
        (int64/uint64, or uint32 [..., 2] pairs without x64) -> float16
        output, or bfloat16 -> bfloat16 output; shape (1,), (n,) or (1, n).
      bias: int32 [n], added to the int32 accumulator on every rank. The
        accumulation and ``acc + bias`` are two's-complement int32, as CANN's
        int32 accumulators: a sum past int32 wraps (``127*127*64 +
        (2**31 - 1)`` becomes negative), identically in ``xla`` and ``ffi``
        (docs/semantics.md §10.2).
      x3: the output shape and dtype, added on every rank before the reduction.
      comm_turn: 0, or t > 0 rows chunks with separate all-reduces.

    Returns:
      [m, n] or [b, s, n] float16 or bfloat16, replicated over ``axis_name``.
    """
    transpose_x2 = validation.check_bool(OP, "transpose_x2", transpose_x2)
    x2, x2_format, _ = x2_with_format(
        OP, x1, x2, x2_format, transpose_x2=transpose_x2, dtypes=(np.int8,)
    )
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
        x2_format=x2_format,
        implementation=implementation,
    )


OP_V4 = "quant_matmul_all_reduce_v4"
_V4_FORMATS = (None, "ND", "FRACTAL_NZ", "hifloat8")
_V4_X1_FORMATS = (None, "ND", "hifloat8")


def quant_matmul_all_reduce_v4(
    x1: ArrayLike,
    x2: ArrayLike,
    axis_name: AxisName,
    *,
    x2_scale: ArrayLike,
    x1_scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    x3: ArrayLike | None = None,
    comm_quant_scale_1: ArrayLike | None = None,
    comm_quant_scale_2: ArrayLike | None = None,
    reduce_op: str = "sum",
    comm_turn: int = 0,
    group_size: int = 0,
    comm_quant_mode: int = 0,
    out_dtype: DTypeLike | None = None,
    x1_format: Format = None,
    x2_format: Format = None,
    transpose_x2: bool = False,
    implementation: Implementation = None,
) -> Array:
    """Quantized matmul + all-reduce, aclnnQuantMatmulAllReduceV4 (seed 003).

    The dtypes of x1, x2 and the scales select the row (int8; fp8 / hifloat8
    pertoken, perchannel / pertensor or perblock; MX); each row's shapes,
    formula, rounding and chips are in docs/api.md, "quant_matmul_all_reduce_v4
    rows".

    Args:
      x1: [m, k] or [b, s, k]: int8, float8_e4m3fn / float8_e5m2,
        float4_e2m1fn (MX), or uint8 HiFloat8 codes.
      x2: [k, n] ([n, k] if transpose_x2), of x1's kind.
      axis_name: mesh axis name (or tuple of names) bound by an enclosing
        ``shard_map``; None for a group of one (no communication).
      x2_scale, x1_scale (optional): the row's scales.
      bias: [n] (optional), int32 in the int8 rows, float32 in the others
        (none in perblock). x3: the output shape (optional), added on every
        rank before the reduction.
      comm_quant_scale_1, comm_quant_scale_2: (n,) or (1, n) in the output
        dtype, together, int8 rows only (int8 low-bit communication).
      reduce_op: "sum". comm_turn: 0, or t > 0 row chunks.
      group_size: 0, or ``quant.group_size(m, n, k)`` for perblock / MX.
      comm_quant_mode: 0, or 1 for the fp8 pertile communication.
      out_dtype: None (the int8 rows' dtype, bfloat16 for the others) or
        float16 / bfloat16 / float32 as the row allows.
      x1_format / x2_format: None / "ND", or "hifloat8" (both) for uint8
        HiFloat8 codes; ``x2_format="FRACTAL_NZ"``: an int8 x2 in the NZ
        layout of ``quant.to_fractal_nz`` (the int8 rows only; bound in that
        layout, as :func:`mm_all_reduce_base` does).
      implementation: "xla", "ffi", "ascend" or None (platform default).

    Returns:
      [m, n] or [b, s, n] in the row's output dtype, replicated over
      ``axis_name``.
    """
    validation.check_given(OP_V4, x1=x1, x2=x2, x2_scale=x2_scale)
    transpose_x2 = validation.check_bool(OP_V4, "transpose_x2", transpose_x2)
    hif8 = _check_v4_call(
        x1_format, x2_format, comm_quant_mode, comm_quant_scale_1, comm_quant_scale_2
    )
    x1 = x1 if hasattr(x1, "dtype") else jnp.asarray(x1)
    call = {
        "x2_scale": x2_scale,
        "x1_scale": x1_scale,
        "bias": bias,
        "x3": x3,
        "reduce_op": reduce_op,
        "comm_turn": comm_turn,
        "group_size": group_size,
        "comm_quant_mode": comm_quant_mode,
        "out_dtype": out_dtype,
        "x2_format": x2_format,
        "transpose_x2": transpose_x2,
        "implementation": implementation,
    }
    if is_low_precision(x1, x1_format, x2_format):
        comm = comm_quant_scale_1 is not None
        return _low_precision_rows(x1, x2, axis_name, has_comm_scales=comm, hif8=hif8, **call)
    comm = None if comm_quant_scale_1 is None else (comm_quant_scale_1, comm_quant_scale_2)
    return _int8_rows(x1, x2, axis_name, comm_quant_scales=comm, **call)


def _int8_rows(
    x1,
    x2,
    axis_name,
    *,
    x2_scale,
    x1_scale,
    comm_quant_scales,
    group_size,
    comm_quant_mode,
    out_dtype,
    x2_format,
    transpose_x2,
    **common,
):
    """The int8 rows: an NZ weight checked, their call checks, then the bind
    (``common``: bias, x3, reduce_op, comm_turn, implementation)."""
    x2, x2_format, stored = x2_with_format(
        OP_V4, x1, x2, x2_format, transpose_x2=transpose_x2, dtypes=(np.int8,)
    )
    _check_int8_row_statics(comm_quant_mode, group_size)
    if out_dtype is not None and len(stored) == 2:
        # Checked before anything runs (an eager call would compute first).
        n = stored[0 if transpose_x2 else 1]
        _check_int8_out_dtype(out_dtype, n, x2_scale, x1_scale)
    return bind_int8_matmul_all_reduce(
        OP_V4,
        x1,
        x2,
        axis_name,
        dequant_scale=x2_scale,
        pertoken_scale=x1_scale,
        comm_quant_scales=comm_quant_scales,
        transpose_x2=transpose_x2,
        x2_format=x2_format,
        **common,
    )


def _check_v4_call(x1_format, x2_format, comm_quant_mode, comm_quant_scale_1, comm_quant_scale_2):
    """The static arguments every V4 row shares; returns whether x1/x2 are
    HiFloat8 codes."""
    for name, value, allowed in (
        ("x1_format", x1_format, _V4_X1_FORMATS),
        ("x2_format", x2_format, _V4_FORMATS),
    ):
        if value not in allowed:
            raise validation.value_error(OP_V4, f"{name} must be one of {allowed}, got {value!r}")
    if isinstance(comm_quant_mode, bool) or comm_quant_mode not in (0, 1):
        raise validation.value_error(
            OP_V4, f"comm_quant_mode must be 0 or 1, got {comm_quant_mode!r}"
        )
    if (comm_quant_scale_1 is None) != (comm_quant_scale_2 is None):
        raise validation.value_error(
            OP_V4,
            "comm_quant_scale_1 and comm_quant_scale_2 must be given together, got "
            f"comm_quant_scale_1={validation.describe(comm_quant_scale_1)} and "
            f"comm_quant_scale_2={validation.describe(comm_quant_scale_2)}",
        )
    hif8 = "hifloat8" in (x1_format, x2_format)
    if hif8 and x1_format != x2_format:
        raise validation.type_error(
            OP_V4,
            "x1_format and x2_format must both be 'hifloat8' (the tables pair hifloat8 x1 with "
            f"hifloat8 x2), got {x1_format!r} and {x2_format!r}",
        )
    return hif8


def _low_precision_rows(
    x1,
    x2,
    axis_name,
    *,
    x2_scale,
    x1_scale,
    bias,
    x3,
    has_comm_scales,
    reduce_op,
    comm_turn,
    group_size,
    comm_quant_mode,
    out_dtype,
    x2_format,
    hif8,
    transpose_x2,
    implementation,
):
    """The fp8 / hifloat8 / MX rows: their call checks, then the bind."""
    if x2_format == "FRACTAL_NZ":
        raise validation.value_error(
            OP_V4,
            "x2_format='FRACTAL_NZ' is accepted for int8 x2 only (seed 003 lists ND x2 for "
            f"the fp8 / hifloat8 / MX rows), got {np.dtype(x1.dtype).name} x1",
        )
    if has_comm_scales:
        raise validation.type_error(
            OP_V4,
            "comm_quant_scale_1/2 (int8 low-bit communication) exist only in the int8 rows; "
            "the fp8 rows communicate in fp8 with comm_quant_mode=1",
        )
    validation.check_reduce_op(OP_V4, reduce_op)
    params = collective_params(OP_V4, axis_name, comm_turn, implementation)
    if out_dtype is None:
        out_dtype = jnp.bfloat16
    out_dtype = validation.check_dtype(OP_V4, "out_dtype", out_dtype)
    named = {"x1": x1, "x2": x2, "x2_scale": x2_scale, "x1_scale": x1_scale, "bias": bias, "x3": x3}
    return bind_low_precision(
        named,
        params,
        hif8=hif8,
        transpose_x2=transpose_x2,
        out_dtype=out_dtype,
        group_size=validation.check_int(OP_V4, "group_size", group_size, minimum=0),
        comm_quant_mode=comm_quant_mode,
    )


def _check_int8_row_statics(comm_quant_mode, group_size):
    group_size = validation.check_int(OP_V4, "group_size", group_size, minimum=0)
    if comm_quant_mode == 1:
        raise validation.value_error(
            OP_V4, "comm_quant_mode=1 (fp8 pertile communication) needs fp8 x1 and x2, got int8"
        )
    if group_size != 0:
        raise validation.value_error(
            OP_V4,
            f"group_size must be 0 unless both scales are at least 2-D (perblock/MX), got "
            f"{group_size!r}",
        )


def _check_int8_out_dtype(out_dtype, n, x2_scale, x1_scale):
    """``out_dtype`` may only repeat the output dtype the int8 row's scales
    select (``n``: the weight's column count)."""
    out_dtype = validation.check_dtype(OP_V4, "out_dtype", out_dtype)
    scale = x2_scale if isinstance(x2_scale, np.ndarray) else jnp.asarray(x2_scale)
    selected, _ = scale_layout(OP_V4, "x2_scale", scale, n, pertoken=x1_scale is not None)
    if out_dtype != selected:
        raise validation.type_error(
            OP_V4,
            f"out_dtype {out_dtype.name} does not match the int8 row the scales "
            f"select, whose output is {selected.name}",
        )
