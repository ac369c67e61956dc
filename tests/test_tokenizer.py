"""iree_runner.tokenizer against transformers' AutoTokenizer (the oracle) on tokenizer
directories that imitate real checkpoints, built from BPEs trained here on the stdlib's
pydoc_data/topics.py text:

- llama3: byte-level BPE, BOS from a TemplateProcessing post_processor, eos <|eot_id|>,
  template that writes bos_token itself, saved with PreTrainedTokenizerFast.save_pretrained
  (chat_template.jinja), clean_up_tokenization_spaces true as in Meta's files.
- qwen3 / qwen2: Qwen2Tokenizer pipeline (NFC, split regex, byte level), no BOS, ChatML template
  inside tokenizer_config.json, eos list in generation_config.json. qwen2 declares
  PreTrainedTokenizerFast, which transformers overrides with Qwen2Tokenizer for that model type.
- gemma: SentencePiece-style byte-fallback BPE, add_bos_token true, <bos> post_processor,
  <start_of_turn> template with raise_exception, model-specific *_token keys.
- llama2: SentencePiece-style BPE with the legacy Prepend normalizer, tokenizer_class
  LlamaTokenizer (transformers rebuilds it with a Metaspace pre-tokenizer), add_bos_token and
  add_eos_token true, TinyLlama-style template with eos_token inside the text.
- llama2_nopost: as llama2 but tokenizer.json has no post_processor.
- llama2_legacy: as llama2 with legacy true (a '▁' is prepended after special tokens too).
"""

import json
import os
import random
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jinja2
import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer

from iree_runner.tokenizer import StreamingDetokenizer, Tokenizer, find_stop, stop_holdback

from transformers import AutoTokenizer, PreTrainedTokenizerFast  # the oracle; never skipped

PROMPTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3.14 o'clock , isn't it ?",
    "  leading and trailing spaces  ",
    "",
    " ",
    "\n\n\t  \n",
    "naïve café — déjà vu, e\u0301 combining",
    "日本語のテキストと中文",
    "emoji 🤖🚀 and a family 👩\u200d👩\u200d👧 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "special tokens in text: <|im_end|> <s> </s> <bos> <|eot_id|> <start_of_turn>",
    "Ünïcödé\u00a0nbsp\u2028line sep",
]

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 👋  "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "naïve\nmulti-line\n"},
    ],
]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}\n"
    "        {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {{ message['content'] | trim }}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# Exercises the environment's extras: tojson without HTML escaping, namespace, loop controls,
# dict(), {% generation %}, strftime_now and the special-token variables.
FEATURES_TEMPLATE = (
    "{%- set ns = namespace(count=0) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message.role == 'system' %}{% continue %}{% endif -%}\n"
    "{%- set ns.count = ns.count + 1 -%}\n"
    "[{{ ns.count }}] {{ message | tojson }}\n"
    "{%- if message.role == 'assistant' %}{% generation %}<{{ message.content }}>{% endgeneration %}{% endif %}\n"
    "{%- if ns.count > 5 %}{% break %}{% endif %}\n"
    "{% endfor -%}\n"
    "{{ dict(a=1, b='<&>') | tojson(indent=2) }}\n"
    "year={{ strftime_now('%Y') }} eos={{ eos_token }} pad={{ pad_token | default('none') }}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)


# ---------------------------------------------------------------------------------------------
# Building the tokenizer directories


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return list(topics.values())


def _train_byte_level() -> tuple[dict, list]:
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], model["merges"]


def _train_sentencepiece_style(specials: list[str]) -> tuple[dict, list]:
    """Byte-fallback BPE over '▁'-joined words: specials, then <0x00>..<0xFF>, then pieces."""
    tok = RawTokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, limit_alphabet=120, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for piece in specials + [f"<0x{b:02X}>" for b in range(256)]:
        vocab[piece] = len(vocab)
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    return vocab, model["merges"]


def _byte_level_tokenizer(vocab, merges, *, qwen_style: bool) -> RawTokenizer:
    tok = RawTokenizer(models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], fuse_unk=False))
    if qwen_style:
        tok.normalizer = normalizers.NFC()
        pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    else:
        pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _added_tokens_decoder(tok: RawTokenizer) -> dict:
    return {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }


def build_llama3(d: Path, vocab, merges) -> None:
    tok = _byte_level_tokenizer(vocab, merges, qwen_style=False)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos)],
        ),
    ])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        chat_template=LLAMA3_TEMPLATE, clean_up_tokenization_spaces=True, model_max_length=131072,
    )
    hf.save_pretrained(d)
    end, eot = tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")
    _write_json(d / "config.json", {"model_type": "llama", "bos_token_id": bos, "eos_token_id": end})
    _write_json(d / "generation_config.json", {"bos_token_id": bos, "eos_token_id": [end, eot], "do_sample": True})


def build_qwen(d: Path, vocab, merges, model_type: str, tokenizer_class: str) -> None:
    tok = _byte_level_tokenizer(vocab, merges, qwen_style=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    # Laid out like Qwen2.5's tokenizer_config.json (saved by transformers 4.x).
    _write_json(d / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None, "chat_template": QWEN_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": tokenizer_class, "unk_token": None,
    })
    end, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    _write_json(d / "config.json", {"model_type": model_type, "eos_token_id": end})
    _write_json(d / "generation_config.json", {"bos_token_id": end, "eos_token_id": [im_end, end], "pad_token_id": end})


def build_gemma(d: Path) -> None:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    vocab, merges = _train_sentencepiece_style(specials)
    tok = RawTokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>",
                                  fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B:1", special_tokens=[("<bos>", bos)]
    )
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    _write_json(d / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "boi_token": "<start_of_turn>",  # a model-specific *_token key, like Gemma 3's
        "chat_template": GEMMA_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656, "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer", "use_default_system_prompt": False,
    })
    _write_json(d / "config.json", {"model_type": "gemma3_text", "eos_token_id": [1, 6], "bos_token_id": 2})
    _write_json(d / "generation_config.json", {"bos_token_id": 2, "eos_token_id": [1, 6], "pad_token_id": 0})


def build_llama2(d: Path, with_post_processor: bool, legacy: bool = False) -> None:
    specials = ["<unk>", "<s>", "</s>"]
    vocab, merges = _train_sentencepiece_style(specials)
    tok = RawTokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>",
                                  fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if with_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
        )
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    _write_json(d / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": True,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "chat_template": TINYLLAMA_TEMPLATE, "clean_up_tokenization_spaces": False, "legacy": legacy,
        "model_max_length": 2048, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False,
    })
    _write_json(d / "config.json", {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2})


KINDS = ["llama3", "qwen3", "qwen2", "gemma", "llama2", "llama2_nopost", "llama2_legacy"]


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    vocab, merges = _train_byte_level()
    dirs = {kind: root / kind for kind in KINDS}
    build_llama3(dirs["llama3"], vocab, merges)
    build_qwen(dirs["qwen3"], vocab, merges, "qwen3", "Qwen2Tokenizer")
    build_qwen(dirs["qwen2"], vocab, merges, "qwen2", "PreTrainedTokenizerFast")
    build_gemma(dirs["gemma"])
    build_llama2(dirs["llama2"], with_post_processor=True)
    build_llama2(dirs["llama2_nopost"], with_post_processor=False)
    build_llama2(dirs["llama2_legacy"], with_post_processor=True, legacy=True)
    return dirs


@pytest.fixture(scope="session")
def loaded(tokenizer_dirs):
    """kind -> (ours, HF's AutoTokenizer)."""
    return {
        kind: (Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d)))
        for kind, d in tokenizer_dirs.items()
    }


@pytest.fixture(params=KINDS)
def pair(request, loaded):
    return (request.param, *loaded[request.param])


# ---------------------------------------------------------------------------------------------
# Setup sanity: the fixtures look like what they imitate


def test_fixtures_load_as_the_classes_they_imitate(loaded):
    expected = {
        "llama3": "TokenizersBackend", "qwen3": "Qwen2Tokenizer", "qwen2": "Qwen2Tokenizer",
        "gemma": "GemmaTokenizer", "llama2": "LlamaTokenizer", "llama2_nopost": "LlamaTokenizer",
        "llama2_legacy": "LlamaTokenizer",
    }
    for kind, (_, hf) in loaded.items():
        assert type(hf).__name__ == expected[kind], kind
    assert all(ours.vocab_size <= 1024 for ours, _ in loaded.values())


# ---------------------------------------------------------------------------------------------
# Encoding


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_matches_hf(pair, prompt):
    kind, ours, hf = pair
    assert ours.encode(prompt) == hf(prompt).input_ids, (kind, prompt)
    assert ours.encode(prompt, add_special_tokens=False) == hf(prompt, add_special_tokens=False).input_ids


def test_bos_eos_as_hf_decides(loaded):
    """transformers 5.24 takes BOS/EOS from tokenizer.json's post_processor only: add_bos_token /
    add_eos_token in tokenizer_config.json are dropped when tokenizer.json exists."""
    for kind, (ours, hf) in loaded.items():
        ids = hf("hello").input_ids
        assert ours.encode("hello") == ids
        has_bos = hf.bos_token_id is not None and ids[0] == hf.bos_token_id
        assert has_bos == (kind in ("llama3", "gemma", "llama2", "llama2_legacy")), kind
        assert ids.count(hf.bos_token_id) == int(has_bos), kind
        assert ids[-1] != hf.eos_token_id, kind  # add_eos_token: true in llama2's config is ignored


def test_encode_long_text_matches_hf(loaded):
    from pydoc_data.topics import topics

    text = topics["assert"] + "\n🤖 ünïcode 日本\n" + topics["lambda"]
    for kind, (ours, hf) in loaded.items():
        assert ours.encode(text) == hf(text).input_ids, kind


# ---------------------------------------------------------------------------------------------
# Chat templates


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(pair, messages, add_generation_prompt):
    kind, ours, hf = pair
    assert ours.has_chat_template
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("prompt", ["What is 2+2?", "", " spaced  ", "emoji 🤖 and </s> <|im_end|> in text"])
def test_encode_prompt_chat_matches_hf_tokenized_template(pair, prompt):
    kind, ours, hf = pair
    expected = hf.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ours.encode_prompt(prompt, chat=True) == list(expected), kind
    if hf.bos_token_id is not None:
        assert list(expected).count(hf.bos_token_id) <= 1  # the template's BOS is not doubled


def test_encode_prompt_plain_matches_hf(pair):
    kind, ours, hf = pair
    assert ours.encode_prompt("Tell me a story.", chat=False) == hf("Tell me a story.").input_ids


def test_chat_template_locations(tokenizer_dirs, tmp_path):
    """llama3 was saved by transformers 5.x (chat_template.jinja), qwen keeps it in
    tokenizer_config.json; chat_template.json is read when neither has one."""
    assert (tokenizer_dirs["llama3"] / "chat_template.jinja").is_file()
    assert "chat_template" in json.loads((tokenizer_dirs["qwen3"] / "tokenizer_config.json").read_text())

    moved = tmp_path / "qwen_template_json"
    shutil.copytree(tokenizer_dirs["qwen3"], moved)
    config = json.loads((moved / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    _write_json(moved / "tokenizer_config.json", config)
    _write_json(moved / "chat_template.json", {"chat_template": template})
    ours = Tokenizer.from_dir(moved)
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dirs["qwen3"]))
    for messages in MESSAGES:
        assert ours.apply_chat_template(messages) == hf.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )

    # No template anywhere: chat prompts fall back to plain encoding.
    (moved / "chat_template.json").unlink()
    bare = Tokenizer.from_dir(moved)
    assert not bare.has_chat_template
    assert bare.encode_prompt("hi", chat=True) == hf("hi").input_ids
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(MESSAGES[0])


def test_named_chat_templates_use_default(tokenizer_dirs, tmp_path):
    d = tmp_path / "named"
    shutil.copytree(tokenizer_dirs["llama3"], d)
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS {{ messages | length }}", encoding="utf-8")
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    assert isinstance(hf.chat_template, dict) and set(hf.chat_template) == {"default", "tool_use"}
    for messages in MESSAGES:
        assert ours.apply_chat_template(messages) == hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    (d / "chat_template.jinja").unlink()  # named templates only: no default to use
    ours = Tokenizer.from_dir(d)
    assert not ours.has_chat_template
    with pytest.raises(ValueError, match="no 'default'"):
        ours.apply_chat_template(MESSAGES[0])


def test_template_environment_features_match_hf(tokenizer_dirs, tmp_path):
    d = tmp_path / "features"
    shutil.copytree(tokenizer_dirs["qwen3"], d)
    (d / "chat_template.jinja").write_text(FEATURES_TEMPLATE, encoding="utf-8")
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    messages = MESSAGES[1] + [{"role": "assistant", "content": 'say "<b>&</b>" naïve', "tool_calls": None}]
    for gen in (True, False):
        expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    assert '"<b>&</b>"' in expected and "naïve" in expected  # tojson: no HTML escaping, no \\u


def test_raise_exception_in_template(loaded):
    ours, hf = loaded["gemma"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        ours.apply_chat_template(bad)


# ---------------------------------------------------------------------------------------------
# Decoding and streaming


def _random_id_sequences(vocab_size: int, seed: int, count: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_hf(pair, skip):
    kind, ours, hf = pair
    sequences = [hf(p).input_ids for p in PROMPTS] + _random_id_sequences(len(hf), seed=len(kind))
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (kind, ids)


def _stream(ours: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    detok = ours.detokenizer(skip_special_tokens=skip)
    assert isinstance(detok, StreamingDetokenizer)
    segments = []
    for i in ids:
        segment = detok.add_token(i)
        assert isinstance(segment, str)
        segments.append(segment)
    segments.append(detok.finalize())
    assert detok.text == "".join(segments)
    return segments


@pytest.mark.parametrize("skip", [True, False])
def test_streaming_concatenation_equals_decode(pair, skip):
    kind, ours, hf = pair
    sequences = [hf(p).input_ids for p in PROMPTS]
    sequences += [hf.apply_chat_template(m, tokenize=True, return_dict=False) for m in MESSAGES]
    sequences += _random_id_sequences(len(hf), seed=100 + len(kind))
    for ids in sequences:
        ids = list(ids)
        full = hf.decode(ids, skip_special_tokens=skip)
        segments = _stream(ours, ids, skip)
        assert "".join(segments) == full, (kind, ids)
        if "\ufffd" not in full:
            assert not any("\ufffd" in s for s in segments), (kind, ids, segments)


def test_streaming_holds_split_multibyte_characters(loaded):
    """Emoji and CJK are split over several byte tokens (byte-level BPE and byte fallback);
    no segment may carry half of one."""
    text = "ok 🤖🚀 日本 é!"
    for kind, (ours, hf) in loaded.items():
        ids = hf(text, add_special_tokens=False).input_ids
        pieces = [hf.decode([i]) for i in ids]
        assert any("\ufffd" in p for p in pieces), f"{kind}: no character was split; the test tests nothing"
        segments = _stream(ours, ids)
        assert "".join(segments) == hf.decode(ids, skip_special_tokens=True) == text
        assert all("\ufffd" not in s for s in segments), (kind, segments)
        assert "" in segments[:-1]  # something was held back


def test_streaming_after_skipped_special_keeps_space(loaded):
    """Llama-2's decoder strips one leading space per decode: a window starting at a skipped
    special token must not strip the space of the word after it."""
    ours, hf = loaded["llama2"]
    ids = hf("Hello", add_special_tokens=False).input_ids + [hf.eos_token_id]
    ids += hf(" world again", add_special_tokens=False).input_ids
    segments = _stream(ours, ids)
    assert "".join(segments) == hf.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# EOS ids and errors


def test_eos_ids_from_generation_config(tokenizer_dirs, loaded):
    for kind, d in tokenizer_dirs.items():
        ours, hf = loaded[kind]
        gen_file = d / "generation_config.json"
        source = json.loads(gen_file.read_text()) if gen_file.is_file() else json.loads((d / "config.json").read_text())
        listed = source["eos_token_id"]
        listed = {listed} if isinstance(listed, int) else set(listed)
        assert ours.eos_token_ids == frozenset(listed | {hf.eos_token_id}), kind
        assert hf.eos_token_id in listed  # these checkpoints list the tokenizer's eos too


def test_eos_int_in_generation_config_and_bad_value(tokenizer_dirs, tmp_path):
    d = tmp_path / "eos"
    shutil.copytree(tokenizer_dirs["qwen3"], d)
    _write_json(d / "generation_config.json", {"eos_token_id": 3})
    ours = Tokenizer.from_dir(d)
    assert ours.eos_token_ids == frozenset({3, ours.token_to_id("<|im_end|>")})
    _write_json(d / "generation_config.json", {"eos_token_id": "<|im_end|>"})
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id"):
        Tokenizer.from_dir(d)


def test_missing_tokenizer_json_is_a_clear_error(tokenizer_dirs, tmp_path):
    d = tmp_path / "no_tokenizer"
    shutil.copytree(tokenizer_dirs["qwen3"], d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(d)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        Tokenizer.from_dir(tmp_path / "does_not_exist")


def test_corrupt_files_are_clear_errors(tokenizer_dirs, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(tokenizer_dirs["qwen3"], d)
    (d / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizers file"):
        Tokenizer.from_dir(d)
    shutil.copy(tokenizer_dirs["qwen3"] / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: expected a JSON object"):
        Tokenizer.from_dir(d)


# ---------------------------------------------------------------------------------------------
# Stop strings


def test_find_stop():
    assert find_stop("hello world", ["o w", "xyz"]) == 4
    assert find_stop("abc</s>def<|im_end|>", ["<|im_end|>", "</s>"]) == 3
    assert find_stop("nothing here", ["stop"]) is None
    assert find_stop("", ["a"]) is None
    with pytest.raises(ValueError):
        find_stop("x", [""])


def test_stop_holdback():
    assert stop_holdback("hello <|im", ["<|im_end|>"]) == 4
    assert stop_holdback("hello <", ["<|im_end|>", "</s>"]) == 1
    assert stop_holdback("hello </", ["<|im_end|>", "</s>"]) == 2
    assert stop_holdback("hello", ["<|im_end|>"]) == 0
    assert stop_holdback("ab", ["abc", "b"]) == 2  # longest of the candidate prefixes
    assert stop_holdback("xx", ["x"]) == 0  # a complete stop string is find_stop's business


def test_streaming_with_stop_strings_never_shows_stop(loaded):
    """The runtime's loop: emit text minus the held-back tail; the stop string never appears."""
    ours, hf = loaded["qwen3"]
    ids = hf("Answer: 42 STOP and more", add_special_tokens=False).input_ids
    detok, shown, pending = ours.detokenizer(), "", ""
    for i in ids:
        pending += detok.add_token(i)
        at = find_stop(pending, ["STOP"])
        if at is not None:
            shown += pending[:at]
            break
        keep = stop_holdback(pending, ["STOP"])
        shown, pending = shown + pending[: len(pending) - keep], pending[len(pending) - keep :]
    assert shown == "Answer: 42 "


def test_runtime_modules_import_no_heavy_frameworks():
    import subprocess
    import sys

    code = (
        "import sys, iree_runner.tokenizer, iree_runner.sampling\n"
        "bad = [m for m in ('torch', 'transformers', 'jax', 'mlx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
