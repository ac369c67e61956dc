"""Gather the tensors a compiled model expects, by name, from a checkpoint (numpy only).

Compiled models name their weights as MLX checkpoints do, with two stacked projections:
`self_attn.qkv_proj` is q_proj, k_proj and v_proj and `mlp.gate_up_proj` is gate_proj and
up_proj, concatenated along the output axis here (one matvec on the device instead of three
or two). `self_attn.{q,k}_norm.weight_rope` is the norm weight stacked on a copy with its two
halves swapped, which the fused norm-and-rotary of compile/layers.py rms_norm_rope needs.
HF checkpoints also differ for MoE experts: per-expert tensors
(`mlp.experts.{e}.gate_proj.weight`, transformers 4.x) or fused ones (`mlp.experts.gate_up_proj`
[E, 2I, D] and `mlp.experts.down_proj`, transformers 5.x in memory) where MLX stacks
`mlp.switch_mlp.{gate,up,down}_proj.weight` [E, out, in].
"""

from __future__ import annotations

import re

import numpy as np

SWITCH = re.compile(r"^(?P<p>.+)\.mlp\.switch_mlp\.(?P<proj>gate|up|down)_proj\.weight$")
STACKED = re.compile(r"^(?P<p>.+)\.(?P<fused>qkv_proj|gate_up_proj)\.(?P<kind>weight|bias)$")
STACKED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
NORM_ROPE = re.compile(r"^(?P<norm>.+\.[qk]_norm\.weight)_rope$")


class MissingWeight(ValueError):
    pass


PACKED_PART = re.compile(r"^(?P<base>.+)\.(?P<part>weight|scales_biases)$")


def packed_arguments(name: str) -> tuple[str, str]:
    """The step's two arguments for packed weight `<module>.weight` (compile/packed.py): the
    words under its own name, then `<module>.scales_biases`: each group's scale and bias side
    by side, so a kernel reads both in one load (as the checkpoint stores them, F16 or BF16, or
    widened to f32 where the step takes f32)."""
    base = name.removesuffix(".weight")
    return (name, f"{base}.scales_biases")


def gather_weights(ckpt, names: list[str], dtype, packed: tuple[str, ...] = (),
                   widened: frozenset = frozenset()) -> dict[str, np.ndarray]:
    """{name: array in dtype} for every name; a clear error for one the checkpoint lacks.

    `packed` names weights (".weight") kept as the checkpoint stores them: for each, the step
    takes the packed words (uint32) under its name and ".scales_biases" as stored, or in f32
    for the names in `widened`."""
    parts = {a for n in packed for a in packed_arguments(n)}
    out = {n: packed_tensor(ckpt, n, widen=n in widened) for n in names if n in parts}
    direct = [n for n in names if n in ckpt and n not in parts]
    out |= ckpt.load_all(np.dtype(dtype), names=direct)
    for name in names:
        if name in out:
            continue
        m, norm = STACKED.match(name), NORM_ROPE.match(name)
        if norm:
            w = gather_weights(ckpt, [norm["norm"]], dtype)[norm["norm"]]
            out[name] = np.stack([w, np.roll(w, len(w) // 2)])
        elif m:
            parts = [f"{m['p']}.{part}.{m['kind']}" for part in STACKED_PARTS[m["fused"]]]
            out[name] = np.concatenate([gather_weights(ckpt, [n], dtype)[n] for n in parts])
        else:
            out[name] = _stacked_experts(ckpt, name, dtype)
    return out


def packed_tensor(ckpt, name: str, widen: bool = False) -> np.ndarray:
    """`<module>.weight` or `.scales_biases` of a packed weight as the step takes it
    (compile/packed.py): the words, or [..., out, in / group, 2] (scale, bias) as stored, or
    widened to f32; stacked projections concatenated along the output axis."""
    base, part = PACKED_PART.match(name).group("base", "part")
    m = STACKED.match(base + ".weight")
    sources = [base + ".weight"] if m is None else [f"{m['p']}.{p}.weight" for p in STACKED_PARTS[m["fused"]]]

    def load(source):
        if part == "weight":
            return ckpt.load_packed(source, "weight")
        return np.stack([ckpt.load_packed(source, half, widen) for half in ("scales", "biases")], axis=-1)
    return load(sources[0]) if len(sources) == 1 else np.concatenate([load(s) for s in sources])


PAIR_DTYPES = {"F16": "float16", "BF16": "bfloat16"}  # stored scales/biases -> numpy dtype name


def quant_spec(ckpt, name: str) -> tuple[int, int, str] | None:
    """(bits, group size, scales' dtype: "float16" or "bfloat16") of a logical weight as the
    checkpoint stores it; None if it is not quantized, or is a stacked projection whose parts
    differ."""
    m = STACKED.match(name)
    names = [f"{m['p']}.{p}.{m['kind']}" for p in STACKED_PARTS[m["fused"]]] if m else [name]
    if not all(n in ckpt for n in names):
        return None
    specs = {(s.bits, s.group_size, PAIR_DTYPES.get(ckpt.stored_dtype(n), ckpt.stored_dtype(n)))
             if (s := ckpt.quant_spec(n)) else None for n in names}
    return specs.pop() if len(specs) == 1 else None


def _stacked_experts(ckpt, name: str, dtype) -> np.ndarray:
    m = SWITCH.match(name)
    if m is None:
        raise MissingWeight(f"{ckpt.model_dir}: the checkpoint has no tensor {name!r}, which the model needs")
    p, proj = m["p"], m["proj"]
    per_expert = [f"{p}.mlp.experts.{e}.{proj}_proj.weight" for e in range(_count_experts(ckpt, p))]
    if per_expert and all(n in ckpt for n in per_expert):
        return np.stack([ckpt.load(n, dtype) for n in per_expert])
    fused = f"{p}.mlp.experts.gate_up_proj" if proj in ("gate", "up") else f"{p}.mlp.experts.down_proj"
    if fused in ckpt:
        t = ckpt.load(fused, dtype)
        if proj == "down":
            return t
        half = t.shape[1] // 2  # HF chunks gate_up into (gate, up) along the output dimension
        return np.ascontiguousarray(t[:, :half] if proj == "gate" else t[:, half:])
    raise MissingWeight(f"{ckpt.model_dir}: the checkpoint has no tensor {name!r} nor per-expert "
                        f"{p}.mlp.experts.N.{proj}_proj.weight nor fused {fused}")


def _count_experts(ckpt, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.mlp\.experts\.(\d+)\.")
    found = {int(m[1]) for n in ckpt.names() if (m := pat.match(n))}
    return max(found) + 1 if found else 0
