"""Argument checks that produce jax_mc2's error messages.

Every message names the operator, the argument, the rule and the values, e.g.
``mm_all_reduce_base: x2 must be 2-D (k, n) with k == x1.shape[-1] == 512,
got (256, 64)``. Shape and dtype errors are ``TypeError``, bad static values
``ValueError``, and valid requests that a chip or an implementation does not
support ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def type_error(op: str, message: str) -> TypeError:
    return TypeError(f"{op}: {message}")


def check_given(op: str, **values) -> None:
    """Each of ``values`` (required arguments, by name) is not None."""
    for name, value in values.items():
        if value is None:
            raise type_error(op, f"{name} is required, got None")


def value_error(op: str, message: str) -> ValueError:
    return ValueError(f"{op}: {message}")


def unsupported(op: str, message: str) -> NotImplementedError:
    return NotImplementedError(f"{op}: {message}")


def check_rank(op: str, name: str, aval, ranks: Iterable[int], layout: str) -> None:
    ranks = tuple(ranks)
    if aval.ndim not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise type_error(op, f"{name} must be {want} {layout}, got shape {shape_str(aval.shape)}")


def check_same_dtype(op: str, name: str, aval, ref_name: str, ref_aval) -> None:
    if np.dtype(aval.dtype) != np.dtype(ref_aval.dtype):
        raise type_error(
            op,
            f"{name} dtype must equal {ref_name} dtype {dtype_name(ref_aval.dtype)}, "
            f"got {dtype_name(aval.dtype)}",
        )


def check_shape(op: str, name: str, aval, expected, rule: str, hint: str = "") -> None:
    """A TypeError unless ``aval`` has the shape ``expected`` (``rule`` says
    how it is made; ``hint``, if any, ends the message)."""
    if tuple(aval.shape) != tuple(expected):
        raise type_error(
            op,
            f"{name} must be {rule} = {shape_str(expected)}, got {shape_str(aval.shape)}{hint}",
        )


def is_int(value) -> bool:
    """Whether ``value`` is a Python or NumPy integer (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(op: str, name: str, value, *, minimum: int | None = None) -> int:
    if not is_int(value):
        raise value_error(op, f"{name} must be a Python int, got {value!r}")
    if minimum is not None and value < minimum:
        raise value_error(op, f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_dtype(op: str, name: str, value) -> np.dtype:
    """``value`` as a NumPy dtype, or a TypeError naming ``name``."""
    try:
        return np.dtype(value)
    except TypeError:
        raise type_error(op, f"{name} must be a dtype, got {value!r}") from None


def describe(value) -> str:
    """A short description of an argument for a message: None, or an array's
    dtype and shape, or the value's repr."""
    if value is None:
        return "None"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{np.dtype(value.dtype).name}{shape_str(value.shape)}"
    return type(value).__name__ if isinstance(value, (list, tuple)) else repr(value)


def check_bool(op: str, name: str, value) -> bool:
    """A static flag: a Python or NumPy bool (not a string, not an int)."""
    if not isinstance(value, (bool, np.bool_)):
        raise value_error(op, f"{name} must be a bool, got {value!r}")
    return bool(value)


INT32_MAX = 2**31 - 1


def check_int32(op: str, name: str, value, *, minimum: int | None = None) -> int:
    """A static size that JAX passes as an int32 (row counts, capacities)."""
    value = check_int(op, name, value, minimum=minimum)
    if value > INT32_MAX:
        raise value_error(op, f"{name} must be <= {INT32_MAX} (it must fit int32), got {value}")
    return value


def canonical_axis_name(op: str, axis_name) -> tuple[str, ...]:
    """``None`` → ``()``, a name → ``(name,)``, a tuple/list of names as is."""
    if axis_name is None:
        return ()
    if isinstance(axis_name, (tuple, list)):
        names = tuple(axis_name)
    else:
        names = (axis_name,)
    for a in names:
        if not isinstance(a, str) or not a:
            raise value_error(
                op,
                f"axis_name must be None, a mesh axis name or a tuple of names, got {axis_name!r}",
            )
    if len(set(names)) != len(names):
        raise value_error(op, f"axis_name must not repeat a name, got {axis_name!r}")
    return names


def check_comm_turn(op, comm_turn):
    return check_int(op, "comm_turn", comm_turn, minimum=0)


def check_reduce_op(op, reduce_op):
    if reduce_op != "sum":
        raise value_error(
            op, f"reduce_op must be 'sum' (the only reduction CANN supports), got {reduce_op!r}"
        )
