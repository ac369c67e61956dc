"""The HF transformers fp32 oracle, run live on exactly the weights our runtime sees.

For an MLX checkpoint the oracle's weights are `mx.dequantize` of the packed tensors with
scales/biases widened to f32 (tests/checkpoints.py: dequantized_reference), loaded into the HF
model class built from the same config.json.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from checkpoints import dequantized_reference


def _hf_config(ckpt_dir: Path):
    """AutoConfig of the checkpoint without MLX's quantization keys (HF would try to honour them)."""
    from transformers import AutoConfig

    raw = json.loads((Path(ckpt_dir) / "config.json").read_text())
    raw.pop("quantization", None)
    raw.pop("quantization_config", None)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(raw))
        return AutoConfig.from_pretrained(tmp)


def _to_hf_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MLX names -> HF 5.x parameter names (only MoE experts differ)."""
    out = {}
    for name, w in weights.items():
        if ".mlp.switch_mlp." in name:
            p, proj = name.split(".mlp.switch_mlp.")
            proj = proj.removesuffix("_proj.weight")
            if proj == "down":
                out[f"{p}.mlp.experts.down_proj"] = w
            else:
                out.setdefault(f"{p}.mlp.experts.gate_up_proj", {})[proj] = w
        else:
            out[name] = w
    for name, v in list(out.items()):
        if isinstance(v, dict):  # HF chunks gate_up_proj into (gate, up)
            out[name] = np.concatenate([v["gate"], v["up"]], axis=1)
    return out


def hf_model(ckpt_dir: Path):
    """HF fp32 model carrying the checkpoint's weights (MLX ones dequantized in f32)."""
    from transformers import AutoModelForCausalLM

    raw = json.loads((Path(ckpt_dir) / "config.json").read_text())
    if "quantization" not in raw:  # plain safetensors: transformers loads them itself (f32 is exact)
        return AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    cfg = _hf_config(ckpt_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ref = _to_hf_names(dequantized_reference(Path(ckpt_dir)))
    state = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.get_text_config(), "tie_word_embeddings", False):
        ref.setdefault("lm_head.weight", ref["model.embed_tokens.weight"])
    missing = sorted(set(state) - set(ref) - {k for k in state if k.endswith("rotary_emb.inv_freq")})
    unexpected = sorted(set(ref) - set(state))
    assert not missing and not unexpected, f"oracle weights: missing {missing[:5]}, unexpected {unexpected[:5]}"
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in ref.items()},
                          strict=False)
    return model


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens with HF's own KV cache; returns tokens and the logits each was taken from."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens, logits = [], []
    for _ in range(n):
        step = out.logits[0, -1].float().numpy()
        logits.append(step)
        tokens.append(int(np.argmax(step)))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, np.stack(logits)


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per step: how far greedy is from a tie."""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]
