"""The ``ascend`` lowering rules: one custom call per operator that runs the
whole CANN MC2 operator (no XLA collective). Registered in the lowering table
by primitive name; each rule chooses the aclnn function (and version) the
way torch_npu does for the same arguments and describes its arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_mc2.ascend import _comms
from jax_mc2.ascend import _spec as S
from jax_mc2.framework import _compat, lowering

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
    stream_mode = S.integer(S.STREAM_MODE_STOP_ON_FAILURE)
    return [S.GROUP, S.string("sum"), S.integer(comm_turn), stream_mode]


# ----------------------------------------------------------------------------
# mm_all_reduce_base (plain): aclnnMatmulAllReduce, or V2 with x3


def _mm_all_reduce(
    ctx, *operands, transpose_x2, has_bias, has_x3, axis_name, world_size, comm_turn
):
    del world_size
    o = Operands(ctx)
    x1 = o.tensor()
    x2i = o.take()
    slots = [x1, weight(x2i, o.avals[x2i], transpose_x2), o.tensor(has_bias)]
    if has_x3:
        slots.append(o.tensor())
    slots += comm_tail(comm_turn) + [S.result(0, ctx.avals_out[0])]
    function = "aclnnMatmulAllReduceV2" if has_x3 else "aclnnMatmulAllReduce"
    return emit(
        ctx, operands, op="mm_all_reduce_base", function=function, slots=slots, axis_name=axis_name
    )


lowering.register("mc2_mm_all_reduce", "ascend", _mm_all_reduce, platforms=_PLATFORMS)


# ----------------------------------------------------------------------------
# matmul + all-reduce + add + RMSNorm: aclnnMatmulAllReduceAddRmsNorm, or the
# in-place variant that writes y into residual (aliased onto y)


def _mm_all_reduce_add_rms_norm(
    ctx, *operands, epsilon, transpose_x2, has_bias, inplace, axis_name, world_size, comm_turn
):
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
    return emit(
        ctx, operands, op=op, function=function, slots=slots, axis_name=axis_name, aliases=aliases
    )


lowering.register(
    "mc2_mm_all_reduce_add_rms_norm", "ascend", _mm_all_reduce_add_rms_norm, platforms=_PLATFORMS
)


# ----------------------------------------------------------------------------
# int8 x int8: aclnnQuantMatmulAllReduce, V2 with a pertoken scale, V3 with
# the low-bit communication scales (torch_npu's choice of version)


def scale_tensor(index, aval):
    """A dequant scale: uint32 (low, high) pairs [..., 2] travel as one
    UINT64 tensor over the same bytes (little-endian words)."""
    if np.dtype(aval.dtype) == np.dtype(np.uint32) and aval.ndim >= 1 and aval.shape[-1] == 2:
        return S.Tensor("o", index, aval.shape[:-1], "uint64")
    return S.operand(index, aval)


def _quant_mm_all_reduce(
    ctx,
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
):
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


lowering.register("mc2_quant_mm_all_reduce", "ascend", _quant_mm_all_reduce, platforms=_PLATFORMS)


# ----------------------------------------------------------------------------
# weight-only quantization: aclnnWeightQuantMatmulAllReduce


def _weight_quant_mm_all_reduce(
    ctx,
    *operands,
    transpose_x2,
    has_offset,
    has_bias,
    has_x3,
    group_size,
    axis_name,
    world_size,
    comm_turn,
):
    del world_size
    o = Operands(ctx)
    x1 = o.tensor()
    x2i = o.take()
    x2 = weight(x2i, o.avals[x2i], transpose_x2)
    scale = o.tensor()
    offset = o.tensor(has_offset)
    bias = o.tensor(has_bias)
    x3 = o.tensor(has_x3)
    slots = [
        x1,
        x2,
        bias,
        scale,
        offset,
        x3,
        *comm_tail(comm_turn),
        S.integer(group_size),
        S.result(0, ctx.avals_out[0]),
    ]
    return emit(
        ctx,
        operands,
        op="mm_all_reduce_base",
        function="aclnnWeightQuantMatmulAllReduce",
        slots=slots,
        axis_name=axis_name,
    )


lowering.register(
    "mc2_weight_quant_mm_all_reduce", "ascend", _weight_quant_mm_all_reduce, platforms=_PLATFORMS
)


# ----------------------------------------------------------------------------
# AlltoAllv + grouped matmul (dispatch) and grouped matmul + AlltoAllv
# (combine). CANN takes host count arrays, so only static counts lower; each
# rank gets its own argument spec (its counts, and views of the first
# sum(sendCounts) input rows / sum(recvCounts) output rows; the padding rows
# of the output are zero).


def _recv_table(table, world, experts):
    t = np.asarray(table).reshape(world, world, experts)
    return t.transpose(1, 0, 2).reshape(world, world * experts)


def _rows_view(src, index, aval, rows):
    """The first ``rows`` rows of a 2-D buffer."""
    return S.Tensor(src, index, (rows, aval.shape[1]), aval.dtype, storage=aval.shape)


def _alltoallv_gmm(dispatch: bool):
    op = "alltoallv_grouped_matmul" if dispatch else "grouped_matmul_alltoallv"
    function = "aclnnAlltoAllvGroupedMatMul" if dispatch else "aclnnGroupedMatMulAlltoAllv"

    def rule(
        ctx,
        *operands,
        send_table,
        experts,
        peer_capacity,
        out_rows,
        trans_weight,
        trans_mm_weight,
        has_weight,
        has_mm,
        permute_out,
        axis_name,
        world_size,
    ):
        del peer_capacity, out_rows
        if send_table is None:
            raise NotImplementedError(
                f"{op}: implementation='ascend' needs static send_counts (NumPy/Python "
                f"integers): {function} takes host count arrays (aclIntArray), not device "
                "tensors; use implementation='ffi' or 'xla' for traced counts"
            )
        if not has_weight:
            raise NotImplementedError(
                f"{op}: implementation='ascend' has no data-movement-only lowering (the "
                "transpose used by reverse-mode differentiation of this operator)"
            )
        avals, outs = ctx.avals_in, ctx.avals_out
        x, w = 0, 1
        mm_x, mm_w = (2, 3) if has_mm else (None, None)
        table = np.asarray(send_table, np.int64)
        recv = _recv_table(table, world_size, experts)
        empty = [r for r in range(world_size) if table[r].sum() == 0]
        if empty:
            raise NotImplementedError(
                f"{op}: implementation='ascend': {function} needs every rank to send at least "
                f"one row (sum(send_counts) in (0, 52428800)); rank {empty[0]} sends none"
            )
        specs = []
        for r in range(world_size):
            sent, received = int(table[r].sum()), int(recv[r].sum())
            slots = [
                _rows_view("o", x, avals[x], sent),
                S.operand(w, avals[w]),
                S.NULL,
                S.NULL,
                optional(mm_x, avals),
                optional(mm_w, avals),
                S.GROUP,
                S.integer(world_size),
                S.int_array(table[r]),
                S.int_array(recv[r]),
                S.boolean(trans_weight),
                S.boolean(trans_mm_weight),
            ]
            if dispatch:
                slots.append(S.boolean(permute_out))
            slots.append(_rows_view("r", 0, outs[0], received))
            row_bytes = outs[0].shape[1] * np.dtype(outs[0].dtype).itemsize
            partial = [f"c0={received * row_bytes}"]
            slots.append(S.result(1, outs[1]) if has_mm else S.NULL)
            if dispatch:
                if permute_out:
                    p = len(outs) - 1
                    slots.append(_rows_view("r", p, outs[p], received))
                    pbytes = outs[p].shape[1] * np.dtype(outs[p].dtype).itemsize
                    partial.append(f"c{p}={received * pbytes}")
                else:
                    slots.append(S.NULL)
            specs.append(S.encode(slots + partial))
        group = _comms.for_lowering(ctx, tuple(axis_name or ()))
        lower = jax.ffi.ffi_lowering(HOST_BRIDGE)
        return lower(ctx, *operands, op=op, function=function, spec="\n".join(specs), group=group)

    return rule


lowering.register(
    "mc2_alltoallv_grouped_matmul", "ascend", _alltoallv_gmm(True), platforms=_PLATFORMS
)
lowering.register(
    "mc2_grouped_matmul_alltoallv", "ascend", _alltoallv_gmm(False), platforms=_PLATFORMS
)


# ----------------------------------------------------------------------------
# V4 low-precision rows (fp8 / hifloat8 / MX / perblock):
# aclnnQuantMatmulAllReduceV4 (torch_npu's choice for fp8/hif8/fp4 x1)


def _packed_fp4_shape(shape):
    """The packed buffer's shape, of the same rank: the last axis halved, or
    (1, ..., 1, ceil(size / 2)) where the last axis is odd."""
    if shape and shape[-1] % 2 == 0:
        return (*shape[:-1], shape[-1] // 2)
    return (*(1,) * (len(shape) - 1), (int(np.prod(shape)) + 1) // 2)


def _pack_fp4(x):
    """fp4 values (one per byte in JAX) as CANN's FLOAT4_E2M1 storage: the
    array's elements in row-major order (so along the contiguous last axis),
    two per byte, the even element in the low nibble; an odd count ends in a
    zero high nibble."""
    codes = jax.lax.convert_element_type(jax.lax.bitcast_convert_type(x, jnp.uint4), jnp.uint8)
    codes = codes.reshape(-1)
    if codes.shape[0] % 2:
        codes = jnp.concatenate([codes, jnp.zeros((1,), jnp.uint8)])
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).reshape(_packed_fp4_shape(x.shape))


def _pack_fp4_operands(ctx, operands, indices):
    """``ctx`` and ``operands`` with the fp4 operands at ``indices`` packed
    two per byte (uint8 buffers of half the elements, rounded up)."""
    avals_in = list(ctx.avals_in)
    operands = list(operands)
    for i in indices:
        aval = avals_in[i]
        packed = aval.update(shape=_packed_fp4_shape(aval.shape), dtype=np.dtype(np.uint8))
        sub = ctx.replace(primitive=None, avals_in=[aval], avals_out=[packed])
        (operands[i],) = _compat.lower_fun(_pack_fp4, multiple_results=False)(sub, operands[i])
        avals_in[i] = packed
    return ctx.replace(avals_in=avals_in), operands


def _lowp_quant_mm_all_reduce(
    ctx,
    *operands,
    hif8,
    transpose_x2,
    out_dtype,
    group_size,
    comm_quant_mode,
    has_x1_scale,
    has_bias,
    has_x3,
    axis_name,
    world_size,
    comm_turn,
):
    del world_size, out_dtype
    op = "quant_matmul_all_reduce_v4"
    avals = ctx.avals_in
    if np.dtype(avals[0].dtype).name == "float4_e2m1fn":
        # x1 and x2 (the MX rows take both in fp4): the descriptors keep the
        # logical fp4 dims and element strides; the buffers become packed bytes.
        ctx, operands = _pack_fp4_operands(ctx, operands, (0, 1))
    o = Operands(ctx)
    code = {"dtype_code": S._codes.ACL_DTYPE["hifloat8"]} if hif8 else {}
    x1i = o.take()
    x1 = S.operand(x1i, avals[x1i], **code)
    x2i = o.take()
    if transpose_x2:
        n, k = avals[x2i].shape
        x2 = S.Tensor("o", x2i, (k, n), avals[x2i].dtype, strides=(1, k), storage=(n * k,), **code)
    else:
        x2 = S.operand(x2i, avals[x2i], **code)
    si = o.take()
    x2_scale = scale_tensor(si, avals[si])
    x1_scale = o.tensor(has_x1_scale)
    bias = o.tensor(has_bias)
    x3 = o.tensor(has_x3)
    slots = [
        x1,
        x2,
        bias,
        x3,
        x1_scale,
        x2_scale,
        S.NULL,
        S.NULL,
        *comm_tail(comm_turn),
        S.integer(group_size),
        S.integer(comm_quant_mode),
        S.result(0, ctx.avals_out[0]),
    ]
    return emit(
        ctx,
        operands,
        op=op,
        function="aclnnQuantMatmulAllReduceV4",
        slots=slots,
        axis_name=axis_name,
    )


lowering.register(
    "mc2_lowp_quant_mm_all_reduce", "ascend", _lowp_quant_mm_all_reduce, platforms=_PLATFORMS
)
