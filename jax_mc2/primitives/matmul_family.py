"""Checks shared by the matmul + all-reduce family of primitives: operand
shapes and dtypes, the chip target's limits and the reduced result aval."""

from __future__ import annotations

import numpy as np

from jax_mc2.framework import _compat, targets, validation
from jax_mc2.framework.validation import shape_str


def check_matmul_shapes(op, x1, x2, *, transpose_x2):
    """x1: [m, k] or [b, s, k]; x2: [k, n] ([n, k] if transpose_x2); k >= 1.

    Returns the output shape [m, n] or [b, s, n]."""
    validation.check_rank(op, "x1", x1, (2, 3), "(m, k) or (b, s, k)")
    k = x1.shape[-1]
    layout = "(n, k)" if transpose_x2 else "(k, n)"
    if x2.ndim != 2 or (x2.shape[1] if transpose_x2 else x2.shape[0]) != k:
        raise validation.type_error(
            op,
            f"x2 must be 2-D {layout} with k == x1.shape[-1] == {k}"
            f"{' (transpose_x2=True)' if transpose_x2 else ''}, got {shape_str(x2.shape)}",
        )
    if k == 0:
        raise validation.type_error(
            op,
            f"k must be >= 1 (empty k is not supported), got x1 {shape_str(x1.shape)}",
        )
    return (*x1.shape[:-1], x2.shape[0] if transpose_x2 else x2.shape[1])


def check_matmul(op, x1, x2, *, transpose_x2, bias=None, x3=None):
    """Checks the matmul operands; returns the output shape.

    x1: [m, k] or [b, s, k]; x2: [k, n] ([n, k] if transpose_x2); bias: [n];
    x3: the output shape. All share x1's dtype (fp16/bf16; fp32 on generic).
    """
    targets.operator_support(op)  # is the operator on this chip at all?
    validation.check_rank(op, "x1", x1, (2, 3), "(m, k) or (b, s, k)")
    targets.check_float_dtype(op, "x1", x1)
    out_shape = check_matmul_shapes(op, x1, x2, transpose_x2=transpose_x2)
    validation.check_same_dtype(op, "x2", x2, "x1", x1)
    check_bias_x3(op, x1, out_shape, bias=bias, x3=x3)
    return out_shape


def check_bias_x3(op, x1, out_shape, *, bias, x3):
    """The epilogue operands, each optional and in x1's dtype: bias [n] and
    x3 of the output shape."""
    if bias is not None:
        validation.check_shape(op, "bias", bias, (out_shape[-1],), "1-D (n,)")
        validation.check_same_dtype(op, "bias", bias, "x1", x1)
    if x3 is not None:
        validation.check_shape(op, "x3", x3, out_shape, "the output shape")
        validation.check_same_dtype(op, "x3", x3, "x1", x1)


def check_channel_scale(op, name, scale, n, *, pair, where="", mark_pairs=True):
    """A pertensor (1,) or perchannel (n,) / (1, n) scale. ``pair``: uint32
    (low, high) pairs, [..., 2], whose last axis is not part of the shape.
    The error names ``where`` after n (e.g. " in the packed rows") and, with
    ``mark_pairs``, marks a pair form."""
    shape = tuple(scale.shape[:-1]) if pair else tuple(scale.shape)
    if shape not in ((1,), (n,), (1, n)):
        marked = " (uint32 pairs)" if pair and mark_pairs else ""
        raise validation.type_error(
            op,
            f"{name} must be pertensor (1,) or perchannel (n,) / (1, n) with n = {n}{where}, "
            f"got {shape_str(shape)}{marked}",
        )


def check_chip_limits(op, x1, out_shape, collective, *, x2=None, limit_n=False):
    """The current chip target's rules: operator availability, world size,
    comm_turn, size limits and empty tensors. With ``x2`` the quantized
    modes' limit applies to the last dimensions of x1 and x2 (so a transposed
    x2's n may exceed it); ``limit_n`` (weight-only) also applies it to n.

    ``collective``: the call's collective parameters (``axis_name``,
    ``world_size``, ``comm_turn``, as
    ``jax_mc2.framework.collective.collective_params`` makes them; other
    entries are ignored)."""
    support = targets.operator_support(op)
    comm_turn = collective["comm_turn"]
    targets.check_world_size(
        op, collective["world_size"], collective["axis_name"], quantized=x2 is not None
    )
    name = targets.get_target()
    if comm_turn != 0 and support.comm_turn_zero_only:
        raise validation.unsupported(
            op,
            f"comm_turn={comm_turn} is not supported on target {name!r} (CANN accepts only "
            "comm_turn=0); use the 'generic' target to split the communication",
        )
    m = int(np.prod(x1.shape[:-1]))
    dims = {"m": m, "k": x1.shape[-1], "n": out_shape[-1]}
    if support.max_dim is not None:
        for dim, size in dims.items():
            if size > support.max_dim:
                raise validation.unsupported(
                    op, f"{dim} = {size} exceeds {support.max_dim} on target {name!r}"
                )
    if support.max_last_dim is not None and x2 is not None:
        for arg, aval in (("x1", x1), ("x2", x2)):
            if aval.shape[-1] > support.max_last_dim:
                raise validation.unsupported(
                    op,
                    f"{arg}.shape[-1] = {aval.shape[-1]} exceeds {support.max_last_dim} on "
                    f"target {name!r}",
                )
        if limit_n and out_shape[-1] > support.max_last_dim:
            raise validation.unsupported(
                op,
                f"n = {out_shape[-1]} exceeds {support.max_last_dim} in the weight-only mode on "
                f"target {name!r}",
            )
    if support.nonempty_matmul and (m == 0 or dims["n"] == 0):
        raise validation.unsupported(
            op,
            f"x1 and x2 must not be empty on target {name!r}, got m = {m}, n = {dims['n']}",
        )


def reduced_result(op, x1, out_shape, out_dtype, operands, collective, **limits):
    """The tail of every matmul + all-reduce abstract eval: the comm_turn and
    chip-target checks (``collective`` and ``limits``: check_chip_limits'),
    then the output aval (reduced over ``axis_name``) and its effects."""
    validation.check_comm_turn(op, collective["comm_turn"])
    check_chip_limits(op, x1, out_shape, collective, **limits)
    axis_name = collective["axis_name"]
    out = _compat.result_aval(x1, out_shape, out_dtype, operands, axis_name)
    return out, _compat.named_axis_effects(axis_name)
