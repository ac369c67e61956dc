"""MLX affine dequantization in numpy: w = scales[g] * q + biases[g] per group along the input dim.

Packing (as mx.quantize writes it): each row is a little-endian bitstream of uint32 words; value
i of a row occupies bits [i*bits, (i+1)*bits), so 3/5/6-bit values straddle word boundaries.
Reading the words as bytes keeps that order: every `bits` bytes hold exactly 8 values.

Scales and biases must be a matched F16 or BF16 pair. Both widen to f32 exactly, s*q is then
exact in f32 (at most 11 + 8 significant bits), and the single rounding at +b makes the f32
result bit-exact with mx.dequantize on f32-widened scales and biases. Other output dtypes are
one more rounding of that f32 value.

Work is done in row chunks small enough to stay in cache, so converting to f16 never needs an
f32 temporary the size of the tensor. numpy's f32 -> f16 rounding is scalar and dominates, so
where a group has at most half as many levels (2**bits) as values, the levels are rounded once
per group and gathered (4-bit, group 64: a quarter of the roundings).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .config import QuantSpec
from .errors import CheckpointError
from .safetensors_file import DTYPES

# Elements per inner chunk: a ~256 KiB f32 scratch plus its uint8 codes stay in L2.
CHUNK_ELEMENTS = 1 << 16

_PAIR_DTYPES = {"F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}


def dtype_tag(dtype: np.dtype) -> str:
    """safetensors tag of a numpy dtype, for messages and checks ("BF16", "U32", ...)."""
    for tag, candidate in DTYPES.items():
        if np.dtype(dtype) == candidate:
            return tag
    return str(np.dtype(dtype))


def check_affine_layout(
    where: str,
    *,
    packed: tuple[tuple[int, ...], str],
    scales: tuple[tuple[int, ...], str],
    biases: tuple[tuple[int, ...], str],
    bits: int,
    group_size: int,
) -> tuple[int, ...]:
    """Check (shape, dtype tag) of a packed weight and its scales/biases; return the logical shape.

    `where` names the file and tensor for the message. Works from headers alone.
    """
    QuantSpec(bits, group_size).check_supported(where)
    (p_shape, p_dtype), (s_shape, s_dtype), (b_shape, b_dtype) = packed, scales, biases
    if p_dtype != "U32":
        raise CheckpointError(f"{where}: packed weight is {p_dtype}, expected U32 words")
    if s_dtype != b_dtype:
        raise CheckpointError(
            f"{where}: scales are {s_dtype} but biases are {b_dtype}; expected a matched F16/F16 or BF16/BF16 pair"
        )
    if s_dtype not in _PAIR_DTYPES:
        raise CheckpointError(
            f"{where}: scales/biases are {s_dtype}/{b_dtype}, expected a 16-bit float pair (F16/F16 or BF16/BF16)"
        )
    if len(p_shape) not in (2, 3):
        raise CheckpointError(
            f"{where}: packed weight has shape {list(p_shape)}, expected rank 2 [out, in*{bits}/32] "
            "or rank 3 [experts, out, in*bits/32]"
        )
    if s_shape != b_shape:
        raise CheckpointError(f"{where}: scales shape {list(s_shape)} differs from biases shape {list(b_shape)}")
    if (p_shape[-1] * 32) % bits:
        raise CheckpointError(
            f"{where}: packed weight has {p_shape[-1]} words per row, which is not a whole number of "
            f"{bits}-bit values"
        )
    in_dim = p_shape[-1] * 32 // bits
    if in_dim % group_size:
        raise CheckpointError(
            f"{where}: group size {group_size} does not divide the input dimension {in_dim} "
            f"({p_shape[-1]} words x 32 / {bits} bits)"
        )
    expected = (*p_shape[:-1], in_dim // group_size)
    if tuple(s_shape) != expected:
        raise CheckpointError(
            f"{where}: scales/biases have shape {list(s_shape)}, expected {list(expected)} for packed "
            f"weight {list(p_shape)} at {bits} bits, group size {group_size} (input dimension {in_dim})"
        )
    return (*p_shape[:-1], in_dim)


def dequantize_affine(
    packed_u32: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    *,
    bits: int,
    group_size: int,
    out_dtype=np.float32,
    name: str = "<tensor>",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Dequantize an MLX affine-packed weight.

    packed_u32: [..., out, in*bits/32] uint32; scales, biases: [..., out, in/group_size], both F16
    or both BF16. Returns [..., out, in] in out_dtype (f32 is bit-exact with mx.dequantize on
    f32-widened scales/biases). `name` is used in error messages.
    """
    shape = check_affine_layout(
        name,
        packed=(packed_u32.shape, dtype_tag(packed_u32.dtype)),
        scales=(scales.shape, dtype_tag(scales.dtype)),
        biases=(biases.shape, dtype_tag(biases.dtype)),
        bits=bits,
        group_size=group_size,
    )
    if out is None:
        out = np.empty(shape, dtype=out_dtype)
    elif out.shape != shape:
        raise ValueError(f"{name}: out has shape {out.shape}, expected {shape}")
    rows = AffineRows(packed_u32, scales, biases, bits, group_size, out)
    rows.run(0, rows.num_rows)
    return out


class AffineRows:
    """One quantized tensor flattened to rows, dequantized by row range (ranges may run in threads)."""

    def __init__(self, packed, scales, biases, bits: int, group_size: int, out: np.ndarray):
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous: rows are written through a reshaped view")
        words, groups = packed.shape[-1], scales.shape[-1]
        self.num_rows, self.in_dim = int(np.prod(packed.shape[:-1])), words * 32 // bits
        self.packed = packed.reshape(self.num_rows, words)  # [rows, words]
        self.scales = scales.reshape(self.num_rows, groups)  # [rows, groups]
        self.biases = biases.reshape(self.num_rows, groups)
        self.out = out.reshape(self.num_rows, self.in_dim)  # [rows, in], a view
        self.bits, self.group_size = bits, group_size
        self.num_groups = self.in_dim // group_size
        self.chunk_rows = max(1, CHUNK_ELEMENTS // max(1, self.in_dim))

    def run(self, start: int, stop: int) -> None:
        """Dequantize rows [start, stop) into self.out."""
        if self.out.dtype == np.float32:
            self._run_direct(start, stop)
        elif 2 * (1 << self.bits) <= self.group_size:
            self._run_table(start, stop)
        else:
            self._run_cast(start, stop)

    def _chunks(self, start: int, stop: int):
        for lo in range(start, stop, self.chunk_rows):
            hi = min(lo + self.chunk_rows, stop)
            s = self.scales[lo:hi].astype(np.float32)[:, :, None]  # [n, groups, 1], exact
            b = self.biases[lo:hi].astype(np.float32)[:, :, None]
            yield lo, hi, s, b

    def _run_direct(self, start: int, stop: int) -> None:
        # f32 out: s * q + b straight into the output rows.
        codes = np.empty((self.chunk_rows, self.in_dim), np.uint8)
        for lo, hi, s, b in self._chunks(start, stop):
            n = hi - lo
            q = _unpack(self.packed[lo:hi], self.bits, codes[:n])
            grouped = self.out[lo:hi].reshape(n, self.num_groups, self.group_size)
            np.multiply(q.reshape(grouped.shape), s, out=grouped)
            np.add(grouped, b, out=grouped)

    def _run_cast(self, start: int, stop: int) -> None:
        # Other out dtypes: f32 in a cache-sized scratch, then one rounding into the output.
        codes = np.empty((self.chunk_rows, self.in_dim), np.uint8)
        scratch = np.empty((self.chunk_rows, self.in_dim), np.float32)
        for lo, hi, s, b in self._chunks(start, stop):
            n = hi - lo
            q = _unpack(self.packed[lo:hi], self.bits, codes[:n])
            grouped = scratch[:n].reshape(n, self.num_groups, self.group_size)
            np.multiply(q.reshape(grouped.shape), s, out=grouped)
            np.add(grouped, b, out=grouped)
            np.copyto(self.out[lo:hi], scratch[:n], casting="unsafe")

    def _run_table(self, start: int, stop: int) -> None:
        # A group takes only 2**bits distinct values. Where that is at most half the group, the
        # (slow, scalar) f32 -> f16 rounding is cheaper done once per level, then gathered.
        # Same f32 values, same single rounding: identical to _run_cast.
        levels = 1 << self.bits
        rows_groups = (self.chunk_rows, self.num_groups)
        codes = np.empty((self.chunk_rows, self.in_dim), np.uint8)
        level_values = np.arange(levels, dtype=np.float32)  # the codes q, exact in f32
        table32 = np.empty((*rows_groups, levels), np.float32)  # [rows, groups, levels]
        table = np.empty((*rows_groups, levels), self.out.dtype)
        # Flat index of (row, group)'s table in `table`, plus the code.
        offsets = (np.arange(np.prod(rows_groups), dtype=np.intp) * levels).reshape(*rows_groups, 1)
        index = np.empty((*rows_groups, self.group_size), np.intp)
        for lo, hi, s, b in self._chunks(start, stop):
            n = hi - lo
            q = _unpack(self.packed[lo:hi], self.bits, codes[:n])
            np.multiply(level_values, s, out=table32[:n])
            np.add(table32[:n], b, out=table32[:n])
            np.copyto(table[:n], table32[:n], casting="unsafe")
            np.add(q.reshape(n, self.num_groups, self.group_size), offsets[:n], out=index[:n])
            np.take(table[:n].reshape(-1), index[:n].reshape(n, self.in_dim), out=self.out[lo:hi])


def _unpack(words: np.ndarray, bits: int, codes: np.ndarray) -> np.ndarray:
    """Packed uint32 rows [n, words] -> codes [n, in] uint8 (may return a view of `words`)."""
    n = words.shape[0]
    # [n, words*4]: on a little-endian host the bytes of the words are the bitstream in order.
    data = np.ascontiguousarray(words, dtype="<u4").view(np.uint8)
    if bits == 8:
        return data
    if bits == 4:
        # Byte b holds values 2j (low nibble) and 2j+1 (high nibble); widened to a uint16 whose
        # little-endian bytes are those two values: (b | b << 4) & 0x0F0F.
        pairs = codes.view(np.uint16)  # [n, in/2]
        np.copyto(pairs, data, casting="unsafe")
        np.bitwise_or(pairs, np.left_shift(pairs, 4), out=pairs)
        np.bitwise_and(pairs, 0x0F0F, out=pairs)
        return codes
    if bits == 2:
        # Byte b holds 4 values at bits 0, 2, 4, 6; move each to its own byte of a uint32.
        quads = codes.view(np.uint32)  # [n, in/4]
        np.copyto(quads, data, casting="unsafe")
        spread = quads | (quads << 6)
        np.bitwise_or(spread, spread << 12, out=quads)
        np.bitwise_and(quads, 0x03030303, out=quads)
        return codes
    # 3, 5, 6 bits: every `bits` bytes hold 8 values; gather them into one 64-bit word.
    octets = data.reshape(n, -1, bits)  # [n, in/8, bits]
    acc = octets[:, :, 0].astype(np.uint64)
    for k in range(1, bits):
        acc |= octets[:, :, k].astype(np.uint64) << np.uint64(8 * k)
    mask = np.uint64((1 << bits) - 1)
    grouped = codes.reshape(n, -1, 8)  # [n, in/8, 8]
    for i in range(8):
        grouped[:, :, i] = (acc >> np.uint64(i * bits)) & mask
    return codes
