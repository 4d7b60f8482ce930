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
    the statistics (ascend-semantics §7). Returns (y, norm_out) in float64."""
    dtype = np.asarray(residual).dtype
    y = (to_f64(mm).reshape(np.shape(residual)) + to_f64(residual)).astype(dtype)
    yf = to_f64(y)
    rms = np.sqrt(np.mean(yf * yf, axis=-1, keepdims=True) + epsilon)
    return yf, yf / rms * to_f64(gamma)


def tolerance(dtype, ranks=1, scale=1.0):
    """Absolute tolerance for values of magnitude ``scale`` summed over ranks."""
    eps = {np.dtype(np.float16): 2.0**-10, BF16: 2.0**-7, np.dtype(np.float32): 2.0**-20}[
        np.dtype(dtype)
    ]
    return 4 * eps * scale * (ranks + 1)
