"""Decode wall time per token under IREE CUDA runtime flags (streams vs graphs, inline execution).

  python bench/launch_overhead.py BUNDLE_OR_DIAG_VARIANT [--steps 64] [--prompt 512]

Runs the decode step of a bundle or a `bench/diag_cuda.py make` variant (random weights) in one process per
flag setting (the flags are process-wide and read when the driver is created) and prints the
median ms per token, greedy (one int read back per step): each step waited for, and pipelined as
generation runs it (the next step queued before a token is read); then sampled as bench/run.py
samples (on the device where the bundle's steps do, pipelined as greedy), and with the host
drawing from each step's logits row, its two parts timed apart. `--device cpu` times a CPU
bundle the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "streams": [],  # the default
    "streams + inline": ["--cuda_allow_inline_execution=true"],
    "graphs": ["--cuda_use_streams=false"],
    "graphs + inline": ["--cuda_use_streams=false", "--cuda_allow_inline_execution=true"],
    "no async alloc": ["--cuda_async_allocations=false"],
    "tracing off": ["--cuda_tracing=0"],
}


def child(variant: Path, steps: int, flags: list[str], prompt: int, device: str = "cuda") -> None:
    import numpy as np
    import iree.runtime as rt

    if flags:
        rt.flags.parse_flags(*flags)
    sys.path.insert(0, str(Path(__file__).parent))
    from profile_step import random_session

    s = random_session(variant, device)
    prompt = prompt or s.chunk
    s.prefill(list(range(5, 5 + prompt)))
    token = 7
    times = []
    for _ in range(min(steps, s.max_context - prompt)):
        t0 = time.perf_counter()
        try:
            token = s.decode(token, greedy=True)
        except FloatingPointError:  # timing only: a variant with non-finite logits still runs
            s.pos, token = s.pos + 1, 7
        times.append(time.perf_counter() - t0)
    res = {"ms_per_token": 1e3 * float(np.median(times[3:])), "min_ms": 1e3 * min(times)}
    # As generation runs it: the next step queued before a token is read (iree_runner/generate.py).
    from iree_runner.generate import generate_step
    from iree_runner.sampling import SamplingParams

    n = min(steps, s.max_context - prompt)
    stamps = []
    for _ in generate_step(s, list(range(5, 5 + prompt)), SamplingParams(), n + 1):
        stamps.append(time.perf_counter())
    gaps = np.diff(stamps)[3:]
    # The mean too: what a generation's tok/s sees, a late step included (bench/run.py).
    res |= {"pipelined_ms_per_token": 1e3 * float(np.median(gaps)), "pipelined_mean_ms": 1e3 * float(gaps.mean()),
            "pipelined_max_ms": 1e3 * float(gaps.max())}
    # Sampled as bench/run.py samples: as generation does (on the device where the bundle's
    # steps do), then with the host drawing from each step's logits row: per token, and its two
    # parts, the step with the row's read (waited) and the host's draw. "plain": a plain
    # temperature (the whole vocabulary), as generation draws it; "penalty": SAMPLED with a
    # repetition penalty; "greedy_penalty": greedy with one (the device's top-k path, k = 1).
    from run import SAMPLED, SAMPLED_RUNS, drawn_on
    from iree_runner.sampling import make_sampler

    sampled = {}
    for key, settings, device in SAMPLED_RUNS:
        with drawn_on(s, device):
            stamps = []
            for _ in generate_step(s, list(range(5, 5 + prompt)), SamplingParams(**settings), n + 1):
                stamps.append(time.perf_counter())
        gaps = np.diff(stamps)[3:]
        sampled |= {f"{key}_ms_per_token": 1e3 * float(np.median(gaps)), f"{key}_mean_ms": 1e3 * float(gaps.mean())}
    sampler, history, reads, draws = make_sampler(SamplingParams(**SAMPLED)), list(range(5, 5 + prompt)), [], []
    s.reset()
    logits = s.prefill(history)
    for _ in range(n):
        t0 = time.perf_counter()
        history.append(sampler(logits, history))
        t1 = time.perf_counter()
        logits = s.decode(history[-1])
        reads.append(time.perf_counter() - t1)
        draws.append(t1 - t0)
    res |= sampled | {"sampled_on_device": getattr(s, "samples_on_device", False), "host_step_and_read_ms": 1e3 * float(np.median(reads[3:])),
                      "host_draw_ms": 1e3 * float(np.median(draws[3:]))}
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", type=Path)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=0, help="tokens before the timed steps (default: one prefill chunk)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from: " + ", ".join(SETTINGS))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (a cpu bundle; the settings do not apply)")
    a = ap.parse_args()
    if a.device != "cuda":
        return child(a.variant, a.steps, [], a.prompt, a.device)
    if "LAUNCH_OVERHEAD_FLAGS" in os.environ:  # a child: one setting
        return child(a.variant, a.steps, os.environ["LAUNCH_OVERHEAD_FLAGS"].split(), a.prompt)
    for name in a.settings.split(","):
        flags = SETTINGS[name]
        p = subprocess.run([sys.executable, __file__, str(a.variant), "--steps", str(a.steps), "--prompt", str(a.prompt)],
                           capture_output=True,
                           text=True, env=os.environ | {"LAUNCH_OVERHEAD_FLAGS": " ".join(flags)})
        res = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-500:]}
        print(f"{a.variant.name:12s} {name:20s} {res}", flush=True)


if __name__ == "__main__":
    main()
