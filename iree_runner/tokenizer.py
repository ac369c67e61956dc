"""Tokenizer, chat template and streaming detokenizer for the runtime.

Reads a checkpoint's tokenizer.json with `tokenizers` and renders its chat template with jinja2,
mirroring what transformers 5.24's `AutoTokenizer.from_pretrained(dir)` does with the same files,
so prompts encode to the same ids HF (and mlx_lm, which uses AutoTokenizer) would feed the model.

What transformers 5.24 does, and this module mirrors:
- tokenizer.json's post_processor alone decides BOS/EOS: `_from_pretrained` drops
  `add_bos_token`/`add_eos_token` from tokenizer_config.json whenever tokenizer.json exists.
- `tokenizer_class` LlamaTokenizer(Fast) on a non-byte-level tokenizer.json rebuilds the pipeline
  (Metaspace pre-tokenizer, no normalizer) instead of using the file's normalizer.
- The named special tokens of tokenizer_config.json (and its added_tokens_decoder) are re-added
  to the backend, which may change their flags (special, normalized, ...).
- decode is the backend's decode; `clean_up_tokenization_spaces` is ignored for BPE models.
Only numpy, tokenizers, jinja2 and the stdlib are imported here.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

__all__ = [
    "Tokenizer",
    "StreamingDetokenizer",
    "find_stop",
    "stop_holdback",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"
CHAT_TEMPLATE_JINJA_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
ADDITIONAL_CHAT_TEMPLATES_DIR = "additional_chat_templates"

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES
NAMED_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)

# Defaults the transformers classes fill in when tokenizer_config.json omits a key.
_CLASS_DEFAULT_TOKENS = {
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "GemmaTokenizer": {
        "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "mask_token": "<mask>",
    },
    "Qwen2Tokenizer": {
        "unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    },
}

# transformers' TOKENIZER_MAPPING_NAMES for the model types this runtime meets (llama has no
# entry), with mistral_common absent (mistral types -> TokenizersBackend).
_REGISTERED_CLASS_BY_MODEL_TYPE = {
    "qwen2": "Qwen2Tokenizer",
    "qwen2_moe": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
    "qwen3_moe": "Qwen2Tokenizer",
    "gemma": "GemmaTokenizer",
    "gemma2": "GemmaTokenizer",
    "gemma3": "GemmaTokenizer",
    "gemma3_text": "GemmaTokenizer",
    "stablelm": "TokenizersBackend",
    "mistral": "TokenizersBackend",
    "mixtral": "TokenizersBackend",
    "phi3": "TokenizersBackend",
}
_INCORRECT_HUB_CLASS_MODEL_TYPES = frozenset({"qwen2", "phi3"})
_BACKEND_CLASS_NAMES = frozenset({"TokenizersBackend", "PreTrainedTokenizer", "PreTrainedTokenizerFast", "PythonBackend"})


# ---------------------------------------------------------------------------------------------
# Files


def _read_json(path: Path, *, required: bool = False) -> Any:
    """Parsed JSON of `path`, or None when it is absent and not required."""
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: file not found")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _read_json_object(path: Path) -> dict:
    data = _read_json(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at top level, found {type(data).__name__}")
    return data


def _eos_ids_from(config: dict, path: Path) -> list[int] | None:
    """eos_token_id of a config.json / generation_config.json: an int, a list of ints or absent."""
    value = config.get("eos_token_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ValueError(f"{path}: eos_token_id is {value!r}; expected an int or a list of ints")
    ids = [value] if isinstance(value, int) else value
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{path}: eos_token_id contains {i!r}; expected non-negative ints")
    return list(ids)


# ---------------------------------------------------------------------------------------------
# Which transformers class AutoTokenizer would pick, and what that class changes


def _hf_tokenizer_class(tok_config: dict, model_config: dict, tokenizer_json_text: str) -> str:
    """Class name AutoTokenizer (transformers 5.24) resolves for these files; simplified to the
    decisions that change encoding for the model types this runtime serves."""
    hub_class = tok_config.get("tokenizer_class") or model_config.get("tokenizer_class")
    hub_class = hub_class.removesuffix("Fast") if isinstance(hub_class, str) else None
    model_type = model_config.get("model_type") or ""
    if tok_config.get("auto_map"):
        return "TokenizersBackend"  # remote code is never run here; the file is the best we have
    if (
        hub_class == "LlamaTokenizer"
        and model_type not in _INCORRECT_HUB_CLASS_MODEL_TYPES
        and '"ByteLevel"' in tokenizer_json_text
    ):
        return "TokenizersBackend"  # Llama-3 style checkpoints that declare LlamaTokenizer
    registered = _REGISTERED_CLASS_BY_MODEL_TYPE.get(model_type)
    if hub_class is not None and registered is not None and registered != hub_class:
        if registered in _BACKEND_CLASS_NAMES:
            return "TokenizersBackend"
        chosen = registered if model_type in _INCORRECT_HUB_CLASS_MODEL_TYPES else hub_class
        return "TokenizersBackend" if chosen in _BACKEND_CLASS_NAMES else chosen
    if hub_class is None:
        return registered or "TokenizersBackend"
    return "TokenizersBackend" if hub_class in _BACKEND_CLASS_NAMES else hub_class


def _rebuild_as_llama(file_backend: BackendTokenizer, tokenizer_json_text: str, tok_config: dict) -> BackendTokenizer:
    """The pipeline transformers' LlamaTokenizer.__init__ builds from the file's vocab and merges:
    byte-fallback BPE, Metaspace pre-tokenizer, no normalizer. Its prepend scheme differs from the
    legacy `Prepend` normalizer of Llama-2 files for text that follows a special token."""
    model = json.loads(tokenizer_json_text).get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"{TOKENIZER_FILE}: tokenizer_class LlamaTokenizer needs a BPE model, found {model.get('type')!r}"
        )
    vocab = model.get("vocab") or {}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    add_prefix_space = tok_config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    legacy = bool(tok_config.get("legacy", False))
    prepend_scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    backend.post_processor = file_backend.post_processor
    return backend


# ---------------------------------------------------------------------------------------------
# Special tokens


def _as_token(value: Any, where: str) -> str | AddedToken | None:
    """A special-token value from a config: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, (str, AddedToken)):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: v for k, v in value.items() if k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")}
        return AddedToken(**fields)
    raise ValueError(f"{where}: expected a token string or an AddedToken object, found {value!r}")


def _added_tokens_decoder(tok_config: dict, file_backend: BackendTokenizer) -> dict[int, AddedToken]:
    """id -> AddedToken from tokenizer_config.json's added_tokens_decoder, else tokenizer.json's
    added_tokens (what transformers' _from_pretrained passes on as `added_tokens_decoder`)."""
    out: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in tok_config:
        entries = tok_config["added_tokens_decoder"] or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{TOKENIZER_CONFIG_FILE}: added_tokens_decoder must be an object, found {entries!r}")
        for idx, value in entries.items():
            token = _as_token(value, f"{TOKENIZER_CONFIG_FILE}: added_tokens_decoder[{idx}]")
            out[int(idx)] = token if isinstance(token, AddedToken) else AddedToken(token)
    else:
        out.update(file_backend.get_added_tokens_decoder())
    return out


def _special_token_config(tok_config: dict, special_map: dict, hf_class: str) -> tuple[dict, list]:
    """(named special tokens, extra special tokens) as transformers 5.24 collects them."""
    where = TOKENIZER_CONFIG_FILE
    values = dict(_CLASS_DEFAULT_TOKENS.get(hf_class, {}))
    values.update({k: tok_config[k] for k in NAMED_SPECIAL_TOKENS if k in tok_config})
    extra = tok_config.get("extra_special_tokens") or tok_config.get("additional_special_tokens")
    # Legacy special_tokens_map.json is read only when the config has no added_tokens_decoder.
    if "added_tokens_decoder" not in tok_config and special_map:
        where = f"{TOKENIZER_CONFIG_FILE}/{SPECIAL_TOKENS_MAP_FILE}"
        values.update({k: special_map[k] for k in NAMED_SPECIAL_TOKENS if k in special_map})
        if not extra:
            extra = special_map.get("extra_special_tokens") or special_map.get("additional_special_tokens")
    named = {k: _as_token(v, f"{where}: {k}") for k, v in values.items()}
    # Model-specific named tokens, e.g. Gemma 3's image_token / boi_token.
    for key, value in tok_config.items():
        is_token = isinstance(value, str) or (isinstance(value, dict) and value.get("__type") == "AddedToken")
        if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and is_token:
            named[key] = _as_token(value, f"{TOKENIZER_CONFIG_FILE}: {key}")
    extra_list: list = []
    if isinstance(extra, dict):
        for key, value in extra.items():
            named[key] = _as_token(value, f"{TOKENIZER_CONFIG_FILE}: extra_special_tokens.{key}")
    elif isinstance(extra, (list, tuple)):
        extra_list = [_as_token(v, f"{TOKENIZER_CONFIG_FILE}: extra_special_tokens") for v in extra]
    elif extra is not None:
        raise ValueError(f"{TOKENIZER_CONFIG_FILE}: extra_special_tokens must be a list or an object, found {extra!r}")
    return named, extra_list


def _register_special_tokens(
    backend: BackendTokenizer, added: dict[int, AddedToken], named: dict, extra: list, hf_class: str
) -> None:
    """Re-add tokens the way TokenizersBackend.__init__ does; this can change a token's flags."""
    named_tokens = [v for v in named.values() if v is not None]
    # All of added_tokens_decoder is re-added (transformers compares reprs of ids with reprs of
    # tokens, so none match); named tokens missing from the backend get the next free ids.
    tokens_to_add = [added[i] for i in sorted(added)]
    known = {t.content for t in backend.get_added_tokens_decoder().values()} | {str(t) for t in tokens_to_add}
    for token in named_tokens + [t for t in extra if t is not None]:
        if str(token) not in known:
            tokens_to_add.append(token)
    named_strings = {str(t) for t in named_tokens}
    prepared = []
    for token in tokens_to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        else:
            token = AddedToken(
                token.content, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                normalized=token.normalized, special=token.special or token.content in named_strings,
            )
        prepared.append(token)
    if prepared:
        backend.add_tokens(prepared)
    if hf_class == "Qwen2Tokenizer":
        # Qwen2Tokenizer.__init__ ends by re-adding every special token as special, not normalized.
        specials = list(dict.fromkeys(str(t) for t in named_tokens + extra if t is not None))
        backend.add_tokens([AddedToken(t, special=True) for t in specials])


# ---------------------------------------------------------------------------------------------
# Chat templates


def _load_chat_template(model_dir: Path, tok_config: dict) -> str | dict | None:
    """Template string, or {name: template}, with transformers' priority: chat_template.jinja and
    additional_chat_templates/*.jinja over tokenizer_config.json. chat_template.json (the processor
    file some checkpoints carry) is used only when neither has one."""
    templates: dict[str, str] = {}
    jinja_file = model_dir / CHAT_TEMPLATE_JINJA_FILE
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    extra_dir = model_dir / ADDITIONAL_CHAT_TEMPLATES_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    if "chat_template" in tok_config:
        return _normalize_template(tok_config["chat_template"], model_dir / TOKENIZER_CONFIG_FILE)
    json_file = model_dir / CHAT_TEMPLATE_JSON_FILE
    data = _read_json(json_file)
    if data is not None:
        if not isinstance(data, dict) or "chat_template" not in data:
            raise ValueError(f"{json_file}: expected an object with a 'chat_template' field")
        return _normalize_template(data["chat_template"], json_file)
    return None


def _normalize_template(value: Any, path: Path) -> str | dict | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        try:
            return {item["name"]: item["template"] for item in value}
        except (TypeError, KeyError) as e:
            raise ValueError(f"{path}: chat_template list entries need 'name' and 'template' ({e})") from e
    if isinstance(value, dict):
        return value
    raise ValueError(f"{path}: chat_template must be a string, a list or an object, found {type(value).__name__}")


def _compile_chat_template(source: str):
    """Jinja environment of transformers' chat templates: sandboxed, trim_blocks, lstrip_blocks,
    loop controls, {% generation %} blocks, and its tojson / raise_exception / strftime_now."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # transformers uses {% generation %} to mark assistant text; rendering is unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Unlike jinja's own tojson, no HTML escaping.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat template stores underscore attribute {name!r}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


class _TemplateDict:
    """`dict` for templates without attribute access to the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


# Names a message's reasoning may come under; transformers copies it to all of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages: list[dict]) -> list[dict]:
    """Drop None-valued keys and alias reasoning fields, as transformers does before rendering."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# ---------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode like transformers' AutoTokenizer, chat templates,
    eos ids for stopping and a streaming detokenizer."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str],
        chat_template: str | dict | None,
        eos_token_ids: frozenset[int],
        clean_up_spaces: bool = False,
        source: str = "",
    ):
        self._backend = backend
        self._special_tokens = special_tokens  # name -> content, e.g. {"bos_token": "<s>"}
        self._chat_template_source = chat_template
        self._compiled_template = None
        self._eos_token_ids = eos_token_ids
        self._clean_up_spaces = clean_up_spaces
        self._source = source
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._byte_fallback_ids = _byte_fallback_ids(backend)

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: model directory not found")
        tokenizer_path = model_dir / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise FileNotFoundError(
                f"{tokenizer_path}: tokenizer.json not found; the runtime needs the fast-tokenizer "
                "file (save the tokenizer with transformers' save_pretrained to create it)"
            )
        text = tokenizer_path.read_text(encoding="utf-8")
        try:
            file_backend = BackendTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own exception type for json and schema errors
            raise ValueError(f"{tokenizer_path}: not a valid tokenizers file ({e})") from e

        tok_config = _read_json_object(model_dir / TOKENIZER_CONFIG_FILE)
        special_map = _read_json_object(model_dir / SPECIAL_TOKENS_MAP_FILE)
        model_config = _read_json_object(model_dir / MODEL_CONFIG_FILE)
        generation_config = _read_json_object(model_dir / GENERATION_CONFIG_FILE)

        hf_class = _hf_tokenizer_class(tok_config, model_config, text)
        if hf_class == "LlamaTokenizer":
            backend = _rebuild_as_llama(file_backend, text, tok_config)
        else:
            backend = file_backend
        if hf_class == "GPTNeoXTokenizer":
            # GPTNeoXTokenizer always rebuilds its post-processor, and 5.24 has dropped the
            # add_bos/add_eos flags by then: no special tokens are added.
            from tokenizers import processors

            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
        named, extra = _special_token_config(tok_config, special_map, hf_class)
        _register_special_tokens(backend, _added_tokens_decoder(tok_config, file_backend), named, extra, hf_class)
        # transformers encodes without truncation or padding unless asked.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(tok_config.get("split_special_tokens", False))

        special_tokens = {k: str(v) for k, v in named.items() if v is not None}
        eos_ids = _eos_ids_from(generation_config, model_dir / GENERATION_CONFIG_FILE)
        if eos_ids is None:
            eos_ids = _eos_ids_from(model_config, model_dir / MODEL_CONFIG_FILE) or []
        eos_token = special_tokens.get("eos_token")
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            eos_ids = [*eos_ids, backend.token_to_id(eos_token)]

        clean_up = bool(tok_config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(tok_config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=_load_chat_template(model_dir, tok_config),
            eos_token_ids=frozenset(eos_ids),
            clean_up_spaces=clean_up,
            source=str(model_dir),
        )

    # -- encoding and decoding ------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids equal to AutoTokenizer(dir)(text, add_special_tokens=...).input_ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def detokenizer(self, skip_special_tokens: bool = True) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that decode(skip_special_tokens=True) leaves out."""
        return self._special_ids

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of <0xNN> tokens when the decoder has a ByteFallback step, else empty."""
        return self._byte_fallback_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        bos = self._special_tokens.get("bos_token")
        return None if bos is None else self._backend.token_to_id(bos)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """generation_config.json's eos_token_id (config.json's if absent) plus the tokenizer's
        eos_token, like mlx_lm: generation stops at any of them."""
        return self._eos_token_ids

    # -- chat -------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template_string() is not None

    def _chat_template_string(self) -> str | None:
        template = self._chat_template_source
        if isinstance(template, dict):
            return template.get("default")  # transformers' choice when no tools are passed
        return template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string, equal to HF's apply_chat_template(messages, tokenize=False)."""
        source = self._chat_template_string()
        if source is None:
            names = sorted(self._chat_template_source) if isinstance(self._chat_template_source, dict) else []
            found = f"only named templates {names} and no 'default'" if names else "no chat template"
            raise ValueError(
                f"{self._source}: {found} (looked in {CHAT_TEMPLATE_JINJA_FILE}, "
                f"{TOKENIZER_CONFIG_FILE} and {CHAT_TEMPLATE_JSON_FILE})"
            )
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(source)
        return self._compiled_template.render(
            messages=_normalize_messages(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._special_tokens,
        )

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """chat and a template: the single user message, templated, encoded without extra special
        tokens (HF's apply_chat_template(tokenize=True)). Otherwise encode(prompt)."""
        if chat and self.has_chat_template:
            rendered = self.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            return self.encode(rendered, add_special_tokens=False)
        return self.encode(prompt, add_special_tokens=True)


def _byte_fallback_ids(backend: BackendTokenizer) -> frozenset[int]:
    decoder = backend.decoder
    if decoder is None or '"ByteFallback"' not in decoder.__getstate__().decode("utf-8", "replace"):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (applied only for non-BPE models)."""
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
        .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
        .replace(" 've", "'ve").replace(" 're", "'re")
    )


# ---------------------------------------------------------------------------------------------
# Streaming detokenizer

_REPLACEMENT_CHAR = "\ufffd"


class StreamingDetokenizer:
    """Turns generated ids into text as they come, never emitting half a UTF-8 character.

    Decodes a short window of recent tokens: the text of tokens[prefix:] minus the text of
    tokens[prefix:read] is new. A window whose text ends in U+FFFD may be waiting for the rest of a
    multi-byte character (byte-level BPE and byte-fallback split them across tokens), so it is
    held back. So is a window ending in a byte-fallback token <0xNN>: the decoder turns every byte
    of a run into U+FFFD when any of them is invalid, so a run is final only once it ends. Decoding the window from a token that decode keeps (not a skipped special) makes
    per-sequence decoder steps, like Llama's leading-space strip, act the same on both texts.
    The concatenation of all segments equals tokenizer.decode(all ids) (BPE models; with the
    clean-up of non-BPE models it may not across segment borders).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._byte_ids = tokenizer.byte_fallback_ids
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0  # window start
        self._read = 0  # tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add_token(self, token_id: int) -> str:
        """Add one id; return the text it completes (maybe "")."""
        self.tokens.append(int(token_id))
        return self._advance(final=False)

    def finalize(self) -> str:
        """Return the text still held back (e.g. an incomplete character at the end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.tokens):
            return ""
        prefix_text = self._decode(self.tokens[self._prefix : self._read])
        new_text = self._decode(self.tokens[self._prefix :])
        if not final and (new_text.endswith(_REPLACEMENT_CHAR) or self._in_byte_run()):
            return ""  # may be half a character: wait for the next token
        if new_text.startswith(prefix_text):
            segment = new_text[len(prefix_text) :]
        else:
            # A decoder step that looks across the window edge; fall back to the full text.
            full = self._decode(self.tokens)
            segment = full[len(self.text) :] if full.startswith(self.text) else ""
        self._slide_window()
        self.text += segment
        return segment

    def _in_byte_run(self) -> bool:
        """Whether the last token decode keeps is a byte-fallback token (skipped specials
        between bytes do not end a run: they are removed before the decoder runs)."""
        if not self._byte_ids:
            return False
        for token in reversed(self.tokens):
            if token not in self._skipped_ids:
                return token in self._byte_ids
        return False

    def _slide_window(self) -> None:
        # Next window starts at the first newly read token that decode keeps.
        for i in range(self._read, len(self.tokens)):
            if self.tokens[i] not in self._skipped_ids:
                self._prefix = i
                break
        self._read = len(self.tokens)


# ---------------------------------------------------------------------------------------------
# Stop strings


def find_stop(text: str, stop_strings: list[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None."""
    earliest = None
    for stop in stop_strings:
        if not stop:
            raise ValueError("stop strings must be non-empty")
        i = text.find(stop)
        if i != -1 and (earliest is None or i < earliest):
            earliest = i
    return earliest


def stop_holdback(text: str, stop_strings: list[str]) -> int:
    """How many characters at the end of `text` to hold back from the user because they may be
    the start of a stop string still being generated (longest tail that is a proper prefix)."""
    longest = 0
    for stop in stop_strings:
        if not stop:
            raise ValueError("stop strings must be non-empty")
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
