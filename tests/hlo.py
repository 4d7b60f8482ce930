"""Reading lowered StableHLO text in tests."""

from __future__ import annotations


def reductions(text: str) -> int:
    """The all-reduces in ``text``: ``stablehlo.all_reduce`` ops, plus the
    ``ffi`` implementation's reduce-scatter + all-gather pairs
    (docs/semantics.md §10.5), each counted once."""
    scatters = text.count("stablehlo.reduce_scatter")
    assert text.count("stablehlo.all_gather") >= scatters, "a reduce-scatter without its gather"
    return text.count("stablehlo.all_reduce") + scatters
