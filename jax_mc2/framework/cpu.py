"""The host CPU's instruction-set features that the speed of a GEMM depends
on (read once from /proc/cpuinfo), for the choices the ``xla`` and ``ffi``
implementations make when a call is lowered for CPU."""

from __future__ import annotations

import functools

#: The CPU features the GEMM speeds depend on.
CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx_vnni",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)

#: The CPU features that give XLA:CPU a native bfloat16 GEMM (any one).
NATIVE_BF16_DOT = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """Which of :data:`CPU_FLAGS` this CPU has (from /proc/cpuinfo; empty
    where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in CPU_FLAGS if flag in have)
    except OSError:
        pass
    return ()


def has_native_bf16_dot() -> bool:
    """Whether XLA:CPU has a native bfloat16 GEMM on this CPU."""
    return bool(NATIVE_BF16_DOT & set(cpu_flags()))
