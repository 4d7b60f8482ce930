"""Matmul + all-reduce + add + RMSNorm (seed 002,
aclnnMatmulAllReduceAddRmsNorm and aclnnInplaceMatmulAllReduceAddRmsNorm).

    mm       = allReduce(x1 @ x2 + bias)
    y        = mm + residual
    norm_out = y / sqrt(mean(y^2) + epsilon) * gamma

The in-place variant writes ``y`` into ``residual``'s buffer: a caller that
donates ``residual`` gets its buffer back as ``y``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_mc2.framework import _compat, numerics, validation
from jax_mc2.framework.primitive import (
    FOLD_LEADING,
    FOLD_ROWS,
    Operand,
    PrimitiveSpec,
    register,
    split_operands,
)
from jax_mc2.framework.validation import shape_str
from jax_mc2.implementations import ffi, xla
from jax_mc2.primitives.matmul_family import check_chip_limits, check_matmul

OP = "matmul_all_reduce_add_rms_norm"
INPLACE_OP = "inplace_matmul_all_reduce_add_rms_norm"


def _op_name(inplace: bool) -> str:
    return INPLACE_OP if inplace else OP


_F32_TINY = np.finfo(np.float32).tiny


def check_epsilon(op, epsilon) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)):
        raise validation.value_error(
            op, f"epsilon must be a Python float in (0, 1), got {epsilon!r}"
        )
    if not 0.0 < float(epsilon) < 1.0:
        raise validation.value_error(op, f"epsilon must be in (0, 1), got {epsilon!r}")
    # The kernels add float32(epsilon): one that rounds to 0 (or to a
    # subnormal, flushed to 0 where denormals are) gives an all-zero row
    # 0 * inf = NaN (docs/semantics.md §7).
    if np.float32(epsilon) < _F32_TINY:
        raise validation.value_error(
            op,
            f"epsilon must be at least float32's smallest normal {float(_F32_TINY)!r} "
            f"(it is added in float32), got {epsilon!r}",
        )
    return float(epsilon)


def check_norm_operands(op, x1, x2, residual, gamma, bias, *, transpose_x2):
    """x1: [m, k] or [b, s, k]; residual: [b, s, n] with b * s == m; gamma: [n]."""
    mm_shape = check_matmul(op, x1, x2, transpose_x2=transpose_x2, bias=bias)
    validation.check_rank(op, "residual", residual, (3,), "(b, s, n)")
    validation.check_same_dtype(op, "residual", residual, "x1", x1)
    n = mm_shape[-1]
    b, s, rn = residual.shape
    if x1.ndim == 3:
        ok, rule = (
            residual.shape == mm_shape,
            f"(b, s, n) = {shape_str(mm_shape)} (x1 is (b, s, k))",
        )
    else:
        ok, rule = (
            (b * s == mm_shape[0] and rn == n),
            f"(b, s, n) with b * s == m == {mm_shape[0]} and n == {n}",
        )
    if not ok:
        raise validation.type_error(op, f"residual must be {rule}, got {shape_str(residual.shape)}")
    validation.check_shape(op, "gamma", gamma, (n,), "1-D (n,)")
    validation.check_same_dtype(op, "gamma", gamma, "x1", x1)
    return mm_shape


OPERANDS = (
    Operand("x1", fold=FOLD_LEADING),
    Operand("x2"),
    Operand("residual", fold=FOLD_LEADING),
    Operand("gamma"),
    Operand("bias", flag="has_bias"),
)


def _split(operands, has_bias):
    return tuple(split_operands(OPERANDS, operands, {"has_bias": has_bias}).values())


def _abstract_eval(*operands, epsilon, transpose_x2, has_bias, inplace, **collective):
    op = _op_name(inplace)
    x1, x2, residual, gamma, bias = _split(operands, has_bias)
    mm_shape = check_norm_operands(op, x1, x2, residual, gamma, bias, transpose_x2=transpose_x2)
    check_epsilon(op, epsilon)
    validation.check_comm_turn(op, collective["comm_turn"])
    check_chip_limits(op, x1, mm_shape, collective)
    axis_name = collective["axis_name"]
    mm = _compat.result_aval(
        x1, mm_shape, x1.dtype, [a for a in (x1, x2, bias) if a is not None], axis_name
    )
    # y does not depend on gamma; only norm_out varies along gamma's axes.
    y = _compat.result_aval(residual, residual.shape, residual.dtype, [mm, residual])
    norm_out = _compat.result_aval(residual, residual.shape, residual.dtype, [mm, residual, gamma])
    return [y, norm_out], _compat.named_axis_effects(axis_name)


def _ffi_composition(*operands, epsilon, has_bias, inplace, **params):
    """``params``: transpose_x2, axis_name, comm_turn, parallelism."""
    x1, x2, residual, gamma, bias = _split(operands, has_bias)
    transpose_x2 = params["transpose_x2"]
    if not params["axis_name"] and ffi.on_xla_gemm(x1, x2, transpose_x2, params["parallelism"]):
        # One rank on XLA's GEMM: the kernel rounds the float32 accumulator
        # as it reads it, the same values without a pass that writes them.
        mm = xla.local_accumulator(x1, x2, bias, transpose_x2=transpose_x2)
    else:
        mm = ffi.matmul_all_reduce(x1, x2, bias, None, **params)
    return ffi.add_rms_norm(
        mm,
        residual,
        gamma,
        epsilon=epsilon,
        alias_residual=inplace,
        parallelism=params["parallelism"],
    )


def _xla_composition(*operands, epsilon, has_bias, inplace, **params):
    """``params``: transpose_x2, axis_name, comm_turn."""
    del inplace
    x1, x2, residual, gamma, bias = _split(operands, has_bias)
    return xla.matmul_all_reduce_add_rms_norm(
        x1, x2, residual, gamma, bias, epsilon=epsilon, **params
    )


def _jvp(primals, tangents, *, epsilon, transpose_x2, has_bias, axis_name, **params):
    y, norm_out = mm_all_reduce_add_rms_norm_p.bind(
        *primals,
        epsilon=epsilon,
        transpose_x2=transpose_x2,
        has_bias=has_bias,
        axis_name=axis_name,
        **params,
    )
    x1, x2, residual, gamma, _ = _split(primals, has_bias)
    dx1, dx2, dres, dgamma, dbias = _split(
        [_compat.ad.instantiate_zeros(t) for t in tangents], has_bias
    )
    dmm = xla.product_tangent(x1, x2, dx1, dx2, transpose_x2=transpose_x2)
    if dbias is not None:
        dmm = dmm + numerics.widened(dbias)
    # Widened behind barriers (numerics.widened): without a collective the
    # tangent's rounding and the primal y's would be convert pairs that
    # XLA:GPU removes.
    dmm = numerics.widened(xla.all_reduce(dmm.astype(y.dtype), axis_name))
    # d(norm_out) from the primal y: norm = y * rstd * gamma,
    # rstd = (mean(y^2) + eps)^-1/2, d rstd = -rstd^3 * mean(y * dy).
    yf = numerics.widened(y)
    dy = dmm.reshape(residual.shape) + numerics.widened(dres)
    n = residual.shape[-1]
    rstd = lax.rsqrt(jnp.mean(yf * yf, axis=-1, keepdims=True) + np.float32(epsilon))
    drstd = -(rstd**3) * jnp.sum(yf * dy, axis=-1, keepdims=True) / n
    g = numerics.widened(gamma)
    dnorm = (dy * rstd + yf * drstd) * g + yf * rstd * numerics.widened(dgamma)
    return (y, norm_out), (dy.astype(y.dtype), dnorm.astype(norm_out.dtype))


mm_all_reduce_add_rms_norm_p = register(
    PrimitiveSpec(
        name="mc2_mm_all_reduce_add_rms_norm",
        operator=lambda params: _op_name(params["inplace"]),
        operands=OPERANDS,
        abstract_eval=_abstract_eval,
        xla=_xla_composition,
        ffi=_ffi_composition,
        multiple_results=True,
        batching=FOLD_ROWS,
        fold_like="residual",
        jvp=_jvp,
    )
)
