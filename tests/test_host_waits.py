"""What the compiled step asks of the host on CUDA: it queues its work, waits for nothing and
reads nothing back.

An `optimization_barrier` made IREE wait on the host for the GPU at every layer (29 waits in a
Qwen3-0.6B decode step), and a cache write at a device-held offset made it read that offset
back mid-step and re-record the rest of the step's command buffer on every call. These tests
compile each family's steps for CUDA down to the VM program (no GPU needed) and count.

The cache is written by a scatter on CUDA and a dynamic_update_slice on the CPU
(compile/layers.py KVCache.commit); the last test runs both forms on the CPU and compares.
"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from checkpoints import FAMILIES, mlx_checkpoint
from iree_runner.compile import export, family, iree_compile
from iree_runner.sampling import device_params
from iree_runner.weights import read_config

CAPACITY = 64


def _spec(family_name: str, weight_dtype: str, target: str = "cuda"):
    """(family module, config, StepSpec) of a test checkpoint, its cache laid out as `target`'s."""
    cc = read_config(mlx_checkpoint(family_name, "bfloat16", "q4", keys="v4"))
    fam = family.family_module(cc.model_type)
    cfg = fam.Config.from_checkpoint(cc)
    return fam, cfg, export.step_spec(fam, cfg, capacity=CAPACITY, weight_dtype=weight_dtype,
                                      cache_dtype=weight_dtype, cache_layout=iree_compile.CACHE_LAYOUT[target])


def _vm_program(mlir: str, tmp_path) -> str:
    """A CUDA step compiled as far as IREE's VM program (its text)."""
    src = tmp_path / "step.mlir"
    src.write_text(mlir)
    out = tmp_path / "step.vm.mlir"
    proc = subprocess.run([iree_compile.iree_compile_path(), str(src), *iree_compile.step_flags("cuda"),
                           "--compile-to=vm", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out.read_text()


def _main_of_vm_program(mlir: str, tmp_path) -> str:
    text = _vm_program(mlir, tmp_path)
    start = text.index("vm.func private @main(")
    return text[start:text.index("vm.export @main", start)]


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("tokens", [1, 8], ids=["decode", "prefill"])
def test_cuda_step_waits_once_and_reads_nothing_back(family_name, tokens, tmp_path):
    fam, cfg, spec = _spec(family_name, "float16")
    mlir = export.export_step(fam, cfg, spec, tokens, "step", **iree_compile.export_options("cuda"))
    assert "optimization_barrier" not in mlir
    assert_step_only_queues(_main_of_vm_program(mlir, tmp_path))


def assert_step_only_queues(main: str) -> None:
    """A step's VM program queues its work and returns: no host wait for the device, no device
    value read back mid-step, no queue alloca/dealloca (on CUDA they wait on the host for the
    work before them: the caller passes the storage, export.CALLER_STORAGE)."""
    assert "@hal.fence.await(" not in main, "the step waits on the host for the device"
    assert "@hal.buffer.load(" not in main, "a device value is read back to the host mid-step"
    for op in ("alloca", "dealloca"):
        assert f"@hal.device.queue.{op}(" not in main, f"the step calls queue.{op}"
    assert len(re.findall(r"@hal\.device\.queue\.execute(\.indirect)?\(", main)) == 1


def test_scatter_and_slice_cache_writes_agree_on_cpu(tmp_path):
    """Both cache writes, compiled by IREE for the CPU and run: identical logits and caches."""
    import iree.runtime as rt

    fam, cfg, spec = _spec("qwen3", "float32")
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in spec.weight_shapes]
    cache = (rng.standard_normal(spec.cache_shape) * 0.1).astype(np.float32)
    results = {}
    for write in ("scatter", "slice"):
        vmfb = tmp_path / f"{write}.vmfb"
        iree_compile.compile_mlir(export.export_step(fam, cfg, spec, 8, "step", write), vmfb, "cpu", write,
                                  flags=iree_compile.step_flags("cpu"))
        history = np.zeros(spec.capacity, np.int32)
        results[write] = run_step(vmfb, "step", [*weights, cache.copy(), cache.copy(), history, np.arange(3, 11, dtype=np.int32),
                                                 np.int32(20), np.int32(5), device_params(None)], vocab_size=cfg.vocab_size)
    logits, token, k, v, _ = results["scatter"]
    assert not np.array_equal(k, cache), "the chunk was not written"
    assert token.tolist() == [int(np.argmax(logits)), 0]  # [token, status]: the argmax, from the graph
    for a, b in zip(results["scatter"], results["slice"]):
        np.testing.assert_array_equal(a, b)


def run_step(vmfb, module: str, inputs: list, vocab_size: int) -> list[np.ndarray]:
    """One call of a compiled step on the CPU, as iree_runner.session makes it: the inputs, then
    storage for the results and transients (export.CALLER_STORAGE), then a wait and a signal
    fence. Returns logits, [token, status], the two caches and the token history."""
    import iree.runtime as rt

    config = rt.Config("local-task")
    device = config.device
    ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(vmfb))], config=config)
    fn = ctx.modules[module].vm_module.lookup_function("main")
    transients = int(fn.reflection["iree.abi.transients.size.constant"])
    args = rt.VmVariantList(len(inputs) + 5)
    for x in inputs:
        args.push_ref(rt.asdevicearray(device, np.asarray(x))._buffer_view)
    for size in (vocab_size * 4, 8, max(transients, 4)):
        args.push_ref(device.allocator.allocate_buffer(memory_type=int(rt.MemoryType.DEVICE_LOCAL),
                                                       allowed_usage=int(rt.BufferUsage.DEFAULT), allocation_size=size))
    timeline = device.create_semaphore(0)
    args.push_ref(rt.HalFence.create_at(timeline, 0))
    args.push_ref(rt.HalFence.create_at(timeline, 1))
    results = rt.VmVariantList(5)
    ctx.vm_context.invoke(fn, args, results)
    rt.HalFence.create_at(timeline, 1).wait()
    return [np.asarray(rt.DeviceArray(device, results.get_as_object(i, rt.HalBufferView)).to_host()) for i in range(5)]
