"""The layouts a matmul weight x2 reaches a primitive in: ``ND`` (the matrix
itself) or ``FRACTAL_NZ`` (its NZ storage layout, docs/semantics.md §9).

A primitive that takes an NZ weight has the static parameter ``x2_format``
(:data:`ND` or :data:`FRACTAL_NZ`, default ND) and binds x2 in the layout it
names. The stored 2-D matrix is x2 (k, n), or (n, k) with ``transpose_x2``;
its NZ layout is ``(ceil(c/c0), ceil(r/16), 16, c0)`` for the stored (r, c)
with ``c0 = 32 bytes / itemsize``. k is x1's last dimension; the other
extent is the padded one the NZ shape holds (``c1 * c0`` columns, or
``r1 * 16`` rows when transposed): the zero padding of the NZ blocks is part
of the logical matrix there.
"""

from __future__ import annotations

import numpy as np

from jax_mc2.framework import validation
from jax_mc2.framework.validation import dtype_name, shape_str

#: The weight layouts, as the ``x2_format`` parameter names them.
ND = "ND"
FRACTAL_NZ = "FRACTAL_NZ"
X2_FORMATS = (ND, FRACTAL_NZ)


def c0(dtype) -> int:
    """The NZ block width: 32 bytes of ``dtype`` (16 for fp16/bf16, 32 for int8)."""
    return max(1, 32 // np.dtype(dtype).itemsize)


def check_x2_format(op: str, x2_format) -> str:
    """The primitive's ``x2_format`` value: ND or FRACTAL_NZ."""
    if x2_format not in X2_FORMATS:
        raise validation.value_error(
            op, f"x2_format must be one of {X2_FORMATS}, got {x2_format!r}"
        )
    return x2_format


def nz_stored_shape(op: str, x2, k: int, *, transpose_x2: bool) -> tuple[int, int]:
    """The 2-D matrix an NZ x2 (anything with ``shape`` and ``dtype``) stores:
    (k, c1 * c0), or (r1 * 16, k) with ``transpose_x2``, after checking the
    NZ shape against k (x1's last dimension) and x2's dtype."""
    block = c0(x2.dtype)
    stored = "(n, k)" if transpose_x2 else "(k, n)"
    layout = (
        f"(ceil(k/{block}), ceil(n/16), 16, {block})"
        if transpose_x2
        else f"(ceil(n/{block}), ceil(k/16), 16, {block})"
    )
    k_blocks = -(-k // block) if transpose_x2 else -(-k // 16)
    k_axis = 0 if transpose_x2 else 1
    shape = tuple(int(d) for d in x2.shape)
    if len(shape) != 4 or shape[2:] != (16, block) or shape[k_axis] != k_blocks:
        raise validation.type_error(
            op,
            f"a FRACTAL_NZ {dtype_name(x2.dtype)} x2 storing {stored} must be {layout} with "
            f"k == x1.shape[-1] == {k}, got {shape_str(shape)}",
        )
    return (shape[1] * 16, k) if transpose_x2 else (k, shape[0] * block)
