"""One process of the dead-rank test: 2 CPU devices, gloo collectives.

Usage: python dead_rank_worker.py PROCESS_ID NUM_PROCESSES PORT VICTIM IMPL
           HEARTBEAT_S COLLECTIVE_TIMEOUT_S

Both processes run mm_all_reduce_base over a 'tp' axis spanning every
process, once with implementation "ffi" and once with "xla", and print
"WARM <id>". Then the victim (process VICTIM) prints "PARKED <id>" and
sleeps, taking part in no collective, until the test kills it; the survivor
prints "ENTER <id>" and calls the operator (implementation IMPL) again, so it
waits in a collective that its peer never joins. When the peer dies, the
survivor either gets an exception (printed as "SURVIVOR_ERROR ..." before a
hard exit with status 3) or is terminated by the jax.distributed client.
"""

import os
import sys
import time

process_id, num_processes, port, victim, impl, heartbeat_s, collective_timeout_s = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    sys.argv[5],
    int(sys.argv[6]),
    int(sys.argv[7]),
)
# --xla_cpu_collective_timeout_seconds is the gloo timeout of one cross-process
# collective (default 30 min): a peer that stops without closing its sockets
# (frozen, or its host gone) fails the pending collective after this long.
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=2"
    f" --xla_cpu_collective_timeout_seconds={collective_timeout_s}"
)


def say(*args):
    print(*args, flush=True)


import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax._src import distributed  # noqa: E402  (the client, for a barrier)
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    # A task that stops sending heartbeats for this long is declared dead by
    # the coordination service, which then reports the error to every other
    # task; their clients terminate the process. With the default (100 s) a
    # dead rank would be noticed only after 100 s.
    heartbeat_timeout_seconds=heartbeat_s,
    # Bounds the barrier at shutdown (the default is 300 s).
    shutdown_timeout_seconds=5,
    initialization_timeout=60,
)

from multiprocess_case import make_case  # noqa: E402

import jax_mc2 as mc2  # noqa: E402

mesh = Mesh(np.array(jax.devices()), ("tp",))
x1, x2, bias, _, _ = make_case(len(jax.devices()))


def put(a, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


args = (put(x1, P(None, None, "tp")), put(x2, P("tp", None)), put(bias, P()))


def op(implementation):
    def f(a, b, c):
        return mc2.mm_all_reduce_base(a, b, "tp", bias=c, implementation=implementation)

    return jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P(None, None, "tp"), P("tp", None), P()),
            out_specs=P(),
        )
    )


# Compile before running anything, and meet at a barrier of the coordination
# service: one process compiling slower than the other must not eat into a
# short collective timeout.
ops = {name: op(name).lower(*args).compile() for name in ("ffi", "xla")}
distributed.global_state.client.wait_at_barrier("dead_rank_compiled", 60_000)
for name in ("ffi", "xla"):
    ops[name](*args).block_until_ready()
say(f"WARM {process_id}")

if process_id == victim:
    say(f"PARKED {process_id}")
    # The test kills this process; never leave a stray one behind.
    time.sleep(120)
    os._exit(4)

say(f"ENTER {process_id}")
t0 = time.monotonic()
try:
    for _ in range(1000):
        ops[impl](*args).block_until_ready()
    say(f"SURVIVOR_NO_ERROR {process_id}")
    code = 0
except Exception as e:  # noqa: BLE001
    say(f"SURVIVOR_ERROR {process_id} after {time.monotonic() - t0:.1f}s: {type(e).__name__}: {e}")
    code = 3
# Skip interpreter teardown (and jax.distributed's shutdown barrier with a
# dead peer): the outcome is already printed.
os._exit(code)
