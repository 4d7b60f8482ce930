"""The ``ascend`` lowering rules: one custom call per operator that runs the
whole CANN MC2 operator (no XLA collective). Registered in the lowering table
by primitive name; each rule chooses the aclnn function (and version) the
way torch_npu does for the same arguments and describes its arguments.

A rule reads the call's operands by name through the primitive's own spec
(``SPECS[name].split``), so the operand lists and presence flags live in the
primitive alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_mc2.ascend import _codes, _comms
from jax_mc2.ascend import _spec as S
from jax_mc2.ascend._native import native as _mc2_ascend
from jax_mc2.framework import _compat, lowering, validation, weight_format
from jax_mc2.framework import implementation as _implementation
from jax_mc2.framework.primitive import SPECS
from jax_mc2.framework.quant import is_packed_scale

HOST_BRIDGE = "mc2_ascend_host_bridge"
_PLATFORMS = ("cpu",)
_FLOAT32 = np.dtype(np.float32)


class Call:
    """One call being lowered: its parameters, the operator it serves (for
    messages) and its operands' indices by name, from the primitive's spec."""

    def __init__(self, primitive_name: str, ctx, params):
        spec = SPECS[primitive_name]
        self.params = params
        self.op = spec.operator_name(params)
        self.avals = ctx.avals_in
        self.index = spec.split(range(len(self.avals)), params)

    def present(self, name: str) -> bool:
        return self.index[name] is not None

    def aval(self, name: str):
        return self.avals[self.index[name]]

    def tensor(self, name: str, **kw):
        """The operand's tensor slot; the null slot for an absent optional one."""
        if not self.present(name):
            return S.NULL
        return S.operand(self.index[name], self.aval(name), **kw)

    def weight(self, name: str = "x2", **kw):
        """x2 as a (k, n) tensor: contiguous [k, n], or (``transpose_x2``) the
        transposed view of an [n, k] buffer; with ``x2_format`` FRACTAL_NZ
        the (k, n) view over the NZ buffer (``_spec.nz_weight``)."""
        if self.params.get("x2_format") == weight_format.FRACTAL_NZ:
            k = self.aval("x1").shape[-1]
            transpose = bool(self.params["transpose_x2"])
            return S.nz_weight(
                self.index[name], self.aval(name), k, transpose_x2=transpose, op=self.op, **kw
            )
        if self.params["transpose_x2"]:
            return S.transposed_weight(self.index[name], self.aval(name), **kw)
        return self.tensor(name, **kw)

    def scale(self, name: str):
        """A dequant scale: uint32 (low, high) pairs [..., 2] travel as one
        UINT64 tensor over the same bytes (little-endian words)."""
        aval = self.aval(name)
        if np.dtype(aval.dtype) == np.dtype(np.uint32) and is_packed_scale(aval):
            return S.Tensor("o", self.index[name], aval.shape[:-1], "uint64")
        return self.tensor(name)

    def comm_tail(self):
        """group, reduceOp, commTurn, streamMode."""
        stream_mode = S.integer(S.STREAM_MODE_STOP_ON_FAILURE)
        return [S.GROUP, S.string("sum"), S.integer(self.params["comm_turn"]), stream_mode]

    def require_half(self, name: str, function: str) -> None:
        """CANN's ``function`` takes ``name`` in float16 / bfloat16 only. The
        'generic' target also accepts float32 (for the other
        implementations); the ascend lowering refuses it here rather than
        leave it to CANN's phase 1 at run time."""
        aval = self.aval(name)
        if np.dtype(aval.dtype) == _FLOAT32:
            raise validation.unsupported(
                self.op,
                f"implementation='ascend' takes {name} as float16 or bfloat16 ({function} has "
                f"no float32 kernel), got {validation.describe(aval)}; float32 runs with "
                "implementation='ffi' or 'xla' under the 'generic' target",
            )


def emit(ctx, operands, call: Call, function: str, spec: str, aliases=None):
    """The custom call running aclnn ``function`` over ``operands``, its
    arguments described by ``spec`` (one line per rank where they differ)."""
    group = _comms.for_lowering(ctx, tuple(call.params["axis_name"] or ()))
    rule = jax.ffi.ffi_lowering(HOST_BRIDGE, operand_output_aliases=aliases)
    return rule(ctx, *operands, op=call.op, function=function, spec=spec, group=group)


def ascend_rule(primitive_name: str):
    """Registers ``build(ctx, operands, call)`` as the ascend lowering of the
    primitive named ``primitive_name``."""

    def register(build):
        def rule(ctx, *operands, **params):
            return build(ctx, operands, Call(primitive_name, ctx, params))

        lowering.register(primitive_name, "ascend", rule, platforms=_PLATFORMS)
        return build

    return register


# ----------------------------------------------------------------------------
# mm_all_reduce_base (plain): aclnnMatmulAllReduce, or V2 with x3


@ascend_rule("mc2_mm_all_reduce")
def _mm_all_reduce(ctx, operands, call: Call):
    function = "aclnnMatmulAllReduceV2" if call.present("x3") else "aclnnMatmulAllReduce"
    call.require_half("x1", function)
    slots = [call.tensor("x1"), call.weight(), call.tensor("bias")]
    if call.present("x3"):
        slots.append(call.tensor("x3"))
    slots += call.comm_tail() + [S.result(0, ctx.avals_out[0])]
    return emit(ctx, operands, call, function, S.encode(slots))


# ----------------------------------------------------------------------------
# matmul + all-reduce + add + RMSNorm: aclnnMatmulAllReduceAddRmsNorm, or the
# in-place variant that writes y into residual (aliased onto y)


@ascend_rule("mc2_mm_all_reduce_add_rms_norm")
def _mm_all_reduce_add_rms_norm(ctx, operands, call: Call):
    inplace = call.params["inplace"]
    function = (
        "aclnnInplaceMatmulAllReduceAddRmsNorm" if inplace else "aclnnMatmulAllReduceAddRmsNorm"
    )
    call.require_half("x1", function)
    slots = [
        call.tensor("x1"),
        call.weight(),
        call.tensor("bias"),
        call.tensor("residual"),
        call.tensor("gamma"),
        S.double(call.params["epsilon"]),
        *call.comm_tail(),
    ]
    y_aval, norm_aval = ctx.avals_out
    residual = call.index["residual"]
    if inplace:
        slots += [S.result(1, norm_aval), S.readback(0, residual)]
        aliases = {residual: 0}
    else:
        slots += [S.result(0, y_aval), S.result(1, norm_aval)]
        aliases = None
    return emit(ctx, operands, call, function, S.encode(slots), aliases)


# ----------------------------------------------------------------------------
# int8 x int8: aclnnQuantMatmulAllReduce, V2 with a pertoken scale, V3 with
# the low-bit communication scales (torch_npu's choice of version)


@ascend_rule("mc2_quant_mm_all_reduce")
def _quant_mm_all_reduce(ctx, operands, call: Call):
    pertoken = call.tensor("pertoken")
    slots = [
        call.tensor("x1"),
        call.weight(),
        call.tensor("bias"),
        call.tensor("x3"),
        call.scale("scale"),
    ]
    if call.present("comm_scale_1"):
        function = "aclnnQuantMatmulAllReduceV3"
        slots += [pertoken, call.tensor("comm_scale_1"), call.tensor("comm_scale_2")]
    elif call.present("pertoken"):
        function = "aclnnQuantMatmulAllReduceV2"
        slots += [pertoken]
    else:
        function = "aclnnQuantMatmulAllReduce"
    slots += call.comm_tail() + [S.result(0, ctx.avals_out[0])]
    return emit(ctx, operands, call, function, S.encode(slots))


# ----------------------------------------------------------------------------
# weight-only quantization: aclnnWeightQuantMatmulAllReduce


@ascend_rule("mc2_weight_quant_mm_all_reduce")
def _weight_quant_mm_all_reduce(ctx, operands, call: Call):
    function = "aclnnWeightQuantMatmulAllReduce"
    call.require_half("x1", function)
    slots = [
        call.tensor("x1"),
        call.weight(),
        call.tensor("bias"),
        call.tensor("scale"),
        call.tensor("offset"),
        call.tensor("x3"),
        *call.comm_tail(),
        S.integer(call.params["antiquant_group_size"]),
        S.result(0, ctx.avals_out[0]),
    ]
    return emit(ctx, operands, call, function, S.encode(slots))


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


def _traced_counts_refused(op: str, takes: str) -> NotImplementedError:
    return NotImplementedError(
        f"{op}: implementation='ascend' needs static send_counts (NumPy/Python integers): "
        f"{takes}, not device tensors; use implementation='ffi' or 'xla' for traced counts"
    )


def _static_table(call: Call, function: str, arrays: str):
    """The static count table; traced counts are refused (``function`` takes
    host count arrays, ``arrays``)."""
    if call.params["send_table"] is None:
        raise _traced_counts_refused(call.op, f"{function} takes host count arrays ({arrays})")
    return np.asarray(call.params["send_table"], np.int64)


@ascend_rule("mc2_check_counts")
def _check_counts(ctx, operands, call: Call):
    # Only traced counts (given recv_counts checked against the peers' send
    # counts) bind this check, and it lowers before the operator itself.
    raise _traced_counts_refused(call.op, "CANN's AlltoAllv operators take host count arrays")


def _alltoallv_table(call: Call, function: str):
    """The static count table, after the refusals of what CANN cannot run."""
    op, params = call.op, call.params
    table = _static_table(call, function, "aclIntArray")
    empty = [r for r in range(params["world_size"]) if table[r].sum() == 0]
    if empty:
        raise NotImplementedError(
            f"{op}: implementation='ascend': {function} needs every rank to send at least "
            f"one row (sum(send_counts) in (0, 52428800)); rank {empty[0]} sends none"
        )
    call.require_half("gmm_x", function)
    return table


def _alltoallv_rank_spec(ctx, call: Call, dispatch: bool, sends, receives) -> str:
    """One rank's argument spec: it sends ``sends`` (its count row) and
    receives ``receives``."""
    params, outs = call.params, ctx.avals_out
    sent, received = int(np.sum(sends)), int(np.sum(receives))
    slots = [
        _rows_view("o", call.index["gmm_x"], call.aval("gmm_x"), sent),
        call.tensor("gmm_weight"),
        S.NULL,
        S.NULL,
        call.tensor("mm_x"),
        call.tensor("mm_weight"),
        S.GROUP,
        S.integer(params["world_size"]),
        S.int_array(sends),
        S.int_array(receives),
        S.boolean(params["trans_weight"]),
        # CANN refuses trans_mm_weight = true without the shared expert.
        S.boolean(params["trans_mm_weight"] and call.present("mm_x")),
    ]
    if dispatch:
        slots.append(S.boolean(params["permute_out"]))
    slots.append(_rows_view("r", 0, outs[0], received))
    partial = [f"c0={received * S.nbytes(outs[0].shape[1:], outs[0].dtype)}"]
    slots.append(S.result(1, outs[1]) if call.present("mm_x") else S.NULL)
    if dispatch and params["permute_out"]:
        p = len(outs) - 1
        slots.append(_rows_view("r", p, outs[p], received))
        partial.append(f"c{p}={received * S.nbytes(outs[p].shape[1:], outs[p].dtype)}")
    elif dispatch:
        slots.append(S.NULL)
    return S.encode(slots + partial)


def _alltoallv_gmm(function: str, dispatch: bool):
    def build(ctx, operands, call: Call):
        if not call.present("gmm_weight"):
            return _data_movement(ctx, operands, call, dispatch)
        table = _alltoallv_table(call, function)
        world = call.params["world_size"]
        recv = _recv_table(table, world, call.params["experts"])
        specs = [_alltoallv_rank_spec(ctx, call, dispatch, table[r], recv[r]) for r in range(world)]
        return emit(ctx, operands, call, function, "\n".join(specs))

    return build


ascend_rule("mc2_alltoallv_grouped_matmul")(_alltoallv_gmm("aclnnAlltoAllvGroupedMatMul", True))
ascend_rule("mc2_grouped_matmul_alltoallv")(_alltoallv_gmm("aclnnGroupedMatMulAlltoAllv", False))


# ----------------------------------------------------------------------------
# The data movement alone (``has_weight=False``: the AlltoAllv and the
# permute / unpermute, no matmul), which reverse-mode differentiation of the
# two operators binds: HCCL's own HcclAlltoAllV on the device's stream, with
# the block reordering as device-to-device copies around it
# (docs/ascend.md, "Gradients").

HCCL_ALLTOALLV = "HcclAlltoAllV"


def _peer_major(world, experts):
    return [(p, e) for p in range(world) for e in range(experts)]


def _expert_major(world, experts):
    return [(p, e) for e in range(experts) for p in range(world)]


def _starts(sizes, order):
    """The first row of each (peer, expert) block when the blocks lie in ``order``."""
    starts, at = {}, 0
    for key in order:
        starts[key] = at
        at += sizes[key]
    return starts


def _copies(sizes, src_order, dst_order, width):
    """Flat (source, destination, elements) triples moving every block from
    its place in ``src_order`` to its place in ``dst_order`` (rows of
    ``width`` elements), adjacent moves merged; empty when nothing moves."""
    src, dst = _starts(sizes, src_order), _starts(sizes, dst_order)
    if all(src[k] == dst[k] for k in sizes if sizes[k]):
        return []
    out = []
    for k in dst_order:
        if not sizes[k]:
            continue
        a, b, n = src[k] * width, dst[k] * width, sizes[k] * width
        if out and out[-3] + out[-1] == a and out[-2] + out[-1] == b:
            out[-1] += n
        else:
            out += [a, b, n]
    return out


def _per_peer(sizes, world, experts, width):
    """HcclAlltoAllV's counts and displacements (elements, peer-major)."""
    counts = [sum(sizes[(p, e)] for e in range(experts)) * width for p in range(world)]
    return counts, [int(v) for v in np.cumsum([0, *counts[:-1]])]


def _data_movement_rank_spec(call: Call, dispatch: bool, sends, receives, item: int) -> str:
    """One rank's HcclAlltoAllV spec. It sends ``sends`` (its row of the
    count table, by destination d and expert e at d*E + e) and receives
    ``receives`` (by source s and expert e at s*E + e).

    dispatch: gmm_x is grouped by global expert id, so each destination's
    rows are already contiguous in destination order (sent as they are);
    rows arrive source-major and are reordered expert-major, source-minor.
    combine: gmm_x is expert-major, destination-minor, so it is reordered
    destination-major before the exchange; rows arrive source-major, which
    is the token order of the output."""
    params = call.params
    world, experts = params["world_size"], params["experts"]
    width = int(call.aval("gmm_x").shape[1])
    keys = _peer_major(world, experts)
    send_sizes = {(p, e): int(sends[p * experts + e]) for p, e in keys}
    recv_sizes = {(p, e): int(receives[p * experts + e]) for p, e in keys}
    peer, expert = _peer_major(world, experts), _expert_major(world, experts)
    if dispatch:
        pre, post = [], _copies(recv_sizes, peer, expert, width)
    else:
        pre, post = _copies(send_sizes, expert, peer, width), []
    send_counts, sdispls = _per_peer(send_sizes, world, experts, width)
    recv_counts, rdispls = _per_peer(recv_sizes, world, experts, width)
    dtype = _codes.hccl_dtype_code(call.aval("gmm_x").dtype)
    written = sum(recv_counts) * item
    slots = [
        S.integer(dtype),
        S.int_array(send_counts),
        S.int_array(sdispls),
        S.int_array(recv_counts),
        S.int_array(rdispls),
        S.int_array(pre),
        S.int_array(post),
        f"c0={written}",
    ]
    return S.encode(slots)


def _data_movement(ctx, operands, call: Call, dispatch: bool):
    op, params = call.op, call.params
    table = _static_table(call, HCCL_ALLTOALLV, "uint64 count and displacement arrays")
    if call.present("mm_x") or params["permute_out"]:
        raise NotImplementedError(
            f"{op}: implementation='ascend': the data-movement call (has_weight=False) takes "
            f"no shared expert and no permute_out, got has_mm={params['has_mm']}, "
            f"permute_out={params['permute_out']}"
        )
    ok, why = _mc2_ascend.has_hccl_alltoallv()
    if not ok:
        raise NotImplementedError(
            f"{op}: implementation='ascend' runs the data movement of this operator's "
            f"gradient (AlltoAllv without the matmul) with {HCCL_ALLTOALLV}: {why}"
        )
    world = params["world_size"]
    recv = _recv_table(table, world, params["experts"])
    item = np.dtype(call.aval("gmm_x").dtype).itemsize
    specs = [
        _data_movement_rank_spec(call, dispatch, table[r], recv[r], item) for r in range(world)
    ]
    return emit(ctx, operands, call, HCCL_ALLTOALLV, "\n".join(specs))


# ----------------------------------------------------------------------------
# The local grouped matmul and its weight gradient (no communication: the
# expert GEMMs of the AlltoAllv operators' gradients) run on the host as the
# ffi implementation runs them (docs/ascend.md, "Gradients").


def _host_kernel(primitive_name: str, op: str) -> None:
    ffi_rule = lowering.dispatching_rule(primitive_name, op)

    def rule(ctx, *operands, **params):
        return ffi_rule(ctx, *operands, implementation=_implementation.FFI, **params)

    lowering.register(primitive_name, _implementation.ASCEND, rule, platforms=_PLATFORMS)


_host_kernel("mc2_grouped_matmul", "grouped_matmul")
_host_kernel("mc2_grouped_matmul_wgrad", "grouped_matmul")


# ----------------------------------------------------------------------------
# V4 low-precision rows (fp8 / hifloat8 / MX / perblock):
# aclnnQuantMatmulAllReduceV4 (torch_npu's choice for fp8/hif8/fp4 x1)


def _packed_fp4_shape(shape):
    """The packed buffer's shape: the (even) last axis halved."""
    return (*shape[:-1], shape[-1] // 2)


def _pack_fp4(x):
    """fp4 values (one per byte in JAX) with an even last axis as CANN's
    FLOAT4_E2M1 storage: two per byte along the last axis, the even element
    in the low nibble."""
    codes = jax.lax.convert_element_type(jax.lax.bitcast_convert_type(x, jnp.uint4), jnp.uint8)
    pairs = codes.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


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


def _require_half_output_with_packed_scales(call: Call, function: str) -> None:
    """With packed x2_scale words CANN's ``function`` writes float16 /
    bfloat16 only (the 'generic' target also accepts float32 output)."""
    if np.dtype(call.params["out_dtype"]) == _FLOAT32 and is_packed_scale(call.aval("x2_scale")):
        raise validation.unsupported(
            call.op,
            f"implementation='ascend' takes out_dtype float16 or bfloat16 with packed x2_scale "
            f"words ({function} writes no float32 output in the packed-scale rows), got "
            f"out_dtype=float32 with x2_scale {validation.describe(call.aval('x2_scale'))}; "
            "float32 output runs with implementation='ffi' or 'xla' under the 'generic' target",
        )


@ascend_rule("mc2_lowp_quant_mm_all_reduce")
def _lowp_quant_mm_all_reduce(ctx, operands, call: Call):
    function = "aclnnQuantMatmulAllReduceV4"
    _require_half_output_with_packed_scales(call, function)
    if np.dtype(call.aval("x1").dtype).name == "float4_e2m1fn":
        k = call.aval("x1").shape[-1]
        if k % 2:
            raise validation.unsupported(
                call.op,
                f"implementation='ascend' takes float4_e2m1fn x1 / x2 with an even k (CANN's "
                f"FLOAT4_E2M1 tensors hold two values a byte along the inner axis), got k = {k}; "
                "an odd k runs with implementation='ffi' or 'xla'",
            )
        # x1 and x2 (the MX rows take both in fp4): the descriptors keep the
        # logical fp4 dims and element strides (``call`` holds the logical
        # avals); the buffers become packed bytes.
        fp4 = (call.index["x1"], call.index["x2"])
        ctx, operands = _pack_fp4_operands(ctx, operands, fp4)
    code = {"dtype_code": _codes.ACL_DTYPE["hifloat8"]} if call.params["hif8"] else {}
    slots = [
        call.tensor("x1", **code),
        call.weight(**code),
        call.tensor("bias"),
        call.tensor("x3"),
        call.tensor("x1_scale"),
        call.scale("x2_scale"),
        S.NULL,
        S.NULL,
        *call.comm_tail(),
        S.integer(call.params["group_size"]),
        S.integer(call.params["comm_quant_mode"]),
        S.result(0, ctx.avals_out[0]),
    ]
    return emit(ctx, operands, call, function, S.encode(slots))
