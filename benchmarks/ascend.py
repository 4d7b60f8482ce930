"""The ascend launch layer's own cost, through the CANN test double.

    python -m benchmarks.run --suite ascend       (or python -m benchmarks.ascend)

For each operator at a small shape (1 device, warm workspace pool and
communicator cache) the handler's time is split, summed over many calls:

- CANN's time: the two aclnn phases (phase 1 validates and plans, phase 2
  enqueues) and the stream wait (the double's kernel);
- the host bridge's copies (operands in, results out);
- the launch layer's own time: everything else (device/context binding,
  spec and communicator lookup, the pool, the descriptors).

The goal is at most 30 µs of own time per call. The copy throughput of the
bridge's copy path (aclrtMemcpy into / out of pooled device memory) is
compared with a NumPy copy of the same bytes (memcpy); the goal is >= 0.8x.
The double's device memory is host memory, so this measures the bridge's
overhead on top of the copy, not PCIe.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def _ensure_double() -> None:
    if os.environ.get("JAX_MC2_CANN_LIBRARY_PATH"):
        return
    import subprocess
    import sys
    import tempfile

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tempfile.mkdtemp(prefix="jax_mc2_cann_double_")
    subprocess.run(
        [sys.executable, os.path.join(here, "tests", "cann_double", "build.py"), out],
        check=True,
        capture_output=True,
    )
    os.environ["JAX_MC2_CANN_LIBRARY_PATH"] = out


def _cases():
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    import jax_mc2 as mc2

    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    m, k, n = 16, 64, 16
    x1 = rng.standard_normal((m, k)).astype(bf)
    x2 = rng.standard_normal((k, n)).astype(bf)
    res = rng.standard_normal((1, m, n)).astype(bf)
    gamma = np.ones((n,), bf)
    i8 = rng.integers(-4, 4, (m, k)).astype(np.int8)
    w8 = rng.integers(-4, 4, (k, n)).astype(np.int8)
    s_bf = np.full((n,), 0.5, bf)
    f8 = rng.standard_normal((m, k)).astype(ml_dtypes.float8_e4m3fn)
    w_f8 = rng.standard_normal((k, n)).astype(ml_dtypes.float8_e4m3fn)
    table = np.array([[4, 4]])
    gx = rng.standard_normal((8, k)).astype(bf)
    gw = rng.standard_normal((2, k, n)).astype(bf)
    a = {"implementation": "ascend"}
    return {
        "mm_all_reduce_base": (lambda: mc2.mm_all_reduce_base(x1, x2, None, **a)),
        "matmul_all_reduce_add_rms_norm": (
            lambda: mc2.matmul_all_reduce_add_rms_norm(x1, x2, res, gamma, None, **a)
        ),
        "quant_matmul_all_reduce (int8)": (
            lambda: mc2.quant_matmul_all_reduce(i8, w8, None, dequant_scale=s_bf, **a)
        ),
        "mm_all_reduce_base (weight-only)": (
            lambda: mc2.mm_all_reduce_base(x1, w8, None, antiquant_scale=s_bf, **a)
        ),
        "quant_matmul_all_reduce_v4 (fp8 pertoken)": (
            lambda: mc2.quant_matmul_all_reduce_v4(
                f8,
                w_f8,
                None,
                x2_scale=np.ones((n,), np.float32),
                x1_scale=np.ones((m,), np.float32),
                out_dtype=bf,
                **a,
            )
        ),
        "alltoallv_grouped_matmul": (
            lambda: mc2.alltoallv_grouped_matmul(gx, gw, None, send_counts=table, **a)
        ),
    }


def run(repeat: int = 200) -> list[dict]:
    _ensure_double()
    import jax
    import numpy as np

    import jax_mc2 as mc2

    # The 'generic' target, chosen explicitly: otherwise the first ascend call
    # adopts the chip's own, and the double reports an Atlas A2 SoC, whose
    # rules refuse the fp8 row (Ascend 950 only). The launch cost does not
    # depend on the chip rules.
    mc2.set_target("generic")
    ext = mc2.ascend._mc2_ascend
    rows = []
    for name, call in _cases().items():
        f = jax.jit(call)
        jax.block_until_ready(f())  # compile, communicator, pool
        for _ in range(20):
            jax.block_until_ready(f())
        ext.reset_timings()
        walls = []
        for _ in range(repeat):
            t = time.perf_counter()
            jax.block_until_ready(f())
            walls.append(time.perf_counter() - t)
        t = ext.timings()
        calls = max(t["calls"], 1)
        us = {
            key: t[key] / calls / 1e3
            for key in ("total", "phase1", "phase2", "wait", "copy_in", "copy_out")
        }
        cann = us["phase1"] + us["phase2"] + us["wait"]
        copies = us["copy_in"] + us["copy_out"]
        rows.append(
            {
                "operator": name,
                "calls": t["calls"],
                "jax_call_us": statistics.median(walls) * 1e6,
                "handler_us": us["total"],
                "cann_us": cann,
                "copies_us": copies,
                "own_us": us["total"] - cann - copies,
            }
        )
    print(
        "\nascend launch layer through the CANN test double (1 device, bf16/int8/fp8 "
        "16x64x16, warm pool and communicator cache)\n"
    )
    print(
        "| operator | jax call µs | handler µs | CANN (phases + wait) µs | copies µs | "
        "launch layer own µs (goal ≤ 30) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['operator']} | {r['jax_call_us']:.1f} | {r['handler_us']:.1f} | "
            f"{r['cann_us']:.1f} | {r['copies_us']:.1f} | {r['own_us']:.1f} |"
        )

    copy_rows = []
    for mib in (1, 16, 64):
        nbytes = mib << 20
        reps = max(3, 256 // mib)
        h2d, d2h = ext.copy_benchmark(0, nbytes, reps)
        src = np.ones(nbytes, np.uint8)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        t0 = time.perf_counter()
        for _ in range(reps):
            np.copyto(dst, src)
        mem = time.perf_counter() - t0
        gb = nbytes * reps / 1e9
        copy_rows.append(
            {"MiB": mib, "memcpy_GBps": gb / mem, "h2d_GBps": gb / h2d, "d2h_GBps": gb / d2h}
        )
    print("\n| bytes | memcpy GB/s | host→device GB/s (ratio) | device→host GB/s (ratio) |")
    print("|---|---|---|---|")
    for r in copy_rows:
        print(
            f"| {r['MiB']} MiB | {r['memcpy_GBps']:.1f} | {r['h2d_GBps']:.1f} "
            f"({r['h2d_GBps'] / r['memcpy_GBps']:.2f}x) | {r['d2h_GBps']:.1f} "
            f"({r['d2h_GBps'] / r['memcpy_GBps']:.2f}x) |"
        )
    return rows + copy_rows


if __name__ == "__main__":
    run()
