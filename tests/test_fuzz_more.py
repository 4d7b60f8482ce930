"""Fuzz suite, continued (hypothesis): direct calls of the int8, grouped and
low-precision FFI handlers, the ``jax_mc2.parallel`` row-parallel wrappers
on a two-device mesh, and the int8 / perblock / MX rows of
``quant_matmul_all_reduce_v4``.

The contract is tests/test_fuzz.py's: an invalid call raises a documented
exception class whose message names the operator and the argument the
strategy broke (a direct handler call: the error JAX surfaces, naming the
handler); a valid call returns the NumPy oracle's result within its
rounding bounds (bit-exact where the oracle is exact); "xla" and "ffi"
agree; never a crash or a hang. The case count is test_fuzz's
``JAX_MC2_FUZZ_EXAMPLES`` total, shared with that file (each test here gets
``PER_TEST`` examples, as each there, the two-device wrapper tests a quarter of
that); derandomized under ``CI``.

Direct handler calls are safe under AddressSanitizer: every operand is at
least as large as the attributes and the other operands claim, except in
the bad-operand classes, which the handler must reject before it reads.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import oracle
import pytest
import test_fuzz
from conftest import make_mesh
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_ffi_handlers import _call
from test_fuzz import (
    BF16,
    DOCUMENTED,
    F16,
    F32,
    FLOATS,
    FUZZ,
    PER_TEST,
    assert_close,
    daz_sensitive,
    expect_error,
    mm_terms,
    norm_tolerance,
    run_both,
    values,
)
from test_quant_matmul_all_reduce import V4_ROWS, _applied_scale, _make_scale
from test_quant_v4_lowp import call_kwargs, decode, finish, make_case, rank_y

import jax_mc2 as mc2
from jax_mc2 import _mc2_ffi
from jax_mc2.implementations import ffi as _ffi
from jax_mc2.implementations import xla
from jax_mc2.primitives import lowp_quant_mm_all_reduce as lowp

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E5M2 = np.dtype(ml_dtypes.float8_e5m2)
I8, I16, I32 = np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32)
#: Like tests/test_fuzz.py: the full run only, not the inner loop.
pytestmark = pytest.mark.slow


def _other_float(dtype):
    return F32 if dtype != F32 else F16


def _handler_error(fn, handler, bad):
    """Runs a direct handler call: raises iff ``bad``, naming the handler."""
    if bad is None:
        return jax.block_until_ready(fn())
    with pytest.raises(Exception) as info:  # the FFI error JAX surfaces
        jax.block_until_ready(fn())
    assert handler in str(info.value), (bad, info.value)
    return None


def _rng(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


# --------------------------------------------------------------------------
# mc2_int8_matmul_ffi


INT8_BAD = (
    "x1_dtype",
    "x2_dtype",
    "out_dtype",
    "scale_dtype",
    "scale_len",
    "k_mismatch",
    "k_zero",
    "count",
    "pertoken_len",
    "bias_dtype",
    "x3_dtype",
    "x3_len",
    "comm_dtype",
)


@FUZZ
@given(st.data(), st.sampled_from((None,) * 6 + INT8_BAD))
def test_fuzz_ffi_int8_matmul(data, bad):
    """Direct calls of mc2_int8_matmul_ffi: every optional operand, both
    layouts, the comm-scale quantization, the same bits as XLA's int8 GEMM
    with the lax epilogue; bad operands are errors."""
    draw = data.draw
    rng = _rng(draw)
    m, k, n = (
        draw(st.sampled_from((1, 3))),
        draw(st.sampled_from((1, 16))),
        draw(st.sampled_from((1, 5))),
    )
    t = draw(st.booleans())
    has = {f: draw(st.booleans()) for f in ("pertoken", "bias", "x3", "comm")}
    forced = {
        "pertoken_len": "pertoken",
        "bias_dtype": "bias",
        "x3_dtype": "x3",
        "x3_len": "x3",
        "comm_dtype": "comm",
    }.get(bad)
    if forced:
        has[forced] = True  # the operand the bad class breaks is present
    out_type = draw(st.sampled_from((F16, BF16) if has["comm"] else FLOATS))
    lim = draw(st.sampled_from((1, 128)))
    x1 = rng.integers(-lim, lim, (m, 0 if bad == "k_zero" else k)).astype(I8)
    kx2 = 0 if bad == "k_zero" else k + (bad == "k_mismatch")
    x2 = rng.integers(-lim, lim, (n, kx2) if t else (kx2, n)).astype(I8)
    scale = (rng.random(draw(st.sampled_from((1, n)))) * 1e-2 + 1e-5).astype(F32)
    tok = (rng.random(m + (bad == "pertoken_len")) + 0.5).astype(F32)
    bias = rng.integers(-5000, 5000, n).astype(F32 if bad == "bias_dtype" else I32)
    x3_dtype = _other_float(out_type) if bad == "x3_dtype" else out_type
    x3 = rng.standard_normal((m, n + (bad == "x3_len"))).astype(x3_dtype)
    cs = (rng.random(n) * 0.05 + 0.02).astype(F32 if bad == "comm_dtype" else out_type)
    want_x1, want_x2 = x1, x2
    if bad == "x1_dtype":
        x1 = x1.astype(F32)
    elif bad == "x2_dtype":
        x2 = x2.astype(I32)
    elif bad == "scale_dtype":
        scale = scale.astype(F16)
    elif bad == "scale_len":
        scale = np.ones(n + 1, F32)
    operands = [x1, x2, scale] + [
        a for a, f in ((tok, "pertoken"), (bias, "bias"), (x3, "x3"), (cs, "comm")) if has[f]
    ]
    if bad == "count":
        operands = operands[:-1] if len(operands) > 3 else operands + [np.zeros(n, I32)]
    result_type = I8 if has["comm"] else out_type
    if bad == "out_dtype":
        result_type = F16 if has["comm"] else I32
    got = _handler_error(
        lambda: _call(
            _ffi.INT8_MATMUL,
            jax.ShapeDtypeStruct((m, n), result_type),
            *operands,
            transpose_x2=t,
            has_pertoken=has["pertoken"],
            has_bias=has["bias"],
            has_x3=has["x3"],
            has_comm_scale=has["comm"],
            bf16_as_f32=False,
            parallelism=np.int64(1),
        ),
        "mc2_int8_matmul_ffi",
        bad,
    )
    if bad is not None:
        return
    # XLA's int8 GEMM with the epilogue in lax ops (the ffi path where XLA's
    # GEMM is the faster one): the same bits.
    on_xla = xla.local_int8_matmul(
        x1,
        x2,
        scale,
        tok if has["pertoken"] else None,
        bias if has["bias"] else None,
        x3 if has["x3"] else None,
        transpose_x2=t,
        out_dtype=out_type,
        comm_scale=cs if has["comm"] else None,
    )
    np.testing.assert_array_equal(np.asarray(on_xla), np.asarray(got))
    w = want_x2.T if t else want_x2
    # The model: exact int32 accumulation, fp32 dequant, roundings in order.
    acc = want_x1.astype(np.int64) @ w.astype(np.int64) + (bias if has["bias"] else 0)
    y = acc.astype(F32) * np.broadcast_to(scale, (n,))
    if has["pertoken"]:
        y = y * tok[:, None]
    if has["x3"]:
        y = y.astype(out_type).astype(F32) + x3.astype(F32)
    if has["comm"]:
        q = (y.astype(out_type).astype(F32) / cs.astype(F32)).astype(F16).astype(F32)
        want = np.where(np.isnan(q), 0, np.round(np.clip(q, -128, 127))).astype(I8)
    else:
        want = y.astype(out_type)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got).astype(np.float64), want.astype(np.float64))


# --------------------------------------------------------------------------
# mc2_grouped_matmul_ffi


GMM_BAD = (
    "x_dtype",
    "w_dtype",
    "y_dtype",
    "idx_dtype",
    "w_k",
    "y_n",
    "x_rank",
    "offsets_len",
    "dst_len",
    "offsets_decreasing",
    "offsets_range",
    "src_range",
    "dst_range",
    "dst_dup",
    "permute_flag",
    "permute_shape",
)


def _gmm_model(x, w, offsets, src, dst, rows_out, t):
    """y (float64, before the rounding) and sum |products| per element."""
    n = w.shape[1] if t else w.shape[2]
    y, terms = np.zeros((rows_out, n)), np.zeros((rows_out, n))
    xf = oracle.to_f64(x)
    for g in range(w.shape[0]):
        wg = oracle.to_f64(w[g])
        wg = wg.T if t else wg
        for v in range(offsets[g], offsets[g + 1]):
            if dst[v] < 0:
                continue
            row = xf[src[v]] if src[v] >= 0 else np.zeros(x.shape[1])
            y[dst[v]] = row @ wg
            terms[dst[v]] = np.nan_to_num(np.abs(row), posinf=0) @ np.abs(wg)
    return y, terms


@FUZZ
@given(st.data(), st.sampled_from((None,) * 6 + GMM_BAD))
def test_fuzz_ffi_grouped_matmul(data, bad):
    """Direct calls of mc2_grouped_matmul_ffi: random groups, gathers (src -1
    reads zeros) and scatters (dst -1 discards), the permute_out result."""
    draw = data.draw
    rng = _rng(draw)
    dtype = draw(st.sampled_from(FLOATS))
    r_in, k, n = (
        draw(st.sampled_from((1, 4))),
        draw(st.sampled_from((1, 5))),
        draw(st.sampled_from((1, 3))),
    )
    g = draw(st.sampled_from((1, 3)))
    v = draw(st.sampled_from((0, 1, 5) if bad is None else (2, 5)))
    rows_out = draw(st.sampled_from((1, 6)))
    t, permute = draw(st.booleans()), draw(st.booleans())
    x = values(draw, (r_in, k), dtype, draw(st.sampled_from(("normal", "integers", "nonfinite"))))
    w = values(draw, (g, n, k) if t else (g, k, n), dtype, "normal")
    assume(not daz_sensitive(x, w))
    offsets = np.sort(rng.integers(0, v + 1, g + 1)).astype(I32)
    src = rng.integers(-1, r_in, v).astype(I32)
    perm = rng.permutation(rows_out)
    dst = np.array(
        [perm[i] if i < rows_out and rng.random() < 0.8 else -1 for i in range(v)], I32
    ).reshape(v)
    outside = (np.arange(v) < offsets[0]) | (np.arange(v) >= offsets[g])
    dst[outside] = rng.integers(-1, rows_out, int(outside.sum()))  # may repeat: unused rows
    y_type, y_n, p_shape = dtype, n, (v, k)
    if bad == "x_dtype":
        x = x.astype(I32)
    elif bad == "w_dtype":
        w = w.astype(_other_float(dtype))
    elif bad == "y_dtype":
        y_type = _other_float(dtype)
    elif bad == "idx_dtype":
        which = draw(st.sampled_from(("offsets", "src", "dst")))
        offsets, src, dst = (
            a.astype(I16) if name == which else a
            for name, a in (("offsets", offsets), ("src", src), ("dst", dst))
        )
    elif bad == "w_k":
        w = np.concatenate([w, w[..., :1] if t else w[:, :1]], axis=2 if t else 1)
    elif bad == "y_n":
        y_n = n + 1
    elif bad == "x_rank":
        x = x[None]
    elif bad == "offsets_len":
        offsets = offsets[:-1]
    elif bad == "dst_len":
        dst = np.concatenate([dst, [-1]]).astype(I32)
    elif bad == "offsets_decreasing":
        offsets[0], offsets[1] = v, 0
    elif bad == "offsets_range":
        offsets[-1] = v + 1
    elif bad == "src_range":
        src[draw(st.integers(0, v - 1))] = draw(st.sampled_from((-2, r_in)))
    elif bad == "dst_range":
        dst[draw(st.integers(0, v - 1))] = draw(st.sampled_from((-2, rows_out)))
    elif bad == "dst_dup":
        offsets[:] = v
        offsets[0] = 0
        dst[0] = dst[1] = 0
    elif bad == "permute_shape":
        permute, p_shape = True, (v, k + 1)
    y = jax.ShapeDtypeStruct((rows_out, y_n), y_type)
    p = jax.ShapeDtypeStruct(p_shape, x.dtype)
    flag = (not permute) if bad == "permute_flag" else permute
    got = _handler_error(
        lambda: _call(
            _ffi.GROUPED_MATMUL,
            (y, p) if permute else y,
            x,
            w,
            offsets,
            src,
            dst,
            transpose_w=t,
            has_permute_out=flag,
            parallelism=np.int64(draw(st.sampled_from((1, 2)))),
        ),
        "mc2_grouped_matmul_ffi",
        bad,
    )
    if bad is not None:
        return
    got_y = got[0] if permute else got
    want, terms = _gmm_model(x, w, offsets, src, dst, rows_out, t)
    want = want.astype(dtype).astype(np.float64)
    tol = oracle.tolerance(dtype, 1, np.abs(want), k=k, terms=terms)
    assert got_y.dtype == dtype
    assert_close(got_y, want, tol, "mc2_grouped_matmul_ffi y")
    if permute:
        want_p = np.where((src >= 0)[:, None], x[np.maximum(src, 0)], 0)
        np.testing.assert_array_equal(
            np.asarray(got[1]).astype(np.float64), want_p.astype(dtype).astype(np.float64)
        )


# --------------------------------------------------------------------------
# mc2_grouped_matmul_wgrad_ffi


WGRAD_BAD = (
    "x_dtype",
    "dy_dtype",
    "dw_dtype",
    "offsets_dtype",
    "dy_rows",
    "dw_k",
    "dw_n",
    "offsets_len",
    "offsets_range",
    "offsets_negative",
    "offsets_decreasing",
    "x_rank",
)


@FUZZ
@given(st.data(), st.sampled_from((None,) * 4 + WGRAD_BAD))
def test_fuzz_ffi_grouped_matmul_wgrad(data, bad):
    """Direct calls of mc2_grouped_matmul_wgrad_ffi: dw[g] = x_g^T @ dy_g
    over random contiguous groups (empty groups give zeros)."""
    draw = data.draw
    rng = _rng(draw)
    dtype = draw(st.sampled_from(FLOATS))
    rows = draw(st.sampled_from((0, 1, 5) if bad is None else (1, 5)))
    k, n, g = (draw(st.sampled_from(s)) for s in ((1, 4), (1, 3), (1, 3)))
    t = draw(st.booleans())
    x = values(draw, (rows, k), dtype, draw(st.sampled_from(("normal", "integers", "nonfinite"))))
    dy = values(draw, (rows, n), dtype, "normal")
    assume(not daz_sensitive(x, dy))
    offsets = np.sort(rng.integers(0, rows + 1, g + 1)).astype(I32)
    dw_dtype, dw_k, dw_n = dtype, k, n
    if bad == "x_dtype":
        x = x.astype(I32)
    elif bad == "dy_dtype":
        dy = dy.astype(_other_float(dtype))
    elif bad == "dw_dtype":
        dw_dtype = _other_float(dtype)
    elif bad == "offsets_dtype":
        offsets = offsets.astype(I16)
    elif bad == "dy_rows":
        dy = np.concatenate([dy, dy[:1]])
    elif bad == "dw_k":
        dw_k = k + 1
    elif bad == "dw_n":
        dw_n = n + 1
    elif bad == "offsets_len":
        offsets = np.concatenate([offsets, offsets[-1:]])
    elif bad == "offsets_range":
        offsets[-1] = rows + 1
    elif bad == "offsets_negative":
        offsets[0] = -1
    elif bad == "offsets_decreasing":
        offsets[0], offsets[1] = rows, 0
    elif bad == "x_rank":
        x = x[None]
    shape = (g, dw_n, dw_k) if t else (g, dw_k, dw_n)
    got = _handler_error(
        lambda: _call(
            _ffi.GROUPED_MATMUL_WGRAD,
            jax.ShapeDtypeStruct(shape, dw_dtype),
            x,
            dy,
            offsets,
            transpose_w=t,
            parallelism=np.int64(draw(st.sampled_from((1, 2)))),
        ),
        "mc2_grouped_matmul_wgrad_ffi",
        bad,
    )
    if bad is not None:
        return
    want, terms = np.zeros((g, k, n)), np.zeros((g, k, n))
    xf, dyf = oracle.to_f64(x), oracle.to_f64(dy)
    for j in range(g):
        rs = slice(offsets[j], offsets[j + 1])
        want[j] = xf[rs].T @ dyf[rs]
        terms[j] = np.nan_to_num(np.abs(xf[rs]), posinf=0).T @ np.abs(dyf[rs])
    if t:
        want, terms = want.transpose(0, 2, 1), terms.transpose(0, 2, 1)
    want = want.astype(dtype).astype(np.float64)
    tol = oracle.tolerance(dtype, 1, np.abs(want), k=max(rows, 1), terms=terms)
    assert got.dtype == dtype
    assert_close(got, want, tol, "mc2_grouped_matmul_wgrad_ffi")


# --------------------------------------------------------------------------
# mc2_lowp_matmul_ffi

LOWP_KINDS = {
    "scaled": ("float8_e4m3fn", "float8_e5m2", "hifloat8"),
    "perblock": ("float8_e4m3fn", "float8_e5m2", "hifloat8"),
    "mx": ("float8_e4m3fn", "float8_e5m2"),
}
LOWP_BAD = (
    "x_dtype",
    "x2_dtype",
    "mode",
    "mx_layout",
    "perblock_bias",
    "perblock_no_s1",
    "block_k",
    "out_dtype",
    "comm_hif8",
    "comm_out",
    "k_mismatch",
    "k_zero",
    "s2_count",
    "s2_dtype",
    "s1_count",
    "bias_count",
    "x3_count",
    "count",
    "mx_no_s1",
)


def _perblock_y(kind, x1, x2, s1, s2, block_k, t):
    """The kernel's perblock mode for any block_k: s1 [m, kb], s2 [kb, n],
    the k-blocks' fp32 products scaled and summed in order."""
    a, b = decode(x1, kind), decode(x2, kind)
    b = b.T if t else b
    y = np.zeros((a.shape[0], b.shape[1]), F32)
    for kb in range(s2.shape[0]):
        blk = slice(kb * block_k, (kb + 1) * block_k)
        y = y + (a[:, blk] @ b[blk]).astype(F32) * (s1[:, kb][:, None] * s2[kb][None, :])
    return y


@FUZZ
@given(
    st.data(),
    st.sampled_from(("scaled", "perblock", "mx")),
    st.sampled_from((None,) * 6 + LOWP_BAD),
)
def test_fuzz_ffi_lowp_matmul(data, mode, bad):
    """Direct calls of mc2_lowp_matmul_ffi in its three modes (values on the
    model's exact grid, so the results are bit-exact); bad operands and
    attribute combinations are errors."""
    draw = data.draw
    rng = _rng(draw)
    kind = draw(st.sampled_from(LOWP_KINDS[mode]))
    if bad == "comm_hif8":
        kind = "hifloat8"
        mode = draw(st.sampled_from(("scaled", "perblock")))
    elif bad in ("mx_layout", "mx_no_s1"):
        mode = "mx"
    elif bad in ("perblock_bias", "perblock_no_s1", "block_k"):
        mode = "perblock"
    m, n = draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 6)))
    k = draw(st.sampled_from({"scaled": (1, 32), "perblock": (8, 40), "mx": (32, 96)}[mode]))
    t = True if mode == "mx" else draw(st.booleans())
    out_dtype = draw(st.sampled_from(FLOATS))
    block_k = draw(st.sampled_from((1, 16, 128)))
    pow2 = mode == "perblock" or out_dtype == F32
    x1, x2, s1, s2, bias = make_case(
        rng, "mx" if mode == "mx" else "pertoken", kind, m=m, k=k, n=n, transpose_x2=t, pow2=True
    )
    if mode == "scaled":
        if not pow2:
            s1, s2 = make_case(rng, "pertoken", kind, m=m, k=1, n=n)[2:4]
        s2 = s2[:1] if draw(st.booleans()) else s2
        has_s1, has_bias = draw(st.booleans()), draw(st.booleans())
    elif mode == "perblock":
        kb = -(-k // block_k)
        s1 = np.exp2(rng.integers(-3, 3, (m, kb))).astype(F32)
        s2 = np.exp2(rng.integers(-3, 3, (kb, n))).astype(F32)
        has_s1, has_bias = True, False
    else:
        has_s1, has_bias = True, draw(st.booleans())
    has_x3 = draw(st.booleans())
    x3 = rng.standard_normal((m, n)).astype(F32 if out_dtype == BF16 else out_dtype)
    attrs = dict(mode=mode, t=t, block_k=block_k, comm=False, out=out_dtype, out_n=n)
    want_args = (x1, x2, s1, s2, bias)
    if bad == "x_dtype":
        x1, x2 = x1.astype(F32), x2.astype(F32)
    elif bad == "x2_dtype":
        x2 = x2.view(E5M2 if x2.dtype == E4M3 else E4M3)
    elif bad == "mode":
        attrs["mode"] = draw(st.sampled_from((-1, 3)))
    elif bad == "mx_layout":
        attrs["t"] = False
    elif bad == "perblock_bias":
        has_bias = True
    elif bad == "perblock_no_s1":
        has_s1 = False
    elif bad == "block_k":
        attrs["block_k"] = 0
    elif bad == "out_dtype":
        attrs["out"] = I32
    elif bad == "comm_hif8":
        attrs.update(comm=True, out=E4M3, out_n=n + 4)
    elif bad == "comm_out":
        attrs.update(comm=True, out_n=n + 4)  # out is a float dtype, not the e4m3 wire
    elif bad == "k_mismatch":
        x2 = np.concatenate([x2, x2[:, :1]], 1) if t else np.concatenate([x2, x2[:1]], 0)
    elif bad == "k_zero":
        x1, x2 = x1[:, :0], (x2[:, :0] if t else x2[:0])
    elif bad == "s2_count":
        s2 = np.concatenate([s2.reshape(-1), s2.reshape(-1)[:1]])
    elif bad == "s2_dtype":
        s2 = s2.astype(F32 if mode == "mx" else F16)
    elif bad == "s1_count":
        has_s1, s1 = True, np.concatenate([s1.reshape(-1), s1.reshape(-1)[:1]])
    elif bad == "bias_count":
        has_bias, bias = True, np.zeros(n + 1, F32)
    elif bad == "x3_count":
        has_x3, x3 = True, np.zeros((m, n + 1), F32)
    elif bad == "mx_no_s1":
        has_s1 = False
    operands = [x1, x2, s2] + [a for a, f in ((s1, has_s1), (bias, has_bias), (x3, has_x3)) if f]
    if bad == "count":
        operands.append(np.zeros(1, F32))
    modes = _mc2_ffi.lowp_modes()
    mode_attr = (
        attrs["mode"]
        if isinstance(attrs["mode"], int)
        else modes[
            {"scaled": lowp.PERTOKEN, "perblock": lowp.PERBLOCK, "mx": lowp.MX}[attrs["mode"]]
        ]
    )
    got = _handler_error(
        lambda: _call(
            _ffi.LOWP_MATMUL,
            jax.ShapeDtypeStruct((m, attrs["out_n"]), attrs["out"]),
            *operands,
            mode=np.int64(mode_attr),
            transpose_x2=attrs["t"],
            has_x1_scale=has_s1,
            has_bias=has_bias,
            has_x3=has_x3,
            comm=attrs["comm"],
            block_k=np.int64(attrs["block_k"]),
            bf16_as_f32=False,
            parallelism=np.int64(1),
        ),
        "mc2_lowp_matmul_ffi",
        bad,
    )
    if bad is not None:
        return
    x1, x2, s1, s2, bias = want_args
    bias = bias if has_bias else None
    if mode == "perblock":
        y = _perblock_y(kind, x1, x2, s1, s2, block_k, t)
    elif mode == "scaled":
        y = rank_y(
            "pertoken", kind, x1, x2, s1 if has_s1 else np.ones(m, F32), s2, bias, transpose_x2=t
        )
    else:
        y = rank_y("mx", kind, x1, x2, s1, s2, bias, transpose_x2=True)
    want = finish(y, x3 if has_x3 else None, out_dtype)
    assert got.dtype == out_dtype
    np.testing.assert_array_equal(np.asarray(got).astype(np.float64), want.astype(np.float64))


# --------------------------------------------------------------------------
# jax_mc2.parallel: row_parallel_linear(_add_rms_norm) on two devices

# The two-device meshes: (axis size, data_axis size).
MESHES = {"tp2": ((2,), ("tp",), None), "dp2": ((2, 1), ("dp", "tp"), "dp")}


def _split_k(x, w, ranks, t):
    kl = x.shape[-1] // ranks
    xs = [x[..., r * kl : (r + 1) * kl] for r in range(ranks)]
    ws = [w[:, r * kl : (r + 1) * kl] if t else w[r * kl : (r + 1) * kl] for r in range(ranks)]
    return xs, ws, kl


def _reduced_bound(dtype, xs, ws, bias, t, want):
    """tolerance() of the reduction of the ranks' partials (bias on rank 0)."""
    biases = [bias] + [None] * (len(xs) - 1)
    parts = [
        np.abs(oracle.to_f64(oracle.per_rank_matmul(a, b, c, transpose_x2=t, dtype=a.dtype)))
        for a, b, c in zip(xs, ws, biases)
    ]
    pmag = np.nan_to_num(np.maximum.reduce(parts), posinf=0)
    terms = np.maximum.reduce([mm_terms(a, b, c, None, t) for a, b, c in zip(xs, ws, biases)])
    kl = xs[0].shape[-1]
    return oracle.tolerance(
        xs[0].dtype, len(xs), np.abs(want), partial_scale=pmag, k=kl + 1, terms=terms
    )


@st.composite
def rpl_case(draw, three_d=None):
    dtype = draw(st.sampled_from(FLOATS))
    mesh = draw(st.sampled_from(sorted(MESHES)))
    lead = (2,) if draw(st.booleans()) and not three_d else (2, draw(st.sampled_from((1, 3))))
    k, n = draw(st.sampled_from((2, 8))), draw(st.sampled_from((1, 5)))
    t = draw(st.booleans())
    kinds = ("normal", "integers", "nonfinite")
    x = values(draw, (*lead, k), dtype, draw(st.sampled_from(kinds)))
    w = values(draw, (n, k) if t else (k, n), dtype, "normal")
    bias = values(draw, (n,), dtype, "normal") if draw(st.booleans()) else None
    return dtype, mesh, x, w, bias, t


# The wrapper tests compile a two-device program per shape and
# implementation: a quarter share each.
WRAPPER_FUZZ = settings(FUZZ, max_examples=max(1, PER_TEST // 4))


@WRAPPER_FUZZ
@given(rpl_case())
def test_fuzz_row_parallel_linear(case):
    dtype, mesh_name, x, w, bias, t = case
    assume(not daz_sensitive(x, w, bias))
    shape, names, data_axis = MESHES[mesh_name]
    mesh = make_mesh(shape, names)
    out, err = run_both(
        lambda impl: mc2.parallel.row_parallel_linear(
            x,
            w,
            mesh=mesh,
            axis="tp",
            bias=bias,
            data_axis=data_axis,
            transpose_w=t,
            implementation=impl,
        )
    )
    assert err is None, err
    xs, ws, _ = _split_k(x, w, mesh.shape["tp"], t)
    want = oracle.mm_all_reduce_base(xs, ws, [bias] + [None] * (len(xs) - 1), transpose_x2=t)
    want = want.astype(dtype).astype(np.float64)  # the reduction runs in the dtype
    tol = _reduced_bound(dtype, xs, ws, bias, t, want)
    for impl, got in out.items():
        assert got.dtype == dtype
        assert_close(got, want, tol, f"row_parallel_linear[{impl}]")


@WRAPPER_FUZZ
@given(rpl_case(three_d=True), st.booleans(), st.sampled_from((1e-6, 1e-2, 0.5)), st.data())
def test_fuzz_row_parallel_linear_add_rms_norm(case, inplace, eps, data):
    dtype, mesh_name, x, w, bias, t = case
    n = w.shape[0] if t else w.shape[1]
    kind = data.draw(st.sampled_from(("normal", "zeros", "large")))
    residual = values(data.draw, (*x.shape[:-1], n), dtype, kind)
    gamma = values(data.draw, (n,), dtype, "normal")
    assume(not daz_sensitive(x, w, bias, residual))
    shape, names, data_axis = MESHES[mesh_name]
    mesh = make_mesh(shape, names)
    out, err = run_both(
        lambda impl: mc2.parallel.row_parallel_linear_add_rms_norm(
            x,
            w,
            residual,
            gamma,
            mesh=mesh,
            axis="tp",
            bias=bias,
            epsilon=eps,
            data_axis=data_axis,
            transpose_w=t,
            inplace=inplace,
            implementation=impl,
        )
    )
    assert err is None, err
    xs, ws, _ = _split_k(x, w, mesh.shape["tp"], t)
    mm = oracle.mm_all_reduce_base(xs, ws, [bias] + [None] * (len(xs) - 1), transpose_x2=t)
    mm = mm.astype(dtype)
    want_y, want_n = oracle.add_rms_norm(mm, residual, gamma, eps)
    tol_y = _reduced_bound(dtype, xs, ws, bias, t, oracle.to_f64(mm)) + oracle.ulp(
        dtype, np.abs(want_y)
    )
    tol_n = norm_tolerance(dtype, tol_y, want_y, want_n, gamma, eps)
    for impl, (y, norm) in out.items():
        assert y.dtype == dtype and norm.dtype == dtype
        assert_close(y, want_y, tol_y, f"row_parallel_linear_add_rms_norm y [{impl}]")
        rows = np.isfinite(want_y).all(axis=-1)  # a non-finite y row poisons its whole norm
        assert_close(np.asarray(norm)[rows], want_n[rows], tol_n[rows], f"norm [{impl}]")


RPL_BAD = (
    "axis",
    "data_axis",
    "same_axis",
    "mesh_type",
    "x_1d",
    "w_k",
    "w_3d",
    "k_ranks",
    "rows",
    "bias_shape",
    "transpose_w",
    "quant",
    "w8a8_out",
    "w8a8_bias",
    "residual_shape",
    "gamma_shape",
    "residual_dtype",
    "gamma_dtype",
    "inplace",
)


@FUZZ
@given(rpl_case(three_d=True), st.booleans(), st.sampled_from(RPL_BAD))
def test_fuzz_row_parallel_invalid(case, norm, bad):
    """Invalid wrapper calls: a documented error naming the wrapper (and the
    argument), raised before any device work."""
    dtype, _, x, w, bias, t = case
    n = w.shape[0] if t else w.shape[1]
    if bad in ("quant", "w8a8_out", "w8a8_bias"):
        norm = False
    elif bad in ("residual_shape", "gamma_shape", "residual_dtype", "gamma_dtype", "inplace"):
        norm = True
    op = "row_parallel_linear_add_rms_norm" if norm else "row_parallel_linear"
    mesh = make_mesh((2, 1) if bad == "rows" else (1, 2), ("dp", "tp"))
    kw = dict(mesh=mesh, axis="tp", bias=bias, transpose_w=t, implementation="ffi")
    residual, gamma = np.zeros((*x.shape[:-1], n), dtype), np.ones((n,), dtype)
    arg = {
        "axis": "axis",
        "data_axis": "axis",
        "same_axis": "data_axis",
        "mesh_type": "mesh",
        "x_1d": "x",
        "w_k": "w",
        "w_3d": "w",
        "k_ranks": "k",
        "rows": "x.shape[0]",
        "bias_shape": "bias",
        "transpose_w": "transpose_w",
        "quant": "quant",
        "w8a8_out": "out_dtype",
        "w8a8_bias": "bias",
        "residual_shape": "residual",
        "gamma_shape": "gamma",
        "residual_dtype": "residual",
        "gamma_dtype": "gamma",
        "inplace": "inplace",
    }[bad]
    if bad == "axis":
        kw["axis"] = "model"
    elif bad == "data_axis":
        kw["data_axis"] = "data"
    elif bad == "same_axis":
        kw["data_axis"] = "tp"
    elif bad == "mesh_type":
        kw["mesh"] = (2,)
    elif bad == "x_1d":
        x = x.reshape(-1)
    elif bad == "w_k":
        w = np.concatenate([w, w[:, :2]], 1) if t else np.concatenate([w, w[:2]], 0)
    elif bad == "w_3d":
        w = w[None]
    elif bad == "k_ranks":
        x = x[..., :-1]
        w = w[:, :-1] if t else w[:-1]  # k odd over the 2 ranks of "tp"
        if x.shape[-1] % 2 == 0:
            return
    elif bad == "rows":
        kw["data_axis"] = "dp"
        x = np.concatenate([x, x[:1]])  # 3 rows over the 2 ranks of "dp"
        residual = np.zeros((*x.shape[:-1], n), dtype)
    elif bad == "bias_shape":
        kw["bias"] = np.zeros((n + 1,), dtype)
    elif bad == "transpose_w":
        kw["transpose_w"] = "yes"
    elif bad == "quant":
        kw["quant"] = "w8a8"
    elif bad == "w8a8_out":
        kw["quant"] = mc2.parallel.W8A8(np.ones(n, F32), F32)
        kw["bias"] = None
    elif bad == "w8a8_bias":
        kw["quant"] = mc2.parallel.W8A8(np.ones(n, F32))
        kw["bias"] = np.zeros(n, I32)
    elif bad == "residual_shape":
        residual = np.zeros((*x.shape[:-1], n + 1), dtype)
    elif bad == "gamma_shape":
        gamma = np.ones((n + 1,), dtype)
    elif bad == "residual_dtype":
        residual = residual.astype(F16 if dtype != F16 else F32)
    elif bad == "gamma_dtype":
        gamma = gamma.astype(F16 if dtype != F16 else F32)
    elif bad == "inplace":
        kw["inplace"] = 1
    with pytest.raises(DOCUMENTED) as info:
        if norm:
            mc2.parallel.row_parallel_linear_add_rms_norm(x, w, residual, gamma, **kw)
        else:
            mc2.parallel.row_parallel_linear(x, w, **kw)
    expect_error(info.value, op, arg)
    assert str(info.value).startswith(op + ": "), info.value


# --------------------------------------------------------------------------
# quant_matmul_all_reduce_v4: the int8, perblock and MX rows


@st.composite
def v4_int8_case(draw):
    rng = _rng(draw)
    kind, with_x1_scale, out_dtype = draw(st.sampled_from(V4_ROWS))
    m, k, n = (
        draw(st.sampled_from((1, 4))),
        draw(st.sampled_from((1, 16))),
        draw(st.sampled_from((1, 5))),
    )
    t = draw(st.booleans())
    x1 = rng.integers(-128, 128, (m, k)).astype(I8)
    x2 = rng.integers(-128, 128, (n, k) if t else (k, n)).astype(I8)
    raw = (rng.random(draw(st.sampled_from((1, n)))) * 1e-3 + 2e-5).astype(F32)
    token = (rng.random(m) + 0.5).astype(F32) if with_x1_scale else None
    bias = rng.integers(-2000, 2000, n).astype(I32) if draw(st.booleans()) else None
    x3 = rng.standard_normal((m, n)).astype(out_dtype) if draw(st.booleans()) else None
    return kind, x1, x2, raw, token, bias, x3, out_dtype, t


def _v4_int8_kwargs(case):
    kind, x1, x2, raw, token, bias, x3, out_dtype, t = case
    scale = raw if kind == "f32" else _make_scale(raw, kind)
    return dict(
        x2_scale=scale, x1_scale=token, bias=bias, x3=x3, out_dtype=out_dtype, transpose_x2=t
    )


@FUZZ
@given(v4_int8_case())
def test_fuzz_v4_int8_rows(case):
    kind, x1, x2, raw, token, bias, x3, out_dtype, t = case
    kw = _v4_int8_kwargs(case)
    out, err = run_both(
        lambda impl: mc2.quant_matmul_all_reduce_v4(x1, x2, None, implementation=impl, **kw)
    )
    assert err is None, err
    w = x2.T if t else x2
    acc = x1.astype(np.int64) @ w.astype(np.int64) + (0 if bias is None else bias)
    applied = raw if kind == "f32" else _applied_scale(raw, kind)  # f32: applied as is
    y = acc.astype(F32) * np.broadcast_to(applied, (w.shape[1],))
    if token is not None:
        y = y * token[:, None]
    want = finish(y, x3, out_dtype)
    for impl, got in out.items():
        assert got.dtype == out_dtype
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16), impl)


@st.composite
def v4_lowp_case(draw):
    rng = _rng(draw)
    mode = draw(st.sampled_from(("perblock", "mx")))
    if mode == "perblock":
        kind = draw(st.sampled_from(("float8_e4m3fn", "float8_e5m2", "hifloat8")))
        k, t = draw(st.sampled_from((32, 200))), draw(st.booleans())
    else:
        kind = draw(st.sampled_from(("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")))
        k, t = draw(st.sampled_from((64, 128))), True
    m, n = draw(st.sampled_from((1, 4))), draw(st.sampled_from((1, 6)))
    out_dtype = draw(st.sampled_from(FLOATS))
    x1, x2, s1, s2, bias = make_case(
        rng, mode, kind, m=m, k=k, n=n, transpose_x2=t, with_bias=mode == "mx", pow2=True
    )
    bias = bias if draw(st.booleans()) else None
    x3 = None
    if draw(st.booleans()):
        x3 = rng.standard_normal((m, n)).astype(F32 if out_dtype == BF16 else out_dtype)
    return mode, kind, x1, x2, s1, s2, bias, x3, out_dtype, t


@FUZZ
@given(v4_lowp_case())
def test_fuzz_v4_perblock_mx_rows(case):
    mode, kind, x1, x2, s1, s2, bias, x3, out_dtype, t = case
    kw = call_kwargs(mode, kind, s1, s2, bias, x3, out_dtype, t)
    out, err = run_both(
        lambda impl: mc2.quant_matmul_all_reduce_v4(x1, x2, None, implementation=impl, **kw)
    )
    assert err is None, err
    want = finish(rank_y(mode, kind, x1, x2, s1, s2, bias, transpose_x2=t), x3, out_dtype)
    for impl, got in out.items():
        assert got.dtype == out_dtype and got.shape == want.shape
        np.testing.assert_array_equal(
            np.asarray(got).astype(np.float64), want.astype(np.float64), err_msg=impl
        )
    np.testing.assert_array_equal(np.asarray(out["xla"]), np.asarray(out["ffi"]))


V4_BAD = {
    "int8": (
        "x1_scale_len",
        "x1_scale_dtype",
        "x2_scale_len",
        "x3_dtype",
        "x3_shape",
        "out_dtype",
        "comm_half",
        "comm_quant_mode",
    ),
    "perblock": ("bias", "x1_scale_shape", "x2_scale_shape", "group_size", "x3_shape", "out_dtype"),
    "mx": ("transpose_x2", "x1_scale_dtype", "x2_scale_shape", "x3_shape", "out_dtype"),
}


V4_ARG = {
    "x1_scale_len": "x1_scale",
    "x1_scale_dtype": "x1_scale",
    "x1_scale_shape": "x1_scale",
    "x2_scale_len": "x2_scale",
    "x2_scale_shape": "x2_scale",
    "x3_dtype": "x3",
    "x3_shape": "x3",
    "out_dtype": "out_dtype",
    "comm_half": "comm_quant_scale",
    "comm_quant_mode": "comm_quant_mode",
    "bias": "bias",
    "group_size": "group_size",
    "transpose_x2": "transpose_x2",
}


@FUZZ
@given(v4_int8_case(), v4_lowp_case(), st.data())
def test_fuzz_v4_invalid(int8_case, lowp_case, data):
    """Invalid calls of the int8, perblock and MX rows: a documented error
    naming quant_matmul_all_reduce_v4 and the argument."""
    use_int8 = data.draw(st.booleans())
    if use_int8:
        row = "int8"
        _, x1, x2, raw, token, bias, x3, out_dtype, t = int8_case
        kw = _v4_int8_kwargs(int8_case)
    else:
        row, kind, x1, x2, s1, s2, bias, x3, out_dtype, t = lowp_case
        kw = call_kwargs(row, kind, s1, s2, bias, x3, out_dtype, t)
    bad = data.draw(st.sampled_from(V4_BAD[row]))
    m, n = x1.shape[0], x2.shape[0] if t else x2.shape[1]
    arg = V4_ARG[bad]
    if bad == "x1_scale_len":
        kw["x1_scale"] = np.ones(m + 1, F32)
    elif bad == "x1_scale_dtype":
        kw["x1_scale"] = np.ones(m, F16 if row == "int8" else F32)
    elif bad == "x2_scale_len":
        if n + 1 == 1:
            return
        kw["x2_scale"] = (np.ones(n + 1, F32) * 1e-3).astype(
            BF16 if out_dtype == BF16 and kw["x2_scale"].dtype == BF16 else F32
        )
        if kw["x2_scale"].dtype == F32 and kw["x1_scale"] is None:
            kw["x1_scale"] = np.ones(m, F32)
    elif bad == "x3_dtype":
        kw["x3"] = np.zeros((m, n), _other_float(out_dtype))
    elif bad == "x3_shape":
        kw["x3"] = np.zeros((m, n + 1), kw["x3"].dtype if kw["x3"] is not None else out_dtype)
    elif bad == "out_dtype":
        kw["out_dtype"] = I8
    elif bad == "comm_half":
        kw["comm_quant_scale_2"] = np.ones(n, out_dtype)
    elif bad == "comm_quant_mode":
        kw["comm_quant_mode"] = 1
    elif bad == "bias":
        kw["bias"] = np.zeros(n, F32)
    elif bad == "x1_scale_shape":
        kw["x1_scale"] = np.ones((s1.shape[0], s1.shape[1] + 1), F32)
    elif bad == "x2_scale_shape":
        s = kw["x2_scale"]
        kw["x2_scale"] = np.concatenate([s, s[:1]]) if row == "perblock" else s[..., 0]
    elif bad == "group_size":
        kw["group_size"] = 64 | 128 << 16 | 128 << 32
    elif bad == "transpose_x2":
        x2, kw["transpose_x2"] = np.ascontiguousarray(x2.T), False
    for impl in ("xla", "ffi"):
        with pytest.raises(DOCUMENTED) as info:
            mc2.quant_matmul_all_reduce_v4(x1, x2, None, implementation=impl, **kw)
        expect_error(info.value, "quant_matmul_all_reduce_v4", arg)


def test_case_budget_counts_this_file():
    """This file's fuzz tests are the ones test_fuzz's case budget counts."""
    fuzz = [name for name in globals() if name.startswith("test_fuzz_")]
    assert len(fuzz) == test_fuzz.N_MORE_FUZZ_TESTS, fuzz
