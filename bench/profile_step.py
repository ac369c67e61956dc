"""Per-dispatch GPU times of one prefill chunk and one decode step of a bundle, with random weights.

Run under Nsight Compute:  ncu --csv --metrics gpu__time_duration.sum python3 bench/profile_step.py BUNDLE
or, for the decode step alone, `ncu --profile-from-start off ...` with PROFILE_DECODE=1 (the
script brackets one decode step with cuProfilerStart/Stop). BUNDLE may also be a
`bench/diag_cuda.py make` variant directory.
(IREE names each dispatch after its work, e.g. decode_dispatch_7_matmul_1x3072x1024_f16xf16xf32,
so the slow ones show up by name.) Also prints wall times of the two steps without the profiler.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

from iree_runner.bundle import read_manifest
from iree_runner.session import Session


def random_session(bundle: Path, target: str = "cuda") -> Session:
    """A session of a bundle, or of a `bench/diag_cuda.py make` variant, on random weights."""
    rng = np.random.default_rng(0)
    if (bundle / "meta.json").exists():  # a bench/diag_cuda.py variant
        sys.path.insert(0, str(Path(__file__).parent))
        from diag_cuda import session_for

        return session_for(bundle, target)
    m = read_manifest(bundle)
    b = m.targets[target]
    w = {n: rng.integers(0, 2**32, s, dtype=np.uint32) if d == "uint32"  # packed words
         else (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(d)
         for n, s, d in zip(b.weight_names, b.weight_shapes, b.dtypes())}
    return Session(bundle, b, w, max_context=m.max_context, prefill_chunk=m.prefill_chunk)


def main(bundle: Path, target: str = "cuda", steps: int = 1) -> None:
    rng = np.random.default_rng(0)
    s = random_session(bundle, target)
    prompt = rng.integers(100, 1000, int(os.environ.get("PROFILE_PROMPT", s.chunk))).tolist()  # tokens before the step
    for _ in range(steps):
        s.reset()
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
    """Group an `ncu --csv` log of one prefill chunk then one decode step by dispatch name."""
    import io

    import pandas as pd

    text = csv_path.read_text()
    df = pd.read_csv(io.StringIO(text[text.find('"ID"'):]))
    df = df[df["Metric Name"] == "gpu__time_duration.sum"].copy()
    df["us"] = pd.to_numeric(df["Metric Value"].astype(str).str.replace(",", ""), errors="coerce") / 1000
    df["name"] = df["Kernel Name"].str.replace(r"^.*_dispatch_\d+_", "", regex=True)
    df["module"] = df["Kernel Name"].str.extract(r"^(prefill|decode)_dispatch", expand=False)
    if "Grid Size" in df:  # hand-written kernels (compile/kernels) have one name for every shape
        own = ~df["Kernel Name"].str.contains("_dispatch_")
        df.loc[own, "name"] = df.loc[own, "name"] + " grid " + df.loc[own, "Grid Size"].astype(str)
    groups = [(step, df[df.module == step]) for step in ("prefill", "decode")]
    if df.module.isna().all():  # kernels named main_dispatch_*: one profiled step (PROFILE_DECODE)
        groups = [("profiled step", df)]
    for step, g in groups:
        print(f"== {step}: {len(g)} dispatches, {g.us.sum():.0f} us on the GPU")
        print(g.groupby("name").us.agg(["count", "sum", "mean"]).sort_values("sum", ascending=False).head(top).to_string())


if __name__ == "__main__":
    if sys.argv[1] == "--summarize":
        summarize(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]), *(sys.argv[2:3] or ["cuda"]), steps=int(sys.argv[3]) if len(sys.argv) > 3 else 1)
