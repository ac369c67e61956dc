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
# (bench/results/2026-11-26-h100-bench-prefill-chunk-128.json).
DEFAULT_PREFILL_CHUNK = 32
DEFAULT_PREFILL_CHUNK_CUDA = 128
# A CUDA-only bundle also has a prefill step of 512 tokens per call for long prompts (Session
# runs it while more than 256 prompt tokens remain): a 512-token prompt's time to first token
# on an H100 went from 38.0 to 21.4 ms (Qwen3-0.6B packed) and 35.1 to 21.3 (Llama-3.2-1B),
# the same tokens (bench/results/2026-11-27-h100-stop21.txt). A short prompt keeps the short
# chunk: a 512-token call takes what two 128-token calls take.
DEFAULT_LONG_PREFILL_CUDA = 512


# The KV cache's rows: the context plus the padding a prefill chunk writes past it, rounded up
# to a multiple of 32 (the decode attention kernel takes the cache in blocks of up to 32 rows;
# a CUDA bundle with --max-context 300, 428 rows, fell back to IREE's own attention, which
# failed to compile). A short chunk may end up to its length past the context. The long one
# runs only while more than half of it remains, so it ends at most half its length past the
# context; Session._chunks also checks that it ends within the cache. (Qwen3-0.6B at 640
# tokens: 896 rows instead of 1152, 29 MB less.)
CACHE_ROWS_MULTIPLE = 32


def cache_capacity(max_context: int, prefill_chunk: int, prefill_long: int = 0) -> int:
    rows = max_context + max(prefill_chunk, prefill_long // 2)
    return -(-rows // CACHE_ROWS_MULTIPLE) * CACHE_ROWS_MULTIPLE


def _cuda_only(targets) -> bool:
    """Whether a bundle's targets are CUDA alone (the bundle's targets share its prefill steps)."""
    return set(targets) == {"cuda"}


def default_prefill_chunk(targets) -> int:
    """128 for a CUDA-only bundle, else 32."""
    return DEFAULT_PREFILL_CHUNK_CUDA if _cuda_only(targets) else DEFAULT_PREFILL_CHUNK


def default_long_prefill(targets, weight_dtype: str | None = None) -> int:
    """512 for a CUDA-only bundle with f16 weights, else 0 (no long prefill step). With f32
    weights IREE 3.13 fails to compile it for every test family, in its own attention at 512
    tokens a call (the prefill attention kernel takes f16 caches only)."""
    f16 = weight_dtype_for("cuda", weight_dtype) == "float16"
    return DEFAULT_LONG_PREFILL_CUDA if _cuda_only(targets) and f16 else 0


def _long_prefill(targets, prefill_chunk: int, prefill_long: int | None, max_context: int,
                  weight_dtype: str | None = None) -> int:
    """The long prefill chunk to build (0: none): the default for the targets and weight dtype
    when None, dropped where it would never run (no longer than the short chunk, or a context
    too short for more than half of it); one no longer than the short chunk is an error when
    asked for."""
    if prefill_long is None:
        long = default_long_prefill(targets, weight_dtype)
        return long if long > prefill_chunk and max_context > long // 2 else 0
    if prefill_long < 0 or 0 < prefill_long <= prefill_chunk:
        raise ValueError(f"long prefill chunk {prefill_long}: 0 (none) or more than the prefill chunk ({prefill_chunk})")
    return prefill_long


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
              kernels: bool = True, packed_weights: tuple = (), prefill_long: int = 0) -> str:
    import jax

    parts = {
        "config": graph_config(raw_config), "export": _export_code_digest(), "format": FORMAT,
        "iree": iree_compile.compiler_version(), "jax": jax.__version__, "target": target,
        "flags": iree_compile.step_flags(target), "weight_dtype": weight_dtype,
        "cache_dtype": weight_dtype,
        "max_context": max_context, "prefill_chunk": prefill_chunk, "prefill_long": prefill_long,
        "host": iree_compile.host_cpu() if target == "cpu" else None,
        "kernels": iree_compile.export_options(target, kernels)["decode_kernel"],
        "packed": [[p.name, p.bits, p.group_size, p.pairs] for p in packed_weights],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def build_target(model_dir: Path, target: str, *, max_context: int = DEFAULT_MAX_CONTEXT,
                 prefill_chunk: int | None = None, weight_dtype: str | None = None, kernels: bool = True,
                 packed: bool | None = None, prefill_long: int | None = None) -> Path:
    """A one-target bundle in the artifact cache for this model; compiled only if needed.

    weight_dtype "f16" or "f32" overrides the target's default (f32 on CPU, f16 on CUDA);
    prefill_chunk defaults to default_prefill_chunk([target]), prefill_long (a second prefill
    step of that many tokens per call, 0 for none) to default_long_prefill([target], weight_dtype); kernels=False compiles the
    one-token step without the hand-written kernels (compile/extern.py); packed=True keeps the
    checkpoint's 4- and 8-bit linear weights packed on the device (compile/packed.py), False
    none, None the target's default (iree_compile.PACKED_BITS_DEFAULT).

    A default long prefill step that IREE fails to compile is left out, with a warning (the
    bundle then runs prompts in prefill_chunk calls; f32 weights get none by default, as
    default_long_prefill says why). The retry compiles the other steps again (their cache rows
    change). One asked for fails the build."""
    args = dict(max_context=max_context, prefill_chunk=prefill_chunk, weight_dtype=weight_dtype, kernels=kernels,
                packed=packed)
    try:
        return _build_target(model_dir, target, prefill_long=prefill_long, **args)
    except iree_compile.CompileError as e:
        if prefill_long is not None or e.label != "prefill_long":
            raise
        print(f"warning: the long prefill step ({default_long_prefill([target], weight_dtype)} tokens a call) did not "
              f"compile for {model_dir} ({target}); building without it (--long-prefill-chunk 0). "
              f"{_first_error(str(e))}", file=sys.stderr)
        return _build_target(model_dir, target, prefill_long=0, **args)


def _first_error(message: str) -> str:
    """The compiler's first `error:` line of a CompileError's message (its first line if none)."""
    lines = message.splitlines()
    return next((line.strip() for line in lines if "error:" in line), lines[0] if lines else "")


def _build_target(model_dir: Path, target: str, *, max_context: int, prefill_chunk: int | None,
                  weight_dtype: str | None, kernels: bool, packed: bool | None, prefill_long: int | None) -> Path:
    cc = read_config(model_dir)
    fam = family.family_module(cc.model_type)
    iree_compile.flags_for(target)  # an unknown target fails here, with the known ones
    prefill_chunk = prefill_chunk or default_prefill_chunk([target])
    prefill_long = _long_prefill([target], prefill_chunk, prefill_long, max_context, weight_dtype)
    wdt = weight_dtype_for(target, weight_dtype)
    cfg = fam.Config.from_checkpoint(cc)
    packed_weights = packed_weights_for(model_dir, fam.weight_shapes(cfg), target, packed)
    key = build_key(cc.raw, target, max_context, prefill_chunk, wdt, kernels, packed_weights, prefill_long)
    entry = cache_dir() / key
    if (entry / MANIFEST).exists():
        try:
            check_compatible(read_manifest(entry), entry, cc.raw, target)
            return entry
        except BundleError as e:
            print(f"rebuilding cached artifact: {e}", file=sys.stderr)
            shutil.rmtree(entry, ignore_errors=True)

    spec = export.step_spec(fam, cfg, capacity=cache_capacity(max_context, prefill_chunk, prefill_long),
                            weight_dtype=wdt, cache_dtype=wdt, context=max_context,
                            packed_weights=packed_weights, cache_layout=iree_compile.CACHE_LAYOUT[target])
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
    try:
        (tmp / target).mkdir()
        files, sums = {}, {}
        options = iree_compile.export_options(target, kernels)
        steps = {"prefill": prefill_chunk, "decode": 1} | ({"prefill_long": prefill_long} if prefill_long else {})
        for step, tokens in steps.items():
            print(f"exporting {step} ({cc.model_type}, {tokens} token(s) per call)", file=sys.stderr)
            mlir = export.export_step(fam, cfg, spec, tokens, module_name=step, **options)
            rel = f"{target}/{step}.vmfb"
            iree_compile.compile_mlir(mlir, tmp / rel, target, label=step, flags=iree_compile.step_flags(target))
            files[step], sums[rel] = rel, file_digest(tmp / rel)
        build = TargetBuild(target, key, iree_compile.step_flags(target), files, sums, spec.weight_names,
                            spec.weight_shapes, spec.weight_dtype, spec.cache_shape, spec.cache_dtype,
                            tuple(p.name for p in spec.packed), spec.weight_dtypes,
                            export.samples_on_device(options["decode_kernel"], int(cfg.vocab_size)), spec.capacity)
        _manifest(cc, fam, cfg, max_context, prefill_chunk, {target: build}, prefill_long).write(tmp)
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


def _manifest(cc, fam, cfg, max_context, prefill_chunk, targets, prefill_long: int = 0) -> Manifest:
    return Manifest(cc.model_type, graph_config(cc.raw), config_digest(cc.raw),
                    iree_compile.compiler_version(), max_context, prefill_chunk,
                    int(cfg.vocab_size), targets, prefill_long)


def compile_bundle(model_dir: Path, targets: list[str], out: Path, *, max_context: int = DEFAULT_MAX_CONTEXT,
                   prefill_chunk: int | None = None, weight_dtype: str | None = None,
                   kernels: bool = True, packed: bool | None = None, prefill_long: int | None = None) -> Manifest:
    """Build every target (through the cache) and gather them into one bundle at `out`.
    prefill_chunk: default_prefill_chunk(targets) when None, prefill_long default_long_prefill(targets,
    weight_dtype); kernels and packed as build_target."""
    prefill_chunk = prefill_chunk or default_prefill_chunk(targets)
    # One target resolves its own default (build_target: a long step that fails to compile is
    # then left out); several share the value resolved for all of them.
    own_default = prefill_long is None and len(targets) == 1
    prefill_long = _long_prefill(targets, prefill_chunk, prefill_long, max_context, weight_dtype)
    cc = read_config(model_dir)
    fam = family.family_module(cc.model_type)
    builds = {}
    out.mkdir(parents=True, exist_ok=True)
    for target in targets:
        entry = build_target(model_dir, target, max_context=max_context, prefill_chunk=prefill_chunk,
                             weight_dtype=weight_dtype, kernels=kernels, packed=packed,
                             prefill_long=None if own_default else prefill_long)
        built = read_manifest(entry)
        prefill_long = built.prefill_long  # 0 where a default long step was left out
        build = built.targets[target]
        shutil.rmtree(out / target, ignore_errors=True)
        shutil.copytree(entry / target, out / target)
        builds[target] = build
    manifest = _manifest(cc, fam, fam.Config.from_checkpoint(cc), max_context, prefill_chunk, builds, prefill_long)
    manifest.write(out)
    return manifest
