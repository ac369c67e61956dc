"""Sampling on the device (compile/kernels/sample.cu, checked against the host's draw on a GPU
by bench/cuda_kernels.py): here, what the host shares with it (the uniform numbers, the
settings' layout, the draw it falls back to) and generate.py's pipelined loop, with a stand-in
session whose device draws what the host would and leaves chosen steps to the host."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from iree_runner.generate import generate_step
from iree_runner.sampling import (DEVICE_MAX_TOP_K, SamplingParams, device_params, draw_at, make_sampler,
                                  samples_on_device, uniform)

VOCAB = 300


def test_uniform_numbers_are_24_bit_and_spread_evenly():
    u = np.array([uniform(seed, pos) for seed in (0, 1, 2**63 + 5) for pos in range(4000)])
    assert ((u >= 0) & (u < 1)).all() and (u * 2**24 == np.round(u * 2**24)).all()
    assert len(set(u.tolist())) > 0.999 * len(u)
    # 12000 draws: each decile's count is Binomial(12000, 0.1), sd 33; 6 sd is far past chance.
    counts = np.bincount((u * 10).astype(int), minlength=10)
    assert np.abs(counts - 1200).max() < 200, counts
    assert uniform(7, 3) == uniform(7, 3) != uniform(7, 4) != uniform(8, 3)


def test_device_params_layout():
    p = SamplingParams(temperature=0.6, top_k=20, top_p=0.95, min_p=0.05, repetition_penalty=1.25, seed=3)
    seed = (123 << 32) | 456
    got = device_params(p, seed)
    assert got.dtype == np.int32 and got.shape == (8,)
    f = got.view(np.float32)
    assert (f[0], got[1], f[2], f[3]) == (np.float32(0.6), 20, np.float32(0.95), np.float32(0.05))
    assert (got[4], got[5], f[6], got[7]) == (456, 123, np.float32(1.25), 0)
    assert not device_params(None).any() and not device_params(SamplingParams()).any()  # greedy
    # Greedy with a penalty: temperature 0, top-k 1 (the kernel's first candidate), top-p 1.
    got = device_params(SamplingParams(repetition_penalty=1.25))
    f = got.view(np.float32)
    assert (f[0], got[1], f[2], f[3], f[6]) == (0.0, 1, np.float32(1.0), 0.0, np.float32(1.25))


@pytest.mark.parametrize("params, on_device", [
    (SamplingParams(temperature=0.6, top_k=20, top_p=0.95), True),
    (SamplingParams(temperature=1.0, top_k=DEVICE_MAX_TOP_K), True),
    (SamplingParams(temperature=1.0, top_k=DEVICE_MAX_TOP_K + 1), False),
    (SamplingParams(temperature=0.7, top_p=0.9), True),  # top-k off: the nucleus of the whole vocabulary
    (SamplingParams(temperature=0.7, min_p=0.05), True),
    (SamplingParams(temperature=0.7), True),  # a plain temperature: the whole vocabulary
    (SamplingParams(temperature=1.0, top_k=DEVICE_MAX_TOP_K + 1, top_p=0.9), False),
    (SamplingParams(temperature=0.7, top_k=151_936, top_p=0.9), False),  # top-k at the vocabulary: on the host
    (SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.1), True),  # the steps keep the history
    (SamplingParams(temperature=0.7, repetition_penalty=0.9), True),
    (SamplingParams(repetition_penalty=1.1), True),  # greedy with a penalty: the penalized logits' argmax
    (SamplingParams(), False),  # greedy: the argmax, not a draw
])
def test_which_settings_the_device_draws_with(params, on_device):
    assert samples_on_device(params) == on_device


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=30, top_p=0.9, min_p=0.02, seed=11),
                                    SamplingParams(temperature=0.8, seed=11),
                                    SamplingParams(temperature=0.8, top_k=30, repetition_penalty=1.3, seed=11),
                                    SamplingParams(repetition_penalty=1.3)])  # greedy: the penalized argmax
def test_draw_at_is_the_samplers_draw_at_that_uniform_number(monkeypatch, params):
    """draw_at(logits, params, seed, position, tokens) draws as make_sampler does when the
    generator's next number is uniform(seed, position), the sequence so far being tokens."""
    rng = np.random.default_rng(0)
    changed = 0  # draws the penalty changed: it must be applied, not only accepted
    for pos in range(50):
        logits = (rng.standard_normal(VOCAB) * 2).astype(np.float32)
        tokens = list(np.argsort(logits)[::-1][:5]) + list(rng.integers(0, VOCAB, 20))
        u = uniform(11, pos)
        monkeypatch.setattr(np.random, "default_rng", lambda seed, u=u: type("Fixed", (), {"random": lambda self: u})())
        want = make_sampler(params)(logits, tokens)
        monkeypatch.undo()
        assert draw_at(logits, params, 11, pos, tokens) == want
        changed += draw_at(logits, params, 11, pos) != want
    assert (changed > 0) == (params.repetition_penalty != 1.0)


# ---------------------------------------------------------------------------------------------
# generate.py's loop against a stand-in session


def _logits(pos: int, token: int) -> np.ndarray:
    """The stand-in model: the logits at position pos after `token`, which it likes to repeat
    (so that a repetition penalty changes even greedy's tokens)."""
    logits = (np.random.default_rng(pos * 1000 + token).standard_normal(VOCAB) * 2).astype(np.float32)
    logits[token] += 6
    return logits


class _Pending:
    def __init__(self, token: int, left_to_host: bool):
        self._token, self.left_to_host = token, left_to_host

    def result(self) -> int:
        return self._token


class StandInSession:
    """Positions, rewinds and queued steps as Session has them; each step's token drawn as the
    kernel draws it (draw_at), or left to the host at positions in `leave` (a stand-in token 0)."""

    SETS = {"prefill": 1, "decode": 2}
    samples_on_device = True

    def __init__(self, leave=(), max_context: int = 64):
        self.leave, self.max_context, self.pos = set(leave), max_context, 0
        self.params = self.seed = None
        self.runs = []  # (kind, position of the sampled row)
        self.seq = []  # the tokens by position, as the steps write them (the kernel's history)

    def reset(self):
        self.pos, self.params = 0, None

    def set_sampling(self, params, seed=0):
        self.params, self.seed = params, seed

    def rewind(self, steps):
        assert 0 <= steps <= self.pos
        self.pos -= steps

    def _write(self, tokens):
        self.seq = self.seq[:self.pos] + list(tokens)
        self.pos += len(tokens)

    def _step(self, token: int, read: str):
        row = self.pos - 1
        self.runs.append((read, row))
        logits = _logits(row, token)
        if read == "logits":
            return logits
        if row in self.leave:
            self.leave.discard(row)  # the host's rerun of the step reads its logits instead
            return _Pending(0, True)
        return _Pending(draw_at(logits, self.params, self.seed, row, self.seq), False)

    def queue_prefill(self, prompt):
        self._write(prompt)
        return self._step(prompt[-1], "token")

    def prefill(self, prompt):
        self._write(prompt)
        return self._step(prompt[-1], "logits")

    def decode_next(self, token=None):
        # The device's own token is the last pending one's; a host token is given.
        token = self._device_token if token is None else token
        self._write([token])
        return self._step(token, "token")

    def decode(self, token):
        self._write([token])
        return self._step(token, "logits")


def _reference(prompt, params, seed, n):
    """Each token drawn on the host from the stand-in model, one after the other (the sequence
    so far for the repetition penalty)."""
    tokens, token = [], prompt[-1]
    for i in range(n):
        token = draw_at(_logits(len(prompt) - 1 + i, token), params, seed, len(prompt) - 1 + i, prompt + tokens)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("temperature, penalty", [(0.9, 1.0), (0.9, 3.0), (0.0, 3.0)])
@pytest.mark.parametrize("leave", [(), (5,), (6, 7), (5, 9, 12), (8,)])
def test_pipelined_sampling_equals_drawing_each_step_on_the_host(leave, temperature, penalty):
    """Wherever the device leaves a draw to the host (position 5 is the prompt's own step), the
    tokens are those of the host drawing every step, and the session ends where it would; with
    a repetition penalty (sampled, or greedy), the host's draws take the sequence so far, as the
    kernel's do."""
    params = SamplingParams(temperature=temperature, top_k=40, top_p=0.95, repetition_penalty=penalty, seed=1234)
    prompt = [1, 2, 3, 4, 5, 6]
    s = StandInSession(leave)
    # The stand-in's "device token" of decode_next: the token the step before it yields.
    got = []
    for token in _tracking(s, generate_step(s, prompt, params, 12)):
        got.append(token)
    assert got == _reference(prompt, params, 1234, 12)
    if penalty != 1.0:  # the penalty changes this run's tokens: the sequence is in use
        assert got != _reference(prompt, replace(params, repetition_penalty=1.0), 1234, 12)
    assert s.pos == len(prompt) + 11
    assert not s.leave  # every step left to the host was drawn there


def _tracking(s, gen):
    """Feeds the stand-in session each step's device token as decode_next reads it: the
    token of the step queued last (its draw, or the stand-in 0 when left to the host)."""
    real_step = s._step

    def step(token, read):
        out = real_step(token, read)
        if read == "token":
            s._device_token = out.result()
        return out
    s._step = step
    yield from gen


def test_an_early_stop_rewinds_the_steps_queued_ahead():
    params = SamplingParams(temperature=0.9, top_k=40, seed=5)
    prompt = [1, 2, 3]
    s = StandInSession()
    gen = _tracking(s, generate_step(s, prompt, params, 20))
    got = [next(gen) for _ in range(4)]
    gen.close()
    assert got == _reference(prompt, params, 5, 4)
    assert s.pos == len(prompt) + 3


def test_the_host_takes_over_when_the_device_keeps_leaving_the_draw_to_it():
    """A flat distribution with top-k off: every step left to the host runs twice. After
    generate.HOST_AFTER such steps (over a quarter of those so far), the host draws the rest,
    at the same uniform numbers: the same tokens, and no more steps read as tokens."""
    import iree_runner.generate as generate

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=9)
    prompt = [1, 2, 3, 4]
    s = StandInSession(leave=range(3, 60))
    got = list(_tracking(s, generate_step(s, prompt, params, 20)))
    assert got == _reference(prompt, params, 9, 20)
    assert s.pos == len(prompt) + 19
    # Steps read as tokens stop within the first rows (HOST_AFTER left to the host, and steps
    # queued ahead of them); from there on each row is run once, read back as logits.
    last = max(i for i, (read, _) in enumerate(s.runs) if read == "token")
    assert s.runs[last][1] <= len(prompt) - 1 + 2 * generate.HOST_AFTER
    rest = [row for _, row in s.runs[last + 1:]]
    assert rest[-1] == len(prompt) - 2 + 20 and rest[1:] == list(range(rest[1], rest[-1] + 1))
    assert s.params is None  # the device went back to the argmax (its cheapest path)
