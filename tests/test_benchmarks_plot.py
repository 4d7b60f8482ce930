"""The benchmark figure: one panel per operator from a run's JSON."""

from __future__ import annotations

import pytest

from benchmarks import plot


def _row(op, impl, vs, devices=1, dtype="bfloat16"):
    return {
        "operator": op,
        "shape": "512x512x512",
        "dtype": dtype,
        "devices": devices,
        "implementation": impl,
        "median_ms": 1.0,
        "gflops": 1.0,
        "vs_unfused": vs,
        "vs_ceiling": vs / 2,
    }


RUN = {
    "cores": 2,
    "cpu_flags": ["avx2"],
    "ceiling_gflops": 100.0,
    "rows": [
        _row("mm", "ffi", 1.2),
        _row("mm", "xla", 0.9),
        _row("mm", "unfused jnp", 1.0),
        _row("mm", "ffi", 1.1, devices=8),
        _row("mm", "unfused jnp", 1.0, devices=8),
    ],
    "expert_parallel": {
        "grouped_matmul": [
            {
                "routing": "uniform",
                "dtype": "float32",
                "contender": c,
                "vs_dense_einsum": v,
                "vs_ceiling": v / 2,
            }
            for c, v in (("ffi operator, 1 device", 1.3), ("dense batched einsum", 1.0))
        ]
    },
}


def test_panels_hold_each_contender_per_case():
    (mm, gmm) = plot._panels(RUN)
    title, cases, ratios, ceiling, base = mm
    assert title == "mm" and base == "unfused jnp"
    assert cases == ["512x512x512\nbfloat16 x1", "512x512x512\nbfloat16 x8"]
    assert ratios == {"ffi": [1.2, 1.1], "xla": [0.9, None]}
    assert ceiling["ffi"] == [0.6, 0.55]
    assert gmm[0] == "grouped matmul (G = 8)" and gmm[4] == "dense batched einsum"
    assert gmm[2] == {"ffi operator, 1 device": [1.3]}


def test_draw_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    plot.draw(RUN, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_an_accelerator_run(tmp_path):
    """A GPU run's JSON: no fp32 ceiling, the datasheet peaks and the bf16 dot."""
    pytest.importorskip("matplotlib")
    run = {
        **RUN,
        "backend": "gpu",
        "device_kind": "NVIDIA H200",
        "ceiling_gflops": None,
        "bf16_dot_gflops": 573110.0,
        "datasheet_peaks": {"16-bit": 989.0},
    }
    out = tmp_path / "gpu.png"
    plot.draw(run, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
