"""dequantize_affine against mx.dequantize, the oracle: bit-exact in f32 for every bits value,
group size, F16/BF16 scale pair and rank (2-D weights, 3-D stacked experts)."""

import ml_dtypes
import numpy as np
import pytest

from iree_runner.weights import CheckpointError, dequantize_affine
from iree_runner.weights.dequant import AffineRows

mx = pytest.importorskip("mlx.core", reason="mx.dequantize is the oracle")  # oracle extra

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
PAIRS = {"F16": (mx.float16, np.float16), "BF16": (mx.bfloat16, ml_dtypes.bfloat16)}
# w: [out, in] or stacked experts [E, out, in]; in = 384 is 3, 6 or 12 groups.
SHAPES = {2: (24, 384), 3: (3, 8, 384)}


def quantized_case(bits, group_size, pair, rank, seed=0):
    """mx.quantize of random data with scales/biases cast to `pair`; returns numpy inputs and
    the oracle: mx.dequantize on the scales/biases widened back to f32."""
    rng = np.random.default_rng([bits, group_size, rank, seed])
    w = rng.standard_normal(SHAPES[rank]).astype(np.float32)
    packed, scales, biases = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    mx_dtype, np_dtype = PAIRS[pair]
    scales, biases = scales.astype(mx_dtype), biases.astype(mx_dtype)
    oracle = mx.dequantize(
        packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits
    )
    as_numpy = lambda a: np.array(a.astype(mx.float32)).astype(np_dtype)  # exact: values are pair-typed
    return np.array(packed), as_numpy(scales), as_numpy(biases), np.array(oracle)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("rank", sorted(SHAPES))
@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_matches_mx_dequantize_bit_exact(bits, group_size, pair, rank):
    packed, scales, biases, oracle = quantized_case(bits, group_size, pair, rank)
    assert packed.dtype == np.uint32 and scales.dtype == PAIRS[pair][1]

    got = dequantize_affine(packed, scales, biases, bits=bits, group_size=group_size, out_dtype=np.float32)

    assert got.shape == SHAPES[rank] == oracle.shape
    assert same_bits(got, oracle.astype(np.float32))


@pytest.mark.parametrize("out_dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 32), (4, 64), (4, 128), (5, 64), (6, 128), (8, 64)])
def test_narrow_output_is_the_f32_result_rounded_once(bits, group_size, out_dtype):
    # f16/bf16 outputs take the lookup-table path where 2**bits <= group_size / 2, else the
    # scratch-and-cast path; both must equal one rounding of the exact f32 result.
    packed, scales, biases, oracle = quantized_case(bits, group_size, "BF16", 3, seed=1)

    got = dequantize_affine(packed, scales, biases, bits=bits, group_size=group_size, out_dtype=out_dtype)

    assert same_bits(got, oracle.astype(np.float32).astype(out_dtype))


@pytest.mark.parametrize("path", ["_run_direct", "_run_cast", "_run_table"])
def test_every_kernel_agrees_with_the_oracle_over_partial_row_ranges(path, monkeypatch):
    # Small chunks force many chunk boundaries and a short last chunk; rows are filled in
    # two uneven ranges, the way load_all hands them to threads.
    monkeypatch.setattr("iree_runner.weights.dequant.CHUNK_ELEMENTS", 384 * 5)
    packed, scales, biases, oracle = quantized_case(4, 64, "F16", 3, seed=2)
    out_dtype = np.float32 if path == "_run_direct" else np.float16
    out = np.full(oracle.shape, np.nan, dtype=out_dtype)
    rows = AffineRows(packed, scales, biases, 4, 64, out)

    getattr(rows, path)(0, 7)
    getattr(rows, path)(7, rows.num_rows)

    assert same_bits(out, oracle.astype(out_dtype))


def test_hand_example_bf16_and_f16_pairs_recover_the_same_row():
    # From the original fix: these scales/biases are exact in BF16 (and F16), so both pairs
    # must dequantize to the same numbers, and to w = s * q + b by hand.
    group_size, bits = 32, 4
    scales = np.array([[2.0, 0.5], [10.0, -1.0]], dtype=np.float32)  # [out=2, groups=2]
    biases = np.array([[-1.0, 10.0], [0.5, 2.0]], dtype=np.float32)
    q = np.arange(2 * 64, dtype=np.uint32).reshape(2, 64) % 16  # codes 0..15, in = 64
    words = np.zeros((2, 64 * bits // 32), dtype=np.uint32)
    for i in range(64):  # value i at bits [4i, 4i+4) of the row's little-endian bitstream
        words[:, i // 8] |= q[:, i] << (4 * (i % 8))
    expected = (np.repeat(scales, group_size, axis=1) * q + np.repeat(biases, group_size, axis=1)).astype(np.float32)

    outs = {}
    for name, dtype in {"BF16": ml_dtypes.bfloat16, "F16": np.float16}.items():
        s, b = scales.astype(dtype), biases.astype(dtype)
        assert np.array_equal(s.astype(np.float32), scales) and np.array_equal(b.astype(np.float32), biases)
        outs[name] = dequantize_affine(words, s, b, bits=bits, group_size=group_size, out_dtype=np.float32)

    assert same_bits(outs["BF16"], outs["F16"])
    assert same_bits(outs["BF16"], expected)
    oracle = mx.dequantize(mx.array(words), mx.array(scales), mx.array(biases), group_size=group_size, bits=bits)
    assert same_bits(outs["BF16"], np.array(oracle))


@pytest.mark.parametrize("bits", BITS)
def test_packing_straddles_word_boundaries_as_mlx_writes_it(bits):
    # Rows of the integers 0..2**bits-1, repeated: every group spans 0 to the top code, so mx.quantize
    # represents them exactly (scale +-1) and only the right bit order (3/5/6-bit values cross
    # uint32 words) gives the row back.
    in_dim = 256  # every code of 8 bits appears too
    codes = np.tile(np.arange(128) % (1 << bits), in_dim // 128).astype(np.float32)  # groups of 128
    codes[127::128] = (1 << bits) - 1  # 8 bits: each group must still reach code 255
    w = np.stack([codes, codes[::-1]])
    packed, scales, biases = mx.quantize(mx.array(w), group_size=128, bits=bits)
    assert np.array_equal(np.array(mx.dequantize(packed, scales, biases, group_size=128, bits=bits)), w)

    got = dequantize_affine(
        np.array(packed), np.array(scales.astype(mx.float16)), np.array(biases.astype(mx.float16)),
        bits=bits, group_size=128,
    )

    assert np.array_equal(got, w)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(scales_dtype=np.float32), "F32/F32, expected a 16-bit float pair"),
        (dict(biases_dtype=np.float16), "scales are BF16 but biases are F16"),
        (dict(group_size=96), "group size 96 is not supported"),
        (dict(bits=7), "7-bit quantization is not supported"),
        (dict(scales_cols=3), "expected [4, 6]"),
    ],
)
def test_standalone_errors_name_the_tensor(change, message):
    packed = np.zeros((4, 384 * 4 // 32), np.uint32)
    scales = np.ones((4, change.get("scales_cols", 6)), change.get("scales_dtype", ml_dtypes.bfloat16))
    biases_dtype = change.get("biases_dtype", change.get("scales_dtype", ml_dtypes.bfloat16))
    biases = np.zeros((4, change.get("scales_cols", 6)), biases_dtype)
    with pytest.raises(CheckpointError) as error:
        dequantize_affine(packed, scales, biases, bits=change.get("bits", 4),
                          group_size=change.get("group_size", 64), name="model.layers.3.mlp.up_proj.weight")
    assert "model.layers.3.mlp.up_proj.weight" in str(error.value)
    assert message in str(error.value)

