"""read_config against its oracles: transformers 5.24's own reading of 4.x and 5.x config.json
(RoPE, experts) and mlx_lm's reading of MLX quantization (per-module entries, null group size)."""

import json

import pytest

from checkpoints import FAMILIES, hf_checkpoint, mlx_checkpoint
from iree_runner.weights import CheckpointError, QuantSpec, read_config

transformers = pytest.importorskip("transformers", reason="transformers reads config.json: the oracle")

# Keys transformers keeps in rope_parameters that are not scaling parameters.
_NOT_SCALING = {"rope_theta", "partial_rotary_factor", "type"}


def transformers_rope(model_dir, layer_type=None) -> dict:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    rope = config.rope_parameters
    return dict(rope[layer_type] if layer_type else rope)


def assert_rope_matches(ours, theirs: dict):
    assert ours.theta == theirs["rope_theta"]
    assert ours.partial_rotary_factor == theirs.get("partial_rotary_factor", 1.0)
    scaling = {k: v for k, v in theirs.items() if k not in _NOT_SCALING}
    if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
        assert ours.scaling is None
    else:
        assert ours.scaling == scaling


def layer_types_of(family):
    return ["sliding_attention", "full_attention"] if family == "gemma3_text" else [None]


@pytest.mark.parametrize("keys", ["v4", "v5"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rope_and_experts_match_transformers_on_saved_checkpoints(family, keys):
    model_dir = hf_checkpoint(family, "float16", keys=keys)
    config = read_config(model_dir)

    assert config.model_type == family
    raw_keys = set(json.loads((model_dir / "config.json").read_text()))
    assert ("rope_parameters" in raw_keys) == (keys == "v5")  # both spellings really exercised
    for layer_type in layer_types_of(family):
        assert_rope_matches(config.rope(layer_type), transformers_rope(model_dir, layer_type))
    hf = transformers.AutoConfig.from_pretrained(model_dir)
    assert config.num_experts == getattr(hf, "num_local_experts", None)


# 4.x spellings the factory does not produce; transformers' reading of each is the truth.
HAND_WRITTEN = {
    "gemma3_v4_scaled": dict(model_type="gemma3_text", num_hidden_layers=6, rope_theta=1e6,
                             rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "gemma3_defaults": dict(model_type="gemma3_text", num_hidden_layers=6),
    "gemma3_v5_nested": dict(model_type="gemma3_text", num_hidden_layers=6, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 2e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 5e3}}),
    "llama_legacy_type": dict(model_type="llama", rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}),
    "llama3_v4": dict(model_type="llama", rope_theta=5e5, max_position_embeddings=8192, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}),
    "llama3_v4_no_original_max": dict(model_type="llama", rope_theta=5e5, max_position_embeddings=4096, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "qwen2_yarn_v4": dict(model_type="qwen2", rope_theta=1e6, max_position_embeddings=32768,
                          rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2_no_theta": dict(model_type="qwen2"),
    "stablelm_default_partial": dict(model_type="stablelm", rope_theta=1e4),
    "stablelm_v4_partial": dict(model_type="stablelm", rope_theta=1e4, partial_rotary_factor=0.5),
    "qwen3_moe_v4_experts": dict(model_type="qwen3_moe", num_experts=8, rope_theta=1e6),
    "qwen3_moe_v5_experts": dict(model_type="qwen3_moe", num_local_experts=16,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_configs_match_transformers(name, tmp_path):
    raw = HAND_WRITTEN[name]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = read_config(tmp_path)

    for layer_type in layer_types_of(raw["model_type"]):
        assert_rope_matches(config.rope(layer_type), transformers_rope(tmp_path, layer_type))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.num_experts == getattr(hf, "num_local_experts", None)
    assert config.raw == raw


def test_gemma3_rope_defaults_to_the_global_layers_and_rejects_unknown_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HAND_WRITTEN["gemma3_v4_scaled"]))
    config = read_config(tmp_path)
    assert config.rope() == config.rope("full_attention")
    assert config.rope("full_attention").scaling == {"rope_type": "linear", "factor": 8.0}
    assert config.rope("sliding_attention").scaling is None  # 4.x rope_scaling is global-only
    with pytest.raises(CheckpointError, match="chunked_attention"):
        config.rope("chunked_attention")


def test_mixed_quantization_reads_as_mlx_lm_wrote_it():
    # mlx_lm convert --quant-predicate mixed_3_6 writes per-module {"group_size": null, "bits": 3|6}.
    model_dir = mlx_checkpoint("qwen3", "bfloat16", "mixed_3_6")
    raw = json.loads((model_dir / "config.json").read_text())
    quant = read_config(model_dir).quantization

    assert quant.default == QuantSpec(bits=raw["quantization"]["bits"], group_size=raw["quantization"]["group_size"])
    per_module = {k: v for k, v in raw["quantization"].items() if isinstance(v, dict)}
    assert per_module and {v["group_size"] for v in per_module.values()} == {None}
    for module, entry in per_module.items():
        # null group size: mlx's QuantizedLinear(group_size=None) takes the affine default, 64.
        assert quant.for_module(module) == QuantSpec(bits=entry["bits"], group_size=64)
    assert {quant.for_module(m).bits for m in per_module} == {3, 6}


@pytest.mark.parametrize("key", ["quantization", "quantization_config"])
def test_quantization_overrides_and_unquantized_modules(key, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3",
        key: {"group_size": 32, "bits": 4,
              "model.layers.0.mlp.down_proj": {"group_size": 128, "bits": 8, "mode": "affine"},
              "lm_head": False},
    }))
    quant = read_config(tmp_path).quantization
    assert (quant.bits, quant.group_size, quant.mode) == (4, 32, "affine")
    assert quant.for_module("model.layers.0.mlp.down_proj") == QuantSpec(8, 128, "affine")
    assert quant.for_module("model.layers.0.mlp.up_proj") == QuantSpec(4, 32, "affine")
    assert quant.for_module("lm_head") is None


def test_unquantized_checkpoint_has_no_quantization():
    assert read_config(hf_checkpoint("llama", "bfloat16")).quantization is None


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8", "bitsandbytes"])
def test_hf_quantization_schemes_are_refused_by_name(method, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": method}}))
    with pytest.raises(CheckpointError) as error:
        read_config(tmp_path)
    assert "config.json" in str(error.value) and repr(method) in str(error.value) and "not supported" in str(error.value)


def test_unknown_quantization_mode_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64, "mode": "int4x"}}))
    with pytest.raises(CheckpointError, match=r"config\.json: quantization: quantization mode 'int4x' is unknown"):
        read_config(tmp_path)
