"""CANN's data-type and format codes (aclDataType, aclFormat, HcclDataType),
from the C++ table (acl_codes.def) exported by the jax_mc2._mc2_ascend
module: one source of truth."""

from __future__ import annotations

import numpy as np

from jax_mc2.ascend._native import native as _mc2_ascend

#: numpy / ml_dtypes dtype name -> aclDataType code ("hifloat8": 34 is
#: the code given to uint8 tensors that carry HiFloat8 codes).
ACL_DTYPE: dict[str, int] = dict(_mc2_ascend.ACL_DTYPE)
#: aclFormat name -> code.
ACL_FORMAT: dict[str, int] = dict(_mc2_ascend.ACL_FORMAT)
#: numpy / ml_dtypes dtype name -> HcclDataType code (HCCL's own collectives).
HCCL_DTYPE: dict[str, int] = dict(_mc2_ascend.HCCL_DTYPE)


def _code(table: dict[str, int], kind: str, dtype) -> int:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return table[name]
    except KeyError:
        raise NotImplementedError(f"implementation='ascend': dtype {name} has no {kind}") from None


def dtype_code(dtype) -> int:
    """The aclDataType code of ``dtype`` (a dtype or its name)."""
    return _code(ACL_DTYPE, "CANN aclDataType", dtype)


def hccl_dtype_code(dtype) -> int:
    """The HcclDataType code of ``dtype`` (a dtype or its name)."""
    return _code(HCCL_DTYPE, "HcclDataType", dtype)
