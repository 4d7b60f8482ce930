"""Bit-exact checks of the documented rounding steps (docs/semantics.md
§4.3, §5.2, §8, §10.2, §10.3, §10.5) against small NumPy step models written
here from the document, never from jax_mc2.

Every case is built so that the fp32 accumulations are exact in any order
(small integers and dyadic values, modest k; checked as a premise), so only
the documented roundings decide the bits. Each test also checks, as a
premise, that a plausible wrong model (a missing or extra rounding, a
reassociated product, a reciprocal instead of a division, ...) gives
different bits on its inputs, so that the test can fail.
"""

import itertools

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import ALL_IMPLEMENTATIONS, IMPLEMENTATIONS, make_mesh
from hlo import reductions
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2
from jax_mc2 import quant

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
f32 = np.float32
HALF_DTYPES = pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])


# --------------------------------------------------------------------------
# Helpers


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bits(got, want):
    got = np.asarray(got)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _differ(a, b):
    """How many elements have different bits."""
    return int(np.count_nonzero(_bits(a) != _bits(b)))


def _grid(values):
    """The largest e such that every value is a multiple of 2^e."""
    v = np.abs(np.asarray(values, np.float64).ravel())
    v = v[v != 0]
    if v.size == 0:
        return 0
    mant, exp = np.frexp(v)
    ints = (mant * 2.0**53).astype(np.int64)
    low = np.log2((ints & -ints).astype(np.float64)).astype(np.int64)
    return int((exp - 53 + low).min())


def assert_exact_fp32_sums(terms):
    """Premise: summing ``terms`` (float64, the summands along the last axis)
    in fp32 is exact in every order: all are multiples of one 2^g and the
    sum of their magnitudes stays below 2^(g + 24)."""
    terms = np.asarray(terms, np.float64)
    g = _grid(terms)
    assert np.all(np.abs(terms).sum(axis=-1) < 2.0 ** (g + 24)), "fp32 sums would round"


def _products(x1, w):
    """The float64 terms x1[i, t] * w[t, j] as [m, n, k] (exact: every
    product of two 16-bit floats fits a float64)."""
    return np.asarray(x1, np.float64)[:, None, :] * np.asarray(w, np.float64).T[None, :, :]


def _signed_permutation(rng, m):
    p = np.zeros((m, m))
    p[np.arange(m), rng.permutation(m)] = rng.choice([-1.0, 1.0], m)
    return p


# --------------------------------------------------------------------------
# 1. mm_all_reduce_base, non-quantized, one device (§10.2): one rounding of
#    f32(x1 @ x2) + f32(bias) + f32(x3).


def _plain_case(rng, dtype, m=16, k=16, n=24):
    # Integers: |x1 @ x2| mostly past 2048 (float16) / 256 (bfloat16), where
    # the dtype's spacing exceeds 1; bias and x3 in quarters.
    hi = 60 if dtype == F16 else 32
    x1 = rng.integers(-hi, hi + 1, (m, k)).astype(dtype)
    x2 = rng.integers(-hi, hi + 1, (k, n)).astype(dtype)
    bias = (rng.integers(-32, 33, n) / 4).astype(dtype)
    x3 = (rng.integers(-32, 33, (m, n)) / 4).astype(dtype)
    return x1, x2, bias, x3


def _epilogue_f32(x1, w, bias, x3):
    """f32(x1 @ w) + f32(bias) + f32(x3), unrounded, after checking the
    premise that every fp32 sum in it is exact in any order."""
    m, n = x3.shape
    terms = np.concatenate(
        [
            _products(x1, w),
            np.broadcast_to(bias.astype(np.float64)[None, :, None], (m, n, 1)),
            x3.astype(np.float64)[..., None],
        ],
        axis=-1,
    )
    assert_exact_fp32_sums(terms)
    acc = (x1.astype(np.float64) @ w.astype(np.float64)).astype(f32)
    return acc, (acc + bias.astype(f32)) + x3.astype(f32)


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
@HALF_DTYPES
def test_plain_one_device_rounds_once(impl, dtype):
    rng = np.random.default_rng(101)
    x1, x2, bias, x3 = _plain_case(rng, dtype)
    acc, exact = _epilogue_f32(x1, x2, bias, x3)
    want = exact.astype(dtype)
    # Premise: rounding x1 @ x2 first, or rounding again after the bias,
    # gives other bits.
    mm_first = ((acc.astype(dtype).astype(f32) + bias.astype(f32)) + x3.astype(f32)).astype(dtype)
    bias_first = ((acc + bias.astype(f32)).astype(dtype).astype(f32) + x3.astype(f32)).astype(dtype)
    assert _differ(mm_first, want) > want.size // 10
    assert _differ(bias_first, want) > want.size // 20
    got = mc2.mm_all_reduce_base(x1, x2, None, bias=bias, x3=x3, implementation=impl)
    assert_bits(got, want)


# --------------------------------------------------------------------------
# 2. The same on 2 and 4 ranks (§10.1, §10.3, §10.5): each rank's partial is
#    rounded to the dtype, and the all-reduce sums the rounded partials in
#    the dtype (bfloat16: fp32 sum rounded once; float16: a float16 sum in
#    rank order from +0).


def _sharded_case(rng, dtype, world, m=8, n=16):
    """Per rank r: x1_r = [S_r | T_r / 8] (S, T signed permutations) and
    x2_r = [B_r ; D_r], so the rank's partial is S_r B_r + T_r D_r / 8 + bias
    + x3: a multiple of 8 in [2^p + 8, 2^(p+1)) (p = 8 bfloat16, 11 float16;
    the dtype's spacing there is 2) plus a fraction below 7/8, which the
    rounding drops. Every sum of rounded partials is then a multiple of 8
    below 2^(p+3) in magnitude, exact in the dtype and in fp32 in any order,
    while the fractions of R ranks together often survive a single
    rounding of the unrounded sum."""
    lo, hi = (33, 64) if dtype == BF16 else (257, 512)
    x1s, x2s = [], []
    for _ in range(world):
        x1s.append(
            np.concatenate([_signed_permutation(rng, m), _signed_permutation(rng, m) / 8], axis=1)
        )
        big = 8 * rng.integers(lo, hi, (m, n)) * rng.choice([-1, 1], (m, n))
        x2s.append(np.concatenate([big, rng.integers(-3, 4, (m, n))], axis=0))
    x1 = np.concatenate(x1s, axis=1).astype(dtype)
    x2 = np.concatenate(x2s, axis=0).astype(dtype)
    bias = (rng.integers(-2, 3, n) / 8).astype(dtype)
    x3 = (rng.integers(-2, 3, (m, n)) / 8).astype(dtype)
    return x1, x2, bias, x3


def _rank_partials(x1, x2, bias, x3, world, dtype):
    """Each rank's round(f32(x1_r @ x2_r) + f32(bias) + f32(x3)), and the
    unrounded fp32 values."""
    k_local = x1.shape[1] // world
    exact, rounded = [], []
    for r in range(world):
        cols = slice(r * k_local, (r + 1) * k_local)
        _, p = _epilogue_f32(x1[:, cols], x2[cols], bias, x3)
        exact.append(p)
        rounded.append(p.astype(dtype))
    return exact, rounded


def _reduce_f32_once(parts, dtype):
    """bfloat16 as XLA:CPU reduces it: fp32 sum in the given order, one rounding."""
    acc = np.zeros(parts[0].shape, f32)
    for p in parts:
        acc = acc + p.astype(f32)
    return acc.astype(dtype)


def _reduce_in_dtype(parts, dtype):
    """float16 as XLA:CPU reduces it (§10.5): from +0, each addition rounded."""
    acc = np.zeros(parts[0].shape, dtype)
    for p in parts:
        acc = (acc.astype(f32) + p.astype(f32)).astype(dtype)
    return acc


def _all_reduce_wire_types(text):
    """The operand/result types and the reduction region's scalar types of
    every stablehlo.all_reduce in a lowered text."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if '"stablehlo.all_reduce"' not in line:
            continue
        j = i + 1
        while not lines[j].lstrip().startswith("}) :"):
            j += 1
        found.append(("\n".join(lines[i + 1 : j]), lines[j]))
    return found


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
@HALF_DTYPES
@pytest.mark.parametrize("world", [2, 4])
def test_plain_sharded_sums_rounded_partials(impl, dtype, world):
    rng = np.random.default_rng(200 + world)
    x1, x2, bias, x3 = _sharded_case(rng, dtype, world)
    exact, rounded = _rank_partials(x1, x2, bias, x3, world, dtype)
    reduce = _reduce_in_dtype if dtype == F16 else _reduce_f32_once
    want = reduce(rounded, dtype)
    # Premise: the sum of the rounded partials is exact, so neither the
    # order nor fp32 vs dtype accumulation changes it (the order is not part
    # of the contract, §10.3) ...
    for order in itertools.permutations(range(world)):
        for any_reduce in (_reduce_in_dtype, _reduce_f32_once):
            assert_bits(any_reduce([rounded[r] for r in order], dtype), want)
    # ... while summing the unrounded fp32 partials and rounding once would
    # give other bits.
    assert _differ(_reduce_f32_once(exact, dtype), want) > want.size // 10

    mesh = make_mesh((world,), ("tp",))
    f = jax.jit(
        jax.shard_map(
            lambda a, b, c, d: mc2.mm_all_reduce_base(
                a, b, "tp", bias=c, x3=d, implementation=impl
            ),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None), P(), P()),
            out_specs=P(),
        )
    )
    assert_bits(f(x1, x2, bias, x3), want)
    text = f.lower(x1, x2, bias, x3).as_text()
    if impl == "ascend":  # the reduction runs inside CANN's kernel
        assert "mc2_ascend_host_bridge" in text and "stablehlo.all_reduce" not in text
        return
    # The all-reduce communicates in the output dtype, bfloat16 as well as
    # float16 (§10.3): operands, result and reduction region. The ffi
    # implementation hands a bfloat16 result over as float32 holding its
    # values, the float32 sum XLA:CPU runs for a bfloat16 all-reduce (§10.5).
    assert reductions(text) == 1
    wire = _all_reduce_wire_types(text)
    name = "f16" if dtype == F16 else "f32" if impl == "ffi" else "bf16"
    assert len(wire) == 1, text
    region, signature = wire[0]
    m, n = x3.shape
    assert signature.strip() == f"}}) : (tensor<{m}x{n}x{name}>) -> tensor<{m}x{n}x{name}>"
    assert f"tensor<{name}>" in region, region
    assert name == "f32" or "f32" not in region, region


# --------------------------------------------------------------------------
# 3. Weight-only int8 (§8): float16 dequantizes in float16 steps (round
#    after the offset add, round after the scale), bfloat16 in fp32 with one
#    rounding; then fp32 accumulation, + bias + x3, one rounding.


def _antiquant_weights(x2, scale, offset, dtype, *, f16_steps):
    v = x2.astype(f32)
    if offset is not None:
        v = v + offset.astype(f32)
        if f16_steps:
            v = v.astype(dtype).astype(f32)
    return (v * scale.astype(f32)).astype(dtype)


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
@HALF_DTYPES
@pytest.mark.parametrize("with_offset", [False, True], ids=["no_offset", "offset"])
def test_weight_only_steps(impl, dtype, with_offset):
    rng = np.random.default_rng(300 + with_offset)
    m, k, n = 8, 32, 16
    x1 = rng.integers(-3, 4, (m, k)).astype(dtype)
    # |x2| >= 32 and scales in [1/32, 1/16]: every dequantized weight is at
    # least about 1 in magnitude, so the products share a coarse grid.
    x2 = (rng.integers(32, 128, (k, n)) * rng.choice([-1, 1], (k, n))).astype(np.int8)
    scale = rng.uniform(1 / 32, 1 / 16, n).astype(dtype)
    offset = rng.uniform(-1, 1, n).astype(dtype) if with_offset else None
    bias = (rng.integers(-256, 257, n) / 64).astype(dtype)
    x3 = (rng.integers(-256, 257, (m, n)) / 64).astype(dtype)

    w = _antiquant_weights(x2, scale, offset, dtype, f16_steps=dtype == F16)
    _epilogue_f32(x1, w, bias, x3)  # the premise: exact fp32 sums

    def finish(weights):
        acc = (x1.astype(np.float64) @ weights.astype(np.float64)).astype(f32)
        return ((acc + bias.astype(f32)) + x3.astype(f32)).astype(dtype)

    want = finish(w)
    # Premises: other dequantizations and a rounding of the matmul before
    # bias + x3 give other bits.
    acc = (x1.astype(np.float64) @ w.astype(np.float64)).astype(f32)
    mm_first = ((acc.astype(dtype).astype(f32) + bias.astype(f32)) + x3.astype(f32)).astype(dtype)
    assert _differ(mm_first, want) > want.size // 10
    unrounded_w = x2.astype(f32)
    if offset is not None:
        unrounded_w = unrounded_w + offset.astype(f32)
    unrounded_w = (unrounded_w * scale.astype(f32)).astype(np.float64)
    no_w_rounding = (x1.astype(np.float64) @ unrounded_w).astype(f32)
    no_w_rounding = ((no_w_rounding + bias.astype(f32)) + x3.astype(f32)).astype(dtype)
    assert _differ(no_w_rounding, want) > want.size // 10
    if with_offset:  # float16 in bfloat16's steps and the other way round
        other = _antiquant_weights(x2, scale, offset, dtype, f16_steps=dtype != F16)
        assert _differ(other, w) > w.size // 10
        assert _differ(finish(other), want) > want.size // 10

    got = mc2.mm_all_reduce_base(
        x1,
        x2,
        None,
        antiquant_scale=scale,
        antiquant_offset=offset,
        bias=bias,
        x3=x3,
        implementation=impl,
    )
    assert_bits(got, want)


# --------------------------------------------------------------------------
# 4. int8 full quantization with a pertoken scale (§10.2): float16 output
#    round(f32(acc) * scale * pertoken), left to right in fp32.


def _scale_order_triples(count):
    """Searches (acc, scale, token) triples whose two fp32 products
    (acc * scale) * token and acc * (scale * token) round to different
    float16 values."""
    rng = np.random.default_rng(404)
    size = 1 << 20
    acc = rng.integers(2**10, 2**20, size) * rng.choice([-1, 1], size)
    scale = rng.uniform(1e-4, 1e-2, size).astype(f32)
    token = rng.uniform(0.5, 2.0, size).astype(f32)
    left = (acc.astype(f32) * scale) * token
    right = acc.astype(f32) * (scale * token)
    hits = np.flatnonzero(left.astype(F16) != right.astype(F16))
    assert hits.size >= count, hits.size
    hits = hits[:count]
    return acc[hits].astype(np.int64), scale[hits], token[hits]


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_int8_pertoken_scales_left_to_right(impl):
    m = n = 16
    acc_d, scale, token = _scale_order_triples(m)
    rng = np.random.default_rng(405)
    # x1 = one-hot rows (identity): acc[i, j] = x2[i, j] + bias[j], and the
    # diagonal takes the triples found above: acc[i, i] = acc_d[i] with
    # scale[i] and token[i].
    x1 = np.eye(m, dtype=np.int8)
    x2 = rng.integers(-128, 128, (m, n)).astype(np.int8)
    bias = (acc_d - x2[np.arange(n), np.arange(n)]).astype(np.int32)
    acc = x2.astype(np.int64) + bias.astype(np.int64)[None, :]
    assert np.all(acc[np.arange(m), np.arange(m)] == acc_d)
    assert np.all(np.abs(acc) < 2**24)  # exact in fp32
    acc32 = acc.astype(f32)
    y = ((acc32 * scale[None, :]) * token[:, None]).astype(F16)
    reassociated = (acc32 * (scale[None, :] * token[:, None])).astype(F16)
    assert _differ(reassociated, y) >= m  # premise: every diagonal element
    x3 = (rng.integers(-64, 65, (m, n)) / 8).astype(F16)
    with_x3 = (y.astype(f32) + x3.astype(f32)).astype(F16)

    for extra, want in ((None, y), (x3, with_x3)):
        got = mc2.mm_all_reduce_base(
            x1,
            x2,
            None,
            dequant_scale=scale,
            pertoken_scale=token,
            bias=bias,
            x3=extra,
            implementation=impl,
        )
        assert_bits(got, want)


# --------------------------------------------------------------------------
# 5. quant_matmul_all_reduce_v4 with the fp8 pertile communication
#    (comm_quant_mode=1) on one device (§5.2).

FP8_MAX = f32(448.0)


def _e4m3_grid(limit, quantum):
    vals = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)
    ok = np.isfinite(vals) & (np.abs(vals) <= limit) & (vals / quantum == np.round(vals / quantum))
    return vals[ok]


def _tile_quantize(c):
    """One row block of fp32 values -> (fp8 codes, fp32 tile scales), per
    1 x 128 tile along the last axis (the tail tile padded with 0)."""
    r, n = c.shape
    t = -(-n // 128)
    tiles = np.zeros((r, t * 128), f32)
    tiles[:, :n] = c
    tiles = tiles.reshape(r, t, 128)
    a = np.abs(tiles).max(axis=-1)
    a = np.where(a == 0, FP8_MAX, a)
    sc = FP8_MAX / a
    sc = np.where(sc == 0, f32(1), sc).astype(f32)
    q = np.clip(tiles * sc[..., None], -FP8_MAX, FP8_MAX).astype(E4M3)
    return q.reshape(r, -1)[:, :n], sc


def _tile_dequantize(q, sc, *, reciprocal=False):
    r, n = q.shape
    t = sc.shape[1]
    qf = np.zeros((r, t * 128), f32)
    qf[:, :n] = q.astype(f32)
    qf = qf.reshape(r, t, 128)
    if reciprocal:  # the wrong model: multiply by f32(1 / sc)
        out = qf * (f32(1) / sc)[..., None]
    else:
        out = qf / sc[..., None]
    return out.reshape(r, -1)[:, :n]


def _pertile_one_rank(c, out_dtype, *, reciprocal=False, requantize=True):
    """§5.2 with R = 1: quantize, dequantize (q / sc), acc = 0.0 + deq,
    requantize, dequantize, round to the output dtype."""
    q, sc = _tile_quantize(c)
    acc = f32(0.0) + _tile_dequantize(q, sc, reciprocal=reciprocal)
    if requantize:
        q, sc = _tile_quantize(acc)
        acc = _tile_dequantize(q, sc, reciprocal=reciprocal)
    return acc.astype(out_dtype)


# ascend: bfloat16 output only (CANN's kernels write float16 / bfloat16).
PERTILE_CASES = [
    pytest.param(impl, out, id=f"{impl}-{out.name}")
    for out, impls in ((F32, IMPLEMENTATIONS), (BF16, ALL_IMPLEMENTATIONS))
    for impl in impls
]


@pytest.mark.parametrize("impl,out_dtype", PERTILE_CASES)
def test_fp8_pertile_comm_one_device(impl, out_dtype):
    rng = np.random.default_rng(500)
    m, k, n = 6, 32, 136  # two tiles along n, the second 8 wide
    grid = _e4m3_grid(4.0, 1 / 8)
    x1 = rng.choice(grid, (m, k)).astype(E4M3)
    x2 = rng.choice(grid, (k, n)).astype(E4M3)
    # Power-of-two scales: the scale products are exact, so an FMA
    # contraction of y * x1_scale + x3 (§10.2) cannot change a bit.
    x1_scale = np.exp2(rng.integers(-1, 2, m)).astype(f32)
    x2_scale = np.exp2(rng.integers(-3, 1, n)).astype(f32)
    bias = (rng.integers(-512, 513, n) / 64).astype(f32)
    x3 = (rng.integers(-128, 129, (m, n)) / 16).astype(out_dtype)
    assert_exact_fp32_sums(
        np.concatenate(
            [_products(x1, x2), np.broadcast_to(bias[None, :, None], (m, n, 1))], axis=-1
        )
    )
    acc = (x1.astype(np.float64) @ x2.astype(np.float64)).astype(f32)
    y = ((acc + bias) * x2_scale[None, :]) * x1_scale[:, None]  # exact: pow2 scales
    c = y + x3.astype(f32)  # fp32, not rounded to the output dtype first
    assert np.all(c.astype(np.float64) == y.astype(np.float64) + x3.astype(np.float64))
    want = _pertile_one_rank(c, out_dtype)
    # Premises: with float32 output a reciprocal multiply instead of the
    # division gives other bits (bfloat16 output hides that one ulp); with
    # bfloat16 output so does rounding C to bfloat16 before quantizing. (With
    # one rank the requantization is a no-op: RN(448 / RN(448 / sc)) gives sc
    # back.)
    if out_dtype == F32:
        assert _differ(_pertile_one_rank(c, out_dtype, reciprocal=True), want) > want.size // 10
    else:
        rounded_c = c.astype(out_dtype).astype(f32)
        assert _differ(_pertile_one_rank(rounded_c, out_dtype), want) > want.size // 10
    got = mc2.quant_matmul_all_reduce_v4(
        x1,
        x2,
        None,
        x1_scale=x1_scale,
        x2_scale=x2_scale,
        bias=bias,
        x3=x3,
        comm_quant_mode=1,
        out_dtype=out_dtype,
        implementation=impl,
    )
    assert_bits(got, want)


# --------------------------------------------------------------------------
# 6. quant.perblock_quantize(dtype="hifloat8") scales (§4.3):
#    max(amax * float32(1 / 32768), float32 tiny) per 128 x 128 tile, amax
#    over the finite values, 1 for a tile without a finite nonzero value.

HIF8_MAX = 32768.0


def _perblock_scales(x, fmax, *, floor=True, finite_only=True):
    r, c = x.shape
    rb, cb = -(-r // 128), -(-c // 128)
    tiny = f32(np.finfo(f32).tiny)
    scales = np.ones((rb, cb), f32)
    with np.errstate(invalid="ignore"):
        for i in range(rb):
            for j in range(cb):
                tile = np.abs(x[128 * i : 128 * i + 128, 128 * j : 128 * j + 128])
                if finite_only:
                    tile = np.where(np.isfinite(tile), tile, f32(0))
                amax = f32(tile.max())
                if np.isnan(amax) or amax > 0:
                    s = amax * f32(1.0 / fmax)
                    scales[i, j] = max(s, tiny) if floor else s
    return scales


def test_perblock_quantize_hifloat8_scales():
    rng = np.random.default_rng(600)
    r, c = 260, 300  # 3 x 3 tiles: a 4-row and a 44-column tail
    x = (rng.standard_normal((r, c)) * np.exp2(rng.integers(-6, 7, (r, c)))).astype(f32)
    x[0:128, 128:256] = 0  # all zero: scale 1
    x[128:256, 0:128] *= f32(1e-37)  # tiny: amax / 32768 is below 2^-126
    x[128:256, 128:256] = 0  # zeros and an infinity: scale 1
    x[200, 200] = np.inf
    x[130, 270] = np.inf  # a tile with a NaN and infinities among finite values
    x[131, 260] = -np.inf
    x[140, 290] = np.nan
    want = _perblock_scales(x, HIF8_MAX)
    assert np.all(np.isfinite(want))
    # Premises: e5m2's range, no floor, or non-finite values in amax give
    # other scales.
    assert _differ(_perblock_scales(x, 57344.0), want) > 0
    assert _differ(_perblock_scales(x, HIF8_MAX, floor=False), want) > 0
    assert _differ(_perblock_scales(x, HIF8_MAX, finite_only=False), want) > 0
    assert want[0, 1] == 1 and want[1, 1] == 1 and want[1, 0] == np.finfo(f32).tiny

    codes, scales = quant.perblock_quantize(x, dtype="hifloat8")
    assert_bits(scales, want)
    # The codes of a few exactly known values: +-amax -> +-32768 (0x6E /
    # 0xEE) where the scale is not floored, +-inf saturates there too, NaN
    # is 0x80 and 0 is 0x00.
    codes = np.asarray(codes)
    for i, j in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 2)):
        tile = x[128 * i : 128 * i + 128, 128 * j : 128 * j + 128]
        finite = np.where(np.isfinite(tile), np.abs(tile), 0)
        a, b = np.unravel_index(np.argmax(finite), tile.shape)
        code = codes[128 * i + a, 128 * j + b]
        assert code == (0x6E if tile[a, b] > 0 else 0xEE), (i, j, hex(code))
    assert codes[130, 270] == 0x6E and codes[131, 260] == 0xEE and codes[200, 200] == 0x6E
    assert codes[140, 290] == 0x80 and codes[0, 128] == 0x00


# --------------------------------------------------------------------------
# 7. Tangents of the bilinear products: one rounding of the fp32 sum
#    f32(dx1 @ x2) + f32(x1 @ dx2), as the primal rounds once.


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@HALF_DTYPES
def test_shared_expert_tangent_rounds_once(impl, dtype):
    """The dispatch's shared-expert output mm_y = mm_x @ mm_weight: its JVP
    tangent rounded each product before summing them (two roundings more)."""
    rng = np.random.default_rng(107)
    mm_x, mm_w, _, _ = _plain_case(rng, dtype, m=8, k=16, n=24)
    d_x, d_w, _, _ = _plain_case(rng, dtype, m=8, k=16, n=24)
    terms = np.concatenate([_products(d_x, mm_w), _products(mm_x, d_w)], axis=-1)
    assert_exact_fp32_sums(terms)
    first = (d_x.astype(np.float64) @ mm_w.astype(np.float64)).astype(f32)
    second = (mm_x.astype(np.float64) @ d_w.astype(np.float64)).astype(f32)
    want = (first + second).astype(dtype)
    # Premise: rounding each product first gives other bits.
    each = (first.astype(dtype).astype(f32) + second.astype(dtype).astype(f32)).astype(dtype)
    assert _differ(each, want) > want.size // 10

    world, k_exp, n_exp = 2, 8, 4
    x = np.ones((world, 2, k_exp), dtype)
    w = np.ones((world, 1, k_exp, n_exp), dtype)
    table = np.ones((world, world), np.int64)

    def per_rank(x, w, mm_x, mm_w):
        _, mm_y, _ = mc2.alltoallv_grouped_matmul(
            x[0], w[0], "ep", send_counts=table, mm_x=mm_x, mm_weight=mm_w, implementation=impl
        )
        return mm_y

    f = jax.shard_map(
        per_rank,
        mesh=make_mesh((world,), ("ep",)),
        in_specs=(P("ep"), P("ep"), P(), P()),
        out_specs=P(),
    )
    zeros = (np.zeros_like(x), np.zeros_like(w))
    _, got = jax.jit(lambda p, t: jax.jvp(f, p, t))((x, w, mm_x, mm_w), (*zeros, d_x, d_w))
    assert_bits(got, want)
