"""The public matmul + all-reduce entry point (seed 004,
``torch_npu.npu_mm_all_reduce_base``): one function, three modes (plain,
weight-only quantized, fully quantized), each its own primitive.

``out = allReduce(x1 @ x2 + bias + x3)`` over ``axis_name``. ``bias`` and
``x3`` are added on every rank before the reduction, as the CANN kernels do.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_mc2.framework import validation
from jax_mc2.framework.collective import collective_params
from jax_mc2.framework.primitive import bind
from jax_mc2.framework.typing import Array, ArrayLike, AxisName, Format, Implementation
from jax_mc2.operators._weight_format import x2_with_format
from jax_mc2.primitives.mm_all_reduce import mm_all_reduce_p
from jax_mc2.primitives.quant_mm_all_reduce import bind_int8_matmul_all_reduce
from jax_mc2.primitives.weight_quant_mm_all_reduce import weight_quant_mm_all_reduce_p

OP = "mm_all_reduce_base"
_X2_DTYPES = (np.int8, np.float16, jnp.bfloat16, np.float32)


def mm_all_reduce_base(
    x1: ArrayLike,
    x2: ArrayLike,
    axis_name: AxisName,
    *,
    reduce_op: str = "sum",
    bias: ArrayLike | None = None,
    antiquant_scale: ArrayLike | None = None,
    antiquant_offset: ArrayLike | None = None,
    x3: ArrayLike | None = None,
    dequant_scale: ArrayLike | None = None,
    pertoken_scale: ArrayLike | None = None,
    comm_quant_scale_1: ArrayLike | None = None,
    comm_quant_scale_2: ArrayLike | None = None,
    comm_turn: int = 0,
    antiquant_group_size: int = 0,
    transpose_x2: bool = False,
    x2_format: Format = None,
    implementation: Implementation = None,
) -> Array:
    """Matmul + all-reduce: ``allReduce(x1 @ x2 + bias + x3)`` over ``axis_name``.

    Three modes, chosen by the arguments (docs/api.md, "mm_all_reduce_base
    modes"): non-quantized (float x1 and x2); weight-only quantization (int8
    x2 with antiquant_scale); full quantization (int8 x1 and x2 with
    dequant_scale), optionally with the int8 low-bit communication.

    Args:
      x1: [m, k] or [b, s, k]: float16 or bfloat16 (float32 on the generic
        target); int8 in full quantization.
      x2: [k, n], or [n, k] with ``transpose_x2=True``; x1's dtype, or int8
        (weight-only and full quantization).
      axis_name: mesh axis name (or tuple of names) bound by an enclosing
        ``shard_map``; None for a group of one (no communication).
      reduce_op: "sum".
      bias: [n], x1's dtype (int32 in full quantization); x3: the output
        shape and dtype. Both are added on every rank before the reduction.
      antiquant_scale, antiquant_offset: weight-only quantization, x1's
        dtype, (1,), (n,) / (1, n), or (ceil(k / G), n) for
        ``antiquant_group_size`` G (0, or a multiple of 32 in [32, k - 1]);
        the offset (optional) has the scale's shape.
      dequant_scale: full quantization, (1,), (n,) or (1, n): packed
        int64/uint64 words or uint32 pairs (float16 output), bfloat16
        (bfloat16 output), or float32 with pertoken_scale (float16 output).
      pertoken_scale: float32 [m] ([b * s] for 3-D x1), with dequant_scale.
      comm_quant_scale_1, comm_quant_scale_2: (n,) or (1, n) in the output
        dtype, together, full quantization only (low-bit communication).
      comm_turn: 0, or t > 0 row chunks, each with its own all-reduce.
      x2_format: None / "ND", or "FRACTAL_NZ" for x2 in the NZ layout of
        ``quant.to_fractal_nz`` (every mode; docs/semantics.md §9), which
        ``implementation="ascend"`` hands CANN as an NZ tensor.
      implementation: "xla", "ffi", "ascend" or None (platform default).

    Returns:
      [m, n] or [b, s, n], replicated over ``axis_name``: x1's dtype
      (non-quantized and weight-only), float16 or bfloat16 as dequant_scale
      selects (full quantization).
    """
    validation.check_reduce_op(OP, reduce_op)
    transpose_x2 = validation.check_bool(OP, "transpose_x2", transpose_x2)
    x2, x2_format, _ = x2_with_format(
        OP, x1, x2, x2_format, transpose_x2=transpose_x2, dtypes=_X2_DTYPES
    )
    comm_scales = _comm_scales(comm_quant_scale_1, comm_quant_scale_2, dequant_scale)
    _check_antiquant_arguments(
        antiquant_scale, antiquant_offset, antiquant_group_size, dequant_scale, pertoken_scale
    )
    common = dict(bias=bias, x3=x3, comm_turn=comm_turn, transpose_x2=transpose_x2)
    common.update(x2_format=x2_format, implementation=implementation)
    if antiquant_scale is not None:
        antiquant = (antiquant_scale, antiquant_offset, antiquant_group_size)
        return _bind_weight_quant(x1, x2, axis_name, antiquant, **common)
    if dequant_scale is not None:
        scales = (dequant_scale, pertoken_scale, comm_scales)
        return _bind_full_quant(x1, x2, axis_name, scales, reduce_op=reduce_op, **common)
    _check_plain_arguments(x1, pertoken_scale)
    return _bind_plain(x1, x2, axis_name, **common)


def _bind_plain(x1, x2, axis_name, *, bias, x3, comm_turn, transpose_x2, x2_format, implementation):
    """The non-quantized mode."""
    return bind(
        mm_all_reduce_p,
        {"x1": x1, "x2": x2, "bias": bias, "x3": x3},
        transpose_x2=bool(transpose_x2),
        x2_format=x2_format,
        **collective_params(OP, axis_name, comm_turn, implementation),
    )


def _bind_weight_quant(
    x1, x2, axis_name, antiquant, *, bias, x3, comm_turn, transpose_x2, x2_format, implementation
):
    """The weight-only mode: ``antiquant`` is (scale, offset, group size)."""
    scale, offset, group_size = antiquant
    return bind(
        weight_quant_mm_all_reduce_p,
        {"x1": x1, "x2": x2, "scale": scale, "offset": offset, "bias": bias, "x3": x3},
        transpose_x2=bool(transpose_x2),
        x2_format=x2_format,
        antiquant_group_size=validation.check_int(
            OP, "antiquant_group_size", group_size, minimum=0
        ),
        **collective_params(OP, axis_name, comm_turn, implementation),
    )


def _bind_full_quant(x1, x2, axis_name, scales, **options):
    """The full-quantization mode, on the int8 primitive: ``scales`` is
    (dequant_scale, pertoken_scale, the comm_quant_scale_1/2 pair or None)."""
    dequant_scale, pertoken_scale, comm_scales = scales
    return bind_int8_matmul_all_reduce(
        OP,
        x1,
        x2,
        axis_name,
        dequant_scale=dequant_scale,
        pertoken_scale=pertoken_scale,
        comm_quant_scales=comm_scales,
        **options,
    )


def _comm_scales(comm_quant_scale_1, comm_quant_scale_2, dequant_scale):
    """The low-bit communication scales (both or neither; full quantization only)."""
    if comm_quant_scale_1 is None and comm_quant_scale_2 is None:
        return None
    if comm_quant_scale_1 is None or comm_quant_scale_2 is None:
        raise validation.value_error(
            OP,
            "comm_quant_scale_1 and comm_quant_scale_2 must be given together, got "
            f"comm_quant_scale_1={validation.describe(comm_quant_scale_1)} and "
            f"comm_quant_scale_2={validation.describe(comm_quant_scale_2)}",
        )
    if dequant_scale is None:
        raise validation.value_error(
            OP,
            "low-bit communication (comm_quant_scale_1/2) exists only in the full-"
            "quantization mode (int8 x1 and x2 with dequant_scale), got comm_quant_scale_1/2 "
            "with dequant_scale=None",
        )
    return (comm_quant_scale_1, comm_quant_scale_2)


def _check_antiquant_arguments(
    antiquant_scale, antiquant_offset, antiquant_group_size, dequant_scale, pertoken_scale
):
    """The weight-only mode's arguments come with antiquant_scale and without
    the full-quantization ones."""
    validation.check_int(OP, "antiquant_group_size", antiquant_group_size, minimum=0)
    if antiquant_scale is None and (antiquant_offset is not None or antiquant_group_size != 0):
        raise validation.value_error(
            OP,
            "antiquant_offset and antiquant_group_size need antiquant_scale (weight-only mode), "
            f"got antiquant_offset={validation.describe(antiquant_offset)} and "
            f"antiquant_group_size={antiquant_group_size!r} with antiquant_scale=None",
        )
    if antiquant_scale is not None and (dequant_scale is not None or pertoken_scale is not None):
        raise validation.value_error(
            OP,
            "antiquant_scale (weight-only) and dequant_scale/pertoken_scale (full "
            "quantization) are different modes; pass one of them, got antiquant_scale="
            f"{validation.describe(antiquant_scale)} with dequant_scale="
            f"{validation.describe(dequant_scale)} and pertoken_scale="
            f"{validation.describe(pertoken_scale)}",
        )


def _check_plain_arguments(x1, pertoken_scale):
    """The non-quantized mode has no pertoken scale and no int8 x1."""
    if pertoken_scale is not None:
        raise validation.type_error(
            OP,
            "pertoken_scale is only used with dequant_scale (full quantization), got "
            f"pertoken_scale={validation.describe(pertoken_scale)} with dequant_scale=None",
        )
    if np.dtype(getattr(x1, "dtype", np.float32)) == np.dtype(np.int8):
        raise validation.type_error(
            OP, "int8 x1 is the full-quantization mode: pass dequant_scale (and int8 x2)"
        )
