"""quant_matmul_all_reduce_v4, the fp8 / hifloat8 / MX rows of seed 003
(Ascend 950), against an independent NumPy model of the seed's formulas 4-8.

The model decodes fp8 / fp4 / e8m0 with ml_dtypes and HiFloat8 with a table
built here from the bit format (docs/semantics.md §2.1). Test values lie on a
grid on which every fp32 partial sum is exact, so one rank's result is
bit-exact whatever order an implementation accumulates in.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest
from conftest import ALL_IMPLEMENTATIONS, IMPLEMENTATIONS, make_mesh
from hlo import reductions
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2
from jax_mc2.implementations import ffi as _ffi

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E5M2 = np.dtype(ml_dtypes.float8_e5m2)
E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
F16, BF16, F32 = np.dtype(np.float16), oracle.BF16, np.dtype(np.float32)
GS_PERBLOCK = 128 | 128 << 16 | 128 << 32  # group_size (m, n, k) = (128, 128, 128)
GS_MX = 32 | 1 << 16 | 1 << 32  # (1, 1, 32)


# --------------------------------------------------------------------------
# The model


def _hif8_values():
    """code -> value, by enumerating each Dot class of the HiFloat8 format:
    S | Dot | exponent field (sign bit + |E| without its leading 1) | mantissa."""
    values = {0x00: 0.0, 0x6F: np.inf}  # the positive codes; the sign bit mirrors them
    # (Dot prefix, prefix length, exponent field bits, mantissa bits, |E| of field 0)
    classes = [(0b11, 2, 4, 1, 8), (0b10, 2, 3, 2, 4), (0b01, 2, 2, 3, 2), (0b001, 3, 1, 3, 1)]
    for dot, dot_len, ebits, mbits, base in classes:
        for esign in (0, 1):
            for f in range(1 << (ebits - 1)):
                for mant in range(1 << mbits):
                    field = esign << (ebits - 1) | f
                    code = dot << (7 - dot_len) | field << mbits | mant
                    e = -(base + f) if esign else base + f
                    if code not in values:
                        values[code] = 2.0**e * (1 + mant / 2**mbits)
    for mant in range(8):  # Dot 0001: E = 0
        values[0x08 | mant] = 1 + mant / 8
    for mant in range(1, 8):  # 0000 + M: denormals 2^(M - 23)
        values[mant] = 2.0 ** (mant - 23)
    table = np.zeros(256)
    for code, value in values.items():
        table[code] = value
        table[code | 0x80] = np.nan if code == 0x00 else -value
    return table


HIF8 = _hif8_values()


def test_hif8_model_checkpoints():
    # The values docs/semantics.md §2.1 lists, as a check of the model itself.
    pins = {0x08: 1, 0x10: 2, 0x18: 0.5, 0x20: 4, 0x28: 8, 0x30: 0.25, 0x38: 0.125, 0x40: 16}
    pins |= {0x48: 64, 0x50: 1 / 16, 0x54: 1 / 32, 0x60: 256, 0x6E: 32768, 0x70: 2**-8}
    pins |= {0x7E: 2**-15, 0x07: 2**-16, 0x01: 2**-22}
    for code, value in pins.items():
        assert HIF8[code] == value and HIF8[code | 0x80] == -value
    assert np.isnan(HIF8[0x80]) and HIF8[0x6F] == np.inf and HIF8[0xEF] == -np.inf
    # Every code but 0x00 / 0x80 is the negation of its positive twin.
    positive = np.arange(1, 0x80)
    np.testing.assert_array_equal(HIF8[positive | 0x80], -HIF8[positive])


def decode(x, kind):
    if kind == "hifloat8":
        return HIF8[np.asarray(x)]
    return np.asarray(x).astype(np.float64)


def _grid_codes(kind, limit, quantum):
    """Codes whose values are finite multiples of ``quantum`` with |v| <= limit."""
    if kind == "hifloat8":
        vals, codes = HIF8, np.arange(256, dtype=np.uint8)
    else:
        dt = {"float8_e4m3fn": E4M3, "float8_e5m2": E5M2, "float4_e2m1fn": E2M1}[kind]
        codes = np.arange(16 if dt == E2M1 else 256, dtype=np.uint8)
        vals = (
            np.array([float(np.array(c, np.uint8).view(dt)) for c in codes])
            if dt != E2M1
            else (np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]))
        )
        vals = vals[codes]
    ok = np.isfinite(vals) & (np.abs(vals) <= limit) & (vals / quantum == np.round(vals / quantum))
    return codes[ok], vals[ok]


def values(rng, kind, shape, limit=8.0, quantum=1 / 16):
    """Random values of ``kind`` on the grid, as the operator's input array."""
    codes, vals = _grid_codes(kind, limit, quantum)
    idx = rng.integers(0, len(codes), shape)
    if kind == "hifloat8":
        return codes[idx]
    if kind == "float4_e2m1fn":
        return vals[idx].astype(E2M1)
    return codes[idx].view(E4M3 if kind == "float8_e4m3fn" else E5M2)


def fp19(scale):
    """The fp32 a packed TransQuantParam word applies: its fp19 field."""
    return (scale.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def packed_words(scale):
    words = [(int(u) & 0xFFFFE000) | (1 << 46) for u in scale.view(np.uint32).ravel()]
    return np.array(words, np.uint64).reshape(scale.shape)


def packed_pairs(scale):
    """The same words as uint32 (low, high) pairs [..., 2] (jit arguments
    with x64 off cannot hold 64-bit integers)."""
    words = packed_words(scale)
    return np.stack([words & 0xFFFFFFFF, words >> 32], axis=-1).astype(np.uint32)


def e8m0(exponents):
    return (np.asarray(exponents) + 127).astype(np.uint8).view(E8M0)


def rank_y(mode, kind, x1, x2, s1, s2, bias, *, transpose_x2):
    """One rank's fp32 y before the output rounding (formulas 4-7)."""
    a = decode(x1, kind).reshape(-1, x1.shape[-1])
    b = decode(x2, kind)
    b = b.T if transpose_x2 else b  # (k, n)
    k, n = b.shape
    if mode in ("pertoken", "packed"):
        y = (a @ b).astype(np.float32)
        if bias is not None:
            y = y + bias
        y = y * (fp19(s2) if mode == "packed" else s2).reshape(-1)
        if mode == "pertoken":
            y = y * s1[:, None]
        return y
    if mode == "perblock":
        y = np.zeros((a.shape[0], n), np.float32)
        rows = x1.shape[-2]
        s1 = s1.reshape(-1, *s1.shape[-2:])
        s2 = s2.T if transpose_x2 else s2  # (kb, nb)
        row_block = (np.arange(a.shape[0]) // rows) * s1.shape[1] + (
            np.arange(a.shape[0]) % rows
        ) // 128
        s1 = s1.reshape(-1, s1.shape[-1])[row_block]  # (m, kb)
        for kb in range(-(-k // 128)):
            blk = slice(128 * kb, 128 * kb + 128)
            p = (a[:, blk] @ b[blk]).astype(np.float32)
            s = s1[:, kb][:, None] * s2[kb, np.arange(n) // 128][None, :]
            y = y + p * s
        return y
    # MX: one e8m0 scale per 32 values along k.
    sa = np.repeat(s1.astype(np.float64).reshape(a.shape[0], -1), 32, axis=1)[:, :k]
    sb = np.repeat(s2.astype(np.float64).reshape(n, -1), 32, axis=1)[:, :k]
    y = ((a * sa) @ (b.T * sb).T).astype(np.float32)
    return y if bias is None else y + bias


def finish(y, x3, out_dtype):
    out = y.astype(out_dtype)
    if x3 is not None:
        out = (out.astype(np.float32) + x3.astype(np.float32).reshape(out.shape)).astype(out_dtype)
    return out


# --------------------------------------------------------------------------
# Cases: one per row of the 950 tables


def make_case(rng, mode, kind, *, m, k, n, transpose_x2=False, with_bias=True, pow2=False):
    """x1, x2 and their scales and bias for one rank. ``pow2``: power-of-two
    scales, so that every product with a scale is exact: XLA:CPU contracts
    ``a * b + c`` into an FMA, so where no rounding to a narrower dtype
    separates a scale product from the next addition (fp32 output + x3, the
    perblock accumulation, the fp8 communication's fp32 C) only exact
    products give the same bits with and without contraction."""
    if mode == "mx":
        limit, quantum = (6.0, 0.5) if kind == "float4_e2m1fn" else (4.0, 1 / 8)
    else:
        limit, quantum = 8.0, 1 / 16
    x1 = values(rng, kind, (m, k), limit, quantum)
    x2 = values(rng, kind, (n, k) if transpose_x2 else (k, n), limit, quantum)
    bias = (rng.integers(-4096, 4096, n) / 256).astype(np.float32) if with_bias else None
    if mode in ("pertoken", "packed") and pow2:
        s1 = np.exp2(rng.integers(-2, 2, m)).astype(np.float32) if mode == "pertoken" else None
        s2 = np.exp2(rng.integers(-9, -5, n)).astype(np.float32)
    elif mode == "pertoken":
        s1 = (rng.random(m) + 0.5).astype(np.float32)
        s2 = (rng.random(n) * 1e-2 + 1e-3).astype(np.float32)
    elif mode == "packed":
        s1, s2 = None, (rng.random(n) * 1e-2 + 1e-3).astype(np.float32)
    elif mode == "perblock":
        kb, mb, nb = -(-k // 128), -(-m // 128), -(-n // 128)
        shape2 = (nb, kb) if transpose_x2 else (kb, nb)
        if pow2:
            s1 = np.exp2(rng.integers(-3, 3, (mb, kb))).astype(np.float32)
            s2 = np.exp2(rng.integers(-3, 3, shape2)).astype(np.float32)
        else:
            s1 = (rng.random((mb, kb)) + 0.5).astype(np.float32)
            s2 = (rng.random(shape2) * 1e-2 + 1e-3).astype(np.float32)
    else:
        kb = -(-k // 64)
        s1, s2 = e8m0(rng.integers(-1, 2, (m, kb, 2))), e8m0(rng.integers(-1, 2, (n, kb, 2)))
    return x1, x2, s1, s2, bias


ROWS = [
    # (mode, kind, output dtype)
    ("pertoken", "float8_e4m3fn", BF16),
    ("pertoken", "float8_e5m2", F32),
    ("pertoken", "hifloat8", F16),
    ("packed", "float8_e4m3fn", F16),
    ("packed", "float8_e5m2", BF16),
    ("packed", "hifloat8", BF16),
    ("perblock", "float8_e4m3fn", F32),
    ("perblock", "float8_e5m2", BF16),
    ("perblock", "hifloat8", F16),
    ("mx", "float8_e4m3fn", BF16),
    ("mx", "float8_e5m2", F16),
    ("mx", "float4_e2m1fn", F32),
]
ROW_IDS = [f"{mode}-{kind}-{np.dtype(o).name}" for mode, kind, o in ROWS]
# Every output dtype of every row (seed 003: float16 / bfloat16 / float32;
# the packed rows' float32 output is the generic target's extension).
ALL_ROWS = [
    (mode, kind, out)
    for mode, kinds in (
        ("pertoken", ("float8_e4m3fn", "float8_e5m2", "hifloat8")),
        ("packed", ("float8_e4m3fn", "float8_e5m2", "hifloat8")),
        ("perblock", ("float8_e4m3fn", "float8_e5m2", "hifloat8")),
        ("mx", ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")),
    )
    for kind in kinds
    for out in (F16, BF16, F32)
]
ALL_ROW_IDS = [f"{mode}-{kind}-{np.dtype(o).name}" for mode, kind, o in ALL_ROWS]
#: ALL_ROWS with the output dtypes outside ROWS marked slow: the inner loop
#: (`-m "not slow"`) runs each row once.
ALL_ROW_PARAMS = [
    pytest.param(*row, id=row_id, marks=() if row in ROWS else pytest.mark.slow)
    for row, row_id in zip(ALL_ROWS, ALL_ROW_IDS)
]


def call_kwargs(mode, kind, s1, s2, bias, x3, out_dtype, transpose_x2):
    kw = {
        "x2_scale": packed_words(s2) if mode == "packed" else s2,
        "x1_scale": s1,
        "bias": bias,
        "x3": x3,
        "out_dtype": out_dtype,
        "transpose_x2": transpose_x2,
    }
    if kind == "hifloat8":
        kw |= {"x1_format": "hifloat8", "x2_format": "hifloat8"}
    if mode == "perblock":
        kw["group_size"] = GS_PERBLOCK
    return kw


def single_device_case(rng, mode, kind, *, transpose_x2, pow2):
    """x1 [m, k], x2 and their scales and bias for a one-device call: tail
    blocks of 128 in m, k and n for the perblock rows, whole MX blocks."""
    if mode == "perblock":
        m, k, n = 130, 300, 136  # row, k and column tail blocks
    elif mode == "mx":
        m, k, n = 12, 256, 20
    else:
        m, k, n = 12, 200, 20
    with_bias = mode != "perblock"
    return make_case(
        rng, mode, kind, m=m, k=k, n=n, transpose_x2=transpose_x2, with_bias=with_bias, pow2=pow2
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode,kind,out_dtype", ALL_ROW_PARAMS)
def test_rows_single_device_bit_exact(impl, mode, kind, out_dtype):
    rng = np.random.default_rng(len(mode) * 7 + len(kind))
    transpose_x2 = mode == "mx" or kind == "float8_e5m2"
    pow2 = mode == "perblock" or out_dtype == F32
    x1, x2, s1, s2, bias = single_device_case(rng, mode, kind, transpose_x2=transpose_x2, pow2=pow2)
    m, n = x1.shape[0], x2.shape[0] if transpose_x2 else x2.shape[1]
    x3_dtype = F32 if out_dtype == BF16 else out_dtype  # x3 may differ from the output dtype
    x3 = rng.standard_normal((m, n)).astype(x3_dtype)
    y = rank_y(mode, kind, x1, x2, s1, s2, bias, transpose_x2=transpose_x2)
    for with_x3 in (False, True):
        kw = call_kwargs(mode, kind, s1, s2, bias, x3 if with_x3 else None, out_dtype, transpose_x2)
        got = mc2.quant_matmul_all_reduce_v4(x1, x2, None, implementation=impl, **kw)
        want = finish(y, x3 if with_x3 else None, out_dtype)
        assert got.dtype == out_dtype and got.shape == (m, n)
        np.testing.assert_array_equal(np.asarray(got), want)


def _perblock_f32(x1, x2, s1, s2, impl, transpose_x2=False):
    """A perblock row with float32 output on one device."""
    return mc2.quant_matmul_all_reduce_v4(
        x1,
        x2,
        None,
        x2_scale=s2,
        x1_scale=s1,
        group_size=GS_PERBLOCK,
        out_dtype=jnp.float32,
        transpose_x2=transpose_x2,
        implementation=impl,
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_perblock_general_scales_and_3d_x1(impl):
    # Non-power-of-two block scales: the accumulation y + p * s may be fused
    # (FMA) or not, so compare within a few fp32 ulps before the rounding.
    rng = np.random.default_rng(11)
    b, s, k, n = 2, 130, 260, 140
    x1, x2, _, s2, _ = make_case(
        rng, "perblock", "float8_e4m3fn", m=b * s, k=k, n=n, with_bias=False
    )
    s1 = (rng.random((b, 2, 3)) + 0.5).astype(np.float32)  # (b, ceil(s/128), ceil(k/128))
    got = _perblock_f32(x1.reshape(b, s, k), x2, s1, s2, impl)
    want = rank_y(
        "perblock", "float8_e4m3fn", x1.reshape(b, s, k), x2, s1, s2, None, transpose_x2=False
    )
    assert got.shape == (b, s, n)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, n), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    "m,k,n,transpose_x2",
    [
        (600, 300, 700, False),  # several row and column tiles of the output
        (600, 300, 700, True),
        # k * n > 2^24: x2 decoded in column blocks
        pytest.param(4, 32768, 1040, False, marks=pytest.mark.slow),
        pytest.param(4, 32768, 1040, True, marks=pytest.mark.slow),
    ],
)
def test_perblock_tiles_bit_exact(m, k, n, transpose_x2):
    """The ffi kernel's tiling (output tiles, column blocks of x2) against
    the model, with power-of-two scales (exact products, so the order of the
    per-block additions is the only freedom and both follow it)."""
    rng = np.random.default_rng(m + k + n)
    x1, x2, s1, s2, _ = make_case(
        rng,
        "perblock",
        "float8_e4m3fn",
        m=m,
        k=k,
        n=n,
        transpose_x2=transpose_x2,
        with_bias=False,
        pow2=True,
    )
    got = _perblock_f32(x1, x2, s1, s2, "ffi", transpose_x2=transpose_x2)
    want = rank_y("perblock", "float8_e4m3fn", x1, x2, s1, s2, None, transpose_x2=transpose_x2)
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode,kind,out_dtype", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("world", [2, 8])
def test_rows_sharded(impl, mode, kind, out_dtype, world):
    """k sharded over ``world`` ranks: each rank holds its own slice of x1 and
    x2 (and, perblock / MX, its own k-block scales); x1 is 3-D (2, 5, k)
    except in the MX rows. The all-reduce sums the per-rank results."""
    rng = np.random.default_rng(world * 31 + len(kind))
    transpose_x2 = mode == "mx"
    k_local, m, n = (64 if mode == "mx" else 136), 10, 24
    parts = [
        make_case(
            rng,
            mode,
            kind,
            m=m,
            k=k_local,
            n=n,
            transpose_x2=transpose_x2,
            with_bias=mode != "perblock",
        )
        for _ in range(world)
    ]
    if mode in ("pertoken", "packed"):  # replicated pertoken / perchannel scales
        parts = [(a, b, parts[0][2], parts[0][3], c) for a, b, _, _, c in parts]
    if mode == "perblock":  # 3-D x1: x1_scale (b, ceil(s/128), kb) per rank
        parts = [(a, b, np.stack([t, 2 * t]), s, c) for a, b, t, s, c in parts]
    bias = parts[0][4]  # the same bias on every rank (added once per rank)
    lead = (m,) if mode == "mx" else (2, m // 2)
    x3 = rng.standard_normal((*lead, n)).astype(out_dtype)
    x1 = np.concatenate([p[0] for p in parts], axis=1).reshape(*lead, -1)
    x2 = np.concatenate([p[1] for p in parts], axis=1 if transpose_x2 else 0)
    x1_spec = P(*(None,) * len(lead), "tp")
    x2_spec = P(None, "tp") if transpose_x2 else P("tp", None)
    if mode == "perblock":
        s1 = np.concatenate([p[2] for p in parts], axis=2)
        s2 = np.concatenate([p[3] for p in parts], axis=0)
        specs = (P(None, None, "tp"), P("tp", None))
    elif mode == "mx":
        s1 = np.concatenate([p[2] for p in parts], axis=1)
        s2 = np.concatenate([p[3] for p in parts], axis=1)
        specs = (P(None, "tp", None), P(None, "tp", None))
    else:
        s1, s2 = parts[0][2], parts[0][3]
        specs = (P(), P())
    kw = call_kwargs(mode, kind, s1, s2, None, None, out_dtype, transpose_x2)
    x2_scale, x1_scale = kw.pop("x2_scale"), kw.pop("x1_scale")
    if mode == "packed":
        x2_scale = packed_pairs(s2)
    del kw["bias"], kw["x3"]
    mesh = make_mesh((world,), ("tp",))

    def fn(a, b, t, s, c, d):
        return mc2.quant_matmul_all_reduce_v4(
            a, b, "tp", x1_scale=t, x2_scale=s, bias=c, x3=d, implementation=impl, **kw
        )

    f = jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=(x1_spec, x2_spec, *specs, P(), P()), out_specs=P())
    )
    args = (x1, x2, x1_scale, x2_scale, bias, x3)
    got = f(*args)
    want = sum(
        finish(
            rank_y(mode, kind, a.reshape(*lead, -1), b, t, s, bias, transpose_x2=transpose_x2),
            x3,
            out_dtype,
        ).astype(np.float64)
        for a, b, t, s, _ in parts
    )
    tol = oracle.tolerance(out_dtype, world, scale=np.abs(want).max() + 1)
    assert got.dtype == out_dtype and got.shape == (*lead, n)
    np.testing.assert_allclose(np.asarray(got).astype(np.float64).reshape(m, n), want, atol=tol)
    text = f.lower(*args).as_text()
    if impl == "ascend":  # one custom call runs the whole MC2 operator
        assert text.count("mc2_ascend_host_bridge") == 1
        assert "stablehlo.all_reduce" not in text
        return
    assert reductions(text) == 1
    # The kernel, or where the CPU's table picks XLA's GEMM the xla program
    # (docs/semantics.md §12); the perblock rows always keep the kernel.
    engine = _ffi.gemm_engine(_ffi.FLOAT8, k_local, world, m * k_local * n)
    kernel = impl == "ffi" and engine == _ffi.BLAS
    assert text.count("custom_call @mc2_lowp_matmul_ffi") == (1 if kernel else 0)


# --------------------------------------------------------------------------
# comm_quant_mode=1: the fp8 pertile chain of docs/semantics.md §5.2


def _pertile(c, fp8):
    fmax = np.float32(448.0 if fp8 == E4M3 else 57344.0)
    r, n = c.shape
    t = -(-n // 128)
    tiles = np.zeros((r, t * 128), np.float32)
    tiles[:, :n] = c
    tiles = tiles.reshape(r, t, 128)
    a = np.abs(tiles).max(axis=-1)
    a = np.where(a == 0, fmax, a)
    sc = (fmax / a).astype(np.float32)
    sc = np.where(sc == 0, np.float32(1), sc)
    q = np.clip(tiles * sc[..., None], -fmax, fmax).astype(fp8)
    return q.reshape(r, -1)[:, :n], sc


def _dequant(q, sc):
    r, n = q.shape
    t = sc.shape[1]
    qf = np.zeros((r, t * 128), np.float32)
    qf[:, :n] = q.astype(np.float32)
    return (qf.reshape(r, t, 128) / sc[..., None]).reshape(r, -1)[:, :n]


def oracle_pertile_chain(c_ranks, fp8, out_dtype):
    """Every rank quantizes its fp32 C per 1 x 128 tile; rows padded to a
    multiple of R; rank j dequantizes chunk j of every rank and sums them in
    rank order from 0.0, requantizes; all-gather; dequantize, round."""
    ranks = len(c_ranks)
    m, n = c_ranks[0].shape
    chunk = -(-m // ranks)
    wires = []
    for c in c_ranks:
        cp = np.zeros((chunk * ranks, n), np.float32)
        cp[:m] = c
        wires.append(_pertile(cp, fp8))
    out = []
    for j in range(ranks):
        rows = slice(j * chunk, (j + 1) * chunk)
        acc = np.zeros((chunk, n), np.float32)
        for q, sc in wires:
            acc = acc + _dequant(q[rows], sc[rows])
        out.append(_dequant(*_pertile(acc, fp8)))
    return np.concatenate(out)[:m].astype(out_dtype)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "kind,out_dtype,world,mode",
    [
        ("float8_e4m3fn", BF16, 1, "pertoken"),
        ("float8_e5m2", F16, 2, "pertoken"),
        ("float8_e4m3fn", F32, 8, "pertoken"),
        ("float8_e5m2", BF16, 8, "pertoken"),
        ("float8_e4m3fn", BF16, 2, "perblock"),
    ],
)
def test_fp8_pertile_comm_chain(impl, kind, out_dtype, world, mode):
    rng = np.random.default_rng(world + len(kind))
    m, k_local, n = 13, 136, 140  # 13 rows: padded to the rank count; 2 tiles of n
    fp8 = E4M3 if kind == "float8_e4m3fn" else E5M2
    parts = [
        make_case(rng, mode, kind, m=m, k=k_local, n=n, with_bias=mode == "pertoken", pow2=True)
        for _ in range(world)
    ]
    x1 = np.concatenate([p[0] for p in parts], axis=1)
    x2 = np.concatenate([p[1] for p in parts], axis=0)
    bias = parts[0][4]
    if mode == "pertoken":
        s1, s2 = parts[0][2], parts[0][3]
        specs = (P(), P())
    else:
        s1 = np.concatenate([p[2] for p in parts], axis=1)
        s2 = np.concatenate([p[3] for p in parts], axis=0)
        specs = (P(None, "tp"), P("tp", None))
    x3 = (rng.standard_normal((m, n)) * 4).astype(out_dtype)
    mesh = make_mesh((world,), ("tp",))
    kw = {"group_size": GS_PERBLOCK} if mode == "perblock" else {}

    def fn(a, b, t, s, c, d):
        return mc2.quant_matmul_all_reduce_v4(
            a,
            b,
            "tp",
            x1_scale=t,
            x2_scale=s,
            bias=c,
            x3=d,
            comm_quant_mode=1,
            out_dtype=out_dtype,
            implementation=impl,
            **kw,
        )

    f = jax.jit(
        jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None), *specs, P(), P()),
            out_specs=P(),
        )
    )
    args = (x1, x2, s1, s2, bias, x3)
    got = f(*args)
    c_ranks = []
    for p in parts:
        t, s = (s1, s2) if mode == "pertoken" else (p[2], p[3])
        y = rank_y(mode, kind, p[0], p[1], t, s, bias, transpose_x2=False)
        c_ranks.append(y + x3.astype(np.float32))  # C = y + x3 in fp32, not rounded
    want = oracle_pertile_chain(c_ranks, fp8, out_dtype)
    assert got.dtype == out_dtype
    np.testing.assert_array_equal(np.asarray(got), want)
    if world > 1 and impl == "ascend":  # the fp8 exchange runs inside CANN's kernel
        text = f.lower(*args).as_text()
        assert '"aclnnQuantMatmulAllReduceV4"' in text and "stablehlo.all_to_all" not in text
    elif world > 1:
        # fp8 bytes on the wire: float8 all-to-all and all-gather, no all-reduce.
        text = f.lower(*args).as_text()
        a2a = [ln for ln in text.splitlines() if "stablehlo.all_to_all" in ln]
        ag = [ln for ln in text.splitlines() if "stablehlo.all_gather" in ln]
        assert a2a and all("xf8E4M3FN>" in ln and "f32>" not in ln for ln in a2a)
        assert ag and all("xf8E4M3FN>" in ln and "f32>" not in ln for ln in ag)
        assert "all_reduce" not in text


@pytest.mark.parametrize("impl", ["xla", "ffi"])
def test_empty_m_in_the_perblock_and_mx_rows(impl):
    """m = 0 (accepted on the generic target) with the default group_size:
    the empty m direction has nothing to group, so its 0 field resolves to the
    row's own size instead of failing to divide by a 0 scale extent."""
    k, n = 128, 128
    x1 = np.ones((0, k), E4M3)
    y = mc2.quant_matmul_all_reduce_v4(
        x1, np.ones((k, n), E4M3), None, x1_scale=np.ones((0, 1), np.float32),
        x2_scale=np.ones((1, 1), np.float32), implementation=impl,
    )  # fmt: skip
    assert y.shape == (0, n) and y.dtype == jnp.bfloat16
    w, w_scale = mc2.quant.mx_quantize(np.ones((n, k), np.float32))
    y = mc2.quant_matmul_all_reduce_v4(
        x1, w, None, x1_scale=np.ones((0, 2, 2), E8M0), x2_scale=w_scale,
        transpose_x2=True, implementation=impl,
    )  # fmt: skip
    assert y.shape == (0, n) and y.dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", ["xla", "ffi"])
def test_empty_n_in_the_mx_rows(impl):
    """n = 0 (accepted on the generic target): the e8m0 scales [0, k/64, 2]
    reshape to [0, k/32] without inferring a dimension from zero elements."""
    k = 128
    x1, x1_scale = mc2.quant.mx_quantize(np.ones((4, k), np.float32))
    y = mc2.quant_matmul_all_reduce_v4(
        x1, np.ones((0, k), E4M3), None, x1_scale=x1_scale,
        x2_scale=np.ones((0, 2, 2), E8M0), transpose_x2=True, implementation=impl,
    )  # fmt: skip
    assert y.shape == (4, 0) and y.dtype == jnp.bfloat16


@pytest.mark.parametrize("m, n", [(2, 8), (64, 64)])
def test_fp8_pertile_comm_nan_makes_its_tile_nan(m, n):
    """A NaN in a 1 x 128 tile of the pertile chain makes the tile's scale and
    codes NaN in every implementation (the C++ max and clamp once dropped it
    and sent -448, in the ffi kernel and in the CANN test double; XLA:CPU's
    YNNPACK max, taking the 64 x 64 case, drops it too); other rows are
    untouched and equal bit for bit."""
    k = 32
    x1 = np.ones((m, k), np.float32)
    x1[::3, 0] = np.nan
    x1 = x1.astype(E4M3)
    x2 = (np.arange(k * n).reshape(k, n) % 5 - 2).astype(E4M3)
    s1, s2 = np.ones(m, np.float32), np.ones(n, np.float32)
    got = {}
    for impl in ALL_IMPLEMENTATIONS:  # on one rank: the ascend call runs inside shard_map
        f = jax.shard_map(
            lambda a, b, t, s, impl=impl: mc2.quant_matmul_all_reduce_v4(
                a, b, "tp", x1_scale=t, x2_scale=s, comm_quant_mode=1,
                out_dtype=jnp.float32, implementation=impl,
            ),
            mesh=make_mesh((1,), ("tp",)), in_specs=(P(),) * 4, out_specs=P(),
        )  # fmt: skip
        got[impl] = np.asarray(jax.jit(f)(x1, x2, s1, s2))
    for impl, y in got.items():
        assert np.isnan(y[::3]).all(), (impl, y[::3])
        assert np.isfinite(y[1::3]).all(), (impl, y[1::3])
    np.testing.assert_array_equal(got["ffi"], got["xla"])  # NaN == NaN here
    np.testing.assert_array_equal(got["ascend"], got["xla"])


def test_fp8_pertile_comm_error_bound():
    # The chain stays within two fp8 quantization steps of the exact sum.
    rng = np.random.default_rng(2)
    world, m, k_local, n = 4, 16, 128, 256
    x1 = rng.standard_normal((m, k_local * world)).astype(E4M3)
    x2 = rng.standard_normal((k_local * world, n)).astype(E4M3)
    s1 = np.ones(m, np.float32)
    s2 = np.full(n, 0.01, np.float32)
    mesh = make_mesh((world,), ("tp",))
    exact = (x1.astype(np.float64) @ x2.astype(np.float64)) * 0.01
    f = jax.jit(
        jax.shard_map(
            lambda a, b, t, s: mc2.quant_matmul_all_reduce_v4(
                a, b, "tp", x1_scale=t, x2_scale=s, comm_quant_mode=1, out_dtype=jnp.float32
            ),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None), P(), P()),
            out_specs=P(),
        )
    )
    got = np.asarray(f(x1, x2, s1, s2))
    err = np.abs(got - exact).max()
    assert 0 < err <= 2 * world * np.abs(exact).max() * 2.0**-4


# --------------------------------------------------------------------------
# eval_shape, vmap, grad, chip targets and errors

S = jax.ShapeDtypeStruct


def _shape(x1, x2, x2_scale, **kw):
    arrays = {k: a for k, a in kw.items() if isinstance(a, S)}
    static = {k: a for k, a in kw.items() if k not in arrays}
    return jax.eval_shape(
        lambda a, b, s, arr: mc2.quant_matmul_all_reduce_v4(
            a, b, None, x2_scale=s, **arr, **static
        ),
        x1,
        x2,
        x2_scale,
        arrays,
    )


F8 = jnp.float8_e4m3fn
VALID = [
    # (x1, x2, x2_scale, kwargs, output shape and dtype)
    (
        S((4, 8), F8),
        S((8, 6), F8),
        S((6,), jnp.float32),
        {"x1_scale": S((4,), jnp.float32)},
        ((4, 6), jnp.bfloat16),
    ),
    (
        S((2, 3, 8), jnp.float8_e5m2),
        S((8, 6), jnp.float8_e5m2),
        S((1,), jnp.float32),
        {"x1_scale": S((6,), jnp.float32), "out_dtype": jnp.float32},
        ((2, 3, 6), jnp.float32),
    ),
    (
        S((4, 8), jnp.uint8),
        S((6, 8), jnp.uint8),
        S((6, 2), jnp.uint32),
        {
            "x1_format": "hifloat8",
            "x2_format": "hifloat8",
            "transpose_x2": True,
            "out_dtype": jnp.float16,
        },
        ((4, 6), jnp.float16),
    ),
    (
        S((256, 256), F8),
        S((256, 384), F8),
        S((2, 3), jnp.float32),
        {"x1_scale": S((2, 2), jnp.float32)},
        ((256, 384), jnp.bfloat16),
    ),
    (
        S((4, 64), jnp.float4_e2m1fn),
        S((6, 64), jnp.float4_e2m1fn),
        S((6, 1, 2), jnp.float8_e8m0fnu),
        {
            "x1_scale": S((4, 1, 2), jnp.float8_e8m0fnu),
            "transpose_x2": True,
            "out_dtype": jnp.float32,
        },
        ((4, 6), jnp.float32),
    ),
]


@pytest.mark.parametrize("x1,x2,scale,kw,want", VALID)
def test_eval_shape(x1, x2, scale, kw, want):
    for target in ("generic", "ascend-950"):
        with mc2.target(target):
            out = _shape(x1, x2, scale, **kw)
            assert (out.shape, out.dtype) == want


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap_and_not_differentiable(impl):
    rng = np.random.default_rng(4)
    x1, x2, s1, s2, bias = make_case(rng, "pertoken", "float8_e4m3fn", m=6, k=64, n=8)
    xs = np.stack([x1, x1[::-1]])
    ts = np.stack([s1, s1[::-1]])
    f = functools.partial(
        mc2.quant_matmul_all_reduce_v4,
        x2=x2,
        axis_name=None,
        x2_scale=s2,
        bias=bias,
        implementation=impl,
    )
    got = jax.vmap(lambda a, t: f(a, x1_scale=t))(xs, ts)
    one = f(x1[::-1], x1_scale=s1[::-1])
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(one))
    with pytest.raises(NotImplementedError, match="fp8 / hifloat8 / MX quantized rows are not"):
        jax.grad(lambda c: jnp.sum(f(x1, x1_scale=s1, x3=c).astype(jnp.float32)))(
            np.zeros((6, 8), np.float32)
        )


def test_chip_targets():
    args = (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32))
    kw = {"x1_scale": S((4,), jnp.float32)}
    hif8 = (S((4, 8), jnp.uint8), S((8, 6), jnp.uint8), S((6, 2), jnp.uint32))
    mx = (S((4, 64), F8), S((6, 64), F8), S((6, 1, 2), jnp.float8_e8m0fnu))
    mx_kw = {"x1_scale": S((4, 1, 2), jnp.float8_e8m0fnu), "transpose_x2": True}
    with mc2.target("atlas-a2"):
        with pytest.raises(
            NotImplementedError,
            match="the float8_e4m3fn rows .fp8, hifloat8 and MX: Ascend 950 only. are not "
            "available on target 'atlas-a2'",
        ):
            _shape(*args, **kw)
        with pytest.raises(NotImplementedError, match="the hifloat8 rows .* target 'atlas-a2'"):
            _shape(*hif8, x1_format="hifloat8", x2_format="hifloat8")
        with pytest.raises(NotImplementedError, match="target 'atlas-a2'"):
            _shape(*mx, **mx_kw)
        with pytest.raises(NotImplementedError, match="target 'atlas-a2'"):
            _shape(*args, **kw, comm_quant_mode=1)
    with mc2.target("atlas-a3"), pytest.raises(NotImplementedError, match="not available"):
        _shape(*args, **kw)
    with mc2.target("ascend-950"):
        assert _shape(*args, **kw, comm_quant_mode=1).dtype == jnp.bfloat16
        assert _shape(*mx, **mx_kw).shape == (4, 6)
        # Packed scales: float16 / bfloat16 output on the chip; float32 only on generic.
        with pytest.raises(
            TypeError,
            match="out_dtype must be one of float16, bfloat16 in the "
            "hifloat8 packed rows on target 'ascend-950', got float32",
        ):
            _shape(*hif8, x1_format="hifloat8", x2_format="hifloat8", out_dtype=jnp.float32)
        # World sizes: seed 003's 1, 2, 4, 8, 16, 32, 64 cards.
        for world in (3, 12, 65):
            with pytest.raises(NotImplementedError, match=rf"world size {world} .* 'ascend-950'"):
                mc2.targets.check_world_size("quant_matmul_all_reduce_v4", world, ("tp",))
        for world in (1, 2, 4, 8, 16, 32, 64):
            mc2.targets.check_world_size("quant_matmul_all_reduce_v4", world, ("tp",))
        with pytest.raises(NotImplementedError, match="exceeds 65535"):
            _shape(
                S((4, 70000), F8),
                S((70000, 6), F8),
                S((6,), jnp.float32),
                x1_scale=S((4,), jnp.float32),
            )
    assert _shape(
        *hif8, x1_format="hifloat8", x2_format="hifloat8", out_dtype=jnp.float32
    ).dtype == (jnp.float32)


F32S = S((4,), jnp.float32)
INVALID = [
    # x1 / x2 columns
    (
        (S((4, 8), jnp.float16), S((8, 6), jnp.float16), S((6,), jnp.float32)),
        {},
        TypeError,
        "x1 dtype must be int8, float8_e4m3fn, float8_e5m2, float4_e2m1fn or uint8 HiFloat8 codes",
    ),
    (
        (S((4, 8), F8), S((8, 6), jnp.float8_e5m2), S((6,), jnp.float32)),
        {"x1_scale": F32S},
        TypeError,
        "x2 must have x1's dtype float8_e4m3fn .the tables pair equal dtypes., got float8_e5m2",
    ),
    (
        (S((4, 8), jnp.uint8), S((8, 6), jnp.uint8), S((6,), jnp.float32)),
        {"x1_scale": F32S},
        TypeError,
        "uint8 x1 holds HiFloat8 codes only with x1_format='hifloat8'",
    ),
    (
        (S((4, 8), jnp.uint8), S((8, 6), jnp.uint8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "x1_format": "hifloat8"},
        TypeError,
        "x1_format and x2_format must both be 'hifloat8'",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "x1_format": "hifloat8", "x2_format": "hifloat8"},
        TypeError,
        "x1 with x1_format='hifloat8' must hold uint8 HiFloat8 codes, got float8_e4m3fn",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_format": "FRACTAL_NZ"},
        ValueError,
        "x1_format must be one of",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "x2_format": "FRACTAL_NZ"},
        ValueError,
        "x2_format='FRACTAL_NZ' is accepted for int8 x2 only",
    ),
    # bias column
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "bias": S((6,), jnp.int32)},
        TypeError,
        "bias dtype must be float32 in the pertoken rows, got int32",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "bias": S((5,), jnp.float32)},
        TypeError,
        r"bias must be 1-D \(n,\)",
    ),
    # x3 column
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "x3": S((4, 6), jnp.int8)},
        TypeError,
        "x3 dtype must be float16, bfloat16 or float32, got int8",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "x3": S((4, 5), jnp.float32)},
        TypeError,
        r"x3 must be the output shape = \(4, 6\), got \(4, 5\)",
    ),
    # x1Scale column
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {},
        TypeError,
        "a float32 x2_scale needs x1_scale",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": S((4,), jnp.float16)},
        TypeError,
        "x1_scale dtype must be float32 in the pertoken rows, got float16",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": S((5,), jnp.float32)},
        TypeError,
        r"x1_scale must be 1-D \(m,\) pertoken \(b \* s for 3-D x1\) = \(4,\), got \(5,\)",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6, 2), jnp.uint32)),
        {"x1_scale": F32S},
        TypeError,
        "x1_scale must be None with packed x2_scale words",
    ),
    # x2Scale column
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.bfloat16)),
        {"x1_scale": F32S},
        TypeError,
        "x2_scale dtype for float8_e4m3fn x1/x2 must be float32 .pertoken / perblock., packed",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((5,), jnp.float32)),
        {"x1_scale": F32S},
        TypeError,
        r"x2_scale must be pertensor \(1,\) or perchannel \(n,\) / \(1, n\) with n = 6 in the "
        r"pertoken rows, got \(5,\)",
    ),
    # output column
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "out_dtype": jnp.int8},
        TypeError,
        "out_dtype must be one of float16, bfloat16, float32 in the float8_e4m3fn pertoken rows",
    ),
    # comm scales (int8 only) and comm_quant_mode
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {
            "x1_scale": F32S,
            "comm_quant_scale_1": S((6,), jnp.bfloat16),
            "comm_quant_scale_2": S((6,), jnp.bfloat16),
        },
        TypeError,
        "comm_quant_scale_1/2 .int8 low-bit communication. exist only in the int8 rows",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "comm_quant_mode": 2},
        ValueError,
        "comm_quant_mode must be 0 or 1, got 2",
    ),
    (
        (S((4, 8), jnp.uint8), S((8, 6), jnp.uint8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "x1_format": "hifloat8", "x2_format": "hifloat8", "comm_quant_mode": 1},
        ValueError,
        "comm_quant_mode=1 .fp8 pertile communication, formula 8. needs float8_e4m3fn "
        "or float8_e5m2 x1/x2 with float32 x1_scale and x2_scale, got hifloat8",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6, 2), jnp.uint32)),
        {"comm_quant_mode": 1},
        ValueError,
        "got float8_e4m3fn x1/x2 in the packed rows",
    ),
    (
        (S((4, 8), F8), S((8, 6), F8), S((6,), jnp.float32)),
        {"x1_scale": F32S, "group_size": 5},
        ValueError,
        "group_size must be 0 in the pertoken rows",
    ),
    # perblock: shapes, no bias, group_size
    (
        (S((256, 256), F8), S((256, 384), F8), S((2, 3), jnp.float32)),
        {"x1_scale": S((2, 3), jnp.float32)},
        TypeError,
        r"x1_scale must be perblock \(ceil\(m/128\), ceil\(k/128\)\) = \(2, 2\), got \(2, 3\)",
    ),
    (  # a pertoken scale given as a column: the message names the 1-D form
        (S((4, 64), F8), S((64, 8), F8), S((8,), jnp.float32)),
        {"x1_scale": S((4, 1), jnp.float32)},
        TypeError,
        r"= \(1, 1\), got \(4, 1\); an x1_scale of 2 or more dimensions selects these rows, "
        r"a pertoken one is 1-D \(m,\) = \(4,\)",
    ),
    (
        (S((256, 256), F8), S((256, 384), F8), S((3, 2), jnp.float32)),
        {"x1_scale": S((2, 2), jnp.float32)},
        TypeError,
        r"x2_scale must be perblock \(ceil\(k/128\), ceil\(n/128\)\) = \(2, 3\), got \(3, 2\)",
    ),
    (
        (S((256, 256), F8), S((256, 384), F8), S((2, 3), jnp.float32)),
        {"x1_scale": S((2, 2), jnp.float32), "bias": S((384,), jnp.float32)},
        TypeError,
        "bias must be None in the perblock-perblock rows",
    ),
    (
        (S((129, 256), F8), S((256, 384), F8), S((2, 3), jnp.float32)),
        {"x1_scale": S((2, 2), jnp.float32)},
        ValueError,
        "group size m cannot be inferred: m = 129 is not a multiple of its scale extent 2",
    ),
    (
        (S((256, 256), F8), S((256, 384), F8), S((2, 3), jnp.float32)),
        {"x1_scale": S((2, 2), jnp.float32), "group_size": 64 | 128 << 16 | 128 << 32},
        ValueError,
        r"group_size \(m, n, k\) must resolve to \(128, 128, 128\) in the perblock rows, got "
        r"\(128, 128, 64\)",
    ),
    # MX: transposed x2 only, e8m0 x1_scale, shapes, fp4 ceil(k/32) even, group_size
    (
        (S((4, 64), F8), S((64, 6), F8), S((6, 1, 2), jnp.float8_e8m0fnu)),
        {"x1_scale": S((4, 1, 2), jnp.float8_e8m0fnu)},
        ValueError,
        "transpose_x2 must be True in the MX rows",
    ),
    (
        (S((4, 64), F8), S((6, 64), F8), S((6, 1, 2), jnp.float8_e8m0fnu)),
        {"x1_scale": S((4,), jnp.float32), "transpose_x2": True},
        TypeError,
        "x1_scale must be float8_e8m0fnu in the MX rows .as x2_scale., got float32",
    ),
    (
        (S((4, 64), F8), S((6, 64), F8), S((6, 2), jnp.float8_e8m0fnu)),
        {"x1_scale": S((4, 1, 2), jnp.float8_e8m0fnu), "transpose_x2": True},
        TypeError,
        r"x2_scale must be MX \[n, ceil\(k/64\), 2\] = \(6, 1, 2\), got \(6, 2\)",
    ),
    (
        (
            S((4, 96), jnp.float4_e2m1fn),
            S((6, 96), jnp.float4_e2m1fn),
            S((6, 2, 2), jnp.float8_e8m0fnu),
        ),
        {"x1_scale": S((4, 2, 2), jnp.float8_e8m0fnu), "transpose_x2": True, "group_size": GS_MX},
        TypeError,
        r"float4_e2m1fn x1/x2 need ceil\(k/32\) even, got k = 96 \(ceil\(k/32\) = 3\)",
    ),
    (
        (S((4, 96), F8), S((6, 96), F8), S((6, 2, 2), jnp.float8_e8m0fnu)),
        {"x1_scale": S((4, 2, 2), jnp.float8_e8m0fnu), "transpose_x2": True},
        ValueError,
        r"must resolve to \(1, 1, 32\) in the mx rows, got \(1, 1, 24\)",
    ),
    (
        (S((4, 64), jnp.float4_e2m1fn), S((64, 6), jnp.float4_e2m1fn), S((6,), jnp.float32)),
        {"x1_scale": F32S},
        TypeError,
        "float4_e2m1fn x1/x2 exist only in the MX rows",
    ),
    (
        (S((4, 64), jnp.uint8), S((6, 64), jnp.uint8), S((6, 1, 2), jnp.float8_e8m0fnu)),
        {
            "x1_scale": S((4, 1, 2), jnp.float8_e8m0fnu),
            "transpose_x2": True,
            "x1_format": "hifloat8",
            "x2_format": "hifloat8",
        },
        TypeError,
        "the MX rows take float8_e4m3fn, float8_e5m2 or float4_e2m1fn x1/x2, not hifloat8",
    ),
]


@pytest.mark.parametrize("args,kw,exc,msg", INVALID)
def test_invalid(args, kw, exc, msg):
    with pytest.raises(exc, match=msg) as info:
        _shape(*args, **kw)
    assert str(info.value).startswith("quant_matmul_all_reduce_v4: ")


def test_mx_odd_block_count_with_explicit_group_size():
    # k = 96: ceil(k/32) = 3 blocks, the scale layout's pad entry is unused;
    # group_size cannot be inferred (96 / 4 = 24), so it is passed explicitly.
    rng = np.random.default_rng(9)
    x1, x2, s1, s2, bias = make_case(rng, "mx", "float8_e5m2", m=6, k=96, n=10, transpose_x2=True)
    want = finish(rank_y("mx", "float8_e5m2", x1, x2, s1, s2, bias, transpose_x2=True), None, BF16)
    for impl in IMPLEMENTATIONS:
        got = mc2.quant_matmul_all_reduce_v4(
            x1,
            x2,
            None,
            x1_scale=s1,
            x2_scale=s2,
            bias=bias,
            transpose_x2=True,
            group_size=GS_MX,
            implementation=impl,
        )
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize(
    "case", ["fp8 pertoken", "fp8 comm_quant_mode=1", "mxfp8", "weight-only", "int8 low-bit comm"]
)
def test_vma_typing_of_the_quantized_paths(case):
    """Under shard_map(check_vma=True) on a (dp, tp) mesh, x1 varying along
    both axes: the result varies along dp only (the all-reduce, or its
    low-bit replacement, made it invariant along tp)."""
    mesh = make_mesh((2, 4), ("dp", "tp"))
    m, k, n = 4, 4 * 64, 256
    bf16 = jnp.bfloat16
    if case == "weight-only":
        x1 = S((2 * m, k), bf16)
        x2 = S((k, n), jnp.int8)
        extra = (S((n,), bf16),)
        x2_spec, extra_specs = P("tp", None), (P(),)

        def op(a, b, s):
            return mc2.mm_all_reduce_base(a, b, "tp", antiquant_scale=s)

    elif case == "int8 low-bit comm":
        x1 = S((2 * m, k), jnp.int8)
        x2 = S((k, n), jnp.int8)
        extra = (S((n,), bf16), S((n,), bf16), S((n,), bf16))
        x2_spec, extra_specs = P("tp", None), (P(), P(), P())

        def op(a, b, s, q1, q2):
            return mc2.mm_all_reduce_base(
                a, b, "tp", dequant_scale=s, comm_quant_scale_1=q1, comm_quant_scale_2=q2
            )

    elif case == "mxfp8":
        x1 = S((2 * m, k), F8)
        x2 = S((n, k), F8)
        e8 = jnp.float8_e8m0fnu
        extra = (S((n, k // 64, 2), e8), S((2 * m, k // 64, 2), e8))
        x2_spec, extra_specs = P(None, "tp"), (P(None, "tp"), P("dp", "tp"))

        def op(a, b, s2, s1):
            return mc2.quant_matmul_all_reduce_v4(
                a, b, "tp", x2_scale=s2, x1_scale=s1, transpose_x2=True, group_size=GS_MX
            )

    else:
        x1 = S((2 * m, k), F8)
        x2 = S((k, n), F8)
        extra = (S((n,), jnp.float32), S((2 * m,), jnp.float32))
        x2_spec, extra_specs = P("tp", None), (P(), P("dp"))
        mode = 1 if "comm" in case else 0

        def op(a, b, s2, s1):
            return mc2.quant_matmul_all_reduce_v4(
                a, b, "tp", x2_scale=s2, x1_scale=s1, comm_quant_mode=mode
            )

    seen = {}

    def f(*args):
        out = op(*args)
        seen["out"] = str(jax.typeof(out))
        return out

    jax.eval_shape(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P("dp", "tp"), x2_spec, *extra_specs),
            out_specs=P("dp"),
            check_vma=True,
        ),
        x1,
        x2,
        *extra,
    )
    assert seen["out"] == f"bfloat16[{m},{n}]{{V:dp}}"


# --------------------------------------------------------------------------
# The order of the two scales (formula 6: ``y * x2_scale * x1_scale``)


def _general_scales(rng, m, n):
    """Scales that are not powers of two (mantissas with many bits set), so
    that ``(y * s2) * s1`` and ``(y * s1) * s2`` round differently."""
    s1 = (rng.random(m) * 0.9 + 0.55).astype(np.float32)
    s2 = (rng.random(n) * 7e-3 + 1.3e-3).astype(np.float32)
    return s1, s2


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["float8_e4m3fn", "float8_e5m2", "hifloat8"])
def test_pertoken_f32_scale_order_bit_exact(impl, kind):
    """float32 output, no x3: nothing separates the two scale products from
    the output, so the result is bit-exact to ``f32(f32(y * s2) * s1)`` and
    differs from the swapped order ``f32(f32(y * s1) * s2)`` (checked here
    on the model itself, so the test cannot pass vacuously)."""
    rng = np.random.default_rng(17)
    m, k, n = 24, 64, 40
    x1, x2, _, _, bias = make_case(rng, "pertoken", kind, m=m, k=k, n=n)
    s1, s2 = _general_scales(rng, m, n)
    want = rank_y("pertoken", kind, x1, x2, s1, s2, bias, transpose_x2=False)
    ones_m, ones_n = np.ones(m, F32), np.ones(n, F32)
    y0 = rank_y("pertoken", kind, x1, x2, ones_m, ones_n, bias, transpose_x2=False)
    swapped = (y0 * s1[:, None]) * s2[None, :]
    assert np.count_nonzero(swapped != want) > m * n // 20, "scales too regular to tell the order"
    kw = call_kwargs("pertoken", kind, s1, s2, bias, None, F32, False)
    got = mc2.quant_matmul_all_reduce_v4(x1, x2, None, implementation=impl, **kw)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_packed_f32_general_scale_bit_exact(impl):
    """The packed rows with non-power-of-two fp19 scales: ``f32(y * fp19(s2))``
    bit for bit (catches the fp19 truncation being skipped or the scale
    applied before the bias)."""
    rng = np.random.default_rng(18)
    m, k, n = 24, 64, 40
    x1, x2, _, _, bias = make_case(rng, "packed", "float8_e4m3fn", m=m, k=k, n=n)
    _, s2 = _general_scales(rng, m, n)
    assert np.count_nonzero(fp19(s2) != s2) > n // 2
    want = rank_y("packed", "float8_e4m3fn", x1, x2, None, s2, bias, transpose_x2=False)
    kw = call_kwargs("packed", "float8_e4m3fn", None, s2, bias, None, F32, False)
    got = mc2.quant_matmul_all_reduce_v4(x1, x2, None, implementation=impl, **kw)
    np.testing.assert_array_equal(np.asarray(got), want)
