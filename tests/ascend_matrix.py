"""Runs an existing implementation-parametrized operator test with
implementation="ascend" (through the CANN test double).

``for_ascend(test)`` returns a test with the same parametrization less the
``impl`` axis, and less the float32 cases: CANN's MC2 kernels take fp16/bf16,
and the ascend lowering refuses float32 where they do (the test_ascend_*
files check those refusals)."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest


def _is_f32(value) -> bool:
    try:
        return np.dtype(value) == np.dtype(np.float32)
    except TypeError:
        return False


def _keep(value, drop=(), keep_f32=False) -> bool:
    if isinstance(value, str) and value in drop:
        return False
    if isinstance(value, (tuple, list)) and any(isinstance(v, str) and v in drop for v in value):
        return False
    if keep_f32:
        return True
    values = value.values if hasattr(value, "values") and hasattr(value, "marks") else value
    if isinstance(values, (tuple, list)):
        return not any(_is_f32(v) for v in values if not isinstance(v, (int, float, str)))
    if isinstance(values, (int, float, str, bool)) or values is None:
        return True
    return not _is_f32(values)


def for_ascend(test, drop=(), keep_f32=False):
    """``drop``: parameter values (strings) whose cases CANN does not take."""
    marks = []
    for m in getattr(test, "pytestmark", []):
        if m.name == "parametrize":
            names = m.args[0]
            names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
            if "impl" in names:
                continue
            values = [v for v in m.args[1] if _keep(v, drop, keep_f32)]
            ids = m.kwargs.get("ids")
            kwargs = {k: v for k, v in m.kwargs.items() if k != "ids"}
            if callable(ids) or ids is None:
                marks.append(pytest.mark.parametrize(m.args[0], values, ids=ids, **kwargs))
            else:
                kept = [i for v, i in zip(m.args[1], ids) if _keep(v, drop, keep_f32)]
                marks.append(pytest.mark.parametrize(m.args[0], values, ids=kept, **kwargs))
        else:
            marks.append(m)
    sig = inspect.signature(test)

    @functools.wraps(test)
    def wrapper(**kwargs):
        return test(impl="ascend", **kwargs)

    wrapper.__signature__ = sig.replace(
        parameters=[p for p in sig.parameters.values() if p.name != "impl"]
    )
    del wrapper.__wrapped__
    wrapper.pytestmark = marks
    return wrapper
