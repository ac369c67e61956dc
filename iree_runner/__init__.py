"""iree-runner: LLM inference on IREE-compiled JAX models.

Importing this package (the runtime) never imports jax: the ahead-of-time step lives in
`iree_runner.compile` and is only imported by the commands that compile.
"""

__version__ = "0.1.0"
