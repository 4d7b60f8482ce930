"""One process of the multi-process test: 2 CPU devices, gloo collectives.

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
Runs the operators over a 'tp' axis spanning every process and saves this
process's (replicated) results to OUT_DIR/result_<id>.npz.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

process_id, num_processes, port, out_dir = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    int(sys.argv[3]),
    sys.argv[4],
)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
)

from multiprocess_case import (  # noqa: E402
    ep_round_trip,
    lowbit_fn,
    lowbit_specs,
    make_case,
    make_ep_case,
    make_lowbit_case,
)

import jax_mc2 as mc2  # noqa: E402

mesh = Mesh(np.array(jax.devices()), ("tp",))
x1, x2, bias, residual, gamma = make_case(len(jax.devices()))


def put(a, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


args = (
    put(x1, P(None, None, "tp")),
    put(x2, P("tp", None)),
    put(bias, P()),
    put(residual, P()),
    put(gamma, P()),
)
results = {}
for impl in ("ffi", "xla"):

    def f(a, b, c, r, g, impl=impl):
        out = mc2.mm_all_reduce_base(a, b, "tp", bias=c, implementation=impl)
        y, norm = mc2.matmul_all_reduce_add_rms_norm(a, b, r, g, "tp", bias=c, implementation=impl)
        return out, y, norm

    outs = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P(None, None, "tp"), P("tp", None), P(), P(), P()),
            out_specs=(P(), P(), P()),
        )
    )(*args)
    for name, o in zip(("mm", "y", "norm"), outs):
        results[f"{impl}_{name}"] = np.asarray(o.addressable_data(0))
table, gx, gw = make_ep_case(len(jax.devices()))
ep_args = (put(gx, P("tp")), put(gw, P("tp")), put(table, P("tp")))
for impl in ("ffi", "xla"):
    outs = jax.jit(
        jax.shard_map(
            ep_round_trip(impl),
            mesh=mesh,
            in_specs=(P("tp"), P("tp"), P("tp")),
            out_specs=(P("tp"), P("tp")),
        )
    )(*ep_args)
    for name, o in zip(("ep_y", "ep_back"), outs):
        for shard in o.addressable_shards:
            results[f"{impl}_{name}_{shard.index[0].start}"] = np.asarray(shard.data)
specs = lowbit_specs(P)
lowbit_args = tuple(put(a, s) for a, s in zip(make_lowbit_case(len(jax.devices())), specs))
for impl in ("ffi", "xla"):
    outs = jax.jit(jax.shard_map(lowbit_fn(impl), mesh=mesh, in_specs=specs, out_specs=(P(), P())))(
        *lowbit_args
    )
    for name, o in zip(("int8_comm", "fp8_comm"), outs):
        results[f"{impl}_{name}"] = np.asarray(o.addressable_data(0)).view(np.uint16)
np.savez(os.path.join(out_dir, f"result_{process_id}.npz"), **results)
jax.distributed.shutdown()
