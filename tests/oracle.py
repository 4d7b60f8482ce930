"""Independent NumPy models of the seed formulas (the test oracle).

Written from the CANN documents, never calling jax_mc2. Every rank's data is
given explicitly as a list, the collective is a sum over that list.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def to_f64(a):
    return np.asarray(a).astype(np.float64)


def per_rank_matmul(x1, x2, bias=None, x3=None, *, transpose_x2=False, dtype):
    """One rank's ``x1 @ x2 + bias + x3`` in float64, rounded once to dtype."""
    w = to_f64(x2).T if transpose_x2 else to_f64(x2)
    acc = to_f64(x1) @ w
    if bias is not None:
        acc = acc + to_f64(bias)
    if x3 is not None:
        acc = acc + to_f64(x3)
    return acc.astype(dtype)


def mm_all_reduce_base(x1s, x2s, biases=None, x3s=None, *, transpose_x2=False):
    """seed 004: ``output = allreduce(x1 @ x2 + bias + x3)`` (non-quantized).

    x1s, x2s, biases, x3s: one entry per rank. Returns the float64 sum of the
    per-rank results (each rounded to the dtype, as HCCL communicates in it).
    """
    dtype = np.asarray(x1s[0]).dtype
    ranks = len(x1s)
    biases = biases or [None] * ranks
    x3s = x3s or [None] * ranks
    parts = [
        per_rank_matmul(a, b, c, d, transpose_x2=transpose_x2, dtype=dtype)
        for a, b, c, d in zip(x1s, x2s, biases, x3s)
    ]
    return sum(to_f64(p) for p in parts)


def add_rms_norm(mm, residual, gamma, epsilon):
    """seed 002: ``y = mm + residual``; ``normOut = y / RMS(y) * gamma`` with
    ``RMS(y) = sqrt(mean(y^2) + epsilon)``. y is rounded to the dtype before
    the statistics (docs/semantics.md §7). Returns (y, norm_out) in float64."""
    dtype = np.asarray(residual).dtype
    y = (to_f64(mm).reshape(np.shape(residual)) + to_f64(residual)).astype(dtype)
    yf = to_f64(y)
    rms = np.sqrt(np.mean(yf * yf, axis=-1, keepdims=True) + epsilon)
    return yf, yf / rms * to_f64(gamma)


# The spacing of each dtype's values in [1, 2): one ulp at magnitude 1.
ULP_AT_ONE = {np.dtype(np.float16): 2.0**-10, BF16: 2.0**-7, np.dtype(np.float32): 2.0**-23}
FP32_UNIT_ROUNDOFF = 2.0**-24


def ulp(dtype, magnitude):
    """One ulp of ``dtype`` at ``magnitude`` (elementwise): the spacing of the
    binade that holds it, a power of two at or below ``magnitude * ULP_AT_ONE``
    (magnitudes below 1 use the spacing at 1, covering subnormals)."""
    mag = np.maximum(np.abs(np.asarray(magnitude, np.float64)), 1.0)
    return ULP_AT_ONE[np.dtype(dtype)] * np.exp2(np.floor(np.log2(mag)))


def tolerance(dtype, ranks=1, scale=1.0, *, partial_scale=None, k=0, terms=None):
    """Absolute bound on |implementation - oracle|, from the rounding steps.

    One rank: the implementation and the oracle round values that differ by
    at most the fp32 accumulation error (``k`` products, ``terms`` =
    sum |products|, default ``scale``: k * 2^-24 * terms) to the dtype once
    each, so they differ by at most one ulp of the output (``scale`` = the
    output magnitude) plus that error. R > 1 ranks: each rank's partial
    (magnitude ``partial_scale``, default ``scale``) is rounded to the dtype
    on both sides (one ulp of the partial each, the same argument), and the
    reduction in the dtype rounds each of its R - 1 running sums (half an ulp
    of at most R partials each), then the output's final rounding.
    """
    partial = scale if partial_scale is None else partial_scale
    terms = scale if terms is None else terms
    acc = k * FP32_UNIT_ROUNDOFF * np.asarray(terms, np.float64)
    if ranks == 1:
        return ulp(dtype, scale) + acc
    running = (ranks - 1) * 0.5 * ulp(dtype, ranks * np.asarray(partial, np.float64))
    return ranks * (ulp(dtype, partial) + acc) + running + ulp(dtype, scale)
