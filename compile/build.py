"""The ahead-of-time step: model dir -> bundle of .vmfb files, through a keyed artifact cache.

A cache entry is a one-target bundle under <cache>/<key>/, where the key covers everything the
compiled code depends on: the model's graph config, the export code, the jax and IREE
versions, the target and its flags, dtypes and sizes. A changed key recompiles; an entry whose
files fail their checksum is rebuilt, not crashed on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ..bundle import (FORMAT, MANIFEST, BundleError, Manifest, TargetBuild, check_compatible, config_digest,
                      file_digest, graph_config, read_manifest)
from ..weights.config import read_config
from . import export, family, iree_compile
from .iree_compile import cache_dir
from .packed import stored_pairs

DEFAULT_MAX_CONTEXT = 512
# Prompt tokens per prefill call, one value per bundle. On the CPU a short prompt pays for the
# whole chunk, so it stays small. On CUDA each call costs ~4 us per dispatch whatever its size
# (bench/dispatch_cost.py), and 128 gave 12-40% more prefill tok/s than 64 on an H100
# (bench/results/2026-11-26-h100-bench-prefill-chunk-128.json); 256 did not compile.
DEFAULT_PREFILL_CHUNK = 32
DEFAULT_PREFILL_CHUNK_CUDA = 128
STEPS = ("prefill", "decode")


def default_prefill_chunk(targets) -> int:
    """128 for a CUDA-only bundle, else 32 (the bundle's targets share one chunk)."""
    return DEFAULT_PREFILL_CHUNK_CUDA if set(targets) == {"cuda"} else DEFAULT_PREFILL_CHUNK


def _export_code_digest() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for f in sorted([*here.glob("*.py"), *here.glob("kernels/*.ptx"), *here.glob("kernels/*.c")]):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


WEIGHT_DTYPES = {"f16": "float16", "f32": "float32"}


def weight_dtype_for(target: str, weight_dtype: str | None) -> str:
    """The weights' dtype on the device: the target's default, or "f16"/"f32" as asked."""
    if weight_dtype is None:
        return iree_compile.WEIGHT_DTYPE[target]
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype {weight_dtype!r} is not supported (expected one of: {', '.join(WEIGHT_DTYPES)})")
    return WEIGHT_DTYPES[weight_dtype]


def build_key(raw_config: dict, target: str, max_context: int, prefill_chunk: int, weight_dtype: str,
              kernels: bool = True, packed_weights: tuple = ()) -> str:
    import jax

    parts = {
        "config": graph_config(raw_config), "export": _export_code_digest(), "format": FORMAT,
        "iree": iree_compile.compiler_version(), "jax": jax.__version__, "target": target,
        "flags": iree_compile.step_flags(target), "weight_dtype": weight_dtype,
        "cache_dtype": weight_dtype,
        "max_context": max_context, "prefill_chunk": prefill_chunk,
        "host": iree_compile.host_cpu() if target == "cpu" else None,
        "kernels": iree_compile.export_options(target, kernels)["decode_kernel"],
        "packed": [[p.name, p.bits, p.group_size, p.pairs] for p in packed_weights],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def build_target(model_dir: Path, target: str, *, max_context: int = DEFAULT_MAX_CONTEXT,
                 prefill_chunk: int | None = None, weight_dtype: str | None = None, kernels: bool = True,
                 packed: bool | None = None) -> Path:
    """A one-target bundle in the artifact cache for this model; compiled only if needed.

    weight_dtype "f16" or "f32" overrides the target's default (f32 on CPU, f16 on CUDA);
    prefill_chunk defaults to default_prefill_chunk([target]); kernels=False compiles the
    one-token step without the hand-written kernels (compile/extern.py); packed=True keeps the
    checkpoint's 4- and 8-bit linear weights packed on the device (compile/packed.py), False
    none, None the target's default (iree_compile.PACKED_BITS_DEFAULT)."""
    cc = read_config(model_dir)
    fam = family.family_module(cc.model_type)
    iree_compile.flags_for(target)  # an unknown target fails here, with the known ones
    prefill_chunk = prefill_chunk or default_prefill_chunk([target])
    wdt = weight_dtype_for(target, weight_dtype)
    cfg = fam.Config.from_checkpoint(cc)
    packed_weights = packed_weights_for(model_dir, fam.weight_shapes(cfg), target, packed)
    key = build_key(cc.raw, target, max_context, prefill_chunk, wdt, kernels, packed_weights)
    entry = cache_dir() / key
    if (entry / MANIFEST).exists():
        try:
            check_compatible(read_manifest(entry), entry, cc.raw, target)
            return entry
        except BundleError as e:
            print(f"rebuilding cached artifact: {e}", file=sys.stderr)
            shutil.rmtree(entry, ignore_errors=True)

    spec = export.step_spec(fam, cfg, capacity=max_context + prefill_chunk, weight_dtype=wdt, cache_dtype=wdt,
                            packed_weights=packed_weights, cache_layout=iree_compile.CACHE_LAYOUT[target])
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
    try:
        (tmp / target).mkdir()
        files, sums = {}, {}
        options = iree_compile.export_options(target, kernels)
        for step, tokens in zip(STEPS, (prefill_chunk, 1)):
            print(f"exporting {step} ({cc.model_type}, {tokens} token(s) per call)", file=sys.stderr)
            mlir = export.export_step(fam, cfg, spec, tokens, module_name=step, **options)
            rel = f"{target}/{step}.vmfb"
            iree_compile.compile_mlir(mlir, tmp / rel, target, label=step, flags=iree_compile.step_flags(target))
            files[step], sums[rel] = rel, file_digest(tmp / rel)
        build = TargetBuild(target, key, iree_compile.step_flags(target), files, sums, spec.weight_names,
                            spec.weight_shapes, spec.weight_dtype, spec.cache_shape, spec.cache_dtype,
                            tuple(p.name for p in spec.packed), spec.weight_dtypes,
                            export.samples_on_device(options["decode_kernel"], int(cfg.vocab_size)), spec.capacity)
        _manifest(cc, fam, cfg, max_context, prefill_chunk, {target: build}).write(tmp)
        try:
            tmp.replace(entry)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def packed_weights_of(model_dir: Path, shapes: dict, bits: tuple[int, ...] | None = None) -> tuple:
    """The weights to keep packed (quantized with one of `bits`, default all that can be), as
    the checkpoint in model_dir stores them."""
    from ..resident import quant_spec
    from ..weights import open_checkpoint
    from .packed import PACKED_BITS, choose

    with open_checkpoint(model_dir) as ckpt:
        return choose(shapes, lambda name: quant_spec(ckpt, name), PACKED_BITS if bits is None else bits)


def packed_weights_for(model_dir: Path, shapes: dict, target: str, packed: bool | None = True) -> tuple:
    """The weights kept packed for a target: packed None is the target's default, True all that
    can be, False none; with their scale/bias pairs as the target's kernels read them."""
    if packed is None:  # the target's default; a config without weights (compiling ahead of them) packs none
        bits = iree_compile.PACKED_BITS_DEFAULT[target]
        has_weights = any(Path(model_dir).glob("*.safetensors"))
        specs = packed_weights_of(model_dir, shapes, bits) if bits and has_weights else ()
    else:
        specs = packed_weights_of(model_dir, shapes) if packed else ()
    # The kernels read the pairs as stored (half the bytes of f32 on the device).
    return stored_pairs(specs)


def _manifest(cc, fam, cfg, max_context, prefill_chunk, targets) -> Manifest:
    return Manifest(cc.model_type, graph_config(cc.raw), config_digest(cc.raw),
                    iree_compile.compiler_version(), max_context, prefill_chunk,
                    int(cfg.vocab_size), targets)


def compile_bundle(model_dir: Path, targets: list[str], out: Path, *, max_context: int = DEFAULT_MAX_CONTEXT,
                   prefill_chunk: int | None = None, weight_dtype: str | None = None,
                   kernels: bool = True, packed: bool | None = None) -> Manifest:
    """Build every target (through the cache) and gather them into one bundle at `out`.
    prefill_chunk: default_prefill_chunk(targets) when None; kernels and packed as build_target."""
    prefill_chunk = prefill_chunk or default_prefill_chunk(targets)
    cc = read_config(model_dir)
    fam = family.family_module(cc.model_type)
    builds = {}
    out.mkdir(parents=True, exist_ok=True)
    for target in targets:
        entry = build_target(model_dir, target, max_context=max_context, prefill_chunk=prefill_chunk,
                             weight_dtype=weight_dtype, kernels=kernels, packed=packed)
        build = read_manifest(entry).targets[target]
        shutil.rmtree(out / target, ignore_errors=True)
        shutil.copytree(entry / target, out / target)
        builds[target] = build
    manifest = _manifest(cc, fam, fam.Config.from_checkpoint(cc), max_context, prefill_chunk, builds)
    manifest.write(out)
    return manifest
