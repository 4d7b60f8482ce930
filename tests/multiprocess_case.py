"""The data of the multi-process test, made identically in every process."""

import numpy as np


def make_case(world: int):
    rng = np.random.default_rng(1234)
    k = 16 * world
    x1 = rng.standard_normal((2, 8, k)).astype(np.float16)
    x2 = (rng.standard_normal((k, 24)) * 0.3).astype(np.float16)
    bias = rng.standard_normal(24).astype(np.float16)
    residual = rng.standard_normal((2, 8, 24)).astype(np.float16)
    gamma = rng.standard_normal(24).astype(np.float16)
    return x1, x2, bias, residual, gamma
