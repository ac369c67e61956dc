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
        self._prefill = self._ctx.modules.prefill["main"]
        self._decode = self._ctx.modules.decode["main"]
        self.stats = LoadStats()
        t0 = time.perf_counter()
        self._weights = [rt.asdevicearray(device, weights[n]) for n in build.weight_names]
        self.stats.upload_s = time.perf_counter() - t0
        self.stats.weight_bytes = sum(weights[n].nbytes for n in build.weight_names)
        self._device = device
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: a fresh zeroed KV cache."""
        import iree.runtime as rt

        zeros = np.zeros(self.build.cache_shape, np.dtype(self.build.cache_dtype))
        self._k = rt.asdevicearray(self._device, zeros)
        self._v = rt.asdevicearray(self._device, zeros)
        self.pos = 0

    def _run(self, fn, tokens: np.ndarray, last: int, greedy: bool):
        logits, token, self._k, self._v = fn(*self._weights, self._k, self._v, tokens,
                                             np.array(self.pos, np.int32), np.array(last, np.int32))
        # Only what is asked for crosses back: one int for greedy, else the logits row.
        if not greedy:
            return logits.to_host()
        token = int(token.to_host())
        if not 0 <= token < self.vocab_size:  # the argmax of NaN logits is out of range
            raise FloatingPointError(f"the model produced non-finite logits at position {self.pos}")
        return token

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
            out = self._run(self._prefill, padded, len(part) - 1, greedy)
            self.pos += len(part)
        return out

    def decode(self, token: int, greedy: bool = False):
        """Append one token; logits for the next (or their argmax with greedy=True)."""
        if self.pos + 1 > self.max_context:
            raise ContextFull(f"the compiled context of {self.max_context} tokens is full")
        out = self._run(self._decode, np.array([token], np.int32), 0, greedy)
        self.pos += 1
        return out
