"""The public grouped matmul (``lax.ragged_dot``'s layout) on the C++ kernels
or ``lax.ragged_dot``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_mc2.framework import validation
from jax_mc2.framework.typing import Array, ArrayLike, Implementation
from jax_mc2.framework.validation import shape_str
from jax_mc2.primitives.grouped_matmul import (
    OP,
    grouped_matmul_offsets,
    offsets_from_sizes,
    static_group_sizes,
)

_I32 = jnp.int32


def grouped_matmul(
    x: ArrayLike,
    w: ArrayLike,
    group_sizes: ArrayLike,
    *,
    trans_weight: bool = False,
    implementation: Implementation = None,
) -> Array:
    """A grouped matmul with ``lax.ragged_dot``'s layout, on the C++ kernels
    on CPU (``implementation="ffi"``, the default there) or ``lax.ragged_dot``
    (``"xla"``): the first ``group_sizes[0]`` rows of x times ``w[0]``, the
    next ``group_sizes[1]`` times ``w[1]``, ...; rows past the groups are 0.

    x: [m, k] float16/bfloat16/float32; w: [G, k, n] ([G, n, k] with
    ``trans_weight``), x's dtype; group_sizes: integer [G] (sizes past m are
    clipped, negative sizes count as 0; each size is clipped to [0, m] in its
    own dtype and the running sum saturates at m, so no int32 sum overflows:
    docs/semantics.md §6.6). Returns [m, n] in x's dtype (fp32
    accumulation, one rounding). Differentiable in x and w to any order (the weight gradient
    is a grouped ``x_g^T @ dy_g``, also a C++ kernel on CPU). With sizes
    known while tracing (NumPy or Python integers), the ``ffi``
    implementation multiplies one group at a time on XLA's GEMM where that
    GEMM is the faster (docs/semantics.md §12).
    """
    validation.check_given(OP, x=x, w=w, group_sizes=group_sizes)
    x, w = jnp.asarray(x), jnp.asarray(w)
    # Only the shape and dtype are read here: NumPy holds a Python list of
    # sizes past int32 (clipped below) that jnp.asarray would refuse.
    sizes = group_sizes if isinstance(group_sizes, jax.Array) else np.asarray(group_sizes)
    if sizes.ndim != 1 or not jnp.issubdtype(sizes.dtype, jnp.integer):
        raise validation.type_error(
            OP,
            f"group_sizes must be a 1-D integer array (G,), got "
            f"{sizes.dtype.name}{shape_str(sizes.shape)}"
            + (" (Python integers must fit int64)" if sizes.dtype == object else ""),
        )
    if np.ndim(w) == 3 and sizes.shape[0] != np.shape(w)[0]:
        raise validation.type_error(
            OP,
            f"group_sizes must have one size per group of w: (G,) = ({np.shape(w)[0]},), got "
            f"{shape_str(sizes.shape)}",
        )
    # Negative sizes count as empty groups; sizes and their sums saturate at
    # the row count without int32 overflow (docs/semantics.md §6).
    rows = x.shape[0] if x.ndim else 0
    offsets = offsets_from_sizes(group_sizes, rows)
    static = None if isinstance(sizes, jax.Array) else (static_group_sizes(sizes, rows),)
    return grouped_matmul_offsets(
        x, w, offsets, trans_weight=trans_weight, implementation=implementation, static_sizes=static
    )
