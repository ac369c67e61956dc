"""CUDA agreement with the HF fp32 oracle, per family and weight dtype.

Two halves, so the GPU machine needs only the runtime wheel:
  # here: HF transformers fp32 greedy on the f32-dequantized weights (tests/oracle.py), saved
  # as CKPT/oracle.npz for each test checkpoint under CKPT_ROOT
  python bench/gpu_agreement.py oracle CKPT_ROOT
  # on the GPU machine: our CUDA session on each bundle root (compiled here with
  # `iree-generate compile --target cuda`: --no-packed for f16 weights, --packed (the default)
  # for 4-bit ones read by the kernels, or `--weight-dtype f32`)
  python bench/gpu_agreement.py check CKPT_ROOT OUT.json BUNDLE_ROOT [BUNDLE_ROOT ...]

Reports tokens until the first divergence (teacher-forced on the oracle's tokens, argmax of
the returned logits; and free-running with the argmax taken on the device, as generation
does) and the max logit error before it, on the test suite's three prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from iree_runner.tokenizer import Tokenizer  # noqa: E402

NEW_TOKENS = 32


def prompts() -> list[str]:
    from test_models import NEW_TOKENS as n, PROMPTS

    assert n == NEW_TOKENS
    return PROMPTS


def oracle(ckpt_root: Path) -> None:
    from oracle import greedy, hf_model

    for ckpt in sorted(p for p in ckpt_root.iterdir() if p.is_dir()):
        model, tok = hf_model(ckpt), Tokenizer.from_dir(ckpt)
        saved = {}
        for i, text in enumerate(prompts()):
            prompt = tok.encode_prompt(text, chat=False)
            tokens, logits = greedy(model, prompt, NEW_TOKENS)
            saved |= {f"prompt{i}": np.array(prompt), f"tokens{i}": np.array(tokens), f"logits{i}": logits}
        np.savez_compressed(ckpt / "oracle.npz", **saved)
        print(f"{ckpt.name}: oracle saved", flush=True)


def check(ckpt_root: Path, out: Path, bundle_roots: list[Path]) -> None:
    from iree_runner.generate import generate_step, load_model
    from iree_runner.sampling import SamplingParams

    rows = []
    for ckpt in sorted(p for p in ckpt_root.iterdir() if p.is_dir()):
        family = json.loads((ckpt / "config.json").read_text())["model_type"]
        ref = np.load(ckpt / "oracle.npz")
        for root in bundle_roots:
            s = load_model(ckpt, device="cuda", bundle=root / ckpt.name).session
            i = 0
            while f"prompt{i}" in ref:
                prompt, want, want_logits = ref[f"prompt{i}"].tolist(), ref[f"tokens{i}"], ref[f"logits{i}"]
                s.reset()
                got_logits = [s.prefill(prompt)]
                for t in want[:-1]:  # teacher-forced on the oracle's tokens: errors stay per step
                    got_logits.append(s.decode(int(t)))
                got_logits = np.stack(got_logits)
                got = got_logits.argmax(-1)
                n = int(np.argmax(got != want)) if (got != want).any() else NEW_TOKENS
                err = float(np.abs(got_logits[:n + 1] - want_logits[:n + 1]).max())
                # Generation's own path: free-running, argmax taken on the device, one int back,
                # each step queued before the token of the one before is read.
                free = list(generate_step(s, prompt, SamplingParams(), NEW_TOKENS))
                n_dev = next((j for j, (a, b) in enumerate(zip(free, want)) if a != b), NEW_TOKENS)
                weights = s.build.weight_dtype + (" + packed 4/8-bit" if s.build.packed else "")
                rows.append({"family": family, "checkpoint": ckpt.name, "bundle": root.name, "weights": weights,
                             "prompt_tokens": len(prompt), "tokens_agreeing": n, "of": NEW_TOKENS,
                             "max_logit_err": err, "finite": bool(np.isfinite(got_logits).all()),
                             "device_greedy_agreeing": n_dev})
                print(json.dumps(rows[-1]), flush=True)
                i += 1
    out.write_text(json.dumps(rows, indent=1))
    print("| family | weights | prompt tokens | greedy tokens equal to HF fp32 | same, argmax on the device "
          "| max logit error before divergence |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['weights']} | {r['prompt_tokens']} | {r['tokens_agreeing']}/{r['of']} "
              f"| {r['device_greedy_agreeing']}/{r['of']} | {r['max_logit_err']:.2e} |")


if __name__ == "__main__":
    if sys.argv[1] == "oracle":
        oracle(Path(sys.argv[2]))
    else:
        check(Path(sys.argv[2]), Path(sys.argv[3]), [Path(p) for p in sys.argv[4:]])
