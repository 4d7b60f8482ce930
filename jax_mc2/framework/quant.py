"""Quantization helpers with Ascend CANN's bit-exact semantics.

- ``trans_quant_param`` / ``unpack_trans_quant_param``: the packed 64-bit
  dequant scale of TransQuantParamV2/V3 and its inverse.
- ``hifloat8_encode`` / ``hifloat8_decode``: the HiFloat8 codec (hif8 tensors
  travel as ``uint8`` codes, JAX has no hifloat8 dtype).
- ``mx_quantize``: MXFP8/MXFP4 quantization with e8m0 block scales in CANN's
  ``[rows, ceil(k/64), 2]`` layout.
- ``perblock_quantize``: 128 x 128 block quantization with fp32 scales.
- ``group_size`` / ``unpack_group_size`` / ``resolve_group_size``: the
  ``K | N<<16 | M<<32`` group-size word.
- ``to_fractal_nz`` / ``from_fractal_nz``: the FRACTAL_NZ weight layout.

The array helpers check their arguments in Python and then run one jitted
computation (compiled once per shape and static argument): called eagerly,
to prepare weights and scales, they cost one compilation instead of one per
``jnp`` operation; inside a ``jit`` they are inlined.

Packed 64-bit scales and ``jax_enable_x64``: with x64 enabled a packed scale
is an ``int64`` array (as ``torch_npu.npu_trans_quant_param`` returns); with
x64 disabled JAX cannot hold 64-bit integers, so the same words travel as a
``uint32`` array with a trailing dimension of 2 holding ``(low, high)``
32-bit halves. ``trans_quant_param`` returns the form that matches the
current x64 setting; ``packed_scale_words`` reads either form (and NumPy
``int64``/``uint64`` arrays) as ``(low, high)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike

from jax_mc2.framework import numerics
from jax_mc2.framework.weight_format import c0 as nz_block_width

_U32 = jnp.uint32


def _u32(value: int):
    return np.uint32(value)


# --------------------------------------------------------------------------
# TransQuantParam: packed 64-bit dequant scales
#
# bits 13..31: fp19 scale (fp32 sign, exponent and top 10 mantissa bits)
# bits 37..45: optional offset, int9 two's complement
# bit  46    : always 1


def _fp19_round_half_even(bits):
    """fp32 bits -> fp19 bits (in place of the fp32 field), round half even."""
    sign = bits & _u32(0x80000000)
    exponent = (bits >> 23) & _u32(0xFF)
    mantissa = bits & _u32(0x7FFFFF)
    kept = mantissa >> 13
    round_bit = (mantissa >> 12) & _u32(1)
    sticky = mantissa & _u32(0xFFF)
    up = (round_bit == 1) & ((sticky != 0) | ((kept & _u32(1)) == 1))
    # Adding one to the (exponent, mantissa) field carries into the exponent.
    field = (exponent << 10) | kept
    rounded = jnp.where(up, field + _u32(1), field)
    normal = sign | (rounded << 13)
    truncated = sign | (field << 13)  # inf/nan: truncate
    zero = sign  # zero and denormals become a signed zero
    return jnp.where(exponent == 0, zero, jnp.where(exponent == 255, truncated, normal))


def trans_quant_param(
    scale: ArrayLike, offset: ArrayLike | None = None, *, round_mode: int = 0
) -> Array:
    """Packs fp32 dequant scales (and int9 offsets) into 64-bit words.

    Args:
      scale: float array, ``(1,)``, ``(n,)``, ``(1, n)`` or ``(g, n)``.
      offset: optional float array broadcastable with ``scale``; rounded half
        to even and clamped to [-256, 255].
      round_mode: 0 truncates the fp32 mantissa to 10 bits (TransQuantParamV2
        and V3's default); 1 rounds it half to even (V3 ``round_mode=1``).

    Returns:
      ``int64`` words of the broadcast shape when ``jax_enable_x64`` is on;
      otherwise ``uint32`` ``(low, high)`` pairs with a trailing dimension 2.
    """
    if isinstance(round_mode, (bool, np.bool_)) or round_mode not in (0, 1):
        raise ValueError(f"trans_quant_param: round_mode must be 0 or 1, got {round_mode!r}")
    scale = jnp.asarray(scale)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise TypeError(f"trans_quant_param: scale must be a float array, got {scale.dtype}")
    if scale.ndim not in (1, 2):
        raise TypeError(
            f"trans_quant_param: scale must be 1-D (n,) or 2-D (g, n), got shape {scale.shape}"
        )
    shape = scale.shape
    if offset is not None:
        offset = jnp.asarray(offset)
        if not jnp.issubdtype(offset.dtype, jnp.floating):
            raise TypeError(f"trans_quant_param: offset must be a float array, got {offset.dtype}")
        try:
            shape = np.broadcast_shapes(scale.shape, offset.shape)
        except ValueError:
            raise TypeError(
                "trans_quant_param: offset shape must broadcast with scale shape "
                f"{scale.shape}, got {offset.shape}"
            ) from None
    return _trans_quant_param(
        scale, offset, shape=shape, round_mode=int(round_mode), x64=jax.config.jax_enable_x64
    )


@functools.partial(jax.jit, static_argnames=("shape", "round_mode", "x64"))
def _trans_quant_param(scale, offset, *, shape, round_mode, x64):
    bits = lax.bitcast_convert_type(numerics.widened(scale), _U32)
    low = _fp19_round_half_even(bits) if round_mode == 1 else bits & _u32(0xFFFFE000)
    high = jnp.full(shape, 1 << 14, _U32)  # bit 46
    if offset is not None:
        o = jnp.clip(jnp.round(numerics.widened(offset)), -256, 255).astype(jnp.int32)
        high = high | ((o.astype(_U32) & _u32(0x1FF)) << 5)  # bits 37..45
    low = jnp.broadcast_to(low, shape)
    if x64:
        return ((high.astype(jnp.uint64) << 32) | low.astype(jnp.uint64)).astype(jnp.int64)
    return jnp.stack([low, high], axis=-1)


def packed_scale_words(packed: ArrayLike) -> tuple[Array, Array]:
    """``(low, high)`` uint32 halves of packed 64-bit scales.

    Accepts ``int64``/``uint64`` arrays (JAX with x64, or NumPy) or the
    ``uint32 [..., 2]`` pairs ``trans_quant_param`` returns without x64.
    Each half has the packed array's shape (``shape[:-1]`` for pairs).
    """
    if isinstance(packed, (list, tuple)):  # Python ints as 64-bit words, not through int32
        packed = np.asarray(packed)
        if packed.dtype == object:
            raise TypeError("packed scales: Python integers must fit in 64 bits")
    if isinstance(packed, np.ndarray) and packed.dtype in (np.int64, np.uint64):
        words = packed.view(np.uint64)
        return (
            jnp.asarray((words & np.uint64(0xFFFFFFFF)).astype(np.uint32)),
            jnp.asarray((words >> np.uint64(32)).astype(np.uint32)),
        )
    packed = jnp.asarray(packed)
    if packed.dtype in (jnp.int64, jnp.uint64):
        words = packed.astype(jnp.uint64)
        return (
            (words & np.uint64(0xFFFFFFFF)).astype(_U32),
            (words >> np.uint64(32)).astype(_U32),
        )
    if packed.dtype == _U32 and packed.ndim >= 1 and packed.shape[-1] == 2:
        return packed[..., 0], packed[..., 1]
    raise TypeError(
        "packed scales must be int64/uint64 or uint32 (low, high) pairs [..., 2], got "
        f"{packed.dtype}{list(packed.shape)}"
    )


#: The 64-bit dtypes that hold packed scale words.
PACKED_WIDE = (np.dtype(np.int64), np.dtype(np.uint64))


def is_packed_scale(scale: Array | np.ndarray) -> bool:
    """Whether ``scale`` holds packed 64-bit words: int64/uint64, or uint32
    ``[..., 2]`` (low, high) pairs."""
    dtype = np.dtype(scale.dtype)
    pair = dtype == np.dtype(np.uint32) and scale.ndim >= 1 and scale.shape[-1] == 2
    return dtype in PACKED_WIDE or pair


def canonical_packed_scale(scale: ArrayLike) -> Array:
    """A scale as a JAX array; NumPy int64/uint64 packed words become uint32
    ``(low, high)`` pairs, which survive with x64 disabled."""
    if isinstance(scale, np.ndarray) and scale.dtype in PACKED_WIDE:
        low, high = packed_scale_words(scale)
        return jnp.stack([low, high], axis=-1)
    return jnp.asarray(scale)


def decode_scale(scale: Array) -> Array:
    """float32 ``[1]`` or ``[n]`` scale the hardware applies: the fp19 field
    ``float32(low & 0xFFFFE000)`` of packed words, or ``float32(bf16)``."""
    dtype = np.dtype(scale.dtype)
    if dtype in (np.dtype(jnp.bfloat16), np.dtype(np.float32)):
        return numerics.widened(scale).reshape(-1)
    if dtype in PACKED_WIDE:
        low = (scale.astype(jnp.uint64) & np.uint64(0xFFFFFFFF)).astype(jnp.uint32)
    else:
        low = scale[..., 0]
    return lax.bitcast_convert_type(low & np.uint32(0xFFFFE000), jnp.float32).reshape(-1)


def unpack_trans_quant_param(packed: ArrayLike) -> tuple[Array, Array]:
    """The inverse of :func:`trans_quant_param`, for inspection.

    Returns ``(scale, offset)``: the fp32 scale the hardware applies
    (``float32(low & 0xFFFFE000)``) and the int9 offset as int32, each of
    the packed array's shape (``shape[:-1]`` for uint32 pairs).
    """
    low, high = packed_scale_words(packed)
    scale = lax.bitcast_convert_type(low & _u32(0xFFFFE000), jnp.float32)
    raw = ((high >> 5) & _u32(0x1FF)).astype(jnp.int32)
    offset = jnp.where(raw >= 256, raw - 512, raw)
    return scale, offset


# --------------------------------------------------------------------------
# HiFloat8
#
# byte = S | Dot | Exp | Mant; the Dot prefix after the sign selects the
# exponent and mantissa widths: |E| 8..15 -> 4+1 bits, 4..7 -> 3+2,
# 2..3 -> 2+3, 1 -> 1+3, 0 -> 0+3, and 0000 + 3 bits for the denormals
# 2^-22 .. 2^-16. 0x00 = 0, 0x80 = NaN, 0x6F/0xEF = +-Inf.

HIF8_NAN = 0x80
HIF8_INF = 0x6F


def _hif8_table() -> np.ndarray:
    """float32 value of each of the 256 codes."""
    values = np.zeros(256, np.float32)
    for code in range(256):
        a = code & 0x7F
        sign = -1.0 if code & 0x80 else 1.0
        if code == HIF8_NAN:
            values[code] = np.nan
        elif a == HIF8_INF:
            values[code] = sign * np.inf
        elif a == 0:
            values[code] = 0.0
        elif a < 0x08:
            values[code] = sign * 2.0 ** (a - 23)
        else:
            if a >> 5 == 3:
                d, mw = 4, 1
            elif a >> 5 == 2:
                d, mw = 3, 2
            elif a >> 5 == 1:
                d, mw = 2, 3
            elif a >> 4 == 1:
                d, mw = 1, 3
            else:
                d, mw = 0, 3
            m = a & ((1 << mw) - 1)
            field = (a >> mw) & ((1 << d) - 1)
            if d == 0:
                e = 0
            else:
                magnitude = (1 << (d - 1)) | (field & ((1 << (d - 1)) - 1))
                e = -magnitude if field >> (d - 1) else magnitude
            values[code] = sign * 2.0**e * (1 + m / 2**mw)
    return values


_HIF8_VALUES = _hif8_table()


def hifloat8_decode(codes: ArrayLike, dtype: DTypeLike = jnp.float32) -> Array:
    """HiFloat8 ``uint8`` codes (any shape) -> values of ``dtype``, the same
    shape (exact for float32)."""
    codes = jnp.asarray(codes)
    if codes.dtype != jnp.uint8:
        raise TypeError(f"hifloat8_decode: codes must be uint8, got {codes.dtype}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"hifloat8_decode: dtype must be a floating dtype, got {np.dtype(dtype)}")
    return _hifloat8_decode(codes, dtype=np.dtype(dtype))


@functools.partial(jax.jit, static_argnames="dtype")
def _hifloat8_decode(codes, *, dtype):
    return jnp.asarray(_HIF8_VALUES)[codes.astype(jnp.int32)].astype(dtype)


def hifloat8_encode(x: ArrayLike) -> Array:
    """Values (any shape) -> HiFloat8 ``uint8`` codes of the same shape,
    rounding half away from zero.

    NaN -> 0x80; |x| >= 40960 (and Inf) -> +-Inf (0x6F / 0xEF); |x| < 2^-23
    -> 0x00. float16/bfloat16 inputs are converted to float32 exactly first.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"hifloat8_encode: x must be a float array, got {x.dtype}")
    return _hifloat8_encode(x)


@jax.jit
def _hifloat8_encode(x):
    bits = lax.bitcast_convert_type(numerics.widened(x), _U32)
    sign = ((bits >> 31) << 7).astype(jnp.int32)
    biased = ((bits >> 23) & _u32(0xFF)).astype(jnp.int32)
    mantissa = (bits & _u32(0x7FFFFF)).astype(jnp.int32)
    e = biased - 127

    # Normal band, |E| <= 15: keep mw mantissa bits, add half an ulp (ties
    # away), carry into the exponent.
    def width(exp):
        a = jnp.abs(exp)
        return jnp.where(a <= 3, 3, jnp.where(a <= 7, 2, 1))

    mw = width(e)
    drop = 23 - mw
    rounded = (mantissa + (1 << (drop - 1))) >> drop
    carry = rounded >> mw
    e_n = e + carry
    m_n = jnp.where(carry == 1, 0, rounded)
    mw_n = width(e_n)
    a_n = jnp.abs(e_n)
    esign = (e_n < 0).astype(jnp.int32)
    code_normal = jnp.select(
        [a_n == 0, a_n == 1, a_n <= 3, a_n <= 7],
        [
            0x08 | m_n,
            0x10 | (esign << 3) | m_n,
            0x20 | (((esign << 1) | (a_n & 1)) << 3) | m_n,
            0x40 | (((esign << 2) | (a_n & 3)) << 2) | m_n,
        ],
        0x60 | (((esign << 3) | (a_n & 7)) << 1) | m_n,
    )
    # E == 15 with mantissa 1 is the Inf slot; a carry past 15 overflows.
    overflow_normal = (e_n > 15) | ((e_n == 15) & (m_n == 1) & (mw_n == 1))
    code_normal = jnp.where(overflow_normal, HIF8_INF, code_normal)

    # Denormal band, -23 <= E <= -16: 2^E, rounded up to 2^(E+1) when the
    # first fraction bit is set (|x| >= 1.5 * 2^E).
    up = (mantissa >> 22) & 1
    e_d = jnp.where(e == -23, -22, e + up)
    code_denormal = jnp.where(e_d == -15, 0x7E, e_d + 23)

    is_nan = (biased == 255) & (mantissa != 0)
    is_inf = ((biased == 255) & (mantissa == 0)) | (e > 15)
    code = jnp.where(e >= -15, code_normal, jnp.where(e >= -23, code_denormal, 0))
    code = jnp.where(is_inf, HIF8_INF, code)
    code = jnp.where(code == 0, 0, code | sign)
    code = jnp.where(is_nan, HIF8_NAN, code)
    return code.astype(jnp.uint8)


# --------------------------------------------------------------------------
# group_size


def group_size(m: int, n: int, k: int) -> int:
    """Packs group sizes as ``k | n << 16 | m << 32`` (each 0..65535; 0: infer)."""
    for name, v in (("m", m), ("n", n), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 0xFFFF:
            raise ValueError(f"group_size: {name} must be an int in [0, 65535], got {v!r}")
    return int(k) | int(n) << 16 | int(m) << 32


def unpack_group_size(value: int) -> tuple[int, int, int]:
    """``(m, n, k)`` fields of a packed group size."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"unpack_group_size: group size must be a non-negative int, got {value!r}")
    value = int(value)
    if value >> 48:
        raise ValueError(f"unpack_group_size: bits above 47 must be 0, got {value:#x}")
    return (value >> 32) & 0xFFFF, (value >> 16) & 0xFFFF, value & 0xFFFF


def resolve_group_size(
    value: int, dims: Sequence[int], scale_dims: Sequence[int]
) -> tuple[int, int, int]:
    """``(m, n, k)`` group sizes with every 0 field inferred.

    A 0 field is ``dim // scale_dim`` of that direction and must divide
    exactly (CANN's rule), e.g. ``dims=(m, n, k)`` of the matmul and
    ``scale_dims`` the matching extents of x1Scale/x2Scale.
    """
    if len(dims) != 3 or len(scale_dims) != 3:
        raise ValueError(
            f"group_size: dims and scale_dims must each be (m, n, k), got {tuple(dims)} and "
            f"{tuple(scale_dims)}"
        )
    fields = unpack_group_size(value)
    out = []
    for name, g, d, s in zip("mnk", fields, dims, scale_dims, strict=True):
        if g == 0:
            if s <= 0 or d % s != 0:
                raise ValueError(
                    f"group_size: group size {name} cannot be inferred: {name} = {d} is not a "
                    f"multiple of its scale extent {s}; pass it explicitly"
                )
            g = d // s
        out.append(int(g))
    return tuple(out)


# --------------------------------------------------------------------------
# Perblock and MX quantization

_FP8_DTYPES = {
    np.dtype(ml_dtypes.float8_e4m3fn): jnp.float8_e4m3fn,
    np.dtype(ml_dtypes.float8_e5m2): jnp.float8_e5m2,
}


def _is_hifloat8(dtype) -> bool:
    return isinstance(dtype, str) and dtype == "hifloat8"


def perblock_quantize(
    x: ArrayLike, *, block: int = 128, dtype: DTypeLike = jnp.float8_e4m3fn
) -> tuple[Array, Array]:
    """Block quantization of the last two dimensions in ``block x block`` tiles.

    Each tile gets the fp32 scale ``amax * float32(1 / max(dtype))``, where
    ``amax`` is the largest magnitude among the tile's FINITE values (scale 1
    when there is none or it is 0), and the values ``x / scale`` clipped to
    the format's finite range and rounded to the dtype (half to even for fp8;
    half away for ``dtype="hifloat8"``, returned as uint8 codes). Non-finite
    elements never spoil their tile: NaN encodes as the format's NaN and
    +-Inf saturates to +-max(dtype), while the finite neighbours keep the
    values they would have without them (docs/semantics.md §4.3).

    Args:
      x: [..., r, c] float array.

    Returns:
      ``(values [..., r, c], scales float32 [..., ceil(r/block), ceil(c/block)])``;
      ``x ~= values * scales`` repeated over each tile (tail tiles are shorter).
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise TypeError(f"perblock_quantize: x must be at least 2-D, got shape {x.shape}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"perblock_quantize: block must be a positive int, got {block!r}")
    block = int(block)
    hif8 = _is_hifloat8(dtype)
    if not hif8 and np.dtype(dtype) not in _FP8_DTYPES:
        raise ValueError(
            "perblock_quantize: dtype must be float8_e4m3fn, float8_e5m2 or 'hifloat8', "
            f"got {dtype!r}"
        )
    return _perblock_quantize(x, block=block, dtype="hifloat8" if hif8 else np.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("block", "dtype"))
def _perblock_quantize(x, *, block, dtype):
    hif8 = _is_hifloat8(dtype)
    fmax = 32768.0 if hif8 else float(ml_dtypes.finfo(dtype).max)
    *lead, r, c = x.shape
    rb, cb = -(-r // block), -(-c // block)
    xf = numerics.widened(x)
    # The scale comes from the finite values only (docs/semantics.md §4.3).
    finite_abs = jnp.where(jnp.isfinite(xf), jnp.abs(xf), np.float32(0.0))
    padded = jnp.pad(finite_abs, [(0, 0)] * len(lead) + [(0, rb * block - r), (0, cb * block - c)])
    tiles = padded.reshape(*lead, rb, block, cb, block)
    amax = jnp.max(tiles, axis=(-3, -1))
    # At least the smallest normal float32: XLA:CPU flushes subnormals, and a
    # tile whose amax is below fmax * 2^-126 would get scale 0 (and 0 / 0).
    tiny = np.float32(np.finfo(np.float32).tiny)
    scales = jnp.where(amax > 0, jnp.maximum(amax * np.float32(1.0 / fmax), tiny), np.float32(1.0))
    full = jnp.repeat(jnp.repeat(scales, block, axis=-2), block, axis=-1)[..., :r, :c]
    scaled = jnp.clip(numerics.divide(xf, full), -fmax, fmax)
    values = _hifloat8_encode(scaled) if hif8 else scaled.astype(dtype)
    return values, scales


_MX_DTYPES = {
    np.dtype(ml_dtypes.float8_e4m3fn): (jnp.float8_e4m3fn, 8),
    np.dtype(ml_dtypes.float8_e5m2): (jnp.float8_e5m2, 15),
    np.dtype(ml_dtypes.float4_e2m1fn): (jnp.float4_e2m1fn, 2),
}
MX_BLOCK = 32


def mx_quantize(
    x: ArrayLike, *, dtype: DTypeLike = jnp.float8_e4m3fn, axis: int = -1
) -> tuple[Array, Array]:
    """MX quantization in blocks of 32 along ``axis`` with e8m0 scales.

    For each block the shared scale is ``2^(E(amax) - emax)`` where ``E`` is
    the unbiased exponent of ``bfloat16(amax)`` and ``emax`` the element
    format's largest exponent (8 for e4m3fn, 15 for e5m2, 2 for e2m1), the
    biased code clamped at 0; elements are ``x / scale`` rounded half to even
    and saturated to the format's range. As in OCP MX v1.0 (and its
    reference implementation), a block holding a NaN or +-Inf gets the NaN
    scale (e8m0 code 0xFF), so every value of that block dequantizes to NaN;
    its element codes are computed from the block's finite values (so the
    other 31 values are not flushed to 0). docs/semantics.md §3.2.

    Args:
      x: 2-D float array; ``axis`` is the contraction dimension k: -1 / 1 for
        x1 ``(m, k)`` or a transposed x2 ``(n, k)``, 0 for x2 ``(k, n)``.
      dtype: float8_e4m3fn, float8_e5m2 or float4_e2m1fn.

    Returns:
      ``(values, scales)``: values of ``dtype`` with x's shape; float8_e8m0fnu
      scales ``[rows, ceil(k/64), 2]`` for axis -1 and ``[ceil(k/64), n, 2]``
      for axis 0, where ``[..., j, t]`` scales the block ``2*j + t``. When
      ceil(k/32) is odd the last pad entry is unused and set to 2^0.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise TypeError(f"mx_quantize: x must be 2-D, got shape {x.shape}")
    if axis not in (-1, 0, 1):
        raise ValueError(f"mx_quantize: axis must be -1, 0 or 1, got {axis!r}")
    key = np.dtype(dtype)
    if key not in _MX_DTYPES:
        raise ValueError(
            f"mx_quantize: dtype must be float8_e4m3fn, float8_e5m2 or float4_e2m1fn, got {dtype!r}"
        )
    return _mx_quantize(x, dtype=key, axis=axis)


@functools.partial(jax.jit, static_argnames=("dtype", "axis"))
def _mx_quantize(x, *, dtype, axis):
    key = dtype
    jdtype, emax = _MX_DTYPES[key]
    fmax = float(ml_dtypes.finfo(key).max)
    rows_last = x if axis in (-1, 1) else x.T
    rows, k = rows_last.shape
    nb = -(-k // MX_BLOCK)
    nb_even = 2 * (-(-k // (2 * MX_BLOCK)))
    xf = numerics.widened(rows_last)
    # OCP MX v1.0: a block holding a NaN or +-Inf gets the NaN scale (e8m0
    # 0xFF), so the whole block decodes as NaN; its element codes are those
    # of its finite values' amax (docs/semantics.md §3.2).
    finite = jnp.isfinite(xf)
    finite_abs = jnp.where(finite, jnp.abs(xf), np.float32(0.0))
    padded = jnp.pad(finite_abs, [(0, 0), (0, nb * MX_BLOCK - k)])
    amax = jnp.max(padded.reshape(rows, nb, MX_BLOCK), axis=-1)
    special = ~jnp.all(
        jnp.pad(finite, [(0, 0), (0, nb * MX_BLOCK - k)], constant_values=True).reshape(
            rows, nb, MX_BLOCK
        ),
        axis=-1,
    )
    amax_bits = lax.bitcast_convert_type(amax.astype(jnp.bfloat16), jnp.uint16)
    biased = ((amax_bits >> 7) & 0xFF).astype(jnp.int32)
    code = jnp.maximum(biased - emax, 0)
    # x * 2^(127 - code): an exact power-of-two multiply (normal for every
    # code a finite amax produces).
    inverse = lax.bitcast_convert_type(((254 - code) << 23).astype(_U32), jnp.float32)
    full = jnp.repeat(inverse, MX_BLOCK, axis=-1)[:, :k]
    values = jnp.clip(xf * full, -fmax, fmax)
    if key == np.dtype(ml_dtypes.float4_e2m1fn):
        values = jnp.where(jnp.isnan(values), np.float32(0.0), values)  # e2m1 has no NaN
    values = values.astype(jdtype)
    codes = jnp.where(special, 255, code)
    codes = jnp.pad(codes, [(0, 0), (0, nb_even - nb)], constant_values=127)
    scales = lax.bitcast_convert_type(codes.astype(jnp.uint8), jnp.float8_e8m0fnu)
    scales = scales.reshape(rows, nb_even // 2, 2)
    if axis == 0:
        return values.T, jnp.transpose(scales, (1, 0, 2))
    return values, scales


# --------------------------------------------------------------------------
# FRACTAL_NZ


def to_fractal_nz(w: ArrayLike) -> Array:
    """ND ``[..., r, c]`` -> FRACTAL_NZ ``[..., ceil(c/c0), ceil(r/16), 16, c0]``.

    ``c0 = 32 bytes / itemsize`` (16 for fp16/bf16, 32 for int8, 8 for fp32);
    ``nz[j // c0, i // 16, i % 16, j % c0] = w[i, j]``, zero padded.
    """
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise TypeError(f"to_fractal_nz: w must be at least 2-D, got shape {w.shape}")
    return _to_fractal_nz(w)


@jax.jit
def _to_fractal_nz(w):
    *lead, r, c = w.shape
    c0 = nz_block_width(w.dtype)
    r1, c1 = -(-r // 16), -(-c // c0)
    padded = jnp.pad(w, [(0, 0)] * len(lead) + [(0, r1 * 16 - r), (0, c1 * c0 - c)])
    tiles = padded.reshape(*lead, r1, 16, c1, c0)
    nd = len(lead)
    perm = list(range(nd)) + [nd + 2, nd, nd + 1, nd + 3]
    return jnp.transpose(tiles, perm)


def from_fractal_nz(w_nz: ArrayLike, shape: Sequence[int]) -> Array:
    """FRACTAL_NZ ``[..., c1, r1, 16, c0]`` -> ND of ``shape`` ``[..., r, c]``."""
    w_nz = jnp.asarray(w_nz)
    shape = tuple(int(s) for s in shape)
    if w_nz.ndim < 4 or len(shape) != w_nz.ndim - 2:
        raise TypeError(
            f"from_fractal_nz: w_nz [..., c1, r1, 16, c0] and shape [..., r, c] do not match: "
            f"{w_nz.shape} vs {shape}"
        )
    *lead, c1, r1, r0, c0 = w_nz.shape
    r, c = shape[-2:]
    blocks = (r0, c0, r1, c1) == (16, nz_block_width(w_nz.dtype), -(-r // 16), -(-c // c0))
    if tuple(lead) != shape[:-2] or not blocks:
        raise TypeError(
            f"from_fractal_nz: w_nz shape {w_nz.shape} is not the FRACTAL_NZ layout of "
            f"{shape} for {w_nz.dtype}"
        )
    return _from_fractal_nz(w_nz, shape=shape)


@functools.partial(jax.jit, static_argnames="shape")
def _from_fractal_nz(w_nz, *, shape):
    *lead, c1, r1, r0, c0 = w_nz.shape
    r, c = shape[-2:]
    nd = len(lead)
    perm = list(range(nd)) + [nd + 1, nd + 2, nd, nd + 3]
    tiles = jnp.transpose(w_nz, perm).reshape(*lead, r1 * 16, c1 * c0)
    return tiles[..., :r, :c]
