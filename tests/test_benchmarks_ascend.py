"""The ascend benchmark suite runs through the CANN test double (in a
subprocess: it sets the chip target for its whole process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPERATORS = {
    "mm_all_reduce_base",
    "matmul_all_reduce_add_rms_norm",
    "quant_matmul_all_reduce (int8)",
    "mm_all_reduce_base (weight-only)",
    "quant_matmul_all_reduce_v4 (fp8 pertoken)",
    "alltoallv_grouped_matmul",
}


@pytest.mark.slow
def test_ascend_suite_times_every_operator(tmp_path):
    out = tmp_path / "ascend.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--suite", "ascend", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["operator"] for r in rows if "operator" in r} == OPERATORS
    for r in rows:
        if "operator" in r:
            assert r["calls"] >= 200 and r["handler_us"] > 0, r
