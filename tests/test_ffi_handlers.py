"""Direct calls of the C++ FFI handlers: operand errors come back as errors
(never a crash or a silent no-op), and the module's table of the
low-precision kernel modes is the one the Python side uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from handler_attrs import int8_matmul_attrs, lowp_matmul_attrs, matmul_attrs

from jax_mc2 import _mc2_ffi
from jax_mc2.implementations import ffi as _ffi
from jax_mc2.primitives import lowp_quant_mm_all_reduce as lowp

F32 = np.float32
I32 = np.int32
E4M3 = ml_dtypes.float8_e4m3fn


def _call(target, out, *operands, **attrs):
    result = jax.ffi.ffi_call(target, out)(*operands, **attrs)
    return jax.block_until_ready(result)


# --------------------------------------------------------------------------
# The low-precision mode table


def test_lowp_mode_table_matches_the_python_modes():
    table = _mc2_ffi.lowp_modes()
    assert set(table) == {lowp.PERTOKEN, lowp.PACKED, lowp.PERBLOCK, lowp.MX}
    assert all(isinstance(v, int) for v in table.values())
    # The scaled kernel mode serves pertoken and packed; perblock and MX have their own.
    assert table[lowp.PERTOKEN] == table[lowp.PACKED]
    assert len({table[lowp.PERTOKEN], table[lowp.PERBLOCK], table[lowp.MX]}) == 3
    # The Python side uses the module's table, not a copy of its own.
    assert lowp._FFI_MODES == table
    assert _ffi.LOWP_MODES == table


def test_lowp_mode_outside_the_table_is_an_error():
    x1 = np.ones((2, 4), E4M3)
    x2 = np.ones((4, 3), E4M3)
    bad = max(_mc2_ffi.lowp_modes().values()) + 1
    with pytest.raises(Exception, match=f"mode must be 0, 1 or 2, got {bad}"):
        _call(
            _ffi.LOWP_MATMUL,
            jax.ShapeDtypeStruct((2, 3), F32),
            x1,
            x2,
            np.ones(1, F32),
            **lowp_matmul_attrs(bad),
        )


# --------------------------------------------------------------------------
# Unsupported dtypes: every handler answers with an error


def test_matmul_unsupported_dtype():
    x = np.ones((2, 4), I32)
    with pytest.raises(
        Exception, match="mc2_matmul_ffi: x1, x2 and out must share one float dtype"
    ):
        _call(
            _ffi.MATMUL,
            jax.ShapeDtypeStruct((2, 3), I32),
            x,
            np.ones((4, 3), I32),
            **matmul_attrs(),
        )


def test_matmul_optional_operand_count_and_dtype():
    x1, x2 = np.ones((2, 4), F32), np.ones((4, 3), F32)
    out = jax.ShapeDtypeStruct((2, 3), F32)
    with pytest.raises(Exception, match="expected 1 optional operands, got 0"):
        _call(_ffi.MATMUL, out, x1, x2, **matmul_attrs(has_bias=True))
    with pytest.raises(Exception, match=r"bias must be \(n,\) = \(3,\) of the x1 dtype"):
        _call(_ffi.MATMUL, out, x1, x2, np.ones(3, I32), **matmul_attrs(has_bias=True))
    with pytest.raises(Exception, match="x3 must have the output shape"):
        _call(_ffi.MATMUL, out, x1, x2, np.ones((2, 3), np.float16), **matmul_attrs(has_x3=True))


def test_matmul_handlers_check_shapes_not_only_element_counts():
    """An x3, bias or out with the right element count in another shape is an
    error in the three matmul handlers, never read in the wrong layout."""
    x1, x2 = np.ones((2, 4), F32), np.ones((4, 3), F32)
    out = jax.ShapeDtypeStruct((2, 3), F32)
    x3_transposed = np.ones((3, 2), F32)
    with pytest.raises(Exception, match=r"x3 must have the output shape \(2, 3\), got \(3, 2\)"):
        _call(_ffi.MATMUL, out, x1, x2, x3_transposed, **matmul_attrs(has_x3=True))
    with pytest.raises(
        Exception, match=r"bias must be \(n,\) = \(3,\) of the x1 dtype, got \(1, 3\)"
    ):
        _call(_ffi.MATMUL, out, x1, x2, np.ones((1, 3), F32), **matmul_attrs(has_bias=True))
    with pytest.raises(Exception, match="shapes do not form a matmul"):
        _call(
            _ffi.MATMUL,
            jax.ShapeDtypeStruct((3, 2, 3), F32),
            np.ones((2, 3, 4), F32),
            x2,
            **matmul_attrs(),
        )
    i8 = np.ones((2, 4), np.int8), np.ones((4, 3), np.int8), np.ones(1, F32)
    with pytest.raises(Exception, match=r"x3 must have the output shape \(2, 3\)"):
        _call(_ffi.INT8_MATMUL, out, *i8, x3_transposed, **int8_matmul_attrs(has_x3=True))
    s2 = np.ones(1, F32)
    e4 = np.ones((2, 4), E4M3), np.ones((4, 3), E4M3)
    with pytest.raises(Exception, match=r"x3 must be a float array of shape \[\.\.\., n\]"):
        _lowp(*e4, s2, x3_transposed, has_x3=True)
    # The right shapes still compute: x1 @ x2 + x3.
    got = _call(_ffi.MATMUL, out, x1, x2, np.ones((2, 3), F32), **matmul_attrs(has_x3=True))
    np.testing.assert_array_equal(np.asarray(got), np.full((2, 3), 5.0, F32))
    got = _lowp(*e4, s2, np.ones((2, 3), F32), has_x3=True)
    np.testing.assert_array_equal(np.asarray(got), np.full((2, 3), 5.0, F32))


def test_int8_matmul_unsupported_dtype():
    with pytest.raises(Exception, match="mc2_int8_matmul_ffi: x1 and x2 must be int8"):
        _call(
            _ffi.INT8_MATMUL,
            jax.ShapeDtypeStruct((2, 3), F32),
            np.ones((2, 4), F32),
            np.ones((4, 3), np.int8),
            np.ones(1, F32),
            **int8_matmul_attrs(),
        )


def test_int8_matmul_comm_scale_dtype():
    with pytest.raises(Exception, match="comm scale must be float16/bfloat16"):
        _call(
            _ffi.INT8_MATMUL,
            jax.ShapeDtypeStruct((2, 3), np.int8),
            np.ones((2, 4), np.int8),
            np.ones((4, 3), np.int8),
            np.ones(1, F32),
            np.ones(3, F32),
            **int8_matmul_attrs(has_comm_scale=True),
        )


def test_add_rms_norm_unsupported_dtype():
    a = np.ones((2, 8), I32)
    out = jax.ShapeDtypeStruct((2, 8), I32)
    with pytest.raises(Exception, match="mc2_add_rms_norm_ffi: .* must share one float dtype"):
        _call(
            _ffi.ADD_RMS_NORM,
            (out, out),
            a,
            a,
            np.ones(8, I32),
            epsilon=np.float32(1e-6),
            parallelism=np.int64(1),
        )


def test_custom_call_passes_each_attribute_in_the_type_its_handler_binds():
    x = np.arange(16, dtype=F32).reshape(2, 8)
    gamma = np.ones(8, F32)
    out = jax.ShapeDtypeStruct((2, 8), F32)
    # The handler binds float32 and int64: a Python float (float64) or an
    # int32, passed as they are, do not match its signature.
    with pytest.raises(Exception, match="Wrong scalar data type"):
        _call(_ffi.ADD_RMS_NORM, (out, out), x, x, gamma, epsilon=1e-6, parallelism=np.int32(1))
    results = [
        jax.block_until_ready(
            _ffi._custom_call(
                _ffi.ADD_RMS_NORM, (out, out), x, x, gamma, epsilon=eps, parallelism=ranks
            )
        )
        for eps, ranks in (
            (1e-6, 1),
            (np.float64(1e-6), np.int32(1)),
            (np.float32(1e-6), np.int64(1)),
        )
    ]
    for y, norm in results[1:]:
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(norm, results[0][1])


def test_custom_call_refuses_an_attribute_type_it_does_not_map():
    x = np.ones((2, 8), F32)
    out = jax.ShapeDtypeStruct((2, 8), F32)
    with pytest.raises(TypeError, match="mc2_add_rms_norm_ffi: attribute epsilon"):
        _ffi._custom_call(_ffi.ADD_RMS_NORM, (out, out), x, x, x[0], epsilon=[1e-6], parallelism=1)


def _grouped(x, w, offsets, src, dst, y_shape, y_dtype=F32, permute_out=False):
    y = jax.ShapeDtypeStruct(y_shape, y_dtype)
    p = jax.ShapeDtypeStruct((src.shape[0], x.shape[1]), x.dtype)
    return _call(
        _ffi.GROUPED_MATMUL,
        (y, p) if permute_out else y,
        x,
        w,
        offsets,
        src,
        dst,
        transpose_w=False,
        has_permute_out=permute_out,
        parallelism=np.int64(1),
    )


def test_grouped_matmul_unsupported_dtype():
    idx = np.arange(2, dtype=I32)
    with pytest.raises(Exception, match="mc2_grouped_matmul_ffi: x, w and y must share one float"):
        _grouped(
            np.ones((2, 4), I32),
            np.ones((1, 4, 3), I32),
            np.array([0, 2], I32),
            idx,
            idx,
            (2, 3),
            I32,
        )


def test_grouped_matmul_blas_size_limit():
    # Empty operands whose k does not fit BLAS's 32-bit integers (y is not
    # empty, so that XLA runs the call).
    k = 2**31
    with pytest.raises(Exception, match=f"k and n must be below 2\\^31, got k = {k}, n = 1"):
        _grouped(
            np.zeros((0, k), F32),
            np.zeros((0, k, 1), F32),
            np.zeros(1, I32),
            np.zeros(0, I32),
            np.zeros(0, I32),
            (1, 1),
        )


def test_grouped_matmul_allocation_failure_is_an_error():
    # y has 2^50 rows of n = 0 elements: no data, but the kernel's per-row
    # bookkeeping cannot be allocated. That is an error, not a crash. (The
    # permute_out result is not empty, so that XLA runs the call.)
    rows = 2**50
    with pytest.raises(
        Exception, match=f"RESOURCE_EXHAUSTED: .*out of memory: could not allocate {rows} bytes"
    ):
        _grouped(
            np.zeros((2, 4), F32),
            np.zeros((1, 4, 0), F32),
            np.array([0, 0], I32),
            np.zeros(1, I32),
            np.full(1, -1, I32),
            (rows, 0),
            permute_out=True,
        )


def test_grouped_matmul_wgrad_unsupported_dtype():
    with pytest.raises(Exception, match="mc2_grouped_matmul_wgrad_ffi: x, dy and dw must share"):
        _call(
            _ffi.GROUPED_MATMUL_WGRAD,
            jax.ShapeDtypeStruct((1, 4, 3), I32),
            np.ones((2, 4), I32),
            np.ones((2, 3), I32),
            np.array([0, 2], I32),
            transpose_w=False,
            parallelism=np.int64(1),
        )


def _lowp(x1, x2, x2_scale, *extra, out_dtype=F32, has_x3=False):
    return _call(
        _ffi.LOWP_MATMUL,
        jax.ShapeDtypeStruct((x1.shape[0], x2.shape[1]), out_dtype),
        x1,
        x2,
        x2_scale,
        *extra,
        **lowp_matmul_attrs(_mc2_ffi.lowp_modes()[lowp.PERTOKEN], has_x3=has_x3),
    )


def test_lowp_matmul_unsupported_dtypes():
    s2 = np.ones(1, F32)
    with pytest.raises(Exception, match="mc2_lowp_matmul_ffi: x1 and x2 must share one of"):
        _lowp(np.ones((2, 4), F32), np.ones((4, 3), F32), s2)
    x1, x2 = np.ones((2, 4), E4M3), np.ones((4, 3), E4M3)
    with pytest.raises(Exception, match="out must be float16, bfloat16 or float32"):
        _lowp(x1, x2, s2, out_dtype=I32)
    with pytest.raises(Exception, match=r"x3 must be a float array of shape \[\.\.\., n\]"):
        _lowp(x1, x2, s2, np.ones((2, 3), I32), has_x3=True)


def test_lowp_matmul_still_computes():
    x1 = np.full((2, 4), 1.5, E4M3)
    x2 = np.full((4, 3), 2.0, E4M3)
    got = _lowp(x1, x2, np.full(1, 0.5, F32), out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got, F32), np.full((2, 3), 6.0, F32))


# --------------------------------------------------------------------------
# Group and block sizes near INT64_MAX: ceil(k / size) must not wrap


def test_matmul_huge_antiquant_group_size_is_one_group():
    """(k + g - 1) / g wrapped to 0 scale rows for g near INT64_MAX, so an
    empty scale passed the size check and was read out of bounds."""
    x1, x2 = np.ones((4, 8), F32), np.ones((8, 4), np.int8)
    attrs = matmul_attrs(antiquant=True, antiquant_group_size=np.int64(2**63 - 1))
    out = jax.ShapeDtypeStruct((4, 4), F32)
    with pytest.raises(Exception, match="antiquant scale must have x1's dtype and 4 elements"):
        _call(_ffi.MATMUL, out, x1, x2, np.ones(0, F32), **attrs)
    got = _call(_ffi.MATMUL, out, x1, x2, np.full(4, 0.5, F32), **attrs)
    np.testing.assert_array_equal(np.asarray(got), np.full((4, 4), 4.0, F32))
    with pytest.raises(Exception, match="antiquant_group_size must be >= 0, got -32"):
        _call(
            _ffi.MATMUL,
            out,
            x1,
            x2,
            np.ones(4, F32),
            **matmul_attrs(antiquant=True, antiquant_group_size=np.int64(-32)),
        )


def test_lowp_perblock_huge_block_k_is_one_block():
    """The same wrap for the perblock k-blocks: the kernel returned success
    without writing its output."""
    x1, x2 = np.ones((4, 8), E4M3), np.ones((8, 4), E4M3)
    attrs = lowp_matmul_attrs(
        _mc2_ffi.lowp_modes()["perblock"], has_x1_scale=True, block_k=np.int64(2**63 - 1)
    )
    out = jax.ShapeDtypeStruct((4, 4), F32)
    with pytest.raises(Exception, match="mc2_lowp_matmul_ffi"):
        _call(_ffi.LOWP_MATMUL, out, x1, x2, np.ones(0, F32), np.ones(0, F32), **attrs)
    got = _call(_ffi.LOWP_MATMUL, out, x1, x2, np.ones(4, F32), np.full(4, 0.5, F32), **attrs)
    np.testing.assert_array_equal(np.asarray(got), np.full((4, 4), 4.0, F32))
