"""Test setup: an 8-device simulated CPU mesh, configured before jax loads."""

import fcntl
import os
import subprocess
import sys


def _cann_double() -> None:
    """Builds the CANN test double into build/cann_double at the repository
    root (unless JAX_MC2_CANN_LIBRARY_PATH already names a CANN) and points
    the ascend backend at it, before jax_mc2 is imported. The build is
    incremental (build.py recompiles what changed and relinks), under a lock
    so that concurrent sessions do not build over each other. A failed build
    fails the session: the ascend tests must never be skipped silently."""
    os.environ.setdefault("CANN_DOUBLE_HCCL_TIMEOUT_MS", "5000")
    os.environ.setdefault("JAX_MC2_ASCEND_TIMEOUT_MS", "20000")
    if os.environ.get("JAX_MC2_CANN_LIBRARY_PATH"):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(os.path.dirname(here), "build", "cann_double")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build = subprocess.run(
            [sys.executable, os.path.join(here, "cann_double", "build.py"), out],
            capture_output=True,
            text=True,
        )
    if build.returncode != 0:
        raise RuntimeError(
            "building the CANN test double failed:\n" + build.stdout[-4000:] + build.stderr[-4000:]
        )
    os.environ["JAX_MC2_CANN_LIBRARY_PATH"] = out


def _compilation_cache() -> None:
    """Keeps XLA's compiled programs between runs in build/jax-compilation at
    the repository root (JAX's persistent cache, keyed on the lowered program,
    the compile options and the jaxlib version), so that a second run of the
    suite skips most of the compilation. A JAX_COMPILATION_CACHE_DIR of the
    caller's wins; JAX_MC2_TESTS_COMPILATION_CACHE=0 turns it off."""
    if os.environ.get("JAX_MC2_TESTS_COMPILATION_CACHE") == "0":
        return
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(os.path.dirname(here), "build", "jax-compilation")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", default)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _platform() -> str:
    """The JAX platform the suite runs on: the CPU (an 8-device simulated
    mesh) whatever accelerator the machine has, unless
    JAX_MC2_TESTS_PLATFORM names another (e.g. "cuda"). There the cases
    that can run do; those on meshes larger than the platform has devices,
    and those of the CPU-only implementations (`ffi`, `ascend`), are
    skipped (docs/development.md, Tests)."""
    platform = os.environ.get("JAX_MC2_TESTS_PLATFORM") or "cpu"
    os.environ["JAX_PLATFORMS"] = platform
    return platform


PLATFORM = _platform()
_cann_double()
_compilation_cache()

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.pop("JAX_MC2_TARGET", None)
os.environ.pop("JAX_MC2_IMPLEMENTATION", None)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_mc2  # noqa: E402, F401

IMPLEMENTATIONS = ("xla", "ffi")
#: Every implementation, the ascend one through the CANN test double.
ALL_IMPLEMENTATIONS = ("xla", "ffi", "ascend")


def cann_double_live_counts() -> dict:
    """The double's live allocations, tensors, executors and int arrays."""
    import ctypes

    lib = ctypes.CDLL(
        os.path.join(os.environ["JAX_MC2_CANN_LIBRARY_PATH"], "libcann_double_core.so")
    )
    vals = [ctypes.c_int64() for _ in range(4)]
    lib.cann_double_live_counts(*[ctypes.byref(v) for v in vals])
    return dict(zip(("allocations", "tensors", "executors", "int_arrays"), (v.value for v in vals)))


def cann_double_device_sys_param(device: int, option: int) -> int:
    """The double's value of aclrtCtxSetSysParamOpt's ``option`` on NPU
    ``device``'s default context (-1: no live context)."""
    import ctypes

    lib = ctypes.CDLL(
        os.path.join(os.environ["JAX_MC2_CANN_LIBRARY_PATH"], "libcann_double_core.so")
    )
    lib.cann_double_device_sys_param.restype = ctypes.c_int64
    return lib.cann_double_device_sys_param(device, option)


def cann_double_comm_counts() -> tuple[int, int]:
    """The double's live HCCL communicators, and how many of them were made
    while HCCL_DETERMINISTIC (HcclSetConfig) was 1."""
    import ctypes

    lib = ctypes.CDLL(
        os.path.join(os.environ["JAX_MC2_CANN_LIBRARY_PATH"], "libcann_double_core.so")
    )
    live, deterministic = ctypes.c_int64(), ctypes.c_int64()
    lib.cann_double_comm_counts(ctypes.byref(live), ctypes.byref(deterministic))
    return live.value, deterministic.value


def cann_double_report() -> str:
    import ctypes

    lib = ctypes.CDLL(
        os.path.join(os.environ["JAX_MC2_CANN_LIBRARY_PATH"], "libcann_double_core.so")
    )
    lib.cann_double_report.restype = ctypes.c_char_p
    return lib.cann_double_report().decode()


def pytest_sessionfinish(session, exitstatus):
    """After the ascend tests: the launch layer released everything it took
    from CANN (zero live allocations, descriptors, executors) and the double
    saw no misuse."""
    if not jax_mc2.ascend._USED:
        return
    jax_mc2.ascend.shutdown()
    counts = cann_double_live_counts()
    report = cann_double_report()
    problems = []
    if any(counts.values()):
        problems.append(f"live CANN handles after shutdown: {counts}")
    if "violations: 0" not in report:
        problems.append(report)
    if problems:
        sys.stderr.write("\nCANN test double check FAILED:\n" + "\n".join(problems) + "\n")
        session.exitstatus = 1


def run_python(code: str, env: dict, cwd) -> str:
    """Runs `code` in a fresh Python process (environment `env`, in folder
    `cwd`, at most 300 s), which must exit with 0; returns its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def make_mesh(shape, names):
    """A Mesh over the first prod(shape) devices (simulated CPU devices, or
    those of JAX_MC2_TESTS_PLATFORM: the test is skipped where it has fewer)."""
    n = int(np.prod(shape))
    if n > len(jax.devices()):
        pytest.skip(f"needs {n} devices; {PLATFORM} has {len(jax.devices())}")
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def ascend_mm_all_reduce(mesh):
    """Jitted ``mm_all_reduce_base(x1, x2, "tp", implementation="ascend")``
    over ``mesh``'s "tp" axis: x1 split along k, x2 along its rows."""
    return jax.jit(
        jax.shard_map(
            lambda a, b: jax_mc2.mm_all_reduce_base(a, b, "tp", implementation="ascend"),
            mesh=mesh,
            in_specs=(P(None, "tp"), P("tp", None)),
            out_specs=P(),
        )
    )


@pytest.fixture(autouse=True)
def _generic_target():
    jax_mc2.set_target("generic")
    yield
    jax_mc2.set_target("generic")


# --- The inner loop: `pytest -m "not slow"` -------------------------------
#
# `pytest -q` runs every test. The inner loop (`-m "not slow"`) runs each
# primitive and mode once; collection marks the rest `slow` by two rules, on
# top of the explicit `@pytest.mark.slow` marks in the test files (and
# SLOW_TESTS below for the ascend files):
#
# 1. A case on more than 2 devices (a `world` parameter above 2) is slow.
# 2. A parametrized test runs each of its parameter values once per
#    implementation (`impl`): a case whose every value already ran in an
#    earlier inner-loop case of the same test and implementation is slow. A
#    single list (say, the invalid inputs of a validation test) therefore
#    stays whole, and a product such as dtype x world x transpose keeps, per
#    implementation, about as many cases as its longest axis.


def slow(*values, **kwargs):
    """A parameter set that runs in the full run only:
    `pytest.param(*values, marks=pytest.mark.slow)`."""
    return pytest.param(*values, marks=pytest.mark.slow, **kwargs)


#: Slow tests and cases named here rather than marked in their files, each
#: above ~1.5 s in the inner loop: "file::test" (every case) or
#: "file::test[id]". A primitive or helper they cover keeps a faster case in
#: the inner loop.
SLOW_TESTS = {
    "test_ascend_add_rms_norm.py::test_grad_matches_ffi",
    "test_ascend_mm_all_reduce.py::test_grad_sharded_matches_ffi",
    # Wait out the double's collective timeout.
    "test_ascend_failures.py::test_injected_failure[stalled-rank]",
    "test_ascend_alltoallv_grad.py::test_injected_failure[stalled-rank]",
    # Four ranks.
    "test_ascend_failures.py::test_injected_failure[phase2-world4]",
    # Start other Python processes (and build a library).
    "test_ascend_alltoallv_grad.py::test_hccl_without_alltoallv",
    "test_ascend_loader.py::test_chip_target_follows_the_soc_name",
    "test_gemm_engine.py::test_openblas_threads_sleep_soon_unless_the_user_says_otherwise",
    "test_portable_paths.py::test_portable_and_vectorized_paths_give_the_same_bits",
    # Whole-table codec sweeps (test_hifloat8_round_trip_and_errors and
    # the small MX / perblock cases stay).
    "test_quant.py::test_hifloat8_encode_fp32_and_bf16",
    "test_quant.py::test_perblock_quantize_hifloat8_and_errors",
    "test_quant.py::test_mx_quantize[100-float8_e4m3fn]",
    "test_quant.py::test_mx_quantize[100-float8_e5m2]",
    "test_quant.py::test_perblock_quantize[shape2-float8_e4m3fn]",
    "test_quant.py::test_perblock_quantize[shape2-float8_e5m2]",
    "test_regressions_results.py::test_perblock_quantize_non_finite_keeps_finite_neighbours",
    "test_regressions_results.py::test_mx_quantize_non_finite_block_has_nan_scale",
    # Overflowing and disagreeing traced counts (the traced-count path keeps
    # test_dispatch_traced_counts_and_shared_expert).
    "test_regressions_results.py::test_alltoallv_traced_counts_overflowing_int32_clip_like_large_counts",
    "test_regressions_results.py::test_alltoallv_combine_traced_recv_counts_disagreeing_ffi_raises",
    # lax.ragged_dot's layout, against the xla implementation (its ffi case
    # and test_non_finite_weight_stays_in_its_group[xla] stay).
    "test_grouped_matmul.py::test_public_grouped_matmul_matches_ragged_dot_layout[xla]",
    "test_alltoallv_grouped_matmul.py::test_x64_enabled",
    "test_alltoallv_grouped_matmul.py::test_traced_capacity_drops_rows_past_it",
    # The xla twins of traced-count cases whose other variant stays (the
    # traced-count path of the xla implementation keeps
    # test_dispatch_traced_counts_and_shared_expert[False-float16-xla] and
    # test_combine_traced_counts_and_shared_expert[False-xla]).
    "test_alltoallv_grouped_matmul.py::test_dispatch_traced_counts_and_shared_expert[True-float16-xla]",
    "test_alltoallv_grouped_matmul.py::test_combine_traced_counts_and_shared_expert[True-xla]",
    "test_alltoallv_grouped_matmul.py::test_vmap_over_a_batch_of_combines_with_traced_counts[shared-counts-xla]",
    "test_regressions_results.py::test_alltoallv_combine_traced_counts_past_the_rows_read_zero_rows[xla]",
    "test_regressions_results.py::test_alltoallv_traced_send_counts_past_the_rows_are_clipped[xla]",
    # Codec sweeps with a smaller case beside them (MXFP4 values also run in
    # test_quant_v4_lowp.py's rows).
    "test_quant.py::test_mx_quantize[100-float4_e2m1fn]",
    "test_quant.py::test_fractal_nz[shape1-float16-16]",
    "test_quant.py::test_fractal_nz[shape2-float16-16]",
    "test_quant.py::test_perblock_quantize[shape1-float8_e4m3fn]",
    "test_quant.py::test_trans_quant_param_bits[False-0-True]",
    "test_alltoallv_grouped_matmul.py::test_dispatch_traced_recv_counts_given[xla]",
    "test_regressions_results.py::test_alltoallv_traced_recv_counts_disagreeing_xla_uses_the_peers_counts",
    "test_ascend_nz.py::test_grad_wrt_nz_weight_is_nz[False-xla]",
    "test_regressions_results.py::test_perblock_quantize_tiny_tile_stays_finite[hifloat8]",
    "test_quant.py::test_fractal_nz[shape1-bfloat16-16]",
    # The empty-m rows' shared checks and MX row scales run in the ffi case.
    "test_quant_v4_lowp.py::test_empty_m_in_the_perblock_and_mx_rows[xla]",
    # Starts another Python process.
    "test_ascend_failures.py::test_comm_name_failure_leaves_no_communicator",
    # Waits out a stream timeout (in another process).
    "test_ascend_launch_lifetime.py::test_shutdown_after_a_timed_out_call_frees_nothing_its_kernel_uses",
    # Three shapes compiled for the ascend pool (3-5 s).
    "test_ascend_launch_lifetime.py::test_pooled_blocks_go_back_under_their_own_size",
    # The W8A8 wrapper compiled twice (6 s); the W8A8 wrapper test stays.
    "test_regressions_results.py::test_row_parallel_linear_w8a8_list_bias",
    # The other mixed mesh of the same test stays.
    "test_regressions_errors.py::test_mixed_explicit_and_auto_mesh_row_parallel_linear[auto-explicit]",
    # Its ffi case stays.
    "test_regressions_results.py::test_dispatch_counts_give_the_combine_what_the_dispatch_sent[xla]",
}

#: Device counts up to this stay in the inner loop.
FAST_WORLD = 2


# tryfirst: before -m deselects and before any plugin reorders the items.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if os.environ.get("JAX_MC2_TESTS_EXPLICIT_SLOW_ONLY") == "1":
        # Only the explicit marks (a subprocess suite that wants every case
        # its own file does not mark slow).
        return
    slow = pytest.mark.slow
    covered: dict = {}
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        file = os.path.basename(str(item.path))
        names = {getattr(item, "originalname", item.name), item.name}
        if {f"{file}::{name}" for name in names} & SLOW_TESTS:
            item.add_marker(slow)
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        world = callspec.params.get("world")
        if isinstance(world, int) and world > FAST_WORLD:
            item.add_marker(slow)
            continue
        # One id per parametrize() call, in order: the case's values.
        values = set(enumerate(getattr(callspec, "_idlist", [callspec.id])))
        # Per implementation: each runs its own code for every value.
        test = (item.nodeid.split("[", 1)[0], callspec.params.get("impl"))
        seen = covered.setdefault(test, set())
        if values <= seen:
            item.add_marker(slow)
        else:
            seen |= values


#: What a call of a CPU-only implementation raises on another platform: the
#: lowering's refusal, or XLA's for an FFI target registered for the CPU.
_CPU_ONLY = ("lowers for cpu only", "No FFI handler registered for mc2_")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On JAX_MC2_TESTS_PLATFORM other than the CPU, a case that failed only
    because it calls the `ffi` or `ascend` implementation is reported as
    skipped, so that what fails there is what differs there."""
    outcome = yield
    report = outcome.get_result()
    if PLATFORM == "cpu" or report.when != "call" or not report.failed or call.excinfo is None:
        return
    message = str(call.excinfo.value)
    if any(text in message for text in _CPU_ONLY):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1], f"CPU only: {message[:200]}")
