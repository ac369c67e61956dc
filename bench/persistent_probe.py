"""A probe for issue 5's roofline (bench/persistent_probe.cu): a decode layer's four 4-bit
matvecs (qkv, o, gate/up, down at Qwen3-0.6B's shapes; attention left out) over 28 layers of
distinct random weights, in several forms, against four launches per layer of gemv.cu's kernels
(each requesting the next one's weights into L2, as in a step). Raw CUDA driver calls through
ctypes on torch's context; no IREE.

  nvcc -ptx -arch=sm_80 -O3 -DTAIL_BLOCKS_PER_SM=2 -Icompile/kernels bench/persistent_probe.cu -o PTX  # here
  python3 bench/persistent_probe.py PTX [--json OUT] [--tail PTX2] [--chain PTX3] [--times PTX4]    # GPU machine

Forms: the launches as a stream (the host queued ahead, as IREE's), the same captured in a CUDA
graph; all 28 layers as ONE persistent kernel (layers_*: 132 blocks waiting for each other between
the matvecs; _ahead: the next matvec's pieces loaded before the wait; _pf: requested into L2;
layers_sync_s0 / _s1: a ninth warp that loads nothing makes the waits, with the next matvec's /
the next two matvecs' pieces in flight across them); the
qkv launch plus one kernel for o, gate/up and down taking 8-row items from a counter (layer_tail,
any grid: the form that needs no resident blocks); --chain: branch exp/decode-chain's gemv.cu
decode_chain (one launch per layer); --times: a build of it writing timestamps of layer 26.
Checks that every form gives the launches' residual stream bit for bit (the launches' gate/up:
gemv_q4_gate_f32_bf16, f32 sums as the forms', not gemv.cu's dp4a sums of stop 22), then times each (CUDA
events, medians of repeats; the queue kept ahead of the GPU by a sleep kernel first), and the
grid-wide wait alone. Results: bench/results/2026-11-27-h100-stop20-persistent.txt.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import sys

import numpy as np
import torch

LAYERS, D, QKV, ATT, I = 28, 1024, 4096, 2048, 3072
SLEEP = 40_000_000  # cycles (~20 ms): the host queues a whole form meanwhile
EPS_BITS = int(np.float32(1e-6).view(np.int32))
cu = ctypes.CDLL("libcuda.so.1")
cu.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 6, ctypes.c_uint, ctypes.c_void_p,
                              ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]


def check(r: int, what: str) -> None:
    if r != 0:
        raise RuntimeError(f"{what}: CUDA error {r}")


def load(ptx_path: str, names=None) -> dict:
    torch.zeros(1, device="cuda")  # torch's context current
    text = open(ptx_path).read()
    text = re.sub(r"^\.version \d+\.\d+$", ".version 7.6", text, count=1, flags=re.M)
    text = re.sub(r'^\s*\.pragma "used_bytes_mask \d+";\n', "", text, flags=re.M)
    mod = ctypes.c_void_p()
    check(cu.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(text.encode() + b"\0")), "cuModuleLoadData")
    fns = {}
    for name in names or ("gemv_q4_bf16", "gemv_q4_gate_f32_bf16", "layers_ahead_1", "layers_after_1", "layers_after_pf_1",
                          "layers_ahead_2", "layers_after_2", "waits_only", "layer_tail_q4_bf16",
                          "layers_sync_s0", "layers_sync_s1"):
        f = ctypes.c_void_p()
        check(cu.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), name)
        fns[name] = f
    return fns


def per_sm(fn, threads: int = 256) -> int:
    n = ctypes.c_int()
    check(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), fn, threads, ctypes.c_size_t(0)), "occupancy")
    return n.value


def arg(v):
    if isinstance(v, torch.Tensor):
        return ctypes.c_void_p(v.data_ptr())
    if isinstance(v, tuple):  # (tensor, element offset)
        t, off = v
        return ctypes.c_void_p(t.data_ptr() + off * t.element_size())
    if v is None:
        return ctypes.c_void_p(0)
    return ctypes.c_uint(v) if v >= 2**31 else ctypes.c_int(v)


RECORDED: list | None = None  # when a list: launch() appends (fn, grid, params) to it instead of launching


def launch(fn, grid: int, args: list, threads: int = 256) -> None:
    vals = [arg(a) for a in args]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in vals])
    if RECORDED is not None:
        RECORDED.append((fn, grid, params, vals))
        return
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    check(cu.cuLaunchKernel(fn, grid, 1, 1, threads, 1, 1, 0, stream, params, None), "cuLaunchKernel")


def replay(recorded: list) -> None:
    """The recorded launches with nothing else per launch in Python (the GPU's queue stays ahead)."""
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    for fn, grid, params, _ in recorded:
        cu.cuLaunchKernel(fn, grid, 1, 1, 256, 1, 1, 0, stream, params, None)


def weights(rows: int, K: int, rng) -> tuple:
    """Stacked 4-bit weights: words [rows, K/8] (as int32) and BF16 pairs [rows, K/64] (as int32),
    zero-mean rows whose matvec keeps an RMS-1 input near RMS 0.5."""
    words = rng.integers(0, 2**32, (rows, K // 8), dtype=np.uint32).view(np.int32)
    s = (0.5 / (4.6 * np.sqrt(K)) * rng.uniform(0.5, 1.5, (rows, K // 64))).astype(np.float32)
    b = (-7.5 * s * rng.uniform(0.9, 1.1, s.shape)).astype(np.float32)
    bf = lambda a: (a.view(np.uint32) + 0x8000) >> 16  # noqa: E731 (round to nearest, no NaN here)
    pairs = (bf(s) | (bf(b) << 16)).astype(np.uint32).view(np.int32)
    return torch.from_numpy(words).cuda(), torch.from_numpy(pairs).cuda()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ptx")
    ap.add_argument("--json")
    ap.add_argument("--tail", action="append", default=[], help="another PTX whose layer_tail_q4_bf16 runs too")
    ap.add_argument("--times", help="a PTX of decode_chain writing timestamps of layer 26 (a debug variant)")
    ap.add_argument("--chain", action="append", default=[],
                    help="a PTX with decode_chain_q4_bf16 (compile/kernels/gemv.ptx): one launch per layer")
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    fns = load(a.ptx)
    tails = {"": fns["layer_tail_q4_bf16"]} | {f" ({p})": load(p, ["layer_tail_q4_bf16"])["layer_tail_q4_bf16"]
                                                for p in a.tail}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rng = np.random.default_rng(5)
    qkv_w, qkv_sb = weights(LAYERS * QKV, D, rng)
    o_w, o_sb = weights(LAYERS * D, ATT, rng)
    gu_w, gu_sb = weights(LAYERS * 2 * I, D, rng)
    down_w, down_sb = weights(LAYERS * D, I, rng)
    norm1 = torch.from_numpy(rng.uniform(0.8, 1.2, LAYERS * D).astype(np.float16)).cuda()
    norm2 = torch.from_numpy(rng.uniform(0.8, 1.2, LAYERS * D).astype(np.float16)).cuda()
    h0 = torch.from_numpy(rng.standard_normal(D).astype(np.float32)).cuda()
    h, qkv, h2, act = (torch.zeros(n, dtype=torch.float32, device="cuda") for n in (D, QKV, D, I))
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    dummy_h, dummy_f = torch.zeros(1, dtype=torch.float16, device="cuda"), torch.zeros(1, device="cuda")
    nbytes = lambda t, rows, l: (t, l * rows * t.shape[1])  # noqa: E731 (layer l's rows of a stacked buffer)
    sizes = {id(t): t.shape[1] * 4 for t in (qkv_w, qkv_sb, o_w, o_sb, gu_w, gu_sb, down_w, down_sb)}

    def gemv(gate, x, w, sb, rows_per_layer, l, norm, res, out, N, K, flags, nxt):
        pf = [nbytes(t, r, ll) for t, r, ll in nxt] + [dummy_f] * (3 - len(nxt))
        pfb = [sizes[id(t)] * r for t, r, _ in nxt] + [0] * (3 - len(nxt))
        launch(fns["gemv_q4_gate_f32_bf16" if gate else "gemv_q4_bf16"], (N + 7) // 8,
               [x, nbytes(w, rows_per_layer, l), nbytes(sb, rows_per_layer, l), norm if norm is not None else dummy_h,
                dummy_h, res if res is not None else dummy_f, *pf, out, N, K, flags, EPS_BITS, *pfb])

    def launches():
        for l in range(LAYERS):
            gemv(False, h, qkv_w, qkv_sb, QKV, l, (norm1, l * D), None, qkv, QKV, D, 1,
                 [(o_w, D, l), (o_sb, D, l)])
            gemv(False, qkv, o_w, o_sb, D, l, None, h, h2, D, ATT, 8, [(gu_w, 2 * I, l), (gu_sb, 2 * I, l)])
            gemv(True, h2, gu_w, gu_sb, 2 * I, l, (norm2, l * D), None, act, I, D, 1 | 16,
                 [(down_w, D, l), (down_sb, D, l)])
            nxt = [(qkv_w, QKV, l + 1), (qkv_sb, QKV, l + 1)] if l + 1 < LAYERS else []
            gemv(False, act, down_w, down_sb, D, l, None, h2, h, D, I, 8, nxt)

    hb = torch.zeros(D, dtype=torch.float32, device="cuda")
    sync = torch.zeros(LAYERS * 96, dtype=torch.int32, device="cuda")
    def qkv_tail(fn, tail_grid):
        def run():  # the gemv_q4 qkv, then extern.layer_tail's one kernel for o, gate/up, down (h, hb in turn)
            sync.zero_()
            cur, other = h, hb
            for l in range(LAYERS):
                gemv(False, cur, qkv_w, qkv_sb, QKV, l, (norm1, l * D), None, qkv, QKV, D, 1,
                     [(o_w, D, l), (o_sb, D, l)])
                nxt = [(qkv_w, QKV, l + 1), (qkv_sb, QKV, l + 1)] if l + 1 < LAYERS else []
                pf = [nbytes(t, r, ll) for t, r, ll in nxt] + [dummy_f] * (3 - len(nxt))
                pfb = [sizes[id(t)] * r for t, r, _ in nxt] + [0] * (3 - len(nxt))
                launch(fn, tail_grid, [qkv, cur, nbytes(o_w, D, l), nbytes(o_sb, D, l), (norm2, l * D),
                                       nbytes(gu_w, 2 * I, l), nbytes(gu_sb, 2 * I, l), nbytes(down_w, D, l),
                                       nbytes(down_sb, D, l), sync, *pf, other, h2, act, D, ATT, I, 1 | 16, EPS_BITS, l,
                                       *pfb])
                cur, other = other, cur
            assert cur is h  # an even number of layers: the result in h, as the launches'
        return run

    chain_fns = {p: load(p, ["decode_chain_q4_bf16"])["decode_chain_q4_bf16"] for p in a.chain}
    qkv2 = torch.zeros(QKV, dtype=torch.float32, device="cuda")
    work = torch.zeros(D + I + 128, dtype=torch.float32, device="cuda")  # + a debug variant's timestamps
    chain_sync = torch.zeros(32 + LAYERS * 256, dtype=torch.int32, device="cuda")

    def chain_run(chain_fn):
        def run():  # the qkv gemv, then extern.decode_chain's kernel per layer (o, gate/up, down, next qkv)
            chain_sync.zero_()
            gemv(False, h, qkv_w, qkv_sb, QKV, 0, (norm1, 0), None, qkv, QKV, D, 1, [(o_w, D, 0), (o_sb, D, 0)])
            cur, other, q_in, q_out = h, hb, qkv, qkv2
            for l in range(LAYERS):
                last = l + 1 == LAYERS
                nq = [dummy_f, dummy_f, dummy_f] if last else [(norm1, (l + 1) * D), nbytes(qkv_w, QKV, l + 1),
                                                                nbytes(qkv_sb, QKV, l + 1)]
                launch(chain_fn, 132, [q_in, cur, nbytes(o_w, D, l), nbytes(o_sb, D, l), (norm2, l * D),
                                       nbytes(gu_w, 2 * I, l), nbytes(gu_sb, 2 * I, l), nbytes(down_w, D, l),
                                       nbytes(down_sb, D, l), *nq, chain_sync, other, q_out, work, D, ATT, I,
                                       0 if last else QKV, 1, EPS_BITS, 1, EPS_BITS, l])
                cur, other, q_in, q_out = other, cur, q_out, q_in
            assert cur is h
        return run

    def threads_of(name):  # layers_sync_*: a ninth warp that makes the waits
        return 288 if name.startswith("layers_sync") else 256

    launched = [0]  # the waits of earlier persistent launches (the counter only grows)

    def persistent(name, grid):
        def run():
            launch(fns[name], grid, [qkv_w, qkv_sb, o_w, o_sb, gu_w, gu_sb, down_w, down_sb, norm1, norm2, LAYERS,
                                     h, qkv, h2, act, count, launched[0]], threads=threads_of(name))
            launched[0] += (4 * LAYERS - 1) * grid
        return run

    def per_layer(name, grid):  # the same kernel launched once per layer (layers = 1): its phases with a launch each
        def run():
            for l in range(LAYERS):
                launch(fns[name], grid, [nbytes(qkv_w, QKV, l), nbytes(qkv_sb, QKV, l), nbytes(o_w, D, l),
                                         nbytes(o_sb, D, l), nbytes(gu_w, 2 * I, l), nbytes(gu_sb, 2 * I, l),
                                         nbytes(down_w, D, l), nbytes(down_sb, D, l), (norm1, l * D), (norm2, l * D), 1,
                                         h, qkv, h2, act, count, launched[0]])
                launched[0] += 3 * grid
        return run

    def waits(grid, n):
        def run():
            launch(fns["waits_only"], grid, [n, count, launched[0]])
            launched[0] += n * grid
        return run

    global RECORDED
    RECORDED = []
    launches()
    recorded, RECORDED = RECORDED, None
    forms = {"launches (4 per layer)": lambda: replay(recorded)}
    forms["layers_after_pf_1, a launch per layer"] = per_layer("layers_after_pf_1", sms)
    for path, fn in chain_fns.items():
        forms[f"qkv + decode_chain ({path})"] = chain_run(fn)
    for label, fn in tails.items():
        for grid in (2 * sms, 3 * sms, (2 * D + I) // 8):
            forms[f"qkv + layer_tail{label} grid {grid}"] = qkv_tail(fn, grid)
    for name in ("layers_ahead_1", "layers_after_1", "layers_after_pf_1", "layers_ahead_2", "layers_after_2",
                 "layers_sync_s0", "layers_sync_s1"):
        capacity = per_sm(fns[name], threads_of(name)) * sms
        for grid in (sms, 2 * sms):
            if grid <= capacity:
                forms[f"{name} grid {grid}"] = persistent(name, grid)
    results, ref = {}, None
    for form, run in forms.items():
        h.copy_(h0)
        run()
        torch.cuda.synchronize()
        out = h.cpu().numpy()
        if ref is None:
            ref = out
        diff = float(np.abs(out - ref).max())
        times = []
        for _ in range(a.repeats):
            h.copy_(h0)
            torch.cuda._sleep(SLEEP)  # the queue ahead of the GPU, as IREE's is
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            run()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1000)
        med = statistics.median(times)
        results[form] = {"us_per_28_layers": med, "us_per_layer": med / LAYERS, "max_diff_vs_launches": diff,
                         "finite": bool(np.isfinite(out).all()), "rms_out": float(np.sqrt((out ** 2).mean()))}
        print(f"{form:32s} {med:9.1f} us / 28 layers  {med / LAYERS:7.2f} us/layer  max diff {diff:.3g}  "
              f"rms {results[form]['rms_out']:.3g}", flush=True)
    for grid in (sms,):
        n = 4 * LAYERS - 1
        times = []
        for _ in range(a.repeats):
            torch.cuda._sleep(SLEEP)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            waits(grid, n)()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1000)
        med = statistics.median(times)
        results[f"waits_only grid {grid}"] = {"us": med, "us_per_wait": med / n}
        print(f"waits only, grid {grid}: {med:.1f} us for {n} waits = {med / n:.2f} us each", flush=True)
    # The launches again, captured in a CUDA graph (what a graph's launches cost instead of a stream's).
    g = torch.cuda.CUDAGraph()
    h.copy_(h0)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        launches()
    times = []
    for _ in range(a.repeats):
        h.copy_(h0)
        torch.cuda._sleep(SLEEP)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1000)
    med = statistics.median(times)
    results["launches in a CUDA graph"] = {"us_per_28_layers": med, "us_per_layer": med / LAYERS}
    print(f"{'launches in a CUDA graph':32s} {med:9.1f} us / 28 layers  {med / LAYERS:7.2f} us/layer", flush=True)
    if a.times:
        fn = load(a.times, ["decode_chain_q4_bf16"])["decode_chain_q4_bf16"]
        for rep in range(3):
            tail = work[D + I + 16:D + I + 80].view(torch.int64)
            tail.zero_()
            tail[15] = 2**62
            h.copy_(h0)
            torch.cuda._sleep(SLEEP)
            chain_run(fn)()
            torch.cuda.synchronize()
            stamps = tail.cpu().numpy().astype(np.int64)
            t0 = stamps[15]
            names = ["start", "o done", "mode found", "gate done", "wait", "down done", "wait", "qkv done"]
            print("layer 26, ns after the first block started: block 0 / the last block",
                  "; ".join(f"{n} {stamps[k] - t0} / {stamps[16 + k] - t0}" for k, n in enumerate(names)))
    if a.json:
        json.dump({"device": torch.cuda.get_device_name(0), "sms": sms, "results": results}, open(a.json, "w"), indent=1)
    ok = all(r.get("max_diff_vs_launches", 0) == 0 and r.get("finite", True) for r in results.values())
    print("bit-identical to the launches:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
