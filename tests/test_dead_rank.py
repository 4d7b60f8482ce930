"""A dead rank is an error, not a hang.

2 processes x 2 CPU devices (jax.distributed + gloo). Both processes run
mm_all_reduce_base ("ffi" and "xla") over a 4-device axis; then one process
(the victim) stops taking part and the other (the survivor) waits in the
next collective. The test kills or freezes the victim; the survivor must end
with an error that names the failure, within BOUND_S seconds.

What bounds it (see dead_rank_worker.py for the options):
- SIGKILL: the kernel closes the victim's sockets, gloo reports "Connection
  closed by peer" to the pending collective at once (a JaxRuntimeError in
  Python); when the victim was task 0 the distributed client also sees the
  coordination service gone and terminates the process.
- SIGSTOP (a hung rank, sockets stay open): jax.distributed's heartbeat
  (heartbeat_timeout_seconds=HEARTBEAT_S) declares the task dead and the
  client terminates the survivor; if the heartbeat is left at a long value,
  --xla_cpu_collective_timeout_seconds fails the pending gloo collective.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dead_rank_worker.py")

HEARTBEAT_S = 10  # jax.distributed heartbeat_timeout_seconds (default 100)
COLLECTIVE_TIMEOUT_S = 30  # --xla_cpu_collective_timeout_seconds (default 1800)
BOUND_S = 60  # the survivor must be gone this long after the kill
STARTUP_S = 120  # both processes must be through their first collectives

# Text that names the failure: gloo's broken connection or timeout, or the
# jax.distributed client's termination after a heartbeat/RPC failure.
FAILURE = re.compile(
    r"Connection closed by peer"
    r"|Connection reset by peer"
    r"|Timed out waiting \d+ms"
    r"|stopped sending heartbeats"
    r"|Terminating process because the JAX distributed service detected fatal errors"
    r"|another task died",
    re.IGNORECASE,
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def _run(tmp_path, victim, impl, sig, heartbeat_s=HEARTBEAT_S, collective_s=COLLECTIVE_TIMEOUT_S):
    """Start both workers, kill (or freeze) the victim once the survivor waits
    in a collective; returns (survivor returncode, its output, seconds from
    the signal to its exit)."""
    survivor = 1 - victim
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    logs = [tmp_path / f"worker_{i}.log" for i in range(2)]
    procs, files = [], []
    try:
        for i in range(2):
            f = open(logs[i], "w")
            files.append(f)
            argv = [WORKER, str(i), "2", str(port), str(victim), impl]
            argv += [str(heartbeat_s), str(collective_s)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-u", *argv],
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + STARTUP_S
        while not (
            f"PARKED {victim}" in _read(logs[victim])
            and f"ENTER {survivor}" in _read(logs[survivor])
        ):
            dead = [i for i, p in enumerate(procs) if p.poll() is not None]
            assert not dead, f"worker {dead} exited early:\n" + "\n".join(map(_read, logs))
            assert time.monotonic() < deadline, "startup timed out:\n" + "\n".join(map(_read, logs))
            time.sleep(0.1)
        # Both have completed the ffi and xla operators; give the survivor
        # time to be inside the next collective, then take the victim away.
        time.sleep(1.0)
        assert procs[survivor].poll() is None, _read(logs[survivor])
        procs[victim].send_signal(sig)
        t_kill = time.monotonic()
        try:
            rc = procs[survivor].wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"survivor {survivor} still running {BOUND_S}s after "
                f"{signal.Signals(sig).name} of task {victim}:\n{_read(logs[survivor])}"
            )
        return rc, _read(logs[survivor]), time.monotonic() - t_kill
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for f in files:
            f.close()


def _check(rc, out, elapsed, survivor, bound=BOUND_S):
    print(f"survivor {survivor}: rc={rc} after {elapsed:.1f}s\n{out[-3000:]}")
    assert rc != 0, out
    assert "SURVIVOR_NO_ERROR" not in out, out
    assert f"ENTER {survivor}" in out, out
    assert FAILURE.search(out), f"no failure message in the survivor's output:\n{out}"
    assert elapsed <= bound, f"{elapsed:.1f}s > {bound}s"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ffi", "xla"])
@pytest.mark.parametrize("victim", [1, 0], ids=["kill-task1", "kill-coordinator"])
def test_killed_rank_fails_the_survivor(tmp_path, victim, impl):
    """SIGKILL: the survivor's pending collective fails (or its distributed
    client terminates it) within seconds."""
    rc, out, elapsed = _run(tmp_path, victim, impl, signal.SIGKILL)
    _check(rc, out, elapsed, 1 - victim)


@pytest.mark.slow
@pytest.mark.parametrize(
    "victim,impl", [(1, "ffi"), (0, "xla")], ids=["stop-task1", "stop-coordinator"]
)
def test_frozen_rank_fails_the_survivor_by_heartbeat(tmp_path, victim, impl):
    """SIGSTOP: no socket closes; the heartbeat timeout declares the task
    dead and the distributed client terminates the survivor."""
    rc, out, elapsed = _run(tmp_path, victim, impl, signal.SIGSTOP)
    _check(rc, out, elapsed, 1 - victim, bound=HEARTBEAT_S + 20)
    assert re.search(r"heartbeat|Terminating process|DEADLINE_EXCEEDED", out, re.I), out


@pytest.mark.slow
def test_frozen_rank_fails_the_pending_collective_by_timeout(tmp_path):
    """SIGSTOP with a long heartbeat: --xla_cpu_collective_timeout_seconds
    fails the survivor's pending gloo collective with an exception."""
    rc, out, elapsed = _run(tmp_path, 1, "ffi", signal.SIGSTOP, heartbeat_s=100, collective_s=4)
    _check(rc, out, elapsed, 0, bound=4 + 20)
    assert "SURVIVOR_ERROR 0" in out and "Timed out waiting" in out, out
