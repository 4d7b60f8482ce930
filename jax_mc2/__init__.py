"""jax_mc2: fused compute + communication operators for JAX with the
semantics of Huawei Ascend CANN's MC2 operators."""

# The ascend implementation registers its lowerings; CANN loads lazily.
from jax_mc2 import ascend as ascend
from jax_mc2 import parallel as parallel
from jax_mc2 import quant as quant
from jax_mc2 import targets as targets
from jax_mc2.implementations import ffi as _ffi  # noqa: F401  (registers the FFI targets)
from jax_mc2.operators.alltoallv_grouped_matmul import (
    alltoallv_grouped_matmul as alltoallv_grouped_matmul,
)
from jax_mc2.operators.alltoallv_grouped_matmul import dispatch_counts as dispatch_counts
from jax_mc2.operators.alltoallv_grouped_matmul import exchange_counts as exchange_counts
from jax_mc2.operators.alltoallv_grouped_matmul import (
    grouped_matmul_alltoallv as grouped_matmul_alltoallv,
)
from jax_mc2.operators.grouped_matmul import grouped_matmul as grouped_matmul
from jax_mc2.operators.matmul_all_reduce import mm_all_reduce_base as mm_all_reduce_base
from jax_mc2.operators.matmul_all_reduce_add_rms_norm import (
    inplace_matmul_all_reduce_add_rms_norm as inplace_matmul_all_reduce_add_rms_norm,
)
from jax_mc2.operators.matmul_all_reduce_add_rms_norm import (
    matmul_all_reduce_add_rms_norm as matmul_all_reduce_add_rms_norm,
)
from jax_mc2.operators.quant_matmul_all_reduce import (
    quant_matmul_all_reduce as quant_matmul_all_reduce,
)
from jax_mc2.operators.quant_matmul_all_reduce import (
    quant_matmul_all_reduce_v4 as quant_matmul_all_reduce_v4,
)
from jax_mc2.targets import get_target as get_target
from jax_mc2.targets import set_target as set_target
from jax_mc2.targets import target as target

__version__ = "0.1.0"

__all__ = [
    "alltoallv_grouped_matmul",
    "dispatch_counts",
    "exchange_counts",
    "get_target",
    "grouped_matmul",
    "grouped_matmul_alltoallv",
    "inplace_matmul_all_reduce_add_rms_norm",
    "matmul_all_reduce_add_rms_norm",
    "mm_all_reduce_base",
    "parallel",
    "quant_matmul_all_reduce",
    "quant_matmul_all_reduce_v4",
    "quant",
    "set_target",
    "target",
    "targets",
]
