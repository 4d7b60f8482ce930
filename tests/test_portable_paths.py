"""The portable C++ kernel paths, forced with JAX_MC2_FFI_PORTABLE=1 (read once
per process by the extension, so each check runs in a subprocess).

On a CPU with AVX2 + F16C the in-process tests only reach the vectorized add +
RMSNorm kernel and the F16C float16 conversions; these tests run the add +
RMSNorm test file again on the portable paths, and check that both paths give
the same bits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_mc2 import _mc2_ffi

ROOT = Path(__file__).resolve().parent.parent
PORTABLE_ENV = {**os.environ, "JAX_MC2_FFI_PORTABLE": "1"}
#: The add + RMSNorm suite on the portable paths: every case of the file that
#: its own marks do not call slow (not the inner loop's one-per-value split).
SUITE_ENV = {**PORTABLE_ENV, "JAX_MC2_TESTS_EXPLICIT_SLOW_ONLY": "1"}

# One ffi add + RMSNorm call per dtype, rows long enough for the 16-wide body
# and both tails; prints the output bits.
_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
import numpy as np, jax_mc2 as mc2
from jax_mc2 import _mc2_ffi
rng = np.random.default_rng(5)
out = {"vectorized": _mc2_ffi.vectorized()}
for name in ("float16", "bfloat16", "float32"):
    dt = np.dtype(name)
    x1 = rng.standard_normal((2, 3, 24)).astype(dt)
    x2 = (rng.standard_normal((24, 37)) * 0.3).astype(dt)
    res = rng.standard_normal((2, 3, 37)).astype(dt)
    gamma = rng.standard_normal(37).astype(dt)
    y, norm = mc2.matmul_all_reduce_add_rms_norm(
        x1, x2, res, gamma, None, epsilon=0.5, implementation="ffi")
    for tag, a in (("y", y), ("norm", norm)):
        bits = np.uint16 if dt.itemsize == 2 else np.uint32
        out[name + "/" + tag] = np.asarray(a).view(bits).tolist()
print(repr(out))
"""


def _bits(env):
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return eval(run.stdout.strip().splitlines()[-1])  # noqa: S307 (our own repr)


def test_portable_switch_is_reported():
    assert _bits(PORTABLE_ENV)["vectorized"] is False


@pytest.mark.skipif(not _mc2_ffi.vectorized(), reason="this CPU runs the portable paths anyway")
def test_portable_and_vectorized_paths_give_the_same_bits():
    fast, portable = _bits(os.environ.copy()), _bits(PORTABLE_ENV)
    assert fast.pop("vectorized") is True and portable.pop("vectorized") is False
    for key in fast:
        np.testing.assert_array_equal(np.array(portable[key]), np.array(fast[key]), err_msg=key)


@pytest.mark.slow
def test_add_rms_norm_suite_on_the_portable_paths():
    """tests/test_add_rms_norm.py (the fast tests) against the oracle with the
    portable kernel: a bug on that path alone fails here."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            str(ROOT / "tests" / "test_add_rms_norm.py"),
        ],
        env=SUITE_ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
