"""implementation="ascend" of the int8 operators (aclnnQuantMatmulAllReduce
V1/V2/V3) and the weight-only mode (aclnnWeightQuantMatmulAllReduce): the
int8 and weight-only test matrices run through the CANN test double."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_quant_matmul_all_reduce as q
import test_weight_quant as wq
from ascend_matrix import for_ascend
from conftest import make_mesh
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2

test_int8_single_device_bit_exact = for_ascend(q.test_single_device_bit_exact)
test_int8_sharded_values = for_ascend(q.test_sharded_values)
test_base_full_quant = for_ascend(q.test_mm_all_reduce_base_full_quant)
test_base_full_quant_sharded = for_ascend(q.test_mm_all_reduce_base_full_quant_sharded)
test_comm_quant_chain = for_ascend(q.test_comm_quant_chain)
test_int32_bias_before_float_conversion = for_ascend(
    q.test_int32_bias_added_before_the_float_conversion
)
test_comm_quantization_of_nan_is_zero = for_ascend(q.test_comm_quantization_of_nan_is_zero)
test_fractal_nz_weights_seed_004_and_000 = for_ascend(q.test_fractal_nz_weights_seed_004_and_000)

test_weight_quant_bit_exact = for_ascend(wq.test_dequantized_weights_bit_exact)
test_weight_quant_sharded = for_ascend(wq.test_sharded_values)


def _lowered(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def test_version_choice_follows_torch_npu():
    mesh = make_mesh((2,), ("tp",))
    x1 = jnp.ones((4, 32), jnp.int8)
    x2 = jnp.ones((32, 8), jnp.int8)
    scale = jnp.ones((8,), jnp.bfloat16)
    pertoken = jnp.ones((4,), jnp.float32)
    cq = jnp.ones((8,), jnp.bfloat16)

    def sharded(**kw):
        def f(a, b):
            return mc2.mm_all_reduce_base(a, b, "tp", implementation="ascend", **kw)

        g = jax.shard_map(f, mesh=mesh, in_specs=(P(None, "tp"), P("tp", None)), out_specs=P())
        return jax.jit(g).lower(x1, x2).as_text()

    plain = sharded(dequant_scale=scale)
    assert '"aclnnQuantMatmulAllReduce"' in plain
    v2 = sharded(dequant_scale=jnp.ones((8,), jnp.float32), pertoken_scale=pertoken)
    assert '"aclnnQuantMatmulAllReduceV2"' in v2
    v3 = sharded(dequant_scale=scale, comm_quant_scale_1=cq, comm_quant_scale_2=cq)
    assert '"aclnnQuantMatmulAllReduceV3"' in v3
    for text in (plain, v2, v3):
        assert text.count("mc2_ascend_host_bridge") == 1
        assert "stablehlo.all_reduce" not in text and "stablehlo.all_to_all" not in text


def test_packed_pairs_travel_as_uint64():
    x1 = np.ones((4, 32), np.int8)
    x2 = np.ones((32, 8), np.int8)
    scale = mc2.quant.trans_quant_param(np.full((8,), 0.5, np.float32))
    text = _lowered(
        lambda a, b: mc2.quant_matmul_all_reduce(
            a, b, None, dequant_scale=scale, implementation="ascend"
        ),
        x1,
        x2,
    )
    # dtype code 10 (UINT64), shape (8,) over the uint32 pairs' bytes
    assert "to2/10/2/0/8/1/8" in text
    got = mc2.quant_matmul_all_reduce(x1, x2, None, dequant_scale=scale, implementation="ascend")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.full((4, 8), 16.0, np.float32))


def test_weight_quant_float32_x1_is_refused_at_lowering():
    """aclnnWeightQuantMatmulAllReduce takes fp16/bf16 x1; the 'generic'
    target's float32 x1 is refused by the ascend lowering."""
    x1 = np.ones((4, 32), np.float32)
    x2 = np.ones((32, 8), np.int8)
    scale = np.ones((8,), np.float32)
    f = jax.jit(
        lambda a, b: mc2.mm_all_reduce_base(
            a, b, None, antiquant_scale=scale, implementation="ascend"
        )
    )
    with pytest.raises(
        NotImplementedError,
        match=r"^mm_all_reduce_base: implementation='ascend' takes x1 as float16 or bfloat16 "
        r"\(aclnnWeightQuantMatmulAllReduce has no float32 kernel\), got float32\(4, 32\)",
    ):
        f.lower(x1, x2)


def test_comm_turn_is_cann_s_error():
    x1 = np.ones((4, 32), np.int8)
    x2 = np.ones((32, 8), np.int8)
    scale = np.ones((8,), jnp.bfloat16)
    with pytest.raises(
        Exception,
        match=r"quant_matmul_all_reduce: aclnnQuantMatmulAllReduceGetWorkspaceSize failed with "
        r"status 161002: .*commTurn must be 0",
    ):
        mc2.quant_matmul_all_reduce(
            x1, x2, None, dequant_scale=scale, comm_turn=2, implementation="ascend"
        )


def test_vmap_and_eval_shape():
    rng = np.random.default_rng(0)
    x1 = rng.integers(-5, 5, (3, 4, 32)).astype(np.int8)
    x2 = rng.integers(-5, 5, (32, 8)).astype(np.int8)
    scale = np.full((8,), 0.25, jnp.bfloat16)

    def f(a):
        return mc2.quant_matmul_all_reduce(
            a,
            x2,
            None,
            dequant_scale=scale,
            implementation="ascend",
        )

    out = jax.eval_shape(jax.vmap(f), x1)
    assert out.shape == (3, 4, 8) and out.dtype == jnp.bfloat16
    got = np.asarray(jax.vmap(f)(x1), np.float32)
    want = (x1.astype(np.float32) @ x2.astype(np.float32)) * 0.25
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
