"""Test-checkpoint factory: tiny random-init checkpoints exactly as users get them.

HF checkpoints come from transformers' own classes and `save_pretrained`; MLX checkpoints
come from the real `mlx_lm convert` applied to those. Everything is cached under
`cache_root()` by a hash of the recipe and of the library versions, so a second call is a
directory lookup.

    from checkpoints import hf_checkpoint, mlx_checkpoint, dequantized_reference

`python tests/checkpoints.py` builds every checkpoint (CI warm-up) and prints the time.

Heavy imports (torch, transformers, mlx, mlx_lm) happen inside the functions that need
them, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import struct
import tempfile
import time
from typing import Callable

import numpy

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "stablelm")
QUANTS = ("none", "q4", "q8", "q4g32", "mixed_3_6", "mixed_2_6", "q3", "q5", "q6", "q2")
DTYPES = ("float16", "bfloat16", "float32")
KEY_STYLES = ("v4", "v5")

# Bump when a change here alters what gets written, so stale caches are not reused.
FACTORY_REVISION = 1

# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

TOKENIZER_VOCAB_SIZE = 512
# Fixed ids 0.. in this order; every family picks its bos/eos/pad and chat markers from here.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<pad>",
    "<bos>",
    "<eos>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
)


def _token_id(token: str) -> int:
    return SPECIAL_TOKENS.index(token)


def _corpus_path() -> pathlib.Path:
    # Ships with every CPython: a deterministic ~750 KB of English and code.
    import pydoc_data.topics

    return pathlib.Path(pydoc_data.topics.__file__)


@functools.lru_cache(maxsize=None)
def _file_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tokenizer_recipe() -> dict:
    return {
        "kind": "bytelevel-bpe",
        "vocab_size": TOKENIZER_VOCAB_SIZE,
        "special_tokens": list(SPECIAL_TOKENS),
        "corpus_sha256": _file_sha256(_corpus_path()),
    }


def tokenizer_dir() -> pathlib.Path:
    """Byte-level BPE tokenizer (vocab 512) saved as tokenizer.json + tokenizer_config.json."""
    return _materialize("tokenizer", _tokenizer_recipe(), _build_tokenizer)


def _build_tokenizer(out: pathlib.Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = _corpus_path().read_text(encoding="utf-8")
    chunks = [text[i : i + 4096] for i in range(0, len(text), 4096)]
    tokenizer.train_from_iterator(chunks, trainer=trainer)
    if tokenizer.get_vocab_size() != TOKENIZER_VOCAB_SIZE:
        raise RuntimeError(
            f"trained tokenizer has {tokenizer.get_vocab_size()} tokens, "
            f"expected {TOKENIZER_VOCAB_SIZE}"
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(out)


# ---------------------------------------------------------------------------------------
# Tiny model configs (transformers 5.x spelling: rope_parameters, num_experts kwarg)
# ---------------------------------------------------------------------------------------

# hidden 128 / intermediate 256 / heads*head_dim 128 / moe_intermediate 128: every input
# dimension divides by 32, 64 and 128, so all those group sizes quantize every Linear.
_COMMON = dict(
    vocab_size=TOKENIZER_VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)

# Gemma3 global layer every 6th (what mlx_lm assumes: it ignores layer_types); the 7th
# layer is sliding again so "last layer is global" would be caught.
_GEMMA3_LAYER_TYPES = ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        _COMMON,
        head_dim=32,
        rms_norm_eps=1e-5,
        # original_max_position_embeddings 64 puts the wavelength band inside head_dim 32's
        # range, so llama3 scaling really changes frequencies.
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        bos_token_id=_token_id("<|begin_of_text|>"),
        eos_token_id=[_token_id("<|end_of_text|>"), _token_id("<|eot_id|>")],
    ),
    "qwen2": dict(
        _COMMON,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        bos_token_id=_token_id("<|endoftext|>"),
        eos_token_id=_token_id("<|im_end|>"),
    ),
    "qwen3": dict(
        _COMMON,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        bos_token_id=_token_id("<|endoftext|>"),
        eos_token_id=_token_id("<|im_end|>"),
    ),
    "qwen3_moe": dict(
        _COMMON,
        head_dim=32,
        rms_norm_eps=1e-6,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        moe_intermediate_size=128,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        bos_token_id=_token_id("<|endoftext|>"),
        eos_token_id=_token_id("<|im_end|>"),
    ),
    "gemma3_text": dict(
        _COMMON,
        num_hidden_layers=len(_GEMMA3_LAYER_TYPES),
        head_dim=32,
        rms_norm_eps=1e-6,
        # != head_dim, so a loader that scales by head_dim**-0.5 is caught.
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=_GEMMA3_LAYER_TYPES,
        rope_parameters=dict(
            sliding_attention=dict(rope_type="default", rope_theta=10000.0),
            full_attention=dict(rope_type="default", rope_theta=1000000.0),
        ),
        hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        bos_token_id=_token_id("<bos>"),
        eos_token_id=[_token_id("<eos>"), _token_id("<end_of_turn>")],
        pad_token_id=_token_id("<pad>"),
    ),
    "stablelm": dict(
        _COMMON,
        layer_norm_eps=1e-5,
        use_qkv_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
        bos_token_id=_token_id("<|endoftext|>"),
        eos_token_id=_token_id("<|im_end|>"),
    ),
}

_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM"),
}

TIED_BY_DEFAULT = {
    "llama": False,
    "qwen2": True,
    "qwen3": True,
    "qwen3_moe": False,
    "gemma3_text": False,  # tied + random init just echoes the input token
    "stablelm": False,
}

# Std of every >=2-D weight (embeddings, projections, experts, router). 0.5 gives logits
# of std ~6 and greedy top-2 margins of ~0.2 (10th percentile) to ~1.3 (median): far
# above fp32 noise, and greedy generation does not collapse to one token.
INIT_STD = {
    "llama": 0.5,
    "qwen2": 0.5,
    "qwen3": 0.5,
    "qwen3_moe": 0.5,
    "gemma3_text": 0.5,
    "stablelm": 0.5,
}
# A tied Gemma3 scales embeddings by sqrt(hidden) and post-norms every block, so a large
# embedding dominates the residual and the model echoes its input; shrink it.
GEMMA3_TIED_EMBED_STD = 0.05
NORM_JITTER_STD = 0.1  # norm weight = 1 + jitter (gemma3: stored w = jitter, used as 1 + w)
BIAS_STD = 0.1  # qkv / LayerNorm biases: small but large enough to matter

# ---------------------------------------------------------------------------------------
# Chat templates and tokenizer roles per family
# ---------------------------------------------------------------------------------------

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN3_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
_LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_GEMMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Tokenizer special-token roles, as the real families' tokenizer_config.json set them.
TOKENIZER_ROLES = {
    "llama": dict(
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None, chat_template=_LLAMA3_CHAT
    ),
    "qwen2": dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=_CHATML),
    "qwen3": dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=_QWEN3_CHAT),
    "qwen3_moe": dict(
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=_QWEN3_CHAT
    ),
    "gemma3_text": dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", chat_template=_GEMMA3_CHAT),
    "stablelm": dict(
        bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=_CHATML
    ),
}

# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def cache_root() -> pathlib.Path:
    """$IREE_RUNNER_TEST_CACHE if set, else <repo>/.cache/checkpoints."""
    override = os.environ.get("IREE_RUNNER_TEST_CACHE")
    if override:
        return pathlib.Path(override)
    return pathlib.Path(__file__).resolve().parent.parent / ".cache" / "checkpoints"


@functools.lru_cache(maxsize=None)
def _library_versions() -> dict:
    # Metadata only: reading versions must not import torch or mlx.
    names = ("transformers", "torch", "mlx", "mlx-lm", "tokenizers", "safetensors")
    return {name: importlib.metadata.version(name) for name in names}


def _digest(recipe: dict) -> str:
    key = {"recipe": recipe, "versions": _library_versions(), "revision": FACTORY_REVISION}
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
    # An flock dies with its process, so a killed build never blocks later ones.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _materialize(name: str, recipe: dict, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Return cache_root()/<name>-<hash>, building it once via `build(out_dir)`.

    Builds go to a private temp dir and are renamed into place, so readers only ever see
    complete artifacts; the lock keeps two processes from doing the same build twice.
    """
    root = cache_root()
    final = root / f"{name}-{_digest(recipe)}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / ".locks" / f"{final.name}.lock"):
        if final.is_dir():
            return final
        # Under the lock, any temp dir for this artifact is a leftover of a killed build.
        for stale in root.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        try:
            out = staging / "artifact"  # must not exist yet: mlx_lm convert insists
            build(out)
            try:
                os.rename(out, final)
            except OSError:
                if not final.is_dir():  # lost a race only if the winner's copy is there
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------
# HF checkpoints
# ---------------------------------------------------------------------------------------


def _check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not supported; expected one of {tuple(allowed)}")


def _hf_recipe(family: str, dtype: str, keys: str, seed: int, tied: bool) -> dict:
    embed_std = GEMMA3_TIED_EMBED_STD if (family == "gemma3_text" and tied) else INIT_STD[family]
    return {
        "kind": "hf",
        "family": family,
        "dtype": dtype,
        "keys": keys,
        "seed": seed,
        "tied": tied,
        "config": TINY_CONFIGS[family],
        "init": {
            "matrix_std": INIT_STD[family],
            "embed_std": embed_std,
            "norm_jitter_std": NORM_JITTER_STD,
            "bias_std": BIAS_STD,
        },
        "tokenizer": _tokenizer_recipe(),
        "tokenizer_roles": TOKENIZER_ROLES[family],
    }


def hf_checkpoint(
    family: str,
    dtype: str = "float16",
    *,
    keys: str = "v5",
    seed: int = 0,
    tied: bool | None = None,
) -> pathlib.Path:
    """Random-init HF model of `family` saved with save_pretrained, plus tokenizer files.

    keys="v5": config.json as transformers 5.x writes it; keys="v4": rewritten the way 4.x
    checkpoints on the hub look (rope_theta / rope_scaling / partial_rotary_factor /
    num_experts / torch_dtype at top level, no rope_parameters; chat template inline in
    tokenizer_config.json). tied=None means the family's default (TIED_BY_DEFAULT).
    """
    _check_choice("family", family, FAMILIES)
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("keys", keys, KEY_STYLES)
    if tied is None:
        tied = TIED_BY_DEFAULT[family]
    recipe = _hf_recipe(family, dtype, keys, seed, bool(tied))
    name = f"hf-{family}-{dtype}-{keys}-s{seed}" + ("-tied" if tied else "-untied")
    tok_dir = tokenizer_dir()
    return _materialize(name, recipe, lambda out: _build_hf(out, recipe, tok_dir))


def _build_hf(out: pathlib.Path, recipe: dict, tok_dir: pathlib.Path) -> None:
    import torch
    import transformers

    family = recipe["family"]
    config_name, model_name = _HF_CLASSES[family]
    config_kwargs = copy.deepcopy(recipe["config"])
    config = getattr(transformers, config_name)(tie_word_embeddings=recipe["tied"], **config_kwargs)
    torch.manual_seed(recipe["seed"])
    model = getattr(transformers, model_name)(config).eval()
    _randomize(model, family, recipe["init"], recipe["seed"])
    torch_dtype = getattr(torch, recipe["dtype"])
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.save_pretrained(out)
    _save_tokenizer(out, tok_dir, TOKENIZER_ROLES[family])
    _check_saved_weights(out, recipe)
    if recipe["keys"] == "v4":
        _rewrite_config_v4(out / "config.json")
        _rewrite_tokenizer_config_v4(out)


def _randomize(model, family: str, init: dict, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() lists a tied lm_head once (as the embedding).
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:  # w: [out, in] (experts: [E, out, in]); embed: [vocab, hidden]
                std = init["embed_std"] if "embed_tokens" in name else init["matrix_std"]
                value = std * noise
            elif "norm" in name and name.endswith(".weight"):
                jitter = init["norm_jitter_std"] * noise
                value = jitter if family == "gemma3_text" else 1.0 + jitter
            elif name.endswith(".bias"):
                value = init["bias_std"] * noise
            else:
                raise RuntimeError(f"{family}: no init rule for parameter {name} {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def _save_tokenizer(out: pathlib.Path, tok_dir: pathlib.Path, roles: dict) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"),
        bos_token=roles["bos_token"],
        eos_token=roles["eos_token"],
        pad_token=roles["pad_token"],
    )
    tokenizer.chat_template = roles["chat_template"]
    tokenizer.save_pretrained(out)


def _check_saved_weights(out: pathlib.Path, recipe: dict) -> None:
    want = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[recipe["dtype"]]
    for path in sorted(out.glob("*.safetensors")):
        for tensor, meta in safetensors_header(path).items():
            if meta["dtype"] != want:
                raise RuntimeError(f"{path}: tensor {tensor} saved as {meta['dtype']}, expected {want}")


def _rope_v4_fields(rope: dict) -> dict:
    """One 5.x rope_parameters dict -> 4.x top-level fields."""
    rope = dict(rope)
    fields = {"rope_theta": rope.pop("rope_theta")}
    if "partial_rotary_factor" in rope:
        fields["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    fields["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    return fields


def _rewrite_config_v4(config_path: pathlib.Path) -> None:
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    if config["model_type"] == "gemma3_text":
        # 4.x Gemma3: global theta + rope_local_base_freq + an int sliding_window_pattern.
        config.update(_rope_v4_fields(rope["full_attention"]))
        config["rope_local_base_freq"] = _rope_v4_fields(rope["sliding_attention"])["rope_theta"]
        layer_types = config.pop("layer_types")
        config.pop("_sliding_window_pattern", None)
        pattern = layer_types.index("full_attention") + 1
        expected = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(len(layer_types))
        ]
        if layer_types != expected:
            raise ValueError(f"{config_path}: layer_types {layer_types} is not a sliding_window_pattern")
        config["sliding_window_pattern"] = pattern
    else:
        config.update(_rope_v4_fields(rope))
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    config_path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")


def _rewrite_tokenizer_config_v4(out: pathlib.Path) -> None:
    # 4.x hub checkpoints carry the chat template inline and name a 4.x tokenizer class.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template_path = out / "chat_template.jinja"
    if template_path.exists():
        config["chat_template"] = template_path.read_text()
        template_path.unlink()
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# MLX checkpoints (the real mlx_lm convert)
# ---------------------------------------------------------------------------------------

# Arguments of mlx_lm.convert.convert(), mirroring the CLI flags:
#   q4 = `-q --q-bits 4 --q-group-size 64`, mixed_3_6 = `-q --quant-predicate mixed_3_6`.
# Group size 64 divides every input dimension of the tiny configs (all are 128 or 256).
QUANT_ARGS = {
    "none": dict(quantize=False),
    "q4": dict(quantize=True, q_bits=4, q_group_size=64),
    "q8": dict(quantize=True, q_bits=8, q_group_size=64),
    "q4g32": dict(quantize=True, q_bits=4, q_group_size=32),
    "mixed_3_6": dict(quantize=True, quant_predicate="mixed_3_6"),
    "mixed_2_6": dict(quantize=True, quant_predicate="mixed_2_6"),
    "q3": dict(quantize=True, q_bits=3, q_group_size=64),
    "q5": dict(quantize=True, q_bits=5, q_group_size=64),
    "q6": dict(quantize=True, q_bits=6, q_group_size=64),
    "q2": dict(quantize=True, q_bits=2, q_group_size=64),
}


def mlx_checkpoint(
    family: str,
    dtype: str = "float16",
    quant: str = "q4",
    *,
    keys: str = "v4",
    seed: int = 0,
) -> pathlib.Path:
    """`mlx_lm convert` applied to hf_checkpoint(family, dtype, keys=keys, seed=seed).

    quant "none" converts without -q but with --dtype `dtype`; quantized conversions pass
    no --dtype (the usual CLI call), and the scales/biases are asserted to come out in
    `dtype`. keys defaults to "v4" because mlx_lm 0.32.2 reads 4.x config keys only.
    """
    _check_choice("family", family, FAMILIES)
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("quant", quant, QUANTS)
    _check_choice("keys", keys, KEY_STYLES)
    source = hf_checkpoint(family, dtype, keys=keys, seed=seed)
    recipe = {
        "kind": "mlx",
        "source": _hf_recipe(family, dtype, keys, seed, TIED_BY_DEFAULT[family]),
        "quant": quant,
        "convert_args": QUANT_ARGS[quant],
    }
    name = f"mlx-{family}-{dtype}-{quant}-{keys}-s{seed}"
    return _materialize(name, recipe, lambda out: _build_mlx(out, source, dtype, quant, family, keys))


def _build_mlx(
    out: pathlib.Path, source: pathlib.Path, dtype: str, quant: str, family: str, keys: str
) -> None:
    from mlx_lm.convert import convert

    kwargs = dict(QUANT_ARGS[quant])
    if quant == "none":
        kwargs["dtype"] = dtype
    try:
        convert(hf_path=str(source), mlx_path=str(out), **kwargs)
    except Exception as error:
        hint = " (mlx_lm 0.32.2 reads 4.x config keys: use keys='v4')" if keys == "v5" else ""
        raise RuntimeError(
            f"mlx_lm convert failed for family={family} dtype={dtype} quant={quant} keys={keys} "
            f"(source {source}): {type(error).__name__}: {error}{hint}"
        ) from error
    _check_mlx_dtypes(out, dtype, quant)


def _check_mlx_dtypes(out: pathlib.Path, dtype: str, quant: str) -> None:
    """Scales, biases and float tensors must come out in the source model's dtype."""
    want = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[dtype]
    quantized = 0
    for path in sorted(out.glob("*.safetensors")):
        for tensor, meta in safetensors_header(path).items():
            if meta["dtype"] == "U32":
                quantized += 1
                continue
            if meta["dtype"] != want:
                raise RuntimeError(
                    f"{path}: tensor {tensor} is {meta['dtype']} after mlx_lm convert "
                    f"(quant={quant}), expected {want} like the {dtype} source"
                )
    if (quant != "none") != (quantized > 0):
        raise RuntimeError(f"{out}: quant={quant} but found {quantized} packed uint32 tensors")


# ---------------------------------------------------------------------------------------
# Oracle view of MLX checkpoints
# ---------------------------------------------------------------------------------------


def safetensors_header(path: pathlib.Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} straight from the file header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def quantization_params(config: dict, module: str) -> dict | None:
    """bits/group_size/mode for `module` from an MLX config.json, or None if unquantized."""
    quant = config.get("quantization", config.get("quantization_config"))
    if not quant:
        return None
    override = quant.get(module)
    if override is False:
        return None
    params = {
        "bits": quant.get("bits"),
        "group_size": quant.get("group_size"),
        "mode": quant.get("mode", "affine"),
    }
    if isinstance(override, dict):
        # mixed_* recipes write "group_size": null per module: it means the global one.
        params.update({k: v for k, v in override.items() if v is not None})
    return params


def dequantized_reference(ckpt_dir: pathlib.Path) -> dict[str, numpy.ndarray]:
    """Every tensor of an MLX checkpoint as float32 numpy; quantized ones dequantized.

    mx.dequantize runs on float32 scales/biases (the cast is exact), so the result is the
    f32 truth rather than a bf16/f16-rounded one. Keys drop .scales/.biases.
    """
    import mlx.core as mx

    ckpt_dir = pathlib.Path(ckpt_dir)
    config_path = ckpt_dir / "config.json"
    config = json.loads(config_path.read_text())
    arrays: dict[str, tuple[pathlib.Path, object]] = {}
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no *.safetensors files")
    for path in files:
        for name, array in mx.load(str(path)).items():
            arrays[name] = (path, array)

    result: dict[str, numpy.ndarray] = {}
    for name, (path, array) in arrays.items():
        if name.endswith((".scales", ".biases")):
            continue
        module, leaf = name.rsplit(".", 1)
        scales_entry = arrays.get(f"{module}.scales")
        if scales_entry is None or leaf != "weight":  # a quantized Linear's bias stays float
            result[name] = numpy.array(array.astype(mx.float32))
            continue
        result[name] = _dequantize(path, name, module, array, scales_entry[1], arrays, config, config_path)
    return result


def _dequantize(path, name, module, packed, scales, arrays, config, config_path) -> numpy.ndarray:
    import mlx.core as mx

    params = quantization_params(config, module)
    if params is None:
        raise ValueError(f"{path}: {name} has scales but {config_path} marks {module} unquantized")
    if params["mode"] != "affine":
        raise ValueError(f"{config_path}: {module} uses mode {params['mode']!r}, expected 'affine'")
    biases_entry = arrays.get(f"{module}.biases")
    if biases_entry is None:
        raise ValueError(f"{path}: {module}.biases missing for affine-quantized {name}")
    bits, group_size = params["bits"], params["group_size"]
    if packed.dtype != mx.uint32:
        raise ValueError(f"{path}: {name} is {packed.dtype}, expected packed uint32")
    # packed: [..., in*bits/32]; scales, biases: [..., in/group_size]
    in_features = scales.shape[-1] * group_size
    if packed.shape[-1] * 32 != in_features * bits:
        raise ValueError(
            f"{path}: {name} packed shape {packed.shape} does not fit bits={bits} "
            f"group_size={group_size} with scales {scales.shape} (config {config_path})"
        )
    weight = mx.dequantize(
        packed,
        scales.astype(mx.float32),
        biases_entry[1].astype(mx.float32),
        group_size=group_size,
        bits=bits,
    )
    return numpy.array(weight.astype(mx.float32))


# ---------------------------------------------------------------------------------------
# Build everything (CI warm-up): python tests/checkpoints.py
# ---------------------------------------------------------------------------------------


def all_recipes() -> list[tuple[Callable, tuple, dict]]:
    """Every checkpoint the test suites use by default: HF in all dtypes and key styles,
    MLX in every quant for f16 and bf16 sources."""
    recipes = []
    for family in FAMILIES:
        for dtype in DTYPES:
            for keys in KEY_STYLES:
                recipes.append((hf_checkpoint, (family, dtype), {"keys": keys}))
        for dtype in ("float16", "bfloat16"):
            for quant in QUANTS:
                recipes.append((mlx_checkpoint, (family, dtype, quant), {}))
    return recipes


def build_all(verbose: bool = True) -> float:
    start = time.perf_counter()
    for function, args, kwargs in all_recipes():
        t0 = time.perf_counter()
        path = function(*args, **kwargs)
        if verbose:
            print(f"{time.perf_counter() - t0:7.2f}s {path.name}", flush=True)
    elapsed = time.perf_counter() - start
    if verbose:
        print(f"built {len(all_recipes())} checkpoints in {elapsed:.1f}s under {cache_root()}")
    return elapsed


if __name__ == "__main__":
    build_all()
