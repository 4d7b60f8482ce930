"""The bottom layer of jax_mc2: what every primitive and backend builds on."""
