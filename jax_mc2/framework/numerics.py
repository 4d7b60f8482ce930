"""Float steps that XLA:CPU would otherwise compile into different bits.

XLA:CPU (jaxlib 0.10) rewrites some float operations into cheaper ones that
are not always the same bits:

- a division by a broadcast or constant divisor becomes a multiplication by
  the reciprocal (1 fp32 ulp off at times, which flips a rounding tie
  downstream; a reciprocal that underflows is flushed to 0);
- ``1 / sqrt(x)`` becomes ``rsqrt(x)``;
- inside its YNNPACK fusions a round trip through bfloat16 is dropped, and
  a max reduction ignores NaN.

Where the numerics the docs fix (docs/semantics.md) depend on such a step,
the ``xla`` implementation and the quant helpers go through these functions.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike


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

    For bfloat16 this is ``reduce_precision``, the same rounding, which the
    YNNPACK fusion keeps. float16 keeps the convert pair: ``reduce_precision``
    with 5 exponent bits would flush float16's subnormals to zero.
    """
    if np.dtype(dtype) == np.dtype(jnp.bfloat16):
        return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    if np.dtype(dtype) == np.dtype(x.dtype):
        return x
    return x.astype(dtype).astype(x.dtype)


def nan_max(x: Array, axis: int) -> Array:
    """``jnp.max(x, axis)`` that is NaN where a reduced slice holds a NaN."""
    return jnp.where(jnp.isnan(x).any(axis=axis), jnp.nan, jnp.max(x, axis=axis)).astype(x.dtype)
