"""Generation benchmark: iree-runner against its peers in the same run, on the same device.

For each model (bench/configs/, random weights) and variant (MLX 4-bit with BF16 scales, f16):
load time (files -> device-resident weights), prefill tok/s on a 512-token prompt, time to first
token, decode tok/s at batch 1 over 128 new tokens (each the median of TRIALS generations; greedy,
and for iree-runner also sampled with SAMPLED: drawn on the device where the bundle's steps
sample (CUDA), and on the host from each step's logits row as every bundle can), device
memory (ours: what the session allocates by its own count, and the peak of IREE's allocator in a
process of its own; the peers: their allocators' peaks, XLA's and torch's, on CUDA). Peers, same weights and shapes: JAX/XLA running our own model code under jax.jit; HF
transformers (torch, eager); mlx_lm on the MLX 4-bit checkpoint itself (--peers mlx; in a process
of its own, with MLX_PYTHONPATH ahead on its path where an MLX build for the device is installed
apart, e.g. mlx and mlx-cuda-13 on a CUDA machine); on the CPU, llama.cpp on Q4_0 and Q4_1 GGUF
files made from the f16 checkpoint (--peers jax,torch,llamacpp).
The roofline is the bytes a decode step must read (weights + the live KV cache) divided by the
copy bandwidth measured in the same run.

  python bench/run.py --ckpts DIR --bundles DIR --device cuda --json OUT.json
(bundles: DIR/<model>/ made by `iree-generate compile --target cuda --no-packed`, and with
--variants packed DIR/<model>-packed/ by `--packed`; checkpoints by
bench/make_checkpoints.py). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT_LEN, NEW_TOKENS = 512, 128


def _sync_cuda():
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


def copy_bandwidth_gbs(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 10)."""
    if device == "cuda":
        import torch

        a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        times = []
        for _ in range(12):
            torch.cuda.synchronize()
            t = time.perf_counter()
            b.copy_(a)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        del a, b
        torch.cuda.empty_cache()  # (the 2 GB back to the device for the rows that follow)
        return 2 * (1 << 30) / statistics.median(times[2:]) / 1e9
    a = np.ones(1 << 28, np.uint8)
    b = np.empty_like(a)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return 2 * a.nbytes / statistics.median(times[1:]) / 1e9


def decode_bytes(weights: dict, cfg_raw: dict, context: int, cache_bytes: int) -> int:
    """Bytes one decode step must read: every weight (the embedding only as lm_head, when tied,
    else one row) plus K and V of `context` positions."""
    total = 0
    for name, w in weights.items():
        if name.startswith("model.embed_tokens.") and not cfg_raw.get("tie_word_embeddings"):
            total += w.nbytes // w.shape[0]
        else:
            total += w.nbytes
    kvh = cfg_raw.get("num_key_value_heads") or cfg_raw["num_attention_heads"]
    dh = cfg_raw.get("head_dim") or cfg_raw["hidden_size"] // cfg_raw["num_attention_heads"]
    return total + 2 * cfg_raw["num_hidden_layers"] * context * kvh * dh * cache_bytes


# Timed generations per runtime and model, after a warm-up. A run's table gives the median of
# each metric over them; the JSON keeps every trial ("<metric>_trials"). One generation of 128
# tokens is ~0.1 s on a GPU, and a lent machine stalls for several ms now and then (seen with
# Python's GC off): one stall moved a single-trial decode figure by ~3%.
TRIALS = 3
METRICS = ("prefill_tps", "ttft_ms", "decode_tps")


def _timed_generation(prefill, decode, prompt, sync=_sync_cuda, trials=TRIALS):
    """prefill(prompt) -> token; decode(token) -> token: greedy, each runtime taking the argmax
    on the device and reading back one int per step."""
    def stream(p):
        token = prefill(p)
        yield token
        for _ in range(NEW_TOKENS - 1):
            token = decode(token)
            yield token
    return _timed_stream(stream, prompt, sync, trials)


def _timed_stream(stream, prompt, sync=_sync_cuda, trials=TRIALS):
    """stream(prompt) yields NEW_TOKENS greedy tokens, each as the host gets it: `trials`
    generations, each metric their median, the tokens the first's ("tokens_vary": whether
    another trial's differ, which a deterministic runtime never does)."""
    runs = [_one_timed_stream(stream, prompt, sync) for _ in range(trials)]
    out = {k: statistics.median(r[k] for r in runs) for k in METRICS}
    return out | {f"{k}_trials": [r[k] for r in runs] for k in METRICS} | {
        "tokens": runs[0]["tokens"], "tokens_vary": any(r["tokens"] != runs[0]["tokens"] for r in runs)}


def _one_timed_stream(stream, prompt, sync):
    sync()
    t0 = time.perf_counter()
    tokens = []
    for token in stream(prompt):
        tokens.append(token)
        if len(tokens) == 1:
            ttft = time.perf_counter() - t0
            t1 = time.perf_counter()
    decode_s = time.perf_counter() - t1
    assert len(tokens) == NEW_TOKENS, (len(tokens), NEW_TOKENS)
    return {"prefill_tps": len(prompt) / ttft, "ttft_ms": ttft * 1e3, "decode_tps": (NEW_TOKENS - 1) / decode_s,
            "tokens": tokens}


# Sampled decode, ours only: Qwen3's generation_config.json values (temperature 0.6, top-k 20,
# top-p 0.95), seeded.
SAMPLED = dict(temperature=0.6, top_k=20, top_p=0.95, seed=0)
PLAIN = dict(temperature=0.8, seed=0)  # a plain temperature: a draw from the whole vocabulary
PENALTY = dict(SAMPLED, repetition_penalty=1.1)  # SAMPLED with a repetition penalty over the sequence so far
GREEDY_PENALTY = dict(temperature=0.0, repetition_penalty=1.1)  # greedy with it (the penalized argmax)
# The sampled decode rates measured (here as decode_<name>_tps, in launch_overhead.py as
# <name>_ms_per_token): (name, settings, drawn on the device where the bundle's steps draw).
SAMPLED_RUNS = (("sampled", SAMPLED, True), ("sampled_host", SAMPLED, False), ("plain", PLAIN, True),
                ("penalty", PENALTY, True), ("greedy_penalty", GREEDY_PENALTY, True))


@contextlib.contextmanager
def drawn_on(session, device: bool):
    """generate_step on this session samples on the device (where its steps can), or with
    device=False on the host from each step's logits row, as a bundle without the kernel does."""
    saved = getattr(session, "samples_on_device", False)  # (a session of an older package has none)
    session.samples_on_device = saved and device
    try:
        yield
    finally:
        session.samples_on_device = saved


def leading_agreement(a: list[int], b: list[int]) -> int:
    """Greedy tokens equal before the first divergence (a correctness check beside the timing)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_prompt(vocab_size: int) -> list[int]:
    """The PROMPT_LEN prompt of every row: random ids in [100, 1000) (a vocabulary smaller than
    that, as the test checkpoints', wraps around)."""
    return (np.random.default_rng(0).integers(100, 1000, PROMPT_LEN) % vocab_size).tolist()


def load_ours(ckpt: Path, bundle: Path, device: str):
    """(session, weights, host seconds, load seconds): the bundle's session on the checkpoint's
    weights, loaded as iree-generate loads them (generate.load_model's path)."""
    from iree_runner.bundle import check_compatible, read_manifest
    from iree_runner.generate import check_weights, gather_for
    from iree_runner.session import Session
    from iree_runner.weights import open_checkpoint

    t0 = time.perf_counter()
    manifest = read_manifest(bundle)
    build = check_compatible(manifest, bundle, json.loads((ckpt / "config.json").read_text()), device)
    weights = gather_for(open_checkpoint(ckpt), build)
    check_weights(ckpt, build, weights)
    t_host = time.perf_counter() - t0
    s = Session(bundle, build, weights, **manifest.session_options)
    return s, weights, t_host, time.perf_counter() - t0


def peak_in_own_process(ckpt: Path, bundle: Path, device: str) -> float | None:
    """MB: the peak of IREE's device allocator over loading the bundle and generating 8 tokens
    after the PROMPT_LEN prompt, greedy then sampled (a step allocates nothing: its results and
    transients go into the session's buffers), in a process of its own (the allocator's
    peak counts from the process's first allocation on the device, and the device's used memory
    seen through torch went negative after the JAX peer freed memory: stop 18)."""
    out = subprocess.run([sys.executable, __file__, "--peak-of", str(bundle), "--ckpts", str(ckpt), "--device", device,
                          "--bundles", str(bundle.parent), "--json", os.devnull], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _peak_main(bundle: Path, ckpt: Path, device: str) -> None:
    from iree_runner.generate import generate_step
    from iree_runner.sampling import SamplingParams

    s, _, _, _ = load_ours(ckpt, bundle, device)
    prompt = bench_prompt(s.vocab_size)
    for params in (SamplingParams(), SamplingParams(**SAMPLED)):
        for _ in generate_step(s, prompt, params, 8):
            pass
    peak = s.device_peak_bytes
    print(json.dumps({"peak_mb": None if peak is None else peak / 2**20}))


def bench_ours(ckpt: Path, bundle: Path, device: str, prompt: list[int]) -> tuple[dict, dict]:
    from iree_runner.generate import generate_step
    from iree_runner.sampling import SamplingParams

    s, weights, t_host, load_s = load_ours(ckpt, bundle, device)

    def stream(p):  # as iree-generate runs it: the next step queued before a token is read
        return generate_step(s, p, SamplingParams(), NEW_TOKENS)

    def sampled(p, settings):  # as iree-generate samples: on the device where the bundle's steps do
        return generate_step(s, p, SamplingParams(**settings), NEW_TOKENS)

    _timed_stream(stream, prompt[:64], trials=1)  # warm-up
    r = _timed_stream(stream, prompt)
    for name, settings, on_device in SAMPLED_RUNS:
        with drawn_on(s, on_device):
            _timed_stream(lambda p: sampled(p, settings), prompt[:64], trials=1)
            one = _timed_stream(lambda p: sampled(p, settings), prompt)
        r |= {f"decode_{name}_tps": one["decode_tps"], f"decode_{name}_tps_trials": one["decode_tps_trials"]}
    r["sampled_on_device"] = s.samples_on_device
    # resident: what the session allocates on the device (weights, KV caches, the steps' results
    # and transients) as it counts them; peak: IREE's allocator's peak for the same work in a
    # process of its own.
    r |= {"load_s": load_s, "host_dequant_s": t_host, "resident_mb": s.stats.device_bytes / 2**20,
          "peak_mb": peak_in_own_process(ckpt, bundle, device)}
    s.reset()
    r["prompt_logits"] = np.asarray(s.prefill(prompt), np.float32)  # to compare with the JAX peer
    return r, weights


def bench_jax(ckpt: Path, device: str, prompt: list[int], weights: dict, chunk: int, max_context: int,
              cache_dtype: str) -> dict:
    """Our step function under jax.jit on the same weights, with the bundle's cache dtype (so the
    same attention form; compile/layers.py attention)."""
    import jax
    import jax.numpy as jnp

    from iree_runner.compile import export, family
    from iree_runner.sampling import device_params
    from iree_runner.weights import read_config

    cc = read_config(ckpt)
    fam = family.family_module(cc.model_type)
    cfg = fam.Config.from_checkpoint(cc)
    spec = export.step_spec(fam, cfg, capacity=max_context + chunk, weight_dtype=next(iter(weights.values())).dtype.name,
                            cache_dtype=cache_dtype)
    dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    w = {n: jax.device_put(weights[n], dev) for n in spec.weight_names}
    step = jax.jit(export.make_step(fam, cfg), donate_argnums=(1, 2, 3))
    greedy = device_params(None)  # no kernels under jax.jit: the argmax
    state = {}

    def reset():
        z = jnp.zeros(spec.cache_shape, spec.cache_dtype, device=dev)
        state.update(k=z, v=jnp.zeros_like(z), history=jnp.zeros(spec.capacity, jnp.int32, device=dev), pos=0)

    def run(tokens, last):
        state["logits"], token, state["k"], state["v"], state["history"] = step(
            w, state["k"], state["v"], state["history"], tokens, np.int32(state["pos"]), np.int32(last), greedy)
        return int(token[0])

    def prefill(p):
        reset()
        for i in range(0, len(p), chunk):
            part = np.zeros(chunk, np.int32)
            n = len(p[i:i + chunk])
            part[:n] = p[i:i + chunk]
            token = run(part, n - 1)
            state["pos"] += n
        return token

    def decode(t):
        token = run(np.array([t], np.int32), 0)
        state["pos"] += 1
        return token

    _timed_generation(prefill, decode, prompt[:64], trials=1)
    r = _timed_generation(prefill, decode, prompt)
    prefill(prompt)
    r["prompt_logits"] = np.asarray(state["logits"], np.float32)
    # XLA's allocator's peak on the device (the process's, from its first use: this is the
    # first JAX work of the run for the first model, and the larger model comes later).
    stats = dev.memory_stats() or {}
    r["peak_mb"] = stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None
    return r


def bench_torch(f16_ckpt: Path, device: str, prompt: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    # fp16 on CUDA, but Gemma's activations overflow fp16 (HF runs Gemma3 in bf16): bf16 there.
    gemma = json.loads((f16_ckpt / "config.json").read_text())["model_type"].startswith("gemma")
    dtype = torch.float16 if device == "cuda" and not gemma else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(f16_ckpt, dtype=dtype).to(device).eval()
    state = {}

    @torch.no_grad()
    def prefill(p):
        out = model(torch.tensor([p], device=device), use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    @torch.no_grad()
    def decode(t):
        out = model(torch.tensor([[t]], device=device), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _timed_generation(prefill, decode, prompt[:64], trials=1)
    r = _timed_generation(prefill, decode, prompt)
    # torch's caching allocator's peak during the runs (the weights included: they stay resident).
    r["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return r | {"dtype": str(dtype).removeprefix("torch.")}


def bench_mlx(ckpt: Path, device: str, prompt: list[int]) -> dict:
    """mlx_lm's own greedy generation (generate_step: the prompt in one call, each next step queued
    before a token is read) on an MLX checkpoint, timed as the other rows, in a process of its own:
    its MLX may be another install (MLX_PYTHONPATH), and its allocator is apart from XLA's and
    torch's. On a CUDA run, MLX must compute on the GPU."""
    env = dict(os.environ)
    if os.environ.get("MLX_PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["MLX_PYTHONPATH"], env.get("PYTHONPATH")]))
    p = subprocess.run([sys.executable, __file__, "--ckpts", str(ckpt), "--bundles", ".", "--json", "-",
                        "--device", device, "--mlx-of", json.dumps(prompt)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"mlx_lm on {ckpt.name} failed: {p.stderr.strip()[-300:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _mlx_main(ckpt: Path, device: str, prompt: list[int]) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    if device == "cuda" and mx.default_device() != mx.gpu:
        raise SystemExit(f"MLX computes on {mx.default_device()} here, not on the GPU (no CUDA build of MLX)")
    model, _ = load(str(ckpt))

    def stream(p):
        for token, _ in generate_step(mx.array(p), model, max_tokens=NEW_TOKENS):
            yield token

    _timed_stream(stream, prompt[:64], sync=mx.synchronize, trials=1)  # warm-up: its kernels compiled
    mx.reset_peak_memory()
    r = _timed_stream(stream, prompt, sync=mx.synchronize)
    versions = {name: v for name in ("mlx", "mlx-lm", "mlx-cuda-13", "mlx-cuda-12", "mlx-cpu") if (v := _version(name))}
    print(json.dumps(r | {"peak_mb": mx.get_peak_memory() / 2**20, "mlx_device": str(mx.default_device()),
                          "versions": versions}))


def _version(dist: str) -> str | None:
    """The installed version of a distribution, None where it is not installed."""
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def llamacpp_gguf(f16_ckpt: Path, quant: str) -> Path:
    """<model>-gguf/<quant>.gguf beside the f16 checkpoint, made once: f16.gguf by the HF -> GGUF
    converter of the llama-cpp-python sdist of the installed version (pip download, unpacked into the
    checkpoints folder), then llama_model_quantize to `quant` ("Q4_0", "Q4_1")."""
    import ctypes
    import tarfile

    import llama_cpp

    out = f16_ckpt.with_name(f16_ckpt.name.removesuffix("-f16") + "-gguf")
    out.mkdir(exist_ok=True)
    f16, dst = out / "f16.gguf", out / f"{quant}.gguf"
    if not f16.exists():
        sdist = f"llama_cpp_python-{llama_cpp.__version__}"
        src = out.parent / sdist / "vendor" / "llama.cpp"
        if not src.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", out.parent, f"llama-cpp-python=={llama_cpp.__version__}"], check=True)
            with tarfile.open(out.parent / f"{sdist}.tar.gz") as tar:
                tar.extractall(out.parent, filter="data")
        # Our checkpoints' stand-in tokenizer (3 words, no merges) is not one the converter knows: it names the
        # pre-tokenizer from a hash of the tokenizer's output and stops on an unknown one, and llama.cpp loads no
        # BPE vocabulary without merges. The timing never tokenizes: call it qwen2 and give it one merge.
        patched = ("import runpy, sys, gguf; from conversion.base import TextModel; "
                   "TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'; "
                   "SV = gguf.SpecialVocab; txt = SV._try_load_merges_txt; "
                   "SV._try_load_merges_txt = lambda self, path: txt(self, path) or self.merges.append('<s> </s>'); "
                   "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
        tmp = out / "f16.gguf.part"
        subprocess.run([sys.executable, "-c", patched, src / "convert_hf_to_gguf.py", f16_ckpt, "--outtype", "f16",
                        "--outfile", tmp], check=True,
                       env=os.environ | {"PYTHONPATH": os.pathsep.join([str(src), str(src / "gguf-py")])})
        tmp.rename(f16)
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
        tmp = out / f"{quant}.gguf.part"
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama_model_quantize {f16} -> {quant} failed")
        tmp.rename(dst)
    return dst


def bench_llamacpp(gguf: Path, prompt: list[int]) -> dict:
    """llama.cpp through llama_cpp.Llama on all the CPU's cores: prefill = reset + eval(prompt), decode =
    eval([token]), each then the argmax of the last position's logits."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=PROMPT_LEN + NEW_TOKENS + 16, n_threads=os.cpu_count(),
                          n_threads_batch=os.cpu_count(), logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def argmax_last():
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    def prefill(p):
        llm.reset()
        llm.eval(p)
        return argmax_last()

    def decode(t):
        llm.eval([t])
        return argmax_last()

    _timed_generation(prefill, decode, prompt[:64], sync=lambda: None, trials=1)
    r = _timed_generation(prefill, decode, prompt, sync=lambda: None)
    llm.close()
    return r


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} ({subprocess.getoutput('nproc')} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpts", type=Path, required=True)
    ap.add_argument("--bundles", type=Path, required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--models", default="qwen3-0.6b,llama-3.2-1b")
    ap.add_argument("--peers", default="jax,torch")
    ap.add_argument("--variants", default="", help="comma-separated suffixes: also run bundles DIR/<model>-<suffix>")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--peak-of", type=Path, help="(internal) print the peak device MB of this bundle on --ckpts")
    ap.add_argument("--mlx-of", help="(internal) print mlx_lm's timings on the checkpoint --ckpts for this prompt (JSON)")
    args = ap.parse_args()
    if args.peak_of:
        return _peak_main(args.peak_of, args.ckpts, args.device)
    if args.mlx_of:
        return _mlx_main(args.ckpts, args.device, json.loads(args.mlx_of))
    import importlib.metadata as md

    bw = copy_bandwidth_gbs(args.device)
    rows = []
    for model in args.models.split(","):
        raw = json.loads((Path(__file__).parent / "configs" / f"{model}.json").read_text())
        prompt = bench_prompt(raw["vocab_size"])
        bundles = [""] + [f"-{v}" for v in args.variants.split(",") if v]
        ours_tokens, packed_roof = {}, None
        for variant in ("4bit", "f16"):
            ckpt = args.ckpts / f"{model}-{variant}"
            for suffix in bundles:
                bundle = args.bundles / f"{model}{suffix}"
                manifest = json.loads((bundle / "manifest.json").read_text())
                if manifest["targets"][args.device].get("packed") and variant != "4bit":
                    continue  # a bundle with packed weights runs the quantized checkpoint only
                r, weights = bench_ours(ckpt, bundle, args.device, prompt)
                cache_bytes = np.dtype(manifest["targets"][args.device]["cache_dtype"]).itemsize
                need = decode_bytes(weights, raw, PROMPT_LEN + NEW_TOKENS // 2, cache_bytes)
                roof = bw * 1e9 / need
                logits = r.pop("prompt_logits")
                if manifest["targets"][args.device].get("packed"):
                    packed_roof = roof  # the bytes a step reads with 4-bit weights: MLX's roofline too
                if suffix == "":
                    ours_tokens[variant], ours_logits, base_weights, base_roof = r["tokens"], logits, weights, roof
                else:
                    r["same_tokens"] = leading_agreement(r["tokens"], ours_tokens[variant])
                    r["prompt_logit_err"] = float(np.abs(logits - ours_logits).max())
                    r["prompt_logit_max"] = float(np.abs(ours_logits).max())
                rows.append({"model": model, "variant": variant, "runtime": f"iree-runner{suffix}", **r,
                             "bytes_per_token": need, "roofline_tps": roof, "roofline_frac": r["decode_tps"] / roof})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                del weights
            if variant == "4bit" and "jax" in args.peers:
                manifest = json.loads((args.bundles / model / "manifest.json").read_text())
                try:
                    # The prompt in the longest chunk the bundle has: XLA gets our best too.
                    chunk = max(manifest["prefill_chunk"], manifest.get("prefill_long", 0))
                    j = bench_jax(ckpt, args.device, prompt, base_weights, chunk,
                                  manifest["max_context"], manifest["targets"][args.device]["cache_dtype"])
                    jax_logits = j.pop("prompt_logits")
                    rows.append({"model": model, "variant": variant, "runtime": "jax-xla (our model code)", **j,
                                 "roofline_frac": j["decode_tps"] / base_roof,
                                 "same_tokens": leading_agreement(j["tokens"], ours_tokens[variant]),
                                 "prompt_logit_err": float(np.abs(jax_logits - ours_logits).max()),
                                 "prompt_logit_max": float(np.abs(ours_logits).max())})
                except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
                    rows.append({"model": model, "variant": variant, "runtime": "jax-xla", "error": repr(e)[:300]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if variant == "4bit" and "mlx" in args.peers:
                try:
                    m = bench_mlx(ckpt, args.device, prompt)
                    rows.append({"model": model, "variant": variant,
                                 "runtime": f"mlx_lm {m['versions'].get('mlx-lm', '?')} (mlx {m['versions'].get('mlx', '?')}, "
                                            f"{m['mlx_device']})", **m,
                                 # (MLX reads the 4-bit weights: a packed bundle's bytes, where one ran)
                                 "roofline_frac": m["decode_tps"] / packed_roof if packed_roof else None,
                                 "same_tokens": leading_agreement(m["tokens"], ours_tokens[variant])})
                except Exception as e:  # noqa: BLE001
                    rows.append({"model": model, "variant": variant, "runtime": "mlx_lm", "error": repr(e)[:300]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            del base_weights
        if "torch" in args.peers:
            try:
                t = bench_torch(args.ckpts / f"{model}-f16", args.device, prompt)
                rows.append({"model": model, "variant": "f16", "runtime": f"hf-transformers eager ({t.pop('dtype')})", **t,
                             "same_tokens": leading_agreement(t["tokens"], ours_tokens["f16"])})
            except Exception as e:  # noqa: BLE001
                rows.append({"model": model, "variant": "f16", "runtime": "hf-transformers", "error": repr(e)[:300]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if "llamacpp" in args.peers and args.device == "cpu":
            for quant in ("Q4_0", "Q4_1"):
                try:
                    ll = bench_llamacpp(llamacpp_gguf(args.ckpts / f"{model}-f16", quant), prompt)
                    version = md.version("llama-cpp-python")
                    rows.append({"model": model, "variant": quant, "runtime": f"llama.cpp {version}", **ll,
                                 "same_tokens": leading_agreement(ll["tokens"], ours_tokens["f16"])})
                except Exception as e:  # noqa: BLE001
                    rows.append({"model": model, "variant": quant, "runtime": "llama.cpp", "error": repr(e)[:300]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"device": device_name(args.device), "copy_bandwidth_gbs": bw,
              "iree_runtime": md.version("iree-base-runtime"),
              "iree_compiler": sorted({json.loads((args.bundles / m / "manifest.json").read_text())["compiler_version"]
                                       for m in args.models.split(",")}),
              "prompt_tokens": PROMPT_LEN,
              "new_tokens": NEW_TOKENS, "sampled": SAMPLED, "plain": PLAIN, "penalty": PENALTY, "greedy_penalty": GREEDY_PENALTY, "command": " ".join(sys.argv), "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(table(result))


def _agreement(r: dict) -> str:
    if "same_tokens" not in r:
        return "—"
    cell = f"{r['same_tokens']}/{len(r['tokens'])}"
    if "prompt_logit_err" in r:
        cell += f" (prompt logits: max err {r['prompt_logit_err']:.1e} of {r['prompt_logit_max']:.2f})"
    return cell


def table(result: dict) -> str:
    head = ("| model | weights | runtime | load s | prefill tok/s | TTFT ms | decode tok/s | sampled decode tok/s "
            "(host draws) | plain temperature | with repetition penalty | greedy with it | roofline % | resident MB (peak MB) | "
            "same greedy tokens as iree-runner |")
    lines = [f"{result['device']}, copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s, "
             f"IREE {result['iree_runtime']}; sampled: {result.get('sampled', '—')}, plain: {result.get('plain', '—')}, "
             f"with repetition penalty: {result.get('penalty', '—')}",
             "", head, "|" + "---|" * 14]
    f = lambda r, k, fmt: format(r[k], fmt) if r.get(k) is not None else "—"  # noqa: E731
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['runtime']} | failed: {r['error'][:80]} ||||||||||||")
            continue
        frac = f"{100 * r['roofline_frac']:.0f}%" if r.get("roofline_frac") else "—"
        lines.append(f"| {r['model']} | {r['variant']} | {r['runtime']} | {f(r, 'load_s', '.2f')} | "
                     f"{f(r, 'prefill_tps', '.0f')} | {f(r, 'ttft_ms', '.1f')} | {f(r, 'decode_tps', '.1f')} | "
                     f"{f(r, 'decode_sampled_tps', '.1f')} ({f(r, 'decode_sampled_host_tps', '.1f')}) | {f(r, 'decode_plain_tps', '.1f')} | {f(r, 'decode_penalty_tps', '.1f')} | {f(r, 'decode_greedy_penalty_tps', '.1f')} | {frac} | {f(r, 'resident_mb', '.0f')} ({f(r, 'peak_mb', '.0f')}) | "
                     f"{_agreement(r)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
