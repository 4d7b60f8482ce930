"""The implementations a primitive lowers to: ``xla`` (lax compositions) and
``ffi`` (C++ XLA FFI kernels + XLA collectives)."""
