"""Bisect CUDA numerics: the same step variants compiled for CPU and CUDA, compared on logits.

  # here (compiler installed): compile each variant for cpu and cuda, save the CPU logits
  python bench/diag_cuda.py make DIR --model MODEL_DIR|CONFIG.json [--variants f16w-f32kv,f32w-f32kv]
  # on the GPU machine (runtime only): run the cuda builds, print |cuda - cpu| per step
  python bench/diag_cuda.py check DIR

--layers N keeps the config but N layers (shapes unchanged, compiles fast). --probe also builds
a prefill "probe" whose outputs include every intermediate (layer functions and the attention
taps of compile/layers.py); `check` then prints, in graph order, where CUDA first leaves the CPU.

--max-context N sizes the cache (the default 128 is small; real decode costs grow with it).
--set NAME=VALUE overrides a compile/layers.py constant for an experiment (CACHE_LAYOUT=SLHD;
extern.NAME=VALUE one of compile/extern.py, e.g. extern.KEYS_PER_BLOCK=8).

Weights are random (numpy default_rng(0), std 0.02) and made identically on both machines from
the seed, so only config.json travels. A variant is "<weights>w-<cache>kv" with dtypes f16/f32.
Std 0.02 gives small activations: faults that show only at larger values need
bench/cuda_ops.py (std 0.5) or the test checkpoints (bench/gpu_agreement.py).
Seen 2026-11-26 (H100, IREE 3.13): the "NaN" of the real-size bundles was the on-device argmax
(-1), not the logits, which matched the CPU; see bench/cuda_ops.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from iree_runner.bundle import TargetBuild
from iree_runner.sampling import device_params
from iree_runner.session import Session

DTYPES = {"f16": "float16", "f32": "float32"}
CHUNK, MAX_CONTEXT, FOLLOW = 64, 128, (7, 9, 11)


def random_weights(names, shapes, dtype) -> dict:
    rng = np.random.default_rng(0)
    return {n: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(dtype) for n, s in zip(names, shapes)}


def session_for(variant: Path, target: str) -> Session:
    meta = json.loads((variant / "meta.json").read_text())
    b = TargetBuild(target, "diag", (), {s: f"{target}/{s}.vmfb" for s in ("prefill", "decode")}, {},
                    tuple(meta["names"]), tuple(tuple(s) for s in meta["shapes"]), meta["wd"],
                    tuple(meta["cache_shape"]), meta["cd"],
                    capacity=meta.get("max_context", MAX_CONTEXT) + CHUNK)  # as make() exports the steps
    return Session(variant, b, random_weights(b.weight_names, b.weight_shapes, meta["wd"]),
                   max_context=meta.get("max_context", MAX_CONTEXT), prefill_chunk=CHUNK)


def run(variant: Path, target: str) -> np.ndarray:
    s = session_for(variant, target)
    out = [s.prefill(list(range(5, 5 + CHUNK)))]
    out += [s.decode(t) for t in FOLLOW]
    return np.stack(out)


def probe_step(fam, cfg):
    """The step with every tapped intermediate as an extra output (labels come back too)."""
    import jax

    from iree_runner.compile import export
    from iree_runner.compile import layers as L

    def step(weights, k_cache, v_cache, history, tokens, start, last, sampling):
        names = ["linear", "rms_norm", "apply_rope", "attention", "gated_mlp", "top_k"]
        saved = {n: getattr(L, n) for n in names}
        moe = getattr(fam, "moe", None)
        top_k = jax.lax.top_k

        def recording(n, f):
            def wrapped(*a, **k):
                out = f(*a, **k)
                if isinstance(out, (tuple, list)):  # lax.top_k returns a list
                    return tuple(L.tap(f"{n}.{i}", t) for i, t in enumerate(out))
                return L.tap(n, out)
            return wrapped

        L.TAPS = []
        try:
            for n in names:
                setattr(L, n, recording(n, saved[n]))
            if moe is not None:
                fam.moe = recording("moe", moe)
            jax.lax.top_k = recording("lax.top_k", top_k)
            out = export.make_step(fam, cfg)(weights, k_cache, v_cache, history, tokens, start, last, sampling)
            taps = list(L.TAPS)
        finally:
            L.TAPS = None
            jax.lax.top_k = top_k
            for n in names:
                setattr(L, n, saved[n])
            if moe is not None:
                fam.moe = moe
        step.labels = [n for n, _ in taps]
        return (*out, *(t for _, t in taps))

    return step


def export_probe(fam, cfg, spec) -> tuple[str, list[str]]:
    import jax

    from iree_runner.compile import export

    wdt = np.dtype(spec.weight_dtype)
    fn = probe_step(fam, cfg)
    weights = {n: jax.ShapeDtypeStruct(s, wdt) for n, s in zip(spec.weight_names, spec.weight_shapes)}
    cache = jax.ShapeDtypeStruct(spec.cache_shape, np.dtype(spec.cache_dtype))
    scalar = jax.ShapeDtypeStruct((), np.int32)
    exported = jax.export.export(jax.jit(fn))(weights, cache, cache, jax.ShapeDtypeStruct((spec.capacity,), np.int32),
                                             jax.ShapeDtypeStruct((CHUNK,), np.int32), scalar, scalar,
                                             jax.ShapeDtypeStruct((export.SAMPLING_PARAMS,), np.int32))
    return exported.mlir_module().replace("module @jit_step", "module @probe", 1), fn.labels


def run_probe(variant: Path, target: str) -> list[np.ndarray]:
    import iree.runtime as rt

    from iree_runner.session import DRIVERS

    meta = json.loads((variant / "meta.json").read_text())
    config = rt.Config(DRIVERS[target])
    ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(variant / target / "probe.vmfb"))],
                           config=config)
    w = random_weights(meta["names"], meta["shapes"], meta["wd"])
    cache = np.zeros(meta["cache_shape"], meta["cd"])
    outs = ctx.modules.probe["main"](*(w[n] for n in meta["names"]), cache, cache,
                                     np.zeros(meta.get("max_context", MAX_CONTEXT) + CHUNK, np.int32),  # the token history
                                     np.arange(5, 5 + CHUNK, dtype=np.int32), np.int32(0), np.int32(CHUNK - 1),
                                     device_params(None))
    return [np.asarray(o.to_host()) for o in outs]


def make(root: Path, model: Path, variants: list[str], layers: int | None = None, probe: bool = False,
         max_context: int = MAX_CONTEXT, settings: list[str] = ()) -> None:
    from iree_runner.compile import export, family, iree_compile
    from iree_runner.compile import layers as L
    from iree_runner.weights import read_config

    from iree_runner.compile import extern

    for item in settings:  # an experiment: [extern.]NAME=VALUE overrides a constant of compile/layers.py (or extern.py)
        name, value = item.split("=", 1)
        module, name = (extern, name[len("extern."):]) if name.startswith("extern.") else (L, name)
        setattr(module, name, type(getattr(module, name))(value))

    raw = json.loads((model if model.is_file() else model / "config.json").read_text())
    if layers:
        raw["num_hidden_layers"] = layers
        if raw.get("layer_types"):
            raw["layer_types"] = raw["layer_types"][:layers]
        if raw.get("mlp_only_layers"):
            raw["mlp_only_layers"] = [i for i in raw["mlp_only_layers"] if i < layers]
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "model" / "config.json").write_text(json.dumps(raw))
    model = root / "model"
    cc = read_config(model)
    fam = family.family_module(cc.model_type)
    cfg = fam.Config.from_checkpoint(cc)
    for name in variants:
        wd, cd = (DTYPES[p[:-1] if p.endswith("w") else p[:-2]] for p in name.split("-"))
        spec = export.step_spec(fam, cfg, capacity=max_context + CHUNK, weight_dtype=wd, cache_dtype=cd)
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        probe_text = None
        if probe:  # one export for both targets (it writes the cache as a slice)
            probe_text, labels = export_probe(fam, cfg, spec)
            (d / "labels.json").write_text(json.dumps(["logits", "argmax", "k_cache", "v_cache", "history", *labels]))
        for target in ("cpu", "cuda"):  # each target writes the cache its own way
            # One spec, so one cache layout, for both targets: the CPU then runs the JAX attention.
            modules = {step: export.export_step(fam, cfg, spec, tokens, step, **iree_compile.export_options(target))
                       for step, tokens in (("prefill", CHUNK), ("decode", 1))}
            if probe_text:
                modules["probe"] = probe_text
            (d / target).mkdir(parents=True, exist_ok=True)
            for step, text in modules.items():
                iree_compile.compile_mlir(text, d / target / f"{step}.vmfb", target, label=f"{name} {step}",
                                          flags=None if step == "probe" else iree_compile.step_flags(target))
        (d / "meta.json").write_text(json.dumps({"names": spec.weight_names, "shapes": spec.weight_shapes,
                                                 "wd": wd, "cd": cd, "cache_shape": spec.cache_shape,
                                                 "max_context": max_context}))
        logits = run(d, "cpu")
        np.savez_compressed(d / "cpu_logits.npz", _coarse(logits))
        print(f"{name}: cpu finite {bool(np.isfinite(logits).all())}, argmax {logits.argmax(-1).tolist()}")
        if probe:  # samples of each intermediate, so the file stays small (it travels to the GPU)
            outs = run_probe(d, "cpu")
            np.savez_compressed(d / "cpu_probe.npz", *(_sample(x) for x in outs),
                                absmax=np.array([_absmax(x) for x in outs]))


def _sample(x: np.ndarray, n: int = 4096) -> np.ndarray:
    flat = x.reshape(-1)
    return flat[::max(1, flat.size // n)][:n]


def _absmax(x: np.ndarray) -> float:
    return float(np.abs(x).max()) if x.size else 0.0


def _coarse(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float32:
        return x
    return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def compare_probe(d: Path) -> None:
    labels = json.loads((d / "labels.json").read_text())
    ref = np.load(d / "cpu_probe.npz")
    got = run_probe(d, "cuda")
    first_bad = None
    for i, (label, g) in enumerate(zip(labels, got)):
        r, scale = ref[f"arr_{i}"], float(ref["absmax"][i])  # a strided sample, the whole array's max
        gs = _sample(g)
        err = float(np.abs(gs.astype(np.float64) - r).max()) if gs.size else 0.0
        bad = not np.isfinite(g).all() or err > 1e-2 * max(scale, 1e-3)
        if bad and first_bad is None:
            first_bad = (i, label)
        print(f"  {i:3d} {label:12s} {str(g.shape):18s} finite {bool(np.isfinite(g).all())!s:5s} "
              f"cpu finite {bool(np.isfinite(scale))!s:5s} max|d| (sampled) {err:.3g} max|cpu| {scale:.3g} "
              f"max|cuda| {_absmax(g):.3g}"
              f"{'  <-- first bad' if first_bad == (i, label) else ''}", flush=True)


def check(root: Path) -> None:
    for d in sorted(p for p in root.iterdir() if (p / "meta.json").exists()):
        got, ref = run(d, "cuda"), np.load(d / "cpu_logits.npz")["arr_0"]
        print(f"{d.name}: finite {bool(np.isfinite(got).all())}, max |cuda - cpu| per step "
              f"{np.abs(got - ref).max(-1).round(4).tolist()}, argmax cuda {got.argmax(-1).tolist()} "
              f"cpu {ref.argmax(-1).tolist()}", flush=True)
        if (d / "cuda" / "probe.vmfb").exists():
            compare_probe(d)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["make", "check"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--variants", default="f16w-f32kv,f32w-f32kv,f16w-f16kv")
    ap.add_argument("--layers", type=int, help="keep only this many layers")
    ap.add_argument("--probe", action="store_true", help="also build the intermediates probe")
    ap.add_argument("--max-context", type=int, default=MAX_CONTEXT)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a compile/layers.py constant, e.g. CACHE_LAYOUT=LSHD or ALL_HEADS_MAX_TOKENS=64")
    a = ap.parse_args()
    if a.action == "make":
        make(a.dir, a.model, a.variants.split(","), a.layers, a.probe, a.max_context, a.set)
    else:
        check(a.dir)
