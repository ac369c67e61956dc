"""Export a family's step function to StableHLO with `jax.export`.

One pure function serves prefill and decode: it runs C tokens at positions start..start+C-1
against a fixed-capacity KV cache and returns the logits of row `last` and the next token
chosen from them: their argmax, or on CUDA a token drawn with the sampling settings passed in
(kernels/sample.cu). So greedy and sampled decoding read back one int, not the vocabulary, and
that int can feed the next step on the device. Prefill is that function with C = the
chunk size (prompts run chunk by chunk); decode is C = 1. Caches are donated, so IREE updates
them in place.

Each weight is its own argument. (One flat buffer sliced inside the graph was measured on an
H200 and decoded 40-60% slower; bench/results/2026-11-26-h200-latest.json.)
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..sampling import DEVICE_PARAMS
from . import extern, layers, packed


@dataclass(frozen=True)
class StepSpec:
    """What the exported function looks like; recorded in the bundle manifest for the runtime."""

    weight_names: tuple[str, ...]  # in argument order (jax flattens a dict by sorted key)
    weight_shapes: tuple[tuple[int, ...], ...]
    weight_dtype: str  # "float32" | "float16": every weight but the packed ones
    cache_shape: tuple[int, ...]  # K and V each; capacity already includes the chunk slack
    cache_dtype: str
    packed: tuple[packed.PackedSpec, ...]  # weights kept packed (three arguments each)
    weight_dtypes: tuple[str, ...]  # per argument
    cache_layout: str  # the order of cache_shape's axes (layers.CACHE_LAYOUT)
    context: int = 0  # positions a one-token step can be at (the bundle's max_context); 0: capacity

    @property
    def capacity(self) -> int:
        """Positions the cache holds: also the length of the step's token history."""
        return self.cache_shape[self.cache_layout.index("S")]


SAMPLING_PARAMS = DEVICE_PARAMS  # the step's sampling argument: [8] int32 (sampling.device_params)


def first_argmax(x):
    """argmax of a vector as an int32 scalar (lowest index on ties), on the device."""
    return layers.max_and_first_index(x)[1][0]


def make_step(family, cfg, packed_weights: tuple[packed.PackedSpec, ...] = (), dtype=jnp.float32):
    """The step function; packed_weights name the weight arguments that come as packed triples
    (dequantized to `dtype` where no kernel reads them)."""
    def step(weights, k_cache, v_cache, history, tokens, start, last, sampling):
        # history: [S] int32 (the sequence's tokens by position), tokens: [C] int32, start/last:
        # scalar int32, sampling: [8] int32 (sampling.device_params)
        # -> logits [V] f32, [token, status] int32, caches, history
        weights = packed.view(weights, packed_weights, dtype)
        positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
        h, k_cache, v_cache = family.forward(cfg, weights, tokens, positions, k_cache, v_cache)
        if isinstance(h, layers.Normed):  # one token (so last = 0): its final norm folds into the lm_head
            row = layers.Normed(h.x[0], h.w, h.eps, h.one_plus)
        else:  # row `last` as a masked sum: h[last] at a device-held index is read back to the host
            row = jnp.sum(jnp.where(jnp.arange(h.shape[0])[:, None] == last, h, 0.0), axis=0)
        logits, argmax = family.lm_head(cfg, weights, row)
        argmax = first_argmax(logits) if argmax is None else argmax
        token, history = next_token(logits, argmax, sampling, start, last, tokens, history)
        return logits, token, k_cache, v_cache, history

    return step


def next_token(logits, argmax, sampling, start, last, tokens, history):
    """([token, status] int32, history): with the CUDA kernels, the sampling kernel's (the
    argmax at temperature 0), which also writes the step's tokens into the history (the
    repetition penalty's, on the device); else the argmax, status 0 (the host samples from the
    logits, and keeps the history itself), and the history as it came."""
    if samples_on_device(layers.DECODE_KERNEL, logits.shape[0]):
        return extern.sample_token(logits, argmax, sampling, start, last, tokens, history)
    return jnp.stack([argmax, jnp.int32(0)]), history


def samples_on_device(decode_kernel: str | None, vocab: int) -> bool:
    """Whether a step exported with these kernels draws sampled tokens itself (next_token)."""
    return decode_kernel == "cuda" and extern.sample_fits(vocab)


def step_spec(family, cfg, *, capacity: int, weight_dtype: str, cache_dtype: str = "float32",
              packed_weights: tuple[packed.PackedSpec, ...] = (), cache_layout: str = "LDSH",
              context: int = 0) -> StepSpec:
    """The step's signature; cache_layout: the target's (iree_compile.CACHE_LAYOUT), which the
    exported step then uses; context: the positions a one-token step can be at (fewer than the
    cache's rows, which also hold a prefill chunk's padding), 0 for all of them."""
    if cache_layout not in layers.CACHE_LAYOUTS:
        raise ValueError(f"cache_layout {cache_layout!r} is not one of {layers.CACHE_LAYOUTS}")
    saved, layers.CACHE_LAYOUT = layers.CACHE_LAYOUT, cache_layout
    try:
        cache_shape = tuple(family.cache_shape(cfg, capacity))
    finally:
        layers.CACHE_LAYOUT = saved
    args = {n: (tuple(s), weight_dtype) for n, s in family.weight_shapes(cfg).items()}
    for p in packed_weights:
        if args.pop(p.name, (None,))[0] != p.shape:
            raise ValueError(f"packed weight {p.name} {list(p.shape)} is not a weight of the model, or not of that shape")
        args |= p.arguments()
    names = tuple(sorted(args))
    return StepSpec(names, tuple(args[n][0] for n in names), weight_dtype, cache_shape, cache_dtype,
                    tuple(packed_weights), tuple(args[n][1] for n in names), cache_layout, context)


def export_step(family, cfg, spec: StepSpec, tokens: int, module_name: str, cache_write: str = "slice",
                decode_kernel: str | None = None) -> str:
    """StableHLO text of the step for `tokens` tokens per call, its module renamed.

    The cache's layout is the spec's. The target's choices (iree_compile.export_options):
    - cache_write: how the KV cache is written, one of layers.CACHE_WRITES;
    - decode_kernel: the target ("cuda" or "cpu") whose hand-written kernels (compile/extern.py)
      the step uses where they fit (mostly one-token steps; layers.DECODE_KERNEL says which),
      linked into the text as IREE dispatches; None: none."""
    if cache_write not in layers.CACHE_WRITES:
        raise ValueError(f"cache_write {cache_write!r} is not one of {layers.CACHE_WRITES}")
    saved = layers.CACHE_WRITE, layers.DECODE_KERNEL, layers.CACHE_LAYOUT, layers.DECODE_ROWS
    layers.CACHE_WRITE, layers.DECODE_KERNEL, layers.CACHE_LAYOUT = cache_write, decode_kernel, spec.cache_layout
    layers.DECODE_ROWS = spec.context or None
    try:
        return extern.link(_export_step(family, cfg, spec, tokens, module_name))
    finally:
        layers.CACHE_WRITE, layers.DECODE_KERNEL, layers.CACHE_LAYOUT, layers.DECODE_ROWS = saved


def _export_step(family, cfg, spec: StepSpec, tokens: int, module_name: str) -> str:
    wdt = np.dtype(spec.weight_dtype)
    fn = make_step(family, cfg, spec.packed, wdt)
    weights = {n: jax.ShapeDtypeStruct(s, np.dtype(d))
               for n, s, d in zip(spec.weight_names, spec.weight_shapes, spec.weight_dtypes)}
    cache = jax.ShapeDtypeStruct(spec.cache_shape, np.dtype(spec.cache_dtype))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    # keep_unused: the runtime passes every argument, though a one-token step has no use for
    # `last`, nor a step without the sampling kernel for `sampling` and the history.
    exported = jax.export.export(jax.jit(fn, donate_argnums=(1, 2, 3), keep_unused=True),
                                 disabled_checks=extern.disabled_checks())(
        weights, cache, cache, jax.ShapeDtypeStruct((spec.capacity,), jnp.int32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32), scalar, scalar, jax.ShapeDtypeStruct((SAMPLING_PARAMS,), jnp.int32))
    text = exported.mlir_module()
    # Every jax export is `module @jit_<fn>`; prefill and decode share one runtime context,
    # so each gets its own module name.
    head = f"module @jit_{fn.__name__}"
    if head not in text:
        raise RuntimeError(f"unexpected jax export: no {head!r} header")
    return _caller_storage(text.replace(head, f"module @{module_name}", 1))


# Buffers the caller passes after the step's own arguments (iree_runner/session.py keeps two
# of each and alternates): storage for the logits and the next token, and for IREE's transients.
# Without them IREE allocates and frees them on the queue in every call, and the CUDA HAL's
# queue alloca/dealloca block the host until the GPU reaches them (iree 3.13 cuda_device.c),
# so no call returned before its step had run.
CALLER_STORAGE = ("%logits_storage: !hal.buffer {iree.abi.output = 0 : index}",
                  "%token_storage: !hal.buffer {iree.abi.output = 1 : index}",
                  "%transients: !hal.buffer {iree.abi.transients}")


def _caller_storage(text: str) -> str:
    """The exported main with CALLER_STORAGE appended to its arguments."""
    start = text.index("func.func public @main(")
    end = text.index(") -> (", start)
    return text[:end] + ", " + ", ".join(CALLER_STORAGE) + text[end:]
