"""The smallest hand-written kernel inside a JAX-exported step, for CUDA or the CPU: the path
compile/extern.py takes for the decode kernels.

  # here (compiler, and nvcc or gcc installed): the kernel's PTX or object, a JAX function that
  # calls it through a custom_call placeholder, rewritten to IREE's flow.dispatch, compiled
  python bench/extern_dispatch.py make DIR [--target cpu]
  # run it (CUDA: on the GPU machine, runtime only) and compare with numpy
  python bench/extern_dispatch.py run DIR [--target cpu]

How: jax.ffi.ffi_call leaves `stablehlo.custom_call @<name>` in the export (allowed by
DisabledSafetyCheck.custom_call); the text rewrite replaces it with `flow.dispatch
@ext::@<fn>[workload](push constants, operands)` and adds a `hal.executable.source` whose
objects are the kernel, as in IREE's samples/custom_dispatch. IREE 3.13 wants the properties
syntax `hal.executable.source private @ext <{objects = ...}>`.
- CUDA: the objects are nvcc's PTX; the export's `<workgroup_size = [...]>` follows its count
  region.
- CPU: the objects are a gcc object keyed by the generic
  `#hal.executable.target<"llvm-cpu", "embedded-elf-x86_64">` (it matches whatever
  --iree-llvmcpu-target-cpu makes). The object has no entry points of its own, so the source
  also holds a `builtin.module` whose exported function reads the push constants, bindings and
  workgroup id through `hal.interface.*` and calls the C function, declared `hal.import.static`
  (linked from the object) and `llvm.bareptr` (a binding arrives as a plain pointer plus its
  element offset), as in samples/custom_dispatch/cpu/embedded. The object is linked into IREE's
  embedded ELF, so the C code must be freestanding: no libc, no globals, no stack protector.
The compiled step keeps one host wait and memoized command buffers.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import numpy as np

N = 256
TILE = 64  # elements per workgroup
CUDA_KERNEL = r"""
extern "C" __global__ void scale2(const float* __restrict__ binding0, float* __restrict__ binding1, int dim) {
  int tid = blockDim.x * blockIdx.x + threadIdx.x;
  if (tid < dim) binding1[tid] = 2.0f * binding0[tid];
}
"""
C_KERNEL = r"""
#include <stddef.h>

// One workgroup: binding1[tid:tid+64] = 2 * binding0[...]. IREE's bindings never alias: restrict.
void scale2_workgroup(const float* restrict binding0, size_t binding0_offset,
                      float* restrict binding1, size_t binding1_offset, size_t dim, size_t tid) {
  size_t end = tid + %(tile)d < dim ? tid + %(tile)d : dim;
  for (size_t i = tid; i < end; ++i) binding1[binding1_offset + i] = 2.0f * binding0[binding0_offset + i];
}
""" % {"tile": TILE}
NVCC = ("nvcc", "-ptx", "-arch=sm_80")
# What IREE's sample passes clang for objects linked into the embedded ELF, with gcc's spelling.
CC = ("gcc", "-O3", "-march=native", "-std=c17", "-ffreestanding", "-fno-stack-protector", "-fPIC",
      "-fvisibility=hidden", "-fno-plt", "-fdata-sections", "-ffunction-sections", "-c")
LAYOUT = ("#hal.pipeline.layout<constants = 1, bindings = [#hal.pipeline.binding<storage_buffer, ReadOnly>, "
          "#hal.pipeline.binding<storage_buffer>]>")
HEAD = """
  hal.executable.source private @ext <{{objects = #hal.executable.objects<{{
      #hal.executable.target<{target}> = [#hal.executable.object<{{path = "{obj}"}}>]}}>}}> {{
    hal.executable.export public @scale2 ordinal(0) layout({layout})
        count(%device: !hal.device, %workload: index) -> (index, index, index) {{
      %x = affine.apply affine_map<()[s0] -> (s0 ceildiv {tile})>()[%workload]
      %c1 = arith.constant 1 : index
      hal.return %x, %c1, %c1 : index, index, index
    }}"""
CUDA_BODY = """ <workgroup_size = [{tile} : index, 1 : index, 1 : index]>
  }}
"""
CPU_BODY = """
    builtin.module {{
      func.func private @scale2_workgroup(%b0: memref<f32>, %b0_offset: index, %b1: memref<f32>, %b1_offset: index,
          %dim: index, %tid: index) attributes {{hal.import.static, llvm.bareptr = true}}
      func.func @scale2() {{
        %c0 = arith.constant 0 : index
        %dim_i32 = hal.interface.constant.load layout({layout}) ordinal(0) : i32
        %dim = arith.index_castui %dim_i32 : i32 to index
        %wg = hal.interface.workgroup.id[0] : index
        %tid = affine.apply affine_map<()[s0] -> (s0 * {tile})>()[%wg]
        %m0 = hal.interface.binding.subspan layout({layout}) binding(0) alignment(64) offset(%c0) : memref<?xf32>{{%dim}}
        %m1 = hal.interface.binding.subspan layout({layout}) binding(1) alignment(64) offset(%c0) : memref<?xf32>{{%dim}}
        %base0, %off0, %size0, %stride0 = iree_codegen.extract_strided_metadata %m0
            : memref<?xf32> -> memref<f32>, index, index, index
        %base1, %off1, %size1, %stride1 = iree_codegen.extract_strided_metadata %m1
            : memref<?xf32> -> memref<f32>, index, index, index
        func.call @scale2_workgroup(%base0, %off0, %base1, %off1, %dim, %tid)
            : (memref<f32>, index, memref<f32>, index, index, index) -> ()
        return
      }}
    }}
  }}
"""
# target: (kernel source file and text, object file, its build command, executable target, body, driver)
TARGETS = {
    "cuda": ("scale2.cu", CUDA_KERNEL, "scale2.ptx", NVCC, '"cuda", "cuda-nvptx-fb"', CUDA_BODY, "cuda"),
    "cpu": ("scale2.c", C_KERNEL, "scale2_x86_64.o", CC, '"llvm-cpu", "embedded-elf-x86_64"', CPU_BODY, "local-task"),
}


def make(root: Path, target: str = "cuda") -> None:
    import jax
    import jax.numpy as jnp

    from iree_runner.compile import iree_compile

    src_name, kernel, obj_name, build, exe_target, body, _ = TARGETS[target]
    root.mkdir(parents=True, exist_ok=True)
    (root / src_name).write_text(kernel)
    obj = root / obj_name
    subprocess.run([*build, str(root / src_name), "-o", str(obj)], check=True)

    def f(x):  # codegen, the hand-written kernel, codegen
        y = jax.ffi.ffi_call("iree_scale2", jax.ShapeDtypeStruct((N,), jnp.float32))(jnp.tanh(x))
        return y + 1.0

    exported = jax.export.export(jax.jit(f), disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("iree_scale2")])
    text = exported(jax.ShapeDtypeStruct((N,), jnp.float32)).mlir_module()
    line = next(l for l in text.splitlines() if "custom_call @iree_scale2" in l)
    m = re.match(r"\s*(%\S+) = stablehlo.custom_call @iree_scale2\((%[^)]*)\)", line)
    dispatch = (f"    %n = arith.constant {N} : index\n    %n_i32 = arith.constant {N} : i32\n"
                f"    {m[1]} = flow.dispatch @ext::@scale2[%n](%n_i32, {m[2]}) : (i32, tensor<{N}xf32>) -> tensor<{N}xf32>")
    text = text.replace(line, dispatch)
    head_end = text.index("\n", text.index("module @")) + 1
    executable = (HEAD + body).format(target=exe_target, obj=obj.resolve(), layout=LAYOUT, tile=TILE)
    text = text[:head_end] + executable + text[head_end:]
    iree_compile.compile_mlir(text, root / "extern.vmfb", target, label="extern dispatch")


def run(root: Path, target: str = "cuda") -> float:
    import iree.runtime as rt

    config = rt.Config(TARGETS[target][-1])
    ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(root / "extern.vmfb"))], config=config)
    x = np.linspace(-2, 2, N, dtype=np.float32)
    got = np.asarray(ctx.modules.jit_f["main"](x))
    want = 2.0 * np.tanh(x) + 1.0
    err = float(np.abs(got - want).max())
    print(f"hand-written kernel in the step ({target}): max |got - numpy| = {err:.2e} ({'ok' if err < 1e-5 else 'WRONG'})")
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["make", "run"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--target", choices=list(TARGETS), default="cuda")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.dir, a.target)
    else:
        run(a.dir, a.target)


if __name__ == "__main__":
    main()
