"""Decode-time matvecs of a Qwen3-0.6B-shaped model on the CPU: the hand-written 4-bit
dequantizing GEMV (compile/kernels/q4_gemv.c, linked by compile/extern.py) against IREE's own
codegen.

  .venv/bin/python bench/q4_gemv_cpu.py [--dir /tmp/q4] [--calls 20] [--skip-inline]

What: one call = the 28 layers x {qkv 4096x1024, o_proj 1024x2048, gate_up 6144x1024,
down 1024x3072} matvecs of one decode token, chained (each takes a slice of the previous
output) in ONE exported JAX function that takes every weight as an argument. Variants:
  q4-C       the kernel on MLX affine 4-bit weights (packed uint32 + f32 scales_biases, group 64)
  f32-IREE   plain `w @ x` on f32 weights (what the CPU runs without --packed)
  q4-IREE    the 4-bit weights dequantized inside the graph (compile/packed.py), then `w @ x`
Prints ms per call (median after warm-up), the implied tok/s of the matvec part alone
(1000 / ms) and the weight bytes moved per second. The f32 weights are the q4 weights
dequantized, so the three chains must agree; one q4 matvec is also checked against numpy.
Timed calls reuse one argument list of device buffers (Step), so no weight is copied per call.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

LAYERS = 28
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # qkv, o_proj, gate_up, down: (N, K)
GROUP = 64

def make_weights(seed: int = 0):
    """Per matrix (packed uint32 [N, K/8], scales_biases [N, K/64, 2] as a step takes them:
    compile/packed.py); random, scaled so a matvec keeps |x| about the same (q - 7.5 has std ~4.6)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            packed = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint32)
            s = (rng.uniform(0.5, 1.5, size=(n, k // GROUP)) / (4.6 * np.sqrt(k))).astype(np.float32)
            out.append((packed, np.stack([s, (-7.5 * s).astype(np.float32)], axis=-1)))  # mean weight 0
    return out


def dequant_np(packed, scales_biases):
    scales, biases = scales_biases[..., 0], scales_biases[..., 1]
    n = packed.shape[0]
    q = (packed.view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF  # [N, K/8, 8]
    q = q.reshape(n, -1, GROUP).astype(np.float32)
    return (q * scales[..., None] + biases[..., None]).reshape(n, -1)


def export_text(fn, specs) -> str:
    import jax

    from iree_runner.compile import extern

    return extern.link(jax.export.export(jax.jit(fn), disabled_checks=extern.disabled_checks())(*specs).mlir_module())


# The three matvec flavours, each (x, *matrix arrays) -> y.
def mv_c(x, p, sb):
    import jax.numpy as jnp

    from iree_runner.compile import extern
    from iree_runner.compile.packed import Packed

    return extern.q4_gemv(x, Packed(p, sb, 4, GROUP, jnp.float32))


def mv_f32(x, w):
    return w @ x


def mv_deq(x, p, sb):
    import jax.numpy as jnp

    from iree_runner.compile.packed import Packed

    return Packed(p, sb, 4, GROUP, jnp.float32).dequantize() @ x


def chain(mv, per: int):
    """One decode token's matvecs: every matrix's output, cut to the next one's K, feeds it."""
    def f(x, *ws):
        for m in range(LAYERS * len(SHAPES)):
            x = mv(x, *ws[per * m:per * m + per])
            x = x[:SHAPES[(m + 1) % len(SHAPES)][1]]
        return x
    return f


def q4_specs(x_len=SHAPES[0][1]):
    import jax
    import jax.numpy as jnp

    specs = [jax.ShapeDtypeStruct((x_len,), jnp.float32)]
    for _ in range(LAYERS):
        for n, k in SHAPES:
            specs += [jax.ShapeDtypeStruct((n, k // 8), jnp.uint32),
                      jax.ShapeDtypeStruct((n, k // GROUP, 2), jnp.float32)]
    return specs


def f32_specs():
    import jax
    import jax.numpy as jnp

    return [jax.ShapeDtypeStruct((SHAPES[0][1],), jnp.float32)] + [
        jax.ShapeDtypeStruct((n, k), jnp.float32) for _ in range(LAYERS) for n, k in SHAPES]


def compile_variant(root: Path, name: str, text: str, timeout: float | None = None) -> Path | None:
    """The variant's vmfb, or None (with a note) when it does not compile within `timeout` seconds."""
    from iree_runner.compile import iree_compile

    out = root / f"{name}.vmfb"
    try:
        iree_compile.compile_mlir(text, out, "cpu", label=name, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {name}: not compiled within {timeout:.0f}s, skipped")
        return None
    return out


class Step:
    """A loaded vmfb whose `main` is invoked with a prebuilt argument list of device buffers,
    so a timed call costs no host copies and little Python."""

    def __init__(self, vmfb: Path):
        import iree.runtime as rt

        self.rt = rt
        self.config = rt.Config("local-task")
        self.ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(self.config.vm_instance, str(vmfb))], config=self.config)
        mod = next(m for name, m in self.ctx.modules.items() if name.startswith("jit_"))
        self.fn = mod.vm_module.lookup_function("main")
        self.args = rt.VmVariantList(0)
        self.keep = []

    def push(self, a: np.ndarray) -> None:
        d = self.rt.asdevicearray(self.config.device, a)
        self.keep.append(d)
        self.args.push_ref(d._buffer_view)

    def call(self) -> np.ndarray:
        rets = self.rt.VmVariantList(1)
        self.ctx.vm_context.invoke(self.fn, self.args, rets)
        bv = rets.get_as_object(0, self.rt.HalBufferView)
        return self.rt.DeviceArray(self.config.device, bv).to_host()

    def time(self, calls: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            self.call()
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            self.call()
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))


def check_one(root: Path, weights, x) -> None:
    """The first qkv matrix through the C kernel against numpy's dequantize-then-matvec."""
    import jax
    import jax.numpy as jnp

    n, k = SHAPES[0]
    specs = [jax.ShapeDtypeStruct((k,), jnp.float32), jax.ShapeDtypeStruct((n, k // 8), jnp.uint32),
             jax.ShapeDtypeStruct((n, k // GROUP, 2), jnp.float32)]
    step = Step(compile_variant(root, "q4_one", export_text(mv_c, specs)))
    for a in (x, *weights[0]):
        step.push(a)
    got = step.call()
    want = dequant_np(*weights[0]).astype(np.float64) @ x.astype(np.float64)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"correctness, one {n}x{k} q4 matvec vs numpy: max|err|/max|y| = {err:.2e} ({'ok' if err < 1e-3 else 'WRONG'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/q4"))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--skip-inline", action="store_true", help="skip the in-graph dequant variant")
    ap.add_argument("--inline-timeout", type=float, default=180.0)
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)

    weights = make_weights()
    x = np.random.default_rng(1).standard_normal(SHAPES[0][1]).astype(np.float32)
    check_one(a.dir, weights, x)

    q4_bytes = sum(arr.nbytes for w in weights for arr in w)
    f32_bytes = sum(n * k * 4 for n, k in SHAPES) * LAYERS
    vmfbs = {"q4-C": compile_variant(a.dir, "q4_c", export_text(chain(mv_c, 2), q4_specs())),
             "f32-IREE": compile_variant(a.dir, "f32_iree", export_text(chain(mv_f32, 1), f32_specs()))}
    if not a.skip_inline:
        vmfbs["q4-IREE"] = compile_variant(a.dir, "q4_iree", export_text(chain(mv_deq, 2), q4_specs()),
                                           timeout=a.inline_timeout)

    rows, outs = [], {}
    for name, vmfb in vmfbs.items():
        if vmfb is None:
            continue
        step = Step(vmfb)
        step.push(x)
        for w in weights:
            if name == "f32-IREE":
                step.push(dequant_np(*w))  # one f32 matrix on the host at a time
            else:
                for arr in w:
                    step.push(arr)
        nbytes = f32_bytes if name == "f32-IREE" else q4_bytes
        outs[name] = step.call()
        ms = step.time(a.calls)
        rows.append((name, ms, nbytes))
        del step  # frees the device weights before the next variant loads its own

    ref = outs["f32-IREE"]
    for name, y in outs.items():
        if name != "f32-IREE":
            err = float(np.abs(y - ref).max() / np.abs(ref).max())
            print(f"chain output {name} vs f32-IREE: max|err|/max|y| = {err:.2e}")
    print(f"\n{'variant':10} {'weights GB':>10} {'ms/call':>9} {'tok/s':>7} {'GB/s':>6}   (median of {a.calls} calls)")
    for name, ms, nbytes in rows:
        print(f"{name:10} {nbytes / 1e9:10.3f} {ms:9.2f} {1e3 / ms:7.1f} {nbytes / 1e9 / (ms / 1e3):6.1f}")


if __name__ == "__main__":
    main()
