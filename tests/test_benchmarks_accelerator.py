"""The benchmark runner on an accelerator (simulated here: the CPU backend
reported as "gpu"): only the ``xla`` contenders, rows against the datasheet
peak of their operand class, the measured bf16 dot in the header."""

from __future__ import annotations

import json

import jax
import pytest

from benchmarks import run


def test_datasheet_peaks_by_device_kind():
    assert run.datasheet_peaks("NVIDIA H200")["16-bit"] == 989.0
    assert run.datasheet_peaks("NVIDIA H100 80GB HBM3") == run.DATASHEET_PEAKS["H100 SXM"]
    assert run.datasheet_peaks("NVIDIA H100 PCIe") is None  # other clocks, not listed
    assert run.datasheet_peaks("NVIDIA H200 NVL") is None
    assert run.datasheet_peaks("cpu") is None


def test_operand_classes():
    import jax.numpy as jnp

    assert run.operand_class(jnp.bfloat16) == run.operand_class(jnp.float16) == "16-bit"
    assert run.operand_class(jnp.float8_e4m3fn) == "float8"
    assert run.operand_class(jnp.float32) == "float32"
    assert run.operand_class(jnp.int8) == "int8"


@pytest.mark.slow
def test_runner_on_an_accelerator(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(run, "datasheet_peaks", lambda kind: run.DATASHEET_PEAKS["H200"])
    out = tmp_path / "run.json"
    run.main(["--quick", "--suite", "ep", "--repeat", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "XLA bf16 dot" in text and "datasheet dense peaks" in text
    assert "vs datasheet peak" in text and "vs fp32 ceiling" not in text
    saved = json.loads(out.read_text())
    assert saved["datasheet_peaks"] == run.DATASHEET_PEAKS["H200"]
    assert saved["ceiling_gflops"] is None and saved["bf16_dot_gflops"] > 0
    rows = saved["expert_parallel"]["grouped_matmul"]
    assert {r["contender"] for r in rows} == {
        "xla operator, 1 device",
        "lax.ragged_dot",
        "dense batched einsum",
    }
    for r in rows:
        peak = saved["datasheet_peaks"][run.operand_class(r["dtype"])] * 1e3
        assert r["vs_ceiling"] == pytest.approx(r["gflops"] / peak, abs=0.01)
