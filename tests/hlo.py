"""Reading lowered StableHLO text in tests."""

from __future__ import annotations

import re


def reductions(text: str) -> int:
    """The all-reduces in ``text``: ``stablehlo.all_reduce`` ops, plus the
    ``ffi`` implementation's split all-reduces (docs/semantics.md §10.5),
    each counted once: bfloat16 reduce-scatter + all-gather pairs and
    float16 all-to-all + all-gather pairs (in texts without the low-bit
    communication modes, whose all-to-alls these tests do not count)."""
    splits = text.count("stablehlo.reduce_scatter") + text.count("stablehlo.all_to_all")
    assert text.count("stablehlo.all_gather") >= splits, "a split all-reduce without its gather"
    return text.count("stablehlo.all_reduce") + splits


_CONVERT = re.compile(
    r"(%[\w#.]+) = stablehlo\.convert (%[\w#.]+) : \(tensor<([^>]*)>\) -> tensor<([^>]*)>"
)
_WIDTH = {"f16": 16, "bf16": 16, "f32": 32, "f64": 64}


def _element(tensor_type: str) -> str:
    return tensor_type.split("x")[-1]


def float_round_trips(text: str) -> list[str]:
    """Converts in ``text`` that narrow a float (f32 -> f16 / bf16 / fp8)
    whose result is widened straight back to a float: the pairs XLA:GPU
    removes as "excess precision", skipping the rounding. One entry
    ``"f32->f16->f32"`` per pair, per function (SSA names are per function)."""
    found = []
    for body in text.split("func.func")[1:]:
        narrowed = {}
        for result, source, src, dst in _CONVERT.findall(body):
            a, b = _element(src), _element(dst)
            if not (a.startswith(("f", "bf")) and b.startswith(("f", "bf"))):
                continue
            if source in narrowed:
                found.append(f"{narrowed[source]}->{b}")
            if _WIDTH.get(b, 8) < _WIDTH.get(a, 8):
                narrowed[result] = f"{a}->{b}"
    return found


_BARRIER = re.compile(r"(%[\w#.]+)(?::(\d+))? = stablehlo\.optimization_barrier")


def unpinned_float8_widenings(text: str) -> list[str]:
    """Converts in ``text`` that widen a float8 / float4 value (codes or e8m0
    scales) not taken straight from an ``optimization_barrier``: XLA:GPU
    folds such a widening into the convert that quantized the value, if the
    program made it. One entry ``"f8E4M3FN->f32"`` per convert, per function."""
    found = []
    for body in text.split("func.func")[1:]:
        pinned = set()
        for name, count in _BARRIER.findall(body):
            pinned |= {f"{name}#{i}" for i in range(int(count))} if count else {name}
        for _, source, src, dst in _CONVERT.findall(body):
            a, b = _element(src), _element(dst)
            if a.startswith(("f8", "f4")) and source not in pinned:
                found.append(f"{a}->{b}")
    return found
