"""mm_all_reduce_base weight-only quantization (seed 004 table 2) against a
NumPy model of docs/semantics.md §8."""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from conftest import IMPLEMENTATIONS, make_mesh
from hlo import reductions
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2

S = jax.ShapeDtypeStruct


def _oracle_weights(x2, scale, offset, group, transpose_x2, dtype):
    """w[kk, j] = (x2 + offset) * scale per element, fp16 in fp16 steps and
    bf16 in fp32 then one rounding (§8)."""
    k, n = (x2.shape[1], x2.shape[0]) if transpose_x2 else x2.shape
    xs = x2.T if transpose_x2 else x2
    w = np.zeros((k, n), dtype)
    for kk in range(k):
        for j in range(n):
            if scale.size == 1:
                idx = (0,) * scale.ndim
            elif group:
                idx = (kk // group, j)
            else:
                idx = (j,) if scale.ndim == 1 else (0, j)
            s = scale[idx]
            o = None if offset is None else offset[idx]
            if np.dtype(dtype) == np.float16:
                v = np.float16(xs[kk, j])
                if o is not None:
                    v = np.float16(np.float32(v) + np.float32(o))
                w[kk, j] = np.float16(np.float32(v) * np.float32(s))
            else:
                v = np.float32(xs[kk, j])
                if o is not None:
                    v = np.float32(v + np.float32(o))
                w[kk, j] = np.asarray(np.float32(v * np.float32(s))).astype(dtype)
    return w


def _scale_shape(mode, k, n, group):
    if mode == "pergroup":
        return (-(-k // group), n)
    return {"pertensor": (1,), "perchannel": (n,), "perchannel1n": (1, n)}[mode]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    "mode,group",
    [("pertensor", 0), ("perchannel", 0), ("perchannel1n", 0), ("pergroup", 32), ("pergroup", 64)],
)
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("transpose_x2", [False, True])
def test_dequantized_weights_bit_exact(impl, dtype, mode, group, with_offset, transpose_x2):
    # x1 = identity, so out = w exactly: the dequantization is compared bit
    # for bit (k = 150: the last group of 32 or 64 rows is short).
    rng = np.random.default_rng(0)
    k, n = 150, 12
    x1 = np.eye(k, dtype=dtype)
    x2 = rng.integers(-128, 128, (n, k) if transpose_x2 else (k, n), dtype=np.int8)
    shape = _scale_shape(mode, k, n, group)
    scale = (rng.random(shape) * 0.05 + 1e-3).astype(dtype)
    offset = (rng.standard_normal(shape) * 3).astype(dtype) if with_offset else None
    got = mc2.mm_all_reduce_base(
        x1,
        x2,
        None,
        antiquant_scale=scale,
        antiquant_offset=offset,
        antiquant_group_size=group,
        transpose_x2=transpose_x2,
        implementation=impl,
    )
    want = _oracle_weights(x2, scale, offset, group, transpose_x2, dtype)
    assert got.dtype == dtype and got.shape == (k, n)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float16, oracle.BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    "world,mode", [(1, "perchannel"), (2, "pertensor"), (2, "pergroup"), (8, "perchannel")]
)
def test_sharded_values(impl, dtype, world, mode):
    rng = np.random.default_rng(world)
    k_local, n = 64, 16
    k = k_local * world
    group = 32 if mode == "pergroup" else 0
    rows = k // 32 if group else 1
    cols = 1 if mode == "pertensor" else n
    x1 = rng.standard_normal((2, 5, k)).astype(dtype)
    x2 = rng.integers(-128, 128, (k, n), dtype=np.int8)
    scale = (rng.random((rows, cols) if group else cols) * 0.02).astype(dtype)
    offset = rng.standard_normal(scale.shape).astype(dtype)
    # pergroup scales are split with x2's k rows.
    scale_spec = P("tp", None) if group else P()
    bias = rng.standard_normal(n).astype(dtype)
    x3 = rng.standard_normal((2, 5, n)).astype(dtype)
    mesh = make_mesh((world,), ("tp",))
    f = jax.jit(
        jax.shard_map(
            lambda a, b, s, o, c, d: mc2.mm_all_reduce_base(
                a,
                b,
                "tp",
                antiquant_scale=s,
                antiquant_offset=o,
                antiquant_group_size=group,
                bias=c,
                x3=d,
                implementation=impl,
            ),
            mesh=mesh,
            in_specs=(P(None, None, "tp"), P("tp", None), scale_spec, scale_spec, P(), P()),
            out_specs=P(),
        )
    )
    got = f(x1, x2, scale, offset, bias, x3)
    w = _oracle_weights(x2, scale, offset, group, False, dtype)
    xs = [x1[..., r * k_local : (r + 1) * k_local] for r in range(world)]
    ws = [w[r * k_local : (r + 1) * k_local] for r in range(world)]
    want = oracle.mm_all_reduce_base(xs, ws, [bias] * world, [x3] * world)
    tol = oracle.tolerance(dtype, world, scale=np.abs(want).max() + 1)
    np.testing.assert_allclose(np.asarray(got).astype(np.float64), want, atol=tol)
    if impl == "ffi":
        text = f.lower(x1, x2, scale, offset, bias, x3).as_text()
        assert text.count("custom_call @mc2_matmul_ffi") == 1
        assert reductions(text) == 1


def _shape(x1, x2, **kw):
    arrays = {k: a for k, a in kw.items() if isinstance(a, S)}
    static = {k: a for k, a in kw.items() if k not in arrays}
    return jax.eval_shape(
        lambda a, b, arr: mc2.mm_all_reduce_base(a, b, None, **arr, **static), x1, x2, arrays
    )


F16, I8 = jnp.float16, jnp.int8
INVALID = [
    (
        {"antiquant_scale": S((1,), F16), "antiquant_group_size": 48},
        ValueError,
        r"antiquant_group_size must be 0 or a multiple of 32 in \[32, k - 1\] = "
        r"\[32, 127\], got 48",
    ),
    (
        {"antiquant_scale": S((1,), F16), "antiquant_group_size": 128},
        ValueError,
        r"\[32, 127\], got 128",
    ),
    (
        {"antiquant_scale": S((3, 8), F16), "antiquant_group_size": 32},
        TypeError,
        r"antiquant_scale must be pergroup \(ceil\(k / 32\), n\) = \(4, 8\), got \(3, 8\)",
    ),
    (
        {"antiquant_scale": S((5,), F16)},
        TypeError,
        r"antiquant_scale must be pertensor \(1,\) or perchannel \(n,\) / \(1, n\) with n = 8",
    ),
    (
        {"antiquant_scale": S((8,), jnp.bfloat16)},
        TypeError,
        "antiquant_scale dtype must equal x1 dtype float16, got bfloat16",
    ),
    (
        {"antiquant_scale": S((8,), F16), "antiquant_offset": S((1, 8), F16)},
        TypeError,
        r"antiquant_offset must be antiquant_scale's shape = \(8,\), got \(1, 8\)",
    ),
    (
        {"antiquant_offset": S((8,), F16)},
        ValueError,
        "antiquant_offset and antiquant_group_size need antiquant_scale",
    ),
    (
        {"antiquant_scale": S((8,), F16), "dequant_scale": S((8,), jnp.bfloat16)},
        ValueError,
        "are different modes; pass one of them",
    ),
]


@pytest.mark.parametrize("kw,exc,msg", INVALID)
def test_invalid(kw, exc, msg):
    with pytest.raises(exc, match=msg) as info:
        _shape(S((4, 128), F16), S((128, 8), I8), **kw)
    assert str(info.value).startswith("mm_all_reduce_base: ")


def test_x2_dtype_and_chip_rules():
    with pytest.raises(TypeError, match="x2 dtype must be int8 with antiquant_scale, got float16"):
        _shape(S((4, 128), F16), S((128, 8), F16), antiquant_scale=S((1,), F16))
    big = (S((2, 70000), F16), S((70000, 8), I8))
    assert _shape(*big, antiquant_scale=S((1,), F16)).shape == (2, 8)
    with (
        mc2.target("atlas-a2"),
        pytest.raises(
            NotImplementedError, match=r"x1.shape\[-1\] = 70000 exceeds 65535 on target 'atlas-a2'"
        ),
    ):
        _shape(*big, antiquant_scale=S((1,), F16))
    # Weight-only: n <= 65535 even with a transposed x2 (seed 004; only full
    # quantization lets a transposed n exceed it).
    wide = (S((4, 64), F16), S((65536, 64), I8))
    with (
        mc2.target("atlas-a2"),
        pytest.raises(NotImplementedError, match="n = 65536 exceeds 65535 in the weight-only"),
    ):
        _shape(*wide, antiquant_scale=S((1,), F16), transpose_x2=True)


def test_vmap_and_not_differentiable():
    rng = np.random.default_rng(4)
    x1 = rng.standard_normal((3, 4, 64)).astype(np.float16)
    x2 = rng.integers(-128, 128, (64, 8), dtype=np.int8)
    scale = (rng.random(8) * 0.02).astype(np.float16)
    got = jax.vmap(lambda a: mc2.mm_all_reduce_base(a, x2, None, antiquant_scale=scale))(x1)
    one = mc2.mm_all_reduce_base(x1[2], x2, None, antiquant_scale=scale)
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(one))
    with pytest.raises(
        NotImplementedError, match="weight-only quantized mode .* not differentiable"
    ):
        jax.grad(
            lambda a: jnp.sum(
                mc2.mm_all_reduce_base(a, x2, None, antiquant_scale=scale).astype(jnp.float32)
            )
        )(x1[0])


# --------------------------------------------------------------------------
# Invalid operands of the weight-only mode, on both implementations (eager,
# so that a check missing from one implementation's path cannot hide behind
# the other's kernel).

_WQ_X1 = np.ones((4, 64), np.float16)
_WQ_X2 = np.ones((64, 8), np.int8)
_WQ_SCALE = np.full((8,), 0.5, np.float16)
WQ_INVALID = [
    ({"bias": np.ones((1,), np.float16)}, r"bias must be 1-D \(n,\) = \(8,\), got \(1,\)"),
    ({"bias": np.ones((1, 8), np.float16)}, r"bias must be 1-D \(n,\) = \(8,\), got \(1, 8\)"),
    ({"bias": np.ones((8,), np.float32)}, "bias dtype must equal x1 dtype float16, got float32"),
    ({"x3": np.ones((1, 8), np.float16)}, r"x3 must be the output shape = \(4, 8\), got \(1, 8\)"),
    (
        {"antiquant_offset": np.ones((1,), np.float16)},
        r"antiquant_offset must be antiquant_scale's shape = \(8,\), got \(1,\)",
    ),
    ({"antiquant_scale": np.full((1, 7), 0.5, np.float16)}, "antiquant_scale must be"),
    ({"antiquant_scale": np.full((8,), 0.5, np.float32)}, "antiquant_scale dtype must equal"),
]


@pytest.mark.parametrize("impl", ["xla", "ffi"])
@pytest.mark.parametrize("kw,msg", WQ_INVALID, ids=[str(i) for i in range(len(WQ_INVALID))])
def test_weight_only_invalid_operands(impl, kw, msg):
    kw = {"antiquant_scale": _WQ_SCALE, **kw}
    with pytest.raises((TypeError, ValueError), match="mm_all_reduce_base: " + msg):
        mc2.mm_all_reduce_base(_WQ_X1, _WQ_X2, None, implementation=impl, **kw)
