"""MLX affine-quantized weights kept packed on the device (`iree-generate compile --packed`).

A packed weight `x.weight` enters the step as two arguments: `x.weight` (uint32 words
[out, in * bits / 32], as the checkpoint stores them) and `x.scales_biases` ([out, in / group, 2]:
the checkpoint's `x.scales` and `x.biases` side by side, so a kernel reads a group's two in one
load). The pairs stay in the checkpoint's F16 or BF16 (4 bytes a group: the device holds what
the file holds), and the kernels, CUDA's and the CPU's, widen them as they read (exact). A bundle
made before the CPU's kernels read them (PackedSpec.pairs "float32") gets them widened when
loaded. The model code sees one `Packed` in
their place: `layers.linear` gives it to a kernel that dequantizes as it reads
(compile/extern.py: CUDA and CPU one-token steps), anything else dequantizes it in the graph
(w = scales * q + biases per group along `in`, value i of a row in bits [i * bits, (i + 1) * bits)
of its words).
Only 2-D weights of linear and embedding layers are kept packed; MoE expert stacks and
2/3/5/6-bit weights (whose values straddle words, or no kernel reads) are dequantized when
loaded, as without --packed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax.numpy as jnp

from ..resident import packed_arguments

PACKED_BITS = (4, 8)  # values never straddle a word; the CUDA and CPU kernels read 4


@dataclass(frozen=True)
class PackedSpec:
    """One weight kept packed: its logical name and shape, and how it was quantized."""

    name: str  # the logical weight, "<module>.weight"
    shape: tuple[int, int]  # logical [out, in]
    bits: int
    group_size: int
    stored: str = "float32"  # the checkpoint's scales and biases: "float16" or "bfloat16"
    pairs: str = "float32"  # the step's scales_biases: stored, or "float32" (widened when loaded)

    def arguments(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The step's arguments for it: name -> (shape, dtype)."""
        (n, k), groups = self.shape, (self.shape[0], self.shape[1] // self.group_size)
        words, scales_biases = packed_arguments(self.name)
        return {words: ((n, k * self.bits // 32), "uint32"), scales_biases: ((*groups, 2), self.pairs)}


def choose(shapes: dict[str, tuple[int, ...]], quant_spec, bits: tuple[int, ...] = PACKED_BITS) -> tuple[PackedSpec, ...]:
    """The weights among `shapes` to keep packed: those quantized with one of `bits`.
    quant_spec(name) is the checkpoint's (bits, group_size, scales' dtype) for a logical weight,
    or None where it is not quantized (a stacked weight such as qkv_proj: its parts' common spec,
    or None if they differ). The pairs are left in f32: stored_pairs() keeps them as stored."""
    out = []
    for name, shape in sorted(shapes.items()):
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        spec = quant_spec(name)
        if spec is not None and spec[0] in bits:
            out.append(PackedSpec(name, tuple(shape), *spec))
    return tuple(out)


def stored_pairs(specs: tuple[PackedSpec, ...]) -> tuple[PackedSpec, ...]:
    """specs with each weight's scales_biases as the checkpoint stores them (as the kernels read them)."""
    return tuple(replace(s, pairs=s.stored) for s in specs)


class Packed:
    """A packed weight inside the traced step: words, scales_biases ([..., out, in / group, 2]:
    each group's scale and bias, f32, f16 or bf16), bits and group size. `dtype` is the float
    dtype the graph dequantizes to (the other weights' dtype)."""

    def __init__(self, words, scales_biases, bits: int, group_size: int, dtype):
        self.words, self.scales_biases = words, scales_biases
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        self.shape = (*words.shape[:-1], words.shape[-1] * 32 // bits)
        self.ndim = len(self.shape)

    @classmethod
    def of(cls, words, scales, biases, bits: int, group_size: int, dtype) -> "Packed":
        """From separate scales and biases [..., out, in / group]."""
        return cls(words, jnp.stack([scales, biases], axis=-1), bits, group_size, dtype)

    @property
    def scales(self):
        """f32 (exact from f16 or bf16)."""
        return self.scales_biases[..., 0].astype(jnp.float32)

    @property
    def biases(self):
        return self.scales_biases[..., 1].astype(jnp.float32)

    def rows(self, idx) -> "Packed":
        """The rows `idx` (an embedding lookup), still packed."""
        return Packed(self.words[idx], self.scales_biases[idx], self.bits, self.group_size, self.dtype)

    def dequantize(self, dtype=None):
        """[..., out, in] in `dtype` (default self.dtype), computed in f32."""
        per_word = 32 // self.bits
        shifts = jnp.arange(per_word, dtype=jnp.uint32) * self.bits
        q = (self.words[..., None] >> shifts) & jnp.uint32((1 << self.bits) - 1)  # [..., words, per_word]
        groups = q.reshape(*self.shape[:-1], -1, self.group_size).astype(jnp.float32)
        w = groups * self.scales[..., None] + self.biases[..., None]
        return w.reshape(self.shape).astype(dtype or self.dtype)


def view(weights: dict, specs: tuple[PackedSpec, ...], dtype) -> dict:
    """The step's weight arguments with each packed pair replaced by one Packed."""
    w = dict(weights)
    for s in specs:
        words, scales_biases = packed_arguments(s.name)
        w[words] = Packed(w[words], w.pop(scales_biases), s.bits, s.group_size, dtype)
    return w
