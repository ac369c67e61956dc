"""Bisect CUDA numerics: run one prefill chunk + 3 decode steps of prepared step variants and
compare their logits with the same variants run on the CPU (saved as .npz beside them).

  python bench/diag_cuda.py DIR [target]     (DIR/<variant>/{cuda,cpu}/*.vmfb, DIR/inputs.npz)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from iree_runner.bundle import TargetBuild
from iree_runner.session import Session


def run(variant: Path, target: str, inputs) -> np.ndarray:
    meta = json.loads((variant / "meta.json").read_text())
    b = TargetBuild(target, "diag", (), {"prefill": f"{target}/prefill.vmfb", "decode": f"{target}/decode.vmfb"}, {},
                    tuple(meta["names"]), tuple(tuple(s) for s in meta["shapes"]), meta["wd"],
                    tuple(meta["cache_shape"]), meta["cd"])
    w = {n: inputs[n].astype(meta["wd"]) for n in meta["names"]}
    s = Session(variant, b, w, max_context=meta["max_context"], prefill_chunk=meta["chunk"])
    out = [s.prefill(list(inputs["prompt"]))]
    for t in inputs["follow"]:
        out.append(s.decode(int(t)))
    return np.stack(out)


if __name__ == "__main__":
    root, target = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "cuda")
    inputs = np.load(root / "inputs.npz")
    for variant in sorted(p for p in root.iterdir() if p.is_dir()):
        got = run(variant, target, inputs)
        if target == "cpu":
            np.save(variant / "cpu_logits.npy", got)
            print(variant.name, "cpu saved", got.argmax(-1))
        else:
            ref = np.load(variant / "cpu_logits.npy")
            print(f"{variant.name}: max |cuda - cpu| per step {np.abs(got - ref).max(-1).round(4).tolist()}, "
                  f"argmax cuda {got.argmax(-1).tolist()} cpu {ref.argmax(-1).tolist()}", flush=True)
