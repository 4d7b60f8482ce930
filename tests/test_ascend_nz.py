"""FRACTAL_NZ weights (x2_format="FRACTAL_NZ"): the primitives take x2 in
the NZ layout; implementation="ascend" hands it to CANN as an NZ tensor (the
(k, n) view, format 29, the NZ storage dims) and the CANN test double reads
it through the layout; xla and ffi compute on the converted ND weight; the
gradient w.r.t. an NZ x2 comes back in the NZ layout."""

import ctypes
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P
from test_cann_double import Cann
from test_mm_all_reduce import _assert_close
from test_quant_matmul_all_reduce import _applied_scale, _make_scale, _oracle_rank
from test_weight_quant import _oracle_weights

import jax_mc2 as mc2
from jax_mc2 import quant

M, K_LOCAL, N = 5, 40, 20  # neither k nor n a multiple of the 16-row / c0-column blocks
MODES = ("float16", "bfloat16", "weight-only", "full-quant", "v1", "v4-int8")
ACL_CODE = {np.dtype(np.float16): 1, oracle.BF16: 27, np.dtype(np.int8): 2}


def _c0(dtype):
    return 32 // np.dtype(dtype).itemsize


def _padded_n(dtype, transpose_x2):
    """The n an NZ weight of N columns holds: padded to its column (c0) or,
    transposed, its row (16) blocks."""
    block = 16 if transpose_x2 else _c0(dtype)
    return -(-N // block) * block


def _case(mode, world, transpose_x2, seed=0):
    """x1 [M, world * K_LOCAL]; each rank's stored x2 (its k slice, N padded
    with zeros to the NZ extent); the call's keyword arguments; the operator;
    the weight dtype."""
    rng = np.random.default_rng(seed)
    k = world * K_LOCAL
    if mode in ("float16", "bfloat16", "weight-only"):
        dtype = np.float16 if mode != "bfloat16" else oracle.BF16
        x1 = rng.standard_normal((M, k)).astype(dtype)
        w_dtype = np.int8 if mode == "weight-only" else dtype
    else:
        x1 = rng.integers(-128, 128, (M, k), dtype=np.int8)
        w_dtype = np.int8
    n = _padded_n(w_dtype, transpose_x2)
    w = np.zeros((k, n), w_dtype)
    if w_dtype == np.int8:
        w[:, :N] = rng.integers(-128, 128, (k, N), dtype=np.int8)
    else:
        w[:, :N] = (rng.standard_normal((k, N)) * 0.5).astype(w_dtype)
    stored = [w[r * K_LOCAL : (r + 1) * K_LOCAL] for r in range(world)]
    if transpose_x2:
        stored = [np.ascontiguousarray(s.T) for s in stored]
    kw = {"transpose_x2": transpose_x2}
    op = mc2.mm_all_reduce_base
    if mode in ("float16", "bfloat16"):
        kw["bias"] = rng.standard_normal(n).astype(x1.dtype)
    elif mode == "weight-only":
        kw["antiquant_scale"] = (rng.random(n) * 1e-2 + 1e-3).astype(x1.dtype)
    else:
        scale = (rng.random(n) * 1e-4 + 1e-5).astype(np.float32)
        kw["bias"] = rng.integers(-500, 500, n).astype(np.int32)
        packed = _make_scale(scale, "pairs")
        if mode == "v4-int8":
            op, kw["x2_scale"] = mc2.quant_matmul_all_reduce_v4, packed
        else:
            op = mc2.quant_matmul_all_reduce if mode == "v1" else mc2.mm_all_reduce_base
            kw["dequant_scale"] = packed
        kw["_applied"] = _applied_scale(scale, "pairs")
    return x1, stored, kw, op, np.dtype(w_dtype)


def _oracle(mode, x1, stored, kw):
    """The NumPy model of the call over the ranks' stored weights: float64
    sum of the per-rank results, each rounded to the output dtype."""
    t = kw["transpose_x2"]
    x1s = [x1[:, r * K_LOCAL : (r + 1) * K_LOCAL] for r in range(len(stored))]
    if mode in ("float16", "bfloat16"):
        return oracle.mm_all_reduce_base(x1s, stored, [kw["bias"]] * len(stored), transpose_x2=t)
    if mode == "weight-only":
        scale = kw["antiquant_scale"]
        ws = [_oracle_weights(s, scale, None, 0, t, x1.dtype) for s in stored]
        return oracle.mm_all_reduce_base(x1s, ws)
    parts = [
        _oracle_rank(a, s, kw["_applied"], kw["bias"], None, transpose_x2=t, out_dtype=np.float16)
        for a, s in zip(x1s, stored)
    ]
    return sum(p.astype(np.float64) for p in parts)


def _nz(stored, transpose_x2):
    """The ranks' NZ weights side by side along their k blocks (axis 1, or
    axis 0 for a transposed x2), so that sharding that axis gives each rank
    its own NZ weight."""
    return np.concatenate(
        [np.asarray(quant.to_fractal_nz(s)) for s in stored], axis=0 if transpose_x2 else 1
    )


def _sharded(op, world, kw, impl, x2_format):
    """The call on ``world`` devices, x1 and x2 sharded over k: an ND x2
    along its k axis, an NZ x2 along its k blocks."""
    mesh = make_mesh((world,), ("tp",))
    call = {k: v for k, v in kw.items() if not k.startswith("_")}
    k_on_second_axis = (x2_format == "FRACTAL_NZ") != kw["transpose_x2"]
    w_spec = P(None, "tp") if k_on_second_axis else P("tp")

    def f(a, b):
        return op(a, b, "tp", x2_format=x2_format, implementation=impl, **call)

    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(None, "tp"), w_spec), out_specs=P()))


def _x2_slot(text):
    """The x2 tensor slot (operand 1) of the lowered call's argument spec."""
    (spec,) = set(re.findall(r'spec = "([^"]*)"', text))
    (slot,) = [s for s in spec.split(";") if s.startswith("to1/")]
    return slot


def _expected_nz_slot(stored, dtype, transpose_x2):
    """format 29, offset 0, the (k, n) view, the stored matrix's strides and
    the 4-D NZ storage dims."""
    rows, cols = stored.shape
    k, n = (cols, rows) if transpose_x2 else (rows, cols)
    strides = (1, k) if transpose_x2 else (n, 1)
    nz = quant.to_fractal_nz(stored).shape
    csv = lambda v: ",".join(map(str, v))  # noqa: E731
    return f"to1/{ACL_CODE[dtype]}/29/0/{k},{n}/{csv(strides)}/{csv(nz)}"


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("transpose_x2", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_ascend_nz_equals_nd_and_oracle(mode, transpose_x2, world):
    x1, stored, kw, op, w_dtype = _case(mode, world, transpose_x2, seed=world)
    nz = _nz(stored, transpose_x2)
    nd = np.concatenate(stored, axis=1 if transpose_x2 else 0)
    f_nz = _sharded(op, world, kw, "ascend", "FRACTAL_NZ")
    slot = _x2_slot(f_nz.lower(x1, nz).as_text())
    assert slot == _expected_nz_slot(stored[0], w_dtype, transpose_x2)
    got = np.asarray(f_nz(x1, nz))
    want_nd = np.asarray(_sharded(op, world, kw, "ascend", "ND")(x1, nd))
    np.testing.assert_array_equal(got.view(np.uint16), want_nd.view(np.uint16))
    want = _oracle(mode, x1, stored, kw)
    assert got.shape == want.shape
    if world == 1 and mode in ("full-quant", "v1", "v4-int8"):
        np.testing.assert_array_equal(got.astype(np.float64), want)  # integer math, one rounding
    else:
        _assert_close(got, want, got.dtype, world, K_LOCAL)


@pytest.mark.parametrize("n", [5, 16, 40])
@pytest.mark.parametrize("transpose_x2", [False, True])
def test_ascend_nz_with_k_one(transpose_x2, n):
    """k == 1: for n <= 16 the plain and the transposed NZ storage shapes
    coincide, and only the view's strides ((n, 1) or (1, 1)) say which matrix
    the blocks hold."""
    rng = np.random.default_rng(n)
    x1 = rng.standard_normal((M, 1)).astype(np.float16)
    stored = rng.standard_normal((n, 1) if transpose_x2 else (1, n)).astype(np.float16)
    nz = np.asarray(quant.to_fractal_nz(stored))

    def call(impl, w, fmt):
        return np.asarray(
            mc2.mm_all_reduce_base(
                x1, w, None, transpose_x2=transpose_x2, x2_format=fmt, implementation=impl
            )
        )

    got = call("ascend", nz, "FRACTAL_NZ")
    want = call("ascend", stored, "ND")
    assert got.shape == (M, -(-n // 16) * 16)  # n padded to the 16-wide blocks
    np.testing.assert_array_equal(got[:, :n].view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(got[:, n:], 0)


@pytest.mark.parametrize("impl", ["xla", "ffi"])
@pytest.mark.parametrize("transpose_x2", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_xla_and_ffi_nz_bind_nz_and_equal_nd(impl, mode, transpose_x2):
    """The primitive gets the NZ weight (its 4-D operand and x2_format in the
    jaxpr); xla and ffi give the ND call's result bit for bit."""
    x1, stored, kw, op, _ = _case(mode, 1, transpose_x2)
    call = {k: v for k, v in kw.items() if not k.startswith("_")}
    nz = quant.to_fractal_nz(stored[0])
    jaxpr = jax.make_jaxpr(lambda a, b: op(a, b, None, x2_format="FRACTAL_NZ", **call))(x1, nz)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name.startswith("mc2_")]
    assert eqn.params["x2_format"] == "FRACTAL_NZ"
    assert eqn.invars[1].aval.shape == nz.shape
    got = op(x1, nz, None, x2_format="FRACTAL_NZ", implementation=impl, **call)
    want = op(x1, stored[0], None, implementation=impl, **call)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


@pytest.mark.parametrize("impl", ["xla", "ffi", "ascend"])
@pytest.mark.parametrize("transpose_x2", [False, True])
def test_grad_wrt_nz_weight_is_nz(impl, transpose_x2):
    """d/dx2 of an NZ call is the NZ layout of the ND gradient, its padding
    rows zero; x1's gradient is the ND call's."""
    rng = np.random.default_rng(3)
    x1 = rng.standard_normal((M, K_LOCAL)).astype(np.float16)
    w = (rng.standard_normal((N, K_LOCAL) if transpose_x2 else (K_LOCAL, N)) * 0.5).astype(
        np.float16
    )
    nz = quant.to_fractal_nz(w)
    stored = quant.from_fractal_nz(nz, _stored_padded(nz, transpose_x2))

    def loss(fmt):
        def f(a, b):
            y = mc2.mm_all_reduce_base(
                a, b, None, transpose_x2=transpose_x2, x2_format=fmt, implementation=impl
            )
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return f

    jaxpr = jax.make_jaxpr(loss("FRACTAL_NZ"))(x1, nz)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "mc2_mm_all_reduce"]
    assert eqn.params["x2_format"] == "FRACTAL_NZ" and eqn.invars[1].aval.shape == nz.shape
    g1, g2 = jax.grad(loss("FRACTAL_NZ"), argnums=(0, 1))(x1, nz)
    n1, n2 = jax.grad(loss("ND"), argnums=(0, 1))(x1, stored)
    assert g2.shape == nz.shape and g2.dtype == nz.dtype
    np.testing.assert_array_equal(np.asarray(g2), np.asarray(quant.to_fractal_nz(n2)))
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(n1))
    # The k padding (rows, or transposed columns, 40..47 of the last k block) is zero.
    tail = g2[:, -1, K_LOCAL % 16 :, :] if not transpose_x2 else g2[-1, :, :, K_LOCAL % 16 :]
    assert tail.size and not np.asarray(tail).any()


def _stored_padded(nz, transpose_x2):
    r1, c1, c0 = nz.shape[1], nz.shape[0], nz.shape[3]
    return (r1 * 16, K_LOCAL) if transpose_x2 else (K_LOCAL, c1 * c0)


# ----------------------------------------------------------------------------
# The double's phase 1, through its C API


class _Ops:
    """The double's libraries (the session's build) plus its operator library."""

    def __init__(self):
        folder = os.environ["JAX_MC2_CANN_LIBRARY_PATH"]
        self.cann = Cann(folder)
        self.op = ctypes.CDLL(os.path.join(folder, "libopapi.so"), mode=ctypes.RTLD_GLOBAL)
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        out = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_void_p)]
        f = self.op.aclnnMatmulAllReduceGetWorkspaceSize
        f.restype, f.argtypes = ctypes.c_int, [p, p, p, ctypes.c_char_p, ctypes.c_char_p]
        f.argtypes += [i64, i64, p, *out]
        f = self.op.aclnnMatmulAllReduceAddRmsNormGetWorkspaceSize
        f.restype, f.argtypes = ctypes.c_int, [p, p, p, p, p, ctypes.c_double]
        f.argtypes += [ctypes.c_char_p, ctypes.c_char_p, i64, i64, p, p, *out]

    def tensor(self, view, strides, fmt, storage, data, dtype=1):
        arr = lambda v: (ctypes.c_int64 * len(v))(*v)  # noqa: E731
        t = self.cann.nn.aclCreateTensor(
            arr(view), len(view), dtype, arr(strides), 0, fmt, arr(storage), len(storage), data
        )
        assert t, self.cann.error()
        return t

    def matmul_all_reduce(self, x1, x2):
        size, executor = ctypes.c_uint64(), ctypes.c_void_p()
        status = self.op.aclnnMatmulAllReduceGetWorkspaceSize(
            x1, x2, None, b"g", b"sum", 0, 1, None, ctypes.byref(size), ctypes.byref(executor)
        )
        return status, self.cann.error()

    def add_rms_norm(self, x1, x2):
        size, executor = ctypes.c_uint64(), ctypes.c_void_p()
        status = self.op.aclnnMatmulAllReduceAddRmsNormGetWorkspaceSize(
            x1, x2, None, x1, x1, 1e-6, b"g", b"sum", 0, 1, None, None, ctypes.byref(size),
            ctypes.byref(executor),
        )  # fmt: skip
        return status, self.cann.error()


def test_double_refuses_bad_nz_weights():
    """Phase 1 reads an x2 with format 29 as CANN does: its storage dims must
    be the NZ shape of the (k, n) view, its buffer must hold that many
    elements, and operators whose x2 is ND only (AddRmsNorm, seed 002)
    refuse it; each with 161002 naming x2."""
    ops = _Ops()
    cann = ops.cann
    assert cann.acl.aclrtSetDevice(0) == 0
    clean = "violations: 0" in cann.report()
    x1_buf, x2_buf = cann.malloc(M * 40 * 2), cann.malloc(2 * 4 * 16 * 16 * 2)
    x1 = ops.tensor((M, 40), (40, 1), 2, (M, 40), x1_buf)
    nz_shape = (2, 3, 16, 16)  # (ceil(32/16), ceil(40/16), 16, 16) for the (40, 32) view
    bad = ops.tensor((40, 32), (32, 1), 29, (2, 4, 16, 16), x2_buf)
    status, message = ops.matmul_all_reduce(x1, bad)
    assert status == 161002
    assert re.search(
        r"aclnnMatmulAllReduce: x2 FRACTAL_NZ storage must be .*\(2, 3, 16, 16\)", message
    )
    # The view's strides say which matrix the blocks store: (n, 1) or (1, k)
    # only, and plain strides over the transposed storage are refused.
    odd = ops.tensor((40, 32), (0, 0), 29, nz_shape, x2_buf)
    status, message = ops.matmul_all_reduce(x1, odd)
    assert status == 161002
    assert "x2 in FRACTAL_NZ must have the strides (n, 1) = (32, 1)" in message
    assert "or (1, k) = (1, 40) of a stored (n, k), got (0, 0)" in message
    plain_over_t = ops.tensor((40, 32), (32, 1), 29, (3, 2, 16, 16), x2_buf)
    status, message = ops.matmul_all_reduce(x1, plain_over_t)
    assert status == 161002
    assert re.search(r"x2 FRACTAL_NZ storage must be .*got \(3, 2, 16, 16\)", message)
    good = ops.tensor((40, 32), (32, 1), 29, nz_shape, x2_buf)
    status, message = ops.add_rms_norm(x1, good)
    assert status == 161002
    assert "x2 format must be ND (2), got FRACTAL_NZ (29)" in message
    assert cann.acl.aclrtFree(x2_buf) == 0
    status, message = ops.matmul_all_reduce(x1, good)
    assert status == 161002
    assert "x2 FRACTAL_NZ storage (2, 3, 16, 16) needs 1536 elements (3072 bytes)" in message
    assert "use after free" in message
    for t in (x1, bad, odd, plain_over_t, good):
        assert cann.nn.aclDestroyTensor(t) == 0
    assert cann.acl.aclrtFree(x1_buf) == 0
    if clean:  # the use after free above was this test's own
        cann.core.cann_double_clear_report()
