"""The attributes of the C++ handlers, with their defaults, for tests that
call a handler directly through ``jax.ffi.ffi_call``: each function returns
the defaults with its keyword arguments put over them."""

from __future__ import annotations

import numpy as np


def matmul_attrs(**overrides):
    """``mc2_matmul_ffi``: a plain x1 @ x2 on one thread."""
    attrs = dict(
        transpose_x2=False,
        has_bias=False,
        has_x3=False,
        antiquant=False,
        has_offset=False,
        antiquant_group_size=np.int64(0),
        bf16_as_f32=False,
        parallelism=np.int64(1),
    )
    return attrs | overrides


def int8_matmul_attrs(**overrides):
    """``mc2_int8_matmul_ffi``: int8 x1 @ x2 with a dequant scale alone, on
    one thread."""
    attrs = dict(
        transpose_x2=False,
        has_pertoken=False,
        has_bias=False,
        has_x3=False,
        has_comm_scale=False,
        bf16_as_f32=False,
        parallelism=np.int64(1),
    )
    return attrs | overrides


def lowp_matmul_attrs(mode, **overrides):
    """``mc2_lowp_matmul_ffi`` in the low-precision ``mode`` (the handler's
    integer code): x2_scale alone, 128-wide k-blocks, on one thread."""
    attrs = dict(
        mode=np.int64(mode),
        transpose_x2=False,
        has_x1_scale=False,
        has_bias=False,
        has_x3=False,
        comm=False,
        block_k=np.int64(128),
        bf16_as_f32=False,
        parallelism=np.int64(1),
    )
    return attrs | overrides
