"""Single ops compiled for CUDA and checked against numpy, to pin down IREE codegen faults.

  python bench/cuda_ops.py make DIR     # here: export + compile each case for CUDA
  python bench/cuda_ops.py check DIR    # GPU machine: run each case, compare with numpy

Inputs come from a seed (numpy default_rng), so only the .vmfb files travel. Cases: on-device
argmax formulations (greedy decoding reads one int back) and f16 matmuls with and without
batch dimensions (the MoE experts and an f16 KV cache use batched ones).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _inputs(case: dict) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(s, dtype=np.float32) * case["std"]).astype(d) for s, d in case["args"]]


def cases() -> dict:
    import jax
    import jax.numpy as jnp

    from iree_runner.compile.export import first_argmax

    def min_index_argmax(x):  # first_argmax before 2026-11-26: -1 on CUDA
        idx = jnp.arange(x.shape[0], dtype=jnp.int32)
        return jnp.min(jnp.where(x == jnp.max(x), idx, jnp.int32(x.shape[0])))

    def barrier_argmax(x):
        m = jax.lax.optimization_barrier(jnp.max(x))
        idx = jnp.arange(x.shape[0], dtype=jnp.int32)
        return jnp.min(jnp.where(x == m, idx, jnp.int32(x.shape[0])))

    def blocked_argmax(x, block=1024):
        V = x.shape[0]
        pad = -V % block
        xb = jnp.pad(x, (0, pad), constant_values=-jnp.inf).reshape(-1, block)
        m = xb.max(-1)
        col = jnp.arange(block, dtype=jnp.int32)
        first = jnp.min(jnp.where(xb == m[:, None], col, block), axis=-1) + jnp.arange(xb.shape[0], dtype=jnp.int32) * block
        best = jnp.max(m)
        return jnp.min(jnp.where(m == best, first, jnp.int32(V)))

    def float_index_argmax(x):
        V = x.shape[0]
        rev = jnp.float32(V) - jnp.arange(V, dtype=jnp.float32)  # exact below 2**24
        return (V - jnp.max(jnp.where(x == jnp.max(x), rev, 0.0))).astype(jnp.int32)

    def int_max_argmax(x):
        V = x.shape[0]
        rev = jnp.int32(V) - jnp.arange(V, dtype=jnp.int32)
        return V - jnp.max(jnp.where(x == jnp.max(x), rev, 0))

    out = {}
    for V in (512, 151936):
        for name, fn in (("first_argmax", first_argmax), ("min_index_argmax", min_index_argmax),
                         ("first_argmax_vec", lambda x: first_argmax(x)[None]),
                         ("jnp_argmax", lambda x: jnp.argmax(x).astype(jnp.int32)),
                         ("barrier_argmax", barrier_argmax), ("blocked_argmax", blocked_argmax),
                         ("float_index_argmax", float_index_argmax), ("int_max_argmax", int_max_argmax)):
            out[f"{name}_{V}"] = dict(fn=fn, args=[((V,), "float32")], std=1.0, ref="argmax")
    from iree_runner.compile.layers import top_k

    for shape, k in (((64, 128), 8), ((1, 128), 8), ((64, 4), 2)):
        out[f"top_k_{shape[0]}x{shape[1]}_k{k}"] = dict(fn=lambda x, k=k: top_k(x, k)[1], args=[(shape, "float32")],
                                                       std=1.0, ref=f"top{k}")
    f32 = jnp.float32
    einsums = (  # name, equation, operand shapes, dtype
        ("f16_matmul_2d", "cd,nd->cn", ((32, 128), (512, 128)), "float16"),
        ("f16_matmul_batched", "cei,edi->ced", ((32, 4, 128), (4, 128, 128)), "float16"),
        ("f16_moe_up", "cd,eid->cei", ((32, 128), (4, 128, 128)), "float16"),
        ("f16_attn_scores", "ckgd,skd->kgcs", ((32, 2, 2, 32), (544, 2, 32)), "float16"),
        ("f16_moe_down_two_contractions", "cei,edi->cd", ((32, 4, 128), (4, 128, 128)), "float16"),
        ("f16_moe_down_decode", "ki,kdi->d", ((8, 768), (8, 2048, 768)), "float16"),
        ("f32_matmul_batched", "cei,edi->ced", ((32, 4, 128), (4, 128, 128)), "float32"),
    )
    for std in (0.02, 0.5):
        for name, eq, shapes, dt in einsums:
            out[f"{name}_std{std}"] = dict(fn=lambda a, b, eq=eq: jnp.einsum(eq, a, b, preferred_element_type=f32),
                                           args=[(s, dt) for s in shapes], std=std, ref=eq)
    return out


def make(root: Path, target: str = "cuda") -> None:
    import jax

    from iree_runner.compile import iree_compile

    root.mkdir(parents=True, exist_ok=True)
    meta = {}
    for name, c in cases().items():
        specs = [jax.ShapeDtypeStruct(s, np.dtype(d)) for s, d in c["args"]]
        text = jax.export.export(jax.jit(c["fn"]))(*specs).mlir_module()
        iree_compile.compile_mlir(text, root / f"{name}.vmfb", target, label=name)
        meta[name] = {"args": c["args"], "std": c["std"], "ref": c["ref"]}
    (root / "cases.json").write_text(json.dumps(meta, indent=1))


def check(root: Path, target: str = "cuda") -> None:
    import iree.runtime as rt

    from iree_runner.session import DRIVERS

    config = rt.Config(DRIVERS[target])
    for name, case in json.loads((root / "cases.json").read_text()).items():
        xs = _inputs(case)
        ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(root / f"{name}.vmfb"))],
                               config=config)
        mod = next(m for n, m in ctx.modules.items() if n.startswith("jit_"))
        got = np.asarray(mod["main"](*xs).to_host())
        if case["ref"].startswith("top"):
            want = np.argsort(-xs[0], axis=-1, kind="stable")[..., :int(case["ref"][3:])]
            print(f"{name:32s} {'OK' if np.array_equal(got, want) else 'WRONG'}")
        elif case["ref"] == "argmax":
            want = np.argmax(xs[0])
            print(f"{name:32s} got {got.reshape(-1).tolist()} want {want} {'OK' if int(got.reshape(-1)[0]) == want else 'WRONG'}")
        else:
            want = np.einsum(case["ref"], *(x.astype(np.float32) for x in xs))
            err = float(np.abs(got - want).max())
            print(f"{name:32s} max|err| {err:.3g} max|ref| {float(np.abs(want).max()):.3g} "
                  f"{'OK' if err <= 1e-3 * float(np.abs(want).max()) else 'WRONG'}", flush=True)


if __name__ == "__main__":
    (make if sys.argv[1] == "make" else check)(Path(sys.argv[2]), *sys.argv[3:])  # [target], default cuda
