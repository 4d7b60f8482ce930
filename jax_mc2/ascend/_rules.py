"""The ``ascend`` lowering rules: one custom call per operator that runs the
whole CANN MC2 operator (no XLA collective). Registered in the lowering table
by primitive name; each rule chooses the aclnn function (and version) the
way torch_npu does for the same arguments and describes its arguments."""

from __future__ import annotations

import jax
import numpy as np

from jax_mc2.ascend import _comms
from jax_mc2.ascend import _spec as S
from jax_mc2.framework import lowering

HOST_BRIDGE = "mc2_ascend_host_bridge"
_PLATFORMS = ("cpu",)


def emit(ctx, operands, *, op: str, function: str, slots, axis_name, aliases=None):
    """The custom call running aclnn ``function`` over ``operands``."""
    group = _comms.for_lowering(ctx, tuple(axis_name or ()))
    rule = jax.ffi.ffi_lowering(HOST_BRIDGE, operand_output_aliases=aliases)
    return rule(ctx, *operands, op=op, function=function, spec=S.encode(slots), group=group)


def weight(index, aval, transpose: bool):
    """x2 as a (k, n) tensor: contiguous [k, n], or the transposed view of an
    [n, k] buffer."""
    return S.transposed_weight(index, aval) if transpose else S.operand(index, aval)


def optional(index, avals):
    return S.NULL if index is None else S.operand(index, avals[index])


class Operands:
    """Hands out operand indices in primitive order."""

    def __init__(self, ctx):
        self.avals = ctx.avals_in
        self.next = 0

    def take(self, present: bool = True):
        if not present:
            return None
        i = self.next
        self.next += 1
        return i

    def tensor(self, present: bool = True):
        return optional(self.take(present), self.avals)


def comm_tail(comm_turn):
    return [S.GROUP, S.string("sum"), S.integer(comm_turn), S.integer(S.STREAM_MODE_STOP_ON_FAILURE)]


# ----------------------------------------------------------------------------
# mm_all_reduce_base (plain): aclnnMatmulAllReduce, or V2 with x3


def _mm_all_reduce(ctx, *operands, transpose_x2, has_bias, has_x3, axis_name, world_size,
                   comm_turn):
    del world_size
    o = Operands(ctx)
    x1 = o.tensor()
    x2i = o.take()
    slots = [x1, weight(x2i, o.avals[x2i], transpose_x2), o.tensor(has_bias)]
    if has_x3:
        slots.append(o.tensor())
    slots += comm_tail(comm_turn) + [S.result(0, ctx.avals_out[0])]
    function = "aclnnMatmulAllReduceV2" if has_x3 else "aclnnMatmulAllReduce"
    return emit(ctx, operands, op="mm_all_reduce_base", function=function, slots=slots,
                axis_name=axis_name)


lowering.register("mc2_mm_all_reduce", "ascend", _mm_all_reduce, platforms=_PLATFORMS)


# ----------------------------------------------------------------------------
# matmul + all-reduce + add + RMSNorm: aclnnMatmulAllReduceAddRmsNorm, or the
# in-place variant that writes y into residual (aliased onto y)


def _mm_all_reduce_add_rms_norm(ctx, *operands, epsilon, transpose_x2, has_bias, inplace,
                                axis_name, world_size, comm_turn):
    del world_size
    avals = ctx.avals_in
    x1, x2, residual, gamma = 0, 1, 2, 3
    bias = 4 if has_bias else None
    slots = [
        S.operand(x1, avals[x1]),
        weight(x2, avals[x2], transpose_x2),
        optional(bias, avals),
        S.operand(residual, avals[residual]),
        S.operand(gamma, avals[gamma]),
        S.double(epsilon),
        *comm_tail(comm_turn),
    ]
    y_aval, norm_aval = ctx.avals_out
    if inplace:
        slots += [S.result(1, norm_aval), S.readback(0, residual)]
        function, op, aliases = (
            "aclnnInplaceMatmulAllReduceAddRmsNorm",
            "inplace_matmul_all_reduce_add_rms_norm",
            {residual: 0},
        )
    else:
        slots += [S.result(0, y_aval), S.result(1, norm_aval)]
        function, op, aliases = (
            "aclnnMatmulAllReduceAddRmsNorm",
            "matmul_all_reduce_add_rms_norm",
            None,
        )
    return emit(ctx, operands, op=op, function=function, slots=slots, axis_name=axis_name,
                aliases=aliases)


lowering.register("mc2_mm_all_reduce_add_rms_norm", "ascend", _mm_all_reduce_add_rms_norm,
                  platforms=_PLATFORMS)


# ----------------------------------------------------------------------------
# int8 x int8: aclnnQuantMatmulAllReduce, V2 with a pertoken scale, V3 with
# the low-bit communication scales (torch_npu's choice of version)


def scale_tensor(index, aval):
    """A dequant scale: uint32 (low, high) pairs [..., 2] travel as one
    UINT64 tensor over the same bytes (little-endian words)."""
    if np.dtype(aval.dtype) == np.dtype(np.uint32) and aval.ndim >= 1 and aval.shape[-1] == 2:
        return S.Tensor("o", index, aval.shape[:-1], "uint64")
    return S.operand(index, aval)


def _quant_mm_all_reduce(ctx, *operands, op, transpose_x2, has_pertoken, has_bias, has_x3,
                         has_comm_scales, axis_name, world_size, comm_turn):
    del world_size
    o = Operands(ctx)
    x1 = o.tensor()
    x2i = o.take()
    x2 = weight(x2i, o.avals[x2i], transpose_x2)
    si = o.take()
    scale = scale_tensor(si, o.avals[si])
    pertoken = o.tensor(has_pertoken)
    bias = o.tensor(has_bias)
    x3 = o.tensor(has_x3)
    slots = [x1, x2, bias, x3, scale]
    if has_comm_scales:
        function = "aclnnQuantMatmulAllReduceV3"
        slots += [pertoken, o.tensor(), o.tensor()]
    elif has_pertoken:
        function = "aclnnQuantMatmulAllReduceV2"
        slots += [pertoken]
    else:
        function = "aclnnQuantMatmulAllReduce"
    slots += comm_tail(comm_turn) + [S.result(0, ctx.avals_out[0])]
    return emit(ctx, operands, op=op, function=function, slots=slots, axis_name=axis_name)


lowering.register("mc2_quant_mm_all_reduce", "ascend", _quant_mm_all_reduce,
                  platforms=_PLATFORMS)


# ----------------------------------------------------------------------------
# weight-only quantization: aclnnWeightQuantMatmulAllReduce


def _weight_quant_mm_all_reduce(ctx, *operands, transpose_x2, has_offset, has_bias, has_x3,
                                group_size, axis_name, world_size, comm_turn):
    del world_size
    o = Operands(ctx)
    x1 = o.tensor()
    x2i = o.take()
    x2 = weight(x2i, o.avals[x2i], transpose_x2)
    scale = o.tensor()
    offset = o.tensor(has_offset)
    bias = o.tensor(has_bias)
    x3 = o.tensor(has_x3)
    slots = [x1, x2, bias, scale, offset, x3, *comm_tail(comm_turn), S.integer(group_size),
             S.result(0, ctx.avals_out[0])]
    return emit(ctx, operands, op="mm_all_reduce_base",
                function="aclnnWeightQuantMatmulAllReduce", slots=slots, axis_name=axis_name)


lowering.register("mc2_weight_quant_mm_all_reduce", "ascend", _weight_quant_mm_all_reduce,
                  platforms=_PLATFORMS)
