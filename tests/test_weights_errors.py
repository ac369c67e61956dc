"""Every way a checkpoint can be bad gets a CheckpointError from open_checkpoint (headers only,
before any data is returned) whose message names the file and tensor at fault.

Checkpoints here are hand-written safetensors files (a valid base, then one defect each), so
any dtype, shape or header corruption can be produced."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from iree_runner.weights import CheckpointError, open_checkpoint, read_config

TAGS = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int32): "I32",
}
BF16 = ml_dtypes.bfloat16
DOWN = "model.layers.0.mlp.down_proj"  # quantized: in 128, out 64, 4 bits, group 64
EMBED = "model.embed_tokens"
NORM = "model.norm.weight"
QUANTIZED_CONFIG = {"model_type": "qwen3", "quantization": {"group_size": 64, "bits": 4}}


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": TAGS[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def quantized(prefix, out_dim, in_dim, bits=4, group_size=64, pair=BF16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}.weight": rng.integers(0, 2**32, (out_dim, in_dim * bits // 32), dtype=np.uint32),
        f"{prefix}.scales": rng.standard_normal((out_dim, in_dim // group_size)).astype(pair),
        f"{prefix}.biases": rng.standard_normal((out_dim, in_dim // group_size)).astype(pair),
    }


def base_tensors() -> dict[str, np.ndarray]:
    return {**quantized(DOWN, 64, 128), **quantized(EMBED, 32, 128, seed=1), NORM: np.ones(128, BF16)}


def write_checkpoint(model_dir, tensors=None, config=QUANTIZED_CONFIG, file="model.safetensors"):
    model_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (model_dir / "config.json").write_text(json.dumps(config))
    path = model_dir / file
    path.write_bytes(safetensors_bytes(base_tensors() if tensors is None else tensors))
    return path


def open_error(model_dir) -> str:
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(model_dir)
    return str(error.value)


def test_the_base_checkpoint_is_valid(tmp_path):
    write_checkpoint(tmp_path)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.names() == [EMBED + ".weight", DOWN + ".weight", NORM]
        assert ckpt.shape(DOWN + ".weight") == (64, 128) and ckpt.is_quantized(DOWN + ".weight")
        assert ckpt.load(NORM).dtype == np.float32


# --- scales/biases pair ----------------------------------------------------------------------
@pytest.mark.parametrize("scales,biases", [(np.float16, BF16), (BF16, np.float16)], ids=["F16-BF16", "BF16-F16"])
def test_mismatched_pair_dtypes(tmp_path, scales, biases):
    tensors = base_tensors()
    tensors[f"{DOWN}.scales"] = tensors[f"{DOWN}.scales"].astype(scales)
    tensors[f"{DOWN}.biases"] = tensors[f"{DOWN}.biases"].astype(biases)
    path = write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert str(path) in message and f"'{DOWN}.weight'" in message
    assert f"scales are {TAGS[np.dtype(scales)]} but biases are {TAGS[np.dtype(biases)]}" in message
    assert "expected a matched F16/F16 or BF16/BF16 pair" in message


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.float8_e4m3fn, np.uint8], ids=["F32", "F8", "U8"])
def test_pair_that_is_not_16_bit_float(tmp_path, dtype):
    tensors = base_tensors()
    for part in ("scales", "biases"):
        tensors[f"{DOWN}.{part}"] = tensors[f"{DOWN}.{part}"].astype(np.float32).astype(dtype)
    path = write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    tag = TAGS[np.dtype(dtype)]
    assert str(path) in message and f"'{DOWN}.weight'" in message
    assert f"scales/biases are {tag}/{tag}, expected a 16-bit float pair" in message


# --- missing parts -----------------------------------------------------------------------------
def test_missing_scales(tmp_path):
    tensors = base_tensors()
    del tensors[f"{DOWN}.scales"]
    path = write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert str(path) in message and f"'{DOWN}.weight' is a packed U32 weight" in message
    assert f"but '{DOWN}.scales' is missing" in message


def test_biases_alone(tmp_path):
    tensors = base_tensors()
    del tensors[f"{DOWN}.scales"], tensors[f"{DOWN}.weight"]
    path = write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert str(path) in message and f"'{DOWN}.biases' is quantization biases without '{DOWN}.scales'" in message


def test_missing_scales_and_biases(tmp_path):
    tensors = base_tensors()
    del tensors[f"{DOWN}.scales"], tensors[f"{DOWN}.biases"]
    path = write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert str(path) in message and f"'{DOWN}.weight' is a packed U32 weight" in message
    assert f"'{DOWN}.scales' and '{DOWN}.biases' are missing" in message


def test_missing_biases(tmp_path):
    tensors = base_tensors()
    del tensors[f"{DOWN}.biases"]
    path = write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert str(path) in message and f"'{DOWN}.weight'" in message and f"no '{DOWN}.biases'" in message


def test_scales_without_packed_weight(tmp_path):
    tensors = base_tensors()
    del tensors[f"{DOWN}.weight"]
    path = write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert str(path) in message and f"'{DOWN}.scales': scales without a packed weight" in message
    assert f"expected '{DOWN}.weight'" in message


# --- shapes ------------------------------------------------------------------------------------
def test_scales_shape_inconsistent_with_packed_weight(tmp_path):
    tensors = base_tensors()
    for part in ("scales", "biases"):
        tensors[f"{DOWN}.{part}"] = np.ones((64, 4), BF16)  # group 64 of in 128 needs 2 columns
    path = write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert str(path) in message and f"'{DOWN}.weight'" in message
    assert "scales/biases have shape [64, 4], expected [64, 2]" in message and "input dimension 128" in message


def test_biases_shape_differs_from_scales(tmp_path):
    tensors = base_tensors()
    tensors[f"{DOWN}.biases"] = np.ones((64, 1), BF16)
    write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert f"'{DOWN}.weight'" in message and "scales shape [64, 2] differs from biases shape [64, 1]" in message


def test_group_size_does_not_divide_input_dimension(tmp_path):
    tensors = base_tensors()
    tensors.update(quantized(DOWN, 64, 96, group_size=32))  # in 96: groups of 64 do not fit
    path = write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert str(path) in message and f"'{DOWN}.weight'" in message
    assert "group size 64 does not divide the input dimension 96" in message


def test_packed_words_not_a_whole_number_of_values(tmp_path):
    config = {"model_type": "qwen3", "quantization": {"group_size": 64, "bits": 4, DOWN: {"bits": 3, "group_size": 64}}}
    write_checkpoint(tmp_path, config=config)  # 16 words * 32 / 3 bits is not whole
    message = open_error(tmp_path)
    assert f"'{DOWN}.weight'" in message and "16 words per row, which is not a whole number of 3-bit values" in message


def test_packed_weight_of_wrong_rank(tmp_path):
    tensors = base_tensors()
    tensors[f"{DOWN}.weight"] = tensors[f"{DOWN}.weight"].reshape(-1)
    write_checkpoint(tmp_path, tensors)
    message = open_error(tmp_path)
    assert f"'{DOWN}.weight'" in message and "packed weight has shape [1024], expected rank 2" in message


# --- configuration -----------------------------------------------------------------------------
def test_packed_weight_without_quantization_config(tmp_path):
    tensors = base_tensors()
    del tensors[f"{DOWN}.scales"], tensors[f"{DOWN}.biases"]
    del tensors[f"{EMBED}.weight"], tensors[f"{EMBED}.scales"], tensors[f"{EMBED}.biases"]
    path = write_checkpoint(tmp_path, tensors, config={"model_type": "qwen3"})
    message = open_error(tmp_path)
    assert str(path) in message and f"'{DOWN}.weight' is a packed U32 weight" in message
    assert "config.json" in message and "has no 'quantization' config" in message


def test_scales_without_quantization_config(tmp_path):
    write_checkpoint(tmp_path, config={"model_type": "qwen3"})
    message = open_error(tmp_path)
    assert "config.json has no 'quantization'" in message and "model.safetensors: quantized tensor" in message


@pytest.mark.parametrize("bits", [1, 7, 16])
def test_unsupported_bits(tmp_path, bits):
    write_checkpoint(tmp_path, config={"model_type": "qwen3", "quantization": {"group_size": 64, "bits": bits}})
    message = open_error(tmp_path)
    assert "model.safetensors" in message and ".weight'" in message
    assert f"{bits}-bit quantization is not supported, expected bits in (2, 3, 4, 5, 6, 8)" in message


def test_unsupported_group_size(tmp_path):
    config = {"model_type": "qwen3", "quantization": {"group_size": 64, "bits": 4, EMBED: {"group_size": 16, "bits": 4}}}
    write_checkpoint(tmp_path, config=config)
    message = open_error(tmp_path)
    assert f"'{EMBED}.weight'" in message and "group size 16 is not supported" in message


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_unsupported_quantization_modes(tmp_path, mode):
    write_checkpoint(tmp_path, config={"model_type": "qwen3", "quantization": {"mode": mode}})
    message = open_error(tmp_path)
    assert "model.safetensors" in message and ".weight'" in message
    assert f"quantization mode '{mode}' is not supported" in message


def test_module_marked_unquantized_but_stored_quantized(tmp_path):
    write_checkpoint(tmp_path, config={"model_type": "qwen3", "quantization": {"group_size": 64, "bits": 4, DOWN: False}})
    message = open_error(tmp_path)
    assert f"'{DOWN}.weight'" in message and f"lists module '{DOWN}' as unquantized" in message


def test_module_listed_as_quantized_but_stored_as_float(tmp_path):
    tensors = base_tensors()
    config = {"model_type": "qwen3", "quantization": {"group_size": 64, "bits": 4, "model.norm": {"bits": 4, "group_size": 64}}}
    write_checkpoint(tmp_path, tensors, config=config)
    message = open_error(tmp_path)
    assert f"'{NORM}' is stored as BF16 [128]" in message and "expected a U32 weight with .scales and .biases" in message


def test_config_json_missing(tmp_path):
    write_checkpoint(tmp_path, config=None)
    message = open_error(tmp_path)
    assert str(tmp_path / "config.json") in message and "missing" in message


def test_config_json_not_json(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", ')
    with pytest.raises(CheckpointError, match=r"config\.json: config\.json is not valid JSON") as error:
        read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)
    assert open_error(tmp_path) == str(error.value)


# --- safetensors files -------------------------------------------------------------------------
def test_truncated_file(tmp_path):
    path = write_checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # the last tensor (the norm, 256 bytes) loses its tail
    message = open_error(tmp_path)
    assert str(path) in message and f"'{NORM}'" in message and "truncated" in message


def test_truncated_inside_the_header(tmp_path):
    path = write_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:50])
    message = open_error(tmp_path)
    assert str(path) in message and "header length field" in message and "truncated" in message


def test_corrupt_header_json(tmp_path):
    path = write_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    data[8] = ord("[")  # the header's opening brace
    data[9:12] = b"!!!"
    path.write_bytes(bytes(data))
    message = open_error(tmp_path)
    assert str(path) in message and "header is not valid JSON" in message


def test_header_offsets_inconsistent_with_shape(tmp_path):
    path = write_checkpoint(tmp_path)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header[NORM]["shape"] = [64]
    text = json.dumps(header).encode().ljust(length)
    path.write_bytes(data[:8] + text + data[8 + length :])
    message = open_error(tmp_path)
    assert str(path) in message and f"'{NORM}'" in message and "expected 128 for BF16 [64]" in message


def test_unknown_dtype_in_header(tmp_path):
    path = write_checkpoint(tmp_path)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header[NORM]["dtype"] = "F4"
    text = json.dumps(header).encode().ljust(length)
    path.write_bytes(data[:8] + text + data[8 + length :])
    message = open_error(tmp_path)
    assert str(path) in message and f"'{NORM}'" in message and "dtype 'F4' is unknown" in message


def test_no_safetensors_in_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QUANTIZED_CONFIG))
    assert "no model.safetensors, model.safetensors.index.json or model*.safetensors" in open_error(tmp_path)


# --- shards and index --------------------------------------------------------------------------
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_sharded(model_dir, index_text=None, second=None):
    """DOWN's triple in shard 1, the rest in shard 2, plus an index (or the given index text)."""
    tensors = base_tensors()
    first = {n: a for n, a in tensors.items() if n.startswith(DOWN)}
    second = {n: a for n, a in tensors.items() if n not in first} if second is None else second
    write_checkpoint(model_dir, first, file=SHARDS[0])
    write_checkpoint(model_dir, second, file=SHARDS[1])
    weight_map = {**{n: SHARDS[0] for n in first}, **{n: SHARDS[1] for n in second}}
    if index_text is None:
        index_text = json.dumps({"metadata": {}, "weight_map": weight_map})
    (model_dir / "model.safetensors.index.json").write_text(index_text)
    return weight_map


def test_valid_sharded_checkpoint_opens(tmp_path):
    write_sharded(tmp_path)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.names() == [EMBED + ".weight", DOWN + ".weight", NORM]


def test_shard_listed_in_index_but_missing(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / SHARDS[1]).unlink()
    message = open_error(tmp_path)
    assert "model.safetensors.index.json" in message and f"shard '{SHARDS[1]}'" in message
    assert str(tmp_path / SHARDS[1]) in message and "does not exist" in message and f"'{EMBED}." in message


def test_tensor_stored_in_two_shards(tmp_path):
    tensors = base_tensors()
    second = {n: a for n, a in tensors.items() if not n.startswith(DOWN)}
    second[f"{DOWN}.scales"] = tensors[f"{DOWN}.scales"]
    write_sharded(tmp_path, second=second)
    message = open_error(tmp_path)
    assert f"tensor '{DOWN}.scales' is stored twice" in message
    assert str(tmp_path / SHARDS[0]) in message and str(tmp_path / SHARDS[1]) in message


def test_tensor_listed_twice_in_index(tmp_path):
    weight_map = write_sharded(tmp_path)
    entries = [f'"{n}": "{s}"' for n, s in weight_map.items()] + [f'"{NORM}": "{SHARDS[0]}"']
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {' + ", ".join(entries) + "}}")
    message = open_error(tmp_path)
    assert "model.safetensors.index.json" in message and f"tensor '{NORM}' is listed twice in the index" in message


def test_index_names_the_wrong_shard(tmp_path):
    weight_map = write_sharded(tmp_path)
    weight_map[NORM] = SHARDS[0]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = open_error(tmp_path)
    assert f"tensor '{NORM}' is listed for '{SHARDS[0]}' but is stored in {tmp_path / SHARDS[1]}" in message


def test_index_misses_a_stored_tensor(tmp_path):
    weight_map = write_sharded(tmp_path)
    del weight_map[NORM]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = open_error(tmp_path)
    assert str(tmp_path / SHARDS[1]) in message and f"tensor '{NORM}' is not listed in" in message


def test_index_lists_a_tensor_no_shard_holds(tmp_path):
    weight_map = write_sharded(tmp_path)
    weight_map["lm_head.weight"] = SHARDS[1]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = open_error(tmp_path)
    assert "tensor 'lm_head.weight' is listed in the index" in message and "does not hold it" in message


def test_index_not_json(tmp_path):
    write_sharded(tmp_path, index_text="{not json")
    message = open_error(tmp_path)
    assert str(tmp_path / "model.safetensors.index.json") in message and "not valid JSON" in message


def test_unknown_tensor_lookup_names_the_checkpoint(tmp_path):
    write_checkpoint(tmp_path)
    with open_checkpoint(tmp_path) as ckpt, pytest.raises(KeyError, match="no tensor 'lm_head.weight'"):
        ckpt.load("lm_head.weight")
