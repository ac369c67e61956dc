"""Benchmark: a Qwen3-0.6B-shaped MLX 4-bit checkpoint -> device-ready f16 numpy arrays.

Makes the checkpoint once (random weights, mx.quantize with BF16 scales/biases, group size 64,
mx.save_safetensors) under <repo>/.cache/bench/, then loads it in a fresh subprocess per run so
ru_maxrss is the peak of the load alone. Reports time to arrays, dequant throughput (GB/s of
output) and peak RSS against the output size.

    .venv/bin/python scripts/bench_weights.py [--runs 3] [--dtype f16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"

# The real Qwen3-0.6B config.json (hidden 1024, 28 layers, 16 q / 8 kv heads of 128, MLP 3072,
# vocab 151936, tied), shared with the generation benchmark.
QWEN3_0_6B = json.loads((REPO / "bench" / "configs" / "qwen3-0.6b.json").read_text())
BITS, GROUP_SIZE = 4, 64


def layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Float shapes of every tensor, as mlx_lm names them for qwen3."""
    h, hd, inter = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.self_attn.q_norm.weight": (hd,),
            f"{p}.self_attn.k_norm.weight": (hd,),
            f"{p}.mlp.gate_proj.weight": (inter, h),
            f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        })
    return shapes


def make_checkpoint(model_dir: Path) -> Path:
    """Random Qwen3-0.6B-shaped checkpoint, 4-bit, BF16 scales/biases (cached)."""
    if (model_dir / "config.json").exists():
        return model_dir
    import mlx.core as mx

    model_dir.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    tensors = {}
    for name, shape in layer_shapes(QWEN3_0_6B).items():
        if len(shape) == 1:
            tensors[name] = (1.0 + 0.1 * mx.random.normal(shape)).astype(mx.bfloat16)
            continue
        w = (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)
        wq, scales, biases = mx.quantize(w, group_size=GROUP_SIZE, bits=BITS)
        base = name[: -len(".weight")]
        tensors[name] = wq
        tensors[f"{base}.scales"] = scales.astype(mx.bfloat16)
        tensors[f"{base}.biases"] = biases.astype(mx.bfloat16)
        mx.eval(tensors[name], tensors[f"{base}.scales"], tensors[f"{base}.biases"])
    tmp = model_dir / "model.tmp.safetensors"
    mx.save_safetensors(str(tmp), tensors, metadata={"format": "mlx"})
    os.replace(tmp, model_dir / "model.safetensors")
    quant = {"group_size": GROUP_SIZE, "bits": BITS, "mode": "affine"}
    config = {**QWEN3_0_6B, "quantization": quant, "quantization_config": quant}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def child(model_dir: str, dtype_name: str, workers: int | None) -> None:
    """One measured load, in its own process; prints a JSON line."""
    import numpy as np

    from iree_runner.weights import open_checkpoint

    dtype = {"f16": np.float16, "f32": np.float32}[dtype_name]
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_dir)
    t1 = time.perf_counter()
    arrays = ckpt.load_all(dtype, max_workers=workers)
    t2 = time.perf_counter()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    out_bytes = sum(a.nbytes for a in arrays.values())
    quant_bytes = sum(arrays[n].nbytes for n in ckpt.names() if ckpt.is_quantized(n))
    print(json.dumps({
        "open_s": t1 - t0,
        "load_s": t2 - t1,
        "total_s": t2 - t0,
        "output_bytes": out_bytes,
        "quantized_output_bytes": quant_bytes,
        "tensors": len(arrays),
        # CPU seconds of the open+load (all threads): robust to other load on a shared machine.
        "user_s": usage1.ru_utime - usage0.ru_utime,
        "sys_s": usage1.ru_stime - usage0.ru_stime,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


def measure(model_dir: Path, dtype: str, workers: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--dtype", dtype]
    if workers:
        cmd += ["--workers", str(workers)]
    # The wall clock includes interpreter start and imports: what a user waits for.
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["f16", "f32"], action="append", help="output dtype(s); default f16")
    parser.add_argument("--workers", type=int, default=None, help="threads for load_all (default: cpu count)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dtype[0], args.workers)
        return

    model_dir = make_checkpoint(CACHE / f"qwen3-0.6b-shaped-{BITS}bit-g{GROUP_SIZE}-bf16")
    file_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    measure(model_dir, "f16", args.workers)  # warm the page cache; not reported
    rows = []
    for dtype in args.dtype or ["f16"]:
        runs = [measure(model_dir, dtype, args.workers) for _ in range(args.runs)]
        total = statistics.median(r["total_s"] for r in runs)
        load = statistics.median(r["load_s"] for r in runs)
        peak = max(r["peak_rss_bytes"] for r in runs)
        out_bytes = runs[0]["output_bytes"]
        rows.append({
            "dtype": dtype,
            "runs": runs,
            "median_open_s": statistics.median(r["open_s"] for r in runs),
            "median_load_s": load,
            "median_total_s": total,
            "median_process_wall_s": statistics.median(r["process_wall_s"] for r in runs),
            "median_user_s": statistics.median(r["user_s"] for r in runs),
            "median_sys_s": statistics.median(r["sys_s"] for r in runs),
            "output_gb": out_bytes / 1e9,
            "throughput_gb_s": out_bytes / 1e9 / load,
            "peak_rss_gb": peak / 1e9,
            "peak_rss_over_output": peak / out_bytes,
        })

    print(f"checkpoint: {model_dir} ({file_bytes / 1e9:.3f} GB on disk, {runs[0]['tensors']} tensors)")
    print(f"cpus: {os.cpu_count()}, workers: {args.workers or os.cpu_count()}, runs: {args.runs}, page cache warm")
    header = f"{'dtype':>5} {'open s':>7} {'load s':>7} {'total s':>8} {'proc s':>7} {'out GB':>7} {'GB/s':>6} {'peak GB':>8} {'peak/out':>8} {'user s':>7} {'sys s':>6}"
    print(header)
    for r in rows:
        print(f"{r['dtype']:>5} {r['median_open_s']:7.3f} {r['median_load_s']:7.3f} {r['median_total_s']:8.3f} "
              f"{r['median_process_wall_s']:7.3f} {r['output_gb']:7.3f} {r['throughput_gb_s']:6.2f} "
              f"{r['peak_rss_gb']:8.3f} {r['peak_rss_over_output']:8.2f} {r['median_user_s']:7.2f} {r['median_sys_s']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(model_dir), "file_bytes": file_bytes,
                                         "cpus": os.cpu_count(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
