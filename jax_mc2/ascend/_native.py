"""The ascend launch layer's nanobind module (built from ``ascend_kernels/``).

Loaded by name: a static ``from jax_mc2 import _mc2_ascend`` would read to
import-linter as an import of the whole package.
"""

from __future__ import annotations

import importlib

native = importlib.import_module("jax_mc2._mc2_ascend")
