"""The grouped-matmul FFI kernel (``mc2_grouped_matmul_ffi``) against an
independent NumPy model: row gather, per-group matmul, row scatter, the
optional permuted copy of x, and the kernel's input checks."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_mc2.implementations import ffi as _ffi

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float16), BF16, np.dtype(np.float32))
RTOL = {np.dtype(np.float16): 2e-3, BF16: 1e-2, np.dtype(np.float32): 1e-5}


def _model(x, w, offsets, src, dst, out_rows, transpose_w):
    """y and permute_out in float64, y rounded once to x's dtype."""
    xf = np.asarray(x).astype(np.float64)
    wf = np.asarray(w).astype(np.float64)
    if transpose_w:
        wf = wf.transpose(0, 2, 1)
    k, n = wf.shape[1], wf.shape[2]
    gathered = np.zeros((len(src), k))
    for v, s in enumerate(src):
        if s >= 0:
            gathered[v] = xf[s]
    y = np.zeros((out_rows, n))
    for g in range(wf.shape[0]):
        for v in range(offsets[g], offsets[g + 1]):
            if dst[v] >= 0:
                y[dst[v]] = gathered[v] @ wf[g]
    return y.astype(x.dtype), gathered.astype(x.dtype)


@functools.cache
def _jitted(out_rows, transpose_w, permute_out):
    return jax.jit(
        functools.partial(
            _ffi.grouped_matmul,
            out_rows=out_rows,
            transpose_w=transpose_w,
            permute_out=permute_out,
            parallelism=1,
        )
    )


def _run(x, w, offsets, src, dst, *, out_rows, transpose_w, permute_out):
    f = _jitted(out_rows, transpose_w, permute_out)
    out = f(
        jnp.asarray(x),
        jnp.asarray(w),
        jnp.asarray(np.asarray(offsets, np.int32)),
        jnp.asarray(np.asarray(src, np.int32)),
        jnp.asarray(np.asarray(dst, np.int32)),
    )
    return jax.tree.map(np.asarray, out)


def _case(
    rng,
    dtype,
    sizes,
    *,
    k,
    n,
    pre=0,
    post=0,
    rows_in=None,
    extra_out=0,
    src_drop=0.0,
    dst_drop=0.0,
    transpose_w=False,
    integers=False,
):
    """A routing with the given group sizes, `pre`/`post` virtual rows outside
    every group, distinct destination rows, and some src/dst -1 entries."""
    g = len(sizes)
    v = pre + sum(sizes) + post
    rows_in = rows_in if rows_in is not None else max(v, 1)
    offsets = pre + np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    src = rng.integers(0, rows_in, v)
    src[rng.random(v) < src_drop] = -1
    dst = rng.permutation(v + extra_out)[:v]
    dst[rng.random(v) < dst_drop] = -1
    w_shape = (g, n, k) if transpose_w else (g, k, n)
    if integers:
        x = rng.integers(-3, 4, (rows_in, k)).astype(dtype)
        w = rng.integers(-3, 4, w_shape).astype(dtype)
    else:
        x = rng.standard_normal((rows_in, k)).astype(dtype)
        w = (rng.standard_normal(w_shape) / np.sqrt(k)).astype(dtype)
    return x, w, offsets, src.astype(np.int32), dst.astype(np.int32), v + extra_out


def _check(case, *, transpose_w, permute_out, exact=False):
    x, w, offsets, src, dst, out_rows = case
    got = _run(
        x,
        w,
        offsets,
        src,
        dst,
        out_rows=out_rows,
        transpose_w=transpose_w,
        permute_out=permute_out,
    )
    want_y, want_p = _model(x, w, offsets, src, dst, out_rows, transpose_w)
    got_y = got[0] if permute_out else got
    assert got_y.dtype == x.dtype and got_y.shape == want_y.shape
    if exact:
        np.testing.assert_array_equal(got_y.astype(np.float64), want_y.astype(np.float64))
    else:
        rtol = RTOL[x.dtype]
        want = want_y.astype(np.float64)
        scale = max(np.abs(want).max(initial=0.0), 1.0)
        np.testing.assert_allclose(got_y.astype(np.float64), want, rtol=rtol, atol=rtol * scale)
    # Rows that no in-group virtual row writes are exactly zero.
    writers = np.arange(len(src))
    in_group = (writers >= offsets[0]) & (writers < offsets[-1]) & (dst >= 0)
    unwritten = np.setdiff1d(np.arange(out_rows), dst[in_group])
    assert not np.any(got_y[unwritten].astype(np.float64))
    if permute_out:
        assert got[1].dtype == x.dtype and got[1].shape == (len(src), x.shape[1])
        np.testing.assert_array_equal(got[1].view(np.uint8), want_p.view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("permute_out", [False, True])
def test_mixed_routing(dtype, transpose_w, permute_out):
    # 8 groups, the first and last empty, one of a single row, rows before
    # and after the groups, src and dst -1 rows, more y rows than virtual rows.
    rng = np.random.default_rng(0)
    case = _case(
        rng,
        dtype,
        [0, 5, 1, 0, 9, 3, 7, 0],
        k=24,
        n=20,
        pre=3,
        post=4,
        rows_in=17,
        extra_out=6,
        src_drop=0.15,
        dst_drop=0.15,
        transpose_w=transpose_w,
    )
    _check(case, transpose_w=transpose_w, permute_out=permute_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("transpose_w", [False, True])
def test_exact_integers(dtype, transpose_w):
    # Small integers: every product and sum is exact in every dtype.
    rng = np.random.default_rng(1)
    case = _case(
        rng,
        dtype,
        [4, 0, 6, 2],
        k=16,
        n=12,
        pre=2,
        post=1,
        extra_out=3,
        src_drop=0.1,
        dst_drop=0.1,
        transpose_w=transpose_w,
        integers=True,
    )
    _check(case, transpose_w=transpose_w, permute_out=True, exact=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_single_group_permutation(dtype):
    # G = 1 covering every virtual row, dst a permutation of y's rows.
    rng = np.random.default_rng(2)
    v = 33
    x = rng.standard_normal((v, 40)).astype(dtype)
    w = (rng.standard_normal((1, 40, 24)) / 6).astype(dtype)
    src = rng.permutation(v).astype(np.int32)
    dst = rng.permutation(v).astype(np.int32)
    _check((x, w, np.array([0, v], np.int32), src, dst, v), transpose_w=False, permute_out=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("transpose_w", [False, True])
def test_large_k(dtype, transpose_w):
    rng = np.random.default_rng(3)
    case = _case(rng, dtype, [20, 11, 0, 13], k=300, n=36, transpose_w=transpose_w)
    _check(case, transpose_w=transpose_w, permute_out=False)


@pytest.mark.parametrize("k,n", [(1, 7), (9, 1), (1, 1)])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_unit_k_or_n(k, n, transpose_w):
    rng = np.random.default_rng(4)
    case = _case(rng, BF16, [3, 1, 4], k=k, n=n, post=2, src_drop=0.2, transpose_w=transpose_w)
    _check(case, transpose_w=transpose_w, permute_out=True)


def test_no_rows_in_any_group():
    # offsets[0] == offsets[G]: y is all zero, permute_out is still the gather.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    w = rng.standard_normal((3, 8, 5)).astype(np.float32)
    src = np.array([5, -1, 0, 2], np.int32)
    dst = np.array([0, 1, 2, 3], np.int32)
    offsets = np.array([2, 2, 2, 2], np.int32)
    _check((x, w, offsets, src, dst, 7), transpose_w=False, permute_out=True)


def test_duplicate_dst_outside_groups_is_allowed():
    # Rows outside every group write nothing, so their dst entries may repeat.
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    w = np.ones((1, 3, 2), np.float32)
    offsets = np.array([1, 3], np.int32)
    src = np.array([0, 1, 2, 3], np.int32)
    dst = np.array([1, 0, 2, 1], np.int32)
    _check((x, w, offsets, src, dst, 3), transpose_w=False, permute_out=True, exact=True)


def test_src_minus_one_row_is_zero_despite_inf_weights():
    # A src -1 row is a zero row of y, not 0 * w (which would be NaN for Inf).
    x = np.ones((2, 3), np.float32)
    w = np.full((1, 3, 2), np.inf, np.float32)
    y = _run(
        x,
        w,
        np.array([0, 2], np.int32),
        np.array([-1, 1], np.int32),
        np.array([0, 1], np.int32),
        out_rows=2,
        transpose_w=False,
        permute_out=False,
    )
    np.testing.assert_array_equal(y, [[0, 0], [np.inf, np.inf]])


def _error_case():
    x = np.ones((4, 6), np.float32)
    w = np.ones((2, 6, 3), np.float32)
    offsets = np.array([0, 2, 4], np.int32)
    src = np.array([0, 1, 2, 3], np.int32)
    dst = np.array([0, 1, 2, 3], np.int32)
    return x, w, offsets, src, dst


def _call(x, w, offsets, src, dst, out_rows=4):
    out = _run(x, w, offsets, src, dst, out_rows=out_rows, transpose_w=False, permute_out=False)
    jax.block_until_ready(out)
    return out


def test_error_src_out_of_range():
    x, w, offsets, src, dst = _error_case()
    src[2] = 4
    with pytest.raises(Exception, match=r"src_index\[2\] = 4 is outside \[-1, 4\)"):
        _call(x, w, offsets, src, dst)
    src[2] = -2
    with pytest.raises(Exception, match=r"src_index\[2\] = -2 is outside"):
        _call(x, w, offsets, src, dst)


def test_error_dst_out_of_range():
    x, w, offsets, src, dst = _error_case()
    dst[0] = 9
    with pytest.raises(Exception, match=r"dst_index\[0\] = 9 is outside \[-1, 4\)"):
        _call(x, w, offsets, src, dst)


def test_error_duplicate_dst():
    x, w, offsets, src, dst = _error_case()
    dst[3] = 1
    with pytest.raises(Exception, match=r"dst_index\[3\] = 1 duplicates"):
        _call(x, w, offsets, src, dst)


def test_error_decreasing_offsets():
    x, w, offsets, src, dst = _error_case()
    offsets[:] = [0, 3, 2]
    with pytest.raises(Exception, match="must be non-decreasing"):
        _call(x, w, offsets, src, dst)


def test_error_offsets_past_v():
    x, w, offsets, src, dst = _error_case()
    offsets[2] = 5
    with pytest.raises(Exception, match=r"group_offsets\[2\] = 5"):
        _call(x, w, offsets, src, dst)
    offsets[:] = [-1, 2, 4]
    with pytest.raises(Exception, match=r"group_offsets\[0\] = -1"):
        _call(x, w, offsets, src, dst)


def test_error_dtype_mismatch():
    x, w, offsets, src, dst = _error_case()
    with pytest.raises(Exception, match="must share one float dtype"):
        _call(x.astype(np.float16), w, offsets, src, dst)


def test_error_wrong_weight_k():
    x, w, offsets, src, dst = _error_case()
    with pytest.raises(Exception, match="w's k must match x's k = 6"):
        _call(x, np.ones((2, 5, 3), np.float32), offsets, src, dst)


def test_error_wrong_offsets_length():
    x, w, offsets, src, dst = _error_case()
    with pytest.raises(Exception, match="group_offsets must have G \\+ 1 = 3 entries"):
        _call(x, w, np.array([0, 4], np.int32), src, dst)
