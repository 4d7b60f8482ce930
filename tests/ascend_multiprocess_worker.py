"""One process of the ascend multi-process tests: 2 CPU devices bound to 2
NPUs of the CANN test double, jax.distributed on 127.0.0.1; the HCCL root
info travels through JAX's key-value store.

Usage: python ascend_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

The gradient case (:func:`grad_case`, :func:`grad_fn`) is shared with the
test, which computes the one-process reference with the same function.
"""

import os
import sys

import numpy as np

EXPERTS, H, N = 2, 8, 4


def grad_case(world):
    """A send table where every rank sends and receives rows (CANN's MC2
    kernels need it) with zero counts for some pairs, and small-integer
    float16 operands (every product and sum exact)."""
    import ep_oracle

    rng = np.random.default_rng(2024)
    table = rng.integers(0, 4, size=(world, EXPERTS * world))
    table[:, 1::3] = 0
    for r in range(world):
        table[r, r * EXPERTS] = max(1, table[r, r * EXPERTS])
    recv = ep_oracle.recv_table(table, EXPERTS)
    rows, out_rows = int(table.sum(1).max()), int(recv.sum(1).max())

    def ints(shape):
        return rng.integers(-2, 3, size=shape).astype(np.float16)

    xs = ints((world, rows, H))
    w_dispatch = ints((world, EXPERTS, H, N))
    ct_y = ints((world, out_rows, N))  # cotangent of the dispatch's gmm_y
    ct_p = ints((world, out_rows, H))  # cotangent of its permute_out
    xc = ints((world, rows, H))
    w_combine = ints((world, EXPERTS, H, N))
    ct_c = ints((world, out_rows, N))  # cotangent of the combine's y
    return table, (xs, w_dispatch, ct_y, ct_p, xc, w_combine, ct_c)


def grad_fn(table):
    """Per shard: (dx, d(gmm_weight)) of the dispatch with permute_out and of
    the combine, implementation="ascend". Both need HcclAlltoAllV (the
    dispatch's dx through permute_out, the combine's weight gradient)."""
    import jax

    import jax_mc2 as mc2

    def dispatch(xx, ww):
        y, _, p = mc2.alltoallv_grouped_matmul(
            xx, ww, "ep", send_counts=table, permute_out_flag=True, implementation="ascend"
        )
        return y, p

    def combine(xx, ww):
        return mc2.grouped_matmul_alltoallv(
            xx, ww, "ep", send_counts=table, implementation="ascend"
        )[0]

    def f(x, wd, ct_y, ct_p, xc, wc, ct_c):
        _, vjp = jax.vjp(dispatch, x[0], wd[0])
        dx_d, dw_d = vjp((ct_y[0], ct_p[0]))
        _, vjp = jax.vjp(combine, xc[0], wc[0])
        dx_c, dw_c = vjp(ct_c[0])
        return dx_d[None], dw_d[None], dx_c[None], dw_c[None]

    return f


GRAD_NAMES = ("dx_dispatch", "dw_dispatch", "dx_combine", "dw_combine")


def recovery(process_id, out_dir, mesh, put, args):
    """Failed cross-process calls, each followed by a correct call of the same
    jitted function in both processes (no restart): an injected status in
    process 1, a stalled rank in process 0, an injected HcclAlltoAllV status
    in the middle of a gradient, and a process that cannot get the new root
    info in time. Saves every call's outcome and the group's generation
    after it (recovery.json)."""
    import json

    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import jax_mc2 as mc2
    from jax_mc2.ascend import _comms
    from jax_mc2.framework import _compat

    client = _compat.distributed_client()
    key = _comms.group_key(jax.devices())
    fn = jax.jit(
        jax.shard_map(
            lambda a, b: mc2.mm_all_reduce_base(a, b, "tp", implementation="ascend"),
            mesh=mesh,
            in_specs=(P(None, None, "tp"), P("tp", None)),
            out_specs=P(),
        )
    )
    ep = Mesh(np.array(jax.devices()), ("ep",))
    table, operands = grad_case(len(jax.devices()))
    grad = jax.jit(
        jax.shard_map(
            grad_fn(table),
            mesh=ep,
            in_specs=(P("ep"),) * len(operands),
            out_specs=(P("ep"),) * len(GRAD_NAMES),
        )
    )
    grad_args = [put(a, P("ep"), ep) for a in operands]
    log = []

    def call(name, f, f_args, env=None):
        if env is not None and env[0] == process_id:
            os.environ[env[1]] = env[2]
        try:
            outs = f(*f_args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            got = [np.asarray(s.data) for o in outs for s in o.addressable_shards]
            outcome = "ok"
        except Exception as e:  # the error the user sees
            got, outcome = None, f"{type(e).__name__}: {e}"
        finally:
            if env is not None:
                os.environ.pop(env[1], None)
        log.append({"call": name, "outcome": outcome, "generation": _comms.generation(key)})
        return got

    def wait_for(tag, other):
        _compat.kv_set_bytes(client, f"test/{tag}/{process_id}", b"1")
        _compat.kv_get_bytes(client, f"test/{tag}/{other}", 120_000)

    def same(a, b):
        return a is not None and all(np.array_equal(x, y) for x, y in zip(a, b))

    mm_args = args[:2]
    want = call("first", fn, mm_args)
    stall = ("CANN_DOUBLE_STALL_RANK", "*:1")
    call("injected status", fn, mm_args, (1, "CANN_DOUBLE_FAIL_PHASE", "aclnnMatmulAllReduce:4"))
    log[-1]["same"] = same(call("after injected status", fn, mm_args), want)
    call("stalled rank", fn, mm_args, (0, *stall))
    log[-1]["same"] = same(call("after stalled rank", fn, mm_args), want)
    want_grad = call("gradient", grad, grad_args)
    call("HcclAlltoAllV status", grad, grad_args, (1, "CANN_DOUBLE_FAIL_PHASE", "HcclAlltoAllV:4"))
    log[-1]["same"] = same(call("after HcclAlltoAllV status", grad, grad_args), want_grad)
    # Process 1 re-creates alone (no root info comes), then process 0 alone
    # (process 1 never arrives): both fail within the timeout; then together.
    call(
        "before a lone re-creation",
        fn,
        mm_args,
        (1, "CANN_DOUBLE_FAIL_PHASE", "aclnnMatmulAllReduce:4"),
    )
    if process_id == 1:
        call("alone", fn, mm_args)
        wait_for("one-alone", 0)
        wait_for("zero-alone", 0)
    else:
        wait_for("one-alone", 1)
        call("alone", fn, mm_args)
        wait_for("zero-alone", 1)
    log[-1]["same"] = same(call("together", fn, mm_args), want)
    with open(os.path.join(out_dir, f"recovery_{process_id}.json"), "w") as f:
        json.dump(log, f, indent=1)


def main():
    process_id, num_processes, port, out_dir = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
    )
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    # Each process drives its own NPUs (2 per process).
    os.environ["JAX_MC2_ASCEND_DEVICES"] = f"{2 * process_id},{2 * process_id + 1}"
    # The double's SoC is an Atlas A2; the AlltoAllv operators are A3's.
    os.environ["JAX_MC2_TARGET"] = "generic"

    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
    )

    from multiprocess_case import make_case

    import jax_mc2 as mc2

    world = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    x1, x2, bias, residual, gamma = make_case(world)

    def put(a, spec, m=mesh):
        return jax.make_array_from_callback(a.shape, NamedSharding(m, spec), lambda idx: a[idx])

    def f(a, b, c, r, g):
        out = mc2.mm_all_reduce_base(a, b, "tp", bias=c, implementation="ascend")
        y, norm = mc2.matmul_all_reduce_add_rms_norm(
            a, b, r, g, "tp", bias=c, implementation="ascend"
        )
        return out, y, norm

    fn = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P(None, None, "tp"), P("tp", None), P(), P(), P()),
            out_specs=(P(), P(), P()),
        )
    )
    args = (
        put(x1, P(None, None, "tp")),
        put(x2, P("tp", None)),
        put(bias, P()),
        put(residual, P()),
        put(gamma, P()),
    )
    if os.environ.get("ASCEND_WORKER_SCENARIO") == "recovery":
        recovery(process_id, out_dir, mesh, put, args)
        mc2.ascend.shutdown()
        print("worker", process_id, "ok")
        return
    outs = fn(*args)
    outs = fn(*args)  # twice: the communicator is cached
    results = {
        name: np.asarray(o.addressable_shards[0].data)
        for name, o in zip(("out", "y", "norm"), outs)
    }

    # The gradients of both AlltoAllv operators (HcclAlltoAllV across the
    # processes); each process keeps its own shards, by global rank.
    ep = Mesh(np.array(jax.devices()), ("ep",))
    table, operands = grad_case(world)
    grad = jax.jit(
        jax.shard_map(
            grad_fn(table),
            mesh=ep,
            in_specs=(P("ep"),) * len(operands),
            out_specs=(P("ep"),) * len(GRAD_NAMES),
        )
    )
    grads = grad(*(put(a, P("ep"), ep) for a in operands))
    for name, g in zip(GRAD_NAMES, grads):
        for shard in g.addressable_shards:
            results[f"{name}_{shard.index[0].start}"] = np.asarray(shard.data)

    np.savez(os.path.join(out_dir, f"ascend_result_{process_id}.npz"), **results)
    mc2.ascend.shutdown()
    print("worker", process_id, "ok")


if __name__ == "__main__":
    main()
