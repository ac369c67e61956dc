"""Sampling on the device against the host, through whole steps of a bundle (random weights).

  python bench/device_sampling_check.py BUNDLE [BUNDLE ...]   # GPU machine

For each sampling setting: generate_step draws each token on the device (kernels/sample.cu),
pipelined; then the host runs the same steps one by one, reading each logits row and drawing
with sampling.draw_at at the same uniform number. Prints the tokens until the first
difference (the device's float sums can differ from the host's in the last bits, so a draw
landing within ~1e-6 of a boundary may differ: rare, and reported with the gap), and how many
steps the device left to the host.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import iree_runner.generate as generate  # noqa: E402
from iree_runner.generate import generate_step  # noqa: E402
from iree_runner.sampling import SamplingParams, draw_at, samples_on_device  # noqa: E402
from iree_runner.sampling import _scaled, _survivors, uniform  # noqa: E402

SETTINGS = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=1),
            SamplingParams(temperature=1.0, top_k=64, seed=2),
            SamplingParams(temperature=1.5, top_k=50, top_p=0.9, min_p=0.05, seed=3),
            SamplingParams(temperature=0.6, top_p=0.9, seed=4),  # top-k off (Llama 3's settings)
            SamplingParams(temperature=1.0, min_p=0.1, seed=5),
            SamplingParams(temperature=0.8, seed=6),  # a plain temperature: the whole vocabulary
            # the repetition penalty over the sequence so far (the steps' history on the device)
            SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3, seed=7),
            SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.1, seed=8),
            SamplingParams(temperature=1.0, repetition_penalty=1.5, seed=9),
            SamplingParams(repetition_penalty=1.3, seed=10)]  # greedy: the penalized logits' argmax
PROMPT, TOKENS = list(range(100, 612)), 96


def edge_gap(logits: np.ndarray, params: SamplingParams, position: int, sequence: list[int]) -> float:
    """How far the draw's uniform number lies from the nearest boundary of the host's CDF."""
    from cuda_kernels import cdf_gap

    _, values = _survivors(_scaled(logits, sequence, params), params)
    return cdf_gap(values, uniform(params.seed, position))


def check(bundle: Path) -> int:
    from profile_step import random_session

    s = random_session(bundle)
    assert s.samples_on_device, f"{bundle}: its steps do not sample on the device"
    bad = 0
    for params in SETTINGS:
        assert samples_on_device(params)
        host_draws = []
        real = generate._draw_on_host
        generate._draw_on_host = lambda *a: host_draws.append(1) or real(*a)  # count the steps left to the host
        try:
            device = list(generate_step(s, PROMPT, params, TOKENS))
        finally:
            generate._draw_on_host = real
        s.reset()
        logits, host, gaps = s.prefill(PROMPT), [], []
        for i in range(TOKENS):
            pos = len(PROMPT) - 1 + i
            sequence = PROMPT + host  # the tokens so far (the repetition penalty's)
            host.append(draw_at(logits, params, params.seed, pos, sequence))
            gaps.append(edge_gap(logits, params, pos, sequence))
            if i + 1 < TOKENS:
                logits = s.decode(host[-1])
        same = next((i for i, (a, b) in enumerate(zip(device, host)) if a != b), TOKENS)
        note = "" if same == TOKENS else f", first difference at {same}: uniform {gaps[same]:.1e} from a boundary"
        ok = same == TOKENS or gaps[same] < 1e-6
        print(f"{bundle.name} {params}: {same}/{TOKENS} equal, {len(set(device))} distinct tokens, "
              f"{len(host_draws)} left to the host{note} "
              f"{'OK' if ok else 'WRONG'}", flush=True)
        bad += not ok
    return bad


if __name__ == "__main__":
    sys.exit(1 if sum(check(Path(b)) for b in sys.argv[1:]) else 0)
