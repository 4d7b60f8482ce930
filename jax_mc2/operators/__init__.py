"""The public multi-mode entry points: each canonicalizes a call and binds
the primitive of its mode (``jax_mc2.primitives``)."""
