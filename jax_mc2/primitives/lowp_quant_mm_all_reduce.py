"""The fp8, hifloat8 and MX rows of aclnnQuantMatmulAllReduceV4 (seed 003,
Ascend 950), behind ``quant_matmul_all_reduce_v4``.

One primitive serves four scale layouts (the seed's formulas 4 to 7):

- pertoken (formula 6): x1/x2 fp8 e4m3fn / e5m2 or hifloat8, float32
  ``x1_scale`` (m,) and float32 ``x2_scale`` (1,) / (n,) / (1, n):
  ``y = f32(x1 @ x2 + bias) * x2_scale * x1_scale``;
- packed (formula 5, perchannel / pertensor): the same values with packed
  64-bit ``x2_scale`` words (uint64/int64, or uint32 (low, high) pairs
  without x64) and no ``x1_scale``: ``y = f32(x1 @ x2 + bias) * fp19(x2_scale)``;
- perblock (formula 7): float32 ``x1_scale`` (ceil(m/128), ceil(k/128))
  ((b, ceil(s/128), ceil(k/128)) for 3-D x1) and ``x2_scale``
  (ceil(k/128), ceil(n/128)) ((ceil(n/128), ceil(k/128)) transposed), no bias:
  ``y[i, j] = sum_kb (x1[i, kb] @ x2[kb, j]) * (x1_scale[i//128, kb] * x2_scale[kb, j//128])``
  accumulated in fp32 block after block (tail blocks are shorter);
- MX (formula 4): fp8 or float4_e2m1fn values with float8_e8m0fnu scales
  [m, ceil(k/64), 2] and [n, ceil(k/64), 2] (x2 transposed only), one scale
  per 32 values along k: ``y = (x1 * x1_scale) @ (x2 * x2_scale) + bias``.

The products accumulate in fp32; ``y`` is rounded half to even to the output
dtype once, ``x3`` is added in fp32 and rounded again (as the int8 rows do),
and the all-reduce runs in the output dtype. ``comm_quant_mode=1`` replaces the
all-reduce by the fp8 pertile chain of docs/semantics.md §5.2.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from jax_mc2.framework import _compat, numerics, quant, targets, validation
from jax_mc2.framework.primitive import (
    MAP,
    Operand,
    PrimitiveSpec,
    bind,
    register,
    split_operands,
)
from jax_mc2.framework.quant import canonical_packed_scale, decode_scale, is_packed_scale
from jax_mc2.framework.validation import dtype_name
from jax_mc2.implementations import ffi, xla
from jax_mc2.primitives.matmul_family import (
    check_channel_scale,
    check_matmul_shapes,
    reduced_result,
)

OP = "quant_matmul_all_reduce_v4"
_F32 = jnp.float32
F8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
F8_E5M2 = np.dtype(ml_dtypes.float8_e5m2)
F4_E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
U8 = np.dtype(np.uint8)
HIF8 = "hifloat8"
_OUT_DTYPES = (np.dtype(np.float16), np.dtype(jnp.bfloat16), np.dtype(np.float32))

PERTOKEN, PACKED, PERBLOCK, MX = "pertoken", "packed", "perblock", "mx"
BLOCK = 128  # perblock group size along m, n and k
MX_BLOCK = 32  # MX group size along k
PERBLOCK_GROUP = (BLOCK, BLOCK, BLOCK)
MX_GROUP = (1, 1, MX_BLOCK)
COMM_TILE = 128  # fp8 pertile communication: 1 x 128 tiles along n
FP8_MAX = {F8_E4M3: 448.0, F8_E5M2: 57344.0}
#: The byte container of the fp8 communication wire (e5m2 codes and the fp32
#: scales' bytes are bitcast into it; XLA:CPU carries every float8_e4m3fn
#: byte pattern through its collectives unchanged).
WIRE_DTYPE = F8_E4M3


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def is_low_precision(x1, x1_format, x2_format) -> bool:
    """Whether a call belongs to this primitive (not the int8 rows)."""
    return np.dtype(x1.dtype) != np.dtype(np.int8) or HIF8 in (x1_format, x2_format)


# --------------------------------------------------------------------------
# Validation


def value_kind(op, name, aval, hif8: bool) -> str:
    """'float8_e4m3fn', 'float8_e5m2', 'float4_e2m1fn' or 'hifloat8'."""
    dtype = np.dtype(aval.dtype)
    if hif8:
        if dtype != U8:
            raise validation.type_error(
                op,
                f"{name} with {name}_format='hifloat8' must hold uint8 HiFloat8 codes, got "
                f"{dtype.name}",
            )
        return HIF8
    if dtype in (F8_E4M3, F8_E5M2, F4_E2M1):
        return dtype.name
    if dtype == U8:
        raise validation.type_error(
            op,
            f"uint8 {name} holds HiFloat8 codes only with x1_format='hifloat8' and "
            "x2_format='hifloat8'",
        )
    if dtype == np.dtype(np.int8):  # x1 (or the formats) chose the low-precision rows
        raise validation.type_error(
            op,
            f"{name} is int8 but the other operand is not: the int8 rows take int8 x1 and x2, "
            "the low-precision rows float8 / float4 / HiFloat8 x1 and x2",
        )
    raise validation.type_error(
        op,
        f"{name} dtype must be int8, float8_e4m3fn, float8_e5m2, float4_e2m1fn or uint8 "
        f"HiFloat8 codes (x1_format/x2_format='hifloat8'), got {dtype.name}",
    )


def classify(op, kind, x2_scale, x1_scale) -> str:
    """The scale layout (row family) a call selects, from the scales' dtypes."""
    dtype = np.dtype(x2_scale.dtype)
    if dtype == E8M0:
        mode = MX
    elif is_packed_scale(x2_scale):
        mode = PACKED
    elif dtype == np.dtype(np.float32):
        mode = PERBLOCK if x1_scale is not None and x1_scale.ndim >= 2 else PERTOKEN
    else:
        raise validation.type_error(
            op,
            f"x2_scale dtype for {kind} x1/x2 must be float32 (pertoken / perblock), packed "
            "uint64/int64 words or uint32 (low, high) pairs [..., 2] (perchannel / pertensor), "
            f"or float8_e8m0fnu (MX), got {dtype.name}{list(x2_scale.shape)}",
        )
    if kind == F4_E2M1.name and mode != MX:
        raise validation.type_error(
            op,
            "float4_e2m1fn x1/x2 exist only in the MX rows: x1_scale and x2_scale must be "
            f"float8_e8m0fnu, got x2_scale {dtype.name}",
        )
    if kind == HIF8 and mode == MX:
        raise validation.type_error(
            op, "the MX rows take float8_e4m3fn, float8_e5m2 or float4_e2m1fn x1/x2, not hifloat8"
        )
    return mode


def _resolve_group(op, group_size, dims, scale_dims, want, row):
    explicit = f"pass group_size=jax_mc2.quant.group_size{want} (= {quant.group_size(*want)})"
    # An empty direction (m = 0 with a 0-extent scale) has nothing to group:
    # its 0 field resolves to the row's own group size.
    try:
        fields = quant.unpack_group_size(group_size)
        empty = [f == 0 and d == 0 and sd == 0 for f, d, sd in zip(fields, dims, scale_dims)]
        dims = tuple(w if e else d for w, e, d in zip(want, empty, dims))
        scale_dims = tuple(1 if e else sd for e, sd in zip(empty, scale_dims))
        got = quant.resolve_group_size(group_size, dims, scale_dims)
    except ValueError as e:
        raise validation.value_error(op, f"{e}: {explicit} ({row} rows)") from None
    if got != want:
        inferred = [
            f"{name} = {d} / {s} = {g}"
            for name, d, s, g, w, f in zip(
                "mnk", dims, scale_dims, got, want, quant.unpack_group_size(group_size)
            )
            if f == 0 and g != w
        ]
        detail = f"; a 0 field is inferred as dim / scale extent: {', '.join(inferred)}"
        raise validation.value_error(
            op,
            f"group_size (m, n, k) must resolve to {want} in the {row} rows, got {got} "
            f"(group_size={group_size}{detail if inferred else ''}); {explicit}",
        )
    return got


def _check_static_group(op, group_size, row):
    if group_size != 0:
        raise validation.value_error(
            op,
            f"group_size must be 0 in the {row} rows (it is meaningful only when both scales "
            f"are at least 2-D: perblock / MX), got {group_size!r}",
        )


def check_call(
    op,
    x1,
    x2,
    x2_scale,
    x1_scale,
    bias,
    x3,
    *,
    hif8,
    transpose_x2,
    out_dtype,
    group_size,
    comm_quant_mode,
):
    """Every dtype / shape / static rule of the fp8, hifloat8 and MX rows;
    returns ``(out_shape, mode)``."""
    kind = _check_values(op, x1, x2, hif8)
    out_shape = check_matmul_shapes(op, x1, x2, transpose_x2=transpose_x2)
    mode = classify(op, kind, x2_scale, x1_scale)
    if mode in (PERTOKEN, PACKED):
        _check_pertoken_or_packed(op, mode, x1, x2_scale, x1_scale, out_shape[-1], group_size)
    elif mode == PERBLOCK:
        _check_perblock(op, x1, x2_scale, x1_scale, bias, out_shape[-1], group_size, transpose_x2)
    else:
        _check_mx(op, kind, x1, x2_scale, x1_scale, out_shape[-1], group_size, transpose_x2)
    _check_bias_out_x3(op, kind, mode, bias, x3, out_shape, out_dtype)
    if comm_quant_mode == 1:
        if kind not in (F8_E4M3.name, F8_E5M2.name) or mode not in (PERTOKEN, PERBLOCK):
            raise validation.value_error(
                op,
                "comm_quant_mode=1 (fp8 pertile communication, formula 8) needs float8_e4m3fn "
                f"or float8_e5m2 x1/x2 with float32 x1_scale and x2_scale, got {kind} x1/x2 "
                f"in the {mode} rows",
            )
    return out_shape, mode


def _check_values(op, x1, x2, hif8) -> str:
    """x1's rank, x1/x2's common value kind, and the target's support."""
    support = targets.operator_support(op)
    validation.check_rank(op, "x1", x1, (2, 3), "(m, k) or (b, s, k)")
    kind = value_kind(op, "x1", x1, hif8)
    kind2 = value_kind(op, "x2", x2, hif8)
    if kind2 != kind:
        raise validation.type_error(
            op, f"x2 must have x1's dtype {kind} (the tables pair equal dtypes), got {kind2}"
        )
    profile = targets.current_profile()
    if not support.low_precision:
        raise validation.unsupported(
            op,
            f"the {kind} rows (fp8, hifloat8 and MX: Ascend 950 only) are not available on "
            f"target {profile.name!r} ({profile.description}); use target 'ascend-950' or "
            "'generic'",
        )
    return kind


def _check_f32(op, mode, name, aval):
    if np.dtype(aval.dtype) != np.dtype(np.float32):
        raise validation.type_error(
            op,
            f"{name} dtype must be float32 in the {mode} rows, got {dtype_name(aval.dtype)}",
        )


def _check_pertoken_or_packed(op, mode, x1, x2_scale, x1_scale, n, group_size):
    pair = mode == PACKED and np.dtype(x2_scale.dtype) == np.dtype(np.uint32)
    where = f" in the {mode} rows"
    check_channel_scale(op, "x2_scale", x2_scale, n, pair=pair, where=where, mark_pairs=False)
    _check_static_group(op, group_size, mode)
    if mode == PERTOKEN:
        if x1_scale is None:
            raise validation.type_error(
                op,
                "a float32 x2_scale needs x1_scale (float32 (m,) pertoken, or 2-D perblock "
                "scales); without x1_scale pass packed x2_scale words (quant.trans_quant_param)",
            )
        _check_f32(op, mode, "x1_scale", x1_scale)
        m = int(np.prod(x1.shape[:-1]))
        validation.check_shape(
            op, "x1_scale", x1_scale, (m,), "1-D (m,) pertoken (b * s for 3-D x1)"
        )
    elif x1_scale is not None:
        raise validation.type_error(
            op,
            "x1_scale must be None with packed x2_scale words (the perchannel / pertensor "
            "rows); pertoken scales take a float32 x2_scale; got x1_scale "
            f"{validation.describe(x1_scale)} with x2_scale {validation.describe(x2_scale)}",
        )


def _check_perblock(op, x1, x2_scale, x1_scale, bias, n, group_size, transpose_x2):
    _check_f32(op, PERBLOCK, "x1_scale", x1_scale)
    _check_f32(op, PERBLOCK, "x2_scale", x2_scale)
    *lead, k = x1.shape
    m = int(np.prod(lead))
    kb, nb = _ceil(k, BLOCK), _ceil(n, BLOCK)
    if x1.ndim == 3:
        want1 = (x1.shape[0], _ceil(x1.shape[1], BLOCK), kb)
        rule1 = "(b, ceil(s/128), ceil(k/128))"
    else:
        want1 = (_ceil(m, BLOCK), kb)
        rule1 = "(ceil(m/128), ceil(k/128))"
    pertoken = (
        "; an x1_scale of 2 or more dimensions selects these rows, "
        f"a pertoken one is 1-D (m,) = ({m},)"
    )
    validation.check_shape(op, "x1_scale", x1_scale, want1, f"perblock {rule1}", pertoken)
    want2 = (nb, kb) if transpose_x2 else (kb, nb)
    rule2 = (
        "(ceil(n/128), ceil(k/128)) (transpose_x2)"
        if transpose_x2
        else ("(ceil(k/128), ceil(n/128))")
    )
    validation.check_shape(op, "x2_scale", x2_scale, want2, f"perblock {rule2}")
    if bias is not None:
        raise validation.type_error(
            op,
            "bias must be None in the perblock-perblock rows (seed 003: B-B quantization "
            f"supports only a null bias), got {validation.describe(bias)}",
        )
    rows = x1.shape[-2]
    _resolve_group(
        op,
        group_size,
        (rows, n, k),
        (x1_scale.shape[-2], x2_scale.shape[0 if transpose_x2 else 1], x1_scale.shape[-1]),
        PERBLOCK_GROUP,
        PERBLOCK,
    )


def _check_mx(op, kind, x1, x2_scale, x1_scale, n, group_size, transpose_x2):
    if not transpose_x2:
        raise validation.value_error(
            op,
            "transpose_x2 must be True in the MX rows (float8_e8m0fnu x2_scale supports "
            "only a transposed (n, k) x2)",
        )
    if x1_scale is None or np.dtype(x1_scale.dtype) != E8M0:
        got = "None" if x1_scale is None else dtype_name(x1_scale.dtype)
        raise validation.type_error(
            op, f"x1_scale must be float8_e8m0fnu in the MX rows (as x2_scale), got {got}"
        )
    *lead, k = x1.shape
    m = int(np.prod(lead))
    kb = _ceil(k, 2 * MX_BLOCK)
    validation.check_shape(op, "x1_scale", x1_scale, (m, kb, 2), "MX [m, ceil(k/64), 2]")
    validation.check_shape(op, "x2_scale", x2_scale, (n, kb, 2), "MX [n, ceil(k/64), 2]")
    if kind == F4_E2M1.name and _ceil(k, MX_BLOCK) % 2:
        raise validation.type_error(
            op,
            f"float4_e2m1fn x1/x2 need ceil(k/32) even, got k = {k} (ceil(k/32) = "
            f"{_ceil(k, MX_BLOCK)})",
        )
    _resolve_group(op, group_size, (m, n, k), (m, n, 2 * kb), MX_GROUP, MX)


def _check_bias_out_x3(op, kind, mode, bias, x3, out_shape, out_dtype):
    if bias is not None:
        validation.check_shape(op, "bias", bias, (out_shape[-1],), "1-D (n,)")
        _check_f32(op, mode, "bias", bias)
    profile = targets.current_profile()
    allowed = list(_OUT_DTYPES)
    if mode == PACKED and np.dtype(np.float32) not in profile.float_dtypes:
        allowed.remove(np.dtype(np.float32))
    if out_dtype not in allowed:
        raise validation.type_error(
            op,
            f"out_dtype must be one of {', '.join(d.name for d in allowed)} in the {kind} "
            f"{mode} rows on target {profile.name!r}, got {out_dtype.name}",
        )
    if x3 is not None:
        validation.check_shape(op, "x3", x3, out_shape, "the output shape")
        if np.dtype(x3.dtype) not in _OUT_DTYPES:
            raise validation.type_error(
                op, f"x3 dtype must be float16, bfloat16 or float32, got {dtype_name(x3.dtype)}"
            )


# --------------------------------------------------------------------------
# The primitive

OPERANDS = (
    Operand("x1"),
    Operand("x2"),
    Operand("x2_scale"),
    Operand("x1_scale", flag="has_x1_scale"),
    Operand("bias", flag="has_bias"),
    Operand("x3", flag="has_x3"),
)


#: The primitive's static parameters (check_call's keyword arguments), each
#: with the function that gives its canonical bound form.
STATICS = {
    "hif8": bool,
    "transpose_x2": bool,
    "out_dtype": np.dtype,
    "group_size": int,
    "comm_quant_mode": int,
}


def _split(operands, params):
    """(x1, x2, x2_scale, x1_scale, bias, x3), absent ones None, per the
    presence flags in ``params``."""
    return tuple(split_operands(OPERANDS, operands, params).values())


def _abstract_eval(*operands, **params):
    """``params``: :data:`STATICS`, the presence flags and the collective
    parameters."""
    x1, x2, x2_scale, x1_scale, bias, x3 = _split(operands, params)
    statics = {name: params[name] for name in STATICS}
    out_shape, _ = check_call(OP, x1, x2, x2_scale, x1_scale, bias, x3, **statics)
    return reduced_result(OP, x1, out_shape, params["out_dtype"], operands, params, x2=x2)


# --------------------------------------------------------------------------
# Shared pieces of the two implementations


def decode_values(x, hif8):
    """fp8 / fp4 values or HiFloat8 codes -> float32 (exact; the values as
    quantized, even where the program quantized them: :func:`numerics.widened`)."""
    return quant.hifloat8_decode(x) if hif8 else numerics.widened(x)


def _row_scales(mode, x1, x1_scale):
    """x1's scales aligned with its flattened rows: pertoken [m], perblock
    [m, ceil(k/128)] (each row's block scales), MX e8m0 [m, 2 * ceil(k/64)]."""
    if x1_scale is None:
        return None
    m = int(np.prod(x1.shape[:-1]))
    if mode == PERBLOCK:
        rows = x1.shape[-2]
        s = jnp.repeat(x1_scale, BLOCK, axis=-2)[..., :rows, :]
        return s.reshape(m, s.shape[-1])
    if mode == MX:
        return x1_scale.reshape(m, x1_scale.shape[-2] * x1_scale.shape[-1])
    return x1_scale


def _column_scales(mode, x2_scale, n, transpose_x2):
    """x2's scales for the local kernels: pertoken / packed float32 [1] or
    [n]; perblock float32 [ceil(k/128), n] (each column's block scales); MX
    e8m0 [n, 2 * ceil(k/64)]."""
    if mode == PACKED:
        return decode_scale(x2_scale)
    if mode == PERTOKEN:
        return x2_scale.reshape(-1)
    if mode == PERBLOCK:
        s = x2_scale.T if transpose_x2 else x2_scale
        return jnp.repeat(s, BLOCK, axis=1)[:, :n]
    return x2_scale.reshape(n, x2_scale.shape[-2] * x2_scale.shape[-1])


def _mx_expand(scale, k):
    """e8m0 [rows, kb32] -> float32 [rows, k], one scale per 32 values."""
    return jnp.repeat(numerics.widened(scale), MX_BLOCK, axis=-1)[:, :k]


def _dot(a, b, transpose_b):
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)


def _perblock_matmul(a, b, s1, s2, transpose_x2):
    """sum over k-blocks, in order, of (a[:, kb] @ b[kb, :]) * (s1[:, kb] * s2[kb, :])."""
    m, k = a.shape
    kb = s1.shape[1]
    pad = kb * BLOCK - k
    a = jnp.pad(a, ((0, 0), (0, pad))).reshape(m, kb, BLOCK).transpose(1, 0, 2)
    if transpose_x2:
        n = b.shape[0]
        b = jnp.pad(b, ((0, 0), (0, pad))).reshape(n, kb, BLOCK).transpose(1, 2, 0)
    else:
        n = b.shape[1]
        b = jnp.pad(b, ((0, pad), (0, 0))).reshape(kb, BLOCK, n)

    def block(a_b, b_b, s1_b, s2_b):
        return _dot(a_b, b_b, False) * (s1_b[:, None] * s2_b[None, :])

    def body(y, xs):
        return y + block(*xs), None

    s1 = s1.T
    y = block(a[0], b[0], s1[0], s2[0])  # the carry starts as block 0 (its vma included)
    if kb > 1:
        y, _ = lax.scan(body, y, (a[1:], b[1:], s1[1:], s2[1:]))
    return y


def local_lowp_matmul(x1, x2, s2, s1, bias, *, mode, hif8, transpose_x2):
    """One rank's fp32 ``y`` before the output rounding (the ``xla`` numerics)."""
    k = x1.shape[-1]
    a = decode_values(x1, hif8).reshape(-1, k)
    b = decode_values(x2, hif8)
    if mode == PERBLOCK:
        return _perblock_matmul(a, b, s1, s2, transpose_x2)
    if mode == MX:
        a = a * _mx_expand(s1, k)
        b = b * _mx_expand(s2, k)
    y = _dot(a, b, transpose_x2)
    if bias is not None:
        y = y + bias
    if mode in (PERTOKEN, PACKED):
        y = y * s2
    if mode == PERTOKEN:
        y = y * s1[:, None]
    return y


# --------------------------------------------------------------------------
# fp8 pertile low-bit communication (comm_quant_mode=1), docs/semantics.md §5.2


def pertile_quantize(c, fp8):
    """Per row, per 1 x 128 tile: a = max|tile| (FP8_MAX if 0), sc = FP8_MAX / a
    (1 if 0), q = fp8(clip(tile * sc)) rounded half to even. Returns
    ``(q [r, n] fp8, sc [r, ceil(n/128)] float32)``."""
    fmax = np.float32(FP8_MAX[np.dtype(fp8)])
    r, n = c.shape
    t = _ceil(n, COMM_TILE)
    tiles = jnp.pad(c, ((0, 0), (0, t * COMM_TILE - n))).reshape(r, t, COMM_TILE)
    a = numerics.nan_max(jnp.abs(tiles), axis=-1)  # a NaN makes its tile NaN
    a = jnp.where(a == 0, fmax, a)
    sc = fmax / a
    sc = jnp.where(sc == 0, np.float32(1), sc)
    q = jnp.clip(tiles * sc[..., None], -fmax, fmax).astype(fp8)
    return q.reshape(r, t * COMM_TILE)[:, :n], sc


def pertile_wire(q, sc):
    """``[q codes | sc bytes]`` rows in the float8_e4m3fn byte container."""
    r = q.shape[0]
    codes = q if np.dtype(q.dtype) == WIRE_DTYPE else lax.bitcast_convert_type(q, WIRE_DTYPE)
    scale_bytes = lax.bitcast_convert_type(sc, WIRE_DTYPE).reshape(r, 4 * sc.shape[-1])
    return jnp.concatenate([codes, scale_bytes], axis=1)


def _wire_dequantize(wire, n, fp8):
    """wire [..., r, n + 4t] -> float32 [..., r, n]: f32(q) / sc per tile."""
    codes = wire[..., :n]
    if np.dtype(fp8) != WIRE_DTYPE:
        codes = lax.bitcast_convert_type(codes, fp8)
    lead = wire.shape[:-1]
    t = _ceil(n, COMM_TILE)
    sc = lax.bitcast_convert_type(wire[..., n:].reshape(*lead, t, 4), _F32)
    codes = numerics.widened(codes)  # the fp8 codes as quantized, on one rank too
    q = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, t * COMM_TILE - n)])
    q = q.reshape(*lead, t, COMM_TILE)
    deq = numerics.divide(q, sc[..., None])  # a true division, as the kernel's Div
    return deq.reshape(*lead, t * COMM_TILE)[..., :n]


def fp8_pertile_all_reduce(wire, *, n, fp8, out_dtype, axis_name):
    """The fp8 pertile chain on wire rows [r, n + 4 ceil(n/128)]: rows padded
    to a multiple of the R ranks and split into R chunks; a float8 all-to-all
    (rank j gets chunk j of every rank, in rank order); each chunk dequantized
    (``f32(q) / sc``) and summed in fp32 in rank order from 0.0; requantized
    per tile; a float8 all-gather; dequantized and rounded to ``out_dtype``.
    The bytes on the wire are fp8 codes plus each tile's fp32 scale."""
    r, width = wire.shape
    ranks = int(lax.axis_size(axis_name)) if axis_name else 1
    chunk = _ceil(r, ranks)
    padded = jnp.pad(wire, ((0, chunk * ranks - r), (0, 0))).reshape(ranks, chunk, width)
    if axis_name:
        padded = _compat.varying_over(padded, axis_name)
        padded = lax.all_to_all(padded, axis_name, 0, 0, tiled=False)
    deq = _wire_dequantize(padded, n, fp8)
    acc = jnp.zeros((chunk, n), _F32)
    for i in range(ranks):
        acc = acc + deq[i]
    q2, sc2 = pertile_quantize(acc, fp8)
    wire2 = pertile_wire(q2, sc2)
    gathered = lax.all_gather(wire2, axis_name) if axis_name else wire2[None]
    y = _wire_dequantize(gathered.reshape(ranks * chunk, width)[:r], n, fp8)
    return y.astype(out_dtype)


# --------------------------------------------------------------------------
# The compositions of the two implementations


def _composition(local_fn, operands, params, axis_name, comm_turn, reduce=None):
    """Row chunks (comm_turn) of ``local_fn(x1, s1_rows, x3)``, each reduced in
    the output dtype by ``reduce`` (a function of the array; default the
    ``xla`` all-reduce over ``axis_name``), or by the fp8 pertile chain."""
    x1, x2, x2_scale, x1_scale, bias, x3 = _split(operands, params)
    kind = HIF8 if params["hif8"] else np.dtype(x1.dtype).name
    mode = classify(OP, kind, x2_scale, x1_scale)
    transpose_x2 = params["transpose_x2"]
    n = x2.shape[0] if transpose_x2 else x2.shape[1]
    out_dtype = params["out_dtype"]
    s1 = _row_scales(mode, x1, x1_scale)
    s2 = _column_scales(mode, x2_scale, n, transpose_x2)
    comm = params["comm_quant_mode"] == 1
    if comm:
        fp8 = np.dtype(x1.dtype)

        def reduce(w):
            # The wire rows [r, n + 4 ceil(n/128)]; reshape(-1, 0) cannot infer r.
            wire = w.reshape(math.prod(w.shape[:-1]), w.shape[-1])
            y = fp8_pertile_all_reduce(wire, n=n, fp8=fp8, out_dtype=out_dtype, axis_name=axis_name)
            return y.reshape(*w.shape[:-1], n)

    def local(x1_c, x3_c, s1_c):
        return local_fn(x1_c, x2, s2, s1_c, bias, x3_c, mode=mode, comm=comm)

    return xla.chunked_matmul_all_reduce(
        local, x1, x3, s1, axis_name=axis_name, comm_turn=comm_turn, reduce=reduce
    )


def _xla_local(x1, x2, s2, s1, bias, x3, *, mode, comm, hif8, transpose_x2, out_dtype):
    """One rank's result in ``out_dtype`` (or its fp8 pertile wire with
    ``comm``), the ``xla`` numerics: XLA's float32 GEMM on the decoded values."""
    y = local_lowp_matmul(x1, x2, s2, s1, bias, mode=mode, hif8=hif8, transpose_x2=transpose_x2)
    x3_2d = None if x3 is None else x3.reshape(y.shape)
    if comm:
        c = y if x3_2d is None else y + numerics.widened(x3_2d)
        out = pertile_wire(*pertile_quantize(c, np.dtype(x1.dtype)))
    else:
        out = numerics.x3_added(y, x3_2d, out_dtype).astype(out_dtype)
    return out.reshape(*x1.shape[:-1], out.shape[-1])


def _bound_xla_local(params):
    """:func:`_xla_local` with the call's static parameters bound."""
    return functools.partial(
        _xla_local,
        hif8=params["hif8"],
        transpose_x2=params["transpose_x2"],
        out_dtype=params["out_dtype"],
    )


def _xla_composition(*operands, axis_name, comm_turn, **params):
    return _composition(_bound_xla_local(params), operands, params, axis_name, comm_turn)


_FFI_MODES = ffi.LOWP_MODES  # the kernel's modes, from the C++ module


def _ffi_composition(*operands, axis_name, comm_turn, parallelism, **params):
    transpose_x2, out_dtype = params["transpose_x2"], params["out_dtype"]
    wide = ffi.widened_for_all_reduce(out_dtype, axis_name)
    xla_local = _bound_xla_local(params)

    def local(x1, x2, s2, s1, bias, x3, *, mode, comm):
        product = ffi.product_size(x1, x2, transpose_x2)
        engine = ffi.gemm_engine(ffi.FLOAT8, x1.shape[-1], parallelism, product)
        if engine == ffi.XLA_DOT:
            # The products on XLA's float32 GEMM (docs/semantics.md §12).
            y = xla_local(x1, x2, s2, s1, bias, x3, mode=mode, comm=comm)
            return y.astype(jnp.float32) if wide and not comm else y
        if x3 is not None:
            x3 = x3.reshape(*x1.shape[:-1], x3.shape[-1])
        if np.dtype(x1.dtype) == F4_E2M1:
            # XLA:CPU stores fp4 two values per byte; every fp4 value is exact in e4m3fn.
            x1, x2 = x1.astype(jnp.float8_e4m3fn), x2.astype(jnp.float8_e4m3fn)
        return ffi.lowp_matmul(
            x1,
            x2,
            s2,
            s1,
            bias,
            x3,
            mode=_FFI_MODES[mode],
            transpose_x2=transpose_x2,
            out_dtype=out_dtype,
            comm=comm,
            block_k=BLOCK,
            parallelism=parallelism,
            bf16_as_f32=wide and not comm,
        )

    reduce = ffi.reducer(axis_name, out_dtype)
    return _composition(local, operands, params, axis_name, comm_turn, reduce)


lowp_quant_mm_all_reduce_p = register(
    PrimitiveSpec(
        name="mc2_lowp_quant_mm_all_reduce",
        operator=OP,
        operands=OPERANDS,
        abstract_eval=_abstract_eval,
        xla=_xla_composition,
        ffi=_ffi_composition,
        batching=MAP,
        not_differentiable=(
            "the fp8 / hifloat8 / MX quantized rows are not differentiable (quantized "
            "operands and scales); differentiate the floating-point model and quantize after "
            "training"
        ),
    )
)


def bind_low_precision(named, params, **statics):
    """Binds the fp8 / hifloat8 / MX primitive. ``named``: the operands by
    name (x1, x2, x2_scale, x1_scale, bias, x3; None where absent);
    ``statics``: the :data:`STATICS`, canonicalized here; ``params``:
    collective_params."""
    named = {**named, "x2_scale": canonical_packed_scale(named["x2_scale"])}
    canonical = {name: form(statics[name]) for name, form in STATICS.items()}
    return bind(lowp_quant_mm_all_reduce_p, named, **canonical, **params)
