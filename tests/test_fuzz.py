"""Fuzz suite (hypothesis): valid and invalid calls of every public operator
and direct calls of the FFI handlers.

The contract every generated call is held to:

- an invalid call raises one of the documented exception classes
  (TypeError / ValueError / NotImplementedError / NameError) whose message
  names the operator and the argument the strategy broke; a direct FFI
  handler call raises the error JAX surfaces from the handler, naming the
  handler;
- a valid call returns the NumPy oracle's result (tests/oracle.py,
  tests/ep_oracle.py, the models of the per-operator test files) within
  the oracle's rounding bounds, non-finite values in the same places;
- the "xla" and "ffi" implementations agree on every valid call;
- never a crash or a hang.

Case count: ``JAX_MC2_FUZZ_EXAMPLES`` (default 1000) examples in total,
spread over the fuzz tests of this file and of tests/test_fuzz_more.py
(each gets an equal share, ``PER_TEST``). Derandomized (a fixed
seed per test) when ``CI`` is set or ``JAX_MC2_FUZZ_DERANDOMIZE=1``.

The long run:

    JAX_MC2_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz.py -q

Shapes come from a small fixed set per strategy, so the eager calls reuse
their compiled executables across examples (values vary freely).
"""

from __future__ import annotations

import os

import jax
import ml_dtypes
import numpy as np
import oracle
import pytest
from conftest import make_mesh
from handler_attrs import matmul_attrs
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2
from jax_mc2 import quant
from jax_mc2.implementations import ffi as _ffi

F16, BF16, F32 = np.dtype(np.float16), oracle.BF16, np.dtype(np.float32)
FLOATS = (F16, BF16, F32)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
DOCUMENTED = (TypeError, ValueError, NotImplementedError, NameError)
N_FUZZ_TESTS = 15
#: The fuzz tests of tests/test_fuzz_more.py, which share the same total.
N_MORE_FUZZ_TESTS = 10
TOTAL = int(os.environ.get("JAX_MC2_FUZZ_EXAMPLES", "1000"))
PER_TEST = max(1, TOTAL // (N_FUZZ_TESTS + N_MORE_FUZZ_TESTS))
DERANDOMIZE = bool(os.environ.get("CI")) or os.environ.get("JAX_MC2_FUZZ_DERANDOMIZE") == "1"

settings.register_profile(
    "jax_mc2_fuzz",
    max_examples=PER_TEST,
    deadline=None,
    derandomize=DERANDOMIZE,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
FUZZ = settings.get_profile("jax_mc2_fuzz")
#: Hundreds of cases per test: the full run only (`pytest -q`), not the inner loop.
pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------
# Value strategies


VALUE_KINDS = ("normal", "integers", "tiny", "large", "nonfinite", "zeros")
LARGE = {F16: 2.0**12, BF16: 2.0**40, F32: 2.0**40}  # no fp32-accumulator overflow


def values(draw, shape, dtype, kind=None):
    """An array of ``shape`` in ``dtype`` from one of the value classes."""
    dtype = np.dtype(dtype)
    kind = kind or draw(st.sampled_from(VALUE_KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        a = rng.standard_normal(shape)
    elif kind == "integers":
        a = rng.integers(-4, 5, shape).astype(np.float64)
    elif kind == "tiny":  # subnormals of the dtype and below
        a = rng.standard_normal(shape) * float(ml_dtypes.finfo(dtype).smallest_normal)
    elif kind == "large":
        a = rng.standard_normal(shape) * LARGE.get(dtype, 1.0)
    elif kind == "zeros":
        a = np.zeros(shape)
    else:  # a few non-finite values among normal ones
        a = rng.standard_normal(shape)
        if a.size:
            idx = rng.integers(0, a.size, max(1, a.size // 4))
            a.reshape(-1)[idx] = rng.choice([np.inf, -np.inf, np.nan], idx.size)
    return a.astype(dtype)


def daz_sensitive(*arrays):
    """Whether the call mixes a bfloat16 / float32 subnormal with an infinity.

    On CPU both implementations run with subnormals flushed to zero
    (docs/semantics.md §10.4), so a subnormal times inf gives NaN where the
    IEEE oracle gives inf: ``mm_all_reduce_base(bf16 [[1.47e-39]], bf16
    [[-inf]], None)`` is NaN for xla and ffi alike. Those calls are left out
    (float16 subnormals are normal in the fp32 accumulator; finite subnormal
    products, flushed to 0, stay within the oracle's bound)."""
    subnormal = inf = False
    for a in arrays:
        if a is None or np.dtype(a.dtype) not in (BF16, F32):
            continue
        f = np.abs(a.astype(np.float64))
        subnormal |= bool(((f > 0) & (f < float(ml_dtypes.finfo(a.dtype).smallest_normal))).any())
        inf |= bool(np.isinf(f).any())
    return subnormal and inf


def assert_same_nonfinite(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN places")
    np.testing.assert_array_equal(
        np.where(np.isinf(want), want, 0), np.where(np.isinf(got), got, 0), err_msg=f"{what}: inf"
    )


def assert_close(got, want, tol, what):
    """got == want within ``tol`` (elementwise), non-finite values in the same places."""
    got = np.asarray(got).astype(np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert_same_nonfinite(got, want, what)
    fin = np.isfinite(want)
    tol = np.broadcast_to(np.asarray(tol, np.float64), want.shape)
    err = np.abs(got[fin] - want[fin])
    bad = err > tol[fin]
    assert not bad.any(), (
        f"{what}: {bad.sum()} element(s) off, worst {err.max()} > tol {tol[fin][bad].min()}; "
        f"got {got[fin][bad][:4]}, want {want[fin][bad][:4]}"
    )


def expect_error(exc, op, argument):
    """The contract for invalid calls: a documented class naming op and argument."""
    assert isinstance(exc, DOCUMENTED), f"{op}: undocumented {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert op in msg, f"message does not name the operator {op!r}: {msg}"
    names = (argument,) if isinstance(argument, str) else argument
    assert any(a in msg for a in names), f"{op}: message names none of {names}: {msg}"


def run_both(fn):
    """fn(impl) for xla and ffi: (results, error). Both raise or neither does."""
    out, errs = {}, {}
    for impl in ("xla", "ffi"):
        try:
            out[impl] = jax.block_until_ready(fn(impl))
        except DOCUMENTED as e:  # noqa: PERF203
            errs[impl] = e
    assert set(errs) in (set(), {"xla", "ffi"}), f"only {sorted(errs)} raised: {errs}"
    return out, (errs.get("xla") if errs else None)


def mm_terms(x1, x2, bias=None, x3=None, transpose_x2=False):
    """sum |products| per output element (the fp32 accumulation error scale)."""
    a = np.abs(oracle.to_f64(x1)).reshape(-1, np.shape(x1)[-1])
    w = np.abs(oracle.to_f64(x2))
    w = w.T if transpose_x2 else w
    t = np.nan_to_num(a @ w, nan=0, posinf=0)
    if bias is not None:
        t = t + np.nan_to_num(np.abs(oracle.to_f64(bias)), nan=0, posinf=0)
    if x3 is not None:
        t = t + np.nan_to_num(np.abs(oracle.to_f64(x3)).reshape(t.shape), nan=0, posinf=0)
    return t.reshape(np.shape(x1)[:-1] + (t.shape[-1],))


# --------------------------------------------------------------------------
# mm_all_reduce_base (float)

MS, KS, NS = (0, 1, 3), (1, 8), (1, 5)


@st.composite
def mm_case(draw):
    dtype = draw(st.sampled_from(FLOATS))
    m, k, n = draw(st.sampled_from(MS)), draw(st.sampled_from(KS)), draw(st.sampled_from(NS))
    t = draw(st.booleans())
    x1 = values(draw, (m, k), dtype)
    x2 = values(draw, (n, k) if t else (k, n), dtype)
    bias = values(draw, (n,), dtype) if draw(st.booleans()) else None
    x3 = values(draw, (m, n), dtype) if draw(st.booleans()) else None
    return dtype, x1, x2, bias, x3, t


BAD_MM = (
    "x1_int",
    "x2_dtype",
    "k_mismatch",
    "bias_shape",
    "bias_dtype",
    "x3_shape",
    "x1_1d",
    "comm_turn",
    "reduce_op",
    "implementation",
)


def _mm_call(x1, x2, bias, x3, t, impl, **kw):
    return mc2.mm_all_reduce_base(
        x1, x2, None, bias=bias, x3=x3, transpose_x2=t, implementation=impl, **kw
    )


@FUZZ
@given(mm_case())
def test_fuzz_mm_all_reduce_valid(case):
    dtype, x1, x2, bias, x3, t = case
    assume(not daz_sensitive(x1, x2, bias, x3))
    out, err = run_both(lambda impl: _mm_call(x1, x2, bias, x3, t, impl))
    assert err is None, err
    want = oracle.mm_all_reduce_base([x1], [x2], [bias], [x3], transpose_x2=t)
    terms = mm_terms(x1, x2, bias, x3, t)
    tol = oracle.tolerance(dtype, 1, np.abs(want), k=x1.shape[-1] + 2, terms=terms)
    for impl, got in out.items():
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, tol, f"mm_all_reduce_base[{impl}]")
    # xla vs ffi: both within the bound of the oracle, and the same non-finite places.
    assert_same_nonfinite(out["xla"], out["ffi"], "xla vs ffi")


@FUZZ
@given(mm_case(), st.sampled_from(BAD_MM))
def test_fuzz_mm_all_reduce_invalid(case, bad):
    dtype, x1, x2, bias, x3, t = case
    kw = {}
    arg = {
        "x1_int": "x1",
        "x2_dtype": ("x2", "x1"),
        "k_mismatch": ("x2", "x1"),
        "bias_shape": "bias",
        "bias_dtype": "bias",
        "x3_shape": "x3",
        "x1_1d": "x1",
        "comm_turn": "comm_turn",
        "reduce_op": "reduce_op",
        "implementation": "implementation",
    }[bad]
    if bad == "x1_int":
        x1 = x1.astype(np.int32)
    elif bad == "x2_dtype":
        x2 = x2.astype(F32 if dtype != F32 else F16)
    elif bad == "k_mismatch":
        x2 = np.concatenate([x2, x2[..., :1] if t else x2[:1]], axis=-1 if t else 0)
    elif bad == "bias_shape":
        bias = np.zeros((x2.shape[0 if t else 1] + 1,), dtype)
    elif bad == "bias_dtype":
        bias = np.zeros((x2.shape[0 if t else 1],), np.int32)
    elif bad == "x3_shape":
        x3 = np.zeros((x1.shape[0] + 1, x2.shape[0 if t else 1]), dtype)
    elif bad == "x1_1d":
        x1 = x1.reshape(-1)[: x1.shape[-1]] if x1.size else np.zeros((x1.shape[-1],), dtype)
    elif bad == "comm_turn":
        kw["comm_turn"] = -1
    elif bad == "reduce_op":
        kw["reduce_op"] = "max"
    for impl in ("xla", "ffi"):
        impl_arg = "nope" if bad == "implementation" else impl
        with pytest.raises(DOCUMENTED) as info:
            _mm_call(x1, x2, bias, x3, t, impl_arg, **kw)
        expect_error(info.value, "mm_all_reduce_base", arg)


# --------------------------------------------------------------------------
# matmul_all_reduce_add_rms_norm (+ inplace)


@st.composite
def rms_case(draw):
    dtype = draw(st.sampled_from(FLOATS))
    m, k, n = draw(st.sampled_from((1, 3))), draw(st.sampled_from(KS)), draw(st.sampled_from(NS))
    t = draw(st.booleans())
    x1 = values(draw, (1, m, k), dtype, draw(st.sampled_from(("normal", "integers", "nonfinite"))))
    x2 = values(draw, (n, k) if t else (k, n), dtype, "normal")
    residual = values(draw, (1, m, n), dtype, draw(st.sampled_from(("normal", "zeros", "large"))))
    gamma = values(draw, (n,), dtype, "normal")
    bias = values(draw, (n,), dtype, "normal") if draw(st.booleans()) else None
    eps = draw(st.sampled_from((1e-6, 1e-2, 0.5)))
    return dtype, x1, x2, residual, gamma, bias, t, eps


def norm_tolerance(dtype, tol_y, want_y, want_n, gamma, eps):
    """The bound on norm_out given y's bound ``tol_y``: y's error through
    y / rms (|gamma| / rms per unit of y), rstd's fp32 error, and the two
    roundings (y * rstd, then * gamma)."""
    yf = np.nan_to_num(want_y)
    rms = np.sqrt(np.mean(yf * yf, axis=-1, keepdims=True) + eps)
    g = np.abs(oracle.to_f64(gamma))
    return (
        tol_y.max(axis=-1, keepdims=True) * 2 * g / rms
        + oracle.ulp(dtype, np.abs(yf) / rms) * g
        + 2 * oracle.ulp(dtype, np.abs(want_n))
        + 1e-5 * np.abs(yf) / rms * g
    )


@FUZZ
@given(rms_case(), st.booleans())
def test_fuzz_add_rms_norm_valid(case, inplace):
    dtype, x1, x2, residual, gamma, bias, t, eps = case
    assume(not daz_sensitive(x1, x2, bias, residual))
    op = (
        mc2.inplace_matmul_all_reduce_add_rms_norm
        if inplace
        else mc2.matmul_all_reduce_add_rms_norm
    )
    out, err = run_both(
        lambda impl: op(
            x1,
            x2,
            residual,
            gamma,
            None,
            bias=bias,
            epsilon=eps,
            transpose_x2=t,
            implementation=impl,
        )
    )
    assert err is None, err
    mm = oracle.mm_all_reduce_base([x1], [x2], [bias], transpose_x2=t)
    want_y, want_n = oracle.add_rms_norm(mm.astype(dtype), residual, gamma, eps)
    # y: the matmul's rounding (1 ulp of |mm|, the accumulation order) + the add's.
    terms = mm_terms(x1, x2, bias, None, t)
    tol_mm = oracle.tolerance(dtype, 1, np.abs(mm), k=x1.shape[-1] + 1, terms=terms)
    tol_y = tol_mm + oracle.ulp(dtype, np.abs(want_y))
    tol_n = norm_tolerance(dtype, tol_y, want_y, want_n, gamma, eps)
    for impl, (y, norm) in out.items():
        assert y.dtype == dtype and norm.dtype == dtype
        assert_close(y, want_y, tol_y, f"add_rms_norm y [{impl}]")
        rows = np.isfinite(want_y).all(axis=-1)  # a non-finite y row poisons its whole norm
        assert_close(np.asarray(norm)[rows], want_n[rows], tol_n[rows], f"norm_out [{impl}]")
    assert_same_nonfinite(out["xla"][1], out["ffi"][1], "norm_out xla vs ffi")


@FUZZ
@given(rms_case(), st.sampled_from(("residual_shape", "gamma_shape", "gamma_dtype", "bias_shape")))
def test_fuzz_add_rms_norm_invalid(case, bad):
    dtype, x1, x2, residual, gamma, bias, t, eps = case
    if bad == "residual_shape":
        residual = np.zeros((1, residual.shape[1] + 1, residual.shape[2]), dtype)
    elif bad == "gamma_shape":
        gamma = np.zeros((gamma.shape[0] + 1,), dtype)
    elif bad == "gamma_dtype":
        gamma = gamma.astype(np.int32)
    else:
        bias = np.zeros((gamma.shape[0] + 2,), dtype)
    arg = bad.split("_")[0]
    for impl in ("xla", "ffi"):
        with pytest.raises(DOCUMENTED) as info:
            mc2.matmul_all_reduce_add_rms_norm(
                x1,
                x2,
                residual,
                gamma,
                None,
                bias=bias,
                epsilon=eps,
                transpose_x2=t,
                implementation=impl,
            )
        expect_error(info.value, "matmul_all_reduce_add_rms_norm", arg)


# --------------------------------------------------------------------------
# quant_matmul_all_reduce (int8)


@st.composite
def int8_case(draw):
    m, k, n = draw(st.sampled_from(MS)), draw(st.sampled_from((1, 16))), draw(st.sampled_from(NS))
    t = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lim = draw(st.sampled_from((1, 128)))
    x1 = rng.integers(-lim, lim, (m, k)).astype(np.int8)
    x2 = rng.integers(-lim, lim, (n, k) if t else (k, n)).astype(np.int8)
    scale = (rng.random(draw(st.sampled_from(((1,), (n,))))) * 1e-2 + 1e-5).astype(np.float32)
    bias = rng.integers(-5000, 5000, n).astype(np.int32) if draw(st.booleans()) else None
    return x1, x2, scale, bias, t


@FUZZ
@given(int8_case())
def test_fuzz_quant_matmul_all_reduce(case):
    x1, x2, scale, bias, t = case
    words = quant.trans_quant_param(scale)
    out, err = run_both(
        lambda impl: mc2.quant_matmul_all_reduce(
            x1, x2, None, dequant_scale=words, bias=bias, transpose_x2=t, implementation=impl
        )
    )
    assert err is None, err
    w = x2.T if t else x2
    acc = x1.astype(np.int64) @ w.astype(np.int64) + (0 if bias is None else bias)
    applied = (scale.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
    want = (acc.astype(np.float32) * applied.reshape(-1)).astype(F16)
    for impl, got in out.items():
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=impl)


@FUZZ
@given(int8_case(), st.sampled_from(("x1_dtype", "scale_dtype", "bias_dtype", "bias_1", "x3")))
def test_fuzz_quant_matmul_all_reduce_invalid(case, bad):
    x1, x2, scale, bias, t = case
    words = quant.trans_quant_param(scale)
    x3 = None
    n = x2.shape[0] if t else x2.shape[1]
    arg = bad.split("_")[0]
    if bad == "x1_dtype":
        x1 = x1.astype(np.float16)
    elif bad == "scale_dtype":
        words = scale  # float32 scales are not a dequant_scale
        arg = "dequant_scale"
    elif bad == "bias_dtype":
        bias = np.zeros(n, np.float32)
    elif bad == "bias_1":
        if n == 1:
            return  # a (1,) bias is (n,) here
        bias = np.zeros(1, np.int32)
    else:
        x3 = np.zeros((x1.shape[0], n + 1), np.float16)
    for impl in ("xla", "ffi"):
        with pytest.raises(DOCUMENTED) as info:
            mc2.quant_matmul_all_reduce(
                x1,
                x2,
                None,
                dequant_scale=words,
                bias=bias,
                x3=x3,
                transpose_x2=t,
                implementation=impl,
            )
        expect_error(info.value, "quant_matmul_all_reduce", arg)


# --------------------------------------------------------------------------
# quant_matmul_all_reduce_v4 (fp8 pertoken rows, int8 rows)


@st.composite
def v4_case(draw):
    from test_quant_v4_lowp import make_case

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(("float8_e4m3fn", "float8_e5m2")))
    m, n = draw(st.sampled_from((1, 4))), draw(st.sampled_from((1, 6)))
    k = draw(st.sampled_from((1, 32)))
    out_dtype = draw(st.sampled_from(FLOATS))
    x1, x2, s1, s2, bias = make_case(rng, "pertoken", kind, m=m, k=k, n=n)
    if draw(st.booleans()):
        s2 = s2[:1]
    return kind, x1, x2, s1, s2, bias if draw(st.booleans()) else None, out_dtype


@FUZZ
@given(v4_case())
def test_fuzz_quant_matmul_all_reduce_v4(case):
    from test_quant_v4_lowp import rank_y

    kind, x1, x2, s1, s2, bias, out_dtype = case
    out, err = run_both(
        lambda impl: mc2.quant_matmul_all_reduce_v4(
            x1,
            x2,
            None,
            x2_scale=s2,
            x1_scale=s1,
            bias=bias,
            out_dtype=out_dtype,
            implementation=impl,
        )
    )
    assert err is None, err
    s2_full = np.broadcast_to(s2, (x2.shape[1],)).astype(np.float32)
    want = rank_y("pertoken", kind, x1, x2, s1, s2_full, bias, transpose_x2=False).astype(out_dtype)
    for impl, got in out.items():
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=impl)


# --------------------------------------------------------------------------
# grouped_matmul


@st.composite
def gmm_case(draw):
    dtype = draw(st.sampled_from(FLOATS))
    m, k, n, g = (
        draw(st.sampled_from((0, 1, 7))),
        draw(st.sampled_from((1, 4))),
        draw(st.sampled_from((1, 3))),
        draw(st.sampled_from((1, 3))),
    )
    t = draw(st.booleans())
    x = values(draw, (m, k), dtype, draw(st.sampled_from(("normal", "integers", "nonfinite"))))
    w = values(draw, (g, n, k) if t else (g, k, n), dtype, "normal")
    sizes = np.array(draw(st.lists(st.integers(-3, 9), min_size=g, max_size=g)), np.int32)
    return dtype, x, w, sizes, t


def _np_gmm_sizes(x, w, sizes, t):
    """Groups in order, sizes clipped at 0 and at the rows left; other rows 0."""
    y = np.zeros((x.shape[0], w.shape[1] if t else w.shape[2]))
    start = 0
    for gi, s in enumerate(sizes):
        s = max(0, min(int(s), x.shape[0] - start))
        wg = oracle.to_f64(w[gi])
        y[start : start + s] = oracle.to_f64(x[start : start + s]) @ (wg.T if t else wg)
        start += s
    return y


@FUZZ
@given(gmm_case())
def test_fuzz_grouped_matmul(case):
    dtype, x, w, sizes, t = case
    assume(not daz_sensitive(x, w))
    out, err = run_both(
        lambda impl: mc2.grouped_matmul(x, w, sizes, trans_weight=t, implementation=impl)
    )
    assert err is None, err
    want = _np_gmm_sizes(x, w, sizes, t).astype(dtype).astype(np.float64)
    wabs = np.abs(oracle.to_f64(w))
    terms = _np_gmm_sizes(
        np.abs(np.nan_to_num(oracle.to_f64(x), posinf=0, neginf=0)), wabs, sizes, t
    )
    tol = oracle.tolerance(dtype, 1, np.abs(want), k=x.shape[1], terms=terms)
    for impl, got in out.items():
        assert_close(got, want, tol, f"grouped_matmul[{impl}]")


@FUZZ
@given(gmm_case(), st.sampled_from(("sizes_float", "sizes_2d", "w_k", "x_int", "sizes_count")))
def test_fuzz_grouped_matmul_invalid(case, bad):
    dtype, x, w, sizes, t = case
    if bad == "sizes_float":
        sizes, arg = sizes.astype(np.float32), "group_sizes"
    elif bad == "sizes_2d":
        sizes, arg = sizes[None], "group_sizes"
    elif bad == "sizes_count":
        sizes, arg = np.concatenate([sizes, sizes]), ("group_sizes", "w")
    elif bad == "w_k":
        w, arg = np.concatenate([w, w], axis=2 if t else 1), ("w", "x")
    else:
        x, arg = x.astype(np.int32), "x"
    for impl in ("xla", "ffi"):
        with pytest.raises(DOCUMENTED) as info:
            mc2.grouped_matmul(x, w, sizes, trans_weight=t, implementation=impl)
        expect_error(info.value, "grouped_matmul", arg)


# --------------------------------------------------------------------------
# alltoallv_grouped_matmul / grouped_matmul_alltoallv / exchange_counts (one rank)


@st.composite
def ep_case(draw):
    import ep_oracle  # noqa: F401

    dtype = draw(st.sampled_from(FLOATS))
    e = draw(st.sampled_from((1, 2)))
    h, n = draw(st.sampled_from((1, 4))), draw(st.sampled_from((1, 3)))
    counts = np.array(draw(st.lists(st.integers(0, 3), min_size=e, max_size=e)), np.int64)
    rows = int(counts.sum())
    x = values(draw, (rows, h), dtype, draw(st.sampled_from(("normal", "integers"))))
    w = values(draw, (e, h, n), dtype, "normal")
    return dtype, x, w, counts


@FUZZ
@given(ep_case(), st.booleans())
def test_fuzz_alltoallv_one_rank(case, combine):
    import ep_oracle

    dtype, x, w, counts = case
    if combine:
        op, ref = mc2.grouped_matmul_alltoallv, ep_oracle.combine
    else:
        op = mc2.alltoallv_grouped_matmul

        def ref(*a, **kw):
            return [gmm_y for _, gmm_y in ep_oracle.dispatch(*a, **kw)]

    out, err = run_both(lambda impl: op(x, w, None, send_counts=counts, implementation=impl)[0])
    assert err is None, err
    want = ref([x], [w], counts[None], dtype=dtype)[0]
    want = np.asarray(want, np.float64)
    for impl, got in out.items():
        got = np.asarray(got, np.float64)
        rows = min(got.shape[0], want.shape[0])
        assert not got[rows:].any() and not want[rows:].any()
        tol = oracle.tolerance(
            dtype, 1, np.abs(want[:rows]), k=x.shape[1] + 1, terms=np.abs(want[:rows]) * 4 + 4
        )
        assert_close(got[:rows], want[:rows], tol, f"{op.__name__}[{impl}]")


@FUZZ
@given(ep_case(), st.sampled_from(("counts_negative", "counts_len", "counts_float", "x_rows")))
def test_fuzz_alltoallv_invalid(case, bad):
    dtype, x, w, counts = case
    arg = "send_counts"
    if bad == "counts_negative":
        counts = counts.copy()
        counts[0] = -1
    elif bad == "counts_len":
        counts = np.concatenate([counts, [1]])
    elif bad == "counts_float":
        counts = counts.astype(np.float32) + 0.5
    else:
        x, arg = x[: max(0, int(counts.sum()) - 1)], ("gmm_x", "send_counts")
        if counts.sum() == 0:
            return
    for impl in ("xla", "ffi"):
        with pytest.raises(DOCUMENTED) as info:
            mc2.alltoallv_grouped_matmul(x, w, None, send_counts=counts, implementation=impl)
        expect_error(info.value, "alltoallv_grouped_matmul", arg)


@FUZZ
@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=0, max_size=6),
    st.sampled_from((np.int32, np.int64, np.float32, np.uint8)),
)
def test_fuzz_exchange_counts_one_rank(counts, dtype):
    a = np.array(counts).astype(dtype) if counts else np.zeros((0,), dtype)
    if np.issubdtype(dtype, np.integer):
        np.testing.assert_array_equal(np.asarray(mc2.exchange_counts(a, None)), a)
    else:
        with pytest.raises(DOCUMENTED) as info:
            mc2.exchange_counts(a, None)
        expect_error(info.value, "exchange_counts", "send_counts")


# --------------------------------------------------------------------------
# jax_mc2.quant


@FUZZ
@given(
    st.lists(
        st.floats(
            allow_nan=False,
            allow_infinity=False,
            width=32,
            min_value=-1.0000000150474662e30,
            max_value=1.0000000150474662e30,
        ),
        min_size=4,
        max_size=4,  # one shape: no recompilation per example
    )
)
def test_fuzz_quant_helpers(xs):
    x = np.array(xs, np.float32)
    # hifloat8: decode(encode(x)) is a fixed point of encode.
    codes = quant.hifloat8_encode(x)
    back = np.asarray(quant.hifloat8_decode(codes))
    np.testing.assert_array_equal(np.asarray(quant.hifloat8_encode(back)), np.asarray(codes))
    # trans_quant_param: the packed words decode to x's fp19 field, truncated
    # (round_mode=0) or rounded half to even (round_mode=1).
    bits = x.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 13) & 1
    for mode, rounded in ((0, bits), (1, bits + 0xFFF + lsb)):
        scale, _ = quant.unpack_trans_quant_param(quant.trans_quant_param(x, round_mode=mode))
        want = ((rounded & 0xFFFFE000).astype(np.uint32)).view(np.float32)
        got = np.asarray(scale, np.float32)
        # A subnormal fp19 field may decode to 0 on CPU (docs/semantics.md §10.4).
        got = np.where((got == 0) & (flush_subnormals(want) == 0), want, got)
        finite = np.isfinite(want)
        np.testing.assert_array_equal(got[finite], want[finite])
    # FRACTAL_NZ round trip.
    w = np.resize(x, (3, 5)).astype(np.float16)
    np.testing.assert_array_equal(
        np.asarray(quant.from_fractal_nz(quant.to_fractal_nz(w), w.shape)), w
    )


# --------------------------------------------------------------------------
# Direct FFI handler calls


def flush_subnormals(a):
    """``a`` with its bfloat16 / float32 subnormals flushed to (signed) zero,
    as the CPU kernels see them (docs/semantics.md §10.4)."""
    if np.dtype(a.dtype) not in (BF16, F32):
        return a
    f = a.astype(np.float64)
    tiny = np.abs(f) < float(ml_dtypes.finfo(a.dtype).smallest_normal)
    return np.where(tiny, np.copysign(0.0, f), f).astype(a.dtype)


FFI_DTYPES = (F16, BF16, F32, np.dtype(np.int32), np.dtype(np.int8), np.dtype(np.float64))


@FUZZ
@given(
    st.sampled_from(FFI_DTYPES),
    st.sampled_from(FFI_DTYPES),
    st.sampled_from(((0, 1, 1), (1, 1, 1), (2, 3, 4), (3, 8, 5))),
    st.sampled_from((None, "ok", "bad_shape")),
    st.booleans(),
    st.sampled_from(("add_rms_norm", "matmul")),
    st.data(),
)
def test_fuzz_ffi_handlers(d1, d2, mkn, bias_kind, t, handler, data):
    """Direct handler calls with operand dtypes and shapes the Python layer
    never sends: an error naming the handler, or the oracle's result."""
    m, k, n = mkn
    # With x64 off JAX hands the handler float32 for float64 operands.
    d1, d2 = (np.dtype(jax.dtypes.canonicalize_dtype(d)) for d in (d1, d2))
    x1 = values(data.draw, (m, k), d1 if np.issubdtype(d1, np.floating) else F32).astype(d1)
    if handler == "matmul":
        x2 = values(data.draw, (n, k) if t else (k, n), F32).astype(d2)
        assume(not daz_sensitive(x1, x2))
        operands = [x1, x2]
        if bias_kind:
            operands.append(np.zeros((n if bias_kind == "ok" else n + 1,), d1))
        try:
            got = jax.block_until_ready(
                jax.ffi.ffi_call(_ffi.MATMUL, jax.ShapeDtypeStruct((m, n), d1))(
                    *operands, **matmul_attrs(transpose_x2=t, has_bias=bias_kind is not None)
                )
            )
        except Exception as e:  # the FFI error JAX surfaces
            assert "mc2_matmul_ffi" in str(e), e
            return
        if got.size == 0:
            return  # XLA does not run a custom call with an empty result
        assert d1 == d2 and d1 in FLOATS and bias_kind != "bad_shape", (d1, d2, bias_kind)
        want = oracle.per_rank_matmul(
            x1, x2, operands[2] if bias_kind else None, transpose_x2=t, dtype=d1
        )
        tol = oracle.tolerance(
            d1,
            1,
            np.abs(oracle.to_f64(want)),
            k=k + 1,
            terms=mm_terms(x1, x2, operands[2] if bias_kind else None, None, t),
        )
        assert_close(got, oracle.to_f64(want), tol, "mc2_matmul_ffi")
    else:
        res = values(data.draw, (m, n), F32).astype(d2)
        mm = np.zeros((m, n), d1)
        gamma = np.ones((n if bias_kind != "bad_shape" else n + 1,), d1)
        out = jax.ShapeDtypeStruct((m, n), d1)
        try:
            y, norm = jax.block_until_ready(
                jax.ffi.ffi_call(_ffi.ADD_RMS_NORM, (out, out))(
                    mm, res, gamma, epsilon=np.float32(1e-6), parallelism=np.int64(1)
                )
            )
        except Exception as e:
            assert "mc2_add_rms_norm_ffi" in str(e), e
            return
        if y.size == 0:
            return
        assert d1 == d2 and d1 in FLOATS and bias_kind != "bad_shape", (d1, d2, bias_kind)
        want_y, want_n = oracle.add_rms_norm(mm, flush_subnormals(res), gamma, 1e-6)
        assert_close(y, want_y, 0, "mc2_add_rms_norm_ffi y")
        assert_close(norm, want_n, 4 * oracle.ulp(d1, np.abs(want_n)) + 1e-6, "norm")


# --------------------------------------------------------------------------
# Two-device shard_map cases


@FUZZ
@given(mm_case())
def test_fuzz_mm_all_reduce_two_devices(case):
    dtype, x1, x2, bias, x3, t = case
    assume(not daz_sensitive(x1, x2))
    if x1.shape[1] % 2:
        x1, x2 = np.concatenate([x1, x1], 1), np.concatenate([x2, x2], 1 if t else 0)
    mesh = make_mesh((2,), ("tp",))
    kl = x1.shape[1] // 2
    out = {}
    for impl in ("xla", "ffi"):
        f = jax.shard_map(
            lambda a, b, impl=impl: mc2.mm_all_reduce_base(
                a, b, "tp", transpose_x2=t, implementation=impl
            ),
            mesh=mesh,
            in_specs=(P(None, "tp"), P(None, "tp") if t else P("tp", None)),
            out_specs=P(),
            check_vma=False,
        )
        out[impl] = jax.block_until_ready(f(x1, x2))
    x1s = [x1[:, :kl], x1[:, kl:]]
    x2s = [x2[:, :kl], x2[:, kl:]] if t else [x2[:kl], x2[kl:]]
    want = oracle.mm_all_reduce_base(x1s, x2s, transpose_x2=t)
    parts = [
        np.abs(oracle.to_f64(oracle.per_rank_matmul(a, b, transpose_x2=t, dtype=dtype)))
        for a, b in zip(x1s, x2s)
    ]
    pmag = np.nan_to_num(np.maximum(*parts), posinf=0)
    terms = np.maximum(*(mm_terms(a, b, transpose_x2=t) for a, b in zip(x1s, x2s)))
    tol = oracle.tolerance(dtype, 2, np.abs(want), partial_scale=pmag, k=kl, terms=terms)
    for impl, got in out.items():
        assert_close(got, want, tol, f"two-device mm_all_reduce_base[{impl}]")
