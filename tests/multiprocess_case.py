"""The data of the multi-process tests, made identically in every process,
and the launcher of their worker processes."""

import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, out_dir, processes: int = 2, timeout: float = 240) -> None:
    """Runs ``processes`` copies of ``tests/<script>`` (args: process id,
    process count, coordinator port, ``out_dir``) to the end; fails with
    every worker's output if one fails, kills them all on a timeout."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, os.path.join(HERE, script)]
    procs = [
        subprocess.Popen(
            [*command, str(i), str(processes), str(port), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)


def make_case(world: int):
    rng = np.random.default_rng(1234)
    k = 16 * world
    x1 = rng.standard_normal((2, 8, k)).astype(np.float16)
    x2 = (rng.standard_normal((k, 24)) * 0.3).astype(np.float16)
    bias = rng.standard_normal(24).astype(np.float16)
    residual = rng.standard_normal((2, 8, 24)).astype(np.float16)
    gamma = rng.standard_normal(24).astype(np.float16)
    return x1, x2, bias, residual, gamma


def make_ep_case(world: int):
    """Counts (W, e*W), gmm_x (W, BSK, 8), gmm_weight (W, e, 8, 6) per rank."""
    rng = np.random.default_rng(77)
    experts = 2
    table = rng.integers(0, 4, size=(world, experts * world)).astype(np.int32)
    bsk = int(table.sum(1).max())
    x = rng.standard_normal((world, bsk, 8)).astype(np.float16)
    w = (rng.standard_normal((world, experts, 8, 6)) * 0.3).astype(np.float16)
    return table, x, w


def ep_round_trip(impl):
    """Per shard: dispatch with traced counts, then combine with the
    transposed weights; returns (gmm_y, combined) with a leading rank axis."""
    import jax_mc2 as mc2
    from jax_mc2.operators.alltoallv_grouped_matmul import exchange_counts

    def f(x, w, counts):
        send = counts[0]
        y, _, _ = mc2.alltoallv_grouped_matmul(
            x[0], w[0], "tp", send_counts=send, implementation=impl
        )
        back, _ = mc2.grouped_matmul_alltoallv(
            y,
            w[0],
            "tp",
            send_counts=exchange_counts(send, ("tp",)),
            recv_counts=send,
            trans_gmm_weight=True,
            max_out_tokens=x.shape[1],
            implementation=impl,
        )
        return y[None], back[None]

    return f


def make_lowbit_case(world: int):
    """int8 low-bit communication (mm_all_reduce_base) and fp8 pertile
    communication (quant_matmul_all_reduce_v4) operands, k sharded."""
    import ml_dtypes

    rng = np.random.default_rng(99)
    k, n = 32 * world, 256
    bf16, f8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
    x1 = rng.integers(-128, 128, (8, k), dtype=np.int8)
    x2 = rng.integers(-128, 128, (k, n), dtype=np.int8)
    scale = np.full(n, 2.0**-12, bf16)
    s1 = np.full(n, 2.0, bf16)
    s2 = np.full(n, 2.0 * world, bf16)
    f1 = rng.standard_normal((8, k)).astype(f8)
    f2 = rng.standard_normal((k, n)).astype(f8)
    fs2 = (rng.random(n) + 0.5).astype(np.float32)
    fs1 = (rng.random(8) + 0.5).astype(np.float32)
    return x1, x2, scale, s1, s2, f1, f2, fs2, fs1


LOWBIT_SPECS = ("k", "k0", "r", "r", "r", "k", "k0", "r", "r")


def lowbit_fn(impl):
    """Per shard: the int8 and the fp8 low-bit chains (s8 / f8 all-to-all and
    all-gather); both results are replicated."""
    import jax_mc2 as mc2

    def f(a, b, s, q1, q2, fa, fb, fs2, fs1):
        low = mc2.mm_all_reduce_base(
            a,
            b,
            "tp",
            dequant_scale=s,
            comm_quant_scale_1=q1,
            comm_quant_scale_2=q2,
            implementation=impl,
        )
        fp8 = mc2.quant_matmul_all_reduce_v4(
            fa, fb, "tp", x2_scale=fs2, x1_scale=fs1, comm_quant_mode=1, implementation=impl
        )
        return low, fp8

    return f


def lowbit_specs(P):
    """in_specs of :func:`lowbit_fn`: x1 split on k (its columns), x2 on k
    (its rows), scales replicated."""
    table = {"k": P(None, "tp"), "k0": P("tp", None), "r": P()}
    return tuple(table[s] for s in LOWBIT_SPECS)
