"""jax_mc2 benchmarks: ``python -m benchmarks.run [--json FILE]``."""
