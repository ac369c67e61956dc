"""Sanity tests of the test-checkpoint factory (tests/checkpoints.py) against its oracles:
transformers (loading, config semantics), mlx_lm (loading converted checkpoints) and the
original HF weights."""

import json
import multiprocessing
import pathlib
import time

import numpy
import pytest

import checkpoints
from checkpoints import (
    FAMILIES,
    QUANTS,
    dequantized_reference,
    hf_checkpoint,
    mlx_checkpoint,
    safetensors_header,
    tokenizer_dir,
)

SAFETENSORS_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# Unit roundoff of the dtype scales/biases are stored in.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}
TINY_MOE_EXPERTS = checkpoints.TINY_CONFIGS["qwen3_moe"]["num_experts"]


def _token_ids(length: int, seed: int = 1) -> numpy.ndarray:
    return numpy.random.default_rng(seed).integers(0, checkpoints.TOKENIZER_VOCAB_SIZE, size=(2, length))


def _hf_logits(path: pathlib.Path, ids: numpy.ndarray) -> numpy.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _load_f32(path: pathlib.Path) -> dict[str, numpy.ndarray]:
    import mlx.core as mx

    tensors = {}
    for file in sorted(pathlib.Path(path).glob("*.safetensors")):
        for name, array in mx.load(str(file)).items():
            tensors[name] = numpy.array(array.astype(mx.float32))
    return tensors


def _hf_weights_in_mlx_names(family: str, dtype: str) -> dict[str, numpy.ndarray]:
    """Original HF weights, renamed/stacked the way mlx_lm stores them."""
    weights = _load_f32(hf_checkpoint(family, dtype, keys="v4"))
    if family == "qwen3_moe":
        experts = TINY_MOE_EXPERTS
        for name in [n for n in weights if ".mlp.experts.0." in n]:
            prefix, proj = name.split(".mlp.experts.0.")
            stacked = [weights.pop(f"{prefix}.mlp.experts.{e}.{proj}") for e in range(experts)]
            weights[f"{prefix}.mlp.switch_mlp.{proj}"] = numpy.stack(stacked)  # [E, out, in]
    return weights


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_has_512_tokens_and_is_deterministic(tmp_path):
    from tokenizers import Tokenizer

    cached = tokenizer_dir()
    assert (cached / "tokenizer.json").is_file() and (cached / "tokenizer_config.json").is_file()
    tokenizer = Tokenizer.from_file(str(cached / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 512
    for index, token in enumerate(checkpoints.SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index
    text = "def f(x):\n    return x + 1  # café"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text

    checkpoints._build_tokenizer(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (cached / "tokenizer.json").read_bytes()


# ----------------------------------------------------------------------------- HF checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_checkpoint_loads_in_fp32_with_clear_greedy_margins(family):
    path = hf_checkpoint(family)
    header = safetensors_header(path / "model.safetensors")
    assert {meta["dtype"] for meta in header.values()} == {"F16"}
    assert ("lm_head.weight" in header) == (not checkpoints.TIED_BY_DEFAULT[family])

    ids = _token_ids(40)
    logits = _hf_logits(path, ids)
    assert logits.shape == (2, 40, 512)
    assert numpy.isfinite(logits).all()
    top2 = numpy.sort(logits, axis=-1)[..., -2:]
    margins = (top2[..., 1] - top2[..., 0]).ravel()
    # fp32 noise on these logits is ~1e-5; random init must not make greedy a coin toss.
    assert numpy.percentile(margins, 10) > 0.02, margins
    assert numpy.median(margins) > 0.2, margins
    # Not a degenerate model that echoes its input or always says the same token.
    greedy = logits.argmax(-1)
    assert (greedy == ids).mean() < 0.2
    assert len(numpy.unique(greedy)) > 20


@pytest.mark.parametrize("family", FAMILIES)
def test_v4_and_v5_configs_spell_rope_differently_but_mean_the_same(family):
    v5_dir, v4_dir = hf_checkpoint(family, keys="v5"), hf_checkpoint(family, keys="v4")
    v5 = json.loads((v5_dir / "config.json").read_text())
    v4 = json.loads((v4_dir / "config.json").read_text())

    assert "rope_parameters" in v5 and "rope_theta" not in v5
    assert "rope_parameters" not in v4 and "rope_theta" in v4 and "rope_scaling" in v4
    assert v5["dtype"] == "float16" and v4["torch_dtype"] == "float16" and "dtype" not in v4
    if family == "qwen3_moe":
        assert v5["num_local_experts"] == 4 and "num_experts" not in v5
        assert v4["num_experts"] == 4 and "num_local_experts" not in v4
    if family == "stablelm":
        assert v5["rope_parameters"]["partial_rotary_factor"] == 0.25
        assert v4["partial_rotary_factor"] == 0.25 and v4["rope_scaling"] is None
    if family == "llama":
        assert v4["rope_theta"] == 500000.0
        assert v4["rope_scaling"] == {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    if family == "gemma3_text":
        assert set(v5["rope_parameters"]) == {"sliding_attention", "full_attention"}
        assert v4["rope_theta"] == 1e6 and v4["rope_local_base_freq"] == 1e4
        assert v4["sliding_window_pattern"] == 6 and "layer_types" not in v4

    # Same weights; transformers 5 must read both spellings into the same model.
    assert _load_f32(v4_dir).keys() == _load_f32(v5_dir).keys()
    ids = _token_ids(24)
    numpy.testing.assert_array_equal(_hf_logits(v4_dir, ids), _hf_logits(v5_dir, ids))


def test_family_specifics_are_exercised():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(hf_checkpoint("llama"), dtype=torch.float32)
    inv_freq = llama.model.rotary_emb.inv_freq.numpy()
    default = 1.0 / 500000.0 ** (numpy.arange(0, 32, 2) / 32)
    changed = ~numpy.isclose(inv_freq, default, rtol=1e-5)
    assert changed.any() and not changed.all(), "llama3 rope scaling must change some frequencies"

    qwen2 = AutoModelForCausalLM.from_pretrained(hf_checkpoint("qwen2"), dtype=torch.float32)
    assert qwen2.config.tie_word_embeddings
    assert qwen2.model.layers[0].self_attn.q_proj.bias.abs().max() > 0.05

    gemma = AutoConfig.from_pretrained(hf_checkpoint("gemma3_text"))
    assert {"sliding_attention", "full_attention"} <= set(gemma.layer_types)
    assert gemma.query_pre_attn_scalar != gemma.head_dim
    assert gemma.hidden_activation == "gelu_pytorch_tanh" and not gemma.tie_word_embeddings
    gemma_v4 = AutoConfig.from_pretrained(hf_checkpoint("gemma3_text", keys="v4"))
    assert gemma_v4.layer_types == gemma.layer_types

    stablelm = AutoModelForCausalLM.from_pretrained(hf_checkpoint("stablelm"), dtype=torch.float32)
    assert stablelm.model.layers[0].self_attn.k_proj.bias.abs().max() > 0.05
    assert isinstance(stablelm.model.layers[0].input_layernorm, torch.nn.LayerNorm)

    moe = AutoConfig.from_pretrained(hf_checkpoint("qwen3_moe", keys="v4"))
    assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob) == (4, 2, True)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_chat_template_renders_in_both_key_styles(family):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "hello"}]
    rendered = {
        keys: AutoTokenizer.from_pretrained(hf_checkpoint(family, keys=keys)).apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        for keys in ("v4", "v5")
    }
    assert rendered["v4"] == rendered["v5"]
    assert "hello" in rendered["v5"]
    assert (hf_checkpoint(family, keys="v5") / "chat_template.jinja").is_file()
    v4_tokenizer_config = hf_checkpoint(family, keys="v4") / "tokenizer_config.json"
    assert "chat_template" in json.loads(v4_tokenizer_config.read_text())


def test_seed_dtype_and_tied_change_the_checkpoint():
    base = hf_checkpoint("llama")
    assert hf_checkpoint("llama", seed=1) != base
    assert hf_checkpoint("llama", "bfloat16") != base
    tied = hf_checkpoint("llama", tied=True)
    assert "lm_head.weight" not in safetensors_header(tied / "model.safetensors")
    a, b = _load_f32(base), _load_f32(hf_checkpoint("llama", seed=1))
    assert not numpy.array_equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------- MLX checkpoints


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_q4_scales_and_biases_keep_the_source_dtype(family, dtype):
    path = mlx_checkpoint(family, dtype, "q4")
    header = {}
    for file in path.glob("*.safetensors"):
        header.update(safetensors_header(file))
    scales = [n for n in header if n.endswith(".scales")]
    assert scales, "q4 checkpoint has no quantized tensors"
    for name in scales:
        module = name[: -len(".scales")]
        assert header[name]["dtype"] == SAFETENSORS_DTYPE[dtype], name
        assert header[f"{module}.biases"]["dtype"] == SAFETENSORS_DTYPE[dtype], name
        assert header[f"{module}.weight"]["dtype"] == "U32", name


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dequantized_reference_agrees_with_mlx_lm_and_the_hf_weights(family, quant, dtype):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    path = mlx_checkpoint(family, dtype, quant)
    reference = dequantized_reference(path)
    model, _ = load_model(path)  # mlx_lm's own loader, strict
    params = dict(tree_flatten(model.parameters()))
    modules = dict(model.named_modules())
    assert set(reference) == {n for n in params if not n.endswith((".scales", ".biases"))}
    assert all(value.dtype == numpy.float32 for value in reference.values())

    hf = _hf_weights_in_mlx_names(family, dtype)
    assert set(reference) == set(hf)
    u = UNIT_ROUNDOFF[dtype]
    quantized = 0
    for name, ref in reference.items():
        module_path, leaf = name.rsplit(".", 1)
        if f"{module_path}.scales" not in params or leaf != "weight":
            # Unquantized: exactly mlx_lm's tensor, and exactly the HF original.
            numpy.testing.assert_array_equal(ref, numpy.array(params[name].astype(mx.float32)), err_msg=name)
            numpy.testing.assert_array_equal(ref, hf[name], err_msg=name)
            continue
        quantized += 1
        module = modules[module_path]
        packed = params[name]
        scales, biases = params[f"{module_path}.scales"], params[f"{module_path}.biases"]
        bits, group_size = module.bits, module.group_size
        # Exact: same packed words and the module's own bits/group_size, dequantized in f32.
        exact = mx.dequantize(
            packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits
        )
        numpy.testing.assert_array_equal(ref, numpy.array(exact), err_msg=name)
        # mlx_lm's native dequantize in the model dtype: equal up to rounding of s*q + b.
        # (module.group_size is None in mixed-recipe switch layers: mlx falls back to 64.)
        group = packed.shape[-1] * 32 // bits // scales.shape[-1]
        s = numpy.repeat(numpy.array(scales.astype(mx.float32)), group, axis=-1)
        b = numpy.repeat(numpy.array(biases.astype(mx.float32)), group, axis=-1)
        native = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
        native = numpy.array(native.astype(mx.float32))
        rounding = u * (2 * numpy.abs(ref) + numpy.abs(b)) + 1e-30
        numpy.testing.assert_array_less(numpy.abs(native - ref), rounding, err_msg=name)
        # And it is the original weight up to quantization. MLX's affine quantizer pins the
        # bias to the group's largest-magnitude extreme and rescales so that q0 is an
        # integer, which can leave the opposite extreme up to one step short (clipped):
        # at most one step, plus the error of storing the scale in the model dtype.
        q_max = 2**bits - 1
        bound = numpy.abs(s) * (1.0 + (q_max + 1) * u) + u * numpy.abs(b) + 1e-6
        numpy.testing.assert_array_less(numpy.abs(ref - hf[name]), bound, err_msg=name)
    assert (quantized > 0) == (quant != "none")


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_lm_reads_the_v4_config_like_transformers(family):
    """mlx_lm (a 4.x-key reader) and transformers 5 must build the same model from our
    checkpoints: same weights in f32, logits equal up to f32 noise. Sequences are longer
    than gemma3's sliding window."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    model, _ = load_model(mlx_checkpoint(family, "float16", "none"))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    ids = _token_ids(24)
    mlx_logits = numpy.array(model(mx.array(ids)))
    hf_logits = _hf_logits(hf_checkpoint(family, "float16", keys="v4"), ids)
    # gemma3: mlx_lm rounds the sqrt(hidden) embedding scale to bf16 (~1e-4 relative).
    atol = 5e-3 if family == "gemma3_text" else 1e-3
    numpy.testing.assert_allclose(mlx_logits, hf_logits, rtol=0, atol=atol)


def test_mixed_recipes_use_two_bit_widths():
    config = json.loads((mlx_checkpoint("llama", "bfloat16", "mixed_3_6") / "config.json").read_text())
    bits = {checkpoints.quantization_params(config, m)["bits"] for m in config["quantization"] if "." in m}
    assert bits == {3, 6}
    low = checkpoints.quantization_params(config, "model.layers.0.self_attn.q_proj")
    assert low == {"bits": 3, "group_size": 64, "mode": "affine"}


def test_mlx_checkpoint_of_v5_config_that_mlx_lm_cannot_read_fails_loudly():
    with pytest.raises(RuntimeError, match="stablelm.*keys=v5.*rope_theta"):
        mlx_checkpoint("stablelm", "float16", "q4", keys="v5")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="family='mistral'"):
        hf_checkpoint("mistral")
    with pytest.raises(ValueError, match="quant='q7'"):
        mlx_checkpoint("llama", quant="q7")
    with pytest.raises(ValueError, match="dtype='float64'"):
        hf_checkpoint("llama", "float64")


# ----------------------------------------------------------------------------- cache


def test_cache_returns_the_same_path_instantly():
    first_hf, first_mlx = hf_checkpoint("qwen3"), mlx_checkpoint("qwen3", "bfloat16", "q4")
    start = time.perf_counter()
    again_hf, again_mlx = hf_checkpoint("qwen3"), mlx_checkpoint("qwen3", "bfloat16", "q4")
    assert time.perf_counter() - start < 0.05
    assert (again_hf, again_mlx) == (first_hf, first_mlx)
    assert first_hf.parent == checkpoints.cache_root() and first_hf.name.startswith("hf-qwen3-float16-v5-s0-")


def _slow_build(out: pathlib.Path, log: pathlib.Path) -> None:
    with open(log, "a") as handle:
        handle.write("built\n")
    out.mkdir()
    (out / "part1").write_text("1")
    time.sleep(0.5)
    (out / "part2").write_text("2")


def _race(root: str, log: str, queue) -> None:
    import os

    os.environ["IREE_RUNNER_TEST_CACHE"] = root
    path = checkpoints._materialize("race", {"n": 1}, lambda out: _slow_build(out, pathlib.Path(log)))
    queue.put(str(path))


def test_two_processes_building_at_once_share_one_build(tmp_path, monkeypatch):
    log = tmp_path / "log"
    context = multiprocessing.get_context("spawn")  # no fork of a process running torch/mlx threads
    queue = context.Queue()
    args = (str(tmp_path / "cache"), str(log), queue)
    workers = [context.Process(target=_race, args=args) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    paths = {queue.get(timeout=5), queue.get(timeout=5)}
    assert len(paths) == 1
    final = pathlib.Path(paths.pop())
    assert sorted(p.name for p in final.iterdir()) == ["part1", "part2"]
    assert log.read_text() == "built\n"
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")] == []


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("IREE_RUNNER_TEST_CACHE", str(tmp_path))

    def broken(out):
        out.mkdir()
        (out / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoints._materialize("broken", {"n": 2}, broken)
    assert [p.name for p in tmp_path.iterdir() if p.name != ".locks"] == []
    built = checkpoints._materialize("broken", {"n": 2}, lambda out: out.mkdir())
    assert built.is_dir() and built.name.startswith("broken-")
