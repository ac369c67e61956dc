"""Decode-time matvecs of a Qwen3-0.6B-shaped model on the CPU: a hand-written 4-bit
dequantizing GEMV (C, linked into an IREE llvm-cpu step) against IREE's own codegen.

  .venv/bin/python bench/q4_gemv_cpu.py [--dir /tmp/q4] [--calls 20] [--skip-inline]

What: one call = the 28 layers x {qkv 4096x1024, o_proj 1024x2048, gate_up 6144x1024,
down 1024x3072} matvecs of one decode token, chained (each takes a slice of the previous
output) in ONE exported JAX function that takes every weight as an argument. Variants:
  q4-C       the C kernel on MLX affine 4-bit weights (packed uint32 + f32 scales/biases, group 64)
  f32-IREE   plain `w @ x` on f32 weights (what the project runs on the CPU today)
  q4-IREE    the 4-bit weights dequantized by jnp ops inside the graph, then `w @ x`
Prints ms per call (median after warm-up), the implied tok/s of the matvec part alone
(1000 / ms) and the weight bytes moved per second. The f32 weights are the q4 weights
dequantized, so the three chains must agree; one q4 matvec is also checked against numpy.

How the kernel gets in: as bench/extern_dispatch.py --target cpu. jax.ffi.ffi_call leaves a
`stablehlo.custom_call @q4_gemv` placeholder; a text rewrite turns each into
`flow.dispatch @ext::@q4_gemv[N](N, K, packed, scales, biases, x)`, and a `hal.executable.source`
holds the gcc object plus a shim that reads push constants, bindings and the workgroup id and
calls the C function once per workgroup (TILE rows). local-task spreads workgroups over the cores.
The packed words enter the step as int32 (the same bits; the kernel reads them as uint32).
Timed calls reuse one argument list of device buffers (Step), so no weight is copied per call.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from pathlib import Path

import numpy as np

LAYERS = 28
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # qkv, o_proj, gate_up, down: (N, K)
GROUP = 64
TILE = 64  # rows per workgroup: 16..96 workgroups per matrix (measured: 64 ~8 ms, 32 ~9 ms, 128 noisier)

C_KERNEL = r"""
#include <stddef.h>
#include <stdint.h>
#define TILE %(tile)d
#define KMAX 8192
// 16 lanes = one AVX-512 register = 16 packed words = two 64-wide groups of one row.
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64), aligned(4)));  // rows are only 4-byte aligned

// Rows [wg*TILE, wg*TILE+TILE) of y = dequant(packed, scales, biases) @ x. Bindings never alias.
void q4_gemv_workgroup(const uint32_t* restrict packed, size_t packed_off, const float* restrict scales,
                       size_t scales_off, const float* restrict biases, size_t biases_off,
                       const float* restrict x, size_t x_off, float* restrict y, size_t y_off,
                       size_t n, size_t k, size_t wg) {
  packed += packed_off; scales += scales_off; biases += biases_off; x += x_off; y += y_off;
  size_t ng = k / 64, r0 = wg * TILE, r1 = r0 + TILE < n ? r0 + TILE : n;
  // x reordered once per workgroup: lane j of xt[i/16 + t] is x[i + 8j + t] * 16^-t, the element
  // nibble t of word j multiplies when masked in place (w & 0xF << 4t): no shift in the row loop.
  vf xt[KMAX / 16];
  float xs[KMAX / 64];  // group sums of x: sum_k (s*q + b) x = s * sum(q x) + b * sum(x)
  for (size_t i = 0; i < k; i += 128)
    for (size_t t = 0; t < 8; ++t)
      for (size_t j = 0; j < 16; ++j) xt[i / 16 + t][j] = x[i + 8 * j + t] * (1.0f / (float)(1u << (4 * t)));
  for (size_t g = 0; g < ng; ++g) {
    float s = 0.0f;
    for (size_t i = 0; i < 64; ++i) s += x[64 * g + i];
    xs[g] = s;
  }
  for (size_t r = r0; r < r1; ++r) {
    const uint32_t* p = packed + r * (k / 8);
    const float* sc = scales + r * ng;
    const float* bi = biases + r * ng;
    vf acc = {0};
    float bacc = 0.0f;
    for (size_t g = 0; g < ng; g += 2) {  // two groups (128 weights, one cache line) per step
      // Software prefetch 8 KB ahead: with the hardware prefetcher alone a core streamed ~15 GB/s
      // and stalled; this took two cores from ~45 to ~63 Gweights/s in a standalone harness.
      __builtin_prefetch(p + 8 * g + 2048);
      vu w = *(const vu*)(p + 8 * g);
      const vf* xg = xt + 4 * g;
      vf d = {0};  // and, convert, fma per 16 weights
      for (unsigned t = 0; t < 8; ++t) d += __builtin_convertvector(w & (15u << (4 * t)), vf) * xg[t];
      float s0 = sc[g], s1 = sc[g + 1];
      vf sv = {s0, s0, s0, s0, s0, s0, s0, s0, s1, s1, s1, s1, s1, s1, s1, s1};
      acc += sv * d;
      bacc += bi[g] * xs[g] + bi[g + 1] * xs[g + 1];
    }
    float s = bacc;
    for (size_t j = 0; j < 16; ++j) s += acc[j];
    y[r] = s;
  }
}
""" % {"tile": TILE}
# extern_dispatch.py's freestanding flags, plus: contract a*b+c to FMA (ISO mode turns it off) and
# never turn loops into memset/memcpy calls (no libc in IREE's embedded ELF).
CC = ("gcc", "-O3", "-march=native", "-std=c17", "-ffp-contract=fast", "-ffreestanding",
      "-fno-stack-protector", "-fPIC", "-fvisibility=hidden", "-fno-plt", "-fdata-sections",
      "-ffunction-sections", "-fno-tree-loop-distribute-patterns", "-c")
LAYOUT = ("#hal.pipeline.layout<constants = 2, bindings = [" + ", ".join(
    ["#hal.pipeline.binding<storage_buffer, ReadOnly>"] * 4) + ", #hal.pipeline.binding<storage_buffer>]>")
EXECUTABLE = """
  hal.executable.source private @ext <{{objects = #hal.executable.objects<{{
      #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64"> = [#hal.executable.object<{{path = "{obj}"}}>]}}>}}> {{
    hal.executable.export public @q4_gemv ordinal(0) layout({L})
        count(%device: !hal.device, %workload: index) -> (index, index, index) {{
      %x = affine.apply affine_map<()[s0] -> (s0 ceildiv {tile})>()[%workload]
      %c1 = arith.constant 1 : index
      hal.return %x, %c1, %c1 : index, index, index
    }}
    builtin.module {{
      func.func private @q4_gemv_workgroup(%p: memref<i32>, %po: index, %s: memref<f32>, %so: index,
          %b: memref<f32>, %bo: index, %x: memref<f32>, %xo: index, %y: memref<f32>, %yo: index,
          %n: index, %k: index, %wg: index) attributes {{hal.import.static, llvm.bareptr = true}}
      func.func @q4_gemv() {{
        %c0 = arith.constant 0 : index
        %c8 = arith.constant 8 : index
        %c64 = arith.constant 64 : index
        %n_i32 = hal.interface.constant.load layout({L}) ordinal(0) : i32
        %k_i32 = hal.interface.constant.load layout({L}) ordinal(1) : i32
        %n = arith.index_castui %n_i32 : i32 to index
        %k = arith.index_castui %k_i32 : i32 to index
        %k8 = arith.divui %k, %c8 : index
        %kg = arith.divui %k, %c64 : index
        %np = arith.muli %n, %k8 : index
        %ng = arith.muli %n, %kg : index
        %wg = hal.interface.workgroup.id[0] : index
        %m0 = hal.interface.binding.subspan layout({L}) binding(0) alignment(64) offset(%c0) : memref<?xi32>{{%np}}
        %m1 = hal.interface.binding.subspan layout({L}) binding(1) alignment(64) offset(%c0) : memref<?xf32>{{%ng}}
        %m2 = hal.interface.binding.subspan layout({L}) binding(2) alignment(64) offset(%c0) : memref<?xf32>{{%ng}}
        %m3 = hal.interface.binding.subspan layout({L}) binding(3) alignment(64) offset(%c0) : memref<?xf32>{{%k}}
        %m4 = hal.interface.binding.subspan layout({L}) binding(4) alignment(64) offset(%c0) : memref<?xf32>{{%n}}
        %b0, %o0, %z0, %t0 = iree_codegen.extract_strided_metadata %m0 : memref<?xi32> -> memref<i32>, index, index, index
        %b1, %o1, %z1, %t1 = iree_codegen.extract_strided_metadata %m1 : memref<?xf32> -> memref<f32>, index, index, index
        %b2, %o2, %z2, %t2 = iree_codegen.extract_strided_metadata %m2 : memref<?xf32> -> memref<f32>, index, index, index
        %b3, %o3, %z3, %t3 = iree_codegen.extract_strided_metadata %m3 : memref<?xf32> -> memref<f32>, index, index, index
        %b4, %o4, %z4, %t4 = iree_codegen.extract_strided_metadata %m4 : memref<?xf32> -> memref<f32>, index, index, index
        func.call @q4_gemv_workgroup(%b0, %o0, %b1, %o1, %b2, %o2, %b3, %o3, %b4, %o4, %n, %k, %wg)
            : (memref<i32>, index, memref<f32>, index, memref<f32>, index, memref<f32>, index, memref<f32>, index,
               index, index, index) -> ()
        return
      }}
    }}
  }}
"""
PLACEHOLDER = re.compile(r"^(\s*)(%\S+) = stablehlo\.custom_call @q4_gemv\(([^)]*)\).* : \((.*)\) -> (tensor<(\d+)xf32>)")


def build_kernel(root: Path) -> Path:
    (root / "q4_gemv.c").write_text(C_KERNEL)
    obj = root / "q4_gemv.o"
    subprocess.run([*CC, str(root / "q4_gemv.c"), "-o", str(obj)], check=True)
    return obj


def make_weights(seed: int = 0):
    """Per matrix (packed int32 [N, K/8], scales [N, K/64], biases [N, K/64]); random, scaled
    so a matvec keeps |x| about the same (q - 7.5 has std ~4.6)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            packed = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint32).view(np.int32)
            s = (rng.uniform(0.5, 1.5, size=(n, k // GROUP)) / (4.6 * np.sqrt(k))).astype(np.float32)
            out.append((packed, s, (-7.5 * s).astype(np.float32)))  # mean weight 0
    return out


def dequant_np(packed, scales, biases):
    n = packed.shape[0]
    q = (packed.view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF  # [N, K/8, 8]
    q = q.reshape(n, -1, GROUP).astype(np.float32)
    return (q * scales[..., None] + biases[..., None]).reshape(n, -1)


def export_text(fn, specs, custom: bool) -> str:
    import jax

    checks = [jax.export.DisabledSafetyCheck.custom_call("q4_gemv")] if custom else []
    return jax.export.export(jax.jit(fn), disabled_checks=checks)(*specs).mlir_module()


def link(text: str, obj: Path) -> str:
    """Placeholders -> flow.dispatch of the C kernel; the executable goes at the module's top."""
    lines = []
    for i, line in enumerate(text.splitlines()):
        m = PLACEHOLDER.match(line)
        if m:
            ind, res, ops, types, rtype, n = m.groups()
            k = int(re.match(r"tensor<\d+x(\d+)xi32>", types)[1]) * 8
            lines += [f"{ind}%q4n{i} = arith.constant {n} : index", f"{ind}%q4n{i}_i32 = arith.constant {n} : i32",
                      f"{ind}%q4k{i}_i32 = arith.constant {k} : i32",
                      f"{ind}{res} = flow.dispatch @ext::@q4_gemv[%q4n{i}](%q4n{i}_i32, %q4k{i}_i32, {ops})"
                      f" : (i32, i32, {types}) -> {rtype}"]
        else:
            lines.append(line)
    text = "\n".join(lines)
    assert "custom_call" not in text, "a placeholder was not rewritten"
    head_end = text.index("\n", text.index("module @")) + 1
    return text[:head_end] + EXECUTABLE.format(obj=obj.resolve(), L=LAYOUT, tile=TILE) + text[head_end:]


# The three matvec flavours, each (x, *matrix arrays) -> y.
def mv_c(x, p, s, b):
    import jax
    import jax.numpy as jnp

    return jax.ffi.ffi_call("q4_gemv", jax.ShapeDtypeStruct((p.shape[0],), jnp.float32))(p, s, b, x)


def mv_f32(x, w):
    return w @ x


def mv_deq(x, p, s, b):
    import jax.numpy as jnp

    n = p.shape[0]
    q = (p[:, :, None] >> (4 * jnp.arange(8, dtype=jnp.int32))) & 15  # arithmetic shift; & 15 keeps the nibble
    w = q.reshape(n, -1, GROUP).astype(jnp.float32) * s[..., None] + b[..., None]
    return w.reshape(n, -1) @ x


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
            specs += [jax.ShapeDtypeStruct((n, k // 8), jnp.int32), jax.ShapeDtypeStruct((n, k // GROUP), jnp.float32),
                      jax.ShapeDtypeStruct((n, k // GROUP), jnp.float32)]
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


def check_one(root: Path, obj: Path, weights, x) -> None:
    """The first qkv matrix through the C kernel against numpy's dequantize-then-matvec."""
    import jax
    import jax.numpy as jnp

    n, k = SHAPES[0]
    specs = [jax.ShapeDtypeStruct((k,), jnp.float32), jax.ShapeDtypeStruct((n, k // 8), jnp.int32),
             jax.ShapeDtypeStruct((n, k // GROUP), jnp.float32), jax.ShapeDtypeStruct((n, k // GROUP), jnp.float32)]
    step = Step(compile_variant(root, "q4_one", link(export_text(mv_c, specs, custom=True), obj)))
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

    obj = build_kernel(a.dir)
    weights = make_weights()
    x = np.random.default_rng(1).standard_normal(SHAPES[0][1]).astype(np.float32)
    check_one(a.dir, obj, weights, x)

    q4_bytes = sum(arr.nbytes for w in weights for arr in w)
    f32_bytes = sum(n * k * 4 for n, k in SHAPES) * LAYERS
    vmfbs = {"q4-C": compile_variant(a.dir, "q4_c", link(export_text(chain(mv_c, 3), q4_specs(), True), obj)),
             "f32-IREE": compile_variant(a.dir, "f32_iree", export_text(chain(mv_f32, 1), f32_specs(), False))}
    if not a.skip_inline:
        vmfbs["q4-IREE"] = compile_variant(a.dir, "q4_iree", export_text(chain(mv_deq, 3), q4_specs(), False),
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
