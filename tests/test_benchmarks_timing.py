"""The benchmark runner's interleaved timing: every contender is sampled in
every round, in an order drawn anew for each round, so that no contender
always runs first or always follows the same one."""

from __future__ import annotations

from benchmarks import run


def _recording(names, calls):
    def make(name):
        def fn(x):
            calls.append(name)
            return x

        return fn

    return {name: make(name) for name in names}


def test_rounds_run_the_contenders_in_varying_orders(monkeypatch):
    monkeypatch.setattr(run, "MIN_SAMPLING_S", 0.0)
    calls = []
    names = ["ffi", "xla", "unfused jnp"]
    medians = run.time_interleaved(_recording(names, calls), (1,), repeat=30)
    assert set(medians) == set(names)
    warm_up, timed = calls[: 2 * len(names)], calls[2 * len(names) :]
    assert sorted(warm_up) == sorted(names * 2)
    rounds = [timed[i : i + len(names)] for i in range(0, len(timed), len(names))]
    assert len(rounds) == 30
    assert all(sorted(order) == sorted(names) for order in rounds)
    assert {order[0] for order in rounds} == set(names)
    # Every contender follows every other one within some round (a rotating
    # start would never put "ffi" right after "unfused jnp").
    neighbours = {(a, b) for order in rounds for a, b in zip(order, order[1:])}
    assert neighbours == {(a, b) for a in names for b in names if a != b}
    # Seeded: a second run draws the same orders.
    again = []
    run.time_interleaved(_recording(names, again), (1,), repeat=30)
    assert again == calls


def test_short_cases_sample_for_the_minimum_time(monkeypatch):
    monkeypatch.setattr(run, "MIN_SAMPLING_S", 0.05)
    monkeypatch.setattr(run, "MAX_ROUNDS", 7)
    calls = []
    run.time_interleaved(_recording(["a", "b"], calls), (1,), repeat=1)
    # Fast functions: sampling continues until MAX_ROUNDS.
    assert len(calls) == 2 * 2 + 7 * 2


def test_twin_is_a_function_of_its_own_with_the_same_results():
    def unfused(x):
        return x * 2

    fns = run.with_twin({"ffi": abs, "unfused jnp": unfused})
    assert list(fns) == ["ffi", "unfused jnp", run.TWIN]
    twin = fns[run.TWIN]
    assert twin is not unfused and twin(3) == unfused(3) == 6


def test_every_operator_case_times_the_twin(monkeypatch):
    import jax.numpy as jnp

    monkeypatch.setattr(run, "MIN_SAMPLING_S", 0.0)
    cases = [
        run.mm_case,
        run.norm_case,
        run.quant_case,
        run._lowp("pertoken"),
        run._lowp("perblock"),
        run._lowp("mx"),
    ]
    for case in cases:
        times = case(128, 128, 128, jnp.bfloat16, 1, ["xla"], 1)
        assert {"xla", "unfused jnp", run.TWIN} <= set(times), case
        assert all(ms > 0 for ms in times.values())
