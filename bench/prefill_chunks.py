"""Time to first token and decode rate of bundles that differ in their prefill chunks (or in
anything else), on one checkpoint, prompts of several lengths (bench/run.py's prompt, cut), the
bundles taking turns within each round; and whether their greedy tokens agree.

  python3 bench/prefill_chunks.py CKPT BUNDLE... [--lengths 64,512] [--rounds 3] [--json OUT]   (GPU machine)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run import NEW_TOKENS, _timed_stream, bench_prompt, load_ours  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--lengths", default="512", help="comma-separated prompt lengths")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from iree_runner.generate import generate_step
    from iree_runner.sampling import SamplingParams

    sessions = {str(b): load_ours(a.ckpt, b, "cuda")[0] for b in a.bundles}
    results, same = {}, {}
    for n in (int(x) for x in a.lengths.split(",")):
        runs, tokens = {b: [] for b in sessions}, {}
        for _ in range(a.rounds):
            for b, s in sessions.items():
                prompt = bench_prompt(s.vocab_size)[:n]
                stream = lambda p, s=s: generate_step(s, p, SamplingParams(), NEW_TOKENS)  # noqa: E731
                _timed_stream(stream, prompt[:16], trials=1)
                r = _timed_stream(stream, prompt, trials=1)
                tokens.setdefault(b, r["tokens"])
                runs[b].append({k: r[k] for k in ("ttft_ms", "prefill_tps", "decode_tps")})
        first = next(iter(tokens.values()))
        same[n] = {b: t == first for b, t in tokens.items()}
        results[n] = runs
        for b, rs in runs.items():
            trials = ", ".join(f"{r['ttft_ms']:.2f}" for r in rs)
            print(f"{n:4d} tokens  {b}: TTFT median {statistics.median(r['ttft_ms'] for r in rs):6.2f} ms "
                  f"(trials {trials}), decode {statistics.median(r['decode_tps'] for r in rs):.1f} tok/s, "
                  f"same tokens: {same[n][b]}", flush=True)
    if a.json:
        json.dump({"results": results, "same_tokens": same}, open(a.json, "w"), indent=1)
    return 0 if all(all(v.values()) for v in same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
