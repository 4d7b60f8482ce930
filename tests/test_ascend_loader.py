"""The ascend backend without CANN: code tables, availability, the trace-time
error naming the missing library (run in fresh processes, since CANN loads
once per process)."""

import os
import textwrap

from conftest import run_python

import jax_mc2

_PROBE = textwrap.dedent(
    """
    import jax.numpy as jnp, jax_mc2 as mc2
    print("AVAILABLE", mc2.ascend.is_available())
    x = jnp.ones((4, 8), jnp.bfloat16); w = jnp.ones((8, 4), jnp.bfloat16)
    try:
        mc2.mm_all_reduce_base(x, w, None, implementation="ascend")
    except NotImplementedError as e:
        print("ERROR", e)
    """
)


def _run(env_updates, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_MC2_CANN_LIBRARY_PATH", "ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
    }
    env.update(env_updates)
    return run_python(_PROBE, env, tmp_path)


def test_code_tables():
    a = jax_mc2.ascend
    assert a.ACL_DTYPE["bfloat16"] == 27
    assert a.ACL_DTYPE["float16"] == 1
    assert a.ACL_DTYPE["float32"] == 0
    assert a.ACL_DTYPE["int8"] == 2
    assert a.ACL_DTYPE["float8_e4m3fn"] == 36
    assert a.ACL_DTYPE["float8_e5m2"] == 35
    assert a.ACL_DTYPE["hifloat8"] == 34
    assert a.ACL_DTYPE["float8_e8m0fnu"] == 37
    assert a.ACL_DTYPE["float4_e2m1fn"] == 40
    assert a.ACL_DTYPE["uint64"] == 10
    assert a.ACL_FORMAT == {"ND": 2, "FRACTAL_NZ": 29}


def test_chip_target_from_soc_name():
    a = jax_mc2.ascend
    assert a.chip_target("Ascend910B1") == "atlas-a2"
    assert a.chip_target("Ascend910B4") == "atlas-a2"
    assert a.chip_target("Ascend910_9391") == "atlas-a3"
    assert a.chip_target("Ascend950PR") == "ascend-950"
    assert a.chip_target("Ascend310P3") is None


def test_missing_library_is_a_trace_time_error(tmp_path):
    out = _run({"JAX_MC2_CANN_LIBRARY_PATH": str(tmp_path)}, tmp_path)
    assert "AVAILABLE False" in out
    assert "ERROR mm_all_reduce_base: implementation='ascend' is not available" in out
    assert "libascendcl.so" in out and "JAX_MC2_CANN_LIBRARY_PATH" in out
    assert str(tmp_path) in out


def test_ascend_home_path_is_searched(tmp_path):
    out = _run({"ASCEND_HOME_PATH": str(tmp_path)}, tmp_path)
    assert f"{tmp_path}/lib64" in out and "ASCEND_HOME_PATH" in out


_SOC_PROBE = textwrap.dedent(
    """
    import numpy as np, jax.numpy as jnp, jax_mc2 as mc2
    print("BEFORE", mc2.get_target())
    x = jnp.ones((4, 8), jnp.bfloat16); w = jnp.ones((8, 4), jnp.bfloat16)
    try:
        np.asarray(mc2.mm_all_reduce_base(x, w, None, implementation="ascend"))
    except NotImplementedError as e:
        print("ERROR", e)
    print("AFTER", mc2.get_target(), mc2.ascend.soc_name())
    """
)


def _soc_run(env_updates, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_MC2_TARGET"}
    env.update(env_updates)
    return run_python(_SOC_PROBE, env, tmp_path)


def test_chip_target_follows_the_soc_name(tmp_path):
    out = _soc_run({"CANN_DOUBLE_SOC_NAME": "Ascend910_9391"}, tmp_path)
    # A3 has no matmul + all-reduce: the chip's rules apply from this call on
    assert "BEFORE generic" in out and "AFTER atlas-a3 Ascend910_9391" in out
    assert "not available on target 'atlas-a3'" in out
    out = _soc_run({"CANN_DOUBLE_SOC_NAME": "Ascend910B2"}, tmp_path)
    assert "AFTER atlas-a2 Ascend910B2" in out and "ERROR" not in out


def test_an_explicit_target_wins(tmp_path):
    out = _soc_run(
        {"CANN_DOUBLE_SOC_NAME": "Ascend910_9391", "JAX_MC2_TARGET": "atlas-a2"}, tmp_path
    )
    assert "AFTER atlas-a2" in out


def test_bind_devices_refuses_repeated_or_negative_npus():
    import jax
    import pytest

    n = len(jax.local_devices(backend="cpu"))
    for bad in ([0] * n, [-1, *range(1, n)], [0.5, *range(1, n)]):
        with pytest.raises(ValueError, match="bind_devices: NPU ids must be distinct non-negative"):
            jax_mc2.ascend.bind_devices(bad)


def test_configure_refuses_bad_timeouts():
    import pytest

    for bad in (0, -7, True, 1.5, "soon", 2**31):
        with pytest.raises(ValueError, match="configure: timeout_ms must be -1 .wait forever."):
            jax_mc2.ascend.configure(timeout_ms=bad)
    bad_buffsize = "configure: hccl_buffsize_mb must be (a Python int|>= 1)"
    for bad in (0, -200, True, 1.5, "200"):
        with pytest.raises(ValueError, match=bad_buffsize):
            jax_mc2.ascend.configure(hccl_buffsize_mb=bad)


def test_a_bad_environment_is_named_at_every_call(monkeypatch):
    """A bad JAX_MC2_ASCEND_DEVICES / JAX_MC2_ASCEND_TIMEOUT_MS is an error
    naming the operator and the variables, at every call until it is mended
    (not once, then ignored)."""
    import numpy as np
    import pytest

    monkeypatch.setattr(jax_mc2.ascend, "_ENV_APPLIED", False)
    monkeypatch.setenv("JAX_MC2_ASCEND_DEVICES", "3,2")
    x1, x2 = np.ones((2, 16), np.float16), np.ones((16, 4), np.float16)

    def call():
        return jax_mc2.mm_all_reduce_base(x1, x2, None, implementation="ascend")

    for _ in range(2):
        with pytest.raises(
            ValueError,
            match=r"mm_all_reduce_base: implementation='ascend': JAX_MC2_ASCEND_DEVICES='3,2'.*"
            r"need \d+ NPU ids",
        ):
            call()
    monkeypatch.setenv("JAX_MC2_ASCEND_DEVICES", "")
    monkeypatch.setenv("JAX_MC2_ASCEND_TIMEOUT_MS", "abc")
    with pytest.raises(ValueError, match=r"JAX_MC2_ASCEND_TIMEOUT_MS must be -1 .* got 'abc'"):
        call()
    monkeypatch.setenv("JAX_MC2_ASCEND_TIMEOUT_MS", "120000")
    assert np.asarray(call()).shape == (2, 4)
    assert jax_mc2.ascend._ENV_APPLIED
