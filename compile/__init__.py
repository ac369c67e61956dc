"""Ahead-of-time step: JAX model definitions, export to StableHLO, iree-compile, artifact cache.

Installed as `iree_runner.compile` (needs the `compile` extra: jax, iree-base-compiler).
"""
