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
from jax_mc2 import quant
from jax_mc2.ascend import _rules

# float32 output dropped (the packed-scale rows refuse it at lowering: see
# test_float32_output_with_packed_scales_is_refused_at_lowering). The MX rows
# include MXFP4 (x1/x2 packed two fp4 values per byte by the lowering).
test_rows_single_device_bit_exact = for_ascend(t.test_rows_single_device_bit_exact)
test_rows_sharded = for_ascend(t.test_rows_sharded)
test_fp8_pertile_comm_chain = for_ascend(t.test_fp8_pertile_comm_chain)
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


def test_float32_output_with_packed_scales_is_refused_at_lowering():
    """With packed x2_scale words aclnnQuantMatmulAllReduceV4 writes fp16 /
    bf16 only; the 'generic' target's float32 output is refused by the
    ascend lowering (the other scale layouts keep float32 output)."""
    x1 = np.zeros((4, 64), ml_dtypes.float8_e4m3fn)
    x2 = np.zeros((64, 8), ml_dtypes.float8_e4m3fn)
    scale = mc2.quant.trans_quant_param(np.ones((8,), np.float32))

    def call(out_dtype):
        return jax.jit(
            lambda a, b: mc2.quant_matmul_all_reduce_v4(
                a, b, None, x2_scale=scale, out_dtype=out_dtype, implementation="ascend"
            )
        )

    assert '"aclnnQuantMatmulAllReduceV4"' in call(jnp.bfloat16).lower(x1, x2).as_text()
    pertoken_f32 = jax.jit(
        lambda a, b: mc2.quant_matmul_all_reduce_v4(
            a,
            b,
            None,
            x2_scale=np.ones((8,), np.float32),
            x1_scale=np.ones((4,), np.float32),
            out_dtype=jnp.float32,
            implementation="ascend",
        )
    )
    assert '"aclnnQuantMatmulAllReduceV4"' in pertoken_f32.lower(x1, x2).as_text()
    with pytest.raises(
        NotImplementedError,
        match=r"^quant_matmul_all_reduce_v4: implementation='ascend' takes out_dtype float16 or "
        r"bfloat16 with packed x2_scale words .*got out_dtype=float32 with x2_scale "
        r"uint32\(8, 2\)",
    ):
        call(jnp.float32).lower(x1, x2)


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
def test_mxfp4_sharded(out_dtype):
    """MXFP4 over 2 ranks (test_rows_sharded's only fp4 row has float32
    output, which CANN's V4 does not write)."""
    t.test_rows_sharded(
        impl="ascend", mode="mx", kind="float4_e2m1fn", out_dtype=out_dtype, world=2
    )


def _lowered_mxfp4(k):
    """The lowered text of an ascend MXFP4 call, x1 (4, k) and x2 (8, k)
    transposed, one 64-value scale block pair."""
    f4 = ml_dtypes.float4_e2m1fn
    x1, x2 = np.zeros((4, k), f4), np.zeros((8, k), f4)
    s1 = np.ones((4, 1, 2), ml_dtypes.float8_e8m0fnu)
    s2 = np.ones((8, 1, 2), ml_dtypes.float8_e8m0fnu)
    f = jax.jit(
        lambda a, b: mc2.quant_matmul_all_reduce_v4(
            a,
            b,
            None,
            x2_scale=s2,
            x1_scale=s1,
            out_dtype=jnp.bfloat16,
            transpose_x2=True,
            group_size=quant.group_size(1, 1, 32),
            implementation="ascend",
        )
    )
    return f.lower(x1, x2).as_text()


def test_mxfp4_packs_two_values_per_byte():
    """x1 / x2 keep their logical FLOAT4_E2M1 (code 40) descriptors, element
    strides included (x2 transposed: the (k, n) view of the stored [n, k]);
    their buffers are packed bytes, low nibble first."""
    text = _lowered_mxfp4(64)
    assert "to0/40/2/0/4,64/64,1/4,64" in text and "to1/40/2/0/64,8/1,64/512" in text
    call = next(line for line in text.splitlines() if "mc2_ascend_host_bridge" in line)
    assert "tensor<4x32xui8>" in call and "tensor<8x32xui8>" in call


@pytest.mark.parametrize("shape", [(2, 8), (4,), (3, 2, 6)])
def test_fp4_packing_nibble_order(shape):
    """Row-major over the stored array, element 2j in the low nibble and
    2j + 1 in the high one (as the double's FLOAT4_E2M1 reader, and CANN,
    read them). The end-to-end MX cases cannot see a swap within a pair: x1
    and x2 (transposed) both pack along k, and the dot product does not
    change when both permute k."""
    size = int(np.prod(shape))
    codes = (np.arange(size, dtype=np.uint8) * 7 % 16).reshape(shape)
    got = np.asarray(jax.jit(_rules._pack_fp4)(codes.view(ml_dtypes.float4_e2m1fn)))
    flat = codes.reshape(-1)
    want = (flat[0::2] | (flat[1::2] << 4)).reshape(_rules._packed_fp4_shape(shape))
    np.testing.assert_array_equal(got, want)


def test_mxfp4_odd_k_is_refused():
    """CANN's FLOAT4_E2M1 tensors pack two values a byte along the inner
    axis, which must be even: k = 33 (ceil(33 / 32) = 2 blocks, as the
    seed's MX rule asks) is refused at lowering, naming the rule."""
    with pytest.raises(NotImplementedError, match="float4_e2m1fn x1 / x2 with an even k.*k = 33"):
        _lowered_mxfp4(33)
