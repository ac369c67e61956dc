"""A runtime session over `iree.runtime`: compiled steps, resident weights, resident KV cache.

Weights are uploaded once and stay on the device; the KV cache lives on the device and is
donated to each call (updated in place). Per step only the token ids and two scalars go in,
and the logits of one position come back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import TargetBuild

DRIVERS = {"cpu": "local-task", "cuda": "cuda"}


class ContextFull(ValueError):
    pass


@dataclass
class LoadStats:
    upload_s: float = 0.0
    weight_bytes: int = 0


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


class Session:
    def __init__(self, bundle_dir: Path, build: TargetBuild, weights: dict[str, np.ndarray], *,
                 max_context: int, prefill_chunk: int):
        import iree.runtime as rt

        self.build, self.max_context, self.chunk = build, max_context, prefill_chunk
        self.vocab_size = build.weight_shapes[build.weight_names.index("model.embed_tokens.weight")][0]
        self._config = _device_config(build.target)
        device = self._config.device
        modules = [rt.VmModule.mmap(self._config.vm_instance, str(Path(bundle_dir) / build.files[s]))
                   for s in ("prefill", "decode")]
        self._ctx = rt.SystemContext(vm_modules=modules, config=self._config)
        # Invoked through the VM directly with a prebuilt argument list: the high-level invoker
        # converted ~230 weight arguments and uploaded 3 scalars per call, 0.4 ms of a 3.2 ms
        # Qwen3-0.6B step on an H100 (bench/results/2026-11-26-h100-packed-and-host.txt).
        self._steps = {s: getattr(self._ctx.modules, s).vm_module.lookup_function("main") for s in ("prefill", "decode")}
        self.stats = LoadStats()
        t0 = time.perf_counter()
        self._weight_views = [rt.asdevicearray(device, weights[n])._buffer_view for n in build.weight_names]
        self.stats.upload_s = time.perf_counter() - t0
        self.stats.weight_bytes = sum(weights[n].nbytes for n in build.weight_names)
        self._device = device
        self._scalars: dict[int, object] = {}  # int32 scalars on the device (positions), made once each
        self._readback = None  # (host buffer, semaphore, value) for reading one int without a mapping
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: a fresh zeroed KV cache."""
        import iree.runtime as rt

        zeros = np.zeros(self.build.cache_shape, np.dtype(self.build.cache_dtype))
        self._k = rt.asdevicearray(self._device, zeros)._buffer_view
        self._v = rt.asdevicearray(self._device, zeros)._buffer_view
        self._last_argmax = None  # (token id, its device buffer view) from the last greedy step
        self.pos = 0

    def _scalar(self, value: int):
        if value not in self._scalars:
            import iree.runtime as rt

            self._scalars[value] = rt.asdevicearray(self._device, np.array(value, np.int32))._buffer_view
        return self._scalars[value]

    def _tokens(self, tokens: np.ndarray):
        """The tokens as a device array. A greedy step's own argmax, fed back as the next token,
        stays on the device (its buffer viewed as [1])."""
        import iree.runtime as rt

        if self._last_argmax is not None and tokens.shape == (1,) and int(tokens[0]) == self._last_argmax[0]:
            view = self._last_argmax[1]
            return rt.HalBufferView(view.get_buffer(), [1], view.element_type)
        return rt.asdevicearray(self._device, tokens)._buffer_view

    def _read_int(self, view) -> int:
        """One int32 from the device: mapped where the buffer is host-visible (CPU), else copied
        into one host buffer kept for the purpose (a fresh host allocation per read cost ~0.3 ms
        on CUDA)."""
        import iree.runtime as rt

        buf = view.get_buffer()
        if buf.memory_type() & int(rt.MemoryType.HOST_VISIBLE) and buf.allowed_usage() & int(rt.BufferUsage.MAPPING_SCOPED):
            return int(buf.map().asarray([1], np.dtype(np.int32))[0])
        if self._readback is None:
            host = self._device.allocator.allocate_buffer(
                memory_type=int(rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE),
                allowed_usage=int(rt.BufferUsage.TRANSFER_TARGET | rt.BufferUsage.MAPPING_SCOPED), allocation_size=4)
            self._readback = [host, self._device.create_semaphore(0), 0]
        host, sem, value = self._readback
        self._device.queue_copy(buf, host, wait_semaphores=rt.HalFence.create_at(sem, value),
                                signal_semaphores=rt.HalFence.create_at(sem, value + 1))
        rt.HalFence.create_at(sem, value + 1).wait()
        self._readback[2] = value + 1
        return int(host.map().asarray([1], np.dtype(np.int32))[0])

    def _run(self, step: str, tokens: np.ndarray, last: int, greedy: bool):
        import iree.runtime as rt

        args = rt.VmVariantList(len(self._weight_views) + 5)
        for view in (*self._weight_views, self._k, self._v, self._tokens(tokens), self._scalar(self.pos),
                     self._scalar(last)):
            args.push_ref(view)
        results = rt.VmVariantList(4)
        self._ctx.vm_context.invoke(self._steps[step], args, results)
        logits, token, self._k, self._v = (results.get_as_object(i, rt.HalBufferView) for i in range(4))
        # Only what is asked for crosses back: one int for greedy, else the logits row.
        if not greedy:
            self._last_argmax = None
            return rt.DeviceArray(self._device, logits).to_host()
        value = self._read_int(token)
        if not 0 <= value < self.vocab_size:  # the argmax of NaN logits is out of range
            raise FloatingPointError(f"the model produced non-finite logits at position {self.pos}")
        self._last_argmax = (value, token)
        return value

    def prefill(self, tokens: list[int], greedy: bool = False):
        """Run the prompt (continuing the current sequence) chunk by chunk.

        Returns the logits of its last token, or with greedy=True their argmax (an int)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        if self.pos + n > self.max_context:
            raise ContextFull(f"{self.pos + n} tokens exceed the compiled context of {self.max_context}")
        ids = np.asarray(tokens, np.int32)
        for start in range(0, n, self.chunk):
            part = ids[start:start + self.chunk]
            padded = np.zeros(self.chunk, np.int32)
            padded[:len(part)] = part
            out = self._run("prefill", padded, len(part) - 1, greedy)
            self.pos += len(part)
        return out

    def decode(self, token: int, greedy: bool = False):
        """Append one token; logits for the next (or their argmax with greedy=True)."""
        if self.pos + 1 > self.max_context:
            raise ContextFull(f"the compiled context of {self.max_context} tokens is full")
        out = self._run("decode", np.array([token], np.int32), 0, greedy)
        self.pos += 1
        return out
