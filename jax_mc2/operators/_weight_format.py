"""Weight layouts an operator accepts for x2 (ND or FRACTAL_NZ): checked
here with the operator's messages, then bound as they are, with the
primitive's ``x2_format`` (``jax_mc2.framework.weight_format``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_mc2.framework import validation, weight_format
from jax_mc2.framework.validation import dtype_name

_X2_FORMATS = (None, weight_format.ND, weight_format.FRACTAL_NZ)


def check_nz_weight(op, x1, x2, *, transpose_x2, dtypes):
    """``(x2 as an array, the stored matrix's 2-D shape)`` for a FRACTAL_NZ
    weight x2, its dtype one of ``dtypes`` and its shape the NZ layout of
    the stored matrix.

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
    # k comes from x1, whose rank the primitive checks only later.
    x1_shape = jax.ShapeDtypeStruct(np.shape(x1), np.bool_)
    validation.check_rank(op, "x1", x1_shape, (2, 3), "(m, k) or (b, s, k)")
    stored = weight_format.nz_stored_shape(op, x2, x1_shape.shape[-1], transpose_x2=transpose_x2)
    return x2, stored


def x2_with_format(op, x1, x2, x2_format, *, transpose_x2, dtypes):
    """``(x2, the primitive's x2_format, the stored matrix's shape)``: x2
    itself, ND and x2's shape for ``x2_format`` None / "ND"; for
    "FRACTAL_NZ" x2 checked (:func:`check_nz_weight`), FRACTAL_NZ and the
    2-D shape its blocks store."""
    if x2_format not in _X2_FORMATS:
        raise validation.value_error(
            op, f"x2_format must be one of {_X2_FORMATS}, got {x2_format!r}"
        )
    if x2_format != weight_format.FRACTAL_NZ:
        return x2, weight_format.ND, np.shape(x2)
    x2, stored = check_nz_weight(op, x1, x2, transpose_x2=transpose_x2, dtypes=dtypes)
    return x2, weight_format.FRACTAL_NZ, stored
