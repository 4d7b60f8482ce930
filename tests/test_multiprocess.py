"""2 processes x 2 CPU devices with jax.distributed and gloo give the same
results as one process with 4 devices."""

import jax
import numpy as np
import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P
from multiprocess_case import (
    ep_round_trip,
    lowbit_fn,
    lowbit_specs,
    make_case,
    make_ep_case,
    make_lowbit_case,
    run_workers,
)

import jax_mc2 as mc2


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    run_workers("multiprocess_worker.py", tmp_path)

    mesh = make_mesh((4,), ("tp",))
    x1, x2, bias, residual, gamma = make_case(4)
    for impl in ("ffi", "xla"):

        def f(a, b, c, r, g, impl=impl):
            out = mc2.mm_all_reduce_base(a, b, "tp", bias=c, implementation=impl)
            y, norm = mc2.matmul_all_reduce_add_rms_norm(
                a, b, r, g, "tp", bias=c, implementation=impl
            )
            return out, y, norm

        want = jax.jit(
            jax.shard_map(
                f,
                mesh=mesh,
                in_specs=(P(None, None, "tp"), P("tp", None), P(), P(), P()),
                out_specs=(P(), P(), P()),
            )
        )(x1, x2, bias, residual, gamma)
        for pid in range(2):
            got = np.load(tmp_path / f"result_{pid}.npz")
            for name, w in zip(("mm", "y", "norm"), want):
                # Summation order over 4 ranks may differ between in-process and
                # gloo all-reduces: allow one fp16 rounding step per rank.
                np.testing.assert_allclose(
                    got[f"{impl}_{name}"].astype(np.float32),
                    np.asarray(w, np.float32),
                    atol=4 * 2**-10 * (np.abs(np.asarray(w, np.float32)).max() + 1),
                )

    # Expert parallelism: every rank's shard of dispatch + combine (traced
    # counts, XLA all-to-alls over gloo) equals the single-process result.
    table, gx, gw = make_ep_case(4)
    for impl in ("ffi", "xla"):
        want = jax.jit(
            jax.shard_map(
                ep_round_trip(impl),
                mesh=mesh,
                in_specs=(P("tp"), P("tp"), P("tp")),
                out_specs=(P("tp"), P("tp")),
            )
        )(gx, gw, table)
        seen = 0
        for pid in range(2):
            got = np.load(tmp_path / f"result_{pid}.npz")
            for name, w in zip(("ep_y", "ep_back"), want):
                for rank in range(4):
                    key = f"{impl}_{name}_{rank}"
                    if key in got.files:
                        np.testing.assert_array_equal(got[key][0], np.asarray(w)[rank])
                        seen += 1
        assert seen == 8

    # Low-bit communication: the s8 and f8 all-to-alls and all-gathers over
    # gloo; the sums run in rank order in the lax steps, so bit for bit.
    specs = lowbit_specs(P)
    for impl in ("ffi", "xla"):
        want = jax.jit(
            jax.shard_map(lowbit_fn(impl), mesh=mesh, in_specs=specs, out_specs=(P(), P()))
        )(*make_lowbit_case(4))
        for pid in range(2):
            got = np.load(tmp_path / f"result_{pid}.npz")
            for name, w in zip(("int8_comm", "fp8_comm"), want):
                np.testing.assert_array_equal(got[f"{impl}_{name}"], np.asarray(w).view(np.uint16))
