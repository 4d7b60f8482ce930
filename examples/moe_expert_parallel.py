"""An expert-parallel mixture-of-experts layer on 8 simulated CPU devices.

``jax_mc2.parallel.expert_parallel_moe`` routes each token to its top-k
experts, dispatches the rows with ``alltoallv_grouped_matmul`` (AlltoAllv +
Permute + the experts' gate/up grouped matmul, the shared expert alongside),
applies SwiGLU, and combines with ``grouped_matmul_alltoallv`` (the down
grouped matmul + the inverse AlltoAllv). The layer runs jitted on an ep=8 mesh
and on a dp=2 x ep=4 mesh, forward and backward, and is compared with a dense
MoE computed on one device with plain jax.numpy. It prints the errors, the
step times and the all-to-all padding overhead (bytes moved / useful bytes;
XLA:CPU has no ragged all-to-all, so the exchange runs at a fixed capacity).

    python examples/moe_expert_parallel.py [--dtype float32|bfloat16|float16]
        [--capacity-factor C] [--tokens T] [--d-model D] [--ffn F] [--experts G]
        [--top-k K] [--shared-ffn FS]  (see --help)
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jax_mc2 as mc2  # noqa: E402
from jax_mc2.parallel import SharedExpert  # noqa: E402


def init_params(key, d, ffn, experts, shared_ffn, dtype):
    keys = jax.random.split(key, 8)

    def w(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)

    return {
        "router": w(keys[0], (d, experts), d),
        "w_gate": w(keys[1], (experts, d, ffn), d),
        "w_up": w(keys[2], (experts, d, ffn), d),
        "w_down": w(keys[3], (experts, ffn, d), ffn),
        "shared": SharedExpert(
            w(keys[4], (d, shared_ffn), d),
            w(keys[5], (d, shared_ffn), d),
            w(keys[6], (shared_ffn, d), shared_ffn),
        ),
    }


def moe_dense(params, x, top_k):
    """The same MoE on one device: every expert on every token, masked."""
    f32 = jnp.float32
    xf = x.astype(f32)
    logits = xf @ params["router"].astype(f32)
    top, ids = jax.lax.top_k(logits, top_k)
    weights = jax.nn.softmax(top, axis=-1)
    combine = jnp.zeros(logits.shape).at[jnp.arange(x.shape[0])[:, None], ids].set(weights)
    gate = jnp.einsum("th,ghf->tgf", xf, params["w_gate"].astype(f32))
    up = jnp.einsum("th,ghf->tgf", xf, params["w_up"].astype(f32))
    per_expert = jnp.einsum("tgf,gfh->tgh", jax.nn.silu(gate) * up, params["w_down"].astype(f32))
    y = jnp.einsum("tg,tgh->th", combine, per_expert)
    sg, su, sd = (w.astype(f32) for w in params["shared"])
    return (y + (jax.nn.silu(xf @ sg) * (xf @ su)) @ sd).astype(x.dtype)


def moe_ep(params, x, *, mesh, top_k, capacity_factor, implementation):
    return mc2.parallel.expert_parallel_moe(
        x,
        params["router"],
        params["w_gate"],
        params["w_up"],
        params["w_down"],
        mesh=mesh,
        axis="ep",
        top_k=top_k,
        capacity_factor=capacity_factor,
        shared_expert=params["shared"],
        implementation=implementation,
    )


def loss_of(fn):
    def loss(params, x):
        return jnp.mean(jnp.square(fn(params, x).astype(jnp.float32)))

    return loss


def median_ms(fn, *args, repeat=10):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--shared-ffn", type=int, default=512)
    parser.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="per-rank expert capacity factor (default: exact no-drop mode)",
    )
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    devices = jax.devices()
    if len(devices) < 8:
        raise SystemExit(
            f"needs 8 devices, found {len(devices)}: set XLA_FLAGS="
            "--xla_force_host_platform_device_count=8"
        )
    params = init_params(
        jax.random.key(0), args.d_model, args.ffn, args.experts, args.shared_ffn, dtype
    )
    x = jax.random.normal(jax.random.key(1), (args.tokens, args.d_model)).astype(dtype)
    top_k, cf = args.top_k, args.capacity_factor

    dense = jax.jit(lambda p, x: moe_dense(p, x, top_k))
    want = np.asarray(dense(params, x), np.float32)
    want_grads = jax.tree.map(
        lambda g: np.asarray(g, np.float32), jax.jit(jax.grad(loss_of(dense)))(params, x)
    )
    dense_ms = median_ms(dense, params, x)
    dense_step = jax.jit(jax.value_and_grad(loss_of(dense)))
    dense_step_ms = median_ms(dense_step, params, x)
    scale = np.abs(want).max()
    mode = "exact no-drop" if cf is None else f"capacity factor {cf}"
    print(
        f"jax_mc2 expert-parallel MoE: tokens={args.tokens} d_model={args.d_model} "
        f"ffn={args.ffn} experts={args.experts} top_k={top_k} shared_ffn={args.shared_ffn} "
        f"dtype={dtype.name}, {mode}, {len(devices)} {devices[0].platform.upper()} devices"
    )
    print(
        f"{'mesh':<14}{'impl':<6}{'max |err| fwd':>14}{'rel':>10}{'grad rel':>10}"
        f"{'dropped':>9}{'fwd ms':>9}{'fwd+bwd ms':>12}{'a2a moved/routed':>18}"
        f"{'moved/kept':>12}"
    )
    worst = 0.0
    for shape, names in (((8,), ("ep",)), ((2, 4), ("dp", "ep"))):
        mesh = Mesh(np.array(devices[: int(np.prod(shape))]).reshape(shape), names)
        world = mesh.shape["ep"]
        t_local = args.tokens // int(np.prod(shape))
        caps = mc2.parallel.moe_capacities(t_local, top_k, args.experts, world, cf)
        for impl in ("ffi", "xla"):

            def layer(p, x, mesh=mesh, impl=impl):
                return moe_ep(p, x, mesh=mesh, top_k=top_k, capacity_factor=cf, implementation=impl)

            fwd = jax.jit(layer)
            out = fwd(params, x)
            got = np.asarray(out.y, np.float32)
            step = jax.jit(jax.value_and_grad(loss_of(lambda p, x, f=layer: f(p, x).y)))
            _, grads = step(params, x)
            gerr = max(
                float(np.abs(np.asarray(g, np.float32) - w).max() / (np.abs(w).max() + 1e-30))
                for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads))
            )
            err = float(np.abs(got - want).max())
            dropped = int(out.dropped)
            routed = args.tokens * top_k
            # Each all-to-all moves W * per_peer rows per rank (of H values);
            # the routed rows are the token-expert pairs, the kept ones those
            # within capacity.
            moved = int(np.prod(shape)) * world * caps.per_peer
            if dropped == 0:
                worst = max(worst, err / scale, gerr)
            mesh_name = " x ".join(f"{n}={s}" for n, s in zip(names, shape))
            print(
                f"{mesh_name:<14}{impl:<6}{err:>14.3e}{err / scale:>10.2e}{gerr:>10.2e}"
                f"{dropped:>9}{median_ms(lambda p, x, f=fwd: f(p, x).y, params, x):>9.2f}"
                f"{median_ms(step, params, x):>12.2f}{moved / routed:>18.2f}"
                f"{moved / (routed - dropped):>12.2f}"
            )
    print(f"dense 1-device MoE: fwd {dense_ms:.2f} ms, fwd+bwd {dense_step_ms:.2f} ms")
    tol = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}[dtype.name]
    if cf is None:
        status = "OK" if worst <= tol else "MISMATCH"
        print(
            f"{status}: worst relative error (forward and gradients) {worst:.2e} "
            f"(tolerance {tol:.0e} for {dtype.name})"
        )
        if status != "OK":
            raise SystemExit(1)
    else:
        print(
            "(with a capacity factor, dropped token-expert pairs make the dense comparison loose)"
        )


if __name__ == "__main__":
    main()
