"""A hand-written CUDA kernel inside a JAX-exported step: the path for fused kernels.

  # here (compiler and nvcc installed): PTX of a tiny kernel, a JAX function that calls it
  # through a custom_call placeholder, rewritten to IREE's flow.dispatch, compiled for CUDA
  python bench/extern_dispatch.py make DIR
  # on the GPU machine (runtime only): run it and compare with numpy
  python bench/extern_dispatch.py run DIR

How: jax.ffi.ffi_call leaves `stablehlo.custom_call @<name>` in the export (allowed by
DisabledSafetyCheck.custom_call); the text rewrite replaces it with `flow.dispatch
@ext::@<fn>[workload](push constants, operands)` and adds a `hal.executable.source` whose
objects are the PTX, as in IREE's samples/custom_dispatch/cuda/kernels. IREE 3.13 wants the
properties syntax: `hal.executable.source private @ext <{objects = ...}>` and the export's
`<workgroup_size = [...]>` after its count region. The compiled step keeps one host wait and
memoized command buffers, so such kernels can replace groups of IREE's small dispatches.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import numpy as np

N = 256
KERNEL = r"""
extern "C" __global__ void scale2(const float* __restrict__ binding0, float* __restrict__ binding1, int dim) {
  int tid = blockDim.x * blockIdx.x + threadIdx.x;
  if (tid < dim) binding1[tid] = 2.0f * binding0[tid];
}
"""
EXECUTABLE = """
  hal.executable.source private @ext <{{objects = #hal.executable.objects<{{
      #hal.executable.target<"cuda", "cuda-nvptx-fb"> = [#hal.executable.object<{{path = "{ptx}"}}>]}}>}}> {{
    hal.executable.export public @scale2 ordinal(0) layout(#hal.pipeline.layout<constants = 1, bindings = [
        #hal.pipeline.binding<storage_buffer, ReadOnly>, #hal.pipeline.binding<storage_buffer>]>)
        count(%device: !hal.device, %workload: index) -> (index, index, index) {{
      %x = affine.apply affine_map<()[s0] -> (s0 ceildiv 64)>()[%workload]
      %c1 = arith.constant 1 : index
      hal.return %x, %c1, %c1 : index, index, index
    }} <workgroup_size = [64 : index, 1 : index, 1 : index]>
  }}
"""


def make(root: Path) -> None:
    import jax
    import jax.numpy as jnp

    from iree_runner.compile import iree_compile

    root.mkdir(parents=True, exist_ok=True)
    (root / "scale2.cu").write_text(KERNEL)
    ptx = root / "scale2.ptx"
    subprocess.run(["nvcc", "-ptx", "-arch=sm_80", str(root / "scale2.cu"), "-o", str(ptx)], check=True)

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
    text = text[:head_end] + EXECUTABLE.format(ptx=ptx.resolve()) + text[head_end:]
    iree_compile.compile_mlir(text, root / "extern.vmfb", "cuda", label="extern dispatch")


def run(root: Path) -> None:
    import iree.runtime as rt

    config = rt.Config("cuda")
    ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(root / "extern.vmfb"))], config=config)
    x = np.linspace(-2, 2, N, dtype=np.float32)
    got = np.asarray(ctx.modules.jit_f["main"](x))
    want = 2.0 * np.tanh(x) + 1.0
    err = float(np.abs(got - want).max())
    print(f"hand-written kernel in the step: max |got - numpy| = {err:.2e} ({'ok' if err < 1e-5 else 'WRONG'})")


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
