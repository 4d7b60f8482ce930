"""The framework: FFI registration, implementation selection, the C++
handlers' own checks, and the kernels' float conversions."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from handler_attrs import int8_matmul_attrs, lowp_matmul_attrs, matmul_attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jax_mc2 as mc2
from jax_mc2.implementations import ffi as _ffi


def test_every_lowered_target_is_registered(monkeypatch):
    assert set(_ffi.TARGETS) <= set(_ffi.REGISTERED)
    # And the lowerings, with either GEMM, really use exactly those targets.
    used = set()
    for engine in ("blas", "xla"):
        monkeypatch.setenv("JAX_MC2_GEMM", engine)
        used |= _lowered_targets()
    assert used == set(_ffi.TARGETS)


def _lowered_targets():
    x1, x2 = np.ones((4, 8), np.float16), np.ones((8, 4), np.float16)
    r, g = np.ones((1, 4, 4), np.float16), np.ones(4, np.float16)
    texts = [
        jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None)).lower(x1, x2).as_text(),
        jax.jit(lambda a, b, c, d: mc2.matmul_all_reduce_add_rms_norm(a, b, c, d, None))
        .lower(x1, x2, r, g)
        .as_text(),
        jax.jit(lambda a, b, s: mc2.quant_matmul_all_reduce(a, b, None, dequant_scale=s))
        .lower(np.ones((4, 8), np.int8), np.ones((8, 4), np.int8), jnp.ones(4, jnp.bfloat16))
        .as_text(),
        jax.jit(
            jax.grad(
                lambda a, w: (
                    mc2.alltoallv_grouped_matmul(a, w, None, send_counts=[4])[0]
                    .astype(jnp.float32)
                    .sum()
                ),
                argnums=1,
            )
        )
        .lower(x1, np.ones((1, 8, 4), np.float16))
        .as_text(),
        jax.jit(
            lambda a, b, s, t: mc2.quant_matmul_all_reduce_v4(a, b, None, x2_scale=s, x1_scale=t)
        )
        .lower(
            jnp.ones((4, 8), jnp.float8_e4m3fn),
            jnp.ones((8, 4), jnp.float8_e4m3fn),
            np.ones(4, np.float32),
            np.ones(4, np.float32),
        )
        .as_text(),
        # Traced counts with recv_counts given: the ffi run-time check.
        jax.jit(
            lambda a, w, c: mc2.alltoallv_grouped_matmul(
                a, w, None, send_counts=c, recv_counts=c, max_recv_tokens=4
            )[0]
        )
        .lower(x1, np.ones((1, 8, 4), np.float16), np.array([4], np.int32))
        .as_text(),
    ]
    return {name for t in texts for name in re.findall(r"custom_call @(\w+)", t)}


def test_default_implementation_on_cpu_is_ffi():
    x1, x2 = np.ones((4, 8), np.float32), np.ones((8, 4), np.float32)
    text = jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None)).lower(x1, x2).as_text()
    assert "mc2_matmul_ffi" in text
    text = (
        jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None, implementation="xla"))
        .lower(x1, x2)
        .as_text()
    )
    assert "mc2_matmul_ffi" not in text and "dot_general" in text


@pytest.mark.slow
def test_implementation_from_environment():
    code = (
        "import jax, numpy as np, jax_mc2 as mc2\n"
        "f = jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None))\n"
        "print('mc2_matmul_ffi' in f.lower(np.ones((2, 4), np.float32),"
        " np.ones((4, 2), np.float32)).as_text())\n"
    )
    env = dict(os.environ, JAX_MC2_IMPLEMENTATION="xla")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    env["JAX_MC2_IMPLEMENTATION"] = "ascend"
    # Without CANN (no CANN test double either) the ascend backend says so.
    for var in ("JAX_MC2_CANN_LIBRARY_PATH", "ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"):
        env.pop(var, None)
    code = (
        "import numpy as np, jax_mc2 as mc2\n"
        "try:\n"
        "    x = np.ones((2, 4), np.float16)\n"
        "    mc2.mm_all_reduce_base(x, x.T, None)\n"
        "except NotImplementedError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "mm_all_reduce_base: implementation='ascend' is not available" in out.stdout
    assert "JAX_MC2_CANN_LIBRARY_PATH" in out.stdout


def test_ffi_on_non_cpu_platform_refused():
    from jax_mc2.framework import implementation as _implementation
    from jax_mc2.framework import lowering

    assert _implementation.for_platform("op", None, ("cuda",)) == "xla"
    assert _implementation.for_platform("op", None, ("cpu",)) == "ffi"
    with pytest.raises(NotImplementedError, match="op: implementation='ffi' lowers for cpu only"):
        lowering._entry("op", "mc2_mm_all_reduce", "ffi", ("cuda",))


def test_lowering_table_names_missing_implementation():
    from jax_mc2.framework import lowering

    assert set(lowering.implementations("mc2_mm_all_reduce")) == {"xla", "ffi", "ascend"}
    with pytest.raises(
        NotImplementedError,
        match=r"op: implementation='ffi' has no lowering of this operator \(primitive "
        r"mc2_nope\); available: none",
    ):
        lowering._entry("op", "mc2_nope", "ffi", ("cpu",))
    with pytest.raises(ValueError, match="implementation must be one of"):
        lowering.register("mc2_nope", "tpu", lambda ctx: None)


# --------------------------------------------------------------------------
# The C++ handlers re-check what they rely on and return FFI errors.


def _raw_matmul(out_shape, *operands, transpose_x2=False, has_bias=False, has_x3=False):
    out = jax.ShapeDtypeStruct(out_shape, operands[0].dtype)
    return jax.ffi.ffi_call(_ffi.MATMUL, out)(
        *operands,
        **matmul_attrs(transpose_x2=transpose_x2, has_bias=has_bias, has_x3=has_x3),
    )


def _raw_int8(x2_dtype, scale):
    """mc2_int8_matmul_ffi called directly: int8 (4, 8) @ (8, 4), float16 out."""
    return jax.ffi.ffi_call(_ffi.INT8_MATMUL, jax.ShapeDtypeStruct((4, 4), np.float16))(
        np.ones((4, 8), np.int8),
        np.ones((8, 4), x2_dtype),
        scale,
        **int8_matmul_attrs(),
    )


def _raw_lowp(x2_scale, *, mode):
    """mc2_lowp_matmul_ffi called directly: fp8 (4, 8) @ (8, 4), bfloat16 out."""
    f8 = jnp.float8_e4m3fn
    return jax.ffi.ffi_call(_ffi.LOWP_MATMUL, jax.ShapeDtypeStruct((4, 4), jnp.bfloat16))(
        np.ones((4, 8), f8),
        np.ones((8, 4), f8),
        x2_scale,
        **lowp_matmul_attrs(mode, block_k=np.int64(0)),
    )


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: _raw_matmul((4, 4), np.ones((4, 8), np.float16), np.ones((6, 4), np.float16)),
            r"mc2_matmul_ffi: shapes do not form a matmul: x1 \(4, 8\), x2 \(6, 4\), out \(4, 4\)",
        ),
        (
            lambda: _raw_matmul((4, 5), np.ones((4, 8), np.float16), np.ones((8, 4), np.float16)),
            "mc2_matmul_ffi: shapes do not form a matmul",
        ),
        (
            lambda: _raw_matmul((4, 4), np.ones((4, 8), np.float16), np.ones((8, 4), np.float32)),
            "mc2_matmul_ffi: x1, x2 and out must share one float dtype",
        ),
        (
            lambda: _raw_matmul((4, 4), np.ones((4, 8), np.int32), np.ones((8, 4), np.int32)),
            "mc2_matmul_ffi: x1, x2 and out must share one float dtype",
        ),
        (
            lambda: _raw_matmul(
                (4, 4),
                np.ones((4, 8), np.float16),
                np.ones((8, 4), np.float16),
                np.ones(3, np.float16),
                has_bias=True,
            ),
            r"mc2_matmul_ffi: bias must be \(n,\) = \(4,\) of the x1 dtype, got \(3,\)",
        ),
        (
            lambda: _raw_matmul(
                (4, 4), np.ones((4, 8), np.float16), np.ones((8, 4), np.float16), has_bias=True
            ),
            "mc2_matmul_ffi: expected 1 optional operands, got 0",
        ),
        (
            lambda: _raw_matmul(
                (4, 4),
                np.ones((4, 8), np.float16),
                np.ones((8, 4), np.float16),
                np.ones((2, 4), np.float16),
                has_x3=True,
            ),
            r"mc2_matmul_ffi: x3 must have the output shape \(4, 4\), got \(2, 4\)",
        ),
        (
            lambda: _raw_matmul((4, 4), np.ones((4, 0), np.float16), np.ones((0, 4), np.float16)),
            "mc2_matmul_ffi: k must be at least 1",
        ),
        (
            lambda: jax.ffi.ffi_call(
                _ffi.ADD_RMS_NORM, (jax.ShapeDtypeStruct((2, 4), np.float32),) * 2
            )(
                np.ones((2, 4), np.float32),
                np.ones((2, 4), np.float32),
                np.ones(3, np.float32),
                epsilon=np.float32(1e-6),
                parallelism=np.int64(1),
            ),
            r"mc2_add_rms_norm_ffi: mm, y and norm_out must have residual's 8 elements and gamma "
            r"\(n,\) = \(4,\)",
        ),
        (
            lambda: _raw_int8(np.int8, np.ones(3, np.float32)),
            r"mc2_int8_matmul_ffi: scale must have 1 or n = 4 elements, got \(3,\)",
        ),
        (
            lambda: _raw_int8(np.float16, np.ones(4, np.float32)),
            "mc2_int8_matmul_ffi: x1 and x2 must be int8",
        ),
        (
            lambda: _raw_lowp(np.ones(3, np.float32), mode=0),
            r"mc2_lowp_matmul_ffi: x2_scale must be float32 with 1 or n elements, got \(3,\)",
        ),
        (
            lambda: _raw_lowp(np.ones(4, np.float32), mode=7),
            "mc2_lowp_matmul_ffi: mode must be 0, 1 or 2, got 7",
        ),
        (
            lambda: jax.ffi.ffi_call(
                _ffi.GROUPED_MATMUL_WGRAD, jax.ShapeDtypeStruct((2, 3, 4), np.float32)
            )(
                np.ones((5, 3), np.float32),
                np.ones((5, 4), np.float32),
                np.array([0, 3, 2], np.int32),
                transpose_w=False,
                parallelism=np.int64(1),
            ),
            r"mc2_grouped_matmul_wgrad_ffi: group_offsets must be non-decreasing in \[0, 5\]",
        ),
    ],
)
def test_ffi_handlers_return_errors(call, message):
    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT: " + message):
        jax.block_until_ready(call())


# --------------------------------------------------------------------------
# The kernels' fp16/bf16 conversions are exact: out = round(x1 * 1 + x3) is
# one fp32 addition of two 16-bit floats, rounded half-to-even, which NumPy
# computes the same way.


@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_kernel_rounding_matches_numpy(dtype, data):
    bits = hnp.arrays(np.uint16, (64, 1), elements=st.integers(0, 0xFFFF))
    a = data.draw(bits).view(dtype)
    b = data.draw(bits).view(dtype)
    one = np.ones((1, 1), dtype)
    got = np.asarray(mc2.mm_all_reduce_base(a, one, None, x3=b, implementation="ffi"))
    with np.errstate(invalid="ignore", over="ignore"):
        # The GEMM accumulates a @ one from +0, so -0 @ 1 is +0 (as in CANN's
        # accumulators); then x3 is added and the sum rounded once.
        product = np.float32(0) + a.astype(np.float32)
        want = (product + b.astype(np.float32)).astype(dtype)
    af, bf, wf = (x.astype(np.float32) for x in (a, b, want))
    finite = np.isfinite(af) & np.isfinite(bf)
    # XLA:CPU runs with fp32 denormals flushed to zero (its own ops as well as
    # custom calls), so bfloat16 values below 2^-126 are compared elsewhere.
    tiny = np.float32(2.0**-126)
    normal = [(np.abs(x) >= tiny) | (x == 0) for x in (af, bf, wf)]
    keep = finite & normal[0] & normal[1] & normal[2]
    np.testing.assert_array_equal(got.view(np.uint16)[keep], want.view(np.uint16)[keep])
    both_nan = np.isnan(got.astype(np.float32)) == np.isnan(want.astype(np.float32))
    assert np.all(both_nan)


def test_kernel_rounding_all_fp16_values():
    codes = np.arange(0, 0x10000, dtype=np.uint32).astype(np.uint16)
    a = codes.view(np.float16).reshape(-1, 1)
    one = np.ones((1, 1), np.float16)
    half = np.full((a.shape[0], 1), np.float16(2.0**-25))  # exact ties below fp16's ulp
    got = np.asarray(mc2.mm_all_reduce_base(a, one, None, x3=half, implementation="ffi"))
    with np.errstate(invalid="ignore", over="ignore"):
        want = (a.astype(np.float32) + half.astype(np.float32)).astype(np.float16)
    nan = np.isnan(a.astype(np.float32)).ravel()
    np.testing.assert_array_equal(
        got.view(np.uint16).ravel()[~nan], want.view(np.uint16).ravel()[~nan]
    )
    assert np.all(np.isnan(got.astype(np.float32)).ravel()[nan])
