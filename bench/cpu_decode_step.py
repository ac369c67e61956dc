"""Milliseconds per pipelined greedy decode step on the CPU, from the current export code.

  python bench/cpu_decode_step.py CKPT BUNDLE [--pos 576] [--reps 3]

Exports and compiles only the decode step of CKPT (a 4-bit MLX checkpoint; packed as the CPU
default) into a copy of BUNDLE (a CPU bundle of the same model, for its manifest and prefill
step), then times 40 steps queued one ahead (as generate_step runs them) from position --pos,
the cache zeroed (attention reads the same bytes whatever they hold). The harness behind the
CPU kernel changes' step times in git log; bench/run.py is the benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from iree_runner.bundle import read_manifest
    from iree_runner.compile import build, export, family, iree_compile
    from iree_runner.generate import gather_for
    from iree_runner.session import Session
    from iree_runner.weights import open_checkpoint
    from iree_runner.weights.config import read_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--pos", type=int, default=576)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="cpu-step-")) / "bundle"
    shutil.copytree(a.bundle, out)
    m = read_manifest(out)
    b = m.targets["cpu"]
    cc = read_config(a.ckpt)
    fam = family.family_module(cc.model_type)
    cfg = fam.Config.from_checkpoint(cc)
    packed = build.packed_weights_for(a.ckpt, fam.weight_shapes(cfg), "cpu", None)
    spec = export.step_spec(fam, cfg, capacity=b.capacity, weight_dtype=b.weight_dtype,
                            cache_dtype=b.cache_dtype, packed_weights=packed,
                            cache_layout=iree_compile.CACHE_LAYOUT["cpu"])
    mlir = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cpu"))
    iree_compile.compile_mlir(mlir, out / b.files["decode"], "cpu", "decode", flags=iree_compile.step_flags("cpu"))
    b = dataclasses.replace(b, cache_shape=spec.cache_shape)
    s = Session(out, b, gather_for(open_checkpoint(a.ckpt), b), **m.session_options)
    res = []
    for _ in range(a.reps):
        s.reset()
        s.pos = a.pos
        s.decode(7, greedy=True)
        queued, stamps = [s.decode_next()], []
        for _ in range(40):
            queued.append(s.decode_next())
            queued.pop(0).result()
            stamps.append(time.perf_counter())
        s.wait()
        res.append(1e3 * float(np.median(np.diff(stamps))))
    print(f"decode ms per token at ~{a.pos + 20} positions:", [round(r, 2) for r in res])
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
