"""A hand-written C kernel inside a JAX-exported step on the CPU: extern_dispatch.py's path for llvm-cpu.

  # here (compiler and a C compiler installed): an object of a tiny C kernel, a JAX function that
  # calls it through a custom_call placeholder, rewritten to IREE's flow.dispatch, compiled for the CPU
  python bench/extern_dispatch_cpu.py make DIR
  # run it on local-task and compare with numpy
  python bench/extern_dispatch_cpu.py run DIR

How: as bench/extern_dispatch.py, the placeholder becomes `flow.dispatch @ext::@<fn>[workload](push
constants, operands)` of a `hal.executable.source` whose objects are the C object, keyed by the generic
`#hal.executable.target<"llvm-cpu", "embedded-elf-x86_64">` (matches whatever --iree-llvmcpu-target-cpu
makes). Unlike PTX, the object has no entry points of its own: the source also holds a `builtin.module`
whose exported `func.func` reads the push constants, bindings and workgroup id through `hal.interface.*`
and calls the C function, declared `hal.import.static` (linked from the object) and `llvm.bareptr`
(a binding arrives as a plain pointer plus its element offset), as in IREE's
samples/custom_dispatch/cpu/embedded. The object is linked into IREE's embedded ELF, so the C code must
be freestanding: no libc, no globals, no stack protector.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import numpy as np

N = 256
TILE = 64  # elements per workgroup
KERNEL = r"""
#include <stddef.h>

// One workgroup: binding1[tid:tid+64] = 2 * binding0[...]. IREE's bindings never alias: restrict.
void scale2_workgroup(const float* restrict binding0, size_t binding0_offset,
                      float* restrict binding1, size_t binding1_offset, size_t dim, size_t tid) {
  size_t end = tid + %(tile)d < dim ? tid + %(tile)d : dim;
  for (size_t i = tid; i < end; ++i) binding1[binding1_offset + i] = 2.0f * binding0[binding0_offset + i];
}
""" % {"tile": TILE}
# What IREE's sample passes clang for objects linked into the embedded ELF, with gcc's spelling.
CC = ("gcc", "-O3", "-march=native", "-std=c17", "-ffreestanding", "-fno-stack-protector", "-fPIC",
      "-fvisibility=hidden", "-fno-plt", "-fdata-sections", "-ffunction-sections", "-c")
LAYOUT = ("#hal.pipeline.layout<constants = 1, bindings = [#hal.pipeline.binding<storage_buffer, ReadOnly>, "
          "#hal.pipeline.binding<storage_buffer>]>")
EXECUTABLE = """
  hal.executable.source private @ext <{{objects = #hal.executable.objects<{{
      #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64"> = [#hal.executable.object<{{path = "{obj}"}}>]}}>}}> {{
    hal.executable.export public @scale2 ordinal(0) layout({layout})
        count(%device: !hal.device, %workload: index) -> (index, index, index) {{
      %x = affine.apply affine_map<()[s0] -> (s0 ceildiv {tile})>()[%workload]
      %c1 = arith.constant 1 : index
      hal.return %x, %c1, %c1 : index, index, index
    }}
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


def make(root: Path) -> None:
    import jax
    import jax.numpy as jnp

    from iree_runner.compile import iree_compile

    root.mkdir(parents=True, exist_ok=True)
    (root / "scale2.c").write_text(KERNEL)
    obj = root / "scale2_x86_64.o"
    subprocess.run([*CC, str(root / "scale2.c"), "-o", str(obj)], check=True)

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
    text = text[:head_end] + EXECUTABLE.format(obj=obj.resolve(), layout=LAYOUT, tile=TILE) + text[head_end:]
    iree_compile.compile_mlir(text, root / "extern.vmfb", "cpu", label="extern dispatch")


def run(root: Path) -> float:
    import iree.runtime as rt

    config = rt.Config("local-task")
    ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(root / "extern.vmfb"))], config=config)
    x = np.linspace(-2, 2, N, dtype=np.float32)
    got = np.asarray(ctx.modules.jit_f["main"](x))
    want = 2.0 * np.tanh(x) + 1.0
    err = float(np.abs(got - want).max())
    print(f"hand-written C kernel in the step: max |got - numpy| = {err:.2e} ({'ok' if err < 1e-5 else 'WRONG'})")
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["make", "run"])
    ap.add_argument("dir", type=Path)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.dir)
    else:
        run(a.dir)


if __name__ == "__main__":
    main()
