"""Generation in layers: load_model -> generate_step (token ids) -> stream_generate (text).

Nothing here imports jax. Without a bundle, the model is compiled for the CPU on first use
through the artifact cache, which needs the `compile` extra.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .bundle import check_compatible, read_manifest
from .sampling import SamplingParams, device_seed, draw_at, make_sampler, samples_on_device
from .resident import gather_weights, packed_arguments
from .session import Session, check_device
from .tokenizer import Tokenizer, find_stop, stop_holdback

DEFAULT_MODEL = Path(__file__).parent / "default_model"


class ModelError(ValueError):
    """A model, bundle or request that can't be run, with a message meant for the user."""


@dataclass
class Model:
    session: Session
    tokenizer: Tokenizer
    model_dir: Path


def load_model(model_dir: Path, *, device: str = "cpu", bundle: Path | None = None,
               max_context: int | None = None, packed: bool | None = None) -> Model:
    """The model ready to run on `device`: from `bundle`, or compiled for it through the
    artifact cache (packed: as `compile --packed/--no-packed`; None: the target's default)."""
    from .compile.family import SUPPORTED, UnsupportedModel
    from .weights import open_checkpoint
    from .weights.config import read_config

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist or is not a directory")
    cc = read_config(model_dir)
    if cc.model_type not in SUPPORTED:
        raise UnsupportedModel(f"{cc.path}: model_type {cc.model_type!r} is not supported; "
                               f"supported: {', '.join(SUPPORTED)}")
    check_device(device)
    if bundle is None:
        bundle = _compile_for(model_dir, device, max_context, packed)
    manifest = read_manifest(bundle)
    build = check_compatible(manifest, bundle, cc.raw, device)
    weights = gather_for(open_checkpoint(model_dir), build)
    check_weights(model_dir, build, weights)
    session = Session(bundle, build, weights, **manifest.session_options)
    del weights  # the device holds them now
    return Model(session, Tokenizer.from_dir(model_dir), model_dir)


def check_weights(model_dir: Path, build, weights: dict) -> None:
    """A ModelError naming the first weight whose shape or dtype is not what the bundle's
    target (TargetBuild) was compiled for."""
    packed_args = {a for n in build.packed for a in packed_arguments(n)}
    for name, shape, dtype in zip(build.weight_names, build.weight_shapes, build.dtypes()):
        if tuple(weights[name].shape) != tuple(shape) or weights[name].dtype != dtype:
            raise ModelError(f"{model_dir}: tensor {name} is {weights[name].dtype} {list(weights[name].shape)}, "
                             f"the compiled model expects {dtype} {list(shape)}"
                             + (" (packed as in the bundle's checkpoint: same bits, group size and scales' dtype?"
                                " else compile a bundle from this checkpoint)" if name in packed_args else ""))


def gather_for(ckpt, build) -> dict:
    """The weights of a bundle's target (TargetBuild) from checkpoint ckpt, as its steps take them."""
    widened = frozenset(n for n, d in zip(build.weight_names, build.dtypes()) if d == "float32")
    return gather_weights(ckpt, list(build.weight_names), build.weight_dtype, build.packed, widened)


def _compile_for(model_dir: Path, target: str, max_context: int | None, packed: bool | None) -> Path:
    try:
        from .compile.build import DEFAULT_MAX_CONTEXT, build_target
    except ImportError as e:
        raise ModelError(f"no --bundle given and the compile step is not installed ({e}): "
                         "install iree-runner[compile] or pass a bundle made by `iree-generate compile`") from None
    return build_target(model_dir, target, max_context=max_context or DEFAULT_MAX_CONTEXT, packed=packed)


def generate_step(session: Session, prompt: list[int], params: SamplingParams, max_tokens: int) -> Iterator[int]:
    """Yields sampled token ids until max_tokens or the compiled context is full.

    Plain greedy takes the argmax computed on the device, and so does sampling where the
    bundle's steps draw tokens themselves (CUDA; sampling.samples_on_device says with which
    settings): one [token, status] pair crosses back per step, and the next step is queued on
    the token before that pair is read, so the device never waits for the host (the session
    rewinds the steps queued ahead when the caller stops early). Other sampling reads the
    logits row and samples on the host."""
    session.reset()
    if params.plain_argmax:
        yield from _tokens_on_device(session, prompt, max_tokens, None)
        return
    if session.samples_on_device and samples_on_device(params):
        yield from _tokens_on_device(session, prompt, max_tokens, params)
        return
    sampler = make_sampler(params)
    out = session.prefill(prompt)
    tokens = list(prompt)
    for i in range(max_tokens):
        token = sampler(out, tokens)
        tokens.append(token)
        yield token
        if i + 1 == max_tokens or session.pos >= session.max_context:
            return
        out = session.decode(token)


def _tokens_on_device(session: Session, prompt: list[int], max_tokens: int,
                      params: SamplingParams | None) -> Iterator[int]:
    """Each step's token chosen on the device (the argmax where params is None), each step
    queued before the token of the one before is read. A draw the device leaves to the host
    (PendingToken.left_to_host) is made here with the same uniform number."""
    seed = device_seed(params) if params is not None else 0
    session.set_sampling(params, seed)
    sequence = list(prompt)  # the tokens so far: a host draw's repetition penalty takes them
    queued = [session.queue_prefill(prompt)]  # steps queued whose tokens are not yet yielded
    ahead = session.SETS["decode"] - 1  # steps queued beyond the one whose token is read next
    previous = from_host = None  # the last token yielded; from_host: it, where the host chose it
    left = 0  # draws the device left to the host
    try:
        for produced in range(max_tokens):
            while produced and len(queued) < min(1 + ahead, max_tokens - produced) and session.pos < session.max_context:
                queued.append(session.decode_next(from_host))
                from_host = None
            if not queued:
                return
            pending = queued.pop(0)
            token = pending.result()
            if pending.left_to_host:
                token = from_host = _draw_on_host(session, len(queued), sequence, previous, params, seed)
                queued, left = [], left + 1
            previous = token
            sequence.append(token)
            yield token
            if left >= HOST_AFTER and HOST_SHARE * left > produced + 1:
                # The device keeps leaving the draw to the host (a flat distribution, top-k off):
                # each such step runs twice. The host draws the rest, at the same uniform numbers.
                session.set_sampling(None)
                yield from _drawn_on_host(session, sequence, max_tokens - produced - 1, params, seed)
                return
    finally:
        if queued:
            session.rewind(len(queued))


HOST_AFTER, HOST_SHARE = 3, 4  # the host takes over after 3 draws left to it, over a quarter of them


def _drawn_on_host(session: Session, sequence: list[int], n: int, params: SamplingParams, seed: int) -> Iterator[int]:
    """Up to n more tokens after the sequence so far (its last one not yet decoded), each
    step's logits read back and drawn from by the host as the device would (sampling.draw_at)."""
    for _ in range(n):
        if session.pos >= session.max_context:
            return
        logits = session.decode(sequence[-1])
        token = draw_at(logits, params, seed, session.pos - 1, sequence)  # the row of the token decoded
        sequence.append(token)
        yield token


def _draw_on_host(session: Session, queued: int, sequence: list[int], previous: int | None, params: SamplingParams,
                  seed: int) -> int:
    """The token of the step the device left to the host: the steps queued on its stand-in
    dropped, the step run again for its logits, the draw made from them (sampling.draw_at, the
    sequence so far ending in `previous`, or the prompt where it is None)."""
    if previous is None:  # the prompt's step
        session.reset()
        session.set_sampling(params, seed)  # (reset went back to greedy)
        logits = session.prefill(sequence)
    else:
        session.rewind(queued + 1)
        logits = session.decode(previous)
    return draw_at(logits, params, seed, session.pos - 1, sequence)


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_tps: float = 0.0
    decode_tps: float = 0.0
    ttft_s: float = 0.0
    peak_memory_mb: float = 0.0

    def line(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
                f"decode: {self.generated_tokens} tokens, {self.decode_tps:.1f} tok/s | "
                f"ttft {self.ttft_s * 1000:.0f} ms | peak memory {self.peak_memory_mb:.0f} MB")


@dataclass
class Response:
    text: str  # new text since the last response
    token: int | None
    finish_reason: str | None = None  # "stop" | "length" on the last response
    stats: Stats = field(default_factory=Stats)
    tokens: list[int] = field(default_factory=list)  # all generated ids, on the last response


def stream_generate(model: Model, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                    stop_strings: tuple[str, ...] = ()) -> Iterator[Response]:
    """Text segments as they become final: stop strings are held back until they can't match."""
    if len(prompt_ids) >= model.session.max_context:
        raise ModelError(f"prompt of {len(prompt_ids)} tokens does not fit the compiled context of "
                         f"{model.session.max_context} tokens (compile with a larger --max-context)")
    params.validate()
    detok = model.tokenizer.detokenizer()
    eos = model.tokenizer.eos_token_ids
    stats = Stats(prompt_tokens=len(prompt_ids))
    stops = list(stop_strings)
    pending = ""  # decoded text not yet emitted (may be the start of a stop string)
    t0 = time.perf_counter()
    finish = "length"
    generated: list[int] = []
    for n, token in enumerate(generate_step(model.session, prompt_ids, params, max_tokens)):
        if n == 0:
            stats.ttft_s = time.perf_counter() - t0
        stats.generated_tokens = n + 1
        generated.append(token)
        if token in eos:
            finish = "stop"
            break
        pending += detok.add_token(token)
        cut = find_stop(pending, stops) if stops else None
        if cut is not None:
            pending, finish = pending[:cut], "stop"
            break
        emit = len(pending) - stop_holdback(pending, stops) if stops else len(pending)
        if emit > 0:
            yield Response(pending[:emit], token, stats=stats)
            pending = pending[emit:]
    if finish == "length" or (generated and generated[-1] in eos):  # flush bytes the detokenizer still holds
        pending += detok.finalize()
        cut = find_stop(pending, stops) if stops else None
        if cut is not None:
            pending, finish = pending[:cut], "stop"
    total = time.perf_counter() - t0
    stats.prompt_tps = stats.prompt_tokens / stats.ttft_s if stats.ttft_s else 0.0
    decode_s = total - stats.ttft_s
    stats.decode_tps = (stats.generated_tokens - 1) / decode_s if stats.generated_tokens > 1 and decode_s > 0 else 0.0
    stats.peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    yield Response(pending, None, finish, stats, generated)
