"""Two bundles of one model, on the same random weights (bench/profile_step.py random_session),
step by step: a kernel change against the code before it, on real model shapes (the oracle
checks, bench/gpu_agreement.py, use the tiny test checkpoints).

  python bench/compare_steps.py BUNDLE_A BUNDLE_B [--prompt 512] [--steps 64] [--target cuda]

Both get the same prompt, then A's greedy token each step. Prints the prompt's and each
step's largest logit difference, relative to the spread (std) of A's logits, and how many
steps' argmax agree. Exit status 1 when the relative difference exceeds --tol.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from profile_step import random_session  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--tol", type=float, default=1e-2, help="largest difference / std of the logits allowed")
    args = ap.parse_args()
    a, b = random_session(args.a, args.target), random_session(args.b, args.target)
    prompt = np.random.default_rng(1).integers(100, 1000, args.prompt).tolist()
    la, lb = a.prefill(prompt), b.prefill(prompt)
    rel = [float(np.max(np.abs(la - lb)) / np.std(la))]
    same = [int(np.argmax(la) == np.argmax(lb))]
    token = int(np.argmax(la))
    for _ in range(args.steps):
        la, lb = a.decode(token), b.decode(token)
        rel.append(float(np.max(np.abs(la - lb)) / np.std(la)))
        same.append(int(np.argmax(la) == np.argmax(lb)))
        token = int(np.argmax(la))
    out = {"a": str(args.a), "b": str(args.b), "prompt": args.prompt, "steps": args.steps,
           "argmax_agree": f"{sum(same)}/{len(same)}", "max_rel_diff": max(rel), "prefill_rel_diff": rel[0],
           "rel_diff_by_step": [round(r, 6) for r in rel]}
    print(json.dumps(out))
    return 0 if max(rel) <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
