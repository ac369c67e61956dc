"""open_checkpoint on real checkpoints (transformers save_pretrained, the real mlx_lm convert),
tensor by tensor against mlx's own loading: names, shapes and bit-exact f32 values from
`dequantized_reference` (mx.dequantize on f32-widened scales), names/shapes/bits/group size
from `mlx_lm.utils.load_model`, and a checkpoint split into shards with an index."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from checkpoints import dequantized_reference, hf_checkpoint, mlx_checkpoint
from iree_runner.weights import open_checkpoint

mx = pytest.importorskip("mlx.core", reason="mlx's own loading is the oracle")

# (family, source dtype, mlx_lm convert recipe): every bits value, F16 and BF16 pairs, a
# mixed-precision recipe with per-module entries, MoE experts stacked [E, out, in], tied and
# untied heads, stablelm's `.bias` tensors next to quantized `.biases`.
MLX_CASES = [
    ("qwen3", "bfloat16", "q4"),
    ("llama", "float16", "q4"),
    ("gemma3_text", "bfloat16", "q8"),
    ("qwen3", "bfloat16", "mixed_3_6"),
    ("stablelm", "float16", "mixed_2_6"),
    ("qwen3_moe", "bfloat16", "q4"),
    ("qwen2", "float16", "q4g32"),
    ("llama", "bfloat16", "q3"),
    ("qwen3_moe", "float16", "q5"),
    ("qwen2", "bfloat16", "q6"),
    ("gemma3_text", "float16", "q2"),
    ("qwen3", "bfloat16", "none"),
]
HF_CASES = [("llama", "bfloat16"), ("qwen3_moe", "float16"), ("gemma3_text", "float32")]
PAIR_TAG = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def case_id(case):
    return "-".join(case)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def assert_matches_reference(ckpt, reference: dict[str, np.ndarray]):
    assert ckpt.names() == sorted(reference)
    loaded = ckpt.load_all(np.float32)
    assert list(loaded) == ckpt.names()
    for name, expected in reference.items():
        assert ckpt.shape(name) == expected.shape, name
        assert same_bits(loaded[name], expected.astype(np.float32)), name


@pytest.mark.parametrize("case", MLX_CASES, ids=case_id)
def test_mlx_checkpoint_matches_dequantized_reference(case):
    model_dir = mlx_checkpoint(*case)
    with open_checkpoint(model_dir) as ckpt:
        assert_matches_reference(ckpt, dequantized_reference(model_dir))
        quantized = [n for n in ckpt.names() if ckpt.is_quantized(n)]
        assert bool(quantized) == (case[2] != "none")
        for name in quantized:  # scale pair as mlx_lm wrote it: the source dtype
            assert ckpt.stored_dtype(name) == PAIR_TAG[case[1]]


@pytest.mark.parametrize("case", MLX_CASES, ids=case_id)
def test_names_shapes_and_quantization_match_mlx_lm_load_model(case):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model_dir = mlx_checkpoint(*case)
    model, _ = load_model(model_dir)
    params = dict(tree_flatten(model.parameters()))
    modules = dict(model.named_modules())
    with open_checkpoint(model_dir) as ckpt:
        assert set(ckpt.names()) == {n for n in params if not n.endswith((".scales", ".biases"))}
        for name in ckpt.names():
            module = modules[name.rsplit(".", 1)[0]]
            if not ckpt.is_quantized(name):
                assert ckpt.shape(name) == tuple(params[name].shape), name
                continue
            spec = ckpt.quant_spec(name)
            assert (spec.bits, spec.group_size, spec.mode) == (module.bits, module.group_size, module.mode), name
            packed = params[name].shape  # [..., out, in * bits / 32]
            assert ckpt.shape(name) == (*packed[:-1], packed[-1] * 32 // module.bits), name


def test_moe_experts_are_rank3_and_mixed_bits_are_really_mixed():
    with open_checkpoint(mlx_checkpoint("qwen3_moe", "bfloat16", "q4")) as ckpt:
        experts = [n for n in ckpt.names() if ".switch_mlp." in n]
        assert experts and all(ckpt.is_quantized(n) and len(ckpt.shape(n)) == 3 for n in experts)
        assert ckpt.config.num_experts == ckpt.shape(experts[0])[0] == 4
    with open_checkpoint(mlx_checkpoint("qwen3", "bfloat16", "mixed_3_6")) as ckpt:
        assert {ckpt.quant_spec(n).bits for n in ckpt.names() if ckpt.is_quantized(n)} == {3, 6}
    with open_checkpoint(mlx_checkpoint("llama", "float16", "q4")) as ckpt:  # untied: both ends quantized
        assert ckpt.is_quantized("model.embed_tokens.weight") and ckpt.is_quantized("lm_head.weight")


@pytest.mark.parametrize("case", [("qwen3_moe", "bfloat16", "q4"), ("gemma3_text", "float16", "q2"),
                                  ("llama", "float16", "q4")], ids=case_id)
def test_f16_and_single_tensor_loads_are_the_f32_result_rounded_once(case):
    model_dir = mlx_checkpoint(*case)
    reference = dequantized_reference(model_dir)
    with open_checkpoint(model_dir) as ckpt:
        halves = ckpt.load_all(np.float16)
        for name, expected in reference.items():
            assert same_bits(halves[name], expected.astype(np.float16)), name
            assert same_bits(ckpt.load(name, np.float16), halves[name]), name
        subset = ckpt.names()[:3]
        assert list(ckpt.load_all(np.float32, names=subset)) == subset


@pytest.mark.parametrize("case", HF_CASES, ids=case_id)
def test_unquantized_hf_checkpoint_matches_mx_load(case):
    model_dir = hf_checkpoint(*case)
    reference = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        reference.update({n: np.array(a.astype(mx.float32)) for n, a in mx.load(str(path)).items()})
    with open_checkpoint(model_dir) as ckpt:
        assert ckpt.config.quantization is None
        assert not any(ckpt.is_quantized(n) for n in ckpt.names())
        assert {ckpt.stored_dtype(n) for n in ckpt.names()} == {PAIR_TAG[case[1]]}
        assert_matches_reference(ckpt, reference)


def split_into_shards(source_dir, out_dir):
    """Rewrite a one-file MLX checkpoint as two shards plus model.safetensors.index.json.

    Tensors alternate between shards in name order, so a quantized weight lands in one shard
    and its .scales/.biases in the other."""
    (source,) = source_dir.glob("*.safetensors")
    tensors = mx.load(str(source))
    names = sorted(tensors)
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {name: shard_names[i % 2] for i, name in enumerate(names)}
    out_dir.mkdir()
    for shard in shard_names:
        mx.save_safetensors(str(out_dir / shard), {n: tensors[n] for n in names if weight_map[n] == shard},
                            metadata={"format": "mlx"})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(source_dir / "config.json", out_dir / "config.json")
    return weight_map


@pytest.mark.parametrize("case", [("qwen3_moe", "bfloat16", "q4"), ("stablelm", "float16", "mixed_2_6")], ids=case_id)
def test_sharded_checkpoint_with_index(case, tmp_path):
    source_dir = mlx_checkpoint(*case)
    weight_map = split_into_shards(source_dir, tmp_path / "sharded")

    with open_checkpoint(tmp_path / "sharded") as ckpt:
        split = [n for n in ckpt.names() if len(set(ckpt.stored_files(n))) == 2]
        assert split and all(ckpt.is_quantized(n) for n in split)  # packed words apart from scales
        assert set(weight_map.values()) == {p.name for n in ckpt.names() for p in map(Path, ckpt.stored_files(n))}
        assert_matches_reference(ckpt, dequantized_reference(source_dir))
        with open_checkpoint(source_dir) as single:
            sharded_f16, single_f16 = ckpt.load_all(np.float16), single.load_all(np.float16)
            assert all(same_bits(sharded_f16[n], single_f16[n]) for n in single.names())
