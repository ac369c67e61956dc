"""Greedy generation queues each step before the token of the one before is read
(iree_runner/generate.py): the same tokens as waiting for every step, and the session left as
if it had waited, however the caller stops. The default model on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from iree_runner.generate import DEFAULT_MODEL, generate_step, load_model
from iree_runner.sampling import SamplingParams

MAX_CONTEXT = 48
PROMPT = [0, 11, 23, 5, 40, 7]


@pytest.fixture(scope="module")
def session():
    return load_model(DEFAULT_MODEL, device="cpu", max_context=MAX_CONTEXT).session


def waited(session, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each step waited for before the next is queued."""
    session.reset()
    tokens = [session.prefill(prompt, greedy=True)]
    while len(tokens) < n and session.pos < session.max_context:
        tokens.append(session.decode(tokens[-1], greedy=True))
    return tokens


@pytest.mark.parametrize("n", [1, 2, 3, 17])
def test_pipelined_tokens_equal_waited_ones(session, n):
    want = waited(session, PROMPT, n)
    assert len(want) == n
    assert list(generate_step(session, PROMPT, SamplingParams(), n)) == want
    assert session.pos == len(PROMPT) + n - 1  # every token but the last went through the cache


def test_context_full_ends_generation_like_waiting(session):
    want = waited(session, PROMPT, 1000)
    assert len(want) == MAX_CONTEXT - len(PROMPT) + 1
    assert list(generate_step(session, PROMPT, SamplingParams(), 1000)) == want
    assert session.pos == MAX_CONTEXT


def test_early_stop_rewinds_the_step_queued_ahead(session):
    want = waited(session, PROMPT, 12)
    gen = generate_step(session, PROMPT, SamplingParams(), 12)
    got = [next(gen) for _ in range(5)]
    gen.close()  # a stop string or EOS: the caller stops with a step still queued
    assert got == want[:5]
    assert session.pos == len(PROMPT) + 4
    # The sequence goes on from there as if nothing had run ahead.
    rest = [session.decode(got[-1], greedy=True)]
    for _ in range(6):
        rest.append(session.decode(rest[-1], greedy=True))
    assert rest == want[5:]


def test_steps_queued_far_ahead_read_late(session):
    """Each token is copied out when its step is queued: reading it after later steps have
    reused the step's storage still gives its own value."""
    want = waited(session, PROMPT, 6)
    session.reset()
    got = [session.prefill(PROMPT, greedy=True)]
    queued = [session.decode_next() for _ in range(5)]
    assert got + [p.result() for p in queued] == want


def test_a_reset_session_keeps_its_cache_and_gives_a_fresh_sessions_tokens(session):
    """reset() keeps the cache buffers, stale rows and all: a new sequence after a longer one
    reads none of them."""
    fresh = load_model(DEFAULT_MODEL, device="cpu", max_context=MAX_CONTEXT).session
    want = waited(fresh, PROMPT[:3], 9)
    waited(session, PROMPT * 5, 18)  # rows far past the next sequence's end
    assert waited(session, PROMPT[:3], 9) == want
    assert list(generate_step(session, PROMPT[:3], SamplingParams(), 9)) == want


def test_logits_reads_are_the_callers_own_and_agree_with_the_device_argmax(session):
    """Logits come back through one host buffer that every read reuses: each read is a copy
    of its own step's row, whose argmax is the token the device picks for that step."""
    want = waited(session, PROMPT, 4)
    session.reset()
    rows = [session.prefill(PROMPT)]
    for token in want[:3]:
        rows.append(session.decode(token))
    assert [int(row.argmax()) for row in rows] == want
    assert all(rows[i] is not rows[j] and not np.array_equal(rows[i], rows[j])
               for i in range(4) for j in range(i))
