"""Regressions: every public entry point validates its arguments in the
caller's terms (the function called, the argument as passed, global shapes
for the wrappers, the rule and the values)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMPLEMENTATIONS, make_mesh
from jax.sharding import PartitionSpec as P

import jax_mc2 as mc2
from jax_mc2 import parallel, quant

F8 = jnp.float8_e4m3fn
S = jax.ShapeDtypeStruct
_RNG = np.random.default_rng(0)

# Row-parallel linear: global x (8, 64), w (64, 16) over a 4-way "tp" axis.
_X = np.ones((8, 64), np.float32)
_W = np.ones((64, 16), np.float32)

# A small MoE: T = 16 tokens, H = 8, G = 4 experts, F = 8.
_T, _H, _G, _F = 16, 8, 4, 8
_XM = _RNG.standard_normal((_T, _H)).astype(np.float32)
_RW = _RNG.standard_normal((_H, _G)).astype(np.float32)
_WG = _RNG.standard_normal((_G, _H, _F)).astype(np.float32)
_WU = _RNG.standard_normal((_G, _H, _F)).astype(np.float32)
_WD = _RNG.standard_normal((_G, _F, _H)).astype(np.float32)

# A group-of-one dispatch: 2 local experts, 4 rows.
_GX = np.ones((4, 8), np.float32)
_GW = np.ones((2, 8, 8), np.float32)


def _rpl(**kw):
    args = {"mesh": make_mesh((4,), ("tp",)), "axis": "tp"}
    args.update(kw)
    x = args.pop("x", _X)
    w = args.pop("w", _W)
    return lambda: parallel.row_parallel_linear(x, w, **args)


def _rpl_norm(**kw):
    args = {"mesh": make_mesh((4,), ("tp",)), "axis": "tp"}
    args.update(kw)
    x = args.pop("x", _X.reshape(2, 4, 64))
    residual = args.pop("residual", np.zeros((2, 4, 16), np.float32))
    gamma = args.pop("gamma", np.ones(16, np.float32))
    return lambda: parallel.row_parallel_linear_add_rms_norm(x, _W, residual, gamma, **args)


def _moe(**kw):
    args = {"mesh": make_mesh((2,), ("ep",)), "axis": "ep"}
    args.update(kw)
    x = args.pop("x", _XM)
    return lambda: parallel.expert_parallel_moe(x, _RW, _WG, _WU, _WD, **args)


def _dispatch(**kw):
    args = {"send_counts": np.array([2, 2])}
    args.update(kw)
    return lambda: jax.eval_shape(lambda: mc2.alltoallv_grouped_matmul(_GX, _GW, None, **args))


def _perblock(m, n, k):
    a, sa = quant.perblock_quantize(np.ones((m, k), np.float32))
    b, sb = quant.perblock_quantize(np.ones((k, n), np.float32))
    return lambda: jax.eval_shape(
        lambda: mc2.quant_matmul_all_reduce_v4(a, b, None, x1_scale=sa, x2_scale=sb)
    )


def _mx(k):
    a, sa = quant.mx_quantize(np.ones((4, k), np.float32))
    b, sb = quant.mx_quantize(np.ones((8, k), np.float32))
    return lambda: jax.eval_shape(
        lambda: mc2.quant_matmul_all_reduce_v4(
            a, b, None, x1_scale=sa, x2_scale=sb, transpose_x2=True
        )
    )


def _mmar(x1_dtype, x2_dtype, x2_shape=(8, 4), **kw):
    x1, x2 = np.ones((4, 8), x1_dtype), np.ones(x2_shape, x2_dtype)
    return lambda: mc2.mm_all_reduce_base(x1, x2, None, **kw)


def _v4_int8(**kw):
    x1, x2 = np.ones((4, 8), np.int8), np.ones((8, 4), np.int8)
    scale = np.ones(4, jnp.bfloat16)
    return lambda: mc2.quant_matmul_all_reduce_v4(x1, x2, None, x2_scale=scale, **kw)


def _exchange(axis_name, world=4):
    mesh = make_mesh((world,), ("ep",))
    return lambda: jax.shard_map(
        lambda c: mc2.exchange_counts(c, axis_name), mesh=mesh, in_specs=P(), out_specs=P("ep")
    )(jnp.arange(8, dtype=jnp.int32))


def _moe_big():
    # t = 2**29 tokens per rank, top_k 2: the exact mode receives 2**31 rows.
    return lambda: jax.eval_shape(
        lambda x: parallel.expert_parallel_moe(
            x, _RW, _WG, _WU, _WD, mesh=make_mesh((2,), ("ep",)), axis="ep"
        ),
        S((2**30, _H), jnp.float32),
    )


CASES = {
    # A 2-D weight with trans_weight indexed w.shape[2] before the rank check.
    "gmm_trans_weight_2d": (
        lambda: mc2.grouped_matmul(
            np.ones((4, 3), np.float32), np.ones((3, 5), np.float32), [2, 2], trans_weight=True
        ),
        TypeError,
        r"grouped_matmul: w must be 3-D \(G, n, k\) with k == 3, got \(3, 5\)",
    ),
    # row_parallel_linear validates global shapes and names itself.
    "rpl_wrong_weight": (
        _rpl(w=np.ones((32, 16), np.float32)),
        TypeError,
        r"row_parallel_linear: w must be 2-D \(k, n\) with k == x.shape\[-1\] == 64, "
        r"got \(32, 16\)",
    ),
    "rpl_wrong_weight_transposed": (
        _rpl(w=np.ones((64, 16), np.float32), transpose_w=True),
        TypeError,
        r"row_parallel_linear: w must be 2-D \(n, k\) \(transpose_w\) with k == "
        r"x.shape\[-1\] == 64, got \(64, 16\)",
    ),
    "rpl_wrong_bias": (
        _rpl(bias=np.zeros(8, np.float32)),
        TypeError,
        r"row_parallel_linear: bias must be \(n,\) = \(16,\), got \(8,\)",
    ),
    "rpl_k_not_divisible": (
        _rpl(x=np.ones((8, 6), np.float32), w=np.ones((6, 16), np.float32)),
        ValueError,
        r"row_parallel_linear: k = 6 .* multiple of the 4 ranks of axis 'tp'",
    ),
    "rpl_mesh_none": (
        _rpl(mesh=None),
        TypeError,
        r"row_parallel_linear: mesh must be a jax.sharding.Mesh, got None",
    ),
    "rpl_data_axis_is_axis": (
        _rpl(mesh=make_mesh((2, 4), ("dp", "tp")), data_axis="tp"),
        ValueError,
        r"row_parallel_linear: data_axis must differ from axis, got 'tp' for both",
    ),
    "rpl_transpose_w_str": (
        _rpl(transpose_w="yes"),
        ValueError,
        r"row_parallel_linear: transpose_w must be a bool, got 'yes'",
    ),
    # row_parallel_linear_add_rms_norm checks residual and gamma itself.
    "rpl_norm_residual_shape": (
        _rpl_norm(residual=np.zeros((8, 16), np.float32)),
        TypeError,
        r"row_parallel_linear_add_rms_norm: residual must be 3-D \(b, s, n\) = \(2, 4, 16\), "
        r"got \(8, 16\)",
    ),
    "rpl_norm_gamma_shape": (
        _rpl_norm(gamma=np.ones(8, np.float32)),
        TypeError,
        r"row_parallel_linear_add_rms_norm: gamma must be \(n,\) = \(16,\), got \(8,\)",
    ),
    # The float mode's w and bias share x's dtype: the wrapper says so, not
    # mm_all_reduce_base about x2 / bias.
    "rpl_w_dtype": (
        _rpl(w=_W.astype(np.float16)),
        TypeError,
        r"row_parallel_linear: w dtype must equal x dtype float32, got float16",
    ),
    "rpl_bias_dtype": (
        _rpl(bias=np.zeros(16, np.float16)),
        TypeError,
        r"row_parallel_linear: bias dtype must equal x dtype float32, got float16",
    ),
    "rpl_norm_bias_dtype": (
        _rpl_norm(bias=jnp.zeros(16, jnp.bfloat16)),
        TypeError,
        r"row_parallel_linear_add_rms_norm: bias dtype must equal x dtype float32, "
        r"got bfloat16",
    ),
    "rpl_norm_residual_dtype": (
        _rpl_norm(residual=np.zeros((2, 4, 16), np.float16)),
        TypeError,
        r"row_parallel_linear_add_rms_norm: residual dtype must equal x dtype float32, "
        r"got float16",
    ),
    "rpl_norm_residual_dtype_inplace": (
        _rpl_norm(residual=jnp.zeros((2, 4, 16), jnp.bfloat16), inplace=True),
        TypeError,
        r"row_parallel_linear_add_rms_norm: residual dtype must equal x dtype float32, "
        r"got bfloat16",
    ),
    "rpl_norm_gamma_dtype": (
        _rpl_norm(gamma=np.ones(16, np.float16)),
        TypeError,
        r"row_parallel_linear_add_rms_norm: gamma dtype must equal x dtype float32, got float16",
    ),
    "rpl_norm_gamma_dtype_f16_x": (
        _rpl_norm(
            x=np.ones((2, 4, 64), np.float16),
            residual=np.zeros((2, 4, 16), np.float16),
            gamma=np.ones(16, np.float32),
        ),
        TypeError,
        r"row_parallel_linear_add_rms_norm: gamma dtype must equal x dtype float16, got float32",
    ),
    # expert_parallel_moe static arguments.
    "moe_top_k_float": (
        _moe(top_k=2.5),
        ValueError,
        r"expert_parallel_moe: top_k must be a Python int, got 2.5",
    ),
    "moe_top_k_bool": (
        _moe(top_k=True),
        ValueError,
        r"expert_parallel_moe: top_k must be a Python int, got True",
    ),
    "moe_capacity_factor_str": (
        _moe(capacity_factor="1.0"),
        ValueError,
        r"expert_parallel_moe: capacity_factor must be None or a finite number > 0, "
        r"got '1.0'",
    ),
    "moe_capacity_overflow": (
        _moe_big(),
        ValueError,
        r"expert_parallel_moe: .*2147483648.* must fit int32",
    ),
    # alltoallv_grouped_matmul counts and capacities.
    "a2av_send_counts_none": (
        _dispatch(send_counts=None),
        TypeError,
        r"alltoallv_grouped_matmul: send_counts is required",
    ),
    "a2av_send_counts_str": (
        _dispatch(send_counts="22"),
        TypeError,
        r"alltoallv_grouped_matmul: send_counts must hold integers, got '22'",
    ),
    "a2av_send_counts_uint64_huge": (
        _dispatch(send_counts=np.array([2**63, 4], np.uint64)),
        ValueError,
        r"alltoallv_grouped_matmul: send_counts must fit int32 .*got 9223372036854775808",
    ),
    "a2av_max_tokens_per_peer_2_31": (
        _dispatch(send_counts=jnp.array([2, 2]), max_tokens_per_peer=2**31),
        ValueError,
        r"alltoallv_grouped_matmul: max_tokens_per_peer must be <= 2147483647 .*got 2147483648",
    ),
    "a2av_max_recv_tokens_2_31": (
        _dispatch(send_counts=jnp.array([2, 2]), max_recv_tokens=2**31),
        ValueError,
        r"alltoallv_grouped_matmul: max_recv_tokens must be <= 2147483647 .*got 2147483648",
    ),
    "a2av_permute_out_flag_str": (
        _dispatch(permute_out_flag="no"),
        ValueError,
        r"alltoallv_grouped_matmul: permute_out_flag must be a bool, got 'no'",
    ),
    # exchange_counts axis names.
    "exchange_counts_axis_int": (
        lambda: mc2.exchange_counts(jnp.array([1, 2]), 5),
        ValueError,
        r"exchange_counts: axis_name must be None, a mesh axis name .*got 5",
    ),
    "exchange_counts_axis_empty": (
        lambda: mc2.exchange_counts(jnp.array([1, 2]), ""),
        ValueError,
        r"exchange_counts: axis_name must be None, a mesh axis name .*got ''",
    ),
    "exchange_counts_axis_duplicate": (
        _exchange(("ep", "ep")),
        ValueError,
        r"exchange_counts: axis_name must not repeat a name, got \('ep', 'ep'\)",
    ),
    # mm_all_reduce_base: the dtype the caller passed.
    "mmar_int64_x1": (
        _mmar(np.int64, np.float32),
        TypeError,
        r"mm_all_reduce_base: x1 dtype int64",
    ),
    "mmar_transpose_x2_str": (
        _mmar(np.float32, np.float32, x2_shape=(4, 8), transpose_x2="yes"),
        ValueError,
        r"mm_all_reduce_base: transpose_x2 must be a bool, got 'yes'",
    ),
    # v4 perblock / MX with the default group_size: say what to pass.
    "v4_perblock_m_200": (
        _perblock(200, 128, 256),
        ValueError,
        r"quant_matmul_all_reduce_v4: .*m = 200.*pass group_size=jax_mc2.quant.group_size"
        r"\(128, 128, 128\)",
    ),
    "v4_perblock_k_200": (
        _perblock(128, 128, 200),
        ValueError,
        r"quant_matmul_all_reduce_v4: .*k = 200.*pass group_size=jax_mc2.quant.group_size"
        r"\(128, 128, 128\)",
    ),
    "v4_mx_k_96": (
        _mx(96),
        ValueError,
        r"quant_matmul_all_reduce_v4: .*k = 96.*pass group_size=jax_mc2.quant.group_size"
        r"\(1, 1, 32\)",
    ),
    # Messages name the argument and the values passed.
    "a2av_mm_x_without_mm_weight": (
        _dispatch(mm_x=np.ones((2, 8), np.float32)),
        ValueError,
        r"alltoallv_grouped_matmul: mm_x and mm_weight .* got mm_x=float32\(2, 8\) and "
        r"mm_weight=None",
    ),
    "a2av_static_and_traced_counts": (
        _dispatch(recv_counts=jnp.array([2, 2])),
        TypeError,
        r"alltoallv_grouped_matmul: send_counts and recv_counts .* got ndarray send_counts "
        r"and \w+ recv_counts",
    ),
    "mmar_pertoken_without_dequant": (
        _mmar(np.float32, np.float32, pertoken_scale=np.ones(4, np.float32)),
        TypeError,
        r"mm_all_reduce_base: pertoken_scale .* got pertoken_scale=float32\(4,\) with "
        r"dequant_scale=None",
    ),
    "mmar_one_comm_scale": (
        _mmar(
            np.int8,
            np.int8,
            dequant_scale=np.ones(4, np.float32),
            comm_quant_scale_1=np.ones(4, np.float16),
        ),
        ValueError,
        r"mm_all_reduce_base: comm_quant_scale_1 and comm_quant_scale_2 must be given "
        r"together, got comm_quant_scale_1=float16\(4,\) and comm_quant_scale_2=None",
    ),
    "mmar_antiquant_offset_without_scale": (
        _mmar(np.float16, np.int8, antiquant_offset=np.ones(4, np.float16)),
        ValueError,
        r"mm_all_reduce_base: antiquant_offset .* got antiquant_offset=float16\(4,\) and "
        r"antiquant_group_size=0 with antiquant_scale=None",
    ),
    # Dtype and int arguments that are not one: named, not numpy's or jnp's
    # own error.
    "v4_int8_out_dtype_not_a_dtype": (
        _v4_int8(out_dtype="bogus"),
        TypeError,
        r"quant_matmul_all_reduce_v4: out_dtype must be a dtype, got 'bogus'",
    ),
    "v4_int8_group_size_bool": (
        _v4_int8(group_size=False),
        ValueError,
        r"quant_matmul_all_reduce_v4: group_size must be a Python int, got False",
    ),
    "rpl_w8a8_out_dtype_not_a_dtype": (
        _rpl(quant=parallel.W8A8(np.ones(16), out_dtype="bogus")),
        TypeError,
        r"row_parallel_linear: W8A8.out_dtype must be a dtype, got 'bogus'",
    ),
    "mmar_antiquant_group_size_float_without_scale": (
        _mmar(np.float16, np.float16, antiquant_group_size=0.0),
        ValueError,
        r"mm_all_reduce_base: antiquant_group_size must be a Python int, got 0.0",
    ),
    "rpl_w8a8_weight_scale_shape": (
        _rpl(w=_W.astype(np.int8), quant=parallel.W8A8(np.ones(4))),
        TypeError,
        r"row_parallel_linear: W8A8.weight_scale must be \(n,\) = \(16,\), got \(4,\)",
    ),
    "rpl_w8a8_comm_scale_shape": (
        _rpl(
            w=_W.astype(np.int8),
            quant=parallel.W8A8(np.ones(16), comm_quant_scales=(np.ones(16), np.ones(3))),
        ),
        TypeError,
        r"W8A8.comm_quant_scales\[1\] must be \(n,\) = \(16,\), got \(3,\)",
    ),
    "rpl_w8a8_float_w": (
        _rpl(quant=parallel.W8A8(np.ones(16))),
        TypeError,
        r"row_parallel_linear: w dtype must be int8 with quant=W8A8 .*got float32",
    ),
    "rpl_w8a8_comm_scale_dtype": (
        _rpl(
            w=_W.astype(np.int8),
            quant=parallel.W8A8(
                np.ones(16), comm_quant_scales=(np.ones(16, np.float32), np.ones(16, np.float32))
            ),
        ),
        TypeError,
        r"row_parallel_linear: W8A8.comm_quant_scales\[0\] dtype must be W8A8.out_dtype "
        r"bfloat16, got float32",
    ),
    "rpl_int8_x_without_quant": (
        _rpl(x=_X.astype(np.int8), w=_W.astype(np.int8)),
        TypeError,
        r"row_parallel_linear: x dtype must be a float dtype, got int8 .*quant=W8A8",
    ),
    "moe_data_axes_repeated": (
        _moe(mesh=make_mesh((2, 2), ("dp", "ep")), data_axes=("dp", "dp")),
        ValueError,
        r"expert_parallel_moe: data_axes must not repeat an axis, got \('dp', 'dp'\)",
    ),
    # quant helpers.
    "trans_quant_param_round_mode_bool": (
        lambda: quant.trans_quant_param(np.ones(4, np.float32), round_mode=True),
        ValueError,
        r"trans_quant_param: round_mode must be 0 or 1, got True",
    ),
    "hifloat8_decode_int_dtype": (
        lambda: quant.hifloat8_decode(np.zeros(4, np.uint8), jnp.int32),
        TypeError,
        r"hifloat8_decode: dtype must be a floating dtype, got int32",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejects(case):
    call, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.slow
def test_rpl_list_operands_are_arrays():
    """Like the operators (jnp.asarray), the wrappers accept lists."""
    want = parallel.row_parallel_linear(
        _X, _W, mesh=make_mesh((4,), ("tp",)), axis="tp", bias=np.ones(16, np.float32)
    )
    got = parallel.row_parallel_linear(
        _X.tolist(), _W.tolist(), mesh=make_mesh((4,), ("tp",)), axis="tp", bias=[1.0] * 16
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("x64", [False, True])
def test_int64_bias_rejected_with_and_without_x64(x64):
    """An int64 bias is rejected whether JAX would narrow it or not."""
    x1 = np.ones((4, 8), np.int8)
    x2 = np.ones((8, 4), np.int8)
    with jax.enable_x64(x64), pytest.raises(TypeError, match=r"mm_all_reduce_base: bias .*int64"):
        jax.eval_shape(
            lambda: mc2.mm_all_reduce_base(
                x1,
                x2,
                None,
                dequant_scale=np.ones(4, np.float32),
                bias=np.zeros(4, np.int64),
            )
        )


@pytest.mark.parametrize("impl", ["xla", "ffi"])
def test_v4_comm_quant_mode_empty_m(impl):
    """m = 0 with the fp8 pertile communication: an empty result."""
    out = mc2.quant_matmul_all_reduce_v4(
        jnp.zeros((0, 256), F8),
        jnp.zeros((256, 128), F8),
        None,
        x1_scale=jnp.zeros((0,), jnp.float32),
        x2_scale=jnp.ones((128,), jnp.float32),
        comm_quant_mode=1,
        implementation=impl,
    )
    assert out.shape == (0, 128)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_low_bit_communication_empty_n(impl):
    """n = 0 with the int8 chain and with the fp8 pertile communication: an
    empty result (a reshape(-1, 0) raised ZeroDivisionError)."""
    empty = jnp.ones((0,), jnp.bfloat16)
    out = mc2.mm_all_reduce_base(
        jnp.ones((2, 4), jnp.int8),
        jnp.ones((4, 0), jnp.int8),
        None,
        dequant_scale=jnp.ones((1,), jnp.bfloat16),
        comm_quant_scale_1=empty,
        comm_quant_scale_2=empty,
        implementation=impl,
    )
    assert out.shape == (2, 0) and out.dtype == jnp.bfloat16
    out = mc2.quant_matmul_all_reduce_v4(
        jnp.ones((2, 4), F8),
        jnp.ones((4, 0), F8),
        None,
        x1_scale=jnp.ones((2,), jnp.float32),
        x2_scale=jnp.ones((1,), jnp.float32),
        comm_quant_mode=1,
        implementation=impl,
    )
    assert out.shape == (2, 0)


@pytest.mark.slow
@pytest.mark.parametrize("var", ["JAX_MC2_IMPLEMENTATION", "JAX_MC2_TARGET"])
def test_empty_environment_variable_means_unset(var):
    env = dict(os.environ, **{var: ""})
    r = subprocess.run(
        [sys.executable, "-c", "import jax_mc2; print(jax_mc2.get_target())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "generic"


@pytest.mark.slow
def test_make_mesh_explicit_axes_row_parallel_linear():
    """A jax.make_mesh mesh (Explicit axes by default) works and agrees with a Mesh."""
    x = _RNG.standard_normal((8, 64)).astype(np.float32)
    w = _RNG.standard_normal((64, 16)).astype(np.float32)
    b = _RNG.standard_normal(16).astype(np.float32)
    want = parallel.row_parallel_linear(
        x, w, bias=b, mesh=make_mesh((2, 4), ("dp", "tp")), axis="tp", data_axis="dp"
    )
    got = parallel.row_parallel_linear(
        x, w, bias=b, mesh=jax.make_mesh((2, 4), ("dp", "tp")), axis="tp", data_axis="dp"
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("types", ["explicit-auto", "auto-explicit"])
def test_mixed_explicit_and_auto_mesh_row_parallel_linear(types):
    """A mesh with one Explicit and one Auto axis: the inputs are resharded
    over the Explicit axes only (reshard refuses Auto axes), with the same
    result as a Mesh of Auto axes; on 2 x 2 devices."""
    from jax.sharding import AxisType

    kinds = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
    axis_types = tuple(kinds[t] for t in types.split("-"))
    x = _RNG.standard_normal((4, 16)).astype(np.float32)
    w = _RNG.standard_normal((16, 8)).astype(np.float32)
    b = _RNG.standard_normal(8).astype(np.float32)
    kw = dict(bias=b, axis="tp", data_axis="dp")
    want = parallel.row_parallel_linear(x, w, mesh=make_mesh((2, 2), ("dp", "tp")), **kw)
    mixed = jax.make_mesh((2, 2), ("dp", "tp"), axis_types=axis_types, devices=jax.devices()[:4])
    got = parallel.row_parallel_linear(x, w, mesh=mixed, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_make_mesh_explicit_axes_expert_parallel_moe():
    want = parallel.expert_parallel_moe(
        _XM, _RW, _WG, _WU, _WD, mesh=make_mesh((2, 4), ("dp", "ep")), axis="ep"
    )
    got = parallel.expert_parallel_moe(
        _XM, _RW, _WG, _WU, _WD, mesh=jax.make_mesh((2, 4), ("dp", "ep")), axis="ep"
    )
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_static_counts_received_rows_past_int32_are_named():
    """A rank receives its column block of the per-rank table from every
    peer: with two local experts that sum can pass int32 while every single
    column and every row fits."""
    a = 805_306_368  # 1.5 * 2^29
    send = np.array([[a, a, 0, 0], [a, 0, 0, 0]])
    f = jax.shard_map(
        lambda x, w: mc2.alltoallv_grouped_matmul(x, w, "ep", send_counts=send)[0],
        mesh=make_mesh((2,), ("ep",)),
        in_specs=(P(), P()),
        out_specs=P(),
        check_vma=False,
    )
    with pytest.raises(
        ValueError, match=r"sent \[1610612736, 805306368\] and received \[2415919104, 0\]"
    ):
        jax.eval_shape(f, S((2 * a, 8), jnp.float16), S((2, 8, 8), jnp.float16))


def test_quant_matmul_all_reduce_float32_scale_hint_names_existing_arguments():
    """quant_matmul_all_reduce (seed 000) has no pertoken scale: the hint for a
    float32 dequant scale names the packing helper and the operators that
    take one, not an argument of its own it does not have."""
    x1, x2 = np.ones((4, 8), np.int8), np.ones((8, 6), np.int8)
    with pytest.raises(TypeError) as info:
        mc2.quant_matmul_all_reduce(x1, x2, None, dequant_scale=np.ones(6, np.float32))
    message = str(info.value)
    assert message.startswith("quant_matmul_all_reduce: dequant_scale dtype must be")
    assert "quant.trans_quant_param" in message and "mm_all_reduce_base (pertoken_scale)" in message
    assert "needs pertoken_scale" not in message


def test_group_size_with_bits_above_47_names_the_operator():
    x1 = np.ones((4, 256), F8)
    x2 = np.ones((256, 128), F8)
    with pytest.raises(ValueError, match=r"^quant_matmul_all_reduce_v4: .*bits above 47 must be 0"):
        mc2.quant_matmul_all_reduce_v4(
            x1, x2, None, x1_scale=np.ones((1, 2), np.float32),
            x2_scale=np.ones((2, 1), np.float32), group_size=(1 << 50) | (128 << 32) | (128 << 16),
        )  # fmt: skip


def test_ragged_static_counts_are_the_operators_type_error():
    with pytest.raises(
        TypeError, match=r"^alltoallv_grouped_matmul: send_counts must be a rectangular table"
    ):
        mc2.alltoallv_grouped_matmul(
            np.ones((4, 8), np.float16), np.ones((1, 8, 4), np.float16), None,
            send_counts=[[1, 1, 1, 1], [1, 1]],
        )  # fmt: skip


def test_group_sizes_past_int64_say_so():
    with pytest.raises(
        TypeError, match=r"group_sizes must be .* \(Python integers must fit int64\)"
    ):
        mc2.grouped_matmul(np.ones((2, 8), np.float32), np.ones((2, 8, 4), np.float32), [2**70, 1])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mc2.mm_all_reduce_base(None, _W, None), "mm_all_reduce_base: x1 is required"),
        (lambda: mc2.mm_all_reduce_base(_X, None, None), "mm_all_reduce_base: x2 is required"),
        (
            lambda: mc2.matmul_all_reduce_add_rms_norm(_X, _W, None, np.ones(16), None),
            "matmul_all_reduce_add_rms_norm: residual is required",
        ),
        (lambda: mc2.grouped_matmul(_GX, None, [4, 0]), "grouped_matmul: w is required"),
        (
            lambda: mc2.alltoallv_grouped_matmul(None, _GW, None, send_counts=np.array([2, 2])),
            "alltoallv_grouped_matmul: gmm_x is required",
        ),
        (
            lambda: mc2.quant_matmul_all_reduce_v4(
                _X.astype(F8), _W.astype(F8), None, x2_scale=None
            ),
            "quant_matmul_all_reduce_v4: x2_scale is required",
        ),
    ],
)
def test_a_required_argument_given_none_is_named(call, message):
    # They raised IndexError (pop from empty list) or JAX's own ValueError.
    with pytest.raises(TypeError, match=message):
        call()


def test_v4_int8_x2_with_fp8_x1_is_named_as_a_mismatch():
    # The message listed int8 among the dtypes x2 may have, and then said it was int8.
    with pytest.raises(TypeError, match="x2 is int8 but the other operand is not"):
        mc2.quant_matmul_all_reduce_v4(
            _X.astype(F8),
            _W.astype(np.int8),
            None,
            x1_scale=np.ones(8, np.float32),
            x2_scale=np.ones(16, np.float32),
            out_dtype=jnp.bfloat16,
        )


@pytest.mark.parametrize(
    "args, message",
    [
        ((64, 2, 8, 0, 1.0), "world must be >= 1, got 0"),  # was ZeroDivisionError
        ((64, 2, 8, 4, -1.0), "capacity_factor must be None or a finite number > 0"),  # was 1
        ((64, 2, 6, 4, None), "num_experts must be a positive multiple of world = 4, got 6"),
        ((64, 0, 8, 4, None), "top_k must be >= 1, got 0"),
        ((10, 20, 8, 4, None), "top_k must be at most num_experts = 8, got 20"),  # was accepted
    ],
)
def test_moe_capacities_checks_its_arguments(args, message):
    with pytest.raises(ValueError, match=f"moe_capacities: {message}"):
        parallel.moe_capacities(*args)


def test_moe_without_tokens_is_refused_in_its_own_terms():
    # It failed inside the dispatch, naming max_tokens_per_peer.
    with pytest.raises(ValueError, match="expert_parallel_moe: T = 0 tokens must be a positive"):
        _moe(x=_XM[:0])()


def test_packed_scale_words_take_python_ints_as_64_bit_words():
    # A list went through jnp.asarray, which raised OverflowError past int32.
    low, high = quant.packed_scale_words([1 << 46, 3])
    assert low.tolist() == [0, 3] and high.tolist() == [1 << 14, 0]
    with pytest.raises(TypeError, match="must fit in 64 bits"):
        quant.packed_scale_words([1 << 70])


def test_perblock_quantize_takes_a_numpy_integer_block():
    _, scales = quant.perblock_quantize(np.ones((4, 4), np.float32), block=np.int64(2))
    assert scales.shape == (2, 2)


def test_moe_capacity_is_at_most_what_a_rank_can_send():
    # A large factor gave per_expert = 10**10, which the operator then refused
    # as past int32 and asked for "a capacity_factor", though one was given.
    assert parallel.moe_capacities(4, 2, 8, 4, 1e10) == parallel.moe_capacities(4, 2, 8, 4, None)
    assert parallel.moe_capacities(4, 2, 8, 4, 1e300).per_expert == 8


def test_dispatch_counts_rows_past_int32_are_named():
    # It raised OverflowError from inside jit, naming neither the function nor rows.
    with pytest.raises(ValueError, match=r"dispatch_counts: rows must be <= 2147483647"):
        mc2.dispatch_counts(np.array([1, 2]), 2**31, None)


def test_resolve_group_size_needs_three_dims():
    # It zipped (m, n, k) with shorter or longer sequences and dropped fields.
    with pytest.raises(ValueError, match=r"dims and scale_dims must each be \(m, n, k\)"):
        quant.resolve_group_size(0, (128, 128), (1, 1, 1))
