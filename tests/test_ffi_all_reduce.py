"""The ``ffi`` implementation's all-reduce (for bfloat16 a float32
reduce-scatter and a bfloat16 all-gather) gives ``lax.psum``'s bits on CPU
(docs/semantics.md §10.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_mc2.implementations import ffi as _ffi


@pytest.fixture(autouse=True)
def _split_at_every_size(monkeypatch):
    """The split path at the small shapes of these tests (by default it is
    taken only from SPLIT_ALL_REDUCE_MIN_ELEMENTS elements a rank)."""
    monkeypatch.setattr(_ffi, "SPLIT_ALL_REDUCE_MIN_ELEMENTS", 0)


def _both(mesh, axis, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    ranks = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))
    # Values of mixed magnitudes, so that the summation order shows in the bits.
    x = rng.standard_normal((ranks * shape[0], *shape[1:])) * np.exp2(rng.integers(-8, 8, 1))
    x = jnp.asarray(x, dtype)

    def run(fn):
        return jax.jit(
            jax.shard_map(fn, mesh=mesh, in_specs=P(axis), out_specs=P(), check_vma=False)
        )(x)

    got = run(lambda a: _ffi.all_reduce(a, axis))
    want = run(lambda a: lax.psum(a, axis))
    return np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("ranks", [2, 8])
@pytest.mark.parametrize("shape", [(64, 48), (3, 5), (1, 7, 16)])
def test_all_reduce_equals_psum_bit_for_bit(dtype, ranks, shape):
    mesh = Mesh(np.array(jax.devices()[:ranks]), ("tp",))
    got, want = _both(mesh, "tp", shape, dtype)
    np.testing.assert_array_equal(got, want)


def test_all_reduce_over_two_axes():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))
    got, want = _both(mesh, ("dp", "tp"), (32, 24), jnp.bfloat16, seed=3)
    np.testing.assert_array_equal(got, want)


def _lowered_on_two_ranks(x):
    """The lowered text of the ffi all-reduce of x's two row shards."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    fn = jax.shard_map(
        lambda a: _ffi.all_reduce(a, "tp"),
        mesh=mesh,
        in_specs=P("tp"),
        out_specs=P(),
        check_vma=False,
    )
    return jax.jit(fn).lower(x).as_text()


def test_only_bfloat16_takes_the_split():
    def lowered(dtype):
        return _lowered_on_two_ranks(jnp.zeros((8, 4), dtype))

    assert "reduce_scatter" in lowered(jnp.bfloat16)
    assert "reduce_scatter" not in lowered(jnp.float16)
    assert "reduce_scatter" not in lowered(jnp.float32)


def test_small_bfloat16_keeps_psum(monkeypatch):
    """Below the size where the split measured faster, bfloat16 takes psum."""

    def lowered(rows):
        return _lowered_on_two_ranks(jnp.zeros((2 * rows, 4), jnp.bfloat16))

    monkeypatch.setattr(_ffi, "SPLIT_ALL_REDUCE_MIN_ELEMENTS", 40)
    assert "reduce_scatter" not in lowered(9)  # 36 elements a rank
    assert "reduce_scatter" in lowered(10)  # 40
    monkeypatch.undo()
    assert "reduce_scatter" not in lowered(1024)  # the default threshold


def test_all_reduce_without_an_axis_is_the_identity():
    x = jnp.arange(6.0, dtype=jnp.bfloat16)
    assert _ffi.all_reduce(x, ()) is x
