"""Drive `iree-compile` for our targets, with progress on stderr."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

# O3 first: IREE's default O0 is ~20x slower on decode (shared notes, iree-cuda.md).
COMMON_FLAGS = ("--iree-input-type=stablehlo", "--iree-opt-level=O3")
# The model steps are called with async-external: a call returns once its work is queued, taking
# a fence to wait on and one to signal (iree_runner/session.py), so the host queues the next
# greedy step while the device runs this one.
STEP_FLAGS = ("--iree-execution-model=async-external",)
TARGET_FLAGS = {
    "cpu": ("--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
            "--iree-llvmcpu-target-cpu=host"),
    # sm_80 PTX runs on Hopper through the driver's JIT; sm_90 is unknown to IREE 3.13.
    "cuda": ("--iree-hal-target-device=cuda", "--iree-cuda-target=sm_80"),
}
TARGETS = tuple(TARGET_FLAGS)
# Weights on the device: f32 on CPU for exact parity with the fp32 oracle; f16 on CUDA
# (bf16 dot_general does not compile for CUDA in IREE 3.13). The KV cache takes the weights'
# dtype (compile/layers.py attention says how each is computed).
WEIGHT_DTYPE = {"cpu": "float32", "cuda": "float16"}
# How the step writes the KV cache (compile/layers.py KVCache.commit says why they differ).
CACHE_WRITE = {"cpu": "slice", "cuda": "scatter"}
# The order of the KV cache's axes (compile/layers.py CACHE_LAYOUT).
CACHE_LAYOUT = {"cpu": "LSDH", "cuda": "LDSH"}
# Quantized weights kept packed by default (compile/packed.py; --packed / --no-packed override):
# the 4-bit ones, which the one-token kernels read; 8-bit ones would be dequantized inside every
# step. On the CPU: 5x faster decode than f32 weights (bench/results/2026-11-26-cpu-2core-lsdh.json).
# On CUDA: decode 35-49% faster than with f16 weights in 40% of the device memory, prefill 5-13%
# slower (each chunk dequantizes them with a kernel; 2026-11-26-h100-bench-attn-split.json).
PACKED_BITS_DEFAULT = {"cpu": (4,), "cuda": (4,)}


class CompileError(RuntimeError):
    """iree-compile failed on one module (label: which, e.g. a step's name)."""

    def __init__(self, label: str, message: str):
        super().__init__(message)
        self.label = label


def export_options(target: str, kernels: bool = True) -> dict:
    """export.export_step's per-target keyword arguments: how the cache is written, and the
    hand-written kernels of the target that one-token steps use (compile/extern.py: attention,
    and linear layers on packed 4-bit weights, f16 ones too on CUDA); kernels=False leaves them
    out (IREE's codegen alone: to compare or to debug). The cache's layout is the step spec's
    (CACHE_LAYOUT)."""
    return {"cache_write": CACHE_WRITE[target], "decode_kernel": target if kernels else None}


def cache_dir() -> Path:
    """Where compiled artifacts are kept: $IREE_RUNNER_CACHE or ~/.cache/iree-runner."""
    return Path(os.environ.get("IREE_RUNNER_CACHE") or Path.home() / ".cache" / "iree-runner")


def compiler_version() -> str:
    """The iree-base-compiler release, comparable with iree-base-runtime's (bundle.runtime_version)."""
    import importlib.metadata

    return importlib.metadata.version("iree-base-compiler")


def iree_compile_path() -> str:
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


def flags_for(target: str) -> tuple[str, ...]:
    if target not in TARGET_FLAGS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return COMMON_FLAGS + TARGET_FLAGS[target]


def step_flags(target: str) -> tuple[str, ...]:
    """What a model step (export.export_step) is compiled with."""
    return flags_for(target) + STEP_FLAGS


def compile_mlir(mlir: str, out: Path, target: str, label: str, timeout: float | None = None,
                 flags: tuple[str, ...] | None = None) -> None:
    """Compile StableHLO text to a .vmfb at `out`, ticking elapsed seconds on stderr.
    flags: flags_for(target) by default. With `timeout` (seconds), a longer compile raises
    subprocess.TimeoutExpired."""
    src = out.with_suffix(".mlir")
    src.write_text(mlir)
    cmd = [iree_compile_path(), str(src), *(flags or flags_for(target)), "-o", str(out)]
    done = threading.Event()
    t0 = time.monotonic()

    def tick():
        while not done.wait(1.0):
            _progress(f"  compiling {label} for {target} ... {time.monotonic() - t0:.0f}s")

    if not sys.stderr.isatty():
        _progress(f"  compiling {label} for {target} ...\n", final=True)
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        done.set()
        ticker.join()
    src.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise CompileError(label, f"iree-compile failed for {label} ({target}):\n{proc.stderr[-4000:]}")
    _progress(f"  compiled {label} for {target} in {time.monotonic() - t0:.1f}s\n", final=True)


def _progress(msg: str, final: bool = False) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[2K" + msg.rstrip("\n") + ("\n" if final else ""))
    elif final:
        sys.stderr.write(msg)
    sys.stderr.flush()


def host_cpu() -> str:
    """`--iree-llvmcpu-target-cpu=host` means this machine's CPU: key on its model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in info if ln.startswith(("model name", "flags"))][:2]
        return hashlib.sha256("\n".join(keep).encode()).hexdigest()[:12]
    except OSError:
        return platform.processor() or platform.machine()
