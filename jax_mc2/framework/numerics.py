"""Float steps that XLA:CPU would otherwise compile into different bits.

XLA:CPU (jaxlib 0.10) rewrites some float operations into cheaper ones that
are not always the same bits:

- a division by a broadcast or constant divisor becomes a multiplication by
  the reciprocal (1 fp32 ulp off at times, which flips a rounding tie
  downstream; a reciprocal that underflows is flushed to 0);
- ``1 / sqrt(x)`` becomes ``rsqrt(x)``;
- inside its YNNPACK fusions a round trip through bfloat16 is dropped, and
  a max reduction ignores NaN.

XLA:GPU drops a round trip through float16 or bfloat16 (its "excess
precision" default), so a rounding step between two fp32 steps goes through
:func:`rounded_to`.

Where the numerics the docs fix (docs/semantics.md) depend on such a step,
the ``xla`` implementation and the quant helpers go through these functions.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike

#: float16's smallest normal, and the spacing of its subnormals (2^-14, 2^-24).
_F16_MIN_NORMAL = np.float32(2.0**-14)
_F16_GRID = np.float32(2.0**-24)
_F16_GRID_INV = np.float32(2.0**24)


def divide(a: ArrayLike, b: ArrayLike) -> Array:
    """``a / b``, the correctly rounded quotient of every element.

    The divisor is broadcast to the result's shape behind an optimization
    barrier, so the simplifier cannot see a broadcast (or a constant, or a
    ``sqrt``) to turn into a reciprocal multiplication (or an ``rsqrt``).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    return jnp.broadcast_to(a, shape) / lax.optimization_barrier(jnp.broadcast_to(b, shape))


def rounded_to(x: Array, dtype: DTypeLike) -> Array:
    """float32 ``x`` rounded to ``dtype`` (half to even) and widened back.

    Written without a narrowing convert: XLA:GPU drops a convert pair
    ``f32 -> f16 -> f32`` (or bfloat16) as "excess precision" unless
    ``--xla_allow_excess_precision=false`` (XLA:CPU's YNNPACK fusions drop
    the bfloat16 one), which would skip the rounding. bfloat16 is
    ``reduce_precision`` (same exponent range as float32, so the same
    rounding); float16 is ``reduce_precision`` on its
    normal range and an explicit round to the 2^-24 grid on its subnormal
    range, which ``reduce_precision`` would flush to zero.
    """
    dt = np.dtype(dtype)
    if np.dtype(x.dtype) != np.dtype(np.float32):
        raise TypeError(f"rounded_to takes float32 values, got {np.dtype(x.dtype).name}")
    if dt == np.dtype(np.float32):
        return x
    if dt == np.dtype(jnp.bfloat16):
        return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    if dt == np.dtype(np.float16):
        normal = lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
        subnormal = lax.round(x * _F16_GRID_INV, lax.RoundingMethod.TO_NEAREST_EVEN) * _F16_GRID
        return jnp.where(jnp.abs(x) < _F16_MIN_NORMAL, subnormal, normal)
    raise TypeError(f"rounded_to rounds to float16 or bfloat16, not {dt.name}")


def x3_added(y: Array, x3: ArrayLike | None, dtype: DTypeLike) -> Array:
    """The quantized rows' x3 step (docs/semantics.md §10.2): float32 ``y``
    rounded to ``dtype``, then ``x3`` added in float32; ``y`` as it is
    without x3. The caller makes the last rounding."""
    if x3 is None:
        return y
    return rounded_to(y, dtype) + widened(x3)


def pinned(x: Array) -> Array:
    """``x`` behind an optimization barrier, so that a convert widening it
    is not folded into the convert that made it. XLA:GPU folds any chain of
    float converts into one (``f32 -> float8 -> f32`` into nothing): a
    float8 operand quantized in the same program would otherwise reach the
    matmul unquantized."""
    return lax.optimization_barrier(x)


def widened(x: ArrayLike) -> Array:
    """``x`` as float32. A float16, bfloat16 or float8 ``x`` is widened
    behind :func:`pinned`, so it holds what its dtype holds even where the
    program rounded it to that dtype just before; float32 and integer values
    are converted as they are."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and np.dtype(x.dtype).itemsize < 4:
        x = pinned(x)
    return x.astype(jnp.float32)


def nan_max(x: Array, axis: int) -> Array:
    """``jnp.max(x, axis)`` that is NaN where a reduced slice holds a NaN."""
    return jnp.where(jnp.isnan(x).any(axis=axis), jnp.nan, jnp.max(x, axis=axis)).astype(x.dtype)
