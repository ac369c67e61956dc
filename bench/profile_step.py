"""Per-dispatch GPU times of one prefill chunk and one decode step of a bundle, with random weights.

Run under Nsight Compute:  ncu --csv --metrics gpu__time_duration.sum python3 bench/profile_step.py BUNDLE
or, for the decode step alone, `ncu --profile-from-start off ...` with PROFILE_DECODE=1 (the
script brackets one decode step with cuProfilerStart/Stop; PROFILE_SAMPLED=1: its token drawn on the
device with bench/run.py SAMPLED; PROFILE_SAMPLED=plain: with its PLAIN). BUNDLE may also be a
`bench/diag_cuda.py make` variant directory.
(IREE names each dispatch after its work, e.g. decode_dispatch_7_matmul_1x3072x1024_f16xf16xf32,
so the slow ones show up by name.) Also prints wall times of the two steps without the profiler.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from iree_runner.bundle import read_manifest
from iree_runner.session import Session


def random_session(bundle: Path, target: str = "cuda") -> Session:
    """A session of a bundle, or of a `bench/diag_cuda.py make` variant, on random weights."""
    if (bundle / "meta.json").exists():  # a bench/diag_cuda.py variant
        sys.path.insert(0, str(Path(__file__).parent))
        from diag_cuda import session_for

        return session_for(bundle, target)
    m = read_manifest(bundle)
    b = m.targets[target]
    w = {n: random_weight(n, tuple(s), d) for n, s, d in zip(b.weight_names, b.weight_shapes, b.dtypes())}
    return Session(bundle, b, w, **m.session_options)


def random_weight(name: str, shape: tuple, dtype: str) -> np.ndarray:
    """Weight `name`'s random values, seeded by its name, so that bundles whose steps take a
    weight in other arguments (packed `.scales_biases`, or bundle format 2's `.scales` and
    `.biases`) get the same values: bench/compare_steps.py across such a change."""
    if name.endswith(".scales_biases"):
        base = name.removesuffix("scales_biases")
        return np.stack([random_weight(base + part, shape[:-1], dtype) for part in ("scales", "biases")], axis=-1)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if dtype == "uint32":  # packed words
        return rng.integers(0, 2**32, shape, dtype=np.uint32)
    w = rng.standard_normal(shape, dtype=np.float32) * 0.02
    if name.endswith((".scales", ".biases")):  # BF16 values, as in an MLX checkpoint, whatever the pairs' dtype
        w = w.astype(ml_dtypes.bfloat16)
    return w.astype(dtype)


def main(bundle: Path, target: str = "cuda", steps: int = 1) -> None:
    rng = np.random.default_rng(0)
    s = random_session(bundle, target)
    prompt = rng.integers(100, 1000, int(os.environ.get("PROFILE_PROMPT", s.chunk))).tolist()  # tokens before the step
    for _ in range(steps):
        s.reset()
        if os.environ.get("PROFILE_SAMPLED"):  # the step's token drawn on the device, as bench/run.py samples
            from iree_runner.sampling import SamplingParams
            from run import PLAIN, SAMPLED

            settings = PLAIN if os.environ["PROFILE_SAMPLED"] == "plain" else SAMPLED
            s.set_sampling(SamplingParams(**settings), settings["seed"])
        t0 = time.perf_counter()
        tok = s.prefill(prompt, greedy=True)
        t1 = time.perf_counter()
        if os.environ.get("PROFILE_DECODE"):
            cuda = ctypes.CDLL("libcuda.so.1")
            cuda.cuProfilerStart()
        s.decode(tok, greedy=True)
        if os.environ.get("PROFILE_DECODE"):
            cuda.cuProfilerStop()
        t2 = time.perf_counter()
        print(f"prefill chunk {1e3 * (t1 - t0):.2f} ms, decode step {1e3 * (t2 - t1):.2f} ms", file=sys.stderr)


def summarize(csv_path: Path, top: int = 14) -> None:
    """Group an `ncu --csv` log of one prefill chunk then one decode step by dispatch name
    (plain csv: it runs where pandas is not installed)."""
    import csv
    import io
    import re

    text = csv_path.read_text()
    rows = [r for r in csv.DictReader(io.StringIO(text[text.find('"ID"'):]))
            if r["Metric Name"] == "gpu__time_duration.sum"]
    steps: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        kernel = r["Kernel Name"]
        name = re.sub(r"^.*_dispatch_\d+_", "", kernel)
        if "_dispatch_" not in kernel and "Grid Size" in r:  # hand-written kernels: one name for every shape
            name += f" grid {r['Grid Size']}"
        module = re.match(r"^(prefill|decode)_dispatch", kernel)
        steps.setdefault(module[1] if module else "", []).append((name, float(r["Metric Value"].replace(",", "")) / 1000))
    # kernels named main_dispatch_*: one profiled step (PROFILE_DECODE)
    groups = [("profiled step", [x for g in steps.values() for x in g])] if set(steps) <= {""} else \
        [(step, steps.get(step, [])) for step in ("prefill", "decode")]
    for step, g in groups:
        print(f"== {step}: {len(g)} dispatches, {sum(us for _, us in g):.0f} us on the GPU")
        by: dict[str, list[float]] = {}
        for name, us in g:
            by.setdefault(name, []).append(us)
        print(f"{'name':60s} {'count':>5s} {'sum':>9s} {'mean':>8s}")
        for name, v in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:top]:
            print(f"{name[:60]:60s} {len(v):5d} {sum(v):9.3f} {sum(v) / len(v):8.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "--summarize":
        summarize(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]), *(sys.argv[2:3] or ["cuda"]), steps=int(sys.argv[3]) if len(sys.argv) > 3 else 1)
