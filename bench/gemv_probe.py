"""A probe for issue 5 (bench/gemv_probe.cu): each 4-bit matvec shape of a Qwen3-0.6B and a
Llama-3.2-1B decode layer (qkv with the norm, o with the residual, gate/up with the norm and
SwiGLU, down with the residual), one launch per layer over distinct random weights (DRAM-cold,
as in a step), in several forms: gemv.cu's gemv_q4 (a warp per row, as a step runs it), the
looped forms (one wave of blocks, a warp looping over rows with two in flight), gemv_q4 with
all of a row loaded ahead, and read_bytes over the same bytes (the ceiling). Raw CUDA driver
calls through ctypes on torch's context (bench/persistent_probe.py's helpers); no IREE.

  nvcc -ptx -arch=sm_80 -O3 -Icompile/kernels bench/gemv_probe.cu -o PTX       # here
  python3 bench/gemv_probe.py PTX [--json OUT]                                  # GPU machine

Each form is checked against gemv_q4 (max abs difference of every layer's output), then timed
as a CUDA graph of the layers' launches (kernel time and the graph's small gaps) and as launches
on a stream kept ahead of the GPU (as IREE's): medians of --repeats, per launch.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics

import numpy as np
import torch

import persistent_probe as pp

# name: (layers, [(matvec, N outputs, K, gate, flags)]); flags as gemv.cu: 1 norm, 8 residual, 16 gate
MODELS = {
    "qwen3-0.6b": (28, [("qkv", 4096, 1024, False, 1), ("o", 1024, 2048, False, 8),
                        ("gate_up", 3072, 1024, True, 1 | 16), ("down", 1024, 3072, False, 8)]),
    "llama-3.2-1b": (16, [("qkv", 3072, 2048, False, 1), ("o", 2048, 2048, False, 8),
                          ("gate_up", 8192, 2048, True, 1 | 16), ("down", 2048, 8192, False, 8)]),
}


def forms_for(names: list[str], N: int, K: int, gate: bool) -> list[tuple[str, str, str]]:
    """(label, kernel, grid rule) of every form that fits the shape."""
    P = K // 1024
    out = [("gemv_q4", "gemv_q4_gate_bf16" if gate else "gemv_q4_bf16", "rows")]
    tag = "_gate" if gate else ""
    for name in names:
        m = re.fullmatch(rf"gemv_q4_loop{tag}_p(\d+)_b(\d+)_bf16", name)
        if m and int(m.group(1)) == P:
            out.append((f"loop, {m.group(2)} blocks/SM", name, "wave"))
        m = re.fullmatch(r"gemv_q4_a(\d+)_b(\d+)_bf16", name)
        if m and not gate and int(m.group(1)) == P:
            out.append((f"all {P} pieces ahead, {m.group(2)} blocks/SM", name, "rows"))
    out.append(("x as int8 hi+lo, dp4a", f"gemv_q8x{tag}_bf16", "rows"))
    if gate:
        out.append(("x in f32 (the gate before I8Row)", "gemv_q4_gate_f32x_bf16", "rows"))
    out.append(("x as int8 hi+lo, dp4a, more ahead", "gemv_q8x_gate_a4_bf16" if gate else "gemv_q8x_a8_bf16", "rows"))
    for mode, what in ((1, "half the values summed"), (2, "no values summed")):
        out.append((f"timing only: {what}", f"gemv_q4{tag}_x{mode}_bf16", "rows"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ptx")
    ap.add_argument("--json")
    ap.add_argument("--repeats", type=int, default=40)
    a = ap.parse_args()
    text = open(a.ptx).read()
    names = re.findall(r"^\.visible \.entry (\w+)\(", text, flags=re.M)
    fns = pp.load(a.ptx, names)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rng = np.random.default_rng(7)
    dummy_h, dummy_f = torch.zeros(1, dtype=torch.float16, device="cuda"), torch.zeros(1, device="cuda")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    results = {"device": torch.cuda.get_device_name(0), "ptx": a.ptx, "shapes": {}}
    for model, (layers, shapes) in MODELS.items():
        for mv, N, K, gate, flags in shapes:
            rows = 2 * N if gate else N
            nw, ns = rows * K // 8, rows * K // 64
            buf = torch.empty((layers, nw + ns), dtype=torch.int32, device="cuda")  # words then pairs, per layer
            for l in range(layers):
                w, sb = pp.weights(rows, K, rng)
                buf[l, :nw] = w.reshape(-1)
                buf[l, nw:] = sb.reshape(-1)
            x = torch.from_numpy(rng.standard_normal(K).astype(np.float32)).cuda()
            norm = torch.from_numpy(rng.uniform(0.8, 1.2, K).astype(np.float16)).cuda()
            res = torch.from_numpy(rng.standard_normal(N).astype(np.float32)).cuda()
            outs = {}
            nbytes = (nw + ns) * 4
            key = f"{model} {mv} ({N}{'x2' if gate else ''} x {K})"
            print(f"\n{key}: {nbytes / 1e6:.2f} MB a layer, {layers} layers")
            entry = results["shapes"][key] = {"mb_per_layer": nbytes / 1e6, "forms": {}}

            def launches(fn, grid, out):
                for l in range(layers):
                    w, sb = (buf, l * (nw + ns)), (buf, l * (nw + ns) + nw)
                    if fn == "read_bytes":
                        pp.launch(fns[fn], grid, [w, nbytes // 16, sink])
                    elif "loop" in fn:
                        pp.launch(fns[fn], grid, [x, w, sb, norm, dummy_h, res, (out, l * N), N, K, flags,
                                                  pp.EPS_BITS])
                    else:
                        pp.launch(fns[fn], grid, [x, w, sb, norm, dummy_h, res, dummy_f, dummy_f, dummy_f,
                                                  (out, l * N), N, K, flags, pp.EPS_BITS, 0, 0, 0])

            forms = forms_for(names, N, K, gate) + [("read_bytes (ceiling)", "read_bytes", "read")]
            for label, fn, rule in forms:
                if fn not in fns:
                    continue
                if rule == "rows":
                    grid = -(-N // 8)
                elif rule == "wave":
                    grid = min(pp.per_sm(fns[fn]) * sms, -(-N // 8))
                else:
                    grid = 8 * sms
                out = torch.zeros(layers * N, dtype=torch.float32, device="cuda")
                launches(fn, grid, out)
                torch.cuda.synchronize()
                outs[label] = out
                diff = float((out - outs["gemv_q4"]).abs().max()) if fn != "read_bytes" else 0.0
                rel = diff / float(outs["gemv_q4"].square().mean().sqrt())
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    launches(fn, grid, out)
                times_g, times_s = [], []
                for _ in range(a.repeats):
                    for times, run in ((times_g, g.replay), (times_s, lambda: launches(fn, grid, out))):
                        torch.cuda._sleep(pp.SLEEP // 4)
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        run()
                        e1.record()
                        e1.synchronize()
                        times.append(e0.elapsed_time(e1) * 1000 / layers)
                tg, ts = statistics.median(times_g), statistics.median(times_s)
                entry["forms"][label] = {"kernel": fn, "grid": grid, "us_graph": tg, "us_stream": ts,
                                         "gb_per_s_graph": nbytes / tg / 1e3, "max_diff_vs_gemv_q4": diff,
                                         "max_diff_over_rms": rel}
                print(f"  {label:36s} grid {grid:5d}  graph {tg:6.2f} us ({nbytes / tg / 1e3:5.0f} GB/s)  "
                      f"stream {ts:6.2f} us  max diff {diff:.3g} ({rel:.2g} of the rms)")
            del buf
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
