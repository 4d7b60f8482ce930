"""Times every operator side by side in one process and prints a table.

For each case the contenders (the ``ffi`` and ``xla`` implementations, the
unfused ``jnp`` composition of the same math and a second, separately compiled
copy of it whose ratio shows the row's noise, all on the same mesh) run
interleaved after a warm-up, each call ends in ``block_until_ready``, and the
median of ``--repeat`` runs (more for fast cases: at least a second of
sampling each) is reported with the useful GFLOP/s (2·m·k·n), the
ratio to the unfused composition and the ratio to the dense fp32 GEMM ceiling
measured in the same run (the better of OpenBLAS sgemm called directly and
XLA's float32 dot on one device).

The expert-parallel cases (grouped matmul against ``lax.ragged_dot`` and a
dense batched einsum; the AlltoAllv dispatch operator on the mesh) are in
``benchmarks/expert_parallel.py``.

On an accelerator (a GPU backend) the contenders are the ``xla``
implementation and the same compositions; one device also runs 8192^3 (and
the grouped matmul 16384 x 4096 x 4096), and each row's ratio is to the
datasheet peak of its operand class (:data:`DATASHEET_PEAKS`) instead of the
CPU's measured fp32 ceiling; the header prints XLA's bf16 dot at 8192^3.
The multi-device rows need as many devices.

    python -m benchmarks.run [--json FILE] [--quick] [--suite all|tp|ep|ascend]
        [--implementations xla,ffi]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_mc2 as mc2  # noqa: E402
from benchmarks import expert_parallel  # noqa: E402
from jax_mc2.implementations import ffi as ffi_impl  # noqa: E402


@dataclass
class Row:
    operator: str
    shape: str
    dtype: str
    devices: int
    implementation: str
    median_ms: float
    gflops: float
    vs_unfused: float | None = None
    vs_ceiling: float | None = None


#: Each case samples for at least this long (more rounds than ``--repeat``
#: for fast cases), so that the medians of millisecond-scale cases rest on
#: more than a handful of samples.
MIN_SAMPLING_S = 1.0
MAX_ROUNDS = 200


def time_interleaved(fns: dict, args: tuple, repeat: int) -> dict[str, float]:
    """Median milliseconds of each function, run round-robin after warm-up:
    ``repeat`` rounds, or more while a case has sampled for less than
    ``MIN_SAMPLING_S`` (at most ``MAX_ROUNDS``). Each round runs the
    functions in a new random order (seeded: a run repeats its orders), so
    that no function always runs first or always follows the same one. A
    call is slower right after some programs than after others: two copies
    of one XLA program, one always following the ``ffi`` call (a rotating
    start keeps the neighbours), measured 1.3-3.5 % apart in 4 of 4 trials,
    and 0.985-1.002 with random orders (docs/benchmarks.md)."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    names = list(fns)
    samples = {name: [] for name in names}
    orders = np.random.default_rng(0)
    start = time.perf_counter()
    rounds = 0
    while rounds < repeat or (time.perf_counter() - start < MIN_SAMPLING_S and rounds < MAX_ROUNDS):
        for index in orders.permutation(len(names)):
            name = names[index]
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](*args))
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: statistics.median(s) for name, s in samples.items()}


def _openblas_sgemm():
    import scipy_openblas32

    lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"))
    fn = lib.scipy_cblas_sgemm
    fn.restype = None
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    lib.scipy_openblas_set_num_threads(os.cpu_count() or 1)

    def sgemm(a, b, c):
        m, k = a.shape
        n = b.shape[1]
        fn(101, 111, 111, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n, 0.0, c.ctypes.data, n)
        return c

    return sgemm


def measure_ceiling(m, k, n, repeat) -> float:
    """Dense fp32 GEMM GFLOP/s on one device: max(OpenBLAS sgemm, XLA f32 dot)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    c = np.empty((m, n), np.float32)
    sgemm = _openblas_sgemm()
    xla_dot = jax.jit(jnp.dot)
    times = time_interleaved({"sgemm": lambda a, b: sgemm(a, b, c), "xla": xla_dot}, (a, b), repeat)
    return 2 * m * k * n / (min(times.values()) * 1e-3) / 1e9


#: Dense (no sparsity) datasheet peaks of the GPUs whose figures this runner
#: records, in TFLOP/s (TOPS for int8), per operand class. The H200 has the
#: H100 SXM's arithmetic (and more, faster memory). "float32" is the TF32
#: tensor-core rate: XLA:GPU's float32 dots at JAX's default precision.
DATASHEET_PEAKS = {
    "H100 SXM": {"float32": 495.0, "16-bit": 989.0, "float8": 1979.0, "int8": 1979.0},
    "H200": {"float32": 495.0, "16-bit": 989.0, "float8": 1979.0, "int8": 1979.0},
}


def datasheet_peaks(device_kind: str) -> dict[str, float] | None:
    """The peaks of ``device_kind`` (e.g. "NVIDIA H200"), None if not listed
    (the PCIe and NVL parts run at other clocks)."""
    if "PCIe" in device_kind or "NVL" in device_kind:
        return None
    if "H200" in device_kind:
        return DATASHEET_PEAKS["H200"]
    if "H100" in device_kind:
        return DATASHEET_PEAKS["H100 SXM"]
    return None


def operand_class(dtype) -> str:
    """The datasheet class of an operand dtype: float32, 16-bit, float8 or int8."""
    name = jnp.dtype(dtype).name
    if name in ("float16", "bfloat16"):
        return "16-bit"
    if name.startswith("float8"):
        return "float8"
    return name


def measure_dot(m, k, n, dtype, repeat) -> float:
    """XLA's dot of ``dtype`` operands (fp32 accumulation) on one device, in
    GFLOP/s: the measured ceiling on an accelerator."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((k, n)), dtype)
    dot = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype))
    times = time_interleaved({"dot": dot}, (a, b), repeat)
    return 2 * m * k * n / (times["dot"] * 1e-3) / 1e9


#: A second copy of the unfused composition that every operator case times
#: beside the others: its own function, so it is traced and compiled on its
#: own, like the contenders. Its ratio to the unfused composition is the
#: spread of two identical programs in that row of that run, against which
#: the other ratios of the row can be read.
TWIN = "unfused jnp (again)"


def with_twin(fns: dict) -> dict:
    """``fns`` (contender name -> function, before jit) with :data:`TWIN`
    added: the ``"unfused jnp"`` function called through a new function."""
    unfused = fns["unfused jnp"]

    def twin(*args):
        return unfused(*args)

    return {**fns, TWIN: twin}


def _mesh(devices):
    return Mesh(np.array(jax.devices()[:devices]), ("tp",))


def mm_case(m, k, n, dtype, devices, impls, repeat):
    rng = np.random.default_rng(1)
    x1 = jnp.asarray(rng.standard_normal((m, k)), dtype)
    x2 = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype)
    axis = "tp" if devices > 1 else None

    def unfused(a, b, c):
        out = (jnp.matmul(a, b) + c).astype(a.dtype)
        return lax.psum(out, axis) if axis else out

    def op(impl):
        return lambda a, b, c: mc2.mm_all_reduce_base(a, b, axis, bias=c, implementation=impl)

    fns = {impl: op(impl) for impl in impls}
    fns["unfused jnp"] = unfused
    fns = with_twin(fns)
    wrap = _wrap(devices, (P(None, "tp"), P("tp", None), P()), P())
    return time_interleaved({k_: wrap(f) for k_, f in fns.items()}, (x1, x2, bias), repeat)


def norm_case(m, k, n, dtype, devices, impls, repeat):
    rng = np.random.default_rng(2)
    x1 = jnp.asarray(rng.standard_normal((m, k)), dtype)
    x2 = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    residual = jnp.asarray(rng.standard_normal((1, m, n)), dtype)
    gamma = jnp.asarray(rng.standard_normal(n), dtype)
    axis = "tp" if devices > 1 else None

    def unfused(a, b, r, g):
        mm = jnp.matmul(a, b)
        mm = lax.psum(mm, axis) if axis else mm
        y = mm.reshape(r.shape) + r
        yf = y.astype(jnp.float32)
        norm = yf * lax.rsqrt(jnp.mean(yf * yf, -1, keepdims=True) + 1e-6) * g.astype(jnp.float32)
        return y, norm.astype(y.dtype)

    def op(impl):
        return lambda a, b, r, g: mc2.matmul_all_reduce_add_rms_norm(
            a, b, r, g, axis, implementation=impl
        )

    fns = {impl: op(impl) for impl in impls}
    fns["unfused jnp"] = unfused
    fns = with_twin(fns)
    wrap = _wrap(devices, (P(None, "tp"), P("tp", None), P(), P()), (P(), P()))
    return time_interleaved(
        {k_: wrap(f) for k_, f in fns.items()}, (x1, x2, residual, gamma), repeat
    )


def quant_case(m, k, n, dtype, devices, impls, repeat):
    """W8A8: int8 x int8, int32 bias, perchannel packed (fp16 out) or bf16 scales."""
    from jax_mc2 import quant

    rng = np.random.default_rng(3)
    x1 = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    x2 = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    bias = jnp.asarray(rng.integers(-1000, 1000, n), jnp.int32)
    raw = (rng.random(n) * 1e-4).astype(np.float32)
    scale = quant.trans_quant_param(raw) if dtype == jnp.float16 else jnp.asarray(raw, jnp.bfloat16)
    scale_f32 = jnp.asarray(
        raw if dtype != jnp.float16 else (raw.view(np.uint32) & 0xFFFFE000).view(np.float32)
    )
    axis = "tp" if devices > 1 else None

    def unfused(a, b, c, s):
        acc = jnp.matmul(a, b, preferred_element_type=jnp.int32) + c
        out = (acc.astype(jnp.float32) * scale_f32).astype(dtype)
        return lax.psum(out, axis) if axis else out

    def int8_dot(a, b, c, s):
        return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)

    def op(impl):
        return lambda a, b, c, s: mc2.quant_matmul_all_reduce(
            a, b, axis, dequant_scale=s, bias=c, implementation=impl
        )

    fns = {impl: op(impl) for impl in impls}
    fns["unfused jnp"] = unfused
    fns = with_twin(fns)
    fns["int8 dot_general"] = int8_dot
    out_spec = P() if devices > 1 else None
    in_specs = (P(None, "tp"), P("tp", None), P(), P())
    wrapped = {}
    for name, fn in fns.items():
        spec = P(None, "tp") if name == "int8 dot_general" else out_spec
        wrapped[name] = _wrap(devices, in_specs, spec)(fn)
    return time_interleaved(wrapped, (x1, x2, bias, scale), repeat)


quant_case.operand = "int8"


def lowp_case(mode, m, k, n, devices, impls, repeat):
    """quant_matmul_all_reduce_v4's fp8 e4m3fn rows, bfloat16 output:
    pertoken (fp32 x1_scale [m], x2_scale [n]), perblock (128 x 128 blocks)
    and MXFP8 (e8m0 scales per 32 values of k, transposed x2), against the
    unfused jnp composition of the seed formula: decode to fp32, matmul,
    scale, round, psum (perblock: per k-block, summed in order, and also the
    operand-prescaled single matmul, whose rounding differs)."""
    from jax_mc2 import quant

    rng = np.random.default_rng(7)
    f32, bf16, e4m3 = jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn
    a = jnp.asarray(rng.standard_normal((m, k)), f32)
    b = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), f32)
    axis = "tp" if devices > 1 else None
    kw = {"out_dtype": bf16}
    if mode == "pertoken":
        x1, x2 = a.astype(e4m3), b.astype(e4m3)
        s1 = jnp.asarray(rng.random(m) + 0.5, f32)
        s2 = jnp.asarray(rng.random(n) * 1e-2 + 1e-3, f32)
        specs = (P(None, "tp"), P("tp", None), P(), P())

        def unfused(x1, x2, s1, s2):
            y = jnp.matmul(x1.astype(f32), x2.astype(f32)) * s1[:, None] * s2[None, :]
            return y.astype(bf16)

    elif mode == "perblock":
        (x1, s1), (x2, s2) = quant.perblock_quantize(a), quant.perblock_quantize(b)
        kw["group_size"] = quant.group_size(128, 128, 128)
        specs = (P(None, "tp"), P("tp", None), P(None, "tp"), P("tp", None))

        def unfused(x1, x2, s1, s2):
            # Seed 003 formula 7 as written: per 128-deep k-block, the fp32
            # product times (x1 block scale * x2 block scale), summed in order.
            m_, k_ = x1.shape
            n_, kb = x2.shape[1], s1.shape[1]
            a_ = x1.astype(f32).reshape(m_, kb, 128).transpose(1, 0, 2)
            b_ = x2.astype(f32).reshape(kb, 128, n_)
            r1 = jnp.repeat(s1.T, 128, 1)[:, :m_]
            r2 = jnp.repeat(s2, 128, 1)[:, :n_]

            def block(i):
                return jnp.matmul(a_[i], b_[i]) * (r1[i][:, None] * r2[i][None, :])

            y = lax.fori_loop(1, kb, lambda i, y: y + block(i), block(0))
            return y.astype(bf16)

        def prescaled(x1, x2, s1, s2):
            # The same sum with the scales applied to the operands first: one
            # dense matmul, but a different rounding from formula 7's.
            w1 = jnp.repeat(jnp.repeat(s1, 128, 0), 128, 1)[: x1.shape[0], : x1.shape[1]]
            w2 = jnp.repeat(jnp.repeat(s2, 128, 0), 128, 1)[: x2.shape[0], : x2.shape[1]]
            return jnp.matmul(x1.astype(f32) * w1, x2.astype(f32) * w2).astype(bf16)

    else:  # mx: x2 transposed, (n, k)
        (x1, s1), (x2, s2) = quant.mx_quantize(a), quant.mx_quantize(b.T)
        kw["transpose_x2"] = True
        specs = (P(None, "tp"), P(None, "tp"), P(None, "tp"), P(None, "tp"))

        def unfused(x1, x2, s1, s2):
            def dequant(v, s):
                scale = jnp.repeat(s.astype(f32).reshape(v.shape[0], -1), 32, 1)
                return v.astype(f32) * scale[:, : v.shape[1]]

            return jnp.matmul(dequant(x1, s1), dequant(x2, s2).T).astype(bf16)

    def reduced(fn):
        return lambda *args: lax.psum(fn(*args), axis) if axis else fn(*args)

    def op(impl):
        return lambda x1, x2, s1, s2: mc2.quant_matmul_all_reduce_v4(
            x1, x2, axis, x1_scale=s1, x2_scale=s2, implementation=impl, **kw
        )

    fns = {impl: op(impl) for impl in impls}
    fns["unfused jnp"] = reduced(unfused)
    fns = with_twin(fns)
    if mode == "perblock":
        fns["prescaled jnp"] = reduced(prescaled)
    wrap = _wrap(devices, specs, P())
    return time_interleaved({k_: wrap(f) for k_, f in fns.items()}, (x1, x2, s1, s2), repeat)


def _wire_bytes(compiled_text: str, ranks: int) -> int:
    """Bytes each device sends for the collectives in compiled HLO text, with
    the usual algorithms: a ring all-reduce of B bytes sends 2 (R-1)/R B, an
    all-to-all or all-gather of B bytes (R-1)/R B, a reduce-scatter of B
    bytes (R-1)/R B."""
    import re

    sizes = {"f32": 4, "f16": 2, "bf16": 2, "s8": 1, "s32": 4, "u8": 1}
    factor = {
        "all-reduce": 2 * (ranks - 1) / ranks,
        "all-to-all": (ranks - 1) / ranks,
        "all-gather": (ranks - 1) / ranks,
        # The result is one rank's 1/R of the B bytes reduced: (R-1)/R B sent.
        "reduce-scatter": ranks - 1,
    }
    total = 0.0
    for line in compiled_text.splitlines():
        for kind, f in factor.items():
            if f" {kind}(" in line and "=" in line:
                lhs = line.split(f" {kind}(")[0].split("=", 1)[1]
                for dtype, dims in re.findall(r"(f32|f16|bf16|s8|s32|u8)\[([\d,]*)\]", lhs):
                    total += f * sizes[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return int(total)


def lowbit_comm_report(m, k, n, devices, repeat):
    """Low-bit (int8) communication against the fp16 all-reduce: bytes in the
    collectives' results, median time, and the error of the int8 chain."""
    from jax_mc2 import quant

    rng = np.random.default_rng(4)
    x1 = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    x2 = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    scale = quant.trans_quant_param(np.full(n, 1e-5, np.float32))
    mesh = _mesh(devices)

    def build(**kw):
        return jax.jit(
            jax.shard_map(
                lambda a, b, s: mc2.mm_all_reduce_base(a, b, "tp", dequant_scale=s, **kw),
                mesh=mesh,
                in_specs=(P(None, "tp"), P("tp", None), P()),
                out_specs=P(),
            )
        )

    fp16 = build()
    full = np.asarray(fp16(x1, x2, scale), np.float32)
    s1 = np.full(n, 2 * np.abs(full).max() / 127, np.float16)
    s2 = (s1.astype(np.float32) * devices).astype(np.float16)
    int8 = build(comm_quant_scale_1=s1, comm_quant_scale_2=s2)
    low = np.asarray(int8(x1, x2, scale), np.float32)
    times = time_interleaved(
        {"fp16 all-reduce": fp16, "int8 all-to-all + all-gather": int8}, (x1, x2, scale), repeat
    )
    rows = []
    for name, fn in (("fp16 all-reduce", fp16), ("int8 all-to-all + all-gather", int8)):
        nbytes = _wire_bytes(fn.lower(x1, x2, scale).compile().as_text(), devices)
        rows.append((name, nbytes, times[name]))
    err = float(np.abs(low - full).max() / np.abs(full).max())
    return rows, err


def _wrap(devices, in_specs, out_specs):
    def wrap(fn):
        if devices == 1:
            return jax.jit(fn)
        return jax.jit(
            jax.shard_map(fn, mesh=_mesh(devices), in_specs=in_specs, out_specs=out_specs)
        )

    return wrap


def _lowp(mode):
    """A case function for one fp8 mode (its dtype argument is the output
    dtype, bfloat16 only: the loop's float16 pass is skipped)."""

    def case(m, k, n, dtype, devices, impls, repeat):
        return lowp_case(mode, m, k, n, devices, impls, repeat)

    case.dtypes = (jnp.bfloat16,)
    case.operand = "float8"
    return case


def ep_report(quick, impls, repeat, ndev, ceiling_of, accelerator=False):
    """The grouped-matmul and dispatch tables; returns their rows.
    ``ceiling_of(operand_class)`` is the GFLOP/s a row is compared with."""
    m, k, n, groups = (1024, 256, 256, 8) if quick else (4096, 1024, 1024, 8)
    if accelerator and not quick:
        m, k, n = 16384, 4096, 4096
    gmm_rows = []
    for routing in ("uniform", "zipf"):
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            times, sizes = expert_parallel.grouped_matmul_case(
                m, k, n, groups, routing, dtype, impls, repeat, time_interleaved
            )
            flops = 2 * m * k * n
            ceiling = ceiling_of(operand_class(dtype))
            for name, ms in times.items():
                gmm_rows.append(
                    {
                        "routing": routing,
                        "dtype": jnp.dtype(dtype).name,
                        "group_sizes": sizes.tolist(),
                        "contender": name,
                        "median_ms": round(ms, 3),
                        "gflops": round(flops / (ms * 1e-3) / 1e9, 1),
                        "vs_ragged_dot": round(times["lax.ragged_dot"] / ms, 2),
                        "vs_dense_einsum": round(times["dense batched einsum"] / ms, 2),
                        "vs_ceiling": (
                            round(flops / (ms * 1e-3) / 1e9 / ceiling, 2) if ceiling else None
                        ),
                    }
                )
            print(f"  done grouped matmul {routing} {jnp.dtype(dtype).name}", flush=True)
    print(
        f"\ngrouped matmul, one device: M x K x N = {m} x {k} x {n}, G = {groups} groups "
        "(uniform; Zipf-skewed sizes in the JSON), useful FLOPs 2·M·K·N:\n"
    )
    print(
        "| routing | dtype | contender | median ms | GFLOP/s | vs ragged_dot | "
        f"vs dense einsum | {_ceiling_name(accelerator)} |"
    )
    print("|" + "---|" * 8)
    for r in gmm_rows:
        print(
            f"| {r['routing']} | {r['dtype']} | {r['contender']} | {r['median_ms']:.2f} | "
            f"{r['gflops']:.1f} | {r['vs_ragged_dot']:.2f} | {r['vs_dense_einsum']:.2f} | "
            f"{_fmt(r['vs_ceiling'])} |"
        )
    dispatch_rows = []
    if ndev > 1:
        bsk, h, n, experts = (256, 128, 128, 2) if quick else (1024, 512, 512, 2)
        for counts in ("uniform", "zipf", "traced random, cf 1.25"):
            for dtype in (jnp.bfloat16, jnp.float16):
                times, ratio, flops = expert_parallel.dispatch_case(
                    ndev, bsk, h, n, experts, counts, dtype, impls, repeat, time_interleaved
                )
                for name, ms in times.items():
                    dispatch_rows.append(
                        {
                            "counts": counts,
                            "dtype": jnp.dtype(dtype).name,
                            "implementation": name,
                            "median_ms": round(ms, 3),
                            "gflops": round(flops / (ms * 1e-3) / 1e9, 1),
                            "vs_xla": round(times["xla"] / ms, 2) if "xla" in times else None,
                            "bytes_moved_over_useful": round(ratio, 2),
                        }
                    )
                print(f"  done dispatch {counts} {jnp.dtype(dtype).name}", flush=True)
        print(
            f"\nalltoallv_grouped_matmul (dispatch) on {ndev} devices: BSK = {bsk} rows per "
            f"rank, H1 = {h}, N1 = {n}, e = {experts} ({ndev * experts} experts); the xla "
            "implementation is the unfused lax composition (all_to_all + gather + "
            "ragged_dot); all-to-all bytes moved / useful bytes:\n"
        )
        print("| counts | dtype | implementation | median ms | GFLOP/s | vs xla | moved / useful |")
        print("|" + "---|" * 7)
        for r in dispatch_rows:
            vs = f"{r['vs_xla']:.2f}" if r["vs_xla"] is not None else "-"
            print(
                f"| {r['counts']} | {r['dtype']} | {r['implementation']} | {r['median_ms']:.2f} | "
                f"{r['gflops']:.1f} | {vs} | {r['bytes_moved_over_useful']:.2f} |"
            )
    return {"grouped_matmul": gmm_rows, "dispatch": dispatch_rows}


def _ceiling_name(accelerator: bool) -> str:
    return "vs datasheet peak" if accelerator else "vs fp32 ceiling"


def _fmt(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def gemm_choices() -> str:
    """The ``ffi`` implementation's GEMM per operand dtype on this machine,
    for a program of one rank and for ranks that share the cores."""

    def engine(min_k, max_product):
        if min_k == 0 or max_product >= ffi_impl.UNLIMITED:
            return ffi_impl.XLA_DOT
        choices = [f"{ffi_impl.XLA_DOT} for per-rank k >= {min_k}"] if min_k is not None else []
        if max_product:
            choices.append(f"{ffi_impl.XLA_DOT} below 2^{max_product.bit_length() - 1} m*k*n")
        return ", ".join([ffi_impl.BLAS, *choices])

    parts = []
    for dtype in ("float16", "bfloat16", "int8", ffi_impl.FLOAT8):
        alone, shared = (
            engine(ffi_impl.xla_gemm_min_k(dtype, p), ffi_impl.xla_gemm_max_product(dtype, p))
            for p in (1, 2)
        )
        parts.append(
            f"{dtype} {alone}"
            if alone == shared
            else f"{dtype} {alone} (one rank) / {shared} (ranks sharing the cores)"
        )
    return "; ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description="jax_mc2 benchmarks")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--plot",
        help="also draw the ratios to this PNG file (needs matplotlib: the [plot] extra)",
    )
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument(
        "--implementations",
        default=None,
        help="comma-separated (default: ffi,xla on CPU, xla elsewhere)",
    )
    parser.add_argument(
        "--suite",
        default="all",
        choices=["all", "tp", "ep", "ascend"],
        help="tp: the matmul + all-reduce operators; ep: grouped matmul and AlltoAllv; "
        "ascend: the ascend launch layer's own cost through the CANN test double",
    )
    args = parser.parse_args(argv)
    if args.suite == "ascend":
        from benchmarks import ascend

        rows = ascend.run(repeat=max(args.repeat, 200))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    backend = jax.default_backend()
    impls = (
        args.implementations.split(",")
        if args.implementations
        else (["ffi", "xla"] if backend == "cpu" else ["xla"])
    )
    repeat = max(args.repeat, 10)
    big = 512 if args.quick else 2048
    shapes_1 = [(512, 512, 512), (big, big, big)] if not args.quick else [(512, 512, 512)]
    shapes_8 = [(big, big, big), (1024, 4096, 1024)] if not args.quick else [(512, 1024, 512)]
    ndev = min(8, len(jax.devices()))
    device_kind = jax.devices()[0].device_kind
    # On an accelerator the CPU's shapes end inside launch overhead: one
    # device also runs 8192^3, and rows compare with the datasheet peak of
    # their operand class (the measured bf16 dot is printed beside it).
    accelerator = backend != "cpu"
    peaks = datasheet_peaks(device_kind) if accelerator else None
    if accelerator:
        if not args.quick:
            shapes_1 = [(big, big, big), (8192, 8192, 8192)]
        measured_bf16 = measure_dot(*shapes_1[-1], jnp.bfloat16, repeat)

        def ceiling_of(cls):
            peak = (peaks or {}).get(cls)
            return peak * 1e3 if peak else None

    else:
        ceiling = measure_ceiling(big, big, big, repeat)

        def ceiling_of(cls):
            return ceiling

    rows: list[Row] = []
    tp_cases = (
        ()
        if args.suite == "ep"
        else (
            ("mm_all_reduce_base", mm_case),
            ("matmul_all_reduce_add_rms_norm", norm_case),
            ("quant_matmul_all_reduce (int8)", quant_case),
            ("quant_matmul_all_reduce_v4 fp8 pertoken", _lowp("pertoken")),
            ("quant_matmul_all_reduce_v4 fp8 perblock", _lowp("perblock")),
            ("quant_matmul_all_reduce_v4 MXFP8", _lowp("mx")),
        )
    )
    meshes = ((1, shapes_1), (ndev, shapes_8)) if ndev > 1 else ((1, shapes_1),)
    for opname, case in tp_cases:
        for devices, shapes in meshes:
            for m, k, n in shapes:
                for dtype in getattr(case, "dtypes", (jnp.float16, jnp.bfloat16)):
                    times = case(m, k, n, dtype, devices, impls, repeat)
                    flops = 2 * m * k * n
                    base = times["unfused jnp"]
                    ceiling = ceiling_of(getattr(case, "operand", None) or operand_class(dtype))
                    for name, ms in times.items():
                        gflops = flops / (ms * 1e-3) / 1e9
                        rows.append(
                            Row(
                                opname,
                                f"{m}x{k}x{n}",
                                jnp.dtype(dtype).name,
                                devices,
                                name,
                                round(ms, 3),
                                round(gflops, 1),
                                round(base / ms, 2) if name != "unfused jnp" else 1.0,
                                round(gflops / ceiling, 2) if ceiling else None,
                            )
                        )
                    print(
                        f"  done {opname} {m}x{k}x{n} {jnp.dtype(dtype).name} x{devices}",
                        flush=True,
                    )

    print(
        f"\njax_mc2 benchmarks — {backend} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} cores, jax {jax.__version__}, "
        f"median of {repeat} or more (at least {MIN_SAMPLING_S:g} s of samples per case)"
    )
    flags = ffi_impl.cpu_flags()
    print(f"CPU flags: {' '.join(flags) or 'unknown'} ({platform.processor() or '?'})")
    print(f"ffi GEMM (JAX_MC2_GEMM={os.environ.get('JAX_MC2_GEMM') or 'auto'}): {gemm_choices()}")
    if accelerator:
        m, k, n = shapes_1[-1]
        print(f"XLA bf16 dot, {m}x{k}x{n}, one device: {measured_bf16 / 1e3:.1f} TFLOP/s")
        listed = ", ".join(f"{c} {v:g}" for c, v in peaks.items()) if peaks else "not listed"
        print(f"datasheet dense peaks (TFLOP/s, TOPS for int8): {listed}\n")
    else:
        print(f"dense fp32 GEMM ceiling ({big}^3, one device): {ceiling:.1f} GFLOP/s\n")
    header = (
        "| operator | m x k x n | dtype | devices | implementation | median ms | "
        f"GFLOP/s | vs unfused jnp | {_ceiling_name(accelerator)} |"
    )
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        print(
            f"| {r.operator} | {r.shape} | {r.dtype} | {r.devices} | {r.implementation} | "
            f"{r.median_ms:.2f} | {r.gflops:.1f} | {r.vs_unfused:.2f} | {_fmt(r.vs_ceiling)} |"
        )
    ep = (
        ep_report(args.quick, impls, repeat, ndev, ceiling_of, accelerator)
        if args.suite != "tp"
        else None
    )
    lowbit = None
    if ndev > 1 and args.suite != "ep":
        m, k, n = (512, 1024, 512) if args.quick else (2048, 2048, 2048)
        rows_lb, err = lowbit_comm_report(m, k, n, ndev, repeat)
        base_bytes = rows_lb[0][1]
        print(
            f"\nlow-bit communication, mm_all_reduce_base int8 {m}x{k}x{n} on {ndev} devices "
            "(bytes each device sends, from the compiled HLO; scales 2 max|out| / 127 and "
            f"{ndev}x that):\n"
        )
        print("| communication | bytes sent per device | vs fp16 all-reduce | median ms |")
        print("|---|---|---|---|")
        for name, nbytes, ms in rows_lb:
            print(f"| {name} | {nbytes} | {nbytes / base_bytes:.2f} | {ms:.2f} |")
        print(f"\nint8 chain error: max |low - fp16| / max |fp16| = {err:.2e}")
        lowbit = {"rows": rows_lb, "relative_error": err}
    run = {
        "backend": backend,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "cpu_flags": list(ffi_impl.cpu_flags()),
        "gemm": gemm_choices(),
        "jax": jax.__version__,
        "device_kind": device_kind,
        "ceiling_gflops": None if accelerator else ceiling,
        "bf16_dot_gflops": measured_bf16 if accelerator else None,
        "datasheet_peaks": peaks,
        "rows": [asdict(r) for r in rows],
        "lowbit_comm": lowbit,
        "expert_parallel": ep,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=2)
    if args.plot:
        from benchmarks import plot

        plot.draw(run, args.plot)


if __name__ == "__main__":
    main()
