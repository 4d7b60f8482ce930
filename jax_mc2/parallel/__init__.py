"""``shard_map`` wrappers that take global arrays and a ``Mesh``."""

from jax_mc2.parallel.tensor_parallel import (
    row_parallel_linear as row_parallel_linear,
)
from jax_mc2.parallel.tensor_parallel import (
    row_parallel_linear_add_rms_norm as row_parallel_linear_add_rms_norm,
)

__all__ = ["row_parallel_linear", "row_parallel_linear_add_rms_norm"]
