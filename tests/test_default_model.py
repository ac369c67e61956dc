"""The committed default model (iree_runner/default_model/), checked against oracles.

Made by scripts/train_default_model.py; mlx_lm and transformers are the oracles here.
"""

import importlib.util
import json
import re
import struct
from pathlib import Path

import mlx_lm  # oracle: loads and generates from the committed model
import pytest
import transformers  # oracle: AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "iree_runner" / "default_model"
SCRIPT = REPO_ROOT / "scripts" / "train_default_model.py"

EXPECTED_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
BITS, GROUP_SIZE = 4, 64
# Linear layers of a 4-layer Llama (q, k, v, o, gate, up, down) plus the tied embedding.
EXPECTED_QUANTIZED = 4 * 7 + 1


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header JSON, header length): 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), length


@pytest.fixture(scope="module")
def config():
    return json.loads((MODEL_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def header():
    tensors, _ = read_safetensors_header(MODEL_DIR / "model.safetensors")
    tensors.pop("__metadata__", None)
    return tensors


@pytest.fixture(scope="module")
def corpus_vocabulary():
    """Words of the training corpus, rebuilt by the script's own (deterministic) corpus code."""
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.corpus_words(script.build_corpus())


@pytest.fixture(scope="module")
def mlx_model():
    return mlx_lm.load(str(MODEL_DIR))


def test_files_exist_parse_and_are_small():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert names == EXPECTED_FILES, f"{MODEL_DIR}: found {sorted(names)}"
    for name in EXPECTED_FILES:
        if name.endswith(".json"):
            json.loads((MODEL_DIR / name).read_text())
    total = sum((MODEL_DIR / name).stat().st_size for name in names)
    assert 1_000_000 < total < 10 * 1024 * 1024, f"{MODEL_DIR} is {total} bytes"


def test_config_is_small_llama_with_64_divisible_inputs(config):
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config["hidden_size"] % GROUP_SIZE == 0
    assert config["intermediate_size"] % GROUP_SIZE == 0
    assert (config["num_attention_heads"] * config["head_dim"]) % GROUP_SIZE == 0
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    generation = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (
        config["bos_token_id"], config["eos_token_id"])


def test_quantization_is_4bit_g64_with_bf16_scales_and_biases(config, header):
    assert config["quantization"] == {"group_size": GROUP_SIZE, "bits": BITS, "mode": "affine"}

    file_size = (MODEL_DIR / "model.safetensors").stat().st_size
    _, header_length = read_safetensors_header(MODEL_DIR / "model.safetensors")
    data_end = max(info["data_offsets"][1] for info in header.values())
    assert 8 + header_length + data_end == file_size, "header offsets do not cover the file"

    quantized = [name[: -len(".scales")] for name in header if name.endswith(".scales")]
    assert len(quantized) == EXPECTED_QUANTIZED
    assert "model.embed_tokens" in quantized
    for base in quantized:
        weight = header[base + ".weight"]
        scales, biases = header[base + ".scales"], header[base + ".biases"]
        assert weight["dtype"] == "U32", base
        assert scales["dtype"] == biases["dtype"] == "BF16", base
        rows, packed = weight["shape"]
        in_features = packed * 32 // BITS
        assert scales["shape"] == biases["shape"] == [rows, in_features // GROUP_SIZE], base

    hidden, vocab = config["hidden_size"], config["vocab_size"]
    assert header["model.embed_tokens.weight"]["shape"] == [vocab, hidden * BITS // 32]
    assert header["model.layers.0.mlp.down_proj.weight"]["shape"] == [
        hidden, config["intermediate_size"] * BITS // 32]
    assert "lm_head.weight" not in header  # tied
    unquantized = {name: info for name, info in header.items()
                   if name.rsplit(".", 1)[0] not in quantized}
    assert unquantized, "norm weights should be stored unquantized"
    assert all(info["dtype"] == "BF16" for info in unquantized.values()), unquantized


def test_auto_tokenizer_loads_and_adds_bos(config):
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.bos_token_id == config["bos_token_id"]
    assert tokenizer.eos_token_id == config["eos_token_id"]
    assert len(tokenizer) == config["vocab_size"]

    text = "The function returns a list of strings."
    ids = tokenizer(text).input_ids
    assert ids[0] == config["bos_token_id"]
    assert ids.count(config["bos_token_id"]) == 1
    assert config["eos_token_id"] not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text) / 2, "BPE should merge common English into multi-byte tokens"


@pytest.mark.parametrize("prompt", ["The function", "In Python,"])
def test_mlx_lm_greedy_generation_is_english_like(mlx_model, corpus_vocabulary, prompt):
    model, tokenizer = mlx_model
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=40, verbose=False)

    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    known = [w for w in words if w in corpus_vocabulary]
    assert len(words) >= 12, f"{prompt!r} -> {text!r}"
    assert len(known) >= 0.9 * len(words), f"{prompt!r} -> {text!r}: unknown {set(words) - set(known)}"
    # Not a degenerate loop of one word (what an untrained model produces).
    assert len(set(words)) >= 6, f"{prompt!r} -> {text!r}"
    # Prose, not just identifiers: most words are separated by spaces.
    assert text.count(" ") >= len(words) // 2, f"{prompt!r} -> {text!r}"
