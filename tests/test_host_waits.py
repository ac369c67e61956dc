"""What the compiled step asks of the host on CUDA: one wait per call, no values read back.

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
from iree_runner.weights import read_config

CAPACITY = 64


def _spec(family_name: str, weight_dtype: str):
    cc = read_config(mlx_checkpoint(family_name, "bfloat16", "q4", keys="v4"))
    fam = family.family_module(cc.model_type)
    cfg = fam.Config.from_checkpoint(cc)
    return fam, cfg, export.step_spec(fam, cfg, capacity=CAPACITY, weight_dtype=weight_dtype,
                                      cache_dtype=weight_dtype)


def _main_of_vm_program(mlir: str, tmp_path) -> str:
    src = tmp_path / "step.mlir"
    src.write_text(mlir)
    out = tmp_path / "step.vm.mlir"
    proc = subprocess.run([iree_compile.iree_compile_path(), str(src), *iree_compile.flags_for("cuda"),
                           "--compile-to=vm", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    start = text.index("vm.func private @main(")
    return text[start:text.index("vm.export @main", start)]


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("tokens", [1, 8], ids=["decode", "prefill"])
def test_cuda_step_waits_once_and_reads_nothing_back(family_name, tokens, tmp_path):
    fam, cfg, spec = _spec(family_name, "float16")
    mlir = export.export_step(fam, cfg, spec, tokens, "step", **iree_compile.export_options("cuda"))
    assert "optimization_barrier" not in mlir
    main = _main_of_vm_program(mlir, tmp_path)
    assert len(re.findall(r"@hal\.fence\.await\(", main)) == 1, "host waits on the GPU inside the step"
    assert "@hal.buffer.load(" not in main, "a device value is read back to the host mid-step"
    # Every command buffer is recorded once and replayed (memoized), none per call.
    assert "@hal.device.queue.execute.indirect(" in main
    assert "@hal.command_buffer.create(" not in main


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
        iree_compile.compile_mlir(export.export_step(fam, cfg, spec, 8, "step", write), vmfb, "cpu", write)
        config = rt.Config("local-task")
        ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(vmfb))], config=config)
        outs = ctx.modules.step["main"](*weights, cache.copy(), cache.copy(), np.arange(3, 11, dtype=np.int32),
                                        np.int32(20), np.int32(5))
        results[write] = [np.asarray(o.to_host()) for o in outs]
    logits, argmax, k, v = results["scatter"]
    assert not np.array_equal(k, cache), "the chunk was not written"
    for a, b in zip(results["scatter"], results["slice"]):
        np.testing.assert_array_equal(a, b)
