"""Abstract shape checks: which configurations each chip target accepts.

``jax.eval_shape`` runs every operator's validation without touching a
device. This prints, for a grid of configurations, the verdict under each
chip target and the reason for each rejection.

    python examples/shape_check.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_mc2 as mc2  # noqa: E402

S = jax.ShapeDtypeStruct
F8 = jnp.float8_e4m3fn
E8M0 = jnp.float8_e8m0fnu


def mm_case(world, x1, x2, dtype, **kw):
    def run():
        mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
        f = jax.shard_map(
            functools.partial(mc2.mm_all_reduce_base, axis_name="tp", **kw),
            mesh=mesh,
            in_specs=(P(*(None,) * (len(x1) - 1), "tp"), P("tp", None)),
            out_specs=P(),
        )
        return jax.eval_shape(f, S(x1, dtype), S(x2, dtype))

    return run


def norm_case(world, x1, x2, residual, dtype, **kw):
    def run():
        mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
        f = jax.shard_map(
            functools.partial(mc2.matmul_all_reduce_add_rms_norm, axis_name="tp", **kw),
            mesh=mesh,
            in_specs=(P(*(None,) * (len(x1) - 1), "tp"), P("tp", None), P(), P()),
            out_specs=(P(), P()),
        )
        return jax.eval_shape(
            f, S(x1, dtype), S(x2, dtype), S(residual, dtype), S((x2[1],), dtype)
        )[1]

    return run


def quant_case(world, x1, x2, scale_dtype, n):
    def run():
        mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
        f = jax.shard_map(
            lambda a, b, s: mc2.quant_matmul_all_reduce(a, b, "tp", dequant_scale=s),
            mesh=mesh,
            in_specs=(P(*(None,) * (len(x1) - 1), "tp"), P("tp", None), P()),
            out_specs=P(),
        )
        scale = S((n, 2), jnp.uint32) if scale_dtype == "packed" else S((n,), scale_dtype)
        return jax.eval_shape(f, S(x1, jnp.int8), S(x2, jnp.int8), scale)

    return run


def v4_case(world, x1_dtype, scale_dtype, n=256, k=1024, **kw):
    def run():
        mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
        f = jax.shard_map(
            lambda a, b, s: mc2.quant_matmul_all_reduce_v4(a, b, "tp", x2_scale=s, **kw),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None), P()),
            out_specs=P(),
        )
        return jax.eval_shape(f, S((128, k), x1_dtype), S((k, n), x1_dtype), S((n,), scale_dtype))

    return run


def v4_quant_case(world, x1, x2, x2_scale, x1_scale=None, *, transpose_x2=False, **kw):
    """quant_matmul_all_reduce_v4 with k sharded over ``world`` ranks.

    x1, x2, x2_scale, x1_scale: ``(global ShapeDtypeStruct, PartitionSpec)``.
    """

    def run():
        mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
        arrays = [x1, x2, x2_scale] + ([x1_scale] if x1_scale else [])

        def fn(a, b, s, *t):
            return mc2.quant_matmul_all_reduce_v4(
                a,
                b,
                "tp",
                x2_scale=s,
                x1_scale=t[0] if t else None,
                transpose_x2=transpose_x2,
                **kw,
            )

        f = jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec for _, spec in arrays), out_specs=P())
        return jax.eval_shape(f, *(aval for aval, _ in arrays))

    return run


def weight_quant_case(world, dtype, group):
    def run():
        mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
        f = jax.shard_map(
            lambda a, b, s: mc2.mm_all_reduce_base(
                a, b, "tp", antiquant_scale=s, antiquant_group_size=group
            ),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None), P()),
            out_specs=P(),
        )
        scale = (-(-1024 // world // group), 256) if group else (256,)
        return jax.eval_shape(f, S((64, 1024), dtype), S((1024, 256), jnp.int8), S(scale, dtype))

    return run


CASES = [
    (
        "mm_all_reduce_base",
        "fp16 (m,k)=(1024,4096) n=1024, 8 ranks",
        mm_case(8, (1024, 4096), (4096, 1024), jnp.float16),
    ),
    (
        "mm_all_reduce_base",
        "bf16 (b,s,k)=(4,256,2048) n=512, 4 ranks",
        mm_case(4, (4, 256, 2048), (2048, 512), jnp.bfloat16),
    ),
    (
        "mm_all_reduce_base",
        "fp32 (m,k)=(256,1024) n=256, 2 ranks",
        mm_case(2, (256, 1024), (1024, 256), jnp.float32),
    ),
    (
        "mm_all_reduce_base",
        "bf16 (m,k)=(256,1024) n=256, 16 ranks",
        mm_case(16, (256, 1024), (1024, 256), jnp.bfloat16),
    ),
    (
        "mm_all_reduce_base",
        "fp16 (m,k)=(256,1024) n=256, comm_turn=4, 8 ranks",
        mm_case(8, (256, 1024), (1024, 256), jnp.float16, comm_turn=4),
    ),
    (
        "mm_all_reduce_base",
        "fp16 empty m: (0,1024) n=256, 2 ranks",
        mm_case(2, (0, 1024), (1024, 256), jnp.float16),
    ),
    (
        "mm_all_reduce_base",
        "fp16 k mismatch: x1 (64,512) x2 (256,64), 1 rank",
        mm_case(1, (64, 512), (256, 64), jnp.float16),
    ),
    (
        "quant_matmul_all_reduce",
        "int8 (m,k)=(1024,4096) n=1024, packed scales, 8 ranks",
        quant_case(8, (1024, 4096), (4096, 1024), "packed", 1024),
    ),
    (
        "quant_matmul_all_reduce",
        "int8 (m,k)=(64,131072) n=64, bf16 scales, 2 ranks",
        quant_case(2, (64, 131072), (131072, 64), jnp.bfloat16, 64),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "int8, bf16 x2_scale, 8 ranks",
        v4_case(8, jnp.int8, jnp.bfloat16),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "int8 FRACTAL_NZ x2 (k,n)=(1024,256), 8 ranks",
        v4_quant_case(
            8,
            (S((128, 1024), jnp.int8), P(None, "tp")),
            (S((8, 64, 16, 32), jnp.int8), P(None, "tp")),
            (S((256,), jnp.bfloat16), P()),
            x2_format="FRACTAL_NZ",
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "fp8 e4m3fn pertoken, bf16 out, 8 ranks",
        v4_quant_case(
            8,
            (S((128, 1024), F8), P(None, "tp")),
            (S((1024, 256), F8), P("tp", None)),
            (S((256,), jnp.float32), P()),
            (S((128,), jnp.float32), P()),
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "fp8 e4m3fn without x1_scale (fp32 x2_scale), 8 ranks",
        v4_quant_case(
            8,
            (S((128, 1024), F8), P(None, "tp")),
            (S((1024, 256), F8), P("tp", None)),
            (S((256,), jnp.float32), P()),
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "fp8 e5m2 pertoken + fp8 comm (mode 1), 8 ranks",
        v4_quant_case(
            8,
            (S((128, 1024), jnp.float8_e5m2), P(None, "tp")),
            (S((1024, 256), jnp.float8_e5m2), P("tp", None)),
            (S((1,), jnp.float32), P()),
            (S((128,), jnp.float32), P()),
            comm_quant_mode=1,
            out_dtype=jnp.float32,
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "hifloat8 packed x2_scale, fp16 out, 4 ranks",
        v4_quant_case(
            4,
            (S((128, 1024), jnp.uint8), P(None, "tp")),
            (S((1024, 256), jnp.uint8), P("tp", None)),
            (S((256, 2), jnp.uint32), P()),
            x1_format="hifloat8",
            x2_format="hifloat8",
            out_dtype=jnp.float16,
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "hifloat8 packed x2_scale, fp32 out, 4 ranks",
        v4_quant_case(
            4,
            (S((128, 1024), jnp.uint8), P(None, "tp")),
            (S((1024, 256), jnp.uint8), P("tp", None)),
            (S((256, 2), jnp.uint32), P()),
            x1_format="hifloat8",
            x2_format="hifloat8",
            out_dtype=jnp.float32,
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "fp8 perblock (m,k)=(256,2048) n=384, 8 ranks",
        v4_quant_case(
            8,
            (S((256, 2048), F8), P(None, "tp")),
            (S((2048, 384), F8), P("tp", None)),
            (S((16, 3), jnp.float32), P("tp", None)),
            (S((2, 16), jnp.float32), P(None, "tp")),
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "fp8 perblock m=200, group_size=0 (infers 100)",
        v4_quant_case(
            8,
            (S((200, 2048), F8), P(None, "tp")),
            (S((2048, 384), F8), P("tp", None)),
            (S((16, 3), jnp.float32), P("tp", None)),
            (S((2, 16), jnp.float32), P(None, "tp")),
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "fp8 perblock m=200, group_size (128,128,128)",
        v4_quant_case(
            8,
            (S((200, 2048), F8), P(None, "tp")),
            (S((2048, 384), F8), P("tp", None)),
            (S((16, 3), jnp.float32), P("tp", None)),
            (S((2, 16), jnp.float32), P(None, "tp")),
            group_size=mc2.quant.group_size(128, 128, 128),
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "MXFP4 x2 (n,k)=(256,2048), fp32 out, 8 ranks",
        v4_quant_case(
            8,
            (S((128, 2048), jnp.float4_e2m1fn), P(None, "tp")),
            (S((256, 2048), jnp.float4_e2m1fn), P(None, "tp")),
            (S((256, 32, 2), E8M0), P(None, "tp", None)),
            (S((128, 32, 2), E8M0), P(None, "tp", None)),
            transpose_x2=True,
            out_dtype=jnp.float32,
        ),
    ),
    (
        "quant_matmul_all_reduce_v4",
        "MXFP8 x2 not transposed, 8 ranks",
        v4_quant_case(
            8,
            (S((128, 2048), F8), P(None, "tp")),
            (S((2048, 256), F8), P("tp", None)),
            (S((256, 32, 2), E8M0), P(None, "tp", None)),
            (S((128, 32, 2), E8M0), P(None, "tp", None)),
        ),
    ),
    (
        "mm_all_reduce_base",
        "weight-only int8 x2, fp16 x1, pergroup 64, 4 ranks",
        weight_quant_case(4, jnp.float16, 64),
    ),
    (
        "mm_all_reduce_base",
        "weight-only int8 x2, bf16 x1, perchannel, 16 ranks",
        weight_quant_case(16, jnp.bfloat16, 0),
    ),
    (
        "matmul_all_reduce_add_rms_norm",
        "bf16 (b,s,k)=(2,512,4096) n=1024, 8 ranks",
        norm_case(8, (2, 512, 4096), (4096, 1024), (2, 512, 1024), jnp.bfloat16),
    ),
    (
        "matmul_all_reduce_add_rms_norm",
        "fp16 (m,k)=(1024,2048) n=512, 4 ranks",
        norm_case(4, (1024, 2048), (2048, 512), (4, 256, 512), jnp.float16),
    ),
    (
        "matmul_all_reduce_add_rms_norm",
        "fp16 epsilon=1.5, 2 ranks",
        norm_case(2, (64, 256), (256, 64), (1, 64, 64), jnp.float16, epsilon=1.5),
    ),
    (
        "matmul_all_reduce_add_rms_norm",
        "fp16 residual 2-D (64,64), 2 ranks",
        norm_case(2, (64, 256), (256, 64), (64, 64), jnp.float16),
    ),
]


def ep_case(world, bsk, h1, n1, experts, dtype, op="dispatch", shared=None):
    """AlltoAllv grouped matmul on a (world,) 'ep' AbstractMesh (any world
    size, no devices), with uniform static counts."""

    def run():
        mesh = jax.sharding.AbstractMesh((world,), ("ep",))
        counts = np.full(experts * world, bsk // (experts * world))
        fn = mc2.alltoallv_grouped_matmul if op == "dispatch" else mc2.grouped_matmul_alltoallv

        def f(x, w, *mm):
            extra = dict(mm_x=mm[0], mm_weight=mm[1]) if mm else {}
            return fn(x, w[0], "ep", send_counts=counts, **extra)[0]

        args = [S((world * bsk, h1), dtype), S((world, experts, h1, n1), dtype)]
        if shared is not None:
            args += [S((bsk, shared), dtype), S((shared, h1), dtype)]
        specs = (P("ep"), P("ep")) + ((P(), P()) if shared is not None else ())
        return jax.eval_shape(jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P("ep")), *args)

    return run


EP_CASES = [
    (
        "alltoallv_grouped_matmul",
        "bf16 BSK=8192 H1=4096 N1=7168 e=4, 8 ranks",
        ep_case(8, 8192, 4096, 7168, 4, jnp.bfloat16),
    ),
    (
        "alltoallv_grouped_matmul",
        "fp16 BSK=4096 H1=2048 N1=1024 e=2, 4 ranks",
        ep_case(4, 4096, 2048, 1024, 2, jnp.float16),
    ),
    (
        "alltoallv_grouped_matmul",
        "bf16 e=4, shared expert H2=16384, 16 ranks",
        ep_case(16, 4096, 2048, 1024, 4, jnp.bfloat16, shared=16384),
    ),
    (
        "alltoallv_grouped_matmul",
        "fp16 BSK=256 H1=256 N1=256 e=2 (256 KB a card), 8 ranks",
        ep_case(8, 256, 256, 256, 2, jnp.float16),
    ),
    (
        "alltoallv_grouped_matmul",
        "fp16 e=8, 64 ranks (e*W = 512)",
        ep_case(64, 8192, 1024, 1024, 8, jnp.float16),
    ),
    (
        "grouped_matmul_alltoallv",
        "bf16 A=8192 H1=4096 N1=7168 e=4, 32 ranks",
        ep_case(32, 8192, 4096, 7168, 4, jnp.bfloat16, op="combine"),
    ),
    (
        "grouped_matmul_alltoallv",
        "fp32 A=4096 H1=1024 N1=1024 e=2, 8 ranks",
        ep_case(8, 4096, 1024, 1024, 2, jnp.float32, op="combine"),
    ),
]


def verdict(run):
    try:
        out = run()
    except (TypeError, ValueError, NotImplementedError) as e:
        return "no", f"{type(e).__name__}: {e}"
    return "ok", f"{out.dtype}{list(out.shape)}"


def main():
    names = mc2.targets.TARGETS
    print("jax_mc2 shape check: jax.eval_shape per chip target (no device is touched)\n")
    header = f"{'operator':<32}{'configuration':<52}" + "".join(f"{n:>12}" for n in names)
    print(header)
    print("-" * len(header))
    reasons = []
    for op, desc, run in CASES + EP_CASES:
        cells = []
        for name in names:
            with mc2.target(name):
                ok, detail = verdict(run)
            cells.append(ok)
            if ok == "no":
                reasons.append((op, desc, name, detail))
        print(f"{op:<32}{desc:<52}" + "".join(f"{c:>12}" for c in cells))
    print("\nReasons for rejection:")
    for _op, desc, name, detail in reasons:
        print(f"  [{name}] {desc}\n      {detail}")


if __name__ == "__main__":
    main()
