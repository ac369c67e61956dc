"""bench/run.py's timing: every runtime's metrics are medians over TRIALS generations (the JSON
keeps each trial), so one stall of the machine does not set a figure; its mlx_lm peer."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import run  # noqa: E402
from checkpoints import mlx_checkpoint  # noqa: E402


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


def test_the_mlx_peer_times_mlx_lm_own_greedy_generation_in_a_process_of_its_own():
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    ckpt = mlx_checkpoint("qwen3", "bfloat16", "q4", keys="v4")
    prompt = list(range(100, 124))
    r = run.bench_mlx(ckpt, "cpu", prompt)
    assert len(r["decode_tps_trials"]) == run.TRIALS and r["decode_tps"] > 0 and not r["tokens_vary"]
    assert r["versions"]["mlx-lm"] and r["mlx_device"] == str(mx.default_device())
    model, _ = load(str(ckpt))  # the same tokens as mlx_lm here, in this process
    assert r["tokens"] == [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=run.NEW_TOKENS)]


def test_the_mlx_peer_on_cuda_needs_mlx_computing_on_the_gpu():
    with pytest.raises(RuntimeError, match="not on the GPU"):
        run.bench_mlx(mlx_checkpoint("qwen3", "bfloat16", "q4", keys="v4"), "cuda", [100, 101])
