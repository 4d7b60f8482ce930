"""``shard_map`` wrappers that take global arrays and a ``Mesh``."""

from jax_mc2.parallel.tensor_parallel import W8A8 as W8A8
from jax_mc2.parallel.tensor_parallel import (
    quantize_weight_int8 as quantize_weight_int8,
)
from jax_mc2.parallel.tensor_parallel import (
    row_parallel_linear as row_parallel_linear,
)
from jax_mc2.parallel.tensor_parallel import (
    row_parallel_linear_add_rms_norm as row_parallel_linear_add_rms_norm,
)

__all__ = [
    "W8A8",
    "quantize_weight_int8",
    "row_parallel_linear",
    "row_parallel_linear_add_rms_norm",
]
