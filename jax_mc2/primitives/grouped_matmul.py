"""A local grouped matmul (no communication): the expert GEMM of the MoE
operators, as primitives with JVP and transpose rules so that the gradients
of ``alltoallv_grouped_matmul`` / ``grouped_matmul_alltoallv`` run on the
same kernels as their forward pass.

    y[o_g:o_(g+1)] = x[o_g:o_(g+1)] @ w[g]        (other rows of y: 0)
    dw[g] = x[o_g:o_(g+1)]^T @ dy[o_g:o_(g+1)]    (its weight gradient)

with group offsets ``o`` (G + 1,) int32, ``o[0] == 0``, non-decreasing, at
most the row count. fp32 accumulation, one rounding to x's dtype. ``ffi``:
the C++ kernels ``mc2_grouped_matmul_ffi`` / ``mc2_grouped_matmul_wgrad_ffi``
(one BLAS sgemm per group), or, when the group sizes are known when tracing
(``static_sizes``) and ``ffi.gemm_engine`` picks XLA's GEMM for the dtype,
one XLA dot a group; ``xla``: ``lax.ragged_dot`` and its transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_mc2.framework import _compat, validation
from jax_mc2.framework.implementation import requested as requested_implementation
from jax_mc2.framework.primitive import MAP, Operand, PrimitiveSpec, register
from jax_mc2.framework.validation import shape_str
from jax_mc2.implementations import ffi, xla

OP = "grouped_matmul"
_F32 = jnp.float32
_I32 = jnp.int32
_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32))

OPERANDS = (Operand("x"), Operand("w"), Operand("offsets"))
WGRAD_OPERANDS = (Operand("x"), Operand("dy"), Operand("offsets"))


def _check_offsets(offsets, groups):
    if offsets.shape != (groups + 1,) or offsets.dtype != jnp.dtype(_I32):
        raise validation.type_error(
            OP,
            f"group_offsets must be int32 (G + 1,) = ({groups + 1},), got "
            f"{offsets.dtype.name}{shape_str(offsets.shape)}",
        )


def _check_static_sizes(static_sizes, groups, rows):
    """Each rank's static group sizes: G ints >= 0 summing to at most rows."""
    for sizes in static_sizes or ():
        if len(sizes) != groups or min(sizes, default=0) < 0 or sum(sizes) > rows:
            raise validation.value_error(
                OP,
                f"static_sizes must hold G = {groups} sizes >= 0 summing to at most the "
                f"{rows} rows per rank, got {sizes}",
            )


def _abstract_eval(
    x, w, offsets, *, trans_weight, implementation, world_size, static_sizes, rank_axis
):
    del implementation, world_size, rank_axis
    validation.check_rank(OP, "x", x, (2,), "(rows, k)")
    if x.dtype not in _FLOAT_DTYPES:
        raise validation.type_error(
            OP, f"x dtype must be float16, bfloat16 or float32, got {x.dtype.name}"
        )
    k = x.shape[1]
    wk = None if w.ndim != 3 else w.shape[2] if trans_weight else w.shape[1]
    if w.ndim != 3 or wk != k:
        layout = "(G, n, k)" if trans_weight else "(G, k, n)"
        raise validation.type_error(
            OP, f"w must be 3-D {layout} with k == {k}, got {shape_str(w.shape)}"
        )
    validation.check_same_dtype(OP, "w", w, "x", x)
    _check_offsets(offsets, w.shape[0])
    _check_static_sizes(static_sizes, w.shape[0], x.shape[0])
    n = w.shape[1] if trans_weight else w.shape[2]
    return _compat.result_aval(x, (x.shape[0], n), x.dtype, [x, w, offsets])


def _wgrad_abstract_eval(
    x, dy, offsets, *, trans_weight, implementation, world_size, static_sizes, rank_axis
):
    del implementation, world_size, rank_axis
    groups = offsets.shape[0] - 1
    _check_static_sizes(static_sizes, groups, x.shape[0])
    k, n = x.shape[1], dy.shape[1]
    shape = (groups, n, k) if trans_weight else (groups, k, n)
    return _compat.result_aval(x, shape, x.dtype, [x, dy, offsets])


def _selected_dense_gmm(x, w, offsets):
    """Every group's product for every row, each row keeping its own group's
    (rows past the groups keep none): what ``lax.ragged_dot`` computes on
    CPU and GPU, whose dense expansion multiplies the other groups' weights
    by zero rows instead, so that one non-finite weight (0 * inf = NaN) spreads into
    every row. The select keeps it in its own group."""
    groups = w.shape[0]
    row_group = jnp.searchsorted(offsets[1:], jnp.arange(x.shape[0], dtype=_I32), side="right")
    products = jnp.einsum("mk,gkn->gmn", x, w, preferred_element_type=_F32)
    mine = row_group[None, :, None] == jnp.arange(groups, dtype=row_group.dtype)[:, None, None]
    return jnp.sum(jnp.where(mine, products, 0.0), axis=0)


def _clip_static_sizes(sizes, rows):
    """NumPy integer sizes clipped to [0, rows] in their own dtype, as int64."""
    sizes = np.asarray(sizes)
    hi = min(rows, int(np.iinfo(sizes.dtype).max))
    return np.clip(sizes, 0, hi).astype(np.int64)


def static_group_sizes(sizes, rows: int) -> tuple[int, ...]:
    """The group sizes :func:`offsets_from_sizes` lays out, for sizes known
    while tracing (NumPy or Python integers): each clipped to [0, rows], the
    running sum saturating at ``rows``."""
    ends = np.minimum(np.cumsum(_clip_static_sizes(sizes, rows)), rows)
    return tuple(int(v) for v in np.diff(ends, prepend=0))


def _clip_sizes(sizes, rows):
    """Each size clipped to [0, rows] in its own dtype (NumPy sizes in NumPy,
    so that int64/uint64 values past int32 never wrap), then int32."""
    if not isinstance(sizes, jax.Array):
        return jnp.asarray(_clip_static_sizes(sizes, rows).astype(np.int32))
    sizes = jnp.asarray(sizes)
    hi = min(rows, int(jnp.iinfo(sizes.dtype).max))
    return jnp.clip(sizes, 0, hi).astype(_I32)


def _saturating_add(a, b, rows):
    # a, b in [0, rows]: min(a + b, rows) without forming a + b past rows.
    return jnp.where(a > rows - b, rows, a + b)


def offsets_from_sizes(sizes, rows: int):
    """(G + 1,) int32 group offsets of the integer group sizes (G,) over
    ``rows`` rows: negative sizes count as 0, sizes past ``rows`` are
    clipped, and the running sum saturates at ``rows`` (docs/semantics.md
    §6), so that no size or sum overflows int32 whatever the sizes' dtype.
    """
    clipped = _clip_sizes(sizes, rows)
    ends = lax.associative_scan(lambda a, b: _saturating_add(a, b, rows), clipped)
    return jnp.concatenate([jnp.zeros(1, _I32), ends])


def grouped_matmul_xla(x, w, offsets, *, trans_weight):
    """The ``xla`` implementation: ``lax.ragged_dot`` with the group sizes
    ``diff(offsets)`` (groups start at row 0), fp32 accumulation, one
    rounding to x's dtype; when a weight is not finite, the same products
    with a per-row select (:func:`_selected_dense_gmm`). ``lax.ragged_dot``
    masks the rows of other groups by multiplying with 0 on CPU, and on GPU
    too (jax 0.11.2 on an H200): ``0 * inf`` would put NaN in their rows."""
    if trans_weight:
        w = jnp.swapaxes(w, 1, 2)
    sizes = jnp.diff(offsets).astype(_I32)

    def ragged(x, w, offsets):
        return lax.ragged_dot(x, w, sizes, preferred_element_type=_F32)

    finite = jnp.all(jnp.isfinite(w))
    return lax.cond(finite, ragged, _selected_dense_gmm, x, w, offsets).astype(x.dtype)


def on_xla_gemm(dtype, rows, k, n, parallelism, static_sizes) -> bool:
    """Whether the ``ffi`` rules multiply ``rows`` rows (k deep, n wide) on
    XLA's GEMM, one dot a group: static sizes, and :func:`ffi.gemm_engine`
    picks it for this product (docs/semantics.md §12)."""
    if static_sizes is None:
        return False
    return ffi.gemm_engine(dtype, k, parallelism, product=rows * k * n) == ffi.XLA_DOT


def static_grouped_matmul(x, w, static_sizes, rank_axis, *, trans_weight):
    """The grouped matmul on XLA's GEMM with each rank's static group sizes
    (one tuple per rank along ``rank_axis``)."""

    def run(sizes, x, w):
        return xla.grouped_matmul_static(x, w, sizes, transpose_w=trans_weight)

    return xla.by_rank(run, static_sizes, rank_axis, x, w)


def _ffi_gmm(x, w, offsets, *, trans_weight, parallelism, static_sizes, rank_axis):
    k, n = x.shape[1], w.shape[1] if trans_weight else w.shape[2]
    if on_xla_gemm(x.dtype, x.shape[0], k, n, parallelism, static_sizes):
        return static_grouped_matmul(x, w, static_sizes, rank_axis, trans_weight=trans_weight)
    rows = jnp.arange(x.shape[0], dtype=_I32)
    return ffi.grouped_matmul(
        x,
        w,
        offsets,
        rows,
        rows,
        out_rows=x.shape[0],
        transpose_w=trans_weight,
        permute_out=False,
        parallelism=parallelism,
    )


def _wgrad_xla(x, dy, offsets, *, trans_weight):
    # Contract the rows, ragged by group: [G, k, n].
    sizes = jnp.diff(offsets).astype(_I32)
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    dw = lax.ragged_dot_general(x, dy, sizes, dims, preferred_element_type=_F32)
    return (jnp.swapaxes(dw, 1, 2) if trans_weight else dw).astype(x.dtype)


def _wgrad_ffi(x, dy, offsets, *, trans_weight, parallelism, static_sizes, rank_axis):
    if on_xla_gemm(x.dtype, x.shape[0], x.shape[1], dy.shape[1], parallelism, static_sizes):

        def run(sizes, x, dy):
            return xla.grouped_weight_gradient_static(x, dy, sizes, transpose_w=trans_weight)

        return xla.by_rank(run, static_sizes, rank_axis, x, dy)
    return ffi.grouped_matmul_wgrad(
        x, dy, offsets, transpose_w=trans_weight, parallelism=parallelism
    )


def _bind(prim, *operands, **params):
    return prim.bind(*_compat.match_vma(*operands), **params)


def grouped_matmul_offsets(
    x,
    w,
    group_offsets,
    *,
    trans_weight=False,
    implementation=None,
    static_sizes=None,
    rank_axis=None,
):
    """``y[o_g:o_(g+1)] = x[o_g:o_(g+1)] @ w[g]``, other rows 0.

    x: [rows, k]; w: [G, k, n] ([G, n, k] with ``trans_weight``);
    group_offsets: int32 [G + 1] starting at 0, non-decreasing, <= rows.
    static_sizes: when known while tracing, each rank's group sizes (one
    tuple of G ints per rank along ``rank_axis``, or one tuple without an
    axis), the same values as ``diff(group_offsets)``; they let the ``ffi``
    implementation multiply one group at a time on XLA's GEMM.
    Returns [rows, n] in x's dtype (fp32 accumulation, one rounding).
    """
    return _bind(
        grouped_matmul_p,
        x,
        w,
        group_offsets,
        trans_weight=validation.check_bool(OP, "trans_weight", trans_weight),
        implementation=requested_implementation(OP, implementation),
        world_size=1,
        static_sizes=static_sizes,
        rank_axis=rank_axis,
    )


def _bilinear_jvp(prim, primals, tangents, **params):
    """The JVP of a primitive bilinear in its first two operands (the grouped
    matmul in (x, w), its weight gradient in (x, dy)); the offsets are
    integer."""
    a, b, offsets = primals
    da, db, _ = tangents
    out = _bind(prim, a, b, offsets, **params)
    ad = _compat.ad
    terms = []
    if type(da) is not ad.Zero:
        terms.append(_bind(prim, da, b, offsets, **params))
    if type(db) is not ad.Zero:
        terms.append(_bind(prim, a, db, offsets, **params))
    if not terms:
        return out, ad.Zero.from_primal_value(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _bilinear_transpose(ct, a, b, names, a_cotangent, b_cotangent):
    """The transpose rule of a primitive bilinear in its first two operands
    (a, b), exactly one of them linear: ``a_cotangent(ct, b)`` or
    ``b_cotangent(a, ct)``; the integer offsets get none."""
    ad = _compat.ad
    if type(ct) is ad.Zero:
        return [None, None, None]
    if ad.is_undefined_primal(a) and not ad.is_undefined_primal(b):
        return [a_cotangent(ct, b), None, None]
    if ad.is_undefined_primal(b) and not ad.is_undefined_primal(a):
        return [None, b_cotangent(a, ct), None]
    raise NotImplementedError(f"{OP}: transposition needs exactly one of {names} linear")


def _transpose(ct, x, w, offsets, *, trans_weight, **params):
    """y_g = x_g @ w[g]: the cotangent of x is ct_g @ w[g]^T (the grouped
    matmul with the weight's transposition flipped), that of w the weight
    gradient x_g^T @ ct_g."""
    return _bilinear_transpose(
        ct,
        x,
        w,
        "x and w",
        lambda ct, w: _bind(
            grouped_matmul_p, ct, w, offsets, trans_weight=not trans_weight, **params
        ),
        lambda x, ct: _bind(
            grouped_matmul_wgrad_p, x, ct, offsets, trans_weight=trans_weight, **params
        ),
    )


def _wgrad_transpose(ct, x, dy, offsets, *, trans_weight, **params):
    """dw[g] = x_g^T @ dy_g: the cotangent of dy is x_g @ ct[g] and that of x
    is dy_g @ ct[g]^T, both grouped matmuls (rows past the groups get 0)."""
    return _bilinear_transpose(
        ct,
        x,
        dy,
        "x and dy",
        lambda ct, dy: _bind(
            grouped_matmul_p, dy, ct, offsets, trans_weight=not trans_weight, **params
        ),
        lambda x, ct: _bind(grouped_matmul_p, x, ct, offsets, trans_weight=trans_weight, **params),
    )


def _register_bilinear(name, operands, abstract_eval, xla_rule, ffi_rule, transpose):
    """Registers a local (communication-free) grouped primitive bilinear in
    its first two operands, its JVP built from the primitive itself."""

    def jvp(primals, tangents, **params):
        return _bilinear_jvp(prim, primals, tangents, **params)

    def xla_composition(*operands, trans_weight, static_sizes, rank_axis):
        del static_sizes, rank_axis  # lax.ragged_dot reads the offsets
        return xla_rule(*operands, trans_weight=trans_weight)

    prim = register(
        PrimitiveSpec(
            name=name,
            operator=OP,
            operands=operands,
            abstract_eval=abstract_eval,
            effectful=False,
            xla=xla_composition,
            ffi=ffi_rule,
            batching=MAP,
            jvp=jvp,
            transpose=transpose,
        )
    )
    return prim


grouped_matmul_p = _register_bilinear(
    "mc2_grouped_matmul", OPERANDS, _abstract_eval, grouped_matmul_xla, _ffi_gmm, _transpose
)
grouped_matmul_wgrad_p = _register_bilinear(
    "mc2_grouped_matmul_wgrad",
    WGRAD_OPERANDS,
    _wgrad_abstract_eval,
    _wgrad_xla,
    _wgrad_ffi,
    _wgrad_transpose,
)
