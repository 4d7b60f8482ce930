"""Choosing between equivalent local programs by timing them, when a call is
lowered (docs/semantics.md §12): the ``ffi`` implementation asks
:func:`fastest` where its GEMM table has no verdict for the machine at hand
and the programs compute the same bits."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

#: Each variant runs at least this many timed rounds ...
MIN_ROUNDS = 5
#: ... and more, up to :data:`MAX_ROUNDS`, while the timing has taken less
#: than this many seconds in all.
MIN_SECONDS = 0.2
MAX_ROUNDS = 25


def fastest(
    variants: Mapping[str, Callable], operands: Sequence[np.ndarray], *, parallelism: int = 1
) -> str:
    """The name of the variant with the least median time on ``operands``.

    variants: name -> a function of the per-rank operands; operands: the
    per-rank arrays. Each variant runs on ``parallelism`` of this process's
    CPU devices at once (each on its own copy of the operands), the way the
    programs of a ``shard_map`` over that many local devices run, since the
    ranks share the cores. The rounds are interleaved, each starting with
    the next variant, after two untimed runs of each.

    The timing runs on a thread of its own, so it may be asked for while a
    program is being traced or lowered: JAX's trace, mesh and transfer-guard
    contexts are per thread, and under a trace every call of a compiled
    program takes JAX's slower Python dispatch path: timed that way, both
    int8 GEMMs at 512^3 took about 0.5-1 ms a call longer than they run,
    and the faster one won only half of the timings.
    """
    if not variants:
        raise ValueError("fastest: no variants to time")
    result: dict[str, object] = {}

    def run():
        try:
            result["name"] = _time(variants, operands, parallelism)
        except BaseException as error:  # re-raised on the calling thread
            result["error"] = error

    thread = threading.Thread(target=run, name="jax_mc2-measure")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["name"]


def _time(variants, operands, parallelism) -> str:
    devices = jax.local_devices(backend="cpu")
    devices = devices[: max(1, min(parallelism, len(devices)))]
    with jax.transfer_guard("allow"):
        programs, args = _programs(variants, operands, devices)
        for program in programs.values():
            jax.block_until_ready(program(*args))
            jax.block_until_ready(program(*args))
        names = list(programs)
        samples: dict[str, list[float]] = {name: [] for name in names}
        start = time.perf_counter()
        for rounds in range(MAX_ROUNDS):
            if rounds >= MIN_ROUNDS and time.perf_counter() - start >= MIN_SECONDS:
                break
            first = rounds % len(names)
            for name in names[first:] + names[:first]:
                t0 = time.perf_counter()
                jax.block_until_ready(programs[name](*args))
                samples[name].append(time.perf_counter() - t0)
    return min(names, key=lambda name: statistics.median(samples[name]))


def _programs(variants, operands, devices):
    """Compiled-on-first-call programs running each variant on every one of
    ``devices``, and their operands placed there."""
    if len(devices) == 1:
        args = [jax.device_put(a, devices[0]) for a in operands]
        return {name: jax.jit(fn) for name, fn in variants.items()}, args
    mesh = Mesh(np.array(devices), ("rank",))
    ranks = P("rank")
    args = [
        jax.device_put(np.broadcast_to(a, (len(devices), *np.shape(a))), NamedSharding(mesh, ranks))
        for a in operands
    ]

    def per_rank(fn):
        def body(*blocks):
            return fn(*(block[0] for block in blocks))[None]

        return jax.jit(
            jax.shard_map(body, mesh=mesh, in_specs=ranks, out_specs=ranks, check_vma=False)
        )

    return {name: per_rank(fn) for name, fn in variants.items()}, args
