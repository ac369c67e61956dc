"""A runtime session over `iree.runtime`: compiled steps, resident weights, resident KV cache.

Weights are uploaded once and stay on the device; the KV cache lives on the device and is
donated to each call (updated in place). Per step only the token ids and two scalars go in,
and the next token (chosen on the device: argmax, or a draw) or the logits of one position come
back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import TargetBuild
from .sampling import SamplingParams, device_params

DRIVERS = {"cpu": "local-task", "cuda": "cuda"}


class ContextFull(ValueError):
    pass


@dataclass
class LoadStats:
    upload_s: float = 0.0
    weight_bytes: int = 0
    device_bytes: int = 0  # all the session allocates on the device: weights, KV caches, results, transients


def check_device(target: str) -> None:
    """Fail early, before any compiling, when the target's device is not there."""
    import iree.runtime as rt

    if target not in DRIVERS:
        raise ValueError(f"unknown device {target!r}; known: {', '.join(DRIVERS)}")
    if target == "cuda":
        try:
            devices = rt.get_driver("cuda").query_available_devices()
        except Exception as e:  # noqa: BLE001 - no driver library, no GPU, ...
            raise RuntimeError(f"--device cuda: no usable CUDA driver or GPU here ({e})") from None
        if not devices:
            raise RuntimeError("--device cuda: the CUDA driver reports no GPU")


def _device_config(target: str):
    import iree.runtime as rt

    try:
        return rt.Config(DRIVERS[target])
    except Exception as e:  # noqa: BLE001 - the runtime raises plain RuntimeError/ValueError
        raise RuntimeError(f"cannot open the IREE {DRIVERS[target]!r} driver for --device {target}: {e}") from None


class PendingToken:
    """A step's token (the argmax, or drawn on the device: Session.set_sampling), on its way to
    the host: result() waits for it. left_to_host (once read): the device could not decide the
    draw, and the token is a stand-in (generate.py draws it on the host)."""

    def __init__(self, view, read, pos: int, vocab_size: int):
        self.view = view  # [token, status] int32 on the device; a next step can take the token
        self._read, self._pos, self._vocab_size, self._value = read, pos, vocab_size, None
        self.left_to_host = False

    def done_as(self, token: int) -> bool:
        """Whether this was read already and came out as `token`."""
        return self._value is not None and self._value == token and not self.left_to_host

    def result(self) -> int:
        if self._value is None:
            value, status = self._read()
            if not 0 <= value < self._vocab_size:  # the argmax of NaN logits is out of range
                raise FloatingPointError(f"the model produced non-finite logits at position {self._pos}")
            self._value, self.left_to_host = value, status != 0
        return self._value


class Session:
    """Steps run in order on one device timeline. Each call returns once its work is queued
    (IREE's async-external model, iree_compile.STEP_FLAGS), so the host can queue the next
    step on the token the device chose, which never leaves it, while the device runs this one.

    The steps write their results and transients into buffers passed in (compile/export.py
    CALLER_STORAGE), sets used in turn: a set is reused only once the step that last used it is
    done. Decode has two (small: 1.4 MB of transients for Qwen3-0.6B), so the next step can be
    queued while one runs; prefill has one, its transients being large (with packed weights it
    dequantizes them inside the step) and its chunks long next to the host's share.

    A bundle may have a second prefill step of prefill_long tokens per call, for long prompts
    (_chunks says when it runs)."""

    SETS = {"prefill": 1, "decode": 2}

    def __init__(self, bundle_dir: Path, build: TargetBuild, weights: dict[str, np.ndarray], *,
                 max_context: int, prefill_chunk: int, prefill_long: int = 0):
        import iree.runtime as rt

        self.build, self.max_context, self.chunk = build, max_context, prefill_chunk
        self.long_chunk = prefill_long if "prefill_long" in build.files else 0
        self.vocab_size = build.weight_shapes[build.weight_names.index("model.embed_tokens.weight")][0]
        self._config = _device_config(build.target)
        device = self._config.device
        steps = ("prefill", "decode") + (("prefill_long",) if self.long_chunk else ())
        modules = [rt.VmModule.mmap(self._config.vm_instance, str(Path(bundle_dir) / build.files[s])) for s in steps]
        self._ctx = rt.SystemContext(vm_modules=modules, config=self._config)
        # Invoked through the VM directly with a prebuilt argument list: the high-level invoker
        # converted ~230 weight arguments and uploaded 3 scalars per call, 0.4 ms of a 3.2 ms
        # Qwen3-0.6B step on an H100 (bench/results/2026-11-26-h100-packed-and-host.txt).
        self._steps = {s: getattr(self._ctx.modules, s).vm_module.lookup_function("main") for s in steps}
        self.stats = LoadStats()
        t0 = time.perf_counter()
        self._weight_views = [rt.asdevicearray(device, weights[n])._buffer_view for n in build.weight_names]
        self.stats.upload_s = time.perf_counter() - t0
        self.stats.weight_bytes = sum(weights[n].nbytes for n in build.weight_names)
        self._device = device
        # Every position (and row index) as an int32 scalar on the device, made up front: an upload
        # during generation is a synchronous copy that the queued steps wait behind.
        self._scalars = [rt.asdevicearray(device, np.array(i, np.int32))._buffer_view
                         for i in range(max(max_context, prefill_chunk, self.long_chunk) + 1)]
        self._storage = {}  # step -> [(logits, token, transients) buffers, done-by tick]
        # The two prefill steps share their set (sized for the larger transients), as they take
        # turns anyway: a set is reused once the step before is done.
        for kind, steps in (("prefill", ("prefill", "prefill_long")), ("decode", ("decode",))):
            steps = [s for s in steps if s in self._steps]
            transients = max(int(self._steps[s].reflection["iree.abi.transients.size.constant"]) for s in steps)
            sets = [[tuple(self._device_buffer(n) for n in (self.vocab_size * 4, 8, transients)), 0]
                    for _ in range(self.SETS[kind])]
            self._storage |= {s: sets for s in steps}
            self.stats.device_bytes += self.SETS[kind] * (self.vocab_size * 4 + 8 + transients)
        # The steps' sampling settings (sampling.device_params): greedy, or the generation's own.
        self.samples_on_device = build.device_sampling
        self._greedy_params = rt.asdevicearray(device, device_params(None))._buffer_view
        self._sampling = self._greedy_params
        # Every step and readback copy waits for the one before it on this timeline.
        self._timeline, self._tick = device.create_semaphore(0), 0
        self._host_ints: list = []  # free 8-byte host buffers for reading one [token, status] each
        self._host_logits = self._host_buffer(self.vocab_size * 4)  # where a logits row is read into
        # The KV cache, zeroed once and kept from sequence to sequence (reset says why).
        zeros = np.zeros(build.cache_shape, np.dtype(build.cache_dtype))
        self._k = rt.asdevicearray(device, zeros)._buffer_view
        self._v = rt.asdevicearray(device, zeros)._buffer_view
        # The sequence's tokens by position, which the steps write and, sampling with a
        # repetition penalty on the device, read. Like the cache, rows at or past the position
        # are never read.
        history = np.zeros(build.capacity, np.int32)
        self._history = rt.asdevicearray(device, history)._buffer_view
        self.stats.device_bytes += self.stats.weight_bytes + 2 * zeros.nbytes + history.nbytes
        self.reset()

    @property
    def device_peak_bytes(self) -> int | None:
        """The most the session's device has held at once, as IREE's allocator counts it (None
        where the runtime was built without statistics). The device is the process's, shared by
        its sessions on it, and the peak counts from the first allocation on it: in a process
        that runs one session, that session's peak. (IREE 3.13's CUDA allocator keeps the peak
        but not its allocated and freed counts, which stayed 0 on an H100.)"""
        allocator = self._device.allocator
        return allocator.statistics["device_bytes_peak"] if allocator.has_statistics else None

    def _device_buffer(self, size: int):
        import iree.runtime as rt

        return self._device.allocator.allocate_buffer(
            memory_type=int(rt.MemoryType.DEVICE_LOCAL),
            allowed_usage=int(rt.BufferUsage.DEFAULT), allocation_size=max(size, 4))

    def reset(self) -> None:
        """Forget the sequence. The KV cache keeps its buffers: rows at or past the position are
        never read (the kernels stop at it; the JAX attention gives them weight 0, and they hold
        finite values: zeros or an earlier sequence's keys). Uploading fresh zeros took ~60 ms of
        each request's time to first token for Qwen3-0.6B on an H100 (88 MB of cache)."""
        self.wait()
        self._last_token: PendingToken | None = None  # the last step's token, if it was read as one
        self._sampling = self._greedy_params
        self.pos = 0

    def set_sampling(self, params: SamplingParams | None, seed: int = 0) -> None:
        """How the steps choose their token until the next reset: the argmax (None, or a
        temperature of 0 without a repetition penalty), or a choice on the device with these
        settings and seed (a bundle whose steps sample: samples_on_device;
        sampling.samples_on_device says which settings)."""
        import iree.runtime as rt

        if params is None or params.plain_argmax:
            self._sampling = self._greedy_params
            return
        if not self.samples_on_device:
            raise ValueError("this bundle's steps do not sample on the device (compiled without the CUDA kernels)")
        self.wait()  # the upload below must not overtake queued steps that read the settings
        self._sampling = rt.asdevicearray(self._device, device_params(params, seed))._buffer_view

    def rewind(self, steps: int) -> None:
        """Drop the last `steps` positions (decode steps queued ahead whose tokens went unused).
        Their cache rows stay but are never read: attention stops at the position."""
        if not 0 <= steps <= self.pos:
            raise ValueError(f"cannot rewind {steps} of {self.pos} positions")
        self.pos -= steps
        self._last_token = None

    def wait(self) -> None:
        """Until everything queued so far is done."""
        self._fence(self._tick).wait()

    def _fence(self, value: int):
        import iree.runtime as rt

        return rt.HalFence.create_at(self._timeline, value)

    def _tokens(self, tokens: np.ndarray):
        """The tokens as a device array. A step's own token, fed back as the next one, stays on
        the device (its buffer viewed as [1])."""
        import iree.runtime as rt

        if self._last_token is not None and tokens.shape == (1,) and self._last_token.done_as(int(tokens[0])):
            return self._token_as_input()
        return rt.asdevicearray(self._device, tokens)._buffer_view

    def _token_as_input(self):
        import iree.runtime as rt

        view = self._last_token.view
        return rt.HalBufferView(view.get_buffer(), [1], view.element_type)

    def _host_buffer(self, size: int):
        import iree.runtime as rt

        return self._device.allocator.allocate_buffer(
            memory_type=int(rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE),
            allowed_usage=int(rt.BufferUsage.TRANSFER_TARGET | rt.BufferUsage.MAPPING_SCOPED), allocation_size=size)

    def _queue_copy(self, source, host) -> int:
        """Copy a device buffer into a host one after everything queued; returns the tick that
        signals its end."""
        copied = self._tick + 1
        self._device.queue_copy(source, host, wait_semaphores=self._fence(self._tick),
                                signal_semaphores=self._fence(copied))
        self._tick = copied
        return copied

    def _read_logits(self, view) -> np.ndarray:
        """The logits row, copied by the queue into the session's host buffer (a fresh host
        allocation per read, as DeviceArray.to_host makes, cost ~0.3 ms on CUDA), then into
        an array of the caller's (the buffer is reused by the next read)."""
        self._fence(self._queue_copy(view.get_buffer(), self._host_logits)).wait()
        return np.array(self._host_logits.map().asarray([self.vocab_size], np.dtype(np.float32)), copy=True)

    def _read_token(self, view):
        """A function reading a step's [token, status] from the device: copied by the queue,
        after the step, into a host buffer of its own (kept for reuse; a fresh host allocation
        per read cost ~0.3 ms on CUDA). Copied at once, not when read: the step's storage is
        reused two steps on."""
        host = self._host_ints.pop() if self._host_ints else self._host_buffer(8)
        copied = self._queue_copy(view.get_buffer(), host)

        def read_copied():
            self._fence(copied).wait()
            token, status = (int(x) for x in host.map().asarray([2], np.dtype(np.int32)))
            self._host_ints.append(host)
            return token, status
        return read_copied

    def _run(self, step: str, tokens, last: int, read: str | None):
        """Queue one step. read "logits": returns them (waiting); "token": a PendingToken;
        None: nothing (a prompt chunk before the last)."""
        import iree.runtime as rt

        sets = self._storage[step]
        buffers, done = sets[0]
        self._fence(done).wait()  # the step that last used this set is done
        args = rt.VmVariantList(len(self._weight_views) + 11)
        for ref in (*self._weight_views, self._k, self._v, self._history, tokens, self._scalars[self.pos], self._scalars[last],
                    self._sampling, *buffers, self._fence(self._tick), self._fence(self._tick + 1)):
            args.push_ref(ref)
        self._tick += 1
        sets.append([buffers, self._tick])
        del sets[0]
        results = rt.VmVariantList(5)
        self._ctx.vm_context.invoke(self._steps[step], args, results)
        logits, token, self._k, self._v, self._history = (results.get_as_object(i, rt.HalBufferView) for i in range(5))
        # Only what is asked for crosses back: the token (two ints), or the logits row.
        if read != "token":
            self._last_token = None
        if read is None:
            return None
        if read == "logits":
            return self._read_logits(logits)
        self._last_token = PendingToken(token, self._read_token(token), self.pos, self.vocab_size)
        return self._last_token

    def prefill(self, tokens: list[int], greedy: bool = False):
        """Run the prompt (continuing the current sequence) chunk by chunk.

        Returns the logits of its last token, or with greedy=True the step's token (an int:
        their argmax, unless set_sampling has the device draw it)."""
        if greedy:
            return self.queue_prefill(tokens).result()
        return self._prefill(tokens, "logits")

    def queue_prefill(self, tokens: list[int]) -> PendingToken:
        """prefill, returning its token without waiting for it (decode_next may follow)."""
        return self._prefill(tokens, "token")

    def _prefill(self, tokens: list[int], read: str):
        n = len(tokens)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        if self.pos + n > self.max_context:
            raise ContextFull(f"{self.pos + n} tokens exceed the compiled context of {self.max_context}")
        ids = np.asarray(tokens, np.int32)
        start = 0
        for step, chunk in self._chunks(n):
            part = ids[start:start + chunk]
            padded = np.zeros(chunk, np.int32)
            padded[:len(part)] = part
            start += len(part)
            out = self._run(step, self._tokens(padded), len(part) - 1, read if start >= n else None)
            self.pos += len(part)
        return out

    def _chunks(self, n: int) -> list[tuple[str, int]]:
        """The prefill calls for the next n prompt tokens, (step, its chunk) each. A call costs
        about the same whatever its tokens (the chunk is padded), and a long chunk about what two
        short ones cost: on an H100, Qwen3-0.6B 9.5 ms per 128-token call, 21.4 per 512-token
        call (bench/results/2026-11-27-h100-stop21.txt). So the long step takes the tokens while
        more than half of its chunk remain, the short one the rest. The long chunk also has to
        end within the cache, which holds half of it past the context (build.cache_capacity)."""
        calls, left, pos = [], n, self.pos
        while left > 0:
            long = self.long_chunk and left > self.long_chunk // 2 and pos + self.long_chunk <= self.build.capacity
            step, chunk = ("prefill_long", self.long_chunk) if long else ("prefill", self.chunk)
            calls.append((step, chunk))
            left, pos = left - chunk, pos + chunk
        return calls

    def decode(self, token: int, greedy: bool = False):
        """Append one token; logits for the next (or with greedy=True the step's token, as prefill)."""
        if greedy:
            return self.decode_next(token).result()
        return self._decode(token, "logits")

    def decode_next(self, token: int | None = None) -> PendingToken:
        """Queue a step on the last step's token without waiting for it: the token stays on the
        device, and the host may queue the step after this one before reading it. With `token`
        (one the host chose), on that token instead."""
        if token is None and self._last_token is None:
            raise RuntimeError("decode_next follows a prefill or decode step read as a token")
        return self._decode(token, "token")

    def _decode(self, token: int | None, read: str):
        """One decode step on `token`, or on the last step's token left on the device (None)."""
        self._check_room()
        inputs = self._token_as_input() if token is None else self._tokens(np.array([token], np.int32))
        out = self._run("decode", inputs, 0, read)
        self.pos += 1
        return out

    def _check_room(self) -> None:
        if self.pos + 1 > self.max_context:
            raise ContextFull(f"the compiled context of {self.max_context} tokens is full")
