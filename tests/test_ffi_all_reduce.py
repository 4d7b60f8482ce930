"""The ``ffi`` implementation's all-reduce (for bfloat16 a float32
reduce-scatter and a bfloat16 all-gather; for float16 an all-to-all, a
rank-ordered float16 sum and an all-gather) gives ``lax.psum``'s bits on CPU
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
    """The split paths at the small shapes of these tests (by default they
    are taken only from SPLIT_ALL_REDUCE_MIN_ELEMENTS / FLOAT16_SPLIT_MIN_ELEMENTS
    elements a rank)."""
    monkeypatch.setattr(_ffi, "SPLIT_ALL_REDUCE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_ffi, "FLOAT16_SPLIT_MIN_ELEMENTS", 0)


def _both(mesh, axis, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    ranks = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))
    # Values of mixed magnitudes, so that the summation order shows in the bits.
    x = rng.standard_normal((ranks * shape[0], *shape[1:]))
    x = jnp.asarray(x * np.exp2(rng.integers(-8, 8, x.shape)), dtype)

    def run(fn):
        return jax.jit(
            jax.shard_map(fn, mesh=mesh, in_specs=P(axis), out_specs=P(), check_vma=False)
        )(x)

    def bits(a):  # compares -0 with +0 and NaN payloads too
        return np.asarray(a).view(np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint32)

    return bits(run(lambda a: _ffi.all_reduce(a, axis))), bits(run(lambda a: lax.psum(a, axis)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("world", [2, 8])
@pytest.mark.parametrize("shape", [(64, 48), (3, 5), (1, 7, 16)])
def test_all_reduce_equals_psum_bit_for_bit(dtype, world, shape):
    mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
    got, want = _both(mesh, "tp", shape, dtype)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # 8 ranks
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_all_reduce_over_two_axes(dtype):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))
    got, want = _both(mesh, ("dp", "tp"), (32, 24), dtype, seed=3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # 8 ranks
@pytest.mark.parametrize("axis", ["tp", ("dp", "tp")])
def test_float16_all_reduce_over_a_sub_group(axis):
    """Over tp alone inside dp x tp: each dp row reduces its own tp ranks."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8 * 16, 24)) * np.exp(2 * rng.standard_normal((8 * 16, 24)))
    x = jnp.asarray(x, jnp.float16)

    def run(fn):
        spec = P(("dp", "tp"))
        return jax.jit(
            jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
        )(x)

    got = run(lambda a: _ffi.all_reduce(a, axis))
    want = run(lambda a: lax.psum(a, axis))
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


def test_float16_sum_order_signed_zeros_and_nans_match_psum():
    """Values whose float16 sum depends on the order (a large value and small
    ones that vanish only when added to it one at a time), overflow,
    infinities, all-negative-zero columns and NaNs with payloads: the same
    bits as psum (never -0; NaNs canonical with their sign)."""
    ranks = 8
    mesh = Mesh(np.array(jax.devices()[:ranks]), ("tp",))
    x = np.ones((ranks, 8), np.float16)  # 8 elements a rank: the split path
    x[:, 0] = [2048, 1, 1, 1, 1, 1, 1, 1]  # 2048 + 1 rounds back to 2048 each step
    x[:, 1] = [1, 1, 1, 1, 1, 1, 1, 2048]  # 7 + 2048 = 2055 -> 2056
    x[:, 2] = -0.0
    x[:, 3] = [1, -1, 0, 0, 0, 0, 0, -0.0]
    x[:, 4] = [np.inf, 1, 1, 1, 1, 1, 1, 1]
    x[:, 5] = [65504, 65504, -65504, 0, 0, 0, 0, 0]  # overflows to inf at the second step
    words = x.view(np.uint16)
    words[0, 6] = 0x7E55  # a quiet NaN with a payload
    words[3, 7] = 0xFC01  # a negative signalling NaN

    def run(fn):
        return jax.jit(
            jax.shard_map(fn, mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False)
        )

    split = run(lambda a: _ffi.all_reduce(a, "tp"))
    assert "all_to_all" in split.lower(jnp.asarray(x)).as_text()
    got = np.asarray(split(jnp.asarray(x))).view(np.uint16)
    want = np.asarray(run(lambda a: lax.psum(a, "tp"))(jnp.asarray(x))).view(np.uint16)
    np.testing.assert_array_equal(got, want)
    values = got.view(np.float16)
    assert values[0, 0] == 2048 and values[0, 1] == 2056
    assert not np.signbit(values[:, 2]).any()
    assert (got[:, 6] == 0x7E00).all() and (got[:, 7] == 0xFE00).all()


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


def test_bfloat16_all_gather_carries_two_bytes_a_value():
    """The split bfloat16 all-reduce gathers bfloat16 bits, not float32
    (XLA:CPU moves a conversion past an all-gather of floats)."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    fn = jax.shard_map(
        lambda a: _ffi.all_reduce(a.astype(jnp.float32), "tp", jnp.bfloat16),
        mesh=mesh,
        in_specs=P("tp"),
        out_specs=P(),
        check_vma=False,
    )
    compiled = jax.jit(fn).lower(jnp.zeros((16, 8), jnp.bfloat16)).compile().as_text()
    gathers = [line for line in compiled.splitlines() if " all-gather(" in line]
    assert gathers and all(line.split("=")[1].strip().startswith("u16[") for line in gathers)


def test_each_dtype_takes_its_collectives():
    def lowered(dtype):
        return _lowered_on_two_ranks(jnp.zeros((8, 4), dtype))

    assert "reduce_scatter" in lowered(jnp.bfloat16)
    float16 = lowered(jnp.float16)
    assert "all_to_all" in float16 and "all_gather" in float16 and "all_reduce" not in float16
    float32 = lowered(jnp.float32)
    assert "all_reduce" in float32 and "reduce_scatter" not in float32
    assert "all_to_all" not in float32


@pytest.mark.parametrize(
    "dtype, threshold, collective, first_split_rows",
    [
        (jnp.bfloat16, "SPLIT_ALL_REDUCE_MIN_ELEMENTS", "reduce_scatter", (1 << 19) + 1),
        (jnp.float16, "FLOAT16_SPLIT_MIN_ELEMENTS", "all_to_all", 1 << 13),
    ],
)
def test_small_arrays_keep_psum(monkeypatch, dtype, threshold, collective, first_split_rows):
    """Below the size where a split measured faster, psum itself (4 elements a row)."""

    def lowered(rows):
        return _lowered_on_two_ranks(jnp.zeros((2 * rows, 4), dtype))

    monkeypatch.setattr(_ffi, threshold, 40)
    assert collective not in lowered(9)  # 36 elements a rank
    assert collective in lowered(10)  # 40
    monkeypatch.undo()
    assert collective not in lowered(1024)  # 4096 elements: below the defaults
    assert collective in lowered(first_split_rows)  # the default threshold


def test_all_reduce_without_an_axis_is_the_identity():
    x = jnp.arange(6.0, dtype=jnp.bfloat16)
    assert _ffi.all_reduce(x, ()) is x


@pytest.mark.slow  # 8 ranks
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_operator_results_do_not_depend_on_the_split(dtype, monkeypatch):
    """mm_all_reduce_base on 8 ranks: the split all-reduce (forced at this
    size) and psum give the same bits."""
    import jax_mc2 as mc2

    mesh = Mesh(np.array(jax.devices()[:8]), ("tp",))
    rng = np.random.default_rng(7)
    x1 = jnp.asarray(rng.standard_normal((24, 64)), dtype)
    x2 = jnp.asarray(rng.standard_normal((64, 40)), dtype)

    def run():
        fn = jax.shard_map(
            lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", implementation="ffi"),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None)),
            out_specs=P(),
            check_vma=False,
        )
        return np.asarray(jax.jit(fn)(x1, x2).astype(jnp.float32))

    split = run()
    monkeypatch.setattr(_ffi, "SPLIT_ALL_REDUCE_MIN_ELEMENTS", 1 << 40)
    monkeypatch.setattr(_ffi, "FLOAT16_SPLIT_MIN_ELEMENTS", 1 << 40)
    np.testing.assert_array_equal(split, run())
