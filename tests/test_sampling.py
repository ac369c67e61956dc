"""iree_runner.sampling against transformers' own logits processors (the oracle) on torch
tensors of the same random logits, plus determinism and the distribution of the draws."""

import math

import numpy as np
import pytest

from iree_runner.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    filter_logits,
    make_sampler,
    min_p_filter,
    process_logits,
    top_k_filter,
    top_p_filter,
)

import torch  # the oracle runs on torch tensors; never skipped
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 512


def _random_logits(seed: int, scale: float = 3.0, vocab: int = VOCAB) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


def _random_history(seed: int, vocab: int = VOCAB) -> list[int]:
    rng = np.random.default_rng(seed + 1000)
    return rng.integers(0, vocab, size=int(rng.integers(1, 60))).tolist()


def _hf(processors, logits: np.ndarray, tokens=()) -> np.ndarray:
    input_ids = torch.tensor([list(tokens)], dtype=torch.long).reshape(1, len(tokens))  # [batch 1, seq]
    scores = torch.from_numpy(logits.copy()).unsqueeze(0)
    return LogitsProcessorList(processors)(input_ids, scores)[0].numpy()


def _assert_same_survivors(ours: np.ndarray, theirs: np.ndarray) -> None:
    keep_ours, keep_theirs = np.isfinite(ours), np.isfinite(theirs)
    assert np.array_equal(keep_ours, keep_theirs), (
        f"survivors differ: ours-only {np.flatnonzero(keep_ours & ~keep_theirs)}, "
        f"HF-only {np.flatnonzero(keep_theirs & ~keep_ours)}"
    )
    assert np.isneginf(ours[~keep_ours]).all()
    # float32 arithmetic on both sides; 1 ulp of slack for a different op order.
    np.testing.assert_allclose(ours[keep_ours], theirs[keep_theirs], rtol=2e-7, atol=0)


SEEDS = range(12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 5, 40, VOCAB - 1])
def test_top_k_matches_hf(seed, top_k):
    logits = _random_logits(seed)
    _assert_same_survivors(top_k_filter(logits, top_k), _hf([TopKLogitsWarper(top_k)], logits))


def test_top_k_keeps_ties_like_hf():
    logits = np.array([1.0, 3.0, 3.0, 3.0, 0.5, -2.0], dtype=np.float32)
    ours = top_k_filter(logits, 2)
    _assert_same_survivors(ours, _hf([TopKLogitsWarper(2)], logits))
    assert np.isfinite(ours).sum() == 3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_hf(seed, top_p):
    logits = _random_logits(seed)
    _assert_same_survivors(top_p_filter(logits, top_p), _hf([TopPLogitsWarper(top_p)], logits))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.95])
def test_min_p_matches_hf(seed, min_p):
    logits = _random_logits(seed)
    _assert_same_survivors(min_p_filter(logits, min_p), _hf([MinPLogitsWarper(min_p)], logits))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_hf(seed, temperature):
    logits = _random_logits(seed)
    _assert_same_survivors(apply_temperature(logits, temperature), _hf([TemperatureLogitsWarper(temperature)], logits))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_hf(seed, penalty):
    logits = _random_logits(seed)
    tokens = _random_history(seed)
    ours = apply_repetition_penalty(logits, tokens, penalty)
    theirs = _hf([RepetitionPenaltyLogitsProcessor(penalty)], logits, tokens)
    _assert_same_survivors(ours, theirs)
    changed = np.flatnonzero(ours != logits)
    assert set(changed) <= set(tokens) and len(changed) > 0


CONFIGS = [
    SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    SamplingParams(temperature=1.3, top_k=0, top_p=0.7, min_p=0.0, repetition_penalty=1.0),
    SamplingParams(temperature=0.5, top_k=10, top_p=1.0, min_p=0.2, repetition_penalty=0.8),
    SamplingParams(temperature=1.0, top_k=3, top_p=0.5, min_p=0.0, repetition_penalty=1.5),
    SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=1.1),
]


def _hf_pipeline(params: SamplingParams):
    """The processors transformers' generate builds for these options, in its order."""
    processors = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k != 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        processors.append(MinPLogitsWarper(params.min_p))
    return processors


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}-r{p.repetition_penalty}")
def test_full_pipeline_matches_hf(seed, params):
    logits = _random_logits(seed)
    tokens = _random_history(seed)
    ours = process_logits(logits, tokens, params)
    theirs = _hf(_hf_pipeline(params), logits, tokens)
    _assert_same_survivors(ours, theirs)
    assert np.isfinite(ours).sum() >= 1


def test_filter_logits_order_is_k_then_p_then_min_p():
    logits = _random_logits(3)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.8, min_p=0.1)
    expected = _hf([TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.1)], logits)
    _assert_same_survivors(filter_logits(logits, params), expected)


# ---------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_is_argmax(seed):
    logits = _random_logits(seed)
    sampler = make_sampler(SamplingParams())
    assert sampler(logits, []) == int(np.argmax(logits)) == int(torch.argmax(torch.from_numpy(logits)))


def test_greedy_ties_pick_lowest_id():
    logits = np.array([0.0, 2.0, 1.0, 2.0, 2.0], dtype=np.float32)
    assert make_sampler(SamplingParams())(logits, []) == 1


def test_greedy_applies_repetition_penalty_like_hf_generate():
    logits = np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    expected = int(np.argmax(_hf([RepetitionPenaltyLogitsProcessor(1.5)], logits, [1])))
    assert make_sampler(params)(logits, [1]) == expected == 2


# ---------------------------------------------------------------------------------------------
# Draws


def _run(params: SamplingParams, steps: int = 40) -> list[int]:
    sampler, tokens = make_sampler(params), []
    for step in range(steps):
        tokens.append(sampler(_random_logits(step, scale=1.0), tokens))
    return tokens


def test_same_seed_same_tokens_different_seed_different_tokens():
    params = SamplingParams(temperature=1.0, top_k=100, seed=1234)
    first, again = _run(params), _run(params)
    assert first == again
    other = _run(SamplingParams(temperature=1.0, top_k=100, seed=4321))
    # 40 draws from ~100 tokens each agreeing by chance: probability far below 1e-40.
    assert first != other


def test_draws_only_surviving_tokens():
    logits = _random_logits(7)
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.8, min_p=0.05, seed=0)
    allowed = set(np.flatnonzero(np.isfinite(process_logits(logits, [], params))))
    sampler = make_sampler(params)
    assert {sampler(logits, []) for _ in range(2000)} <= allowed


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=11),
    SamplingParams(temperature=0.7, top_k=6, seed=12),
    SamplingParams(temperature=1.3, top_p=0.9, min_p=0.02, seed=13),
])
def test_draw_frequencies_match_softmax(params):
    """N draws; each token's count is Binomial(N, p) with p from HF's processed logits. A
    deviation beyond 5 standard deviations for any of the 10 tokens has probability < 1e-5
    (union bound over 10 two-sided 5-sigma tails, 5.7e-7 each)."""
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0], dtype=np.float32)
    expected_logits = _hf(_hf_pipeline(params), logits)
    p = torch.softmax(torch.from_numpy(expected_logits).double(), dim=-1).numpy()
    n = 40_000
    sampler = make_sampler(params)
    counts = np.bincount([sampler(logits, []) for _ in range(n)], minlength=len(logits))
    sigma = np.sqrt(n * p * (1 - p))
    deviation = np.abs(counts - n * p)
    assert np.all(deviation <= 5 * sigma + 1e-9), (counts, n * p)
    assert np.all(counts[p == 0] == 0)
    # Chi-square with 9 dof: mean 9, its 1 - 1e-6 quantile is about 44.
    live = p > 0
    chi2 = float(((counts[live] - n * p[live]) ** 2 / (n * p[live])).sum())
    assert chi2 < 44.0, chi2


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan),
    ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("min_p", -0.01), ("min_p", 1.0),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("seed", -3), ("seed", 1.5),
])
def test_validate_names_the_option(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=rf"\b{field}\b") as info:
        params.validate()
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make_sampler(params)


def test_validate_accepts_the_edges():
    for params in [
        SamplingParams(),
        SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0),
        SamplingParams(temperature=5.0, top_k=1, top_p=1e-6, min_p=0.999, repetition_penalty=0.01, seed=2**40),
    ]:
        params.validate()


def test_bad_logits_are_rejected():
    sampler = make_sampler(SamplingParams(temperature=1.0, seed=0))
    with pytest.raises(ValueError, match="1-D"):
        sampler(np.zeros((2, 3), dtype=np.float32), [])
    with pytest.raises(ValueError, match="NaN"):
        sampler(np.array([0.0, np.nan], dtype=np.float32), [])


# ---------------------------------------------------------------------------------------------
# The sampler works on the survivors only (ids and values); its draws must be those of the
# full-vocabulary inverse CDF over process_logits, float for float.


def _full_vector_draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    """The draw over the whole vocabulary (-inf = filtered): float64 sums of 1024-token blocks
    of exp(logits - max), then the cumulative sum inside the block the target falls in."""
    weights = np.exp(logits - logits.max())
    blocks = np.concatenate([weights, np.zeros(-len(weights) % 1024, np.float32)]).reshape(-1, 1024)
    block_cumulative = np.cumsum(blocks.sum(axis=1, dtype=np.float64))
    target = rng.random() * block_cumulative[-1]
    block = min(int(np.searchsorted(block_cumulative, target, side="right")), len(blocks) - 1)
    while block_cumulative[block] == (block_cumulative[block - 1] if block else 0.0):
        block -= 1
    cumulative = np.cumsum(blocks[block], dtype=np.float64)
    within = target - (block_cumulative[block - 1] if block else 0.0)
    offset = min(int(np.searchsorted(cumulative, within, side="right")), 1023)
    while blocks[block, offset] == 0:
        offset -= 1
    return block * 1024 + offset


@pytest.mark.parametrize("vocab", [10, 1024, 5000, 151_936])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=1),
    SamplingParams(temperature=1.0, seed=2),
    SamplingParams(temperature=0.7, top_p=0.9, seed=3),
    SamplingParams(temperature=1.3, top_k=5, min_p=0.1, repetition_penalty=1.2, seed=4),
    SamplingParams(temperature=0.9, min_p=0.05, seed=5),
])
def test_draws_equal_the_full_vocabulary_draw(vocab, params):
    rng = np.random.default_rng(vocab)
    reference = np.random.default_rng(params.seed)
    sampler = make_sampler(params)
    for case in range(6):
        logits = (rng.standard_normal(vocab) * rng.uniform(0.5, 5)).astype(np.float32)
        if case % 3 == 1:
            logits = np.round(logits)  # ties at the top-k and top-p borders
        if case % 3 == 2:
            logits[rng.integers(0, vocab, vocab // 8)] = -np.inf  # tokens the model masks
        history = rng.integers(0, vocab, 30).tolist()
        want = [_full_vector_draw(process_logits(logits, history, params), reference) for _ in range(10)]
        assert [sampler(logits, history) for _ in range(10)] == want
