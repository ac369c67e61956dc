"""Train the small default model that ships in iree_runner/default_model/.

`iree-generate` with no `--model` runs it, so a fresh machine needs no model hub.
Everything is made here from text that ships with Python:

  1. corpus     pydoc_data.topics (the `help()` topics) + stdlib docstrings, lightly cleaned
  2. tokenizer  byte-level BPE (tokenizers), BOS added by a Llama-3 style post_processor
  3. model      transformers LlamaForCausalLM, trained with torch on CPU, saved in bfloat16
  4. convert    the real `mlx_lm convert -q --q-bits 4 --q-group-size 64` (BF16 scales/biases)
  5. sanity     mlx_lm.load + mlx_lm.generate on a few prompts

Deterministic for a given Python stdlib and package set (seeded, one torch thread, fixed
step count). Run:  .venv/bin/python scripts/train_default_model.py
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "iree_runner" / "default_model"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
VOCAB_SIZE = 2048
SEED = 20240601

# Every input dimension (hidden 256, intermediate 768, q/kv projections' input 256,
# o_proj input 8*32=256) is divisible by 64, the MLX quantization group size.
MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
)

SEQ_LEN = 128
BATCH_SIZE = 16
PEAK_LR = 3e-3
MIN_LR = 3e-4
WARMUP_STEPS = 100
DEFAULT_STEPS = 2000

SAMPLE_PROMPTS = ["The function", "In Python,", "The return value"]

# Files the committed model keeps; anything else mlx_lm convert writes is dropped.
KEPT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
MAX_MODEL_BYTES = 10 * 1024 * 1024

# stdlib folders whose docstrings are tests, GUIs, vendored code or already used.
SKIPPED_STDLIB_DIRS = {
    "site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo",
    "ensurepip", "pydoc_data", "encodings", "config-3.11-x86_64-linux-gnu",
}
MIN_DOCSTRING_CHARS = 80
VALIDATION_EVERY = 50  # every 50th document is held out for the validation loss


# --------------------------------------------------------------------------- corpus

_RULE_LINE = re.compile(r"^\s*([*=\-~^#_+])\1{2,}\s*$")  # "*****" heading underlines


def clean_document(text: str) -> str:
    """Collapse whitespace runs; a newline only separates paragraphs.

    Paragraphs (split on blank lines) are reflowed onto one line, since the source's
    single newlines are just 70-column wrapping. Heading underlines and doctest
    paragraphs are dropped.
    """
    text = text.replace("\r\n", "\n").replace("\t", " ")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if not _RULE_LINE.match(ln)]
        if not lines or lines[0].lstrip().startswith(">>>"):
            continue
        paragraph = " ".join(" ".join(lines).split())
        if paragraph:
            paragraphs.append(paragraph)
    return "\n".join(paragraphs)


def _stdlib_docstrings() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        if SKIPPED_STDLIB_DIRS.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    docs.append(doc)
    return docs


def build_corpus() -> list[str]:
    """The training documents, in a fixed order: help() topics, then stdlib docstrings."""
    from pydoc_data.topics import topics

    raw = [topics[key] for key in sorted(topics)] + _stdlib_docstrings()
    documents = [clean_document(doc) for doc in raw]
    return [doc for doc in documents if len(doc) >= MIN_DOCSTRING_CHARS]


def corpus_words(documents: list[str]) -> set[str]:
    """Lower-cased ASCII words of the corpus: what the tests check generations against."""
    return {w.lower() for doc in documents for w in re.findall(r"[A-Za-z]+", doc)}


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    train = [d for i, d in enumerate(documents) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    valid = [d for i, d in enumerate(documents) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    return train, valid


# ------------------------------------------------------------------------ tokenizer

def train_tokenizer(documents: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],  # ids 0 and 1, as in MODEL_CONFIG
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if (bos_id, eos_id) != (MODEL_CONFIG["bos_token_id"], MODEL_CONFIG["eos_token_id"]):
        raise RuntimeError(f"tokenizer special ids are {bos_id}, {eos_id}; expected 0, 1")
    # Like Llama 3: BOS in front of every encoded sequence, no EOS.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def wrap_tokenizer(tokenizer):
    """The transformers view of the tokenizer; its save_pretrained is what AutoTokenizer loads."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )


def token_stream(tokenizer, documents: list[str]):
    """All documents as one 1-D int64 tensor: BOS doc EOS BOS doc EOS ..."""
    import torch

    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    ids = []
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids)  # starts with BOS from the post_processor
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)


# ---------------------------------------------------------------------------- model

def learning_rate(step: int, total_steps: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return MIN_LR + 0.5 * (PEAK_LR - MIN_LR) * (1 + math.cos(math.pi * progress))


def random_batch(stream, generator):
    import torch

    starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH_SIZE,), generator=generator)
    return torch.stack([stream[s : s + SEQ_LEN + 1] for s in starts.tolist()])  # [B, T+1]


def lm_loss(model, batch):
    import torch

    # bf16 autocast: ~2.5x faster on this CPU; weights and AdamW state stay fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )


def validation_loss(model, stream) -> float:
    import torch

    windows = stream[: (len(stream) - 1) // SEQ_LEN * SEQ_LEN + 1]
    starts = range(0, len(windows) - SEQ_LEN, SEQ_LEN)
    batch = torch.stack([windows[s : s + SEQ_LEN + 1] for s in starts])
    model.eval()
    with torch.no_grad():
        losses = [lm_loss(model, batch[i : i + BATCH_SIZE]).item() * len(batch[i : i + BATCH_SIZE])
                  for i in range(0, len(batch), BATCH_SIZE)]
    model.train()
    return sum(losses) / len(batch)


def train_model(train_stream, valid_stream, steps: int, log_every: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, {steps} steps of "
          f"{BATCH_SIZE}x{SEQ_LEN} tokens ({steps * BATCH_SIZE * SEQ_LEN / len(train_stream):.1f} epochs)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8,
    )
    generator = torch.Generator().manual_seed(SEED)
    started = time.time()
    running = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss = lm_loss(model, random_batch(train_stream, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  smoothed {running:.3f}  "
                  f"lr {learning_rate(step, steps):.2e}  {time.time() - started:.0f}s", flush=True)
    train_loss = validation_loss(model, train_stream[: len(valid_stream)])
    valid_loss = validation_loss(model, valid_stream)
    print(f"final: train loss {train_loss:.3f} (first {len(valid_stream)} tokens), "
          f"validation loss {valid_loss:.3f} nats/token")
    return model, train_loss, valid_loss


def print_torch_samples(model, hf_tokenizer):
    import torch

    model.eval()
    torch.manual_seed(SEED)
    for prompt in SAMPLE_PROMPTS[:2]:
        input_ids = hf_tokenizer(prompt, return_tensors="pt").input_ids  # BOS added
        for label, kwargs in (("greedy", dict(do_sample=False)),
                              ("t=0.8", dict(do_sample=True, temperature=0.8, top_k=0, top_p=1.0))):
            with torch.no_grad():
                out = model.generate(input_ids, max_new_tokens=48, pad_token_id=1, **kwargs)
            text = hf_tokenizer.decode(out[0], skip_special_tokens=True)
            print(f"[torch {label}] {text!r}")


def save_hf_model(model, hf_tokenizer, out_dir: Path):
    import torch
    from transformers import GenerationConfig

    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=MODEL_CONFIG["bos_token_id"], eos_token_id=MODEL_CONFIG["eos_token_id"]
    ).save_pretrained(out_dir)
    hf_tokenizer.save_pretrained(out_dir)
    # transformers 5 writes only rope_parameters; keep the 4.x key too so loaders that
    # read either (mlx_lm, ours) agree on theta.
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = MODEL_CONFIG["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# -------------------------------------------------------------------------- convert

def read_safetensors_header(path: Path) -> dict:
    """The JSON header: 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def check_quantized_weights(path: Path, bits: int, group_size: int) -> int:
    """Fail unless every quantized weight has BF16 scales/biases of the expected shape.

    Returns how many weights are quantized.
    """
    header = read_safetensors_header(path)
    quantized = 0
    for name, info in header.items():
        if not name.endswith(".scales"):
            continue
        base = name[: -len(".scales")]
        weight, biases = header.get(base + ".weight"), header.get(base + ".biases")
        if weight is None or biases is None:
            raise RuntimeError(f"{path}: {name} has no matching .weight/.biases")
        for part, part_info in ((".scales", info), (".biases", biases)):
            if part_info["dtype"] != "BF16":
                raise RuntimeError(f"{path}: {base}{part} is {part_info['dtype']}, expected BF16")
        if weight["dtype"] != "U32":
            raise RuntimeError(f"{path}: {base}.weight is {weight['dtype']}, expected U32")
        rows, packed_cols = weight["shape"]
        in_features = packed_cols * 32 // bits
        if info["shape"] != [rows, in_features // group_size]:
            raise RuntimeError(f"{path}: {name} shape {info['shape']}, expected "
                               f"{[rows, in_features // group_size]} for {bits}-bit g{group_size}")
        quantized += 1
    if quantized == 0:
        raise RuntimeError(f"{path}: no quantized weights found")
    return quantized


def convert_with_mlx_lm(hf_dir: Path, out_dir: Path, work_dir: Path, bits: int = 4,
                        group_size: int = 64) -> list[str]:
    mlx_dir = work_dir / "mlx"  # mlx_lm refuses to write into an existing folder
    command = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(hf_dir),
               "--mlx-path", str(mlx_dir), "-q", "--q-bits", str(bits),
               "--q-group-size", str(group_size), "--dtype", "bfloat16"]
    print("$", " ".join(command[1:]).replace(str(work_dir), "<tmp>"), flush=True)
    subprocess.run(command, check=True)

    config = json.loads((mlx_dir / "config.json").read_text())
    quantization = config.get("quantization", {})
    if (quantization.get("bits"), quantization.get("group_size")) != (bits, group_size):
        raise RuntimeError(f"{mlx_dir}/config.json quantization is {quantization}, "
                           f"expected bits={bits} group_size={group_size}")
    n_quantized = check_quantized_weights(mlx_dir / "model.safetensors", bits, group_size)
    print(f"converted: {n_quantized} weights quantized {bits}-bit g{group_size}, BF16 scales/biases")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in KEPT_FILES:
        if not (mlx_dir / name).exists():
            raise RuntimeError(f"mlx_lm convert wrote no {name} in {mlx_dir}")
        shutil.copy(mlx_dir / name, out_dir / name)
    dropped = sorted(p.name for p in mlx_dir.iterdir() if p.name not in KEPT_FILES)
    print(f"kept {list(KEPT_FILES)}; dropped {dropped}")
    return list(KEPT_FILES)


def write_readme(out_dir: Path, steps: int, train_loss: float, valid_loss: float):
    readme = f"""# Default model

The model `iree-generate` runs when no `--model` is given. It was trained from scratch on
this repo's machine by `scripts/train_default_model.py`; nothing was downloaded.

- Corpus: Python {sys.version.split()[0]}'s `pydoc_data.topics` (the `help()` topics) plus
  docstrings of stdlib modules, paragraphs reflowed onto one line each.
- Tokenizer: byte-level BPE (`tokenizers`), vocab {VOCAB_SIZE}, `{BOS_TOKEN}` (id 0, added in
  front of every sequence) and `{EOS_TOKEN}` (id 1).
- Model: LlamaForCausalLM, hidden 256, intermediate 768, 4 layers, 8 heads, 4 KV heads,
  head_dim 32, tied embeddings, rope_theta 10000. Trained with torch on CPU for {steps} steps
  of {BATCH_SIZE}x{SEQ_LEN} tokens (AdamW, peak lr {PEAK_LR}, warmup + cosine);
  final loss {train_loss:.2f} nats/token on training text, {valid_loss:.2f} on held-out text.
  Saved in bfloat16.
- Quantized by the real mlx_lm ({_mlx_lm_version()}):

      python -m mlx_lm convert --hf-path <bf16 checkpoint> --mlx-path <out> -q --q-bits 4 --q-group-size 64 --dtype bfloat16

  4-bit affine, group size 64, BF16 scales and biases (embedding included).

It writes documentation-flavoured English, not correct answers.
Rebuild: `.venv/bin/python scripts/train_default_model.py`.
"""
    (out_dir / "README.md").write_text(readme)


def _mlx_lm_version() -> str:
    from importlib.metadata import version

    return f"mlx-lm {version('mlx-lm')}"


def print_mlx_samples(model_dir: Path):
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler
    import mlx.core as mx

    model, tokenizer = load(str(model_dir))
    for prompt in SAMPLE_PROMPTS:
        text = generate(model, tokenizer, prompt, max_tokens=48, verbose=False)
        print(f"[mlx_lm greedy] {prompt!r} -> {text!r}")
    mx.random.seed(SEED)
    for prompt in SAMPLE_PROMPTS[:2]:
        text = generate(model, tokenizer, prompt, max_tokens=48, verbose=False,
                        sampler=make_sampler(temp=0.8))
        print(f"[mlx_lm t=0.8] {prompt!r} -> {text!r}")


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


# ----------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the machine's cores are shared
    timer = time.time()

    documents = build_corpus()
    train_docs, valid_docs = split_documents(documents)
    print(f"corpus: {len(documents)} documents, {sum(map(len, documents)) / 1e6:.2f} M chars "
          f"({len(valid_docs)} held out)")

    tokenizer = train_tokenizer(train_docs)
    train_stream = token_stream(tokenizer, train_docs)
    valid_stream = token_stream(tokenizer, valid_docs)
    print(f"tokens: {len(train_stream)} train, {len(valid_stream)} validation "
          f"({sum(map(len, train_docs)) / len(train_stream):.2f} chars/token)  "
          f"{time.time() - timer:.0f}s")

    model, train_loss, valid_loss = train_model(train_stream, valid_stream, args.steps,
                                                args.log_every)
    print(f"training done  {time.time() - timer:.0f}s")

    with tempfile.TemporaryDirectory(prefix="default_model_") as tmp:
        work_dir = Path(tmp)
        hf_dir = work_dir / "hf"
        hf_tokenizer = wrap_tokenizer(tokenizer)
        print_torch_samples(model, hf_tokenizer)
        save_hf_model(model, hf_tokenizer, hf_dir)
        convert_with_mlx_lm(hf_dir, args.out, work_dir)

    write_readme(args.out, args.steps, train_loss, valid_loss)
    size = directory_bytes(args.out)
    if size >= MAX_MODEL_BYTES:
        raise RuntimeError(f"{args.out} is {size} bytes, expected < {MAX_MODEL_BYTES}")
    for p in sorted(args.out.iterdir()):
        print(f"  {p.name:28s} {p.stat().st_size:>10,d} bytes")
    print(f"total {size / 1e6:.2f} MB")

    print_mlx_samples(args.out)
    print(f"wall time {time.time() - timer:.0f}s")


if __name__ == "__main__":
    main()
