"""The public matmul + all-reduce + add + RMSNorm entry points (seed 002,
aclnnMatmulAllReduceAddRmsNorm and aclnnInplaceMatmulAllReduceAddRmsNorm).

    mm       = allReduce(x1 @ x2 + bias)
    y        = mm + residual
    norm_out = y / sqrt(mean(y^2) + epsilon) * gamma

The two differ only in where ``y`` lives, so one signature serves both.
"""

from __future__ import annotations

from jax_mc2.framework import validation
from jax_mc2.framework.collective import collective_params
from jax_mc2.framework.primitive import bind
from jax_mc2.framework.typing import Array, ArrayLike, AxisName, Implementation
from jax_mc2.primitives.mm_all_reduce_add_rms_norm import (
    INPLACE_OP,
    OP,
    check_epsilon,
    mm_all_reduce_add_rms_norm_p,
)


def _entry_point(inplace: bool, doc: str):
    """The public function (docstring ``doc``) binding the primitive out of
    place or, with ``inplace``, with ``y`` aliasing ``residual``."""
    name = INPLACE_OP if inplace else OP

    def entry_point(
        x1: ArrayLike,
        x2: ArrayLike,
        residual: ArrayLike,
        gamma: ArrayLike,
        axis_name: AxisName,
        *,
        bias: ArrayLike | None = None,
        epsilon: float = 1e-6,
        reduce_op: str = "sum",
        comm_turn: int = 0,
        transpose_x2: bool = False,
        implementation: Implementation = None,
    ) -> tuple[Array, Array]:
        validation.check_reduce_op(name, reduce_op)
        epsilon = check_epsilon(name, epsilon)
        params = collective_params(name, axis_name, comm_turn, implementation)
        y, norm_out = bind(
            mm_all_reduce_add_rms_norm_p,
            {"x1": x1, "x2": x2, "residual": residual, "gamma": gamma, "bias": bias},
            epsilon=epsilon,
            transpose_x2=validation.check_bool(name, "transpose_x2", transpose_x2),
            inplace=inplace,
            **params,
        )
        return y, norm_out

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = doc
    return entry_point


matmul_all_reduce_add_rms_norm = _entry_point(
    False,
    """Matmul + all-reduce + add + RMSNorm.

    Args:
      x1: [m, k] or [b, s, k], float16 or bfloat16 (float32 on the generic target).
      x2: [k, n], or [n, k] with ``transpose_x2=True``.
      residual: [b, s, n] (b * s == m when x1 is 2-D).
      gamma: [n].
      axis_name: mesh axis name(s) bound by ``shard_map``, or None.
      bias: [n], added on every rank before the reduction.
      epsilon: in (0, 1) and at least float32's smallest normal
        (``np.finfo(np.float32).tiny``, about 1.18e-38): it is added in
        float32, and a smaller one (1e-50 rounds to 0) raises ValueError
        rather than giving an all-zero row NaN (docs/semantics.md §7).
      comm_turn: 0, or t > 0 rows chunks with separate all-reduces.

    Returns:
      ``(y, norm_out)``, both [b, s, n] in residual's dtype:
      ``y = allReduce(x1 @ x2 + bias) + residual``, ``norm_out = RMSNorm(y) * gamma``.
    """,
)

inplace_matmul_all_reduce_add_rms_norm = _entry_point(
    True,
    """:func:`matmul_all_reduce_add_rms_norm` with ``y`` written into
    ``residual``'s buffer (``input_output_aliases``): donate ``residual``
    (``jax.jit(..., donate_argnums=...)``) to get the buffer back as ``y``;
    without donation XLA copies it.

    Args and numerics as :func:`matmul_all_reduce_add_rms_norm` (x1 [m, k]
    or [b, s, k], x2 [k, n], residual [b, s, n], gamma [n]).

    Returns:
      ``(y, norm_out)``, both [b, s, n] in residual's dtype.
    """,
)
