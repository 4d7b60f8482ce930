"""The examples run as a user would run them (the main example is also run
by CI and the README's first command)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_shape_check_example():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "shape_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "generic    atlas-a2    atlas-a3  ascend-950" in out.stdout
    assert "world size 16 (axis_name=('tp',)) is not supported on target 'atlas-a2'" in out.stdout
    assert "epsilon must be in (0, 1), got 1.5" in out.stdout
    assert "e * W = 8 * 64 = 512 exceeds 256" in out.stdout
    assert "alltoallv_grouped_matmul: not available on target 'atlas-a2'" in out.stdout
    assert (
        "the float8_e4m3fn rows (fp8, hifloat8 and MX: Ascend 950 only) are not available on "
        "target 'atlas-a2'" in out.stdout
    )


@pytest.mark.slow
def test_tp_transformer_block_example_with_lowbit_comm():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "tp_transformer_block.py"),
            "--lowbit-comm",
            "--batch",
            "2",
            "--seq",
            "32",
            "--d-model",
            "128",
            "--ffn",
            "256",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: worst relative forward error" in out.stdout
    assert "W8A8 + int8 comm" in out.stdout
    assert "OK: W8A8 within 3e-2" in out.stdout


@pytest.mark.slow
def test_moe_expert_parallel_example():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    small = ["--tokens", "128", "--d-model", "32", "--ffn", "64", "--shared-ffn", "32"]
    for extra in ([], ["--capacity-factor", "1.25", "--dtype", "bfloat16"]):
        out = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "moe_expert_parallel.py"), *small]
            + extra,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "dp=2 x ep=4" in out.stdout
    assert "capacity factor 1.25" in out.stdout
