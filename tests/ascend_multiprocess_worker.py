"""One process of the ascend multi-process test: 2 CPU devices bound to 2
NPUs of the CANN test double, jax.distributed on 127.0.0.1; the HCCL root
info travels through JAX's key-value store.

Usage: python ascend_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
process_id, num_processes, port, out_dir = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    int(sys.argv[3]),
    sys.argv[4],
)
# Each process drives its own NPUs (2 per process).
os.environ["JAX_MC2_ASCEND_DEVICES"] = f"{2 * process_id},{2 * process_id + 1}"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
)

from multiprocess_case import make_case  # noqa: E402

import jax_mc2 as mc2  # noqa: E402

mesh = Mesh(np.array(jax.devices()), ("tp",))
x1, x2, bias, residual, gamma = make_case(len(jax.devices()))


def put(a, spec):
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])


def f(a, b, c, r, g):
    out = mc2.mm_all_reduce_base(a, b, "tp", bias=c, implementation="ascend")
    y, norm = mc2.matmul_all_reduce_add_rms_norm(a, b, r, g, "tp", bias=c, implementation="ascend")
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
outs = fn(*args)
outs = fn(*args)  # twice: the communicator is cached
results = {
    name: np.asarray(o.addressable_shards[0].data) for name, o in zip(("out", "y", "norm"), outs)
}
np.savez(os.path.join(out_dir, f"ascend_result_{process_id}.npz"), **results)
mc2.ascend.shutdown()
print("worker", process_id, "ok")
