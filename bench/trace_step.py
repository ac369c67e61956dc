"""Timeline of decode steps on the GPU machine (no Nsight Systems there): CUPTI through
torch.profiler records IREE's kernels and its cuLaunchKernel calls too (same process).

  python3 bench/trace_step.py BUNDLE_OR_DIAG_VARIANT OUT.json [--steps 10] [--prompt 512]

Prints, per burst of launches (launches less than 100 us apart): how many, how long the host
took to issue them, when their kernels ended, and how long the host issued nothing before it;
and the median cuLaunchKernel duration and interval. Kernels ending right after the last launch
mean the GPU waits for the host. Random weights (profile_step.random_session).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def bursts(launches: list[dict], gap_us: float = 100.0) -> list[list[dict]]:
    """Launches grouped where the host left less than gap_us between them."""
    out = [[launches[0]]]
    for e in launches[1:]:
        if e["ts"] - out[-1][-1]["ts"] <= gap_us:
            out[-1].append(e)
        else:
            out.append([e])
    return out


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).parent))
    from profile_step import random_session

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--pipelined", action="store_true",
                    help="queue each step before reading the one before, as generation does")
    a = ap.parse_args()
    s = random_session(a.bundle, "cuda")
    torch.zeros(1, device="cuda")  # torch's CUDA context exists before profiling starts

    def step(tokens):
        try:
            s.decode(7, greedy=True) if tokens is None else s.prefill(tokens, greedy=True)
        except FloatingPointError:  # random weights: timing only
            s.pos += 1 if tokens is None else len(tokens)

    def pipelined(n):
        """n steps, each queued before the one before is read; host ms to queue and to read."""
        queue, times = [s.decode_next()], []
        for _ in range(n):
            t0 = time.perf_counter()
            queue.append(s.decode_next())
            t1 = time.perf_counter()
            try:
                queue.pop(0).result()
            except FloatingPointError:
                pass
            times.append((1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t1)))
        s.wait()  # the step queued last is not read
        return times

    step(list(range(100, 100 + a.prompt)))
    for _ in range(5):
        step(None)
    if a.pipelined:
        t = np.array(pipelined(50))
        print(f"pipelined: queue {np.median(t[5:, 0]):.3f} ms, read {np.median(t[5:, 1]):.3f} ms (medians)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        if a.pipelined:
            pipelined(a.steps)
        else:
            for _ in range(a.steps):
                step(None)
    prof.export_chrome_trace(str(a.out))
    events = json.loads(a.out.read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    launches = sorted((e for e in events if e.get("cat") == "cuda_driver" and "aunch" in e["name"]),
                      key=lambda e: e["ts"])
    print(f"{a.bundle.name}: {len(kernels)} kernels, {len(launches)} launches in {a.steps} decode steps; "
          f"cuLaunchKernel median {np.median([e['dur'] for e in launches]):.1f} us, "
          f"interval {np.median(np.diff([e['ts'] for e in launches])):.1f} us")
    prev_end = None
    for b in bursts(launches):
        first, last = b[0]["ts"], b[-1]["ts"] + b[-1]["dur"]
        ks = [k for k in kernels if k["ts"] >= first][:len(b)]
        end = ks[-1]["ts"] + ks[-1]["dur"] - first if ks else float("nan")
        busy = sum(k["dur"] for k in ks)
        idle = first - prev_end if prev_end is not None else 0.0
        print(f"  {len(b):4d} launches: host {last - first:6.0f} us, kernels busy {busy:6.0f} us and done at "
              f"+{end:6.0f} us; host issued nothing for {idle:6.0f} us before")
        prev_end = last


if __name__ == "__main__":
    main()
