"""Next-token selection from logits: greedy, or sampling with the processors of transformers'
`generate` in its order: repetition penalty, then temperature, top-k, top-p and min-p.

Each step is a separate function on a 1-D float32 numpy array so it can be checked against
transformers' logits processors; removed tokens get -inf, like their `filter_value`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "SamplingParams",
    "make_sampler",
    "process_logits",
    "filter_logits",
    "apply_repetition_penalty",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
]

_DRAW_BLOCK = 1024

Sampler = Callable[[np.ndarray, Sequence[int]], int]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # None = fresh entropy

    def validate(self) -> None:
        def fail(option: str, expected: str, value) -> None:
            raise ValueError(f"sampling option {option} must be {expected}, got {value!r}")

        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            fail("temperature", "a finite number >= 0 (0 = greedy)", self.temperature)
        if not _is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0 = off)", self.top_k)
        if not _is_real(self.top_p) or not (0 < self.top_p <= 1):
            fail("top_p", "in (0, 1] (1 = off)", self.top_p)
        if not _is_real(self.min_p) or not (0 <= self.min_p < 1):
            fail("min_p", "in [0, 1) (0 = off)", self.min_p)
        if not _is_real(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a finite number > 0 (1 = off)", self.repetition_penalty)
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            fail("seed", "None or an integer >= 0", self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_argmax(self) -> bool:
        """Greedy without a repetition penalty: the logits' own argmax, which a step computes
        whatever its sampling kernel."""
        return self.greedy and self.repetition_penalty == 1.0


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _as_logits(logits) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array [vocab], got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    logits = logits.astype(np.float32, copy=False)
    if np.isnan(logits.max()) or logits.max() == np.inf:  # max propagates NaN
        raise ValueError("logits contain NaN or +inf")
    return logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    # float32 like transformers' processors on float32 scores; -inf -> probability 0.
    shifted = logits - logits.max()
    e = np.exp(shifted)
    return e / e.sum(dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Processing steps. The public functions check their input and return a new array; the private
# ones trust a float32 vector and may return it unchanged when they have nothing to do.

_NEG_INF = np.float32(-np.inf)


def _penalize(logits: np.ndarray, tokens: Sequence[int], penalty: float) -> np.ndarray:
    if penalty == 1.0 or len(tokens) == 0:
        return logits
    seen = np.unique(np.asarray(tokens, dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < logits.shape[0])]
    out = logits.copy()
    score = out[seen]
    out[seen] = np.where(score < 0, score * np.float32(penalty), score / np.float32(penalty))
    return out


# The filters keep a subset of the tokens. They work on the survivors as (ids, values): ids
# ascending, or None for every token, values the survivors' logits in id order. With top-k on,
# the later filters and the draw touch k tokens instead of the vocabulary: the work per sampled
# token (152k vocabulary, top-k 20, top-p 0.95) fell from 0.46 to 0.19 ms on this project's 2-core
# machine, and from 1.45 to 0.70 ms on a lent H100's host (bench/launch_overhead.py). The
# results are those of full-vocabulary passes, bit for bit: every float32 sum that depends on
# where the survivors sit (min-p's softmax, the draw) runs on the full scattered vector.


def _top_k(ids, values: np.ndarray, top_k: int):
    if top_k <= 0 or top_k >= values.shape[0]:
        return ids, values
    kth = np.partition(values, -top_k)[-top_k]
    return _keep(ids, values, values >= kth)  # ties at the border survive


def _top_p(ids, values: np.ndarray, top_p: float):
    if top_p >= 1.0:
        return ids, values
    # The tokens removed are a prefix of the ascending order, so they are the ones below the
    # first kept value: a sort of the values is enough (no argsort, no scatter).
    ascending = np.sort(values[np.isfinite(values)])
    cumulative = np.cumsum(_softmax(ascending), dtype=np.float32)
    removed = int(np.searchsorted(cumulative, np.float32(1 - top_p), side="right"))
    threshold = ascending[min(removed, len(ascending) - 1)]  # the top token always survives
    return _keep(ids, values, values >= threshold)


def _min_p(ids, values: np.ndarray, min_p: float, vocab: int):
    if min_p <= 0:
        return ids, values
    probs = _softmax(_scatter(ids, values, vocab))
    # The top token always survives: its probability is >= min_p * itself.
    keep = probs >= np.float32(min_p) * probs.max()
    return _keep(ids, values, keep if ids is None else keep[ids])


def _keep(ids, values: np.ndarray, mask: np.ndarray):
    kept = np.flatnonzero(mask)
    return (kept if ids is None else ids[kept]), values[kept]


def _scatter(ids, values: np.ndarray, vocab: int) -> np.ndarray:
    """The full logits vector: the survivors' values, -inf elsewhere."""
    if ids is None:
        return values
    out = np.full(vocab, _NEG_INF)
    out[ids] = values
    return out


def _survivors(logits: np.ndarray, params: SamplingParams):
    ids, values = _top_k(None, logits, params.top_k)
    ids, values = _top_p(ids, values, params.top_p)
    return _min_p(ids, values, params.min_p, logits.shape[0])


def _filter(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    return _scatter(*_survivors(logits, params), logits.shape[0])


def _scaled(logits: np.ndarray, tokens: Sequence[int], params: SamplingParams) -> np.ndarray:
    """The logits after the repetition penalty and the temperature (unless greedy)."""
    out = _penalize(logits, tokens, params.repetition_penalty)
    if not params.greedy and params.temperature != 1.0:
        out = out / np.float32(params.temperature)
    return out


def _process(logits: np.ndarray, tokens: Sequence[int], params: SamplingParams) -> np.ndarray:
    return _filter(_scaled(logits, tokens, params), params)


def _fresh(result: np.ndarray, source: np.ndarray) -> np.ndarray:
    return result.copy() if result is source else result


def apply_repetition_penalty(logits: np.ndarray, tokens: Sequence[int], penalty: float) -> np.ndarray:
    """RepetitionPenaltyLogitsProcessor: for each distinct token already seen,
    logit < 0 ? logit * penalty : logit / penalty (ids outside the vocabulary are ignored)."""
    logits = _as_logits(logits)
    return _fresh(_penalize(logits, tokens, penalty), logits)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """TemperatureLogitsWarper: logits / temperature (temperature > 0)."""
    if not temperature > 0:
        raise ValueError(f"temperature for scaling must be > 0, got {temperature!r}")
    return _as_logits(logits) / np.float32(temperature)


def top_k_filter(logits: np.ndarray, top_k: int) -> np.ndarray:
    """TopKLogitsWarper: keep logits >= the k-th largest (ties at the border survive)."""
    logits = _as_logits(logits)
    return _fresh(_scatter(*_top_k(None, logits, top_k), logits.shape[0]), logits)


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """TopPLogitsWarper: in ascending order, drop the tokens whose cumulative probability is
    <= 1 - top_p; the most likely token always survives. Tokens tied with the smallest kept
    logit all survive (HF's unstable sort keeps an arbitrary subset of such ties)."""
    logits = _as_logits(logits)
    return _fresh(_scatter(*_top_p(None, logits, top_p), logits.shape[0]), logits)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """MinPLogitsWarper: drop tokens with probability < min_p * (top probability)."""
    logits = _as_logits(logits)
    return _fresh(_scatter(*_min_p(None, logits, min_p, logits.shape[0]), logits.shape[0]), logits)


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """top-k, then top-p, then min-p; removed tokens are -inf."""
    logits = _as_logits(logits)
    return _fresh(_filter(logits, params), logits)


def process_logits(logits: np.ndarray, tokens: Sequence[int], params: SamplingParams) -> np.ndarray:
    """The logits a sampling step draws from: repetition penalty, temperature (unless greedy),
    then the filters, in the order of transformers' generate."""
    logits = _as_logits(logits)
    return _fresh(_process(logits, tokens, params), logits)


# ---------------------------------------------------------------------------------------------
# Samplers


def make_sampler(params: SamplingParams) -> Sampler:
    """(logits [V], tokens so far incl. the prompt) -> next token id.

    temperature 0: argmax (lowest id on ties) of the logits after the repetition penalty, which
    transformers applies in greedy decoding too. Otherwise one draw from softmax(process_logits)
    with a numpy Generator seeded by params.seed: the same seed gives the same tokens.
    """
    params.validate()
    if params.greedy:
        def greedy(logits: np.ndarray, tokens: Sequence[int] = ()) -> int:
            return int(np.argmax(_penalize(_as_logits(logits), tokens, params.repetition_penalty)))

        return greedy

    rng = np.random.default_rng(params.seed)

    def sample(logits: np.ndarray, tokens: Sequence[int] = ()) -> int:
        logits = _scaled(_as_logits(logits), tokens, params)
        return _draw(*_survivors(logits, params), logits.shape[0], rng.random())

    return sample


# ---------------------------------------------------------------------------------------------
# Sampling on the device (compile/kernels/sample.cu): the same repetition penalty (over the token
# history the steps keep on the device), filters and inverse-CDF draw, in the same order, with
# one uniform number per position from a counter-based generator, so a token drawn there feeds
# the next step without a trip to the host. Where the kernel cannot decide a draw it leaves it
# to draw_at, which takes the same uniform number.

# The largest top-k the device draws with: the kernel decides a top-k set when no block of its
# 2048 logits holds more than 16 of it, which a larger k would miss more often.
DEVICE_MAX_TOP_K = 64
DEVICE_PARAMS = 8  # the length of device_params' array: the steps' sampling argument
_MASK64 = (1 << 64) - 1


def samples_on_device(params: SamplingParams) -> bool:
    """Whether the device's kernel chooses the token with these settings beyond plain greedy
    (which takes the step's argmax): a temperature with top-k off, or between 1 and
    DEVICE_MAX_TOP_K (the candidates it keeps), or greedy with a repetition penalty (the
    penalized logits' argmax); any repetition penalty (the steps keep the sequence's tokens on
    the device)."""
    if params.greedy:
        return not params.plain_argmax
    return params.top_k <= DEVICE_MAX_TOP_K


def uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) of the token drawn from position's logits: the top 24
    bits of splitmix64(seed + (position + 1) * golden ratio), as the kernel computes it."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 40) / 16777216.0


def device_seed(params: SamplingParams) -> int:
    """The 64-bit seed of a generation: params.seed, or fresh entropy."""
    return params.seed if params.seed is not None else int(np.random.SeedSequence().generate_state(1, np.uint64)[0])


def device_params(params: SamplingParams | None, seed: int = 0) -> np.ndarray:
    """The step's sampling argument, [8] int32: temperature, top_k, top_p, min_p (floats as
    their bits), the seed's low and high words, the repetition penalty's bits, 0. None or a
    temperature of 0 without a penalty: all zeros, greedy (the step's argmax). Greedy with a
    penalty: temperature 0, top-k 1 (the kernel's first candidate)."""
    out = np.zeros(DEVICE_PARAMS, np.uint32)
    if params is None or params.plain_argmax:
        return out.view(np.int32)
    if params.greedy:
        out[[2, 6]] = np.array([1.0, params.repetition_penalty], np.float32).view(np.uint32)
        out[1] = 1
    else:
        floats = [params.temperature, params.top_p, params.min_p, params.repetition_penalty]
        out[[0, 2, 3, 6]] = np.array(floats, np.float32).view(np.uint32)
        out[1], out[4], out[5] = params.top_k, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    return out.view(np.int32)


def draw_at(logits: np.ndarray, params: SamplingParams, seed: int, position: int, tokens: Sequence[int] = ()) -> int:
    """The draw the device makes from position's logits, the sequence so far being `tokens`
    (the repetition penalty's), on the host: where the kernel left it to the host. Greedy: the
    first argmax of the penalized logits, as make_sampler's."""
    if params.greedy:
        return int(np.argmax(_penalize(_as_logits(logits), tokens, params.repetition_penalty)))
    logits = _scaled(_as_logits(logits), tokens, params)
    return _draw(*_survivors(logits, params), logits.shape[0], uniform(seed, position))


def _draw(ids, values: np.ndarray, vocab: int, u: float) -> int:
    """Inverse-CDF draw from softmax of the survivors (ids, values: as the filters keep them),
    in token-id order, at uniform number u in [0, 1): one per token drawn, so a seeded
    generator gives a reproducible sequence. -inf tokens have zero width and are never drawn."""
    top = values.max()
    if top == -np.inf:
        raise ValueError("every token was filtered out")
    weights = np.exp(values - top)  # float32, like the processors; -inf -> 0
    # Two-level inverse CDF (block sums, then one block) in float64: a float64 cumsum over a
    # 150k vocabulary costs milliseconds per token. Only the blocks holding a survivor are
    # summed; they are laid out (zeros and all) as in the full vector, so every sum is the
    # full vector's.
    n_blocks = -(-vocab // _DRAW_BLOCK)
    if ids is None:
        held = np.arange(n_blocks)
        rows = np.concatenate([weights, np.zeros(-vocab % _DRAW_BLOCK, np.float32)]).reshape(-1, _DRAW_BLOCK)
    else:
        held, row_of = np.unique(ids // _DRAW_BLOCK, return_inverse=True)
        rows = np.zeros((len(held), _DRAW_BLOCK), np.float32)
        rows[row_of, ids % _DRAW_BLOCK] = weights
    sums = np.zeros(n_blocks, np.float64)
    sums[held] = rows.sum(axis=1, dtype=np.float64)
    block_cumulative = np.cumsum(sums)
    target = u * block_cumulative[-1]
    block = min(int(np.searchsorted(block_cumulative, target, side="right")), n_blocks - 1)
    while block_cumulative[block] == (block_cumulative[block - 1] if block else 0.0):
        block -= 1  # float edge (target == total) landed past the last block with weight
    within = target - (block_cumulative[block - 1] if block else 0.0)
    row = rows[np.searchsorted(held, block)]
    cumulative = np.cumsum(row, dtype=np.float64)
    offset = min(int(np.searchsorted(cumulative, within, side="right")), _DRAW_BLOCK - 1)
    # side="right" skips zero-width entries; at the end of the block only on a float edge.
    while row[offset] == 0:
        offset -= 1
    return block * _DRAW_BLOCK + offset
