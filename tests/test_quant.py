"""jax_mc2.quant, bit for bit, against NumPy models written from
docs/semantics.md §1 (TransQuantParam), §2 (HiFloat8), §3 (MX), §4
(perblock, groupSize) and §9 (FRACTAL_NZ)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import slow

from jax_mc2 import quant

# --------------------------------------------------------------------------
# TransQuantParam


def _oracle_trans_quant_param(scale, offset, round_mode):
    """One packed word per element, with Python integers (§1.1 pseudo-code)."""
    u = int(np.float32(scale).view(np.uint32))
    if round_mode == 0:
        s19 = u & 0xFFFFE000
    else:
        sign, e, m = u >> 31, (u >> 23) & 0xFF, u & 0x7FFFFF
        if e == 0:
            f19 = sign << 18
        elif e == 255:
            f19 = sign << 18 | e << 10 | (m >> 13)
        else:
            mt, rb, sticky = m >> 13, (m >> 12) & 1, m & 0xFFF
            if rb and (sticky or (mt & 1)):
                mt += 1
                if mt == 1024:
                    mt, e = 0, e + 1
            f19 = sign << 18 | e << 10 | mt
        s19 = f19 << 13
    out = s19 | (1 << 46)
    if offset is not None:
        o = int(np.clip(np.rint(np.float32(offset)), -256, 255))
        out |= (o & 0x1FF) << 37
    return out


EDGE_SCALES = np.array(
    [
        1.0,
        0.5,
        3.14159,
        -2.5e-3,
        1e-30,
        0.0,
        -0.0,
        1e-40,
        np.inf,
        -np.inf,
        3.4e38,
        np.float32(1.0) + np.float32(2**-11),
        np.float32(1.0) + np.float32(3 * 2**-11),
        np.float32(2.0) - np.float32(2**-23),
        np.float32(3.4028235e38),
    ],
    np.float32,
)


def _words(packed):
    low, high = quant.packed_scale_words(packed)
    return np.asarray(low).astype(np.uint64) | (np.asarray(high).astype(np.uint64) << 32)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("round_mode", [0, 1])
@pytest.mark.parametrize("with_offset", [False, True])
def test_trans_quant_param_bits(x64, round_mode, with_offset):
    rng = np.random.default_rng(round_mode)
    scale = np.concatenate([EDGE_SCALES, rng.standard_normal(200).astype(np.float32)])
    scale = np.concatenate(
        [scale, (rng.random(50) * 2.0 ** rng.integers(-30, 30, 50)).astype(np.float32)]
    )
    offset = None
    if with_offset:
        offset = np.concatenate(
            [
                np.array([0.5, 1.5, 2.5, -0.5, -1.5, 255.4, 255.6, -256.4, -300, 300], np.float32),
                (rng.standard_normal(scale.size - 10) * 200).astype(np.float32),
            ]
        )
    with jax.enable_x64(x64):
        packed = quant.trans_quant_param(scale, offset, round_mode=round_mode)
        if x64:
            assert packed.dtype == jnp.int64 and packed.shape == scale.shape
        else:
            assert packed.dtype == jnp.uint32 and packed.shape == (*scale.shape, 2)
        got = _words(packed)
        back_scale, back_offset = quant.unpack_trans_quant_param(packed)
    want = np.array(
        [
            _oracle_trans_quant_param(s, None if offset is None else offset[i], round_mode)
            for i, s in enumerate(scale)
        ],
        np.uint64,
    )
    np.testing.assert_array_equal(got, want)
    # The inverse: the fp19 scale the hardware applies and the int9 offset.
    want_scale = (want & np.uint64(0xFFFFE000)).astype(np.uint32).view(np.float32)
    np.testing.assert_array_equal(
        np.asarray(back_scale).view(np.uint32), want_scale.view(np.uint32)
    )
    raw = ((want >> np.uint64(37)) & np.uint64(0x1FF)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(back_offset), np.where(raw >= 256, raw - 512, raw))


def test_trans_quant_param_shapes_and_numpy_words():
    p = quant.trans_quant_param(np.full((1,), 0.25, np.float32), np.arange(4, dtype=np.float32))
    assert p.shape == (4, 2)  # a length-1 scale broadcast over the offsets
    scale, offset = quant.unpack_trans_quant_param(p)
    np.testing.assert_array_equal(np.asarray(scale), 0.25)
    np.testing.assert_array_equal(np.asarray(offset), [0, 1, 2, 3])
    assert quant.trans_quant_param(np.ones((1, 8), np.float32)).shape == (1, 8, 2)
    # NumPy int64 words (as torch_npu returns them) read the same way.
    words = np.array([_oracle_trans_quant_param(0.75, -3, 0)], np.uint64).view(np.int64)
    scale, offset = quant.unpack_trans_quant_param(words)
    assert float(scale[0]) == 0.75 and int(offset[0]) == -3


def test_trans_quant_param_errors():
    with pytest.raises(ValueError, match="round_mode must be 0 or 1, got 2"):
        quant.trans_quant_param(np.ones(2, np.float32), round_mode=2)
    with pytest.raises(TypeError, match="scale must be a float array, got int32"):
        quant.trans_quant_param(np.ones(2, np.int32))
    with pytest.raises(TypeError, match=r"scale must be 1-D \(n,\) or 2-D \(g, n\)"):
        quant.trans_quant_param(np.ones((1, 2, 3), np.float32))
    with pytest.raises(TypeError, match="offset shape must broadcast with scale shape"):
        quant.trans_quant_param(np.ones(3, np.float32), np.ones(2, np.float32))
    with pytest.raises(TypeError, match=r"packed scales must be int64/uint64 or uint32"):
        quant.packed_scale_words(np.ones(3, np.float32))


# --------------------------------------------------------------------------
# HiFloat8


def _hif8_all_values():
    """{code: value} built forwards from the format: for every (E, m) the code
    is assembled from its Dot prefix, exponent field and mantissa."""
    table = {0x00: 0.0}
    for e in range(-15, 16):
        a = abs(e)
        if a == 0:
            prefix, d, mw = 0b0001, 0, 3
        elif a == 1:
            prefix, d, mw = 0b001, 1, 3
        elif a <= 3:
            prefix, d, mw = 0b01, 2, 3
        elif a <= 7:
            prefix, d, mw = 0b10, 3, 2
        else:
            prefix, d, mw = 0b11, 4, 1
        # Exponent field: the sign of E, then |E| without its leading 1.
        field = ((1 if e < 0 else 0) << (d - 1) | (a & ((1 << (d - 1)) - 1))) if d else 0
        for m in range(1 << mw):
            code = prefix << (d + mw) | field << mw | m
            if code == 0x6F:
                continue  # the Inf slot
            table[code] = 2.0**e * (1 + m / 2**mw)
    for M in range(1, 8):
        table[M] = 2.0 ** (M - 23)
    return table


def test_hifloat8_decode_all_codes():
    table = _hif8_all_values()
    assert len(table) == 127  # +0, 7 denormals, 119 normals
    got = np.asarray(quant.hifloat8_decode(np.arange(256, dtype=np.uint8)))
    for code in range(256):
        a = code & 0x7F
        if code == 0x80:
            assert np.isnan(got[code])
        elif a == 0x6F:
            assert got[code] == (-np.inf if code & 0x80 else np.inf)
        elif a == 0:
            assert got[code] == 0.0
        else:
            assert got[code] == (-1 if code & 0x80 else 1) * table[a], hex(code)
    # Check-points listed in docs/semantics.md §2.1.
    points = {
        0x08: 1,
        0x10: 2,
        0x18: 0.5,
        0x20: 4,
        0x28: 8,
        0x30: 0.25,
        0x38: 0.125,
        0x40: 16,
        0x48: 64,
        0x50: 1 / 16,
        0x54: 1 / 32,
        0x58: 1 / 64,
        0x5C: 1 / 128,
        0x60: 256,
        0x6E: 32768,
        0x70: 2**-8,
        0x7E: 2**-15,
        0x07: 2**-16,
        0x01: 2**-22,
    }
    for code, value in points.items():
        assert got[code] == value, hex(code)
    assert (
        np.asarray(quant.hifloat8_decode(np.array([0x08], np.uint8), jnp.bfloat16)).dtype
        == jnp.bfloat16
    )


def _oracle_hif8_encode(values):
    """Nearest code, ties away from zero; the Inf slot counts as 1.5 * 2^15."""
    table = _hif8_all_values()
    codes = np.array(sorted(table, key=table.get) + [0x6F])
    mags = np.array([table[c] for c in codes[:-1]] + [1.5 * 2.0**15])
    out = np.zeros(values.shape, np.uint8)
    for idx, v in np.ndenumerate(values.astype(np.float64)):
        if np.isnan(v):
            out[idx] = 0x80
            continue
        a = abs(v)
        j = np.searchsorted(mags, a)  # mags[j-1] < a <= mags[j]
        if j >= len(mags):
            c = 0x6F
        elif mags[j] == a or j == 0:
            c = codes[j]
        else:
            lo, hi = mags[j - 1], mags[j]
            c = codes[j] if a - lo >= hi - a else codes[j - 1]
        out[idx] = 0 if c == 0 else (c | (0x80 if v < 0 else 0))
    return out


@pytest.mark.slow
def test_hifloat8_encode_every_fp16():
    x = np.arange(0x10000, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = np.asarray(quant.hifloat8_encode(x))
    np.testing.assert_array_equal(got, _oracle_hif8_encode(x))


def test_hifloat8_encode_fp32_and_bf16():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(3000) * 2.0 ** rng.integers(-26, 17, 3000)).astype(np.float32)
    edges = np.array(
        [
            40960,
            40959.996,
            36864,
            2**-23,
            2**-23 * 0.999,
            1.5 * 2**-16,
            1.5 * 2**-16 * 0.9999,
            1.75,
            1.0625,
            1.1875,
            np.inf,
            -np.inf,
            np.nan,
            -0.0,
            1e-45,
        ],
        np.float32,
    )
    x = np.concatenate([x, edges, -edges])
    np.testing.assert_array_equal(np.asarray(quant.hifloat8_encode(x)), _oracle_hif8_encode(x))
    xb = x.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(quant.hifloat8_encode(xb)), _oracle_hif8_encode(xb.astype(np.float32))
    )


def test_hifloat8_round_trip_and_errors():
    codes = np.arange(256, dtype=np.uint8)
    finite = np.array([c for c in codes if c not in (0x80, 0x6F, 0xEF)], np.uint8)
    np.testing.assert_array_equal(
        np.asarray(quant.hifloat8_encode(quant.hifloat8_decode(finite))), finite
    )
    with pytest.raises(TypeError, match="codes must be uint8, got int32"):
        quant.hifloat8_decode(np.ones(2, np.int32))
    with pytest.raises(TypeError, match="x must be a float array"):
        quant.hifloat8_encode(np.ones(2, np.int32))


# --------------------------------------------------------------------------
# group_size


@pytest.mark.parametrize("shape", [(128, 4), (128, 256), (8192, 4)])
def test_perblock_quantize_divides_by_the_scale(shape):
    """x / scale is the correctly rounded quotient: XLA:CPU turned the
    division into a multiplication by the reciprocal when one tile spans
    every column, which here moves 368 (a tie between e4m3fn's 352 and 384)
    to 352."""
    amax, x = np.float32(497.70462), np.float32(408.8288)
    scale = amax * np.float32(1.0 / 448.0)
    assert x / scale == np.float32(368.0)  # the premise: an exact tie
    a = np.zeros(shape, np.float32)
    a[0, 0], a[1, 0] = amax, x
    values, scales = quant.perblock_quantize(a)
    assert np.asarray(scales)[0, 0] == scale
    assert float(np.asarray(values, np.float32)[1, 0]) == 384.0  # half to even


def test_group_size():
    assert quant.group_size(128, 128, 128) == 549764202624
    assert quant.group_size(1, 1, 32) == 4295032864
    assert quant.unpack_group_size(549764202624) == (128, 128, 128)
    assert quant.unpack_group_size(4295032864) == (1, 1, 32)
    assert quant.unpack_group_size(quant.group_size(0, 7, 65535)) == (0, 7, 65535)
    # Zero fields are inferred as dim / scale extent, which must divide.
    assert quant.resolve_group_size(quant.group_size(0, 0, 128), (256, 384, 1000), (2, 3, 8)) == (
        128,
        128,
        128,
    )
    with pytest.raises(
        ValueError,
        match="group size k cannot be inferred: k = 1000 is not a multiple of its scale extent 7",
    ):
        quant.resolve_group_size(0, (256, 384, 1000), (2, 3, 7))
    with pytest.raises(ValueError, match=r"m must be an int in \[0, 65535\], got 65536"):
        quant.group_size(65536, 1, 1)
    with pytest.raises(ValueError, match="bits above 47 must be 0"):
        quant.unpack_group_size(1 << 50)


# --------------------------------------------------------------------------
# Perblock and MX


def _oracle_perblock(x, dtype, block=128):
    fmax = np.float32(ml_dtypes.finfo(dtype).max)
    r, c = x.shape
    rb, cb = -(-r // block), -(-c // block)
    scales = np.ones((rb, cb), np.float32)
    values = np.zeros(x.shape, dtype)
    for i in range(rb):
        for j in range(cb):
            tile = x[i * block : (i + 1) * block, j * block : (j + 1) * block].astype(np.float32)
            amax = np.abs(tile).max()
            s = np.float32(amax * np.float32(1 / np.float64(fmax))) if amax > 0 else np.float32(1)
            scales[i, j] = s
            values[i * block : (i + 1) * block, j * block : (j + 1) * block] = np.clip(
                tile / s, -fmax, fmax
            ).astype(dtype)
    return values, scales


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
@pytest.mark.parametrize("shape", [slow((128, 256)), (200, 130), (5, 7)])
def test_perblock_quantize(dtype, shape):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x[:64, :64] = 0  # an all-zero tile gets scale 1
    values, scales = quant.perblock_quantize(x, dtype=dtype)
    want_v, want_s = _oracle_perblock(x, dtype)
    np.testing.assert_array_equal(np.asarray(scales), want_s)
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), want_v.view(np.uint8))
    # 3-D: the leading dimension is a batch.
    v3, s3 = quant.perblock_quantize(np.stack([x, 2 * x]), dtype=dtype)
    assert v3.shape == (2, *shape) and s3.shape == (2, *want_s.shape)
    np.testing.assert_array_equal(np.asarray(s3[1]), _oracle_perblock(2 * x, dtype)[1])


def test_perblock_quantize_hifloat8_and_errors():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((130, 3)).astype(np.float32)
    codes, scales = quant.perblock_quantize(x, dtype="hifloat8")
    assert codes.dtype == jnp.uint8 and scales.shape == (2, 1)
    s = np.asarray(scales)
    full = np.repeat(s, 128, axis=0)[:130]
    np.testing.assert_array_equal(
        np.asarray(codes), _oracle_hif8_encode(np.clip(x / full, -32768, 32768))
    )
    with pytest.raises(ValueError, match="dtype must be float8_e4m3fn, float8_e5m2 or 'hifloat8'"):
        quant.perblock_quantize(x, dtype=jnp.int8)
    with pytest.raises(TypeError, match="x must be at least 2-D"):
        quant.perblock_quantize(np.ones(4, np.float32))


_EMAX = {
    np.dtype(ml_dtypes.float8_e4m3fn): 8,
    np.dtype(ml_dtypes.float8_e5m2): 15,
    np.dtype(ml_dtypes.float4_e2m1fn): 2,
}


def _oracle_mx(x, dtype):
    """§3: per 32-block e8m0 = max(exp_bits(bf16(amax)) - emax, 0); values =
    x * 2^(127 - e8m0) rounded half even (saturated); scales [rows, ceil(k/64), 2]."""
    rows, k = x.shape
    nb = -(-k // 32)
    fmax = np.float32(ml_dtypes.finfo(dtype).max)
    codes = np.full((rows, 2 * -(-k // 64)), 127, np.uint8)
    values = np.zeros(x.shape, dtype)
    for i in range(rows):
        for b in range(nb):
            blk = x[i, 32 * b : 32 * b + 32].astype(np.float32)
            amax = np.float32(np.abs(blk).max()).astype(ml_dtypes.bfloat16)
            exp_bits = (int(amax.view(np.uint16)) >> 7) & 0xFF
            e = max(exp_bits - _EMAX[np.dtype(dtype)], 0)
            codes[i, b] = e
            scaled = blk * np.float32(2.0 ** (127 - e))
            values[i, 32 * b : 32 * b + 32] = np.clip(scaled, -fmax, fmax).astype(dtype)
    return values, codes.reshape(rows, -1, 2)


@pytest.mark.parametrize(
    "dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float4_e2m1fn]
)
@pytest.mark.parametrize("k", [32, slow(64), 100, slow(256)])
def test_mx_quantize(dtype, k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((6, k)) * 2.0 ** rng.integers(-10, 10, (6, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    values, scales = quant.mx_quantize(x, dtype=dtype)
    want_v, want_codes = _oracle_mx(x, dtype)
    assert values.dtype == dtype and scales.dtype == jnp.float8_e8m0fnu
    assert scales.shape == (6, -(-k // 64), 2)
    np.testing.assert_array_equal(np.asarray(scales).view(np.uint8), want_codes)
    np.testing.assert_array_equal(np.asarray(values).astype(np.float32), want_v.astype(np.float32))
    # x2 (k, n) quantized along k: scales [ceil(k/64), n, 2].
    v0, s0 = quant.mx_quantize(x.T, dtype=dtype, axis=0)
    assert s0.shape == (-(-k // 64), 6, 2)
    np.testing.assert_array_equal(np.asarray(s0).view(np.uint8), want_codes.transpose(1, 0, 2))
    np.testing.assert_array_equal(np.asarray(v0).astype(np.float32), want_v.astype(np.float32).T)


def test_mx_quantize_errors():
    with pytest.raises(
        ValueError, match="dtype must be float8_e4m3fn, float8_e5m2 or float4_e2m1fn"
    ):
        quant.mx_quantize(np.ones((2, 32), np.float32), dtype=jnp.bfloat16)
    with pytest.raises(TypeError, match="x must be 2-D"):
        quant.mx_quantize(np.ones(32, np.float32))
    with pytest.raises(ValueError, match="axis must be -1, 0 or 1"):
        quant.mx_quantize(np.ones((2, 32), np.float32), axis=2)


# --------------------------------------------------------------------------
# FRACTAL_NZ


@pytest.mark.parametrize(
    "dtype,c0", [(np.float16, 16), (ml_dtypes.bfloat16, 16), (np.int8, 32), (np.float32, 8)]
)
@pytest.mark.parametrize("shape", [(16, 32), (20, 40), (1, 1), (33, 100)])
def test_fractal_nz(dtype, c0, shape):
    rng = np.random.default_rng(3)
    nd = (rng.standard_normal(shape) * 50).astype(dtype)
    nz = np.asarray(quant.to_fractal_nz(nd))
    r, c = shape
    assert nz.shape == (-(-c // c0), -(-r // 16), 16, c0)
    want = np.zeros(nz.shape, dtype)
    for i in range(r):
        for j in range(c):
            want[j // c0, i // 16, i % 16, j % c0] = nd[i, j]
    np.testing.assert_array_equal(nz, want)
    np.testing.assert_array_equal(np.asarray(quant.from_fractal_nz(nz, shape)), nd)
    # Leading batch dimensions are untouched.
    batched = np.asarray(quant.to_fractal_nz(np.stack([nd, nd])))
    np.testing.assert_array_equal(batched[1], want)
    np.testing.assert_array_equal(np.asarray(quant.from_fractal_nz(batched, (2, *shape))[0]), nd)


def test_fractal_nz_errors():
    with pytest.raises(TypeError, match="w must be at least 2-D"):
        quant.to_fractal_nz(np.ones(4, np.float16))
    with pytest.raises(TypeError, match="is not the FRACTAL_NZ layout of"):
        quant.from_fractal_nz(np.ones((2, 2, 16, 16), np.float16), (40, 40))
    # Leading (batch) dimensions must match too.
    batched = quant.to_fractal_nz(np.ones((2, 16, 16), np.float16))
    with pytest.raises(TypeError, match="is not the FRACTAL_NZ layout of"):
        quant.from_fractal_nz(batched, (3, 16, 16))
