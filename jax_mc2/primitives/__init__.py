"""One module per primitive: its spec, abstract evaluation (validation),
batching, differentiation, and its ``xla`` and ``ffi`` lowering entries."""
