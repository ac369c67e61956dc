"""A probe for issue 5 (bench/gemv_probe.cu): each 4-bit matvec shape of a Qwen3-0.6B and a
Llama-3.2-1B decode layer (qkv with the norm, o with the residual, gate/up with the norm and
SwiGLU, down with the residual), one launch per layer over distinct random weights (DRAM-cold,
as in a step), in the forms of bench/gemv_probe.cu against gemv.cu's gemv_q4 (a warp per row,
as a step runs it), and read_bytes over the same bytes (the ceiling); then the lm_heads. Raw
CUDA driver calls through ctypes on torch's context (bench/persistent_probe.py's helpers); no IREE.

  nvcc -ptx -arch=sm_80 -O3 -Icompile/kernels bench/gemv_probe.cu -o PTX       # here
  python3 bench/gemv_probe.py PTX [--json OUT] [--lm-head-only | --f16]         # GPU machine

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
    if gate:
        out.append(("x in f32 (the gate before I8Row)", "gemv_q4_gate_f32x_bf16", "rows"))
    else:
        out += [("two rows a warp, I8Row", "gemv_pair_i8_bf16", "pairs"),
                ("two rows a warp, I8Row, 8 pieces ahead", "gemv_pair_i8_a8_bf16", "pairs"),
                ("two rows a warp, Q4Row (f32)", "gemv_pair_f32_bf16", "pairs")]
    for mode, what in ((1, "half the values summed"), (2, "no values summed")):
        out.append((f"timing only: {what}", f"gemv_q4{tag}_x{mode}_bf16", "rows"))
    return out


def f16_forms(names: list[str], K: int, gate: bool) -> list[tuple[str, str, str]]:
    """(label, kernel, grid rule) of the f16 forms: gemv.cu's first, then gemv_probe.cu's with more
    pieces a lane ahead (a piece: 8 values) where the row has that many."""
    tag = "_gate" if gate else ""
    out = [("gemv" + tag, "gemv" + tag, "rows")]
    for name in names:
        m = re.fullmatch(rf"gemv{tag}_f16_a(\d+)_b(\d+)", name)
        if m and int(m.group(1)) * 256 <= K:
            out.append((f"{m.group(1)} pieces a lane ahead, {m.group(2)} blocks/SM", name, "rows"))
    return out


def timed(run, layers: int, repeats: int) -> tuple[float, float]:
    """Median us per layer of run() (one launch or more a layer) as a CUDA graph and as launches on
    a stream kept ahead of the GPU."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    times_g, times_s = [], []
    for _ in range(repeats):
        for times, go in ((times_g, g.replay), (times_s, run)):
            torch.cuda._sleep(pp.SLEEP // 4)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            go()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1000 / layers)
    return statistics.median(times_g), statistics.median(times_s)


def mlp_probe(a, fns: dict, names: list[str]) -> int:
    """The MLP of each model's layers (RMSNorm, gate/up, SwiGLU, down, the residual) as gemv.cu's
    two launches a layer (gemv_q4_gate_bf16, gemv_q4_bf16) against gemv_probe.cu's mlp_split (one
    launch: split-K over the intermediates, down's partials added into an f64 residual)."""
    rng = np.random.default_rng(11)
    dummy_h, dummy_f = torch.zeros(1, dtype=torch.float16, device="cuda"), torch.zeros(1, device="cuda")
    results = {"device": torch.cuda.get_device_name(0), "ptx": a.ptx, "mlp": {}}
    for model, (layers, shapes) in MODELS.items():
        D, I = next((K, N) for mv, N, K, gate, _ in shapes if gate)
        gwn, gsn, dwn, dsn = 2 * I * D // 8, 2 * I * D // 64, D * I // 8, D * I // 64
        gbuf = torch.empty((layers, gwn + gsn), dtype=torch.int32, device="cuda")
        dbuf = torch.empty((layers, dwn + dsn), dtype=torch.int32, device="cuda")
        for l in range(layers):
            w, sb = pp.weights(2 * I, D, rng)
            gbuf[l, :gwn], gbuf[l, gwn:] = w.reshape(-1), sb.reshape(-1)
            w, sb = pp.weights(D, I, rng)
            dbuf[l, :dwn], dbuf[l, dwn:] = w.reshape(-1), sb.reshape(-1)
        x = torch.from_numpy(rng.standard_normal(D).astype(np.float32)).cuda()
        norm = torch.from_numpy(rng.uniform(0.8, 1.2, D).astype(np.float16)).cuda()
        res = torch.from_numpy(rng.standard_normal(D).astype(np.float32)).cuda()
        act = torch.zeros(layers * I, device="cuda")
        out = torch.zeros(layers * D, device="cuda")
        acc = torch.zeros(layers * D, dtype=torch.float64, device="cuda")
        gw = lambda l: ((gbuf, l * (gwn + gsn)), (gbuf, l * (gwn + gsn) + gwn))  # noqa: E731
        dw = lambda l: ((dbuf, l * (dwn + dsn)), (dbuf, l * (dwn + dsn) + dwn))  # noqa: E731

        def launches():
            for l in range(layers):
                pp.launch(fns["gemv_q4_gate_bf16"], -(-I // 8), [x, *gw(l), norm, dummy_h, dummy_f, dummy_f, dummy_f,
                                                                  dummy_f, (act, l * I), I, D, 1 | 16, pp.EPS_BITS, 0,
                                                                  0, 0])
                pp.launch(fns["gemv_q4_bf16"], -(-D // 8), [(act, l * I), *dw(l), dummy_h, dummy_h, res, dummy_f,
                                                             dummy_f, dummy_f, (out, l * D), D, I, 8, pp.EPS_BITS, 0,
                                                             0, 0])
        forms = {"gate/up + down (2 launches)": launches}
        for name in names:
            if name.startswith(f"mlp_split_d{D}"):
                def fused(fn=fns[name]):
                    for l in range(layers):
                        pp.launch(fn, I // 32, [x, norm, *gw(l), *dw(l), (acc, l * D), D, I, 1 | 16, pp.EPS_BITS])
                forms[name] = fused
        key = f"{model} MLP (D {D}, I {I})"
        mb = (gwn + gsn + dwn + dsn) * 4 / 1e6
        print(f"\n{key}: {mb:.2f} MB a layer, {layers} layers")
        entry = results["mlp"][key] = {"mb_per_layer": mb, "forms": {}}
        launches()
        torch.cuda.synchronize()
        rms = float(out.square().mean().sqrt())
        for label, run in forms.items():
            diff = 0.0
            if label != "gate/up + down (2 launches)":
                acc.copy_(res.double().repeat(layers))
                run()
                torch.cuda.synchronize()
                diff = float((acc.float() - out).abs().max())
            tg, ts = timed(run, layers, a.repeats)
            entry["forms"][label] = {"us_graph": tg, "us_stream": ts, "gb_per_s_graph": mb / tg * 1e3,
                                     "max_diff": diff, "max_diff_over_rms": diff / rms}
            print(f"  {label:36s} graph {tg:6.2f} us ({mb / tg * 1e3:5.0f} GB/s)  stream {ts:6.2f} us  "
                  f"max diff {diff:.3g} ({diff / rms:.2g} of the rms)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ptx")
    ap.add_argument("--json")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--lm-head-only", action="store_true")
    ap.add_argument("--f16", action="store_true", help="f16 weights: gemv.cu's gemv against the _f16_a* forms")
    ap.add_argument("--mlp", action="store_true", help="only the split-K MLP against gate/up + down launches")
    a = ap.parse_args()
    text = open(a.ptx).read()
    names = re.findall(r"^\.visible \.entry (\w+)\(", text, flags=re.M)
    fns = pp.load(a.ptx, names)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rng = np.random.default_rng(7)
    dummy_h, dummy_f = torch.zeros(1, dtype=torch.float16, device="cuda"), torch.zeros(1, device="cuda")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    results = {"device": torch.cuda.get_device_name(0), "ptx": a.ptx, "shapes": {}}
    if a.mlp:
        return mlp_probe(a, fns, names)
    for model, (layers, shapes) in ({} if a.lm_head_only else MODELS).items():
        for mv, N, K, gate, flags in shapes:
            rows = 2 * N if gate else N
            if a.f16:  # f16 rows, zero-mean, keeping an RMS-1 input near RMS 0.5
                nw, ns = rows * K // 2, 0  # in int32 words
                buf = torch.empty((layers, rows * K), dtype=torch.float16, device="cuda")
                for l in range(layers):
                    buf[l] = torch.from_numpy((rng.standard_normal(rows * K) * 0.5 / np.sqrt(K)).astype(np.float16))
            else:
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
                    if a.f16:
                        w = (buf, l * rows * K)
                    if fn == "read_bytes":
                        pp.launch(fns[fn], grid, [w, nbytes // 16, sink])
                    elif "loop" in fn:
                        pp.launch(fns[fn], grid, [x, w, sb, norm, dummy_h, res, (out, l * N), N, K, flags,
                                                  pp.EPS_BITS])
                    elif a.f16:
                        pp.launch(fns[fn], grid, [x, w, norm, dummy_h, res, dummy_f, dummy_f, dummy_f,
                                                  (out, l * N), N, K, flags, pp.EPS_BITS, 0, 0, 0])
                    else:
                        pp.launch(fns[fn], grid, [x, w, sb, norm, dummy_h, res, dummy_f, dummy_f, dummy_f,
                                                  (out, l * N), N, K, flags, pp.EPS_BITS, 0, 0, 0])

            forms = (f16_forms(names, K, gate) if a.f16 else forms_for(names, N, K, gate)) + [
                ("read_bytes (ceiling)", "read_bytes", "read")]
            ref = forms[0][0]
            for label, fn, rule in forms:
                if fn not in fns:
                    continue
                if rule == "rows":
                    grid = -(-N // 8)
                elif rule == "pairs":
                    grid = -(-((N + 1) // 2) // 8)
                elif rule == "wave":
                    grid = min(pp.per_sm(fns[fn]) * sms, -(-N // 8))
                else:
                    grid = 8 * sms
                out = torch.zeros(layers * N, dtype=torch.float32, device="cuda")
                launches(fn, grid, out)
                torch.cuda.synchronize()
                outs[label] = out
                diff = float((out - outs[ref]).abs().max()) if fn != "read_bytes" else 0.0
                rel = diff / float(outs[ref].square().mean().sqrt())
                tg, ts = timed(lambda: launches(fn, grid, out), layers, a.repeats)
                entry["forms"][label] = {"kernel": fn, "grid": grid, "us_graph": tg, "us_stream": ts,
                                         "gb_per_s_graph": nbytes / tg / 1e3, f"max_diff_vs_{ref}": diff,
                                         "max_diff_over_rms": rel}
                print(f"  {label:36s} grid {grid:5d}  graph {tg:6.2f} us ({nbytes / tg / 1e3:5.0f} GB/s)  "
                      f"stream {ts:6.2f} us  max diff {diff:.3g} ({rel:.2g} of the rms)")
            del buf
    # The lm_heads (one launch a copy of the weights; the copies make it DRAM-cold): logits and
    # argmax against gemv.cu's lm_head_q4_k<K>. (Its f32 sums, before it took dp4a, against the
    # dp4a form: bench/results/2026-11-27-h100-stop22-gemv-probe-lm-head.json.)
    grid = 264  # extern.LM_HEAD_GRID
    for model, (N, K, copies) in ({} if a.f16 else {"qwen3-0.6b": (151936, 1024, 3),
                                                     "llama-3.2-1b": (128256, 2048, 3)}).items():
        nw, ns = N * K // 8, N * K // 64
        buf = torch.empty((copies, nw + ns), dtype=torch.int32, device="cuda")
        for l in range(copies):
            w, sb = pp.weights(N, K, rng)
            buf[l, :nw], buf[l, nw:] = w.reshape(-1), sb.reshape(-1)
        x = torch.from_numpy(rng.standard_normal(K).astype(np.float32)).cuda()
        norm = torch.from_numpy(rng.uniform(0.8, 1.2, K).astype(np.float16)).cuda()
        sync = torch.zeros(copies, dtype=torch.int32, device="cuda")
        blocks = torch.zeros(copies * grid * 2, dtype=torch.float32, device="cuda")
        key = f"{model} lm_head ({N} x {K})"
        nbytes = (nw + ns) * 4
        print(f"\n{key}: {nbytes / 1e6:.1f} MB, {copies} copies")
        entry = results["shapes"][key] = {"mb_per_layer": nbytes / 1e6, "forms": {}}
        outs = {}
        for label, fn in (("lm_head_q4", f"lm_head_q4_k{K}_bf16"),
                          ("other rows a chunk", f"lm_head_r{2 if K == 1024 else 4}_k{K}_bf16")):
            out = torch.zeros(copies * N, dtype=torch.float32, device="cuda")
            am = torch.zeros(copies, dtype=torch.int32, device="cuda")

            def launches(fn=fn, out=out, am=am):
                sync.zero_()
                for l in range(copies):
                    pp.launch(fns[fn], grid, [x, (buf, l * (nw + ns)), (buf, l * (nw + ns) + nw), norm, (sync, l),
                                              (out, l * N), (am, l), (blocks, l * grid * 2), N, K, 1, pp.EPS_BITS])
            launches()
            torch.cuda.synchronize()
            outs[label] = (out.clone(), am.clone())
            ref, ref_am = outs["lm_head_q4"]
            diff = float((out - ref).abs().max())
            rel = diff / float(ref.square().mean().sqrt())
            same_argmax = bool((am == ref_am).all())
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                launches()
            times = []
            for _ in range(a.repeats):
                torch.cuda._sleep(pp.SLEEP // 4)
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                g.replay()
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1) * 1000 / copies)
            tg = statistics.median(times)
            entry["forms"][label] = {"kernel": fn, "grid": grid, "us_graph": tg, "gb_per_s_graph": nbytes / tg / 1e3,
                                     "max_diff_vs_lm_head_q4": diff, "max_diff_over_rms": rel, "same_argmax": same_argmax}
            print(f"  {label:36s} graph {tg:6.2f} us ({nbytes / tg / 1e3:5.0f} GB/s)  max diff {diff:.3g} "
                  f"({rel:.2g} of the rms)  argmax {'same' if same_argmax else 'DIFFERENT'}")
        del buf
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
