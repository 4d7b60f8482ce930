"""Type aliases of the public API."""

from __future__ import annotations

from typing import Literal

from jax import Array
from jax.typing import ArrayLike, DTypeLike

#: A mesh axis name, a tuple of names, or None (a group of one).
AxisName = str | tuple[str, ...] | None
#: ``"xla"``, ``"ffi"``, ``"ascend"`` or None (the platform default).
Implementation = Literal["xla", "ffi", "ascend"] | None
#: A weight layout: None / ``"ND"`` or ``"FRACTAL_NZ"`` (V4 also ``"hifloat8"``).
Format = str | None

__all__ = ["Array", "ArrayLike", "AxisName", "DTypeLike", "Format", "Implementation"]
