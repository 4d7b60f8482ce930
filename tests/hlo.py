"""Reading lowered StableHLO text in tests."""

from __future__ import annotations


def reductions(text: str) -> int:
    """The all-reduces in ``text``: ``stablehlo.all_reduce`` ops, plus the
    ``ffi`` implementation's split all-reduces (docs/semantics.md §10.5),
    each counted once: bfloat16 reduce-scatter + all-gather pairs and
    float16 all-to-all + all-gather pairs (in texts without the low-bit
    communication modes, whose all-to-alls these tests do not count)."""
    splits = text.count("stablehlo.reduce_scatter") + text.count("stablehlo.all_to_all")
    assert text.count("stablehlo.all_gather") >= splits, "a split all-reduce without its gather"
    return text.count("stablehlo.all_reduce") + splits
