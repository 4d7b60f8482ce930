"""``shard_map`` wrappers that take global arrays and a ``Mesh``."""

from jax_mc2.parallel.expert_parallel import Capacities as Capacities
from jax_mc2.parallel.expert_parallel import MoEOutput as MoEOutput
from jax_mc2.parallel.expert_parallel import SharedExpert as SharedExpert
from jax_mc2.parallel.expert_parallel import (
    expert_parallel_moe as expert_parallel_moe,
)
from jax_mc2.parallel.expert_parallel import moe_capacities as moe_capacities
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
    "Capacities",
    "MoEOutput",
    "SharedExpert",
    "W8A8",
    "expert_parallel_moe",
    "moe_capacities",
    "quantize_weight_int8",
    "row_parallel_linear",
    "row_parallel_linear_add_rms_norm",
]
