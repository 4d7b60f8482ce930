"""Loads the C++ extension and registers every XLA FFI target once at import.

Also holds the ``ffi`` implementation's local compute: thin ``jax.ffi.ffi_call``
wrappers, one per custom-call target. The collectives between them are XLA's
own (see ``jax_mc2.primitives``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_mc2.framework import _compat
from jax_mc2.framework.cpu import NATIVE_BF16_DOT, cpu_flags
from jax_mc2.implementations import xla

#: OpenBLAS's worker threads spin this long (2^n cycles, its smallest
#: setting) before they sleep, instead of its default 2^28: spinning threads
#: took the cores from the XLA work that followed an ffi kernel (measured in
#: docs/benchmarks.md). OpenBLAS's parallel jobs now run on jax_mc2's own
#: workers (ffi/workers.cc), so its threads only idle after start-up.
#: Read by OpenBLAS when it loads; a value the user set wins.
OPENBLAS_THREAD_TIMEOUT = "4"


def _preload_openblas() -> None:
    # The extension links libscipy_openblas.so; load it from the installed
    # scipy-openblas32 package so the dynamic linker finds it whatever the
    # extension's rpath says.
    import scipy_openblas32

    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)

    path = os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so")
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


_preload_openblas()

# The compiled extension, imported by name: it has no Python source, so a
# static ``from jax_mc2 import _mc2_ffi`` reads to import-linter as an import
# of the whole jax_mc2 package (every layer above this one).
_mc2_ffi = importlib.import_module("jax_mc2._mc2_ffi")

MATMUL = "mc2_matmul_ffi"
ADD_RMS_NORM = "mc2_add_rms_norm_ffi"
INT8_MATMUL = "mc2_int8_matmul_ffi"
GROUPED_MATMUL = "mc2_grouped_matmul_ffi"
GROUPED_MATMUL_WGRAD = "mc2_grouped_matmul_wgrad_ffi"
LOWP_MATMUL = "mc2_lowp_matmul_ffi"
CHECK_COUNTS = "mc2_check_counts_ffi"

#: Every target a lowering of this package uses.
TARGETS = (
    MATMUL,
    ADD_RMS_NORM,
    INT8_MATMUL,
    GROUPED_MATMUL,
    GROUPED_MATMUL_WGRAD,
    LOWP_MATMUL,
    CHECK_COUNTS,
)

#: The ``mode`` attribute of ``mc2_lowp_matmul_ffi`` for each quantization mode
#: of the low-precision rows, as the C++ module defines it (ffi/lowp_modes.h).
LOWP_MODES: dict[str, int] = dict(_mc2_ffi.lowp_modes())

REGISTERED: dict[str, object] = dict(_mc2_ffi.registrations())
for _name, _capsule in REGISTERED.items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


# --------------------------------------------------------------------------
# Which GEMM computes the products (docs/semantics.md §12)

BLAS, XLA_DOT = "blas", "xla"
#: The rule key of the fp8 / hifloat8 / MX rows (their values decoded to
#: float32 and multiplied on a float32 GEMM).
FLOAT8 = "float8"
#: ``JAX_MC2_GEMM``: ``auto`` (the default: the table below), ``blas``
#: (OpenBLAS sgemm inside the custom calls) or ``xla`` (XLA's own
#: dot_general emitted around them, where the operator has such a path).
GEMM_CHOICES = ("auto", BLAS, XLA_DOT)

#: Where XLA's dot_general beats OpenBLAS sgemm on converted operands from
#: some depth on, by measurement (docs/semantics.md §12): operand dtype ->
#: rules of (CPU features, any of which qualifies; the least per-rank k when
#: a program's ranks share the cores; the least k when its one rank runs
#: alone). With AVX2 XLA's int8 GEMM wins for a rank that has the cores to
#: itself, and for deep products (k >= 1024) when ranks share them.
XLA_GEMM_RULES: dict[str, tuple[tuple[frozenset[str], int, int], ...]] = {
    "int8": ((frozenset({"avx2"}), 1024, 0),),
}

#: No limit on a product's size.
UNLIMITED = 1 << 62

#: Where XLA's GEMM beats sgemm on products below a size, by measurement
#: (docs/semantics.md §12): operand class -> rules of (CPU features, any of
#: which qualifies; the per-rank product m * k * n below which XLA's GEMM is
#: used when a program's ranks share the cores; the same when its one rank
#: runs alone). XLA's GEMM is native for bfloat16 with AVX512-BF16 / AMX and
#: for int8 with VNNI / AMX, and led sgemm there, except on large products
#: (2^30 multiply-adds a rank and more) of ranks that share the cores. On
#: AVX-512 CPUs its GEMM led sgemm on small products: the fp8 / hifloat8 /
#: MX rows up to about 2^30 multiply-adds a rank (2^31 for a rank alone),
#: float16 for a rank alone up to about 2^28; sgemm led from there on.
#: Elsewhere, and for the perblock rows everywhere, sgemm measured faster.
XLA_GEMM_SMALL_RULES: dict[str, tuple[tuple[frozenset[str], int, int], ...]] = {
    "bfloat16": ((NATIVE_BF16_DOT, 1 << 30, UNLIMITED),),
    "int8": ((frozenset({"avx_vnni", "avx512_vnni", "amx_int8"}), 1 << 30, UNLIMITED),),
    "float16": ((frozenset({"avx512f"}), 0, 1 << 28),),
    FLOAT8: ((frozenset({"avx512f"}), 1 << 30, 1 << 31),),
}


def _rule_key(dtype) -> str:
    return dtype if isinstance(dtype, str) and dtype == FLOAT8 else np.dtype(dtype).name


def _gemm_choice() -> str:
    """``JAX_MC2_GEMM``, checked."""
    choice = os.environ.get("JAX_MC2_GEMM") or "auto"
    if choice not in GEMM_CHOICES:
        raise ValueError(f"JAX_MC2_GEMM must be one of {GEMM_CHOICES}, got {choice!r}")
    return choice


def _thresholds(table, dtype, parallelism: int) -> list[int]:
    """The thresholds of ``table``'s rules for ``dtype`` that this CPU's flags
    satisfy: each rule's shared-cores value, or with one rank its alone value."""
    flags = set(cpu_flags())
    index = 2 if parallelism <= 1 else 1
    return [rule[index] for rule in table.get(_rule_key(dtype), ()) if rule[0] & flags]


def xla_gemm_min_k(dtype, parallelism: int = 1) -> int | None:
    """The least per-rank contraction depth k from which the ``ffi``
    implementation multiplies operands of ``dtype`` on XLA's GEMM (0: at
    every k; None: never, OpenBLAS sgemm) in a program whose ``parallelism``
    ranks run at once on this process's cores, read now: ``JAX_MC2_GEMM``,
    or with ``auto`` the :data:`XLA_GEMM_RULES` this CPU's flags satisfy."""
    choice = _gemm_choice()
    if choice != "auto":
        return 0 if choice == XLA_DOT else None
    return min(_thresholds(XLA_GEMM_RULES, dtype, parallelism), default=None)


def xla_gemm_max_product(dtype, parallelism: int = 1) -> int:
    """The per-rank product m * k * n below which the ``ffi`` implementation
    multiplies operands of ``dtype`` on XLA's GEMM whatever their k (0:
    none) in a program of ``parallelism`` concurrent ranks: with ``auto``
    the :data:`XLA_GEMM_SMALL_RULES` this CPU's flags satisfy."""
    if _gemm_choice() != "auto":
        return 0
    return max(_thresholds(XLA_GEMM_SMALL_RULES, dtype, parallelism), default=0)


def gemm_engine(dtype, k: int = 0, parallelism: int = 1, product: int | None = None) -> str:
    """``"xla"`` or ``"blas"``: the GEMM the ``ffi`` implementation uses for
    operands of ``dtype`` with a per-rank contraction depth ``k`` (and
    ``product``, the per-rank m * k * n, where the caller knows it) in a
    program of ``parallelism`` concurrent ranks, read when a call is lowered
    (:func:`xla_gemm_min_k`, :func:`xla_gemm_max_product`). The results do
    not depend on it beyond the order of the fp32 accumulation: int8
    products are exact either way."""
    min_k = xla_gemm_min_k(dtype, parallelism)
    if min_k is not None and k >= min_k:
        return XLA_DOT
    if product is not None and product < xla_gemm_max_product(dtype, parallelism):
        return XLA_DOT
    return BLAS


def on_xla_gemm(x1, x2, transpose_x2: bool, parallelism: int) -> bool:
    """Whether :func:`matmul` multiplies x1 and x2 on XLA's GEMM."""
    product = product_size(x1, x2, transpose_x2)
    return gemm_engine(x1.dtype, x1.shape[-1], parallelism, product) == XLA_DOT


def product_size(x1, x2, transpose_x2: bool) -> int:
    """m * k * n of ``x1 @ x2`` (x1 [..., k]; x2 [k, n], or [n, k] transposed)."""
    n = x2.shape[0] if transpose_x2 else x2.shape[1]
    return math.prod(x1.shape) * n


#: The least per-rank element count from which a bfloat16 all-reduce runs as
#: a float32 reduce-scatter + bfloat16 all-gather (:func:`all_reduce`); read
#: when a call is traced. Measured on 8 CPU devices: 0.90-0.94x ``lax.psum``'s
#: speed at 2^20 elements, 0.93x at 2^21, 1.24x at 3 * 2^20, 1.54x at 2^22.
SPLIT_ALL_REDUCE_MIN_ELEMENTS = (1 << 21) + 1

#: The least per-rank element count from which a float16 all-reduce runs as an
#: all-to-all, the rank-ordered float16 sum of each rank's slice and an
#: all-gather (:func:`all_reduce`); read when a call is traced. Measured
#: against ``lax.psum`` on 2 and 8 CPU devices: 0.83-0.93x at 2^12 elements,
#: 1.06-1.07x at 2^14, 1.19-1.27x at 2^15, 2.4-3.0x at 2^20.
FLOAT16_SPLIT_MIN_ELEMENTS = 1 << 15


def widened_for_all_reduce(dtype, axis_name) -> bool:
    """Whether a one-rank result in ``dtype`` headed for :func:`all_reduce`
    over ``axis_name`` is better written as float32 holding the rounded
    bfloat16 values (the custom calls' ``bf16_as_f32``): bfloat16 over two
    ranks or more, whose all-reduce XLA:CPU sums in float32 from a float32
    copy of its operand, a pass over the array that a float32 result does not
    need (docs/semantics.md §10.5)."""
    return (
        bool(axis_name)
        and np.dtype(dtype) == np.dtype(jnp.bfloat16)
        and int(lax.axis_size(axis_name)) > 1
    )


def all_reduce(x, axis_name, dtype=None):
    """The ``ffi`` implementation's all-reduce over ``axis_name`` (CPU) of a
    result in ``dtype`` (default: x's): the same values as ``lax.psum`` in
    that dtype, bit for bit (docs/semantics.md §10.5). x is in ``dtype``, or
    for bfloat16 float32 holding bfloat16 values (:func:`widened_for_all_reduce`).
    XLA:CPU sums a bfloat16 all-reduce in float32 in rank order and rounds
    once, and a float16 one in float16, rank by rank, in one loop over the
    elements. Large arrays whose size the ranks divide take the same sums in
    a faster shape: bfloat16 (from :data:`SPLIT_ALL_REDUCE_MIN_ELEMENTS`) as
    a float32 reduce-scatter and a bfloat16 all-gather, float16 (from
    :data:`FLOAT16_SPLIT_MIN_ELEMENTS`) as :func:`_float16_all_reduce`.
    Other dtypes and sizes take ``lax.psum`` itself."""
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    widened = np.dtype(x.dtype) != dtype
    if widened and (dtype != np.dtype(jnp.bfloat16) or np.dtype(x.dtype) != np.dtype(jnp.float32)):
        raise TypeError(f"all_reduce: a {dtype} result held as {x.dtype}")
    if not axis_name:
        return x.astype(dtype) if widened else x
    x = _compat.varying_over(x, axis_name)
    ranks = int(lax.axis_size(axis_name))
    if ranks == 1 or x.size % ranks:
        return lax.psum(x, axis_name).astype(dtype)
    if dtype == np.dtype(jnp.float16) and x.size >= FLOAT16_SPLIT_MIN_ELEMENTS:
        return _float16_all_reduce(x, axis_name, ranks)
    if dtype != np.dtype(jnp.bfloat16) or x.size < SPLIT_ALL_REDUCE_MIN_ELEMENTS:
        return lax.psum(x, axis_name).astype(dtype)
    wide = x.reshape(ranks, -1).astype(jnp.float32)
    part = lax.psum_scatter(wide, axis_name, scatter_dimension=0).astype(dtype)
    # The all-gather carries the bfloat16 bits as uint16: XLA:CPU would move
    # a float conversion past it and gather float32, twice the bytes (the
    # uint16 gather measured 1.1-1.2x the float32 one at 2^20 and 2^22
    # elements a rank on 8 devices).
    bits = lax.all_gather(lax.bitcast_convert_type(part, jnp.uint16), axis_name)
    return lax.bitcast_convert_type(bits, dtype).reshape(x.shape)


def _float16_all_reduce(x, axis_name, ranks: int):
    """``lax.psum``'s float16 sum, computed slice by slice: an all-to-all
    hands rank i the i-th slice of every rank's x, rank i adds them in rank
    order in float16 (XLA's fused adds, vectorized, where XLA:CPU's
    all-reduce loops over elements), and an all-gather returns the slices.
    Two details of psum's result are matched at the end: its sum starts from
    +0, so a sum of zeros is never -0; and it writes every NaN as the
    canonical quiet NaN 0x7E00 with the NaN's sign, dropping payloads."""
    slices = lax.all_to_all(x.reshape(ranks, -1), axis_name, 0, 0, tiled=False)
    total = slices[0]
    for j in range(1, ranks):
        total = total + slices[j]
    total = jnp.where(total == 0, jnp.zeros_like(total), total)
    sign = lax.bitcast_convert_type(total, jnp.uint16) & jnp.uint16(0x8000)
    canonical_nan = lax.bitcast_convert_type(sign | jnp.uint16(0x7E00), jnp.float16)
    total = jnp.where(jnp.isnan(total), canonical_nan, total)
    return lax.all_gather(total, axis_name).reshape(x.shape)


def reducer(axis_name, dtype=None):
    """:func:`all_reduce` over ``axis_name`` of a result in ``dtype``, as a
    function of the array."""
    return functools.partial(all_reduce, axis_name=axis_name, dtype=dtype)


def _custom_call(target: str, out, *operands, aliases=None, **attributes):
    """``jax.ffi.ffi_call`` of ``target`` on ``operands``, with each attribute
    in the type its C++ handler binds: bools (Python or NumPy) as bool, other
    integers as int64, floats as float32, strings as they are. ``aliases``:
    ``{operand index: result index}`` buffers shared in place."""
    typed = {}
    for name, value in attributes.items():
        if isinstance(value, (bool, np.bool_)):
            typed[name] = bool(value)
        elif isinstance(value, (int, np.integer)):
            typed[name] = np.int64(value)
        elif isinstance(value, (float, np.floating)):
            typed[name] = np.float32(value)
        elif isinstance(value, str):
            typed[name] = value
        else:
            raise TypeError(f"{target}: attribute {name} has unsupported type {type(value)}")
    return jax.ffi.ffi_call(target, out, input_output_aliases=aliases)(*operands, **typed)


def matmul(
    x1,
    x2,
    bias=None,
    x3=None,
    *,
    transpose_x2: bool,
    parallelism: int,
    antiquant_scale=None,
    antiquant_offset=None,
    antiquant_group_size: int = 0,
    bf16_as_f32: bool = False,
):
    """``round(x1 @ w + bias + x3)`` on one rank (custom call ``mc2_matmul_ffi``;
    without antiquant and where :func:`gemm_engine` picks XLA's GEMM, XLA's
    ``dot_general`` with fp32 accumulation and the epilogue in lax ops).
    With ``bf16_as_f32`` (bfloat16 x1) the bfloat16 result is returned as
    float32 (:func:`widened_for_all_reduce`).

    x1: [m, k] or [b, s, k]; x2: [k, n] ([n, k] if transpose_x2); bias: [n];
    x3: the output shape. w is x2, or with ``antiquant_scale`` the int8 x2
    dequantized as ``(x2 + antiquant_offset) * antiquant_scale`` (scale and
    offset [1], [n] or [ceil(k / antiquant_group_size), n]).
    """
    if antiquant_scale is None and on_xla_gemm(x1, x2, transpose_x2, parallelism):
        # The same fp32 accumulation and single rounding, on XLA's GEMM; the
        # epilogue (bias, x3, rounding) fuses into XLA's output pass.
        y = xla.local_matmul(x1, x2, bias, x3, transpose_x2=transpose_x2)
        return y.astype(jnp.float32) if bf16_as_f32 else y
    n = x2.shape[0] if transpose_x2 else x2.shape[1]
    out = jax.ShapeDtypeStruct((*x1.shape[:-1], n), jnp.float32 if bf16_as_f32 else x1.dtype)
    operands = [x1, x2]
    operands += [a for a in (antiquant_scale, antiquant_offset, bias, x3) if a is not None]
    return _custom_call(
        MATMUL,
        out,
        *operands,
        transpose_x2=transpose_x2,
        has_bias=bias is not None,
        has_x3=x3 is not None,
        antiquant=antiquant_scale is not None,
        has_offset=antiquant_offset is not None,
        antiquant_group_size=antiquant_group_size,
        bf16_as_f32=bf16_as_f32,
        parallelism=parallelism,
    )


def matmul_all_reduce(
    x1, x2, bias, x3, *, transpose_x2, axis_name, comm_turn, parallelism, **antiquant
):
    """``allReduce(x1 @ w + bias + x3)`` with :func:`matmul` on each rank and
    :func:`all_reduce` (the ``ffi`` counterpart of ``xla.matmul_all_reduce``),
    in ``comm_turn`` row chunks. Shapes as in :func:`matmul`; ``antiquant``:
    its ``antiquant_scale`` / ``antiquant_offset`` / ``antiquant_group_size``."""
    wide = widened_for_all_reduce(x1.dtype, axis_name)

    def local(x1_c, x3_c):
        return matmul(
            x1_c,
            x2,
            bias,
            x3_c,
            transpose_x2=transpose_x2,
            parallelism=parallelism,
            bf16_as_f32=wide,
            **antiquant,
        )

    return xla.chunked_matmul_all_reduce(
        local,
        x1,
        x3,
        axis_name=axis_name,
        comm_turn=comm_turn,
        reduce=reducer(axis_name, x1.dtype),
    )


def add_rms_norm(mm, residual, gamma, *, epsilon: float, alias_residual: bool, parallelism: int):
    """``(y, norm_out)`` of add + RMSNorm (custom call ``mc2_add_rms_norm_ffi``).

    mm: residual's shape (or element count), in its dtype or float32 (one
    rank's unrounded accumulator, which the kernel rounds to the dtype as it
    reads it). With ``alias_residual``, ``y`` is written into ``residual``'s buffer.
    ``parallelism``: the programs XLA runs at once, which share the cores.
    """
    out = jax.ShapeDtypeStruct(residual.shape, residual.dtype)
    return _custom_call(
        ADD_RMS_NORM,
        (out, out),
        mm.reshape(residual.shape),
        residual,
        gamma,
        aliases={1: 0} if alias_residual else None,
        epsilon=float(epsilon),
        parallelism=parallelism,
    )


def int8_matmul(
    x1,
    x2,
    scale,
    pertoken=None,
    bias=None,
    x3=None,
    *,
    out_dtype,
    transpose_x2,
    parallelism,
    comm_scale=None,
    bf16_as_f32: bool = False,
):
    """``round(round(f32(x1 @ x2 + bias) * scale * pertoken) + x3)`` on one rank
    (custom call ``mc2_int8_matmul_ffi``; where :func:`gemm_engine` picks
    XLA's int8 GEMM, :func:`jax_mc2.implementations.xla.local_int8_matmul`:
    the same exact int32 accumulator and the same epilogue in lax ops).

    x1: int8 [m, k] or [b, s, k]; x2: int8 [k, n] ([n, k] if transpose_x2);
    scale: float32 [1] or [n]; pertoken: float32 [m]; bias: int32 [n];
    x3: the output shape in ``out_dtype``. With ``comm_scale`` ([n],
    ``out_dtype``) the result is quantized for the int8 low-bit
    communication, ``int8(fp16(out / comm_scale))``, and returned as int8.
    Without it, ``bf16_as_f32`` returns a bfloat16 result as float32
    (:func:`widened_for_all_reduce`).
    """
    product = product_size(x1, x2, transpose_x2)
    if gemm_engine(jnp.int8, x1.shape[-1], parallelism, product) == XLA_DOT:
        # The epilogue fuses into XLA's output pass, which a custom call after
        # XLA's dot ran slower than (docs/semantics.md §12).
        y = xla.local_int8_matmul(
            x1,
            x2,
            scale,
            pertoken,
            bias,
            x3,
            transpose_x2=transpose_x2,
            out_dtype=out_dtype,
            comm_scale=comm_scale,
        )
        return y.astype(jnp.float32) if bf16_as_f32 else y
    n = x2.shape[0] if transpose_x2 else x2.shape[1]
    dtype = jnp.int8 if comm_scale is not None else jnp.float32 if bf16_as_f32 else out_dtype
    out = jax.ShapeDtypeStruct((*x1.shape[:-1], n), dtype)
    optional = [a for a in (pertoken, bias, x3, comm_scale) if a is not None]
    flags = dict(
        has_pertoken=pertoken is not None,
        has_bias=bias is not None,
        has_x3=x3 is not None,
        has_comm_scale=comm_scale is not None,
    )
    return _custom_call(
        INT8_MATMUL,
        out,
        x1,
        x2,
        scale,
        *optional,
        transpose_x2=transpose_x2,
        **flags,
        bf16_as_f32=bf16_as_f32,
        parallelism=parallelism,
    )


def grouped_matmul(
    x,
    w,
    group_offsets,
    src_index,
    dst_index,
    *,
    out_rows: int,
    transpose_w: bool,
    permute_out: bool,
    parallelism: int,
):
    """Grouped matmul with a row gather and scatter (custom call ``mc2_grouped_matmul_ffi``).

    x: [r_in, k]; w: [g, k, n] ([g, n, k] if transpose_w), x's dtype;
    group_offsets: int32 [g + 1], non-decreasing in [0, v]; src_index,
    dst_index: int32 [v]. Virtual row i in ``[group_offsets[j],
    group_offsets[j + 1])`` computes ``y[dst_index[i]] = round(x[src_index[i]]
    @ w[j])`` in fp32 with one rounding; src -1 reads a zero row, dst -1
    discards the row, and y rows nobody writes are zero. Returns y [out_rows,
    n], or ``(y, permute_out)`` with permute_out [v, k] = ``x[src_index]``
    (zero rows for src -1) when ``permute_out``.
    """
    n = w.shape[1] if transpose_w else w.shape[2]
    y = jax.ShapeDtypeStruct((out_rows, n), x.dtype)
    out_types = (y, jax.ShapeDtypeStruct((src_index.shape[0], x.shape[1]), x.dtype))
    i32 = jnp.int32  # int64 under jax_enable_x64 otherwise
    return _custom_call(
        GROUPED_MATMUL,
        out_types if permute_out else y,
        x,
        w,
        group_offsets.astype(i32),
        src_index.astype(i32),
        dst_index.astype(i32),
        transpose_w=transpose_w,
        has_permute_out=permute_out,
        parallelism=parallelism,
    )


def grouped_matmul_wgrad(x, dy, group_offsets, *, transpose_w: bool, parallelism: int):
    """The weight gradient of a grouped matmul (custom call
    ``mc2_grouped_matmul_wgrad_ffi``): ``dw[g] = x_g^T @ dy_g`` over the rows
    [group_offsets[g], group_offsets[g + 1]), one rounding to x's dtype.

    x: [rows, k]; dy: [rows, n]; group_offsets: int32 [g + 1]. Returns
    [g, k, n], or [g, n, k] with ``transpose_w``.
    """
    groups, k, n = group_offsets.shape[0] - 1, x.shape[1], dy.shape[1]
    shape = (groups, n, k) if transpose_w else (groups, k, n)
    return _custom_call(
        GROUPED_MATMUL_WGRAD,
        jax.ShapeDtypeStruct(shape, x.dtype),
        x,
        dy,
        group_offsets.astype(jnp.int32),
        transpose_w=transpose_w,
        parallelism=parallelism,
    )


def lowp_matmul(
    x1,
    x2,
    x2_scale,
    x1_scale=None,
    bias=None,
    x3=None,
    *,
    mode: int,
    transpose_x2: bool,
    out_dtype,
    comm: bool,
    block_k: int,
    parallelism: int,
    bf16_as_f32: bool = False,
):
    """One rank's fp8 / hifloat8 / MX matmul + dequant (custom call
    ``mc2_lowp_matmul_ffi``; see ffi/lowp_matmul.cc for the modes).

    x1: [m, k] or [b, s, k] float8_e4m3fn, float8_e5m2 or uint8 HiFloat8
    codes; x2: [k, n] ([n, k] if transpose_x2) of the same
    dtype. ``mode`` 0: x2_scale float32 [1] or [n], x1_scale float32 [m];
    1 (perblock): x2_scale float32 [kb, n], x1_scale float32 [m, kb] per
    ``block_k`` rows of k; 2 (MX): float8_e8m0fnu [n, kb32] and [m, kb32].
    bias: float32 [n]; x3: [m, n] of a float dtype. With ``comm`` the result
    is the fp8 pertile communication wire, float8_e4m3fn [m, n + 4 * ceil(n / 128)];
    without, ``bf16_as_f32`` returns a bfloat16 result as float32
    (:func:`widened_for_all_reduce`).
    """
    n = x2.shape[0] if transpose_x2 else x2.shape[1]
    width = n + 4 * (-(-n // 128)) if comm else n
    dtype = jnp.float8_e4m3fn if comm else jnp.float32 if bf16_as_f32 else out_dtype
    out = jax.ShapeDtypeStruct((*x1.shape[:-1], width), dtype)
    operands = [x1, x2, x2_scale] + [a for a in (x1_scale, bias, x3) if a is not None]
    return _custom_call(
        LOWP_MATMUL,
        out,
        *operands,
        mode=mode,
        transpose_x2=transpose_x2,
        has_x1_scale=x1_scale is not None,
        has_bias=bias is not None,
        has_x3=x3 is not None,
        comm=comm,
        block_k=block_k,
        bf16_as_f32=bf16_as_f32,
        parallelism=parallelism,
    )


def check_counts(
    given, derived, total, used, *, op: str, check_recv: bool, rows: int, per_rank: int
):
    """The run-time check of traced AlltoAllv counts (custom call
    ``mc2_check_counts_ffi``, docs/semantics.md §6.6): returns ``used``
    (int32, unchanged), or fails the computation with an invalid-argument
    error naming the argument when ``check_recv`` and the given recv_counts
    differ from ``derived`` (what the peers send), or when ``total`` (the
    rows the send counts lay out) exceeds ``rows`` (>= 0)."""
    out = jax.ShapeDtypeStruct(used.shape, jnp.int32)
    return _custom_call(
        CHECK_COUNTS,
        out,
        given.astype(jnp.int32),
        derived.astype(jnp.int32),
        jnp.reshape(total, (-1,)).astype(jnp.int32),
        used.astype(jnp.int32),
        op=op,
        check_recv=check_recv,
        rows=rows,
        per_rank=per_rank,
    )
