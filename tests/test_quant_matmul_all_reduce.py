"""quant_matmul_all_reduce (seed 000) against a NumPy model of
``allReduce(dequantScale * (x1 @ x2 + bias) + x3)``, both implementations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from conftest import IMPLEMENTATIONS, make_mesh
from hlo import reductions
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2
from jax_mc2 import quant
from jax_mc2.implementations import ffi as _ffi


def _oracle_rank(x1, x2, scale_f32, bias, x3, *, transpose_x2, out_dtype):
    """One rank, from the seed formula: exact integer matmul + int32 bias,
    float32 dequant rounded to the output dtype, then + x3 rounded again."""
    w = x2.T if transpose_x2 else x2
    acc = x1.astype(np.int64) @ w.astype(np.int64)
    if bias is not None:
        acc = acc + bias
    y = (acc.astype(np.float32) * scale_f32.reshape(-1)).astype(out_dtype)
    if x3 is not None:
        y = (y.astype(np.float32) + x3.astype(np.float32)).astype(out_dtype)
    return y


def _applied_scale(scale, kind):
    """The float32 scale the hardware applies (§1.3), computed from the raw
    fp32 values: the fp19 truncation for packed words, bf16 as is."""
    if kind == "bf16":
        return scale.astype(oracle.BF16).astype(np.float32)
    return (scale.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _make_scale(scale, kind):
    if kind == "bf16":
        return scale.astype(oracle.BF16)
    if kind == "int64":  # NumPy words, as torch_npu's npu_trans_quant_param returns
        words = [(int(v) & 0xFFFFE000) | (1 << 46) for v in scale.view(np.uint32).ravel()]
        return np.array(words, np.uint64).view(np.int64).reshape(scale.shape)
    return quant.trans_quant_param(scale)  # uint32 (low, high) pairs (x64 off)


def _case(rng, m, k, n, *, transpose_x2, scale_shape, kind):
    x1 = rng.integers(-128, 128, (m, k), dtype=np.int8)
    x2 = rng.integers(-128, 128, (n, k) if transpose_x2 else (k, n), dtype=np.int8)
    scale = (rng.random(scale_shape) * 2e-4 + 1e-5).astype(np.float32)
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    out_dtype = oracle.BF16 if kind == "bf16" else np.dtype(np.float16)
    x3 = rng.standard_normal((m, n)).astype(out_dtype)
    return x1, x2, scale, bias, x3, out_dtype


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["pairs", "int64", "bf16"])
@pytest.mark.parametrize("scale_shape", [(1,), "n", "1n"], ids=["pertensor", "n", "1n"])
@pytest.mark.parametrize("transpose_x2", [False, True])
def test_single_device_bit_exact(impl, kind, scale_shape, transpose_x2):
    rng = np.random.default_rng(0)
    m, k, n = 24, 1500, 40  # k > 1024: the ffi kernel's int32 k-chunks are exercised
    shape = {"n": (n,), "1n": (1, n)}.get(scale_shape, scale_shape)
    x1, x2, scale, bias, x3, out_dtype = _case(
        rng, m, k, n, transpose_x2=transpose_x2, scale_shape=shape, kind=kind
    )
    applied = _applied_scale(scale, kind)
    for b, c in [(None, None), (bias, None), (bias, x3)]:
        got = mc2.quant_matmul_all_reduce(
            x1,
            x2,
            None,
            dequant_scale=_make_scale(scale, kind),
            bias=b,
            x3=c,
            transpose_x2=transpose_x2,
            implementation=impl,
        )
        want = _oracle_rank(x1, x2, applied, b, c, transpose_x2=transpose_x2, out_dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == (m, n)
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))


def test_packed_scales_with_x64():
    rng = np.random.default_rng(1)
    x1, x2, scale, bias, _, _ = _case(
        rng, 8, 64, 16, transpose_x2=False, scale_shape=(16,), kind="pairs"
    )
    want = _oracle_rank(
        x1, x2, _applied_scale(scale, "pairs"), bias, None, transpose_x2=False, out_dtype=np.float16
    )
    with jax.enable_x64(True):
        packed = quant.trans_quant_param(scale)
        assert packed.dtype == jnp.int64
        for impl in IMPLEMENTATIONS:
            got = mc2.quant_matmul_all_reduce(
                x1, x2, None, dequant_scale=packed, bias=bias, implementation=impl
            )
            np.testing.assert_array_equal(np.asarray(got), want)
            got = mc2.quant_matmul_all_reduce(
                x1,
                x2,
                None,
                dequant_scale=packed.astype(jnp.uint64),
                bias=bias,
                implementation=impl,
            )
            np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["pairs", "bf16"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_sharded_values(impl, kind, world):
    rng = np.random.default_rng(world)
    k_local = 48
    x1, x2, scale, bias, x3, out_dtype = _case(
        rng, 16, k_local * world, 24, transpose_x2=False, scale_shape=(24,), kind=kind
    )
    x1 = x1.reshape(2, 8, -1)
    x3 = x3.reshape(2, 8, -1)
    mesh = make_mesh((world,), ("tp",))
    f = jax.jit(
        jax.shard_map(
            lambda a, b, s, c, d: mc2.quant_matmul_all_reduce(
                a, b, "tp", dequant_scale=s, bias=c, x3=d, implementation=impl
            ),
            mesh=mesh,
            in_specs=(P(None, None, "tp"), P("tp", None), P(), P(), P()),
            out_specs=P(),
        )
    )
    got = f(x1, x2, _make_scale(scale, kind), bias, x3)
    applied = _applied_scale(scale, kind)
    want = sum(
        _oracle_rank(
            x1[..., r * k_local : (r + 1) * k_local],
            x2[r * k_local : (r + 1) * k_local],
            applied,
            bias,
            x3,
            transpose_x2=False,
            out_dtype=out_dtype,
        ).astype(np.float64)
        for r in range(world)
    )
    tol = oracle.tolerance(out_dtype, world, scale=np.abs(want).max() + 1)
    np.testing.assert_allclose(np.asarray(got).astype(np.float64), want, atol=tol)
    text = f.lower(x1, x2, _make_scale(scale, kind), bias, x3).as_text()
    if impl == "ascend":  # one custom call runs the whole MC2 operator
        assert text.count("mc2_ascend_host_bridge") == 1
        assert "stablehlo.all_reduce" not in text
        return
    assert reductions(text) == 1
    if impl != "ffi":
        assert "mc2_int8" not in text
        return
    # The int8 GEMM follows the CPU and the ranks sharing the cores (semantics §12).
    product = int(np.prod(x1.shape[:-1])) * k_local * x2.shape[1]
    if _ffi.gemm_engine(jnp.int8, k_local, world, product) == _ffi.XLA_DOT:
        # XLA's int8 GEMM, the epilogue in lax ops
        assert "custom_call" not in text and "stablehlo.dot_general" in text
    else:
        assert text.count("custom_call @mc2_int8_matmul_ffi") == 1


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_comm_turn_vmap_eval_shape_and_vma(impl):
    rng = np.random.default_rng(3)
    x1, x2, scale, bias, x3, _ = _case(
        rng, 12, 64, 8, transpose_x2=False, scale_shape=(1,), kind="pairs"
    )
    packed = quant.trans_quant_param(scale)
    mesh = make_mesh((2, 2), ("dp", "tp"))
    seen = {}

    def f(a, b, s, turn):
        out = mc2.quant_matmul_all_reduce(
            a, b, "tp", dequant_scale=s, comm_turn=turn, implementation=impl
        )
        seen["out"] = jax.typeof(out)
        return out

    outs = [
        jax.jit(
            jax.shard_map(
                functools.partial(f, turn=t),
                mesh=mesh,
                in_specs=(P("dp", "tp"), P("tp", None), P()),
                out_specs=P("dp"),
            )
        )(x1, x2, packed)
        for t in (0, 3)
    ]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    assert str(seen["out"]) == "float16[6,8]{V:dp}"
    # vmap over a leading batch of x1 folds into rows.
    xs = np.stack([x1, x1[::-1]])
    got = jax.vmap(
        lambda a: mc2.quant_matmul_all_reduce(
            a, x2, None, dequant_scale=packed, implementation=impl
        )
    )(xs)
    one = mc2.quant_matmul_all_reduce(x1[::-1], x2, None, dequant_scale=packed, implementation=impl)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(one))
    out = jax.eval_shape(
        lambda a, b, s: mc2.quant_matmul_all_reduce(a, b, None, dequant_scale=s),
        jax.ShapeDtypeStruct((2, 128, 512), jnp.int8),
        jax.ShapeDtypeStruct((512, 64), jnp.int8),
        jax.ShapeDtypeStruct((64,), jnp.bfloat16),
    )
    assert out.shape == (2, 128, 64) and out.dtype == jnp.bfloat16


def test_not_differentiable():
    x3 = np.ones((2, 4), np.float16)
    with pytest.raises(
        NotImplementedError,
        match="quant_matmul_all_reduce: the int8 quantized mode is not differentiable",
    ):
        jax.grad(
            lambda c: jnp.sum(
                mc2.quant_matmul_all_reduce(
                    np.ones((2, 8), np.int8),
                    np.ones((8, 4), np.int8),
                    None,
                    dequant_scale=jnp.ones((4,), jnp.bfloat16),
                    x3=c.astype(jnp.bfloat16),
                ).astype(jnp.float32)
            )
        )(x3.astype(np.float32))


S = jax.ShapeDtypeStruct
I8 = jnp.int8
F16 = jnp.float16


def _shape(x1, x2, scale, **kw):
    arrays = {k: a for k, a in kw.items() if isinstance(a, S)}
    static = {k: a for k, a in kw.items() if k not in arrays}
    return jax.eval_shape(
        lambda a, b, s, arr: mc2.quant_matmul_all_reduce(
            a, b, None, dequant_scale=s, **arr, **static
        ),
        x1,
        x2,
        scale,
        arrays,
    )


INVALID = [
    (
        S((4, 8), jnp.float16),
        S((8, 4), I8),
        S((4,), jnp.bfloat16),
        {},
        TypeError,
        "quant_matmul_all_reduce: x1 dtype must be int8, got float16",
    ),
    (
        S((4, 8), I8),
        S((8, 4), jnp.int32),
        S((4,), jnp.bfloat16),
        {},
        TypeError,
        "x2 dtype must be int8, got int32",
    ),
    (
        S((4, 8), I8),
        S((6, 4), I8),
        S((4,), jnp.bfloat16),
        {},
        TypeError,
        r"x2 must be 2-D \(k, n\) with k == x1.shape\[-1\] == 8, got \(6, 4\)",
    ),
    (
        S((4, 8), I8),
        S((8, 4), I8),
        S((4,), jnp.float32),
        {},
        TypeError,
        "dequant_scale dtype must be int64/uint64 packed scales .* got float32",
    ),
    (
        S((4, 8), I8),
        S((8, 4), I8),
        S((3,), jnp.bfloat16),
        {},
        TypeError,
        r"dequant_scale must be pertensor \(1,\) or perchannel \(n,\) / \(1, n\) with n = 4, "
        r"got \(3,\)",
    ),
    (
        S((4, 8), I8),
        S((8, 4), I8),
        S((2, 4, 2), jnp.uint32),
        {},
        TypeError,
        r"got \(2, 4\) \(uint32 pairs\)",
    ),
    (
        S((4, 8), I8),
        S((8, 4), I8),
        S((4,), jnp.bfloat16),
        {"bias": S((4,), jnp.float16)},
        TypeError,
        "bias dtype must be int32, got float16",
    ),
    (
        S((4, 8), I8),
        S((8, 4), I8),
        S((4,), jnp.bfloat16),
        {"bias": S((5,), jnp.int32)},
        TypeError,
        r"bias must be 1-D \(n,\) = \(4,\), got \(5,\)",
    ),
    (
        S((4, 8), I8),
        S((8, 4), I8),
        S((4,), jnp.bfloat16),
        {"x3": S((4, 4), jnp.float16)},
        TypeError,
        "x3 dtype must equal the output dtype bfloat16 .set by dequant_scale., got float16",
    ),
    (
        S((4, 8), I8),
        S((8, 4), I8),
        S((1, 2), jnp.uint32),
        {"x3": S((4, 5), jnp.float16)},
        TypeError,
        r"x3 must be the output shape = \(4, 4\), got \(4, 5\)",
    ),
    (
        S((4, 8), I8),
        S((8, 4), I8),
        S((4,), jnp.bfloat16),
        {"reduce_op": "max"},
        ValueError,
        "reduce_op must be 'sum'",
    ),
    (
        S((4, 8), I8),
        S((8, 4), I8),
        None,
        {},
        TypeError,
        r"quant_matmul_all_reduce: dequant_scale is required for int8 x1 and x2",
    ),
]


@pytest.mark.parametrize("x1,x2,scale,kw,exc,msg", INVALID)
def test_invalid(x1, x2, scale, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        _shape(x1, x2, scale, **kw)


def test_chip_targets():
    args = (S((4, 8), I8), S((8, 4), I8), S((4,), jnp.bfloat16))
    with mc2.target("atlas-a2"):
        assert _shape(*args).dtype == jnp.bfloat16
        with pytest.raises(
            NotImplementedError, match=r"x1.shape\[-1\] = 65536 exceeds 65535 on target 'atlas-a2'"
        ):
            _shape(S((2, 65536), I8), S((65536, 4), I8), S((4,), jnp.bfloat16))
        with pytest.raises(
            NotImplementedError, match=r"x2.shape\[-1\] = 70000 exceeds 65535 on target 'atlas-a2'"
        ):
            _shape(S((2, 8), I8), S((8, 70000), I8), S((1,), jnp.bfloat16))
        with pytest.raises(NotImplementedError, match="x1 and x2 must not be empty"):
            _shape(S((0, 8), I8), S((8, 4), I8), S((4,), jnp.bfloat16))
    # The generic target only applies the math: large k is fine.
    assert _shape(S((2, 65536), I8), S((65536, 4), I8), S((4,), jnp.bfloat16)).shape == (2, 4)
    for name in ("atlas-a3", "ascend-950"):
        with (
            mc2.target(name),
            pytest.raises(
                NotImplementedError,
                match=f"quant_matmul_all_reduce: not available on target '{name}'",
            ),
        ):
            _shape(*args)


# --------------------------------------------------------------------------
# mm_all_reduce_base, full quantization (seed 004 table 3)

TABLE3 = [
    # (dequant kind, pertoken, output dtype)
    ("pairs", False, np.dtype(np.float16)),
    ("bf16", False, oracle.BF16),
    ("f32", True, np.dtype(np.float16)),
    ("bf16", True, oracle.BF16),
]


def _table3_case(rng, m, k, n, kind, with_pertoken, out_dtype):
    """x1, x2, the dequant scale (as passed and as applied), pertoken, bias
    and x3 of one seed 004 table 3 row."""
    x1 = rng.integers(-128, 128, (m, k), dtype=np.int8)
    x2 = rng.integers(-128, 128, (k, n), dtype=np.int8)
    raw = (rng.random(n) * 2e-4 + 1e-5).astype(np.float32)
    scale = raw if kind == "f32" else _make_scale(raw, kind)
    applied = raw if kind == "f32" else _applied_scale(raw, kind)
    token = (rng.random(m) * 2 + 0.5).astype(np.float32) if with_pertoken else None
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    x3 = rng.standard_normal((m, n)).astype(out_dtype)
    return x1, x2, scale, applied, token, bias, x3


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind,with_pertoken,out_dtype", TABLE3)
@pytest.mark.parametrize("x1_3d", [False, True])
def test_mm_all_reduce_base_full_quant(impl, kind, with_pertoken, out_dtype, x1_3d):
    rng = np.random.default_rng(7)
    m, k, n = 12, 1100, 24
    x1, x2, scale, applied, token, bias, x3 = _table3_case(
        rng, m, k, n, kind, with_pertoken, out_dtype
    )
    # The seed formula with pertoken: f32(acc + bias) * scale * pertoken.
    acc = (x1.astype(np.int64) @ x2.astype(np.int64) + bias).astype(np.float32) * applied
    if with_pertoken:
        acc = acc * token[:, None]
    want = (acc.astype(out_dtype).astype(np.float32) + x3.astype(np.float32)).astype(out_dtype)
    shape = (2, m // 2) if x1_3d else (m,)
    got = mc2.mm_all_reduce_base(
        x1.reshape(*shape, k),
        x2,
        None,
        dequant_scale=scale,
        pertoken_scale=token,
        bias=bias,
        x3=x3.reshape(*shape, n),
        implementation=impl,
    )
    assert got.dtype == out_dtype and got.shape == (*shape, n)
    np.testing.assert_array_equal(
        np.asarray(got).reshape(m, n).view(np.uint16), want.view(np.uint16)
    )
    if impl == "ascend":
        return  # CANN's kernels take commTurn 0 only (test_ascend_quant checks the error)
    # comm_turn splits the rows, and the pertoken scales with them.
    mesh = make_mesh((2,), ("tp",))
    f = jax.jit(
        jax.shard_map(
            lambda a, b, s, t, c, d: mc2.mm_all_reduce_base(
                a,
                b,
                "tp",
                dequant_scale=s,
                pertoken_scale=t,
                bias=c,
                x3=d,
                comm_turn=5,
                implementation=impl,
            ),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None), P(), P(), P(), P()),
            out_specs=P(),
        )
    )
    if with_pertoken:
        got2 = f(x1, x2, scale, token, bias, x3)
        want2 = sum(
            (
                (
                    (
                        x1[:, r * 550 : (r + 1) * 550].astype(np.int64)
                        @ x2[r * 550 : (r + 1) * 550].astype(np.int64)
                        + bias
                    ).astype(np.float32)
                    * applied
                    * token[:, None]
                )
                .astype(out_dtype)
                .astype(np.float32)
                + x3.astype(np.float32)
            )
            .astype(out_dtype)
            .astype(np.float64)
            for r in range(2)
        )
        tol = oracle.tolerance(out_dtype, 2, scale=np.abs(want2).max() + 1)
        np.testing.assert_allclose(np.asarray(got2).astype(np.float64), want2, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind,with_pertoken,out_dtype", TABLE3)
@pytest.mark.parametrize("world", [2, 8])
def test_mm_all_reduce_base_full_quant_sharded(impl, kind, with_pertoken, out_dtype, world):
    """Every row of seed 004 table 3 on 2 and 8 devices: each rank's
    dequantized, rounded result plus x3, summed by the all-reduce."""
    rng = np.random.default_rng(30 + world)
    m, k_local, n = 6, 40, 16
    k = k_local * world
    x1, x2, scale, applied, token, bias, x3 = _table3_case(
        rng, m, k, n, kind, with_pertoken, out_dtype
    )
    f = jax.jit(
        jax.shard_map(
            lambda a, b, s, t, c, d: mc2.mm_all_reduce_base(
                a, b, "tp", dequant_scale=s, pertoken_scale=t, bias=c, x3=d, implementation=impl
            ),
            mesh=make_mesh((world,), ("tp",)),
            in_specs=(P(None, "tp"), P("tp", None), P(), P(), P(), P()),
            out_specs=P(),
        )
    )
    got = f(x1, x2, scale, token, bias, x3)
    assert got.dtype == out_dtype and got.shape == (m, n)

    def rank(r):
        cols = slice(r * k_local, (r + 1) * k_local)
        y = (x1[:, cols].astype(np.int64) @ x2[cols].astype(np.int64) + bias).astype(np.float32)
        y = y * applied * (token[:, None] if with_pertoken else np.float32(1))
        return (y.astype(out_dtype).astype(np.float32) + x3.astype(np.float32)).astype(out_dtype)

    want = sum(rank(r).astype(np.float64) for r in range(world))
    tol = oracle.tolerance(out_dtype, world, scale=np.abs(want).max() + 1)
    np.testing.assert_allclose(np.asarray(got).astype(np.float64), want, atol=tol)


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        (
            {"dequant_scale": S((4,), jnp.float32)},
            TypeError,
            "a float32 scale needs pertoken_scale or quant.trans_quant_param",
        ),
        (
            {"dequant_scale": S((4, 2), jnp.uint32), "pertoken_scale": S((6,), jnp.float32)},
            TypeError,
            "dequant_scale dtype must be float32 .float16 output. or bfloat16",
        ),
        (
            {"dequant_scale": S((4,), jnp.bfloat16), "pertoken_scale": S((5,), jnp.float32)},
            TypeError,
            r"pertoken_scale must be 1-D \(m,\) \(b \* s for 3-D x1\) = \(6,\), got \(5,\)",
        ),
        (
            {"dequant_scale": S((4,), jnp.bfloat16), "pertoken_scale": S((6,), jnp.float16)},
            TypeError,
            "pertoken_scale dtype must be float32, got float16",
        ),
        (
            {"pertoken_scale": S((6,), jnp.float32)},
            TypeError,
            "pertoken_scale is only used with dequant_scale",
        ),
        ({}, TypeError, "int8 x1 is the full-quantization mode: pass dequant_scale"),
        (
            {"dequant_scale": S((4,), jnp.bfloat16), "comm_quant_scale_1": S((4,), jnp.bfloat16)},
            ValueError,
            "comm_quant_scale_1 and comm_quant_scale_2 must be given together",
        ),
        (
            {"comm_quant_scale_1": S((4,), F16), "comm_quant_scale_2": S((4,), F16)},
            ValueError,
            "low-bit communication .comm_quant_scale_1/2. exists only in the full-quantization",
        ),
        (
            {
                "dequant_scale": S((4,), jnp.bfloat16),
                "comm_quant_scale_1": S((4,), F16),
                "comm_quant_scale_2": S((4,), F16),
            },
            TypeError,
            "comm_quant_scale_1 dtype must equal the output dtype bfloat16, got float16",
        ),
        (
            {
                "dequant_scale": S((4,), jnp.bfloat16),
                "comm_quant_scale_1": S((1, 4), jnp.bfloat16),
                "comm_quant_scale_2": S((4,), jnp.bfloat16),
            },
            TypeError,
            r"comm_quant_scale_1 and comm_quant_scale_2 must have one shape, got \(1, 4\) and "
            r"\(4,\)",
        ),
        (
            {
                "dequant_scale": S((4,), jnp.bfloat16),
                "comm_quant_scale_1": S((3,), jnp.bfloat16),
                "comm_quant_scale_2": S((3,), jnp.bfloat16),
            },
            TypeError,
            r"comm_quant_scale_1 must be \(n,\) or \(1, n\) with n = 4, got \(3,\)",
        ),
    ],
)
def test_mm_all_reduce_base_full_quant_invalid(kw, exc, msg):
    arrays = {k: a for k, a in kw.items() if isinstance(a, S)}
    with pytest.raises(exc, match=msg) as info:
        jax.eval_shape(
            lambda a, b, arr: mc2.mm_all_reduce_base(a, b, None, **arr),
            S((6, 8), I8),
            S((8, 4), I8),
            arrays,
        )
    assert str(info.value).startswith("mm_all_reduce_base: ")


def test_mm_all_reduce_base_full_quant_chip_rules():
    args = (S((2, 70000), I8), S((70000, 4), I8), S((4,), jnp.bfloat16))
    f = lambda a, b, s: mc2.mm_all_reduce_base(a, b, None, dequant_scale=s)  # noqa: E731
    assert jax.eval_shape(f, *args).shape == (2, 4)
    with (
        mc2.target("atlas-a2"),
        pytest.raises(
            NotImplementedError, match=r"mm_all_reduce_base: x1.shape\[-1\] = 70000 exceeds 65535"
        ),
    ):
        jax.eval_shape(f, *args)
    # The non-quantized mode has no such limit.
    with mc2.target("atlas-a2"):
        out = jax.eval_shape(
            lambda a, b: mc2.mm_all_reduce_base(a, b, None),
            S((2, 70000), jnp.float16),
            S((70000, 4), jnp.float16),
        )
        assert out.shape == (2, 4)


# --------------------------------------------------------------------------
# Low-bit communication (comm_quant_scale_1/2), docs/semantics.md §5.1


def _sat_rne_int8(x):
    return np.clip(np.rint(x), -128, 127).astype(np.int8)


def _oracle_comm_chain(c_ranks, s1, s2, out_dtype):
    """Simulates every rank: quantize per column to int8 (through fp16), pad
    rows to a multiple of R, rank j sums chunk j of every rank in fp32,
    requantizes with s1 / s2, all-gather, dequantize with s2."""
    ranks = len(c_ranks)
    m, n = c_ranks[0].shape
    s1f, s2f = s1.astype(np.float32).reshape(-1), s2.astype(np.float32).reshape(-1)
    q = [_sat_rne_int8((c.astype(np.float32) / s1f).astype(np.float16)) for c in c_ranks]
    chunk = -(-m // ranks)
    q = [np.concatenate([a, np.zeros((chunk * ranks - m, n), np.int8)]) for a in q]
    reduced = []
    for j in range(ranks):
        acc = np.zeros((chunk, n), np.float32)
        for i in range(ranks):
            acc += q[i][j * chunk : (j + 1) * chunk].astype(np.float32)
        ratio = s1f / s2f
        reduced.append(_sat_rne_int8((acc * ratio).astype(np.float16)))
    q2 = np.concatenate(reduced)[:m]
    if np.dtype(out_dtype) == np.float16:
        return (q2.astype(np.float16).astype(np.float32) * s2f).astype(np.float16)
    return (q2.astype(np.float32) * s2f).astype(out_dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["pairs", "bf16"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_comm_quant_chain(impl, kind, world):
    rng = np.random.default_rng(world + 10)
    m, k_local, n = 13, 64, 16  # 13 rows: padded to a multiple of the rank count
    k = k_local * world
    out_dtype = oracle.BF16 if kind == "bf16" else np.dtype(np.float16)
    x1 = rng.integers(-128, 128, (m, k), dtype=np.int8)
    x2 = rng.integers(-128, 128, (k, n), dtype=np.int8)
    raw = (rng.random(n) * 1e-4 + 2e-5).astype(np.float32)
    bias = rng.integers(-3000, 3000, n).astype(np.int32)
    x3 = rng.standard_normal((m, n)).astype(out_dtype)
    s1 = (rng.random(n) * 0.05 + 0.02).astype(out_dtype)
    s2 = (rng.random((1, n)) * 0.2 + 0.05).astype(out_dtype).reshape(1, n)
    s1 = s1.reshape(1, n)
    mesh = make_mesh((world,), ("tp",))
    f = jax.jit(
        jax.shard_map(
            lambda a, b, s, c, d, q1, q2: mc2.mm_all_reduce_base(
                a,
                b,
                "tp",
                dequant_scale=s,
                bias=c,
                x3=d,
                comm_quant_scale_1=q1,
                comm_quant_scale_2=q2,
                implementation=impl,
            ),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None)) + (P(),) * 5,
            out_specs=P(),
        )
    )
    args = (x1, x2, _make_scale(raw, kind), bias, x3, s1, s2)
    got = f(*args)
    applied = _applied_scale(raw, kind)
    c_ranks = [
        _oracle_rank(
            x1[:, r * k_local : (r + 1) * k_local],
            x2[r * k_local : (r + 1) * k_local],
            applied,
            bias,
            x3,
            transpose_x2=False,
            out_dtype=out_dtype,
        )
        for r in range(world)
    ]
    want = _oracle_comm_chain(c_ranks, s1, s2, out_dtype)
    assert got.dtype == out_dtype
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))
    if world > 1 and impl == "ascend":  # the int8 exchange runs inside CANN's kernel
        text = f.lower(*args).as_text()
        assert '"aclnnQuantMatmulAllReduceV3"' in text and "stablehlo.all_to_all" not in text
    elif world > 1:
        # int8 bytes on the wire: an s8 all-to-all and an s8 all-gather, no all-reduce.
        hlo = f.lower(*args).compile().as_text()
        a2a = [ln for ln in hlo.splitlines() if " all-to-all(" in ln]
        ag = [ln for ln in hlo.splitlines() if " all-gather(" in ln]
        assert a2a and all("s8[" in ln.split("all-to-all(")[0] for ln in a2a)
        assert ag and all("s8[" in ln.split("all-gather(")[0] for ln in ag)
        assert " all-reduce(" not in hlo


def test_comm_quant_error_bound():
    # With scales that cover the values, the int8 chain stays within its
    # quantization steps of the fp16 all-reduce: each rank's quantization
    # errs by at most s1 / 2, the requantization by at most s2 / 2.
    rng = np.random.default_rng(5)
    world, m, k_local, n = 4, 64, 128, 32
    x1 = rng.integers(-128, 128, (m, k_local * world), dtype=np.int8)
    x2 = rng.integers(-128, 128, (k_local * world, n), dtype=np.int8)
    scale = quant.trans_quant_param(np.full(n, 2e-5, np.float32))
    mesh = make_mesh((world,), ("tp",))

    def run(**kw):
        return jax.jit(
            jax.shard_map(
                lambda a, b, s: mc2.mm_all_reduce_base(a, b, "tp", dequant_scale=s, **kw),
                mesh=mesh,
                in_specs=(P(None, "tp"), P("tp", None), P()),
                out_specs=P(),
            )
        )(x1, x2, scale)

    full = np.asarray(run(), np.float32)
    amax = np.abs(full).max()
    s1 = np.full(n, 2 * amax / 127, np.float16)
    s2 = (s1.astype(np.float32) * world).astype(np.float16)
    low = np.asarray(run(comm_quant_scale_1=s1, comm_quant_scale_2=s2), np.float32)
    bound = world * float(s1[0]) / 2 + float(s2[0]) / 2 + 2**-10 * amax * world
    assert 0 < np.abs(low - full).max() <= bound


# --------------------------------------------------------------------------
# quant_matmul_all_reduce_v4, the int8 rows of seed 003

V4_ROWS = [
    # (x2_scale kind, x1_scale, output dtype)
    ("pairs", False, np.dtype(np.float16)),
    ("f32", True, np.dtype(np.float16)),
    ("bf16", False, oracle.BF16),
    ("bf16", True, oracle.BF16),
]


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind,with_x1_scale,out_dtype", V4_ROWS)
@pytest.mark.parametrize("world,with_comm", [(1, False), (2, False), (8, False), (4, True)])
def test_v4_int8_rows(impl, kind, with_x1_scale, out_dtype, world, with_comm):
    rng = np.random.default_rng(world)
    m, k_local, n = 10, 48, 16
    k = k_local * world
    x1 = rng.integers(-128, 128, (m, k), dtype=np.int8)
    x2 = rng.integers(-128, 128, (k, n), dtype=np.int8)
    raw = (rng.random(n) * 1e-4 + 2e-5).astype(np.float32)
    scale = raw if kind == "f32" else _make_scale(raw, kind)
    applied = raw if kind == "f32" else _applied_scale(raw, kind)
    token = (rng.random(m) + 0.5).astype(np.float32) if with_x1_scale else None
    bias = rng.integers(-2000, 2000, n).astype(np.int32)
    x3 = rng.standard_normal((m, n)).astype(out_dtype)
    s1 = (rng.random(n) * 0.05 + 0.02).astype(out_dtype)
    s2 = (s1.astype(np.float32) * world).astype(out_dtype)
    mesh = make_mesh((world,), ("tp",))
    f = jax.jit(
        jax.shard_map(
            lambda a, b, s, t, c, d, q1, q2: mc2.quant_matmul_all_reduce_v4(
                a,
                b,
                "tp",
                x2_scale=s,
                x1_scale=t,
                bias=c,
                x3=d,
                comm_quant_scale_1=q1 if with_comm else None,
                comm_quant_scale_2=q2 if with_comm else None,
                out_dtype=out_dtype,
                implementation=impl,
            ),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None)) + (P(),) * 6,
            out_specs=P(),
        )
    )
    got = f(x1, x2, scale, token, bias, x3, s1, s2)
    assert got.dtype == out_dtype and got.shape == (m, n)

    def rank(r):
        acc = (
            x1[:, r * k_local : (r + 1) * k_local].astype(np.int64)
            @ x2[r * k_local : (r + 1) * k_local].astype(np.int64)
            + bias
        ).astype(np.float32)
        y = acc * applied
        if with_x1_scale:
            y = y * token[:, None]
        return (y.astype(out_dtype).astype(np.float32) + x3.astype(np.float32)).astype(out_dtype)

    if with_comm:
        want = _oracle_comm_chain([rank(r) for r in range(world)], s1, s2, out_dtype)
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))
    elif world == 1:
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), rank(0).view(np.uint16))
    else:
        want = sum(rank(r).astype(np.float64) for r in range(world))
        tol = oracle.tolerance(out_dtype, world, scale=np.abs(want).max() + 1)
        np.testing.assert_allclose(np.asarray(got).astype(np.float64), want, atol=tol)


@pytest.mark.parametrize(
    "x1,kw,exc,msg",
    [
        (
            S((4, 8), jnp.float8_e4m3fn),
            {},
            TypeError,
            "x2_scale dtype for float8_e4m3fn x1/x2 must be float32 .pertoken / perblock.",
        ),
        (
            S((4, 8), jnp.uint8),
            {"x1_format": "hifloat8", "x2_format": "hifloat8"},
            TypeError,
            "x2_scale dtype for hifloat8 x1/x2 must be float32",
        ),
        (
            S((4, 8), I8),
            {"x2_format": "FRACTAL_NZ"},
            TypeError,
            r"a FRACTAL_NZ int8 x2 storing \(k, n\) must be \(ceil\(n/32\), ceil\(k/16\), 16, "
            r"32\) with k == x1.shape\[-1\] == 8, got \(8, 4\)",
        ),
        (S((4, 8), I8), {"x2_format": "NCHW"}, ValueError, "x2_format must be one of"),
        (
            S((4, 8), I8),
            {"comm_quant_mode": 1},
            ValueError,
            "comm_quant_mode=1 .fp8 pertile communication. needs fp8 x1 and x2",
        ),
        (
            S((4, 8), I8),
            {"group_size": 549764202624},
            ValueError,
            "group_size must be 0 unless both scales are at least 2-D",
        ),
        (
            S((4, 8), I8),
            {"out_dtype": jnp.float32},
            TypeError,
            "out_dtype float32 does not match the int8 row the scales select, whose output is "
            "bfloat16",
        ),
        (
            S((4, 8), I8),
            {"comm_quant_scale_2": S((4,), jnp.bfloat16)},
            ValueError,
            "comm_quant_scale_1 and comm_quant_scale_2 must be given together",
        ),
        # The int8 rows' messages name V4's own arguments.
        (S((4, 8), I8), {"x1_scale": S((5,), jnp.float32)}, TypeError, r"x1_scale must be 1-D"),
        (
            S((4, 8), I8),
            {"x1_scale": S((4,), jnp.float16)},
            TypeError,
            "x1_scale dtype must be float32, got float16",
        ),
        (
            S((4, 8), I8),
            {"x3": S((4, 4), jnp.float16)},
            TypeError,
            r"x3 dtype must equal the output dtype bfloat16 \(set by x2_scale\)",
        ),
    ],
)
def test_v4_invalid(x1, kw, exc, msg):
    arrays = {k: a for k, a in kw.items() if isinstance(a, S)}
    static = {k: a for k, a in kw.items() if k not in arrays}
    with pytest.raises(exc, match=msg) as info:
        jax.eval_shape(
            lambda a, b, s, arr: mc2.quant_matmul_all_reduce_v4(
                a, b, None, x2_scale=s, **arr, **static
            ),
            x1,
            S((8, 4), x1.dtype),
            S((4,), jnp.bfloat16),
            arrays,
        )
    assert str(info.value).startswith("quant_matmul_all_reduce_v4: ")


def test_v4_chip_targets():
    args = (S((4, 8), I8), S((8, 4), I8), S((4,), jnp.bfloat16))
    f = lambda a, b, s: mc2.quant_matmul_all_reduce_v4(a, b, None, x2_scale=s)  # noqa: E731
    for name in ("generic", "atlas-a2", "ascend-950"):
        with mc2.target(name):
            assert jax.eval_shape(f, *args).dtype == jnp.bfloat16
    with mc2.target("atlas-a3"), pytest.raises(NotImplementedError, match="not available"):
        jax.eval_shape(f, *args)
    with mc2.target("ascend-950"), pytest.raises(NotImplementedError, match="exceeds 65535"):
        jax.eval_shape(f, S((4, 70000), I8), S((70000, 4), I8), S((4,), jnp.bfloat16))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("transpose_x2", [False, True])
def test_v4_fractal_nz_weights(impl, transpose_x2):
    # An int8 weight in the FRACTAL_NZ layout gives the ND weight's result.
    rng = np.random.default_rng(8)
    m, k, n = 6, 40, 64  # k is not a multiple of the 16-row / 32-column NZ blocks
    x1 = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (n, k) if transpose_x2 else (k, n), dtype=np.int8)
    scale = (rng.random(n) * 1e-4 + 1e-5).astype(np.float32)
    bias = rng.integers(-500, 500, n).astype(np.int32)
    kw = dict(x2_scale=_make_scale(scale, "pairs"), bias=bias, transpose_x2=transpose_x2)
    kw["implementation"] = impl
    # The NZ layout of the stored matrix: nz[j // 32, i // 16, i % 16, j % 32] = w[i, j].
    r, c = w.shape
    padded = np.zeros((-(-r // 16) * 16, -(-c // 32) * 32), np.int8)
    padded[:r, :c] = w
    nz = padded.reshape(-1, 16, padded.shape[1] // 32, 32).transpose(2, 0, 1, 3)
    assert np.array_equal(np.asarray(quant.to_fractal_nz(w)), nz)
    want = mc2.quant_matmul_all_reduce_v4(x1, w, None, **kw)
    got = mc2.quant_matmul_all_reduce_v4(x1, nz, None, x2_format="FRACTAL_NZ", **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    applied = _applied_scale(scale, "pairs")
    exact = _oracle_rank(
        x1, w, applied, bias, None, transpose_x2=transpose_x2, out_dtype=np.float16
    )
    np.testing.assert_array_equal(np.asarray(got), exact)
    if transpose_x2:
        return
    # Sharded over k: each rank holds its k1 blocks of the NZ weight.
    mesh = make_mesh((2,), ("tp",))
    f = jax.jit(
        jax.shard_map(
            lambda a, b, s: mc2.quant_matmul_all_reduce_v4(
                a, b, "tp", x2_scale=s, x2_format="FRACTAL_NZ", implementation=impl
            ),
            mesh=mesh,
            in_specs=(P(None, "tp"), P(None, "tp"), P()),
            out_specs=P(),
        )
    )
    x1b = rng.integers(-128, 128, (m, 64), dtype=np.int8)
    wb = rng.integers(-128, 128, (64, n), dtype=np.int8)
    nz_b = np.concatenate(
        [np.asarray(quant.to_fractal_nz(wb[r * 32 : (r + 1) * 32])) for r in range(2)], axis=1
    )
    got = f(x1b, nz_b, kw["x2_scale"])
    want = sum(
        _oracle_rank(
            x1b[:, r * 32 : (r + 1) * 32],
            wb[r * 32 : (r + 1) * 32],
            applied,
            None,
            None,
            transpose_x2=False,
            out_dtype=np.float16,
        ).astype(np.float64)
        for r in range(2)
    )
    tol = oracle.tolerance(np.float16, 2, scale=np.abs(want).max() + 1)
    np.testing.assert_allclose(np.asarray(got).astype(np.float64), want, atol=tol)


def test_v4_fractal_nz_invalid():
    f = lambda a, b, s, **kw: mc2.quant_matmul_all_reduce_v4(  # noqa: E731
        a, b, None, x2_scale=s, x2_format="FRACTAL_NZ", **kw
    )
    scale = S((64,), jnp.bfloat16)
    with pytest.raises(
        TypeError,
        match=r"must be \(ceil\(n/32\), ceil\(k/16\), 16, 32\) with k "
        r"== x1.shape\[-1\] == 40, got \(2, 2, 16, 32\)",
    ):
        jax.eval_shape(f, S((4, 40), I8), S((2, 2, 16, 32), I8), scale)
    with pytest.raises(TypeError, match=r"storing \(n, k\) must be \(ceil\(k/32\), ceil\(n/16\)"):
        jax.eval_shape(
            functools.partial(f, transpose_x2=True), S((4, 40), I8), S((2, 4, 16, 16), I8), scale
        )
    with pytest.raises(TypeError, match="a FRACTAL_NZ x2 must be int8 here, got float16"):
        jax.eval_shape(f, S((4, 40), I8), S((2, 3, 16, 32), jnp.float16), scale)
    out = jax.eval_shape(f, S((4, 40), I8), S((2, 3, 16, 32), I8), scale)
    assert out.shape == (4, 64) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("transpose_x2", [False, True])
@pytest.mark.parametrize("mode", ["float16", "bfloat16", "weight-only", "full-quant", "v1"])
def test_fractal_nz_weights_seed_004_and_000(impl, transpose_x2, mode):
    """mm_all_reduce_base (seed 004: every mode) and quant_matmul_all_reduce
    (seed 000) take x2 in the FRACTAL_NZ layout (c0 = 16 for 16-bit floats,
    32 for int8) and give the ND weight's result bit for bit."""
    rng = np.random.default_rng(21)
    m, k, n = 5, 40, 64  # k is not a multiple of the NZ blocks
    shape = (n, k) if transpose_x2 else (k, n)
    kw = dict(transpose_x2=transpose_x2, implementation=impl)
    if mode in ("float16", "bfloat16"):
        dtype = np.float16 if mode == "float16" else oracle.BF16
        x1 = rng.standard_normal((m, k)).astype(dtype)
        w = rng.standard_normal(shape).astype(dtype)
        kw["bias"] = rng.standard_normal(n).astype(dtype)
        op = mc2.mm_all_reduce_base
    elif mode == "weight-only":
        x1 = rng.standard_normal((m, k)).astype(np.float16)
        w = rng.integers(-128, 128, shape, dtype=np.int8)
        kw["antiquant_scale"] = (rng.random(n) * 1e-2).astype(np.float16)
        op = mc2.mm_all_reduce_base
    else:
        x1 = rng.integers(-128, 128, (m, k), dtype=np.int8)
        w = rng.integers(-128, 128, shape, dtype=np.int8)
        kw["bias"] = rng.integers(-500, 500, n).astype(np.int32)
        kw["dequant_scale"] = _make_scale((rng.random(n) * 1e-4).astype(np.float32), "pairs")
        op = mc2.quant_matmul_all_reduce if mode == "v1" else mc2.mm_all_reduce_base
    nz = quant.to_fractal_nz(w)
    c0 = 16 if w.dtype.itemsize == 2 else 32
    assert nz.shape[2:] == (16, c0)
    want = op(x1, w, None, **kw)
    got = op(x1, nz, None, x2_format="FRACTAL_NZ", **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert op(x1, w, None, x2_format="ND", **kw).shape == (m, n)


def test_fractal_nz_invalid_seed_004():
    f16 = jnp.float16
    with pytest.raises(ValueError, match="x2_format must be one of"):
        mc2.mm_all_reduce_base(np.ones((2, 8), f16), np.ones((8, 4), f16), None, x2_format="NZ")
    with pytest.raises(
        TypeError,
        match=r"a FRACTAL_NZ float16 x2 storing \(k, n\) must be \(ceil\(n/16\), "
        r"ceil\(k/16\), 16, 16\) with k == x1.shape\[-1\] == 40, got \(1, 2, 16, 32\)",
    ):
        jax.eval_shape(
            lambda a, b: mc2.mm_all_reduce_base(a, b, None, x2_format="FRACTAL_NZ"),
            S((4, 40), f16),
            S((1, 2, 16, 32), f16),
        )
    with pytest.raises(TypeError, match="a FRACTAL_NZ x2 must be int8 here, got float16"):
        mc2.quant_matmul_all_reduce(
            np.ones((4, 40), np.int8),
            np.ones((2, 3, 16, 16), f16),
            None,
            dequant_scale=np.ones(32, oracle.BF16),
            x2_format="FRACTAL_NZ",
        )
    # k comes from x1: a 0-d or 1-D x1 is named, not an IndexError.
    nz = quant.to_fractal_nz(np.ones((16, 16), f16))
    for x1 in (f16(1), np.ones(16, f16)):
        with pytest.raises(TypeError, match=r"mm_all_reduce_base: x1 must be 2-D or 3-D"):
            mc2.mm_all_reduce_base(x1, nz, None, x2_format="FRACTAL_NZ")


def test_nz_primitive_bind_names_a_0d_x1():
    """A direct bind of the primitive (no operator in front) with an NZ
    weight and a 0-d x1 gets a TypeError naming x1."""
    f16 = jnp.float16
    nz = quant.to_fractal_nz(np.ones((16, 16), f16))
    call = jax.make_jaxpr(lambda a, b: mc2.mm_all_reduce_base(a, b, None, x2_format="FRACTAL_NZ"))
    eqn = call(np.ones((4, 16), f16), nz).eqns[-1]
    with pytest.raises(TypeError, match=r"x1 must be at least 1-D \(its last dimension is k\)"):
        jax.eval_shape(lambda a, b: eqn.primitive.bind(a, b, **eqn.params), S((), f16), nz)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_int32_bias_added_before_the_float_conversion(impl):
    """k > 1024 (several int8 k-chunks): acc + bias is one int32 sum converted
    to fp32 once; acc = 2^25 + 2^14 + 2 needs 26 bits."""
    k = 2050
    x1 = np.full((1, k), -128, np.int8)
    x1[0, -1] = 1
    x2 = np.full((k, 1), -128, np.int8)
    x2[-1, 0] = 2
    acc = int((x1.astype(np.int64) @ x2.astype(np.int64))[0, 0])
    assert acc == 2**25 + 2**14 + 2
    for scale, dtype in (
        (quant.trans_quant_param(np.array([2.0**-20], np.float32)), np.float16),
        (np.array([2.0**-20], oracle.BF16), oracle.BF16),
    ):
        got = mc2.quant_matmul_all_reduce(
            x1, x2, None, dequant_scale=scale, bias=np.array([1], np.int32), implementation=impl
        )
        want = (np.float32(acc + 1) * np.float32(2.0**-20)).astype(dtype)
        np.testing.assert_array_equal(np.asarray(got), np.array([[want]]))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_comm_quantization_of_nan_is_zero(impl):
    """A NaN reaching the int8 communication quantization becomes 0 in both
    implementations."""
    xi = np.ones((2, 8), np.int8)
    wi = np.ones((8, 4), np.int8)
    one = np.ones(4, oracle.BF16)
    got = mc2.mm_all_reduce_base(
        xi,
        wi,
        None,
        dequant_scale=np.full(1, np.nan, oracle.BF16),
        comm_quant_scale_1=one,
        comm_quant_scale_2=one,
        implementation=impl,
    )
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.zeros((2, 4), np.float32))
