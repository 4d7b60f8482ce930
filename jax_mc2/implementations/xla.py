"""The ``xla`` implementation of the float operators (matmul + all-reduce, add +
RMSNorm) as plain lax ops + lax collectives; the quantized and AlltoAllv
operators keep their lax compositions in their own ``ops`` modules.

These compositions are what ``implementation="xla"`` lowers to (on GPU/TPU by
default), and they define the numerics the ``ffi`` kernels match: products
accumulate in fp32, ``bias`` and ``x3`` are added to the fp32 accumulator on
every rank, one rounding to the output dtype, then the all-reduce in that
dtype (as HCCL does).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_mc2.framework import _compat, cpu, numerics

_F32 = jnp.float32


def row_chunks(m: int, comm_turn: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) that split m rows into ``comm_turn`` chunks
    (sizes differ by at most one; empty chunks dropped). comm_turn=0: one."""
    if comm_turn <= 1 or m <= 1:
        return [(0, m)]
    bounds = np.linspace(0, m, min(comm_turn, m) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def matmul_dims(x1, transpose_x2: bool):
    """``lax.dot_general`` dimension numbers of ``x1 @ x2``: x1 [..., k]
    against x2 [k, n] ([n, k] if transpose_x2), no batch dimensions."""
    return (((x1.ndim - 1,), (1 if transpose_x2 else 0,)), ((), ()))


def local_matmul(x1, x2, bias=None, x3=None, *, transpose_x2=False):
    """One rank's ``x1 @ x2 + bias + x3``, fp32 accumulation, one rounding.

    x1: [m, k] or [b, s, k]; x2: [k, n] ([n, k] if transpose_x2);
    bias: [n]; x3: the output shape [m, n] or [b, s, n].
    """
    return local_accumulator(x1, x2, bias, x3, transpose_x2=transpose_x2).astype(x1.dtype)


def local_accumulator(x1, x2, bias=None, x3=None, *, transpose_x2=False):
    """The float32 ``x1 @ x2 + bias + x3`` that :func:`local_matmul` rounds."""
    dims = matmul_dims(x1, transpose_x2)

    def mixed(a, b):
        return lax.dot_general(a, b, dims, preferred_element_type=_F32)

    def widened(a, b):
        return lax.dot_general(numerics.widened(a), numerics.widened(b), dims)

    if np.dtype(x1.dtype) == np.dtype(jnp.bfloat16) and not cpu.has_native_bf16_dot():
        # XLA:CPU without a native bfloat16 GEMM multiplies bfloat16 with
        # fp32 accumulation on a generic path (measured 1.2-1.4x slower,
        # docs/semantics.md §12); the float32 GEMM on widened operands is the
        # same math (the products are exact in float32).
        acc = lax.platform_dependent(x1, x2, cpu=widened, default=mixed)
    else:
        acc = mixed(x1, x2)
    if bias is not None:
        acc = acc + numerics.widened(bias)
    if x3 is not None:
        acc = acc + numerics.widened(x3)
    return acc


def grouped_matmul_static(x, w, sizes, *, transpose_w: bool = False):
    """``y[o_g:o_(g+1)] = x[o_g:o_(g+1)] @ w[g]`` for group sizes known when
    tracing (``o`` their running sum): one :func:`local_matmul` a group, so
    each product runs on XLA's own GEMM (fp32 accumulation, one rounding);
    rows past the groups are zero, and a weight is read only by its own rows.

    x: [rows, k]; w: [G, k, n] ([G, n, k] if transpose_w); sizes: G Python
    ints >= 0 summing to at most rows. Returns [rows, n] in x's dtype.
    """
    rows = x.shape[0]
    n = w.shape[1] if transpose_w else w.shape[2]
    parts, start = [], 0
    for g, size in enumerate(sizes):
        if size:
            parts.append(local_matmul(x[start : start + size], w[g], transpose_x2=transpose_w))
        start += size
    if start < rows:
        parts.append(jnp.zeros((rows - start, n), x.dtype))
    return jnp.concatenate(parts) if parts else jnp.zeros((rows, n), x.dtype)


def grouped_weight_gradient_static(x, dy, sizes, *, transpose_w: bool = False):
    """``dw[g] = x[o_g:o_(g+1)]^T @ dy[o_g:o_(g+1)]`` for group sizes known
    when tracing: one dot a group on XLA's GEMM (fp32 accumulation, one
    rounding); an empty group's gradient is zero.

    x: [rows, k]; dy: [rows, n]; sizes: G Python ints >= 0 summing to at
    most rows. Returns [G, k, n] ([G, n, k] if transpose_w) in x's dtype.
    """
    a, b = (dy, x) if transpose_w else (x, dy)
    contract_rows = (((0,), (0,)), ((), ()))
    parts, start = [], 0
    for size in sizes:
        if size:
            rows = slice(start, start + size)
            acc = lax.dot_general(a[rows], b[rows], contract_rows, preferred_element_type=_F32)
            parts.append(acc.astype(x.dtype))
        else:
            parts.append(jnp.zeros((a.shape[1], b.shape[1]), x.dtype))
        start += size
    return jnp.stack(parts)


def by_rank(fn, rows_by_rank, axis_name, *operands):
    """``fn(row, *operands)`` with this rank's row of ``rows_by_rank`` (one
    tuple of Python ints per rank along ``axis_name``): one program when
    every rank's row is the same, else a ``lax.switch`` on the rank over the
    distinct rows. Each branch's result varies over the operands' mesh axes
    (a branch that does not read them, e.g. all zeros, too)."""
    distinct = sorted(set(rows_by_rank))

    def branch(row):
        return lambda *ops: _compat.match_vma(fn(row, *ops), *ops)[0]

    if len(distinct) == 1:
        return fn(distinct[0], *operands)
    which = np.array([distinct.index(row) for row in rows_by_rank], np.int32)
    index = jnp.asarray(which)[lax.axis_index(axis_name)]
    return lax.switch(index, [branch(row) for row in distinct], *operands)


def product_tangent(x1, x2, dx1, dx2, *, transpose_x2=False):
    """The tangent of ``x1 @ x2``, ``dx1 @ x2 + x1 @ dx2``, in float32 (fp32
    accumulation, not rounded). Shapes as in :func:`local_matmul`."""
    dims = matmul_dims(x1, transpose_x2)
    acc = lax.dot_general(dx1, x2, dims, preferred_element_type=_F32)
    return acc + lax.dot_general(x1, dx2, dims, preferred_element_type=_F32)


def all_reduce(x, axis_name: tuple[str, ...]):
    return lax.psum(_compat.varying_over(x, axis_name), axis_name) if axis_name else x


def chunked_matmul_all_reduce(local_fn, x1, *row_operands, axis_name, comm_turn, reduce=None):
    """Splits the rows of x1 into ``comm_turn`` chunks, each with its own
    matmul and all-reduce so XLA can overlap one chunk's communication with
    the next chunk's compute. ``row_operands`` (x3 ``[..., n]``, pertoken
    scales ``[m]``, or None) are split with the rows; ``local_fn(x1_chunk,
    *row_operand_chunks)`` computes one chunk's per-rank result, and
    ``reduce`` (default: the all-reduce over ``axis_name``) combines it."""
    if reduce is None:
        reduce = functools.partial(all_reduce, axis_name=axis_name)
    lead = x1.shape[:-1]
    m = int(np.prod(lead))
    chunks = row_chunks(m, comm_turn)
    if len(chunks) == 1:
        return reduce(local_fn(x1, *row_operands))
    x1_2d = x1.reshape(m, x1.shape[-1])
    rows_2d = [None if a is None else a.reshape(m, -1) for a in row_operands]
    parts = []
    for start, stop in chunks:
        rows_c = [None if a is None else a[start:stop] for a in rows_2d]
        rows_c = [
            c if a is None or a.ndim > 1 else c.reshape(-1) for c, a in zip(rows_c, row_operands)
        ]
        parts.append(reduce(local_fn(x1_2d[start:stop], *rows_c)))
    out = jnp.concatenate(parts, axis=0)
    return out.reshape(*lead, out.shape[-1])


def matmul_all_reduce(x1, x2, bias, x3, *, transpose_x2, axis_name, comm_turn):
    """``allReduce(x1 @ x2 + bias + x3)`` (seed 004, non-quantized)."""

    def local(x1_c, x3_c):
        return local_matmul(x1_c, x2, bias, x3_c, transpose_x2=transpose_x2)

    return chunked_matmul_all_reduce(local, x1, x3, axis_name=axis_name, comm_turn=comm_turn)


def add_rms_norm(mm, residual, gamma, *, epsilon):
    """``y = mm + residual``; ``norm_out = y / sqrt(mean(y^2) + eps) * gamma``.

    y is rounded to the dtype first and the statistics are fp32 over the
    rounded y. For fp16/bf16, ``y * rstd`` is rounded to the dtype before the
    multiplication by gamma (docs/semantics.md: the AddRmsNorm single-N kernel).
    """
    dtype = residual.dtype
    yf = numerics.rounded_to(numerics.widened(mm) + numerics.widened(residual), dtype)
    y = yf.astype(dtype)
    n = residual.shape[-1]
    inv_n = np.float32(1.0 / n) if n else np.float32(0.0)  # n = 0: empty rows
    mean_square = jnp.sum(yf * yf * inv_n, axis=-1, keepdims=True)
    rstd = numerics.divide(np.float32(1.0), jnp.sqrt(mean_square + np.float32(epsilon)))
    t = numerics.rounded_to(yf * rstd, dtype)
    norm_out = (t * numerics.widened(gamma)).astype(dtype)
    return y, norm_out


def matmul_all_reduce_add_rms_norm(
    x1, x2, residual, gamma, bias, *, epsilon, transpose_x2, axis_name, comm_turn
):
    """Seed 002: ``mm = allReduce(x1 @ x2 + bias)``, then add + RMSNorm."""
    mm = matmul_all_reduce(
        x1, x2, bias, None, transpose_x2=transpose_x2, axis_name=axis_name, comm_turn=comm_turn
    )
    return add_rms_norm(mm.reshape(residual.shape), residual, gamma, epsilon=epsilon)


def _int8_sat_rne(x):
    """float -> int8, round half to even, saturating to [-128, 127]; NaN -> 0."""
    return jnp.where(jnp.isnan(x), 0, jnp.clip(jnp.round(x), -128, 127)).astype(jnp.int8)


def comm_quantize(c, scale_1):
    """Per column ``q = int8(fp16(f32(c) / f32(scale_1)))`` (c: the rank's
    result rounded to the output dtype, as float32 or that dtype): the quantization
    before the int8 all-to-all of the low-bit communication (docs/semantics.md
    §5.1; the fp16 kernel's half division is a correctly rounded fp32
    division rounded to fp16)."""
    quotient = numerics.divide(numerics.widened(c), numerics.widened(scale_1))
    return _int8_sat_rne(numerics.rounded_to(quotient, jnp.float16))


def local_int8_matmul(
    x1,
    x2,
    scale_f32,
    pertoken=None,
    bias=None,
    x3=None,
    *,
    transpose_x2,
    out_dtype,
    comm_scale=None,
):
    """One rank's dequantized int8 matmul, ``round(round(f32(x1 @ x2 + bias) *
    scale * pertoken) + x3)``: the int32 sum with the bias wraps, then one
    conversion to float32 and the products left to right in float32
    (docs/semantics.md §10.2).

    x1: int8 [m, k] or [b, s, k]; x2: int8 [k, n] ([n, k] if transpose_x2);
    scale_f32: float32 [1] or [n]; pertoken: float32 [m] (or the leading
    shape of x1); bias: int32 [n]; x3: the output shape in ``out_dtype``.
    With ``comm_scale`` ([n], ``out_dtype``) the rounded result is quantized
    for the int8 low-bit communication (:func:`comm_quantize`) and returned
    as int8.
    """
    dims = matmul_dims(x1, transpose_x2)
    acc = lax.dot_general(x1, x2, dims, preferred_element_type=jnp.int32)
    if bias is not None:
        acc = acc + bias
    y = acc.astype(_F32) * scale_f32
    if pertoken is not None:
        y = y * pertoken.reshape(*x1.shape[:-1], 1)
    y = numerics.x3_added(y, x3, out_dtype)
    if comm_scale is None:
        return y.astype(out_dtype)
    return comm_quantize(numerics.rounded_to(y, out_dtype), comm_scale)


def int8_comm_all_reduce(q, scale_1, scale_2, *, out_dtype, axis_name):
    """The low-bit communication chain of docs/semantics.md §5.1 on int8 q [m, n]:

    rows padded to a multiple of the R ranks and split into R chunks; an int8
    all-to-all (rank j gets chunk j of every rank, in rank order); the chunks
    summed in fp32 (exact); requantized with ``scale_1 / scale_2``; an int8
    all-gather; dequantized with ``scale_2`` into ``out_dtype``. The bytes on
    the wire are int8.
    """
    m, n = q.shape
    ranks = int(lax.axis_size(axis_name)) if axis_name else 1
    chunk = -(-m // ranks)
    padded = jnp.pad(q, ((0, chunk * ranks - m), (0, 0))).reshape(ranks, chunk, n)
    if axis_name:
        padded = _compat.varying_over(padded, axis_name)
        padded = lax.all_to_all(padded, axis_name, 0, 0, tiled=False)
    # Exact in any order (|sum| <= 128 * ranks); added chunk by chunk, one
    # elementwise fusion (XLA:CPU's reduction over the leading axis is slow).
    acc = padded[0].astype(_F32)
    for r in range(1, ranks):
        acc = acc + padded[r].astype(_F32)
    ratio = numerics.widened(scale_1) / numerics.widened(scale_2)
    q2 = _int8_sat_rne(numerics.rounded_to(acc * ratio, jnp.float16))
    gathered = lax.all_gather(q2, axis_name) if axis_name else q2[None]
    q2 = gathered.reshape(ranks * chunk, n)[:m]
    # int8 values are exact in float16 and float32 alike.
    return (q2.astype(_F32) * numerics.widened(scale_2)).astype(out_dtype)
