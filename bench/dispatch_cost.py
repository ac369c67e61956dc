"""What one dispatch costs end to end on IREE's CUDA runtime, apart from its work.

  # here (compiler installed): a chain of N tiny dependent matvecs, one dispatch each
  python bench/dispatch_cost.py make DIR [--counts 64,290,580]
  # on the GPU machine (runtime only): wall time per call and per dispatch
  python bench/dispatch_cost.py run DIR

A decode step is ~580 dispatches; if the wall time per dispatch of this chain is well above
the GPU time of a tiny kernel (~3 us under ncu), the host issuing the work is the bound.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

WIDTH = 64


def make(root: Path, counts: list[int]) -> None:
    import jax
    import jax.numpy as jnp

    from iree_runner.compile import iree_compile

    root.mkdir(parents=True, exist_ok=True)
    for n in counts:
        def chain(w, x):
            for i in range(n):  # a matvec each: IREE does not fuse one into the next
                x = jnp.tanh(jnp.dot(w[i % w.shape[0]], x, preferred_element_type=jnp.float32)).astype(jnp.float16)
            return x

        spec = (jax.ShapeDtypeStruct((8, WIDTH, WIDTH), jnp.float16), jax.ShapeDtypeStruct((WIDTH,), jnp.float16))
        text = jax.export.export(jax.jit(chain))(*spec).mlir_module()
        iree_compile.compile_mlir(text, root / f"chain{n}.vmfb", "cuda", label=f"chain of {n}")


def run(root: Path, calls: int = 200) -> None:
    import iree.runtime as rt

    w = (np.random.default_rng(0).standard_normal((8, WIDTH, WIDTH)) * 0.1).astype(np.float16)
    x = np.ones(WIDTH, np.float16)
    for vmfb in sorted(root.glob("chain*.vmfb"), key=lambda p: int(p.stem[5:])):
        n = int(vmfb.stem[5:])
        config = rt.Config("cuda")
        ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(vmfb))], config=config)
        main = ctx.modules.jit_chain["main"]
        dw = rt.asdevicearray(config.device, w)
        dx = rt.asdevicearray(config.device, x)
        for _ in range(10):
            np.asarray(main(dw, dx))
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            np.asarray(main(dw, dx))
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        print(f"chain of {n:4d} matvecs: {ms:7.3f} ms per call (median of {calls}), {ms * 1e3 / n:6.2f} us per dispatch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["make", "run"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--counts", default="64,290,580")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.dir, [int(c) for c in a.counts.split(",")])
    else:
        run(a.dir)


if __name__ == "__main__":
    main()
