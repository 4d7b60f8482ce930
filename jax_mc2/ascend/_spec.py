"""The argument spec of one aclnn call, as the launch core reads it.

A spec is a string of slots separated by ``;``, one per parameter of the
aclnn phase-1 function (less the workspace-size and executor outputs), in
order:

- ``t<o|r><i>/<dtype>/<format>/<offset>/<dims>/<strides>/<storage>``: a
  tensor over operand (``o``) or result (``r``) buffer ``i`` (comma lists;
  strides and offset count elements);
- ``n``: a null tensor (absent optional);
- ``s<text>`` a string, ``g`` the HCCL group name of the call's communicator,
  ``i<int>``, ``d<float>``, ``b<0|1>``, ``a<ints>`` an aclIntArray;
- ``x<result>=<operand>`` (not a parameter): the result is read back from the
  operand's device buffer (in-place operators).

The C++ side checks the slot count and kinds against the function's
signature table before calling it.
"""

from __future__ import annotations

import math

import numpy as np

from jax_mc2.ascend import _codes
from jax_mc2.framework import weight_format

STREAM_MODE_STOP_ON_FAILURE = 1


def _csv(values) -> str:
    return ",".join(str(int(v)) for v in values)


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= int(d)
    return tuple(reversed(strides))


class Tensor:
    """One tensor slot."""

    def __init__(
        self,
        src: str,
        index: int,
        shape,
        dtype,
        *,
        strides=None,
        storage=None,
        fmt: str = "ND",
        dtype_code: int | None = None,
        offset: int = 0,
    ):
        self.src, self.index = src, int(index)
        self.shape = tuple(int(d) for d in shape)
        self.code = _codes.dtype_code(dtype) if dtype_code is None else int(dtype_code)
        self.strides = contiguous_strides(self.shape) if strides is None else tuple(strides)
        self.storage = self.shape if storage is None else tuple(storage)
        self.fmt = _codes.ACL_FORMAT[fmt]
        self.offset = int(offset)

    def encode(self) -> str:
        return (
            f"t{self.src}{self.index}/{self.code}/{self.fmt}/{self.offset}/{_csv(self.shape)}/"
            f"{_csv(self.strides)}/{_csv(self.storage)}"
        )


def operand(index, aval, **kw) -> Tensor:
    return Tensor("o", index, aval.shape, aval.dtype, **kw)


def result(index, aval, **kw) -> Tensor:
    return Tensor("r", index, aval.shape, aval.dtype, **kw)


def transposed_weight(index, aval, **kw) -> Tensor:
    """x2 given as [n, k] (transpose_x2): the (k, n) view with strides (1, k)
    over the [n, k] buffer, the layout CANN's matmul operators accept."""
    n, k = aval.shape
    return Tensor("o", index, (k, n), aval.dtype, strides=(1, k), storage=(n * k,), **kw)


def nz_weight(index, aval, k: int, *, transpose_x2: bool, op: str, **kw) -> Tensor:
    """x2 in the FRACTAL_NZ layout (``aval``: its 4-D NZ buffer), described
    as torch_npu describes an NZ weight to CANN: the (k, n) view with the
    element strides of the ND matrix it stores, (n, 1), or (1, k) for a
    transposed x2 stored (n, k); format FRACTAL_NZ (29); storage dims the
    NZ shape; offset 0. k is x1's last dimension, n the padded extent."""
    stored = weight_format.nz_stored_shape(op, aval, k, transpose_x2=transpose_x2)
    n = stored[0] if transpose_x2 else stored[1]
    strides = (1, k) if transpose_x2 else (n, 1)
    return Tensor(
        "o",
        index,
        (k, n),
        aval.dtype,
        strides=strides,
        storage=aval.shape,
        fmt=weight_format.FRACTAL_NZ,
        **kw,
    )


NULL = "n"
GROUP = "g"


def string(text: str) -> str:
    if ";" in text:
        raise ValueError(f"string slot may not contain ';': {text!r}")
    return "s" + text


def integer(v) -> str:
    return f"i{int(v)}"


def double(v) -> str:
    return "d" + repr(float(v))


def boolean(v) -> str:
    return f"b{int(bool(v))}"


def int_array(values) -> str:
    return "a" + _csv(values)


def readback(result_index: int, operand_index: int) -> str:
    return f"x{int(result_index)}={int(operand_index)}"


def encode(slots) -> str:
    return ";".join(s.encode() if isinstance(s, Tensor) else s for s in slots)


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
