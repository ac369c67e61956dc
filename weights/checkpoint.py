"""open_checkpoint: a model directory -> logical tensors, validated from headers, loaded lazily.

A model directory holds config.json and either one `model.safetensors`, or shards listed in
`model.safetensors.index.json`, or (as mlx_lm globs them) several `model*.safetensors`.
An MLX-quantized weight `x.weight` (U32) with `x.scales` and `x.biases` is one logical tensor
named `x.weight` whose shape is the dequantized one.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import CheckpointConfig, QuantSpec, read_config
from .dequant import AffineRows, check_affine_layout
from .errors import CheckpointError
from .safetensors_file import MappedFile, TensorInfo

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Rows handed to one thread at a time in load_all: big enough to amortize Python overhead.
TASK_ELEMENTS = 1 << 20
# Outputs at least this big get plain 4 KiB pages (see _empty).
MMAP_OUTPUT_BYTES = 4 << 20


def _empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized output array.

    Large ones come from an anonymous mmap rather than numpy's allocator, which advises huge
    pages (MADV_HUGEPAGE); with the kernel's default THP defrag=madvise, first touch of such
    memory may stall on compaction. MAP_POPULATE then maps all pages in one call instead of
    one fault per page. Measured on the 2-core dev VM for 1.2 GB: 0.7-2.0 s of system time
    with numpy's allocator, 0.6 s faulting 4 KiB pages one by one, 0.4 s populated.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MMAP_OUTPUT_BYTES:
        return np.empty(shape, dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=dtype).reshape(shape)  # owns the mapping


@dataclass(frozen=True)
class QuantizedWeight:
    """The three stored tensors behind one logical quantized weight."""

    weight: TensorInfo  # U32 [..., out, in*bits/32]
    scales: TensorInfo  # F16 or BF16 [..., out, in/group_size]
    biases: TensorInfo
    spec: QuantSpec
    shape: tuple[int, ...]  # logical [..., out, in]


class Checkpoint:
    """Logical tensors of one model directory; see open_checkpoint."""

    def __init__(self, model_dir: str, config: CheckpointConfig, files: list[MappedFile],
                 plain: dict[str, TensorInfo], quantized: dict[str, QuantizedWeight]):
        self.model_dir = model_dir
        self.config = config
        self._files = {f.path: f for f in files}
        self._plain = plain
        self._quantized = quantized
        self._names = sorted([*plain, *quantized])

    # --- metadata, from headers only -------------------------------------------------------
    def names(self) -> list[str]:
        """Logical tensor names: a quantized "x.weight" once (no .scales/.biases), others as stored."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._plain or name in self._quantized

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical (dequantized) shape."""
        if name in self._quantized:
            return self._quantized[name].shape
        return self._info(name).shape

    def is_quantized(self, name: str) -> bool:
        self._info_any(name)
        return name in self._quantized

    def quant_spec(self, name: str) -> QuantSpec | None:
        self._info_any(name)
        q = self._quantized.get(name)
        return q.spec if q else None

    def stored_dtype(self, name: str) -> str:
        """safetensors dtype tag as stored ("BF16", ...); for a quantized weight, its scales'."""
        if name in self._quantized:
            return self._quantized[name].scales.dtype
        return self._info(name).dtype

    def stored_files(self, name: str) -> tuple[str, ...]:
        """Files holding the stored tensors: (weight, scales, biases) if quantized, else (file,)."""
        if name in self._quantized:
            q = self._quantized[name]
            return (q.weight.file, q.scales.file, q.biases.file)
        return (self._info(name).file,)

    # --- data ------------------------------------------------------------------------------
    def load(self, name: str, dtype=np.float32) -> np.ndarray:
        """One tensor, dequantized/converted to `dtype`, as a fresh array (not a view of the file)."""
        out = _empty(self.shape(name), dtype)
        fill = self._filler(name, out)
        fill(0, fill.num_rows)
        return out

    def load_packed(self, name: str, part: str = "weight", widen: bool = True) -> np.ndarray:
        """One stored tensor of quantized weight `name`, for kernels that dequantize it
        themselves: part "weight" (the packed words, uint32 [..., out, in*bits/32]), or "scales"
        or "biases" widened to f32 (exact), or with widen=False as stored (F16 or BF16)."""
        q = self._quantized.get(name)
        if q is None:
            self._info(name)  # an unknown name fails with the usual message
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is not quantized; it has no packed form")
        if part == "weight":
            return np.array(self._array(q.weight), dtype=np.uint32)
        if part not in ("scales", "biases"):
            raise ValueError(f"part {part!r}: weight, scales or biases")
        a = self._array(getattr(q, part))
        return a.astype(np.float32) if widen else np.array(a)

    def load_all(self, dtype=np.float32, names=None, max_workers: int | None = None) -> dict[str, np.ndarray]:
        """Many tensors at once (all by default), row ranges spread over a thread pool."""
        names = self.names() if names is None else list(names)
        for name in names:
            self._info_any(name)  # unknown names fail before any work
        workers = max_workers or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # Allocating (populating pages) is itself worth spreading over the threads.
            arrays = list(pool.map(lambda name: _empty(self.shape(name), dtype), names))
            tasks = []
            for name, out in zip(names, arrays):
                fill = self._filler(name, out)
                step = max(1, TASK_ELEMENTS // max(1, fill.row_elements))
                tasks += [(fill, lo, min(lo + step, fill.num_rows)) for lo in range(0, fill.num_rows, step)]
            # list() re-raises the first failure.
            list(pool.map(lambda task: task[0](task[1], task[2]), tasks))
        return dict(zip(names, arrays))

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpoint({self.model_dir!r}, {len(self._names)} tensors, "
                f"{len(self._quantized)} quantized, files={len(self._files)})")

    # --- internals -------------------------------------------------------------------------
    def _info_any(self, name: str):
        if name in self._quantized:
            return self._quantized[name]
        return self._info(name)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._plain[name]
        except KeyError:
            raise KeyError(f"{self.model_dir}: no tensor {name!r} in this checkpoint") from None

    def _array(self, info: TensorInfo) -> np.ndarray:
        return self._files[info.file].array(info.name)

    def _filler(self, name: str, out: np.ndarray):
        if name in self._quantized:
            q = self._quantized[name]
            rows = AffineRows(self._array(q.weight), self._array(q.scales), self._array(q.biases),
                              q.spec.bits, q.spec.group_size, out)
            return _RowFiller(rows.run, rows.num_rows, rows.in_dim)
        return _copy_filler(self._array(self._info(name)), out)


@dataclass(frozen=True)
class _RowFiller:
    """Fills rows [lo, hi) of one output; row ranges are independent, so threads may share it."""

    fill_rows: Callable[[int, int], None]
    num_rows: int
    row_elements: int

    def __call__(self, lo: int, hi: int) -> None:
        self.fill_rows(lo, hi)


def _copy_filler(src: np.ndarray, out: np.ndarray) -> _RowFiller:
    if src.size == 0:
        return _RowFiller(lambda lo, hi: None, 0, 0)
    # Scalars and vectors are one row; otherwise rows of the last dimension.
    src2 = src.reshape(1, -1) if src.ndim < 2 else src.reshape(-1, src.shape[-1])
    out2 = out.reshape(src2.shape)

    def copy_rows(lo, hi):
        np.copyto(out2[lo:hi], src2[lo:hi], casting="unsafe")

    return _RowFiller(copy_rows, src2.shape[0], src2.shape[1])


# --- opening and validation ------------------------------------------------------------------
def open_checkpoint(model_dir: str | os.PathLike) -> Checkpoint:
    """Open a model directory, validating config, index, headers and quantization layout.

    Everything that can be checked without reading tensor data is checked here; raises
    CheckpointError naming the file and tensor at fault.
    """
    model_dir = os.fspath(model_dir)
    config = read_config(model_dir)
    paths, index = _safetensors_paths(model_dir)
    files = [MappedFile(p) for p in paths]
    stored = _merge_headers(files)
    if index is not None:
        _check_index(model_dir, index, stored)
    plain, quantized = _group_quantized(config, stored)
    return Checkpoint(model_dir, config, files, plain, quantized)


def _safetensors_paths(model_dir: str) -> tuple[list[str], dict[str, str] | None]:
    """Shard paths, and the index's weight_map if there is an index."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        weight_map = _read_index(index_path)
        paths = []
        for shard in dict.fromkeys(weight_map.values()):
            path = os.path.join(model_dir, shard)
            if not os.path.isfile(path):
                first = next(n for n, s in weight_map.items() if s == shard)
                raise CheckpointError(
                    f"{index_path}: shard {shard!r} (holding tensor {first!r} and others) is listed "
                    f"in the index but {path} does not exist"
                )
            paths.append(path)
        return paths, weight_map
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    paths = sorted(glob.glob(os.path.join(glob.escape(model_dir), "model*.safetensors")))
    if not paths:
        raise CheckpointError(
            f"{model_dir}: no {SINGLE_FILE}, {INDEX_FILE} or model*.safetensors found in the model directory"
        )
    return paths, None


def _read_index(index_path: str) -> dict[str, str]:
    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(
                    f"{index_path}: tensor {key!r} is listed twice in the index "
                    f"(shards {seen[key]!r} and {value!r})"
                )
            seen[key] = value
        return seen

    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read(), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: index is not valid JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: expected a 'weight_map' object mapping tensor names to shard files")
    return weight_map


def _merge_headers(files: list[MappedFile]) -> dict[str, TensorInfo]:
    stored: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in f.tensors.items():
            if name in stored:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice: in {stored[name].file} and in {info.file}"
                )
            stored[name] = info
    return stored


def _check_index(model_dir: str, weight_map: dict[str, str], stored: dict[str, TensorInfo]) -> None:
    index_path = os.path.join(model_dir, INDEX_FILE)
    for name, shard in weight_map.items():
        expected = os.path.join(model_dir, shard)
        if name not in stored:
            raise CheckpointError(f"{index_path}: tensor {name!r} is listed in the index for {shard!r} but {expected} does not hold it")
        if os.path.abspath(stored[name].file) != os.path.abspath(expected):
            raise CheckpointError(
                f"{index_path}: tensor {name!r} is listed for {shard!r} but is stored in {stored[name].file}"
            )
    for name, info in stored.items():
        if name not in weight_map:
            raise CheckpointError(f"{info.file}: tensor {name!r} is not listed in {index_path}")


def _group_quantized(config: CheckpointConfig, stored: dict[str, TensorInfo]):
    """Split stored tensors into plain ones and quantized (weight, scales, biases) triples."""
    quant = config.quantization
    quantized: dict[str, QuantizedWeight] = {}
    parts: set[str] = set()
    for name, scales in stored.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        weight_name = f"{module}.weight"
        where = f"{scales.file}: tensor {name!r}"
        weight = stored.get(weight_name)
        if weight is None:
            raise CheckpointError(f"{where}: scales without a packed weight; expected {weight_name!r} (U32) next to it")
        where = f"{weight.file}: quantized tensor {weight_name!r}"
        if quant is None:
            raise CheckpointError(
                f"{where}: stored packed with {name!r}, but {config.path} has no 'quantization' "
                "(or 'quantization_config') to say its bits and group size"
            )
        spec = quant.for_module(module)
        if spec is None:
            raise CheckpointError(
                f"{where}: {config.path} lists module {module!r} as unquantized (false) but the checkpoint "
                f"holds {name!r} for it"
            )
        spec.check_supported(where)
        biases = stored.get(f"{module}.biases")
        if biases is None:
            raise CheckpointError(f"{where}: has {name!r} but no {module + '.biases'!r}; affine quantization needs both")
        other_files = {scales.file, biases.file} - {weight.file}
        if other_files:
            where += f" (scales/biases in {', '.join(sorted(other_files))})"
        shape = check_affine_layout(
            where,
            packed=(weight.shape, weight.dtype),
            scales=(scales.shape, scales.dtype),
            biases=(biases.shape, biases.dtype),
            bits=spec.bits,
            group_size=spec.group_size,
        )
        quantized[weight_name] = QuantizedWeight(weight, scales, biases, spec, shape)
        parts.update((name, biases.name))

    leftovers = {n: i for n, i in stored.items() if n not in quantized and n not in parts}
    for name, info in leftovers.items():
        if info.dtype == "U32" and name.endswith(".weight"):
            _reject_lone_packed(config, stored, name, info)
    for name, info in leftovers.items():
        if name.endswith(".biases"):
            module = name[: -len(".biases")]
            raise CheckpointError(
                f"{info.file}: tensor {name!r} is quantization biases without {module + '.scales'!r} "
                f"(and no packed {module + '.weight'!r}); expected all three or none"
            )

    plain: dict[str, TensorInfo] = {}
    for name, info in leftovers.items():
        if quant is not None and name.endswith(".weight"):
            module = name[: -len(".weight")]
            spec = quant.for_module(module)
            if quant.is_listed(module) and spec is not None:
                raise CheckpointError(
                    f"{info.file}: tensor {name!r} is stored as {info.dtype} {list(info.shape)}, but "
                    f"{config.path} lists module {module!r} as quantized ({spec.bits} bits, group size "
                    f"{spec.group_size}); expected a U32 weight with .scales and .biases"
                )
        plain[name] = info
    return plain, quantized


def _reject_lone_packed(config: CheckpointConfig, stored: dict, name: str, info: TensorInfo) -> None:
    module = name[: -len(".weight")]
    if config.quantization is None:
        raise CheckpointError(
            f"{info.file}: tensor {name!r} is a packed U32 weight {list(info.shape)}, but {config.path} "
            "has no 'quantization' config; expected float weights or an MLX quantization config"
        )
    missing = [f"{module}.{part}" for part in ("scales", "biases") if f"{module}.{part}" not in stored]
    raise CheckpointError(
        f"{info.file}: tensor {name!r} is a packed U32 weight but {' and '.join(map(repr, missing))} "
        f"{'is' if len(missing) == 1 else 'are'} missing; affine quantization needs both"
    )
