"""A tensor-parallel decoder block on 8 simulated CPU devices.

The attention output projection goes through
``jax_mc2.parallel.row_parallel_linear_add_rms_norm`` (matmul + all-reduce +
residual add + RMSNorm, fused) and the MLP down-projection through
``jax_mc2.parallel.row_parallel_linear`` (matmul + all-reduce). The block is
jitted on a tp=8 mesh and on a dp=2 x tp=4 mesh and compared with the same
block computed on one device with plain jax.numpy; the gradient of a loss
with respect to every weight is compared the same way. For float16/bfloat16
the block then runs with a W8A8 MLP down-projection (int8 activations per
token, int8 weights per channel: ``mm_all_reduce_base`` full quantization),
and with ``--lowbit-comm`` also with its int8 low-bit communication.

    python examples/tp_transformer_block.py [--dtype bfloat16|float16|float32] [--lowbit-comm]
        [--batch B] [--seq S] [--d-model D] [--heads H] [--ffn F]  (see --help)
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jax_mc2 as mc2  # noqa: E402


def init_params(key, d, ffn, dtype):
    keys = jax.random.split(key, 8)

    def w(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)

    return {
        "ln1": jnp.ones((d,), dtype),
        "wqkv": w(keys[0], (d, 3 * d), d),
        "wo": w(keys[1], (d, d), d),
        "bo": w(keys[2], (d,), 4),
        "ln2": (1 + 0.1 * jax.random.normal(keys[3], (d,))).astype(dtype),
        "w_gate": w(keys[4], (d, ffn), d),
        "w_up": w(keys[5], (d, ffn), d),
        "w_down": w(keys[6], (ffn, d), ffn),
        "b_down": w(keys[7], (d,), 4),
    }


def rms_norm(x, gamma, eps=1e-6):
    xf = x.astype(jnp.float32)
    out = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return (out * gamma.astype(jnp.float32)).astype(x.dtype)


def attention(params, h, heads):
    b, s, d = h.shape
    qkv = jnp.einsum("bsd,de->bse", h, params["wqkv"], preferred_element_type=jnp.float32)
    q, k, v = jnp.split(qkv.reshape(b, s, 3, heads, d // heads), 3, axis=2)
    q, k, v = (t[:, :, 0] for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
    causal = jnp.tril(jnp.ones((s, s), bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d).astype(h.dtype)


def swiglu(params, h):
    gate = jnp.einsum("bsd,df->bsf", h, params["w_gate"], preferred_element_type=jnp.float32)
    up = jnp.einsum("bsd,df->bsf", h, params["w_up"], preferred_element_type=jnp.float32)
    return (jax.nn.silu(gate) * up).astype(h.dtype)


def block_tp(params, x, *, heads, mesh, dp, implementation=None, w8a8=None):
    """The block with its two row-parallel projections on jax_mc2 operators.

    ``w8a8``: None, or ``(w_down_int8, W8A8 config)`` for an int8 x int8 MLP
    down-projection (per-token activations, per-channel weights).
    """
    attn = attention(params, rms_norm(x, params["ln1"]), heads)
    # y = x + attn @ wo + bo;  h2 = RMSNorm(y) * ln2  (one fused operator)
    y, h2 = mc2.parallel.row_parallel_linear_add_rms_norm(
        attn,
        params["wo"],
        x,
        params["ln2"],
        mesh=mesh,
        axis="tp",
        bias=params["bo"],
        data_axis=dp,
        implementation=implementation,
    )
    if w8a8 is None:
        down = mc2.parallel.row_parallel_linear(
            swiglu(params, h2),
            params["w_down"],
            mesh=mesh,
            axis="tp",
            bias=params["b_down"],
            data_axis=dp,
            implementation=implementation,
        )
    else:
        w_int8, quant = w8a8
        down = mc2.parallel.row_parallel_linear(
            swiglu(params, h2),
            w_int8,
            mesh=mesh,
            axis="tp",
            bias=params["b_down"],
            data_axis=dp,
            quant=quant,
            implementation=implementation,
        )
    return y + down


def attention_residual_reference(params, x, *, heads):
    """The block's first half with plain jax.numpy on one device: the
    residual stream y = x + attention(RMSNorm(x)) @ wo + bo."""
    attn = attention(params, rms_norm(x, params["ln1"]), heads)
    return (
        jnp.einsum("bsd,de->bse", attn, params["wo"], preferred_element_type=jnp.float32)
        + params["bo"].astype(jnp.float32)
        + x.astype(jnp.float32)
    ).astype(x.dtype)


def block_reference(params, x, *, heads):
    """The same block with plain jax.numpy on one device."""
    y = attention_residual_reference(params, x, heads=heads)
    h2 = rms_norm(y, params["ln2"])
    down = (
        jnp.einsum(
            "bsf,fd->bsd", swiglu(params, h2), params["w_down"], preferred_element_type=jnp.float32
        )
        + params["b_down"].astype(jnp.float32)
    ).astype(x.dtype)
    return y + down


def loss_of(block):
    def loss(params, x):
        return jnp.mean(jnp.square(block(params, x).astype(jnp.float32)))

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
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument(
        "--lowbit-comm",
        action="store_true",
        help="also run the W8A8 MLP with int8 low-bit communication",
    )
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    devices = jax.devices()
    if len(devices) < 8:
        raise SystemExit(
            f"needs 8 devices, found {len(devices)}: set XLA_FLAGS="
            "--xla_force_host_platform_device_count=8"
        )

    params = init_params(jax.random.key(0), args.d_model, args.ffn, dtype)
    x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.d_model)).astype(dtype)

    reference = functools.partial(block_reference, heads=args.heads)
    ref_fwd = jax.jit(reference)
    want = np.asarray(ref_fwd(params, x), np.float32)
    want_grads = jax.tree.map(
        lambda g: np.asarray(g, np.float32), jax.jit(jax.grad(loss_of(reference)))(params, x)
    )
    scale = np.abs(want).max()
    print(
        f"jax_mc2 tensor-parallel decoder block: batch={args.batch} seq={args.seq} "
        f"d_model={args.d_model} heads={args.heads} ffn={args.ffn} dtype={dtype.name}, "
        f"{len(devices)} {devices[0].platform.upper()} devices"
    )
    ref_ms = median_ms(ref_fwd, params, x)
    print(
        f"{'mesh':<14}{'implementation':<16}{'max |err| fwd':>15}{'rel':>10}"
        f"{'max |err| grad':>16}{'step ms':>10}{'1-device ms':>13}"
    )
    worst = 0.0
    for shape, names, dp in (((8,), ("tp",), None), ((2, 4), ("dp", "tp"), "dp")):
        mesh = Mesh(np.array(devices[: int(np.prod(shape))]).reshape(shape), names)
        for impl in ("ffi", "xla"):
            block = functools.partial(
                block_tp, heads=args.heads, mesh=mesh, dp=dp, implementation=impl
            )
            fwd = jax.jit(block)
            grad = jax.jit(jax.grad(loss_of(block)))
            got = np.asarray(fwd(params, x), np.float32)
            got_grads = grad(params, x)
            err = float(np.abs(got - want).max())
            gerr = max(
                float(
                    np.abs(np.asarray(got_grads[k], np.float32) - want_grads[k]).max()
                    / (np.abs(want_grads[k]).max() + 1e-30)
                )
                for k in want_grads
            )
            worst = max(worst, err / scale)
            mesh_name = " x ".join(f"{n}={s}" for n, s in zip(names, shape))
            print(
                f"{mesh_name:<14}{impl:<16}{err:>15.3e}{err / scale:>10.2e}{gerr:>16.2e}"
                f"{median_ms(fwd, params, x):>10.2f}{ref_ms:>13.2f}"
            )
    tol = {"bfloat16": 3e-2, "float16": 5e-3, "float32": 1e-4}[dtype.name]
    status = "OK" if worst <= tol else "MISMATCH"
    print(
        f"{status}: worst relative forward error {worst:.2e} "
        f"(tolerance {tol:.0e} for {dtype.name}); "
        "grad errors are relative to each weight's largest gradient"
    )
    if status != "OK":
        raise SystemExit(1)
    if dtype.name in ("bfloat16", "float16"):
        w8a8_section(args, params, x, want, scale, devices)


def w8a8_section(args, params, x, want, scale, devices):
    """The same block with a W8A8 (int8 x int8) MLP down-projection, against
    the unquantized single-device block."""
    dtype = x.dtype
    w_int8, w_scale = mc2.parallel.quantize_weight_int8(params["w_down"])
    comm_scales = [("W8A8", None)]
    if args.lowbit_comm:
        # Static calibration of the communication scale from the reference
        # down-projection: scale_1 covers twice the output range, scale_2 the
        # sum over the tp ranks.
        y = jax.jit(functools.partial(attention_residual_reference, heads=args.heads))(params, x)
        h2 = rms_norm(y, params["ln2"])
        down = jnp.einsum(
            "bsf,fd->bsd", swiglu(params, h2), params["w_down"], preferred_element_type=jnp.float32
        )
        comm_scales.append(
            ("W8A8 + int8 comm", jnp.full((x.shape[-1],), 2 * jnp.max(jnp.abs(down)) / 127, dtype))
        )
    print(
        f"\nW8A8 MLP down-projection (per-token int8 activations, per-channel int8 weights), "
        f"{dtype.name} output, against the unquantized 1-device block:"
    )
    print(f"{'mesh':<14}{'variant':<20}{'max |err| fwd':>15}{'rel':>10}{'step ms':>10}")
    for shape, names, dp in (((8,), ("tp",), None), ((2, 4), ("dp", "tp"), "dp")):
        mesh = Mesh(np.array(devices[: int(np.prod(shape))]).reshape(shape), names)
        for label, s1 in comm_scales:
            comm = None if s1 is None else (s1, (s1 * mesh.shape["tp"]).astype(dtype))
            quant = mc2.parallel.W8A8(w_scale, dtype, comm)
            fwd = jax.jit(
                functools.partial(
                    block_tp, heads=args.heads, mesh=mesh, dp=dp, w8a8=(w_int8, quant)
                )
            )
            got = np.asarray(fwd(params, x), np.float32)
            err = float(np.abs(got - want).max())
            mesh_name = " x ".join(f"{n}={s}" for n, s in zip(names, shape))
            print(
                f"{mesh_name:<14}{label:<20}{err:>15.3e}{err / scale:>10.2e}"
                f"{median_ms(fwd, params, x):>10.2f}"
            )
            limit = 3e-2 if s1 is None else 1e-1
            if err / scale > limit:
                raise SystemExit(f"MISMATCH: {label} relative error {err / scale:.2e} > {limit}")
    print("OK: W8A8 within 3e-2 (with int8 communication 1e-1) of the unquantized block")


if __name__ == "__main__":
    main()
