"""Export a family's step function to StableHLO with `jax.export`.

One pure function serves prefill and decode: it runs C tokens at positions start..start+C-1
against a fixed-capacity KV cache and returns the logits of row `last` and their argmax (so
greedy decoding reads back one int, not the vocabulary). Prefill is that function with C = the
chunk size (prompts run chunk by chunk); decode is C = 1. Caches are donated, so IREE updates
them in place.

Weight layouts: "args" passes each weight as its own argument; "flat" passes one buffer
holding all of them back to back, sliced statically inside the graph, so a call marshals two
caches and one weight buffer instead of hundreds of arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("args", "flat")


@dataclass(frozen=True)
class StepSpec:
    """What the exported function looks like; recorded in the bundle manifest for the runtime."""

    weight_names: tuple[str, ...]  # in argument / buffer order (jax flattens a dict by sorted key)
    weight_shapes: tuple[tuple[int, ...], ...]
    weight_dtype: str  # "float32" | "float16"
    cache_shape: tuple[int, ...]  # K and V each; capacity already includes the chunk slack
    cache_dtype: str
    weight_layout: str = "args"

    def flat_offsets(self) -> list[int]:
        sizes = [int(np.prod(s)) for s in self.weight_shapes]
        return [int(x) for x in np.cumsum([0, *sizes])]


def first_argmax(x):
    """argmax as two plain reductions (max, then the lowest index holding it). IREE's CUDA
    codegen ran jnp.argmax's (value, index) reduction nearly serially: 3.8 ms for 152k logits."""
    idx = jnp.arange(x.shape[0], dtype=jnp.int32)
    return jnp.min(jnp.where(x == jnp.max(x), idx, jnp.int32(x.shape[0])))


def make_step(family, cfg):
    def step(weights, k_cache, v_cache, tokens, start, last):
        # tokens: [C] int32, start/last: scalar int32 -> logits [V] f32, argmax, caches
        positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
        h, k_cache, v_cache = family.forward(cfg, weights, tokens, positions, k_cache, v_cache)
        logits = family.lm_head(cfg, weights, h[last])
        return logits, first_argmax(logits), k_cache, v_cache

    return step


def make_flat_step(family, cfg, spec: StepSpec):
    step = make_step(family, cfg)
    offsets = spec.flat_offsets()

    def flat_step(flat, k_cache, v_cache, tokens, start, last):
        weights = {n: flat[offsets[i]:offsets[i + 1]].reshape(s)
                   for i, (n, s) in enumerate(zip(spec.weight_names, spec.weight_shapes))}
        return step(weights, k_cache, v_cache, tokens, start, last)

    return flat_step


def step_spec(family, cfg, *, capacity: int, weight_dtype: str, cache_dtype: str = "float32",
              weight_layout: str = "args") -> StepSpec:
    if weight_layout not in LAYOUTS:
        raise ValueError(f"weight layout {weight_layout!r}; known: {', '.join(LAYOUTS)}")
    shapes = family.weight_shapes(cfg)
    names = tuple(sorted(shapes))
    return StepSpec(names, tuple(tuple(shapes[n]) for n in names), weight_dtype,
                    tuple(family.cache_shape(cfg, capacity)), cache_dtype, weight_layout)


def export_step(family, cfg, spec: StepSpec, tokens: int, module_name: str) -> str:
    """StableHLO text of the step for `tokens` tokens per call, its module renamed."""
    wdt = np.dtype(spec.weight_dtype)
    if spec.weight_layout == "flat":
        fn = make_flat_step(family, cfg, spec)
        weights = jax.ShapeDtypeStruct((spec.flat_offsets()[-1],), wdt)
    else:
        fn = make_step(family, cfg)
        weights = {n: jax.ShapeDtypeStruct(s, wdt) for n, s in zip(spec.weight_names, spec.weight_shapes)}
    cache = jax.ShapeDtypeStruct(spec.cache_shape, np.dtype(spec.cache_dtype))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    exported = jax.export.export(jax.jit(fn, donate_argnums=(1, 2)))(
        weights, cache, cache, jax.ShapeDtypeStruct((tokens,), jnp.int32), scalar, scalar)
    text = exported.mlir_module()
    # Every jax export is `module @jit_<fn>`; prefill and decode share one runtime context,
    # so each gets its own module name.
    head = f"module @jit_{fn.__name__}"
    if head not in text:
        raise RuntimeError(f"unexpected jax export: no {head!r} header")
    return text.replace(head, f"module @{module_name}", 1)
