"""Weight layouts an operator accepts for x2 (ND or FRACTAL_NZ), converted
to the ND matrix the primitives take."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_mc2.framework import quant, validation
from jax_mc2.framework.validation import dtype_name, shape_str

_X2_FORMATS = (None, "ND", "FRACTAL_NZ")


def nz_weight_to_nd(op, x1, x2, *, transpose_x2, dtypes):
    """A FRACTAL_NZ weight x2 as the ND (k, n) (or (n, k)) matrix it holds.

    NZ of the stored 2-D matrix (r, c) is (ceil(c/c0), ceil(r/16), 16, c0)
    with c0 = 32 bytes / itemsize (32 for int8, 16 for fp16/bf16;
    docs/semantics.md §9): for x2 (k, n) that is (ceil(n/c0), ceil(k/16), 16,
    c0), for a transposed x2 (n, k) (ceil(k/c0), ceil(n/16), 16, c0). k is
    x1's; n is the padded extent (n1 * c0, or n1 * 16 transposed).
    """
    x2 = x2 if hasattr(x2, "dtype") else jnp.asarray(x2)
    if np.dtype(x2.dtype) not in tuple(np.dtype(d) for d in dtypes):
        names = ", ".join(np.dtype(d).name for d in dtypes)
        raise validation.type_error(
            op, f"a FRACTAL_NZ x2 must be {names} here, got {dtype_name(x2.dtype)}"
        )
    c0 = 32 // np.dtype(x2.dtype).itemsize
    k = np.shape(x1)[-1]
    stored = "(n, k)" if transpose_x2 else "(k, n)"
    layout = (
        f"(ceil(k/{c0}), ceil(n/16), 16, {c0})"
        if transpose_x2
        else f"(ceil(n/{c0}), ceil(k/16), 16, {c0})"
    )
    k_blocks = -(-k // c0) if transpose_x2 else -(-k // 16)
    k_axis = 0 if transpose_x2 else 1
    if x2.ndim != 4 or tuple(x2.shape[2:]) != (16, c0) or x2.shape[k_axis] != k_blocks:
        raise validation.type_error(
            op,
            f"a FRACTAL_NZ {dtype_name(x2.dtype)} x2 storing {stored} must be {layout} with "
            f"k == x1.shape[-1] == {k}, got {shape_str(x2.shape)}",
        )
    shape = (x2.shape[1] * 16, k) if transpose_x2 else (k, x2.shape[0] * c0)
    return quant.from_fractal_nz(x2, shape)


def x2_from_format(op, x1, x2, x2_format, *, transpose_x2, dtypes):
    """x2 as an ND matrix: itself for ``x2_format`` None / "ND", converted
    from FRACTAL_NZ (:func:`nz_weight_to_nd`) for "FRACTAL_NZ"."""
    if x2_format not in _X2_FORMATS:
        raise validation.value_error(
            op, f"x2_format must be one of {_X2_FORMATS}, got {x2_format!r}"
        )
    if x2_format != "FRACTAL_NZ":
        return x2
    return nz_weight_to_nd(op, x1, x2, transpose_x2=transpose_x2, dtypes=dtypes)
