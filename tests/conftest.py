"""Test setup: an 8-device simulated CPU mesh, configured before jax loads."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.pop("JAX_MC2_TARGET", None)
os.environ.pop("JAX_MC2_IMPLEMENTATION", None)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jax_mc2  # noqa: E402, F401

IMPLEMENTATIONS = ("xla", "ffi")


def make_mesh(shape, names):
    """A Mesh over the first prod(shape) CPU devices."""
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


@pytest.fixture(autouse=True)
def _generic_target():
    jax_mc2.set_target("generic")
    yield
    jax_mc2.set_target("generic")
