"""Compiled bundles: a folder of .vmfb files plus manifest.json that says what they were built for.

The runtime reads a bundle without jax or the compiler. A bundle is refused, with the reason,
when it was compiled for another target, another IREE version or another model config.

Layout:
  BUNDLE/manifest.json
  BUNDLE/<target>/prefill.vmfb, BUNDLE/<target>/decode.vmfb
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

# 2: each step returns once its work is queued (IREE's async-external model) and takes the
# storage for its results and transients from the caller (compile/export.py CALLER_STORAGE).
# 3: packed weights take scales_biases (compile/packed.py), not scales and biases.
# 4: the steps take the sampling settings and return [token, status] (compile/export.py).
# 5: on CUDA, packed weights' scales_biases as the checkpoint stores them (F16 or BF16), not f32.
# 6: the steps take and return the sequence's token history (the repetition penalty on the device).
FORMAT = 6
MANIFEST = "manifest.json"
# config.json keys that do not change the compiled graph: dtype and quantization only change
# how the host prepares weights (the graph gets dequantized weights, or with --packed the
# packed ones, whose bits and group size the argument shapes and the build key cover), the
# rest is metadata.
NON_GRAPH_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "_name_or_path", "architectures",
    "quantization", "quantization_config", "bos_token_id", "eos_token_id", "pad_token_id",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
})


class BundleError(ValueError):
    pass


def graph_config(raw: dict) -> dict:
    """The part of config.json that the compiled graph depends on."""
    return {k: raw[k] for k in sorted(raw) if k not in NON_GRAPH_KEYS}


def config_digest(raw: dict) -> str:
    return hashlib.sha256(json.dumps(graph_config(raw), sort_keys=True).encode()).hexdigest()[:16]


def runtime_version() -> str:
    return importlib.metadata.version("iree-base-runtime")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TargetBuild:
    """One target's compiled step functions and the signature they expect."""

    target: str
    key: str
    flags: tuple[str, ...]
    files: dict  # {"prefill": relpath, "decode": relpath} and "prefill_long" where the bundle has one
    sha256: dict  # {relpath: digest}
    weight_names: tuple[str, ...]
    weight_shapes: tuple[tuple[int, ...], ...]
    weight_dtype: str
    cache_shape: tuple[int, ...]
    cache_dtype: str
    packed: tuple[str, ...] = ()  # weights kept packed (compile/packed.py): three arguments each
    weight_dtypes: tuple[str, ...] = ()  # per argument; empty = all weight_dtype
    device_sampling: bool = False  # the steps draw sampled tokens themselves (compile/export.py next_token)
    capacity: int = 0  # positions the cache holds: the length of the steps' token history

    def dtypes(self) -> tuple[str, ...]:
        return self.weight_dtypes or (self.weight_dtype,) * len(self.weight_names)

    def to_json(self) -> dict:
        return {"key": self.key, "flags": list(self.flags), "files": self.files, "sha256": self.sha256,
                "weights": [[n, list(s), d] for n, s, d in zip(self.weight_names, self.weight_shapes, self.dtypes())],
                "weight_dtype": self.weight_dtype, "packed": list(self.packed),
                "cache_shape": list(self.cache_shape), "cache_dtype": self.cache_dtype,
                "device_sampling": self.device_sampling, "capacity": self.capacity}

    @classmethod
    def from_json(cls, target: str, d: dict) -> "TargetBuild":
        w = d["weights"]
        return cls(target, d["key"], tuple(d["flags"]), dict(d["files"]), dict(d["sha256"]),
                   tuple(e[0] for e in w), tuple(tuple(e[1]) for e in w), d["weight_dtype"],
                   tuple(d["cache_shape"]), d["cache_dtype"], tuple(d.get("packed", ())),
                   tuple(e[2] if len(e) > 2 else d["weight_dtype"] for e in w), bool(d.get("device_sampling", False)),
                   int(d["capacity"]))


@dataclass(frozen=True)
class Manifest:
    model_type: str
    config: dict  # graph_config(config.json) of the model it was compiled for
    config_digest: str
    compiler_version: str
    max_context: int  # longest prompt + generation the cache holds
    prefill_chunk: int
    vocab_size: int
    targets: dict  # target -> TargetBuild
    # Tokens per call of a second prefill step for long prompts ("prefill_long" in each target's
    # files), 0 for none. Optional in the manifest: a bundle without it runs its one chunk size.
    prefill_long: int = 0

    @property
    def session_options(self) -> dict:
        """What a Session of this bundle takes from the manifest: Session(dir, build, weights, **these)."""
        return {"max_context": self.max_context, "prefill_chunk": self.prefill_chunk, "prefill_long": self.prefill_long}

    def to_json(self) -> dict:
        return {"format": FORMAT, "model_type": self.model_type, "config": self.config,
                "config_digest": self.config_digest, "compiler_version": self.compiler_version,
                "max_context": self.max_context, "prefill_chunk": self.prefill_chunk,
                "vocab_size": self.vocab_size, "prefill_long": self.prefill_long,
                "targets": {t: b.to_json() for t, b in self.targets.items()}}

    def write(self, bundle_dir: Path) -> None:
        tmp = bundle_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(bundle_dir / MANIFEST)


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no manifest; is {bundle_dir} a bundle made by `iree-generate compile`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if d.get("format") != FORMAT:
        raise BundleError(f"{path}: bundle format {d.get('format')!r}, this runtime reads format {FORMAT} "
                          "(compile the bundle again with this version's `iree-generate compile`)")
    try:
        return Manifest(d["model_type"], d["config"], d["config_digest"], d["compiler_version"],
                        d["max_context"], d["prefill_chunk"], d["vocab_size"],
                        {t: TargetBuild.from_json(t, b) for t, b in d["targets"].items()},
                        int(d.get("prefill_long", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None


def check_compatible(manifest: Manifest, bundle_dir: Path, model_raw_config: dict, target: str,
                     *, verify_files: bool = True) -> TargetBuild:
    """The target build to run, or BundleError saying why this bundle can't run this model here."""
    where = Path(bundle_dir) / MANIFEST
    if target not in manifest.targets:
        raise BundleError(f"{where}: compiled for target(s) {', '.join(sorted(manifest.targets))}, "
                          f"not {target!r}; recompile with --target {target}")
    rv = runtime_version()
    if manifest.compiler_version != rv:
        raise BundleError(f"{where}: compiled by IREE {manifest.compiler_version}, but this runtime "
                          f"is iree-base-runtime {rv}; recompile with the matching compiler")
    if model_raw_config.get("model_type") != manifest.model_type:
        raise BundleError(f"{where}: compiled for model_type {manifest.model_type!r}, the model is "
                          f"{model_raw_config.get('model_type')!r}")
    ours = graph_config(model_raw_config)
    if config_digest(model_raw_config) != manifest.config_digest:
        diff = sorted(k for k in set(ours) | set(manifest.config) if ours.get(k) != manifest.config.get(k))
        shown = ", ".join(f"{k}: bundle {manifest.config.get(k)!r} vs model {ours.get(k)!r}" for k in diff[:5])
        raise BundleError(f"{where}: compiled for another model config ({shown})")
    build = manifest.targets[target]
    if verify_files:
        for rel, digest in build.sha256.items():
            f = Path(bundle_dir) / rel
            if not f.is_file():
                raise BundleError(f"{f}: missing from the bundle")
            if file_digest(f) != digest:
                raise BundleError(f"{f}: corrupt (sha256 differs from the manifest)")
    return build
