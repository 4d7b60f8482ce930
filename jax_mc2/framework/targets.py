"""Chip targets: which Ascend chip's support matrix abstract evaluation applies.

``generic`` (the default) applies only the rules that define the math and
accepts float32 wherever the seeds accept float16/bfloat16. A chip target adds
that chip's rules from the CANN documents: dtypes, world sizes, size limits,
and which operators exist at all.

Select a target with ``set_target(name)``, ``with target(name): ...`` or the
environment variable ``JAX_MC2_TARGET``. The target is part of jit's cache key,
so a function traced under one target is re-traced under another.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np

from jax_mc2.framework import _compat

GENERIC = "generic"
ATLAS_A2 = "atlas-a2"
ATLAS_A3 = "atlas-a3"
ASCEND_950 = "ascend-950"
TARGETS = (GENERIC, ATLAS_A2, ATLAS_A3, ASCEND_950)

FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype("bfloat16")
FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class ExpertParallelLimits:
    """Size limits of the AlltoAllv grouped-matmul operators (seed 001).

    max_hidden: the largest H1, N1 and N2 (each in (0, 65536)).
    max_shared_hidden: the largest H2 of the shared expert (H2 in (0, 12288]).
    max_tokens: the largest BSK, the rows a rank sends (BSK < 52428800).
    traffic_bytes: (min, max) bytes a card sends, or None for no rule.
    """

    max_hidden: int = 65535
    max_shared_hidden: int = 12288
    max_tokens: int = 52428799
    traffic_bytes: tuple[int, int] | None = None


@dataclass(frozen=True)
class OperatorSupport:
    """One operator on one chip.

    world_sizes: the accepted communication-group sizes (None: any).
    max_dim: the largest m, k or n (None: no limit beyond the math).
    comm_turn_zero_only: CANN accepts only comm_turn=0.
    nonempty_matmul: x1 and x2 may not be empty tensors (m, n >= 1).
    source: where the rule comes from.
    max_last_dim: the largest last dimension of x1 and of x2 in the int8
      quantized modes (None: no limit).
    ep_limits: the size limits of the expert-parallel operators (None: the
      math only).
    low_precision: the fp8 / hifloat8 / MX rows and the fp8 communication
      (quant_matmul_all_reduce_v4 on Ascend 950) exist.
    quantized_world_sizes: the world sizes of the operator's quantized
      modes where they differ from ``world_sizes`` (None: the same), with
      ``quantized_source``.
    """

    world_sizes: frozenset[int] | None = None
    max_dim: int | None = None
    comm_turn_zero_only: bool = False
    nonempty_matmul: bool = False
    source: str = ""
    max_last_dim: int | None = None
    ep_limits: ExpertParallelLimits | None = None
    low_precision: bool = False
    quantized_world_sizes: frozenset[int] | None = None
    quantized_source: str = ""


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    float_dtypes: tuple[np.dtype, ...]
    operators: dict[str, OperatorSupport] = field(default_factory=dict)


_INT32_MAX = 2**31 - 1
_A2_RANKS = frozenset({1, 2, 4, 8})
_950_RANKS = frozenset(range(1, 65))
# aclnnQuantMatmulAllReduceV4 (seed 003) lists the Ascend 950 card counts.
_950_V4_RANKS = frozenset({1, 2, 4, 8, 16, 32, 64})
_MB = 1024 * 1024
# aclnnAlltoAllvGroupedMatMul / aclnnGroupedMatMulAlltoAllv: epWorldSize.
_A3_EP_RANKS = frozenset({8, 16, 32, 64})
_950_EP_RANKS = frozenset({4, 8, 16, 32, 64})
_A3_EP = OperatorSupport(
    _A3_EP_RANKS,
    source="AlltoAllv grouped matmul on Atlas A3: epWorldSize 8, 16, 32, 64",
    ep_limits=ExpertParallelLimits(traffic_bytes=(2 * _MB, 100 * _MB)),
)
_950_EP = OperatorSupport(
    _950_EP_RANKS,
    source="AlltoAllv grouped matmul on Ascend 950: epWorldSize 4, 8, 16, 32, 64",
    ep_limits=ExpertParallelLimits(),
)

PROFILES: dict[str, TargetProfile] = {
    GENERIC: TargetProfile(
        GENERIC,
        "the math only; float32 accepted wherever float16/bfloat16 are",
        (FLOAT16, BFLOAT16, FLOAT32),
        {
            "mm_all_reduce_base": OperatorSupport(),
            "matmul_all_reduce_add_rms_norm": OperatorSupport(),
            "inplace_matmul_all_reduce_add_rms_norm": OperatorSupport(),
            "quant_matmul_all_reduce": OperatorSupport(),
            "quant_matmul_all_reduce_v4": OperatorSupport(low_precision=True),
            "alltoallv_grouped_matmul": OperatorSupport(),
            "grouped_matmul_alltoallv": OperatorSupport(),
        },
    ),
    ATLAS_A2: TargetProfile(
        ATLAS_A2,
        "Atlas A2 training / Atlas 800I A2 inference (HCCS full mesh)",
        (FLOAT16, BFLOAT16),
        {
            # Full quantization: k <= 65535 and x2's last dimension <= 65535.
            "mm_all_reduce_base": OperatorSupport(
                _A2_RANKS,
                _INT32_MAX,
                True,
                True,
                "npu_mm_all_reduce_base: 1, 2, 4, 8 cards",
                max_last_dim=65535,
            ),
            "matmul_all_reduce_add_rms_norm": OperatorSupport(
                _A2_RANKS,
                _INT32_MAX,
                True,
                False,
                "aclnnMatmulAllReduceAddRmsNorm: 1, 2, 4, 8 cards",
            ),
            "inplace_matmul_all_reduce_add_rms_norm": OperatorSupport(
                _A2_RANKS,
                _INT32_MAX,
                True,
                False,
                "aclnnInplaceMatmulAllReduceAddRmsNorm: 1, 2, 4, 8 cards",
            ),
            # aclnnQuantMatmulAllReduce: x1 and x2 last dimensions <= 65535.
            "quant_matmul_all_reduce": OperatorSupport(
                _A2_RANKS,
                _INT32_MAX,
                True,
                True,
                "aclnnQuantMatmulAllReduce: 1, 2, 4, 8 cards",
                max_last_dim=65535,
            ),
            "quant_matmul_all_reduce_v4": OperatorSupport(
                _A2_RANKS,
                _INT32_MAX,
                True,
                True,
                "aclnnQuantMatmulAllReduceV4: 1, 2, 4, 8 cards",
                max_last_dim=65535,
            ),
        },
    ),
    # The matmul + all-reduce documents list Atlas A2 only; the AlltoAllv
    # grouped matmuls exist on A3 and 950, not on A2.
    ATLAS_A3: TargetProfile(
        ATLAS_A3,
        "Atlas A3 training / inference",
        (FLOAT16, BFLOAT16),
        {"alltoallv_grouped_matmul": _A3_EP, "grouped_matmul_alltoallv": _A3_EP},
    ),
    ASCEND_950: TargetProfile(
        ASCEND_950,
        "Ascend 950",
        (FLOAT16, BFLOAT16),
        {
            "mm_all_reduce_base": OperatorSupport(
                _950_RANKS,
                _INT32_MAX,
                True,
                True,
                "Ascend 950: up to 64 ranks",
                max_last_dim=65535,
                quantized_world_sizes=_950_V4_RANKS,
                quantized_source="the quantized modes on Ascend 950: the V4 kernel's card counts",
            ),
            "matmul_all_reduce_add_rms_norm": OperatorSupport(
                _950_RANKS, _INT32_MAX, True, False, "Ascend 950: up to 64 ranks"
            ),
            "inplace_matmul_all_reduce_add_rms_norm": OperatorSupport(
                _950_RANKS, _INT32_MAX, True, False, "Ascend 950: up to 64 ranks"
            ),
            "quant_matmul_all_reduce_v4": OperatorSupport(
                _950_V4_RANKS,
                _INT32_MAX,
                True,
                True,
                "aclnnQuantMatmulAllReduceV4 on Ascend 950: 1, 2, 4, 8, 16, 32, 64 cards",
                max_last_dim=65535,
                low_precision=True,
            ),
            "alltoallv_grouped_matmul": _950_EP,
            "grouped_matmul_alltoallv": _950_EP,
        },
    ),
}


_target_state = _compat.config_enum_state(
    "jax_mc2_target",
    list(TARGETS),
    _compat.env_choice("JAX_MC2_TARGET", TARGETS, GENERIC),
    "Chip whose support matrix jax_mc2 applies at abstract-evaluation time.",
)


def _check_name(name: str) -> str:
    if name not in TARGETS:
        raise ValueError(f"jax_mc2 target must be one of {TARGETS}, got {name!r}")
    return name


def get_target() -> str:
    """The name of the chip target in force."""
    return _target_state.value


_explicit = "JAX_MC2_TARGET" in os.environ


def explicitly_set() -> bool:
    """Whether the user chose a target (``set_target``, ``JAX_MC2_TARGET``, or
    a non-generic target in force); the ascend backend otherwise takes the
    chip's own from the hardware."""
    return _explicit or get_target() != GENERIC


def set_target(name: str) -> None:
    """Sets the chip target for this process (``"generic"`` to clear)."""
    import jax

    global _explicit
    jax.config.update("jax_mc2_target", _check_name(name))
    _explicit = True


def target(name: str) -> AbstractContextManager[None]:
    """A context manager applying chip target ``name`` inside its block."""
    return _target_state(_check_name(name))


def current_profile() -> TargetProfile:
    return PROFILES[get_target()]


def operator_support(op: str) -> OperatorSupport:
    """The rules for ``op`` on the current target, or NotImplementedError."""
    profile = current_profile()
    support = profile.operators.get(op)
    if support is None:
        available = sorted(n for n, p in PROFILES.items() if op in p.operators)
        raise NotImplementedError(
            f"{op}: not available on target {profile.name!r} ({profile.description}); "
            f"targets that have it: {', '.join(available)}"
        )
    return support


def check_float_dtype(op: str, name: str, aval) -> None:
    """fp16/bf16 on every target; float32 only under ``generic``."""
    profile = current_profile()
    dtype = np.dtype(aval.dtype)
    if dtype in profile.float_dtypes:
        return
    allowed = ", ".join(d.name for d in profile.float_dtypes)
    if dtype == FLOAT32:
        raise TypeError(
            f"{op}: {name} dtype float32 is not supported on target {profile.name!r} "
            f"(allowed: {allowed}); float32 is accepted only under the 'generic' target"
        )
    raise TypeError(f"{op}: {name} dtype must be one of {allowed}, got {dtype.name}")


def check_world_size(op: str, world_size: int, axis_name, *, quantized: bool = False) -> None:
    """The current target's world sizes of ``op`` (of its quantized modes
    with ``quantized``)."""
    support = operator_support(op)
    profile = current_profile()
    allowed, source = support.world_sizes, support.source
    if quantized and support.quantized_world_sizes is not None:
        allowed, source = support.quantized_world_sizes, support.quantized_source
    if allowed is not None and world_size not in allowed:
        sizes = sorted(allowed)
        shown = (
            f"{sizes[0]}..{sizes[-1]}"
            if sizes == list(range(sizes[0], sizes[-1] + 1)) and len(sizes) > 4
            else ", ".join(map(str, sizes))
        )
        raise NotImplementedError(
            f"{op}: world size {world_size} (axis_name={axis_name!r}) is not supported on "
            f"target {profile.name!r}; supported: {shown} ({source})"
        )
