"""f16-on-CUDA agreement with the HF fp32 oracle, per family (run on the GPU machine).

For each test checkpoint (tests/checkpoints.py, MLX 4-bit from bf16) and its CUDA bundle:
greedy tokens from our CUDA session (f16 weights and KV cache, f32 accumulation) against HF
transformers fp32 on the f32-dequantized weights; reports tokens until the first divergence
and the max logit error before it, on the test suite's three prompts.

  python bench/gpu_agreement.py CKPT_ROOT BUNDLE_ROOT OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from oracle import greedy, hf_model  # noqa: E402
from test_models import NEW_TOKENS, PROMPTS, ours_greedy  # noqa: E402

from iree_runner.generate import load_model  # noqa: E402


def main(ckpt_root: Path, bundle_root: Path, out: Path) -> None:
    rows = []
    for ckpt in sorted(p for p in ckpt_root.iterdir() if p.is_dir()):
        family = json.loads((ckpt / "config.json").read_text())["model_type"]
        model = load_model(ckpt, device="cuda", bundle=bundle_root / ckpt.name)
        oracle = hf_model(ckpt)
        for text in PROMPTS:
            prompt = model.tokenizer.encode_prompt(text, chat=False)
            want, want_logits = greedy(oracle, prompt, NEW_TOKENS)
            got, got_logits = ours_greedy(model, prompt, NEW_TOKENS)
            n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), NEW_TOKENS)
            err = float(np.abs(got_logits[:n + 1] - want_logits[:n + 1]).max())
            finite = bool(np.isfinite(got_logits).all())
            rows.append({"family": family, "checkpoint": ckpt.name, "prompt_tokens": len(prompt),
                         "tokens_agreeing": n, "of": NEW_TOKENS, "max_logit_err": err, "finite": finite})
            print(json.dumps(rows[-1]), flush=True)
    out.write_text(json.dumps(rows, indent=1))
    print("| family | prompt tokens | greedy tokens equal to HF fp32 | max logit error before divergence |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['prompt_tokens']} | {r['tokens_agreeing']}/{r['of']} | {r['max_logit_err']:.2e} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
