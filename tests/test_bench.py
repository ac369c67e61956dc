"""bench/run.py's timing: every runtime's metrics are medians over TRIALS generations (the JSON
keeps each trial), so one stall of the machine does not set a figure."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import run  # noqa: E402


def test_each_metric_is_the_median_of_the_trials():
    calls = []

    def stream(prompt):
        calls.append(len(prompt))
        yield from range(run.NEW_TOKENS)

    r = run._timed_stream(stream, list(range(16)), sync=lambda: None)
    assert calls == [16] * run.TRIALS
    for k in run.METRICS:
        assert len(r[f"{k}_trials"]) == run.TRIALS
        assert r[k] == statistics.median(r[f"{k}_trials"])
    assert r["tokens"] == list(range(run.NEW_TOKENS)) and not r["tokens_vary"]


def test_tokens_that_vary_between_trials_are_flagged():
    trial = iter(range(run.TRIALS))

    def stream(prompt):
        first = next(trial)
        yield from [first] + [0] * (run.NEW_TOKENS - 1)

    r = run._timed_stream(stream, [1, 2], sync=lambda: None)
    assert r["tokens"][0] == 0 and r["tokens_vary"]
