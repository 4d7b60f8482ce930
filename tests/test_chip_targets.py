"""Every operator x every chip target (atlas-a2, atlas-a3, ascend-950):
an operator the chip lacks is NotImplementedError; where it exists, an
unsupported world size, dtype and comm_turn are each rejected with the
documented class, naming the operator and the offending argument, and the
supported call still traces. Abstract evaluation only (jax.eval_shape)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2
from jax_mc2 import quant
from jax_mc2.framework import targets as T

S = jax.ShapeDtypeStruct
F16, F32, I8 = jnp.float16, jnp.float32, jnp.int8
OPS = (
    "mm_all_reduce_base",
    "matmul_all_reduce_add_rms_norm",
    "inplace_matmul_all_reduce_add_rms_norm",
    "quant_matmul_all_reduce",
    "quant_matmul_all_reduce_v4",
    "alltoallv_grouped_matmul",
    "grouped_matmul_alltoallv",
)
CHIPS = (T.ATLAS_A2, T.ATLAS_A3, T.ASCEND_950)
EP_OPS = OPS[5:]
WORDS = np.asarray(quant.trans_quant_param(np.full(6, 0.01, np.float32)))


def _call(op, axis, *, dtype=F16, comm_turn=0, world=1):
    """A minimal valid call of op (fp16 operands), with one thing changed:
    dtype of the float operands / scale, comm_turn."""
    fn = getattr(mc2, op)
    if op == "mm_all_reduce_base":
        return lambda a, b: fn(a, b, axis, comm_turn=comm_turn), (
            S((4, 8), dtype),
            S((8, 6), dtype),
        )
    if op.endswith("add_rms_norm"):
        args = (S((1, 4, 8), dtype), S((8, 6), dtype), S((1, 4, 6), dtype), S((6,), dtype))
        return lambda *a: fn(*a, axis, comm_turn=comm_turn), args
    if op == "quant_matmul_all_reduce":
        scale = S(WORDS.shape, WORDS.dtype) if dtype == F16 else S((6,), dtype)
        return (
            lambda a, b, c: fn(a, b, axis, dequant_scale=c, comm_turn=comm_turn),
            (S((4, 8), I8), S((8, 6), I8), scale),
        )
    if op == "quant_matmul_all_reduce_v4":
        scale = S(WORDS.shape, WORDS.dtype) if dtype == F16 else S((6,), dtype)
        return (
            lambda a, b, c: fn(a, b, axis, x2_scale=c, comm_turn=comm_turn),
            (S((4, 8), I8), S((8, 6), I8), scale),
        )
    # 64 rows to every peer of 4096 values: 4 MB a card at 8 ranks (Atlas A3
    # requires 2 to 100 MB).
    e, c, h = 1, 64, 4096
    counts = np.full((world, e * world), c, np.int64)
    return (
        lambda a, b: fn(a, b, axis, send_counts=counts),
        (S((c * world, h), dtype), S((e, h, h), dtype)),
    )


def _eval(op, world, **kw):
    if world == 1 and op not in EP_OPS:
        f, args = _call(op, None, **kw)
        return jax.eval_shape(f, *args)
    mesh = make_mesh((world,), ("tp",))
    inner, args = _call(op, "tp", world=world, **kw)
    f = jax.shard_map(
        lambda *a: jax.tree.leaves(inner(*a))[0],
        mesh=mesh,
        in_specs=tuple(P() for _ in args),
        out_specs=P(),
        check_vma=False,
    )
    return jax.eval_shape(f, *args)


def _supported_world(support):
    if support.world_sizes is None:
        return 1
    return min(w for w in support.world_sizes if w <= 8)


# The CANN documents' card counts (written here, not read from jax_mc2):
# (supported world sizes, one the documents exclude).
A2 = ({1, 2, 4, 8}, 3)
DOCUMENTED_WORLDS = {
    ("mm_all_reduce_base", T.ATLAS_A2): A2,
    ("matmul_all_reduce_add_rms_norm", T.ATLAS_A2): A2,
    ("inplace_matmul_all_reduce_add_rms_norm", T.ATLAS_A2): A2,
    ("quant_matmul_all_reduce", T.ATLAS_A2): A2,
    ("quant_matmul_all_reduce_v4", T.ATLAS_A2): A2,
    ("alltoallv_grouped_matmul", T.ATLAS_A3): ({8, 16, 32, 64}, 4),
    ("grouped_matmul_alltoallv", T.ATLAS_A3): ({8, 16, 32, 64}, 4),
    ("mm_all_reduce_base", T.ASCEND_950): (set(range(1, 65)), 65),
    ("matmul_all_reduce_add_rms_norm", T.ASCEND_950): (set(range(1, 65)), 65),
    ("inplace_matmul_all_reduce_add_rms_norm", T.ASCEND_950): (set(range(1, 65)), 65),
    ("quant_matmul_all_reduce_v4", T.ASCEND_950): ({1, 2, 4, 8, 16, 32, 64}, 3),
    ("alltoallv_grouped_matmul", T.ASCEND_950): ({4, 8, 16, 32, 64}, 2),
    ("grouped_matmul_alltoallv", T.ASCEND_950): ({4, 8, 16, 32, 64}, 2),
}


CASES = [(op, chip) for op in OPS for chip in CHIPS]


@pytest.mark.parametrize("op,chip", CASES, ids=[f"{o}-{c}" for o, c in CASES])
def test_operator_on_chip(op, chip):
    support = T.PROFILES[chip].operators.get(op)
    with mc2.target(chip):
        assert (support is None) == ((op, chip) not in DOCUMENTED_WORLDS)
        if support is None:
            with pytest.raises(
                NotImplementedError, match=f"{op}: not available on target '{chip}'"
            ):
                _eval(op, 1 if op not in EP_OPS else 8)
            return
        world = _supported_world(support)
        _eval(op, world)  # the supported call traces
        # An unsupported world size.
        worlds, bad = DOCUMENTED_WORLDS[op, chip]
        assert set(support.world_sizes) == worlds
        with pytest.raises(NotImplementedError, match=rf"{op}: world size {bad} .*'{chip}'"):
            if bad <= 8:
                _eval(op, bad)
            else:  # beyond the 8 simulated devices: the check the operators call
                T.check_world_size(op, bad, ("tp",))
        # An unsupported dtype: float32 (generic only).
        with pytest.raises(TypeError, match=rf"{op}: .*float32"):
            _eval(op, world, dtype=F32)
        # comm_turn: CANN accepts only 0 on these chips (the EP operators have none).
        if op not in EP_OPS:
            assert support.comm_turn_zero_only
            with pytest.raises((NotImplementedError, ValueError), match=rf"{op}: .*comm_turn"):
                _eval(op, world, comm_turn=1)


def _mm_all_reduce_base_mode(mode, world):
    """eval_shape of a mm_all_reduce_base call in ``mode`` on ``world`` ranks."""
    m, k, n = 4, 16 * world, 8
    x1 = jax.ShapeDtypeStruct((m, k), jnp.int8 if mode == "full quant" else jnp.bfloat16)
    x2 = jax.ShapeDtypeStruct((k, n), jnp.int8 if mode != "float" else jnp.bfloat16)
    kw = {}
    if mode == "weight-only":
        kw = dict(antiquant_scale=jax.ShapeDtypeStruct((n,), jnp.bfloat16))
    elif mode == "full quant":
        kw = dict(dequant_scale=jax.ShapeDtypeStruct((n,), jnp.bfloat16))
    f = jax.shard_map(
        lambda a, b, kw: mc2.mm_all_reduce_base(a, b, "tp", **kw),
        mesh=make_mesh((world,), ("tp",)),
        in_specs=(P(None, "tp"), P("tp", None), P()),
        out_specs=P(),
        check_vma=False,
    )
    return jax.eval_shape(f, x1, x2, kw)


@pytest.mark.parametrize("mode", ["weight-only", "full quant"])
def test_mm_all_reduce_base_quantized_modes_take_the_v4_card_counts_on_950(mode):
    """On Ascend 950 the quantized modes of mm_all_reduce_base take the V4
    kernel's card counts (1, 2, 4, 8, 16, 32, 64), while the floating mode
    takes any count up to 64."""
    with mc2.target(T.ASCEND_950):
        _mm_all_reduce_base_mode("float", 3)
        _mm_all_reduce_base_mode(mode, 4)
        with pytest.raises(
            NotImplementedError, match=r"world size 3 .*supported: 1, 2, 4, 8, 16, 32, 64"
        ):
            _mm_all_reduce_base_mode(mode, 3)


def test_every_operator_and_chip_is_in_the_table():
    ops_in_profiles = {op for p in T.PROFILES.values() for op in p.operators}
    assert ops_in_profiles == set(OPS)
    assert set(CHIPS) | {T.GENERIC} == set(T.TARGETS)
