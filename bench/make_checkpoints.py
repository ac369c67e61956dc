"""Benchmark checkpoints: real config.json values, random weights, converted as users get them.

For each config in bench/configs/: a random-init transformers model saved in f16 (the
unquantized variant) and in bf16, then `mlx_lm convert -q` (4-bit, group 64) of the bf16 one,
which gives BF16 scales and biases. The config.json written next to the weights is the one in
bench/configs/ (plus MLX's quantization keys), so a bundle compiled on another machine from
that same file matches it whatever transformers version saved the weights.

  python bench/make_checkpoints.py --out DIR [--models qwen3-0.6b,llama-3.2-1b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"


def _random_model(config_path: Path, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = config_path.parent / f".cfg-{config_path.stem}"
    tmp.mkdir(exist_ok=True)
    shutil.copy(config_path, tmp / "config.json")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp), dtype=torch.float32)
    shutil.rmtree(tmp)
    with torch.no_grad():  # std 0.02 like a trained model's scale; norms stay at 1
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    return model


def _save_tokenizer(out: Path) -> None:
    """A stand-in tokenizer: benchmarks feed token ids, but mlx_lm convert loads a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)


def _write_config(out: Path, config_path: Path) -> None:
    """The benchmark's config.json verbatim, keeping only MLX's quantization keys from `out`."""
    cfg = json.loads(config_path.read_text())
    saved = json.loads((out / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        if key in saved:
            cfg[key] = saved[key]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def make(name: str, out_root: Path, seed: int = 0) -> dict[str, Path]:
    import torch

    config_path = CONFIGS / f"{name}.json"
    f16, bf16, q4 = (out_root / f"{name}-{v}" for v in ("f16", "bf16", "4bit"))
    if all((p / "config.json").exists() for p in (f16, q4)):
        return {"f16": f16, "4bit": q4}
    t0 = time.time()
    model = _random_model(config_path, seed)
    for path, dtype in ((f16, torch.float16), (bf16, torch.bfloat16)):
        shutil.rmtree(path, ignore_errors=True)
        model.to(dtype).save_pretrained(path, safe_serialization=True)
        _save_tokenizer(path)
        _write_config(path, config_path)
    del model
    shutil.rmtree(q4, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(bf16), "--mlx-path", str(q4),
                    "-q", "--q-bits", "4", "--q-group-size", "64"], check=True)
    _write_config(q4, config_path)
    shutil.rmtree(bf16)
    print(f"{name}: checkpoints in {time.time() - t0:.0f}s", file=sys.stderr)
    return {"f16": f16, "4bit": q4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="qwen3-0.6b,llama-3.2-1b")
    args = ap.parse_args()
    for name in args.models.split(","):
        print(json.dumps({k: str(v) for k, v in make(name, args.out).items()}))


if __name__ == "__main__":
    main()
