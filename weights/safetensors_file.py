"""Lazy, memory-mapped reading of one safetensors file, bf16 included.

`safetensors.safe_open(..., framework="numpy")` cannot hand out bf16, so the header is parsed
here: 8-byte little-endian header length, a JSON header, then the raw tensor bytes. Tensors are
numpy views on one read-only mmap of the file; nothing is copied until a caller converts.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import CheckpointError

# safetensors dtype tag -> numpy dtype (all stored little-endian).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# A header larger than this is not a header: it is a corrupt length field.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives, read from a safetensors header alone."""

    name: str
    file: str  # path of the safetensors file
    dtype: str  # safetensors tag: "BF16", "U32", ...
    shape: tuple[int, ...]
    begin: int  # byte offset of the data, from the start of the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _reject_duplicate_keys(path: str):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(f"{path}: tensor {key!r} is listed twice in the header")
            seen[key] = value
        return seen

    return hook


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: returns (tensors by name, __metadata__).

    Checks that every tensor's byte range lies inside the file, matches its dtype and shape,
    and does not overlap another tensor, so a truncated or corrupt file fails here, not later.
    """
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: file is {file_size} bytes, too short for a safetensors header "
                    "(expected an 8-byte header length first); the file is truncated or not safetensors"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(file_size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: header length field says {header_len} bytes but the file has "
                    f"{file_size - 8} bytes after it; the file is truncated or not safetensors"
                )
            header_bytes = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
    try:
        header = json.loads(header_bytes, object_pairs_hook=_reject_duplicate_keys(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a {type(header).__name__}, expected a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    _check_no_overlap(path, tensors.values())
    return tensors, metadata


def _tensor_info(path: str, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: header entry {entry!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{where}: dtype {dtype!r} is unknown, expected one of {sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
    if not 0 <= begin <= end or end - begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes, expected {expected} "
            f"for {dtype} {shape}; the header is corrupt"
        )
    if end > data_size:
        raise CheckpointError(
            f"{where}: data ends at byte {end} of the data section but the file has only "
            f"{data_size} data bytes; the file is truncated"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(path: str, infos) -> None:
    ordered = sorted((i for i in infos if i.nbytes), key=lambda i: i.begin)
    for before, after in zip(ordered, ordered[1:]):
        if after.begin < before.end:
            raise CheckpointError(
                f"{path}: tensors {before.name!r} and {after.name!r} overlap in the data section; "
                "the header is corrupt"
            )


class MappedFile:
    """One safetensors file, mapped read-only; tensors are zero-copy numpy views."""

    def __init__(self, path: str):
        self.path = path
        self.tensors, self.metadata = read_header(path)
        with open(path, "rb") as f:  # the header check above guarantees a non-empty file
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def array(self, name: str) -> np.ndarray:
        """The stored tensor as a read-only view (bf16 as ml_dtypes.bfloat16, U32 as uint32)."""
        info = self.tensors[name]
        dtype = DTYPES[info.dtype]
        count = info.nbytes // dtype.itemsize
        if count == 0:
            return np.empty(info.shape, dtype)
        if self._mmap is None:
            raise ValueError(f"{self.path}: file is closed")
        flat = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=info.begin)
        return flat.reshape(info.shape)

    def close(self) -> None:
        # Views still alive keep the mapping open; mmap.close() would then raise BufferError.
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass
            self._mmap = None
