"""Bisect CUDA numerics: the same step variants compiled for CPU and CUDA, compared on logits.

  # here (compiler installed): compile each variant for cpu and cuda, save the CPU logits
  python bench/diag_cuda.py make DIR --model MODEL_DIR|CONFIG.json [--variants f16w-f32kv,f32w-f32kv]
  # on the GPU machine (runtime only): run the cuda builds, print |cuda - cpu| per step
  python bench/diag_cuda.py check DIR

Weights are random (numpy default_rng(0), std 0.02) and made identically on both machines from
the seed, so only config.json travels. A variant is "<weights>w-<cache>kv" with dtypes f16/f32.
Seen 2026-11-26 (H100, IREE 3.13): tiny llama f16w-f16kv wrong, f16w-f32kv and f32w-f32kv
right; real-size Qwen3-0.6B f16w-f32kv NaN on CUDA, finite on CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from iree_runner.bundle import TargetBuild
from iree_runner.session import Session

DTYPES = {"f16": "float16", "f32": "float32"}
CHUNK, MAX_CONTEXT, FOLLOW = 64, 128, (7, 9, 11)


def random_weights(names, shapes, dtype) -> dict:
    rng = np.random.default_rng(0)
    return {n: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(dtype) for n, s in zip(names, shapes)}


def run(variant: Path, target: str) -> np.ndarray:
    meta = json.loads((variant / "meta.json").read_text())
    b = TargetBuild(target, "diag", (), {s: f"{target}/{s}.vmfb" for s in ("prefill", "decode")}, {},
                    tuple(meta["names"]), tuple(tuple(s) for s in meta["shapes"]), meta["wd"],
                    tuple(meta["cache_shape"]), meta["cd"])
    s = Session(variant, b, random_weights(b.weight_names, b.weight_shapes, meta["wd"]),
                max_context=MAX_CONTEXT, prefill_chunk=CHUNK)
    out = [s.prefill(list(range(5, 5 + CHUNK)))]
    out += [s.decode(t) for t in FOLLOW]
    return np.stack(out)


def make(root: Path, model: Path, variants: list[str]) -> None:
    from iree_runner.compile import export, family, iree_compile
    from iree_runner.weights import read_config

    if model.is_file():  # a bare config.json, e.g. bench/configs/qwen3-0.6b.json
        (root / "model").mkdir(parents=True, exist_ok=True)
        (root / "model" / "config.json").write_text(model.read_text())
        model = root / "model"
    cc = read_config(model)
    fam = family.family_module(cc.model_type)
    cfg = fam.Config.from_checkpoint(cc)
    for name in variants:
        wd, cd = (DTYPES[p[:-1] if p.endswith("w") else p[:-2]] for p in name.split("-"))
        spec = export.step_spec(fam, cfg, capacity=MAX_CONTEXT + CHUNK, weight_dtype=wd, cache_dtype=cd)
        d = root / name
        for target in ("cpu", "cuda"):
            (d / target).mkdir(parents=True, exist_ok=True)
            for step, tokens in (("prefill", CHUNK), ("decode", 1)):
                mlir = d / f"{step}.mlir"
                mlir.write_text(export.export_step(fam, cfg, spec, tokens, step))
                subprocess.run([iree_compile.iree_compile_path(), str(mlir), *iree_compile.flags_for(target),
                                "-o", str(d / target / f"{step}.vmfb")], check=True)
                mlir.unlink()
        (d / "meta.json").write_text(json.dumps({"names": spec.weight_names, "shapes": spec.weight_shapes,
                                                 "wd": wd, "cd": cd, "cache_shape": spec.cache_shape}))
        logits = run(d, "cpu")
        np.save(d / "cpu_logits.npy", logits)
        print(f"{name}: cpu finite {bool(np.isfinite(logits).all())}, argmax {logits.argmax(-1).tolist()}")


def check(root: Path) -> None:
    for d in sorted(p for p in root.iterdir() if (p / "meta.json").exists()):
        got, ref = run(d, "cuda"), np.load(d / "cpu_logits.npy")
        print(f"{d.name}: finite {bool(np.isfinite(got).all())}, max |cuda - cpu| per step "
              f"{np.abs(got - ref).max(-1).round(4).tolist()}, argmax cuda {got.argmax(-1).tolist()} "
              f"cpu {ref.argmax(-1).tolist()}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["make", "check"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--variants", default="f16w-f32kv,f32w-f32kv,f16w-f16kv")
    a = ap.parse_args()
    make(a.dir, a.model, a.variants.split(",")) if a.action == "make" else check(a.dir)
