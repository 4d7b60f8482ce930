"""Invalid inputs are rejected at abstract-evaluation time with the right
exception class and a message that names operator, argument, rule, values;
chip targets apply their support matrices."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2

F16, BF16, F32 = jnp.float16, jnp.bfloat16, jnp.float32


def S(shape, dtype=F16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _split_arrays(kw):
    arrays = {k: a for k, a in kw.items() if isinstance(a, jax.ShapeDtypeStruct)}
    static = {k: a for k, a in kw.items() if k not in arrays}
    return arrays, static


def mm(x1, x2, **kw):
    arrays, static = _split_arrays(kw)
    return jax.eval_shape(
        lambda a, b, arr: mc2.mm_all_reduce_base(a, b, None, **arr, **static), x1, x2, arrays
    )


def norm(x1, x2, residual, gamma, **kw):
    fn = functools.partial(mc2.matmul_all_reduce_add_rms_norm, axis_name=None, **kw)
    return jax.eval_shape(fn, x1, x2, residual, gamma)


MM_INVALID = [
    # (x1, x2, kwargs, exception, message)
    (
        S((4, 512)),
        S((256, 64)),
        {},
        TypeError,
        r"mm_all_reduce_base: x2 must be 2-D \(k, n\) with k == x1.shape\[-1\] == 512, "
        r"got \(256, 64\)",
    ),
    (
        S((512,)),
        S((512, 64)),
        {},
        TypeError,
        r"mm_all_reduce_base: x1 must be 2-D or 3-D \(m, k\) or \(b, s, k\), got shape \(512,\)",
    ),
    (
        S((2, 2, 4, 8)),
        S((8, 4)),
        {},
        TypeError,
        r"x1 must be 2-D or 3-D .* got shape \(2, 2, 4, 8\)",
    ),
    (
        S((4, 8)),
        S((2, 8, 4)),
        {},
        TypeError,
        r"x2 must be 2-D \(k, n\) with k == x1.shape\[-1\] == 8",
    ),
    (
        S((4, 8)),
        S((8, 4)),
        {"transpose_x2": True},
        TypeError,
        r"x2 must be 2-D \(n, k\) with k == x1.shape\[-1\] == 8 \(transpose_x2=True\), "
        r"got \(8, 4\)",
    ),
    (
        S((4, 8)),
        S((8, 4), BF16),
        {},
        TypeError,
        r"x2 dtype must equal x1 dtype float16, got bfloat16",
    ),
    (
        S((4, 8), jnp.int32),
        S((8, 4), jnp.int32),
        {},
        TypeError,
        r"x1 dtype must be one of float16, bfloat16, float32, got int32",
    ),
    (
        S((4, 8)),
        S((8, 4)),
        {"bias": S((5,))},
        TypeError,
        r"bias must be 1-D \(n,\) = \(4,\), got \(5,\)",
    ),
    (
        S((4, 8)),
        S((8, 4)),
        {"bias": S((4,), F32)},
        TypeError,
        r"bias dtype must equal x1 dtype float16, got float32",
    ),
    (
        S((4, 8)),
        S((8, 4)),
        {"x3": S((4, 5))},
        TypeError,
        r"x3 must be the output shape = \(4, 4\), got \(4, 5\)",
    ),
    (S((4, 0)), S((0, 4)), {}, TypeError, r"k must be >= 1 \(empty k is not supported\)"),
    (
        S((4, 8)),
        S((8, 4)),
        {"reduce_op": "max"},
        ValueError,
        r"mm_all_reduce_base: reduce_op must be 'sum' .* got 'max'",
    ),
    (S((4, 8)), S((8, 4)), {"comm_turn": -1}, ValueError, r"comm_turn must be >= 0, got -1"),
    (
        S((4, 8)),
        S((8, 4)),
        {"comm_turn": 1.5},
        ValueError,
        r"comm_turn must be a Python int, got 1.5",
    ),
    (
        S((4, 8)),
        S((8, 4)),
        {"implementation": "cuda"},
        ValueError,
        r"implementation must be one of \('xla', 'ffi', 'ascend'\) or None, got 'cuda'",
    ),
    (
        S((4, 8)),
        S((8, 4)),
        {"comm_quant_scale_1": S((4,))},
        ValueError,
        r"comm_quant_scale_1 and comm_quant_scale_2 must be given together",
    ),
    (
        S((4, 8)),
        S((8, 4)),
        {"antiquant_group_size": 32},
        ValueError,
        r"antiquant_offset and antiquant_group_size need antiquant_scale",
    ),
]


@pytest.mark.parametrize("x1,x2,kw,exc,msg", MM_INVALID)
def test_mm_invalid(x1, x2, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        mm(x1, x2, **kw)


def test_mm_invalid_eager_calls_validate_too():
    with pytest.raises(TypeError, match="x2 must be 2-D"):
        mc2.mm_all_reduce_base(np.ones((4, 8), np.float16), np.ones((4, 8), np.float16), None)
    with pytest.raises(ValueError, match="axis_name must be None, a mesh axis name"):
        mc2.mm_all_reduce_base(np.ones((4, 8), np.float16), np.ones((8, 4), np.float16), 3)


NORM_INVALID = [
    (
        S((12, 8)),
        S((8, 4)),
        S((12, 4)),
        S((4,)),
        {},
        TypeError,
        r"matmul_all_reduce_add_rms_norm: residual must be 3-D \(b, s, n\), got shape \(12, 4\)",
    ),
    (
        S((12, 8)),
        S((8, 4)),
        S((2, 5, 4)),
        S((4,)),
        {},
        TypeError,
        r"residual must be \(b, s, n\) with b \* s == m == 12 and n == 4, got \(2, 5, 4\)",
    ),
    (
        S((2, 6, 8)),
        S((8, 4)),
        S((2, 6, 5)),
        S((4,)),
        {},
        TypeError,
        r"residual must be \(b, s, n\) = \(2, 6, 4\) \(x1 is \(b, s, k\)\), got \(2, 6, 5\)",
    ),
    (
        S((12, 8)),
        S((8, 4)),
        S((2, 6, 4)),
        S((1, 4)),
        {},
        TypeError,
        r"gamma must be 1-D \(n,\) = \(4,\), got \(1, 4\)",
    ),
    (
        S((12, 8)),
        S((8, 4)),
        S((2, 6, 4), BF16),
        S((4,)),
        {},
        TypeError,
        r"residual dtype must equal x1 dtype float16, got bfloat16",
    ),
    (
        S((12, 8)),
        S((8, 4)),
        S((2, 6, 4)),
        S((4,), F32),
        {},
        TypeError,
        r"gamma dtype must equal x1 dtype float16, got float32",
    ),
    (
        S((12, 8)),
        S((8, 4)),
        S((2, 6, 4)),
        S((4,)),
        {"epsilon": 1.0},
        ValueError,
        r"epsilon must be in \(0, 1\), got 1.0",
    ),
    (
        S((12, 8)),
        S((8, 4)),
        S((2, 6, 4)),
        S((4,)),
        {"epsilon": 0.0},
        ValueError,
        r"epsilon must be in \(0, 1\), got 0.0",
    ),
    (
        S((12, 8)),
        S((8, 4)),
        S((2, 6, 4)),
        S((4,)),
        {"epsilon": "small"},
        ValueError,
        r"epsilon must be a Python float in \(0, 1\), got 'small'",
    ),
    (
        S((12, 8)),
        S((8, 4)),
        S((2, 6, 4)),
        S((4,)),
        {"reduce_op": "prod"},
        ValueError,
        r"reduce_op must be 'sum'",
    ),
]


@pytest.mark.parametrize("x1,x2,residual,gamma,kw,exc,msg", NORM_INVALID)
def test_norm_invalid(x1, x2, residual, gamma, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        norm(x1, x2, residual, gamma, **kw)


def test_inplace_names_itself():
    with pytest.raises(ValueError, match="inplace_matmul_all_reduce_add_rms_norm: epsilon"):
        jax.eval_shape(
            functools.partial(
                mc2.inplace_matmul_all_reduce_add_rms_norm, axis_name=None, epsilon=2.0
            ),
            S((12, 8)),
            S((8, 4)),
            S((2, 6, 4)),
            S((4,)),
        )


# --------------------------------------------------------------------------
# Chip targets


def _sharded_shape(world, dtype=F16, comm_turn=0, m=16, k=64, n=8):
    mesh = make_mesh((world,), ("tp",))
    f = jax.shard_map(
        lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", comm_turn=comm_turn),
        mesh=mesh,
        in_specs=(P(None, "tp"), P("tp", None)),
        out_specs=P(),
    )
    return jax.eval_shape(f, S((m, k), dtype), S((k, n), dtype))


def test_target_world_sizes():
    with mc2.target("atlas-a2"):
        for world in (1, 2, 4, 8):
            assert _sharded_shape(world).shape == (16, 8)
    assert _sharded_shape(2).shape == (16, 8)
    with mc2.target("ascend-950"):
        assert _sharded_shape(8).shape == (16, 8)


def test_target_rejects_16_ranks_on_a2_accepts_on_generic():
    # 16 ranks need a bigger simulated mesh: run in a subprocess.
    code = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
import functools, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import jax_mc2 as mc2
mesh = Mesh(np.array(jax.devices()), ("tp",))
f = jax.shard_map(lambda a, b: mc2.mm_all_reduce_base(a, b, "tp"), mesh=mesh,
                  in_specs=(P(None, "tp"), P("tp", None)), out_specs=P())
args = (jax.ShapeDtypeStruct((16, 64), jnp.float16), jax.ShapeDtypeStruct((64, 8), jnp.float16))
print("generic", jax.eval_shape(f, *args).shape)
with mc2.target("ascend-950"):
    print("ascend-950", jax.eval_shape(f, *args).shape)
with mc2.target("atlas-a2"):
    try:
        jax.eval_shape(f, *args)
    except NotImplementedError as e:
        print("atlas-a2", e)
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "generic (16, 8)" in out.stdout
    assert "ascend-950 (16, 8)" in out.stdout
    assert (
        "atlas-a2 mm_all_reduce_base: world size 16 (axis_name=('tp',)) is not supported on "
        "target 'atlas-a2'; supported: 1, 2, 4, 8"
    ) in out.stdout


def test_target_float32_only_generic():
    assert _sharded_shape(2, F32).dtype == F32
    for name in ("atlas-a2", "ascend-950"):
        with mc2.target(name):
            with pytest.raises(
                TypeError, match=f"x1 dtype float32 is not supported on target '{name}'"
            ):
                _sharded_shape(2, F32)
            assert _sharded_shape(2, BF16).dtype == BF16


def test_target_comm_turn():
    assert _sharded_shape(2, comm_turn=4).shape == (16, 8)
    with mc2.target("atlas-a2"):
        with pytest.raises(
            NotImplementedError, match="comm_turn=4 is not supported on target 'atlas-a2'"
        ):
            _sharded_shape(2, comm_turn=4)


def test_target_empty_tensors():
    assert mm(S((0, 8)), S((8, 4))).shape == (0, 4)
    with mc2.target("atlas-a2"):
        with pytest.raises(
            NotImplementedError, match="x1 and x2 must not be empty on target 'atlas-a2', got m = 0"
        ):
            mm(S((0, 8)), S((8, 4)))
        # AddRmsNorm accepts b*s == 0 and n == 0 on A2.
        y, _ = norm(S((0, 8)), S((8, 4)), S((0, 3, 4)), S((4,)))
        assert y.shape == (0, 3, 4)


def test_target_operator_availability():
    with mc2.target("atlas-a3"):
        with pytest.raises(
            NotImplementedError, match="mm_all_reduce_base: not available on target 'atlas-a3'"
        ):
            mm(S((4, 8)), S((8, 4)))
        with pytest.raises(
            NotImplementedError,
            match="matmul_all_reduce_add_rms_norm: not available on target 'atlas-a3'",
        ):
            norm(S((12, 8)), S((8, 4)), S((2, 6, 4)), S((4,)))


def test_target_size_limit():
    with mc2.target("atlas-a2"):
        with pytest.raises(NotImplementedError, match="n = 2147483648 exceeds 2147483647"):
            mm(S((1, 8)), S((8, 2**31)))


def test_target_selection_api_and_jit_cache():
    assert mc2.get_target() == "generic"
    mc2.set_target("atlas-a2")
    assert mc2.get_target() == "atlas-a2"
    mc2.set_target("generic")
    with pytest.raises(ValueError, match="target must be one of"):
        mc2.set_target("atlas-a9")
    with pytest.raises(ValueError, match="target must be one of"):
        mc2.target("tpu")
    # The same jitted function is re-traced when the target changes.
    f = jax.jit(lambda a, b: mc2.mm_all_reduce_base(a, b, None))
    a, b = np.ones((2, 4), np.float32), np.ones((4, 2), np.float32)
    assert f(a, b).shape == (2, 2)
    with mc2.target("atlas-a2"), pytest.raises(TypeError, match="float32 is not supported"):
        f(a, b)


@pytest.mark.slow
def test_target_from_environment():
    code = (
        "import jax_mc2 as mc2, jax, jax.numpy as jnp\n"
        "print(mc2.get_target())\n"
        "try:\n"
        "    jax.eval_shape(lambda a, b: mc2.mm_all_reduce_base(a, b, None),"
        " jax.ShapeDtypeStruct((2, 4), jnp.float32), jax.ShapeDtypeStruct((4, 2), jnp.float32))\n"
        "except TypeError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, JAX_MC2_TARGET="ascend-950")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "ascend-950"
    assert "float32 is not supported on target 'ascend-950'" in out.stdout
    env["JAX_MC2_TARGET"] = "bogus"
    out = subprocess.run(
        [sys.executable, "-c", "import jax_mc2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode != 0 and "JAX_MC2_TARGET must be one of" in out.stderr
