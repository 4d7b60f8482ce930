"""implementation="ascend" of quant_matmul_all_reduce_v4's low-precision rows
(fp8, hifloat8 as uint8 with dtype code 34, MX, perblock) through
aclnnQuantMatmulAllReduceV4 and the CANN test double."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import test_quant_v4_lowp as t
from ascend_matrix import for_ascend

import jax_mc2 as mc2

# fp4: see test_fp4_is_refused; float32 output: CANN's V4 writes fp16/bf16.
_DROP = ("float4_e2m1fn",)
test_rows_single_device_bit_exact = for_ascend(t.test_rows_single_device_bit_exact, drop=_DROP)
test_rows_sharded = for_ascend(t.test_rows_sharded, drop=_DROP)
test_fp8_pertile_comm_chain = for_ascend(t.test_fp8_pertile_comm_chain, drop=_DROP)
test_perblock_general_scales_and_3d_x1 = for_ascend(t.test_perblock_general_scales_and_3d_x1)
test_vmap_and_not_differentiable = for_ascend(t.test_vmap_and_not_differentiable)


def test_hifloat8_travels_as_uint8_with_code_34():
    x1 = np.zeros((4, 64), np.uint8)
    x2 = np.zeros((64, 8), np.uint8)
    scale = np.ones((8,), np.float32)
    f = jax.jit(
        lambda a, b: mc2.quant_matmul_all_reduce_v4(
            a,
            b,
            None,
            x2_scale=scale,
            x1_scale=np.ones((4,), np.float32),
            out_dtype=jnp.bfloat16,
            x1_format="hifloat8",
            x2_format="hifloat8",
            implementation="ascend",
        )
    )
    text = f.lower(x1, x2).as_text()
    assert "to0/34/2/0/4,64/64,1/4,64" in text and "to1/34/2/0/64,8/8,1/64,8" in text
    assert '"aclnnQuantMatmulAllReduceV4"' in text


def test_fp4_is_refused():
    f4 = ml_dtypes.float4_e2m1fn
    x1 = np.zeros((4, 64), f4)
    x2 = np.zeros((8, 64), f4)
    s1 = np.ones((4, 1, 2), ml_dtypes.float8_e8m0fnu)
    s2 = np.ones((8, 1, 2), ml_dtypes.float8_e8m0fnu)
    with pytest.raises(NotImplementedError, match="float4_e2m1fn"):
        mc2.quant_matmul_all_reduce_v4(
            x1,
            x2,
            None,
            x2_scale=s2,
            x1_scale=s1,
            out_dtype=jnp.bfloat16,
            transpose_x2=True,
            implementation="ascend",
        )
