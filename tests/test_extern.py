"""Hand-written kernels linked into exported steps (compile/extern.py).

The CUDA ones are checked on a GPU (bench/gpu_check.sh: greedy tokens against the HF fp32
oracle; bench/diag_cuda.py: CUDA against the CPU step). Here, without a GPU: which steps get
them, that the committed PTX is the current source's, and that IREE takes the linked text.
The CPU ones run here: against numpy and the JAX attention below, and in every CPU decode step
of the oracle tests (test_models.py, test_packed.py).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from checkpoints import FAMILIES
from iree_runner.compile import export, extern, iree_compile
from test_host_waits import _main_of_vm_program, _spec, _vm_program, assert_step_only_queues


@pytest.mark.parametrize("family_name", FAMILIES)
def test_cuda_decode_attention_is_the_kernel(family_name, tmp_path):
    fam, cfg, spec = _spec(family_name, "float16")
    layers = cfg.num_hidden_layers
    decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))
    assert "stablehlo.custom_call" not in decode
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    # The test checkpoints' shape has a kernel of its own (extern.SPECIALIZED_ATTENTION).
    kernel = extern.fused_kernel(g, cfg.head_dim, cfg.num_key_value_heads)
    assert kernel is not None
    calls = re.findall(rf"(%[\w#:]+) = flow\.dispatch @decode_attention::@{kernel}\[.*\]\((.*)\) : .* -> (.*)$",
                       decode, re.M)
    assert len(calls) == layers and "@decode_attn_partial" not in decode and "@decode_attn_combine" not in decode
    assert_step_only_queues(_main_of_vm_program(decode, tmp_path))
    # It writes the token's K/V into both caches in place and counts its blocks in the sync
    # counters: results tied to those operands (no scatter of the new rows at the end), the
    # counters passed from layer to layer.
    for i, (result, operands, results) in enumerate(calls):
        ops = operands.split(", ")
        k, v, sync = ops[-4], ops[-3], ops[-1]
        assert re.fullmatch(rf"\(tensor<\d+xf32>, tensor<[\dx]+xf32>, {k}, {v}, {sync}\)", results), results
        if i:
            assert sync == f"{calls[i - 1][0].split(':')[0]}#4", "the previous layer's counters"
    assert "stablehlo.scatter" not in decode and "dynamic_update_slice" not in decode
    # --no-kernels, prefill, the CPU and an f32 cache keep the attention in JAX.
    text = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda", kernels=False))
    assert "@decode_attention" not in text and "@gemv" not in text
    for tokens, target, dtype in ((8, "cuda", "float16"), (1, "cpu", "float32"), (1, "cuda", "float32")):
        fam, cfg, spec = _spec(family_name, dtype, target)
        text = export.export_step(fam, cfg, spec, tokens, "step", **iree_compile.export_options(target))
        assert "@decode_attention::" not in text, (tokens, target, dtype)


@pytest.mark.parametrize("ckpt_dtype, pairs", [("bfloat16", "bfloat16"), ("float16", "float16")])
def test_kernels_read_the_checkpoints_scale_pairs(ckpt_dtype, pairs):
    """A packed CUDA step takes each weight's scales and biases as the checkpoint stores them
    (mlx_lm convert gives a BF16 model BF16 ones, an F16 model F16 ones), and tells every
    4-bit kernel which (the matvecs' entry points gemv_q4[_gate]_<bf16|f16>, the prologue's last
    constant); so does a CPU step (a flag of q4_gemv)."""
    from test_packed import _packed_spec

    fam, cfg, spec = _packed_spec("qwen3", "float16", "cuda", ckpt_dtype)
    assert {p.pairs for p in spec.packed} == {pairs}
    decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))
    bf16 = int(pairs == "bfloat16")
    name, other = ("bf16", "f16") if bf16 else ("f16", "bf16")
    q4 = _constants(decode, f"gemv_q4_{name}") + _constants(decode, f"gemv_q4_gate_{name}")
    assert len(q4) >= 4 * cfg.num_hidden_layers
    assert not re.search(rf"@gemv_q4(_gate)?_{other}\[", decode)
    assert [c[-1] for c in _constants(decode, "embed_rope_q4")] == [bf16]
    assert ("xbf16>" in decode) == bool(bf16)  # the pairs' type, as the step takes them
    # The CPU's kernels read them as stored too, told which by a flag (kernels/q4_gemv.c PAIRS_*).
    fam, cfg, spec = _packed_spec("qwen3", "float32", "cpu", ckpt_dtype)
    assert {p.pairs for p in spec.packed} == {pairs}
    decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cpu"))
    flags = [c[2] for c in _constants(decode, "q4_gemv")]
    assert len(flags) >= 4 * cfg.num_hidden_layers
    assert {f & (extern.PAIRS_F16 | extern.PAIRS_BF16) for f in flags} == {extern.PAIRS_BF16 if bf16 else extern.PAIRS_F16}


@pytest.mark.parametrize("family_name", FAMILIES)
def test_packed_decode_starts_with_the_prologue_kernel(family_name):
    """A packed one-token CUDA step takes its embedding row and rotary cos/sin from one kernel
    (kernels/step_prologue.cu), but for Gemma3 (two rotary tables, a scaled embedding); f16
    weights, prefill chunks and the CPU keep them in JAX."""
    from test_packed import _packed_spec

    fam, cfg, spec = _packed_spec(family_name, "float16", "cuda")
    decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))
    consts = _constants(decode, "embed_rope_q4")
    if family_name == "gemma3_text":
        assert consts == []
    else:
        rot = cfg.rotary_dim if family_name == "stablelm" else cfg.head_dim
        group = next(p.group_size for p in spec.packed if p.name == "model.embed_tokens.weight")
        assert consts == [[cfg.hidden_size, rot // 2, group, 1]]  # 1: BF16 scale/bias pairs, as the checkpoint's
    text = export.export_step(fam, cfg, spec, 8, "prefill", **iree_compile.export_options("cuda"))
    assert "@step_prologue" not in text
    fam, cfg, spec = _packed_spec(family_name, "float32", "cpu")
    assert "@step_prologue" not in export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cpu"))
    fam, cfg, spec = _spec(family_name, "float16")
    assert "@step_prologue" not in export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))


@pytest.mark.parametrize("family_name", FAMILIES)
def test_cuda_prefill_attention_is_the_kernel(family_name):
    """A CUDA prefill chunk with an f16 cache attends with kernels/prefill_attention.cu, one
    dispatch per layer, passing each layer its window; an f32 cache, the CPU and --no-kernels
    keep the attention in JAX."""
    fam, cfg, spec = _spec(family_name, "float16")
    prefill = export.export_step(fam, cfg, spec, 8, "prefill", **iree_compile.export_options("cuda"))
    consts = _constants(prefill, "prefill_attn")
    assert extern.prefill_attention_fits(cfg.head_dim)  # the test configs' head dim, 32
    S, KVH, G = spec.cache_shape[2], cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    assert [c[:6] for c in consts] == [[8, S, KVH, G, cfg.head_dim, i] for i in range(cfg.num_hidden_layers)]
    windows = {c[6] for c in consts}
    assert windows == ({0, cfg.sliding_window} if family_name == "gemma3_text" else {0})
    assert "stablehlo.scatter" not in prefill, "the kernel writes the chunk's K/V in place"
    for target, dtype, kernels in (("cuda", "float32", True), ("cpu", "float32", True), ("cuda", "float16", False)):
        fam, cfg, spec = _spec(family_name, dtype, target)
        text = export.export_step(fam, cfg, spec, 8, "prefill", **iree_compile.export_options(target, kernels))
        assert "@prefill_attn[" not in text, (target, dtype, kernels)


def test_cuda_prefill_attention_of_head_dim_256_takes_its_own_kernel():
    """Gemma3-1B's head dim, 256, takes prefill_attn_d256 (8 query rows a block, so that its
    tiles fit a block's shared memory), every layer, with the grid of its rows."""
    import dataclasses

    from test_host_waits import CAPACITY

    fam, cfg, _ = _spec("gemma3_text", "float16")
    cfg = dataclasses.replace(cfg, head_dim=256)
    spec = export.step_spec(fam, cfg, capacity=CAPACITY, weight_dtype="float16", cache_dtype="float16",
                            cache_layout=iree_compile.CACHE_LAYOUT["cuda"])
    prefill = export.export_step(fam, cfg, spec, 8, "prefill", **iree_compile.export_options("cuda"))
    consts = _constants(prefill, "prefill_attn_d256")
    assert [c[4:6] for c in consts] == [[256, i] for i in range(cfg.num_hidden_layers)]
    assert "@prefill_attn[" not in prefill
    KVH, G = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    assert extern.prefill_kernel(256) == ("prefill_attn_d256", 8) and extern.prefill_kernel(128)[0] == "prefill_attn"
    grids = re.findall(r"%ext(\d+)_grid = arith.constant (\d+) : index(?=[\s\S]*@prefill_attn_d256\[%ext\1_grid\])",
                       prefill)
    assert grids and {int(g) for _, g in grids} == {-(-8 * G // 8) * KVH}
    assert not extern.prefill_attention_fits(288) and not extern.prefill_attention_fits(240)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_cpu_decode_attention_is_the_kernel(family_name):
    fam, cfg, spec = _spec(family_name, "float32", "cpu")
    decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cpu"))
    for kernel in ("decode_attn_cpu_partial", "decode_attn_cpu_combine"):
        assert len(re.findall(rf"flow\.dispatch @decode_attention_cpu::@{kernel}\[", decode)) == cfg.num_hidden_layers
    windows = {c[5] for c in _constants(decode, "decode_attn_cpu_partial")}
    assert windows == ({0, cfg.sliding_window} if family_name == "gemma3_text" else {0})
    assert [c[4] for c in _constants(decode, "decode_attn_cpu_combine")] == list(range(cfg.num_hidden_layers))
    for tokens, kernels in ((8, True), (1, False)):
        text = export.export_step(fam, cfg, spec, tokens, "step", **iree_compile.export_options("cpu", kernels))
        assert "flow.dispatch" not in text, (tokens, kernels)


def _run_on_cpu(fn, args, tmp_path):
    """fn(*args) exported with its kernel placeholders linked, compiled for the CPU and run."""
    import iree.runtime as rt
    import jax

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    text = jax.export.export(jax.jit(fn), disabled_checks=extern.disabled_checks())(*specs).mlir_module()
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "fn.vmfb"
    iree_compile.compile_mlir(extern.link(text), out, "cpu", label="kernel test")
    config = rt.Config("local-task")
    ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(out))], config=config)
    module = next(m for name, m in ctx.modules.items() if name.startswith("jit_"))
    return np.asarray(module["main"](*args).to_host())


def _run_q4_kernel(kernel, x, n: int, seed: int, tmp_path, stored="float16", widen=False, **folded):
    """extern.<kernel>(x, w, **folded) on the CPU for random MLX-packed 4-bit w [n, K] (scales and
    biases `stored` F16 or BF16, group 64; given to the kernel as stored, or widened to f32), and w
    dequantized by numpy (f64), the reference."""
    import jax.numpy as jnp
    import ml_dtypes

    from iree_runner.compile.packed import Packed
    from iree_runner.weights import dequantize_affine

    dtype = np.dtype(ml_dtypes.bfloat16) if stored == "bfloat16" else np.dtype(np.float16)
    rng = np.random.default_rng(seed)
    k = x.shape[-1]
    words = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint32)
    scales = (rng.uniform(0.5, 1.5, size=(n, k // 64)) / 100).astype(dtype)
    biases = (-7.5 * scales.astype(np.float32)).astype(dtype)
    s, b = (a.astype(np.float32) if widen else a for a in (scales, biases))
    got = _run_on_cpu(lambda x, p, s, b: getattr(extern, kernel)(x, Packed.of(p, s, b, 4, 64, jnp.float32), **folded),
                      [x, words, s, b], tmp_path)
    return got, dequantize_affine(words, scales, biases, bits=4, group_size=64).astype(np.float64)


# The CPU kernels' scale/bias pairs: as stored (F16, BF16), or widened to f32 (bundles made before they read 16-bit ones).
PAIRS = [("float16", False), ("bfloat16", False), ("float16", True)]


@pytest.mark.parametrize("stored, widen", PAIRS)
def test_cpu_q4_gemv_matches_numpy(stored, widen, tmp_path):
    """kernels/q4_gemv.c on MLX's packing, N not a multiple of its 64-row tiles; the 16-bit
    pairs as stored give what their f32 widening gives, bit for bit."""
    x = np.random.default_rng(10).standard_normal(1024).astype(np.float32)
    got, w = _run_q4_kernel("q4_gemv", x, 200, 0, tmp_path, stored, widen)
    want = w @ x
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    if not widen:
        assert np.array_equal(got, _run_q4_kernel("q4_gemv", x, 200, 0, tmp_path / "f32", stored, True)[0])


@pytest.mark.parametrize("one_plus", [False, True])
def test_cpu_q4_gemv_folds_norm_bias_and_residual(one_plus, tmp_path):
    """The one-token kernel with the input's RMSNorm (Gemma's 1 + w too), a bias and the
    residual folded in, as layers.linear passes them, against numpy."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(512) * 3).astype(np.float32)
    nw, bias, res = (rng.standard_normal(m).astype(np.float32) for m in (512, 130, 130))
    eps = 1e-6
    got, w = _run_q4_kernel("q4_gemv", x, 130, 2, tmp_path, norm=(nw, eps, one_plus), bias=bias, residual=res)
    x64 = x.astype(np.float64)
    xn = x64 / np.sqrt(np.mean(x64 * x64) + eps) * (nw + (1.0 if one_plus else 0.0))
    want = w @ xn + bias + res
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("stored, widen", PAIRS)
def test_cpu_q4_gemm_matches_numpy(stored, widen, tmp_path):
    """The several-token kernel of kernels/q4_gemv.c: 69 rows (a last workgroup of 5, so a lone
    last row), 5 tokens (a block of 4 and one more); 16-bit pairs as their widening, bit for bit."""
    x = np.random.default_rng(11).standard_normal((5, 256)).astype(np.float32)
    got, w = _run_q4_kernel("q4_gemm", x, 69, 1, tmp_path, stored, widen)
    want = x.astype(np.float64) @ w.T
    assert got.shape == (5, 69) and np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    if not widen:
        assert np.array_equal(got, _run_q4_kernel("q4_gemm", x, 69, 1, tmp_path / "f32", stored, True)[0])


@pytest.mark.parametrize("kv_heads", [2, 8])  # 8: the kernel's vector path (Qwen3, Llama 3)
@pytest.mark.parametrize("pos,window", [(0, None), (45, None), (100, None), (100, 8), (70, 40)])
def test_cpu_decode_attention_matches_the_jax_attention(pos, window, kv_heads, tmp_path, monkeypatch):
    """kernels/decode_attention_cpu.c against layers.attention (the graph every other step
    runs) on random data: GQA, rows in several blocks, the first position (no cached key),
    sliding windows that empty whole blocks."""
    import jax.numpy as jnp

    from iree_runner.compile import layers

    rng = np.random.default_rng(pos)
    L, Dh, S, KVH, layer = 3, 32, 128, kv_heads, 1
    H = 16 if KVH == 8 else 8
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((H, Dh), (KVH, Dh), (KVH, Dh)))
    monkeypatch.setattr(layers, "CACHE_LAYOUT", "LSDH")  # the CPU's (iree_compile.CACHE_LAYOUT)
    caches = [rng.standard_normal((L, S, Dh, KVH)).astype(np.float32) for _ in range(2)]
    positions = np.array([pos], np.int32)

    def ours(q, k, v, kc, vc, p):
        return extern.cpu_decode_attention(q, k, v, kc, vc, p, layer=layer, scale=0.3, window=window)

    def reference(q, k, v, kc, vc, p):
        return layers.attention(q[None], k[None], v[None], layers.KVCache(kc, vc, p), layer, 0.3, window)[0]

    got = _run_on_cpu(ours, [q, k, v, *caches, positions], tmp_path)
    want = np.asarray(reference(*map(jnp.asarray, (q, k, v, *caches, positions))))
    assert np.abs(got - want).max() < 1e-5


def _constants(text: str, kernel: str) -> list[list[int]]:
    """The push constants of each dispatch of `kernel` in a linked step."""
    consts = {(m[1], int(m[2])): int(m[3]) for m in re.finditer(r"%ext(\d+)_c(\d+) = arith.constant (-?\d+) : i32", text)}
    out = []
    for m in re.finditer(rf"flow\.dispatch @\w+::@{kernel}\[%ext(\d+)_grid\]", text):
        out.append([consts[(m[1], j)] for j in range(sum(1 for key in consts if key[0] == m[1]))])
    return out


def test_push_constants_follow_the_config():
    fam, cfg, spec = _spec("gemma3_text", "float16")
    decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))
    S, KVH, G, Dh = spec.cache_shape[2], cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    attn = _constants(decode, extern.fused_kernel(G, Dh, KVH))
    assert all(c[:4] == [S, KVH, G, Dh] for c in attn)
    assert [c[4] for c in attn] == list(range(cfg.num_hidden_layers)), "each layer its own"
    assert {c[6] for c in attn} == {0, cfg.sliding_window}, "global layers pass window 0, sliding ones their window"
    # gemma3: both pre-norms fold into the kernels as 1 + w; the MLP's gate is GELU.
    flags = [c[2] for c in _constants(decode, "gemv") + _constants(decode, "gemv_gate")]
    assert flags.count(extern.NORM | extern.ONE_PLUS) == cfg.num_hidden_layers  # qkv
    assert flags.count(extern.NORM | extern.ONE_PLUS | extern.GATE | extern.GELU) == cfg.num_hidden_layers


@pytest.mark.parametrize("heads, kv_heads, head_dim, fused, partial", [
    (16, 8, 128, "decode_attn_g2_kb2_ch16_d128", None),  # Qwen3-0.6B
    (32, 8, 64, "decode_attn_g4_kb2_ch16_d64", None),  # Llama-3.2-1B
    (4, 1, 256, "decode_attn_g4_kb1_ch8_d256", None),  # Gemma3-1B
    (4, 2, 32, "decode_attn_g2_kb2_ch16_d32", None),  # the test checkpoints
    (14, 2, 64, None, "decode_attn_partial"),  # Qwen2.5-0.5B: G = 7, the runtime form
    (8, 4, 64, None, "decode_attn_partial_g2")])
def test_attention_shapes_take_their_specialized_kernels(heads, kv_heads, head_dim, fused, partial):
    """Shapes of extern.SPECIALIZED_ATTENTION take one kernel with them as compile-time constants
    (in the PTX, all with the parameters of the test checkpoints' one, which the tests link);
    others the runtime partial and combine kernels."""
    g = heads // kv_heads
    assert extern.fused_kernel(g, head_dim, kv_heads) == fused
    ptx = extern.checked_ptx("decode_attention")
    if fused:
        assert fused in extern.KERNELS
        assert extern._bindings(ptx, fused) == extern._bindings(ptx, "decode_attn_g2_kb2_ch16_d32")
    else:
        assert extern.partial_kernel(g) == partial and partial in extern.KERNELS


@pytest.mark.parametrize("heads, kv_heads, head_dim, kernels", [
    (16, 8, 128, ["decode_attn_g2_kb2_ch16_d128"]), (4, 1, 256, ["decode_attn_g4_kb1_ch8_d256"]),
    (14, 2, 64, ["decode_attn_partial", "decode_attn_combine"]), (6, 3, 64, ["decode_attn_partial_g2", "decode_attn_combine"])])
def test_decode_attention_links_its_kernels(heads, kv_heads, head_dim, kernels):
    """extern.decode_attention of real shapes links (extern.link checks each kernel's parameters
    against its PTX): one kernel for the specialized shapes, partial then combine for the others."""
    import jax

    S, f32 = 768, np.float32
    specs = [jax.ShapeDtypeStruct(s, d) for s, d in (
        (((heads + 2 * kv_heads) * head_dim,), f32), ((head_dim,), f32), ((head_dim,), f32),
        ((2, head_dim, S, kv_heads), np.float16), ((2, head_dim, S, kv_heads), np.float16), ((1,), np.int32),
        ((2, head_dim), np.float16), ((2, head_dim), np.float16))]

    def fn(qkv, cos, sin, kc, vc, positions, wq, wk):
        return extern.decode_attention(qkv, cos, sin, kc, vc, positions, heads=heads, layer=1, scale=0.1, window=None,
                                       softcap=None, qk_norm=(wq, wk, 1e-6, False))[:3]

    text = extern.link(jax.export.export(jax.jit(fn), disabled_checks=extern.disabled_checks())(*specs).mlir_module())
    assert re.findall(r"flow\.dispatch @decode_attention::@(\w+)\[", text) == kernels


@pytest.mark.parametrize("head_dim, kv_heads, keys", [(128, 8, 16), (64, 8, 16), (256, 1, 8), (256, 2, 8),
                                                     (128, 3, 16), (64, 1, 16)])
def test_partial_blocks_stage_what_fits(head_dim, kv_heads, keys):
    """A partial block's keys fit the kernel's staging: MAX_KV halves for pairs of KV heads,
    half that for single ones (Gemma3-1B's one KV head of 256 features takes 8 keys a block;
    16 staged only half its keys)."""
    kb = extern.kv_heads_per_block(kv_heads)
    assert extern.keys_per_block(head_dim, kv_heads) == keys
    assert head_dim * keys * kb <= (extern.MAX_KV if kb == 2 else extern.MAX_KV // 2)
    assert extern.decode_attention_fits(4 * kv_heads, kv_heads, head_dim, 768)


def test_dense_decode_folds_norms_and_residuals():
    fam, cfg, spec = _spec("qwen3", "float16")
    decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))
    flags = sorted(c[2] for c in _constants(decode, "gemv") + _constants(decode, "gemv_gate"))
    assert {c[2] & extern.GATE for c in _constants(decode, "gemv_gate")} == {extern.GATE}, "gate mode, its own kernel"
    per_layer = sorted([extern.NORM, extern.RESIDUAL, extern.NORM | extern.GATE, extern.RESIDUAL])
    assert flags == sorted(per_layer * cfg.num_hidden_layers)


_MATVEC = re.compile(r"flow\.dispatch @gemv::@(\w+)\[%ext(\d+)_grid\]\(([^)]*)\) : \(([^)]*)\)")


def _matvecs(text: str) -> list[tuple[str, list[int], list[str], list[str]]]:
    """(kernel, push constants, operands, operand types) of each matvec dispatch, in order."""
    consts = {(m[1], int(m[2])): int(m[3]) for m in re.finditer(r"%ext(\d+)_c(\d+) = arith.constant (-?\d+) : i32", text)}
    out = []
    for m in _MATVEC.finditer(text):
        args, types = [a.strip() for a in m[3].split(",")], extern._split_types(m[4])
        n = sum(1 for a in args if a.startswith(f"%ext{m[2]}_c"))
        out.append((m[1], [consts[(m[2], j)] for j in range(n)], args[n:], types[n:]))
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_each_matvec_requests_the_next_ones_weights(packed, monkeypatch):
    """On a CUDA decode step, each matvec kernel's prefetch slots (its last operands and push
    constants) hold the next matvec's weights (W; or words, scales and biases: the same
    arguments, a bitcast of one repeated before the dispatch) and their sizes in bytes. The
    last matvec's slots are empty, and so are those of weights past PREFETCH_MAX_BYTES."""
    from test_packed import _packed_spec

    fam, cfg, spec = _packed_spec("qwen3", "float16", "cuda") if packed else _spec("qwen3", "float16")
    text = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))
    bitcast_of = dict(re.findall(r"(%[\w#]+) = stablehlo\.bitcast_convert (%arg\d+) ", text))
    root = lambda v: bitcast_of.get(v, v)  # noqa: E731
    slots = extern.PREFETCH_SLOTS
    matvecs = _matvecs(text)
    assert len(matvecs) == 4 * cfg.num_hidden_layers + packed  # packed: the lm_head too
    for (_, consts, ops, _), (name, _, next_ops, next_types) in zip(matvecs, matvecs[1:]):
        weights = extern.MATVEC_WEIGHTS[name]
        assert [root(o) for o in ops[-slots:][:len(weights)]] == [root(next_ops[k]) for k in weights]
        assert consts[-slots:][:len(weights)] == [extern._tensor_bytes(next_types[k]) for k in weights]
        assert consts[-slots:][len(weights):] == [0] * (slots - len(weights))
    assert matvecs[-1][1][-slots:] == [0] * slots
    monkeypatch.setattr(extern, "PREFETCH_MAX_BYTES", 1)
    text = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))
    assert all(consts[-slots:] == [0] * slots for _, consts, _, _ in _matvecs(text))


def test_stale_ptx_is_refused(tmp_path, monkeypatch):
    kernels = tmp_path / "kernels"
    shutil.copytree(extern.KERNEL_DIR, kernels)
    monkeypatch.setattr(extern, "KERNEL_DIR", kernels)
    assert extern.checked_ptx("decode_attention").exists()
    (kernels / "decode_attention.cu").write_text((kernels / "decode_attention.cu").read_text() + "\n// edited\n")
    with pytest.raises(RuntimeError, match="not made from the current decode_attention.cu"):
        extern.checked_ptx("decode_attention")
    (kernels / "decode_attention.ptx").unlink()
    with pytest.raises(FileNotFoundError, match="make ptx"):
        extern.checked_ptx("decode_attention")
    # A header the kernels include is part of their digest.
    assert extern.checked_ptx("gemv").exists()
    (kernels / "common.cuh").write_text((kernels / "common.cuh").read_text() + "\n// edited\n")
    with pytest.raises(RuntimeError, match="not made from the current gemv.cu"):
        extern.checked_ptx("gemv")


def test_make_ptx_keeps_a_ptx_made_from_the_current_source(tmp_path, monkeypatch):
    """nvcc may number registers differently from run to run: a PTX whose header names the
    current source's digest is kept, not made again (nvcc is not run)."""
    kernels = tmp_path / "kernels"
    shutil.copytree(extern.KERNEL_DIR, kernels)
    monkeypatch.setattr(extern, "KERNEL_DIR", kernels)
    before = (kernels / "sample.ptx").read_text()

    def no_nvcc(*args, **kwargs):
        raise AssertionError(f"nvcc run for an up-to-date PTX: {args[0]}")
    monkeypatch.setattr(extern.subprocess, "run", no_nvcc)
    assert extern.make_ptx("sample").read_text() == before
    (kernels / "sample.cu").write_text((kernels / "sample.cu").read_text() + "\n// edited\n")
    with pytest.raises(AssertionError, match="nvcc run"):  # a stale one is made again
        extern.make_ptx("sample")


@pytest.mark.parametrize("rows, k, norm, kernel", [
    (151936, 1024, False, "lm_head_q4_k1024_bf16"), (40000, 2048, True, "lm_head_q4_k2048_bf16"),
    (262144, 1152, True, "lm_head_q4_k1152_bf16"), (40000, 896, False, "lm_head_q4_k896_bf16"),
    (40000, 1280, True, "gemv_q4_bf16"), (4096, 1024, False, "gemv_q4_bf16")])
def test_an_lm_head_takes_its_kernel(rows, k, norm, kernel, monkeypatch):
    """On a one-token CUDA step, a packed 4-bit lm_head with many rows and K one of
    extern.LM_HEAD_K runs lm_head_q4_k<K>_bf16 (BF16 pairs) on one wave of blocks, its norm and
    argmax in the kernel; any other, the norm, gemv_q4_bf16 and the step's argmax."""
    import jax
    import jax.numpy as jnp

    from iree_runner.compile import layers
    from iree_runner.compile.packed import Packed

    monkeypatch.setattr(layers, "DECODE_KERNEL", "cuda")

    def fn(x, words, scales, biases, norm_w):
        w = Packed.of(words, scales, biases, 4, 64, jnp.float16)
        logits, argmax = layers.lm_head(layers.Normed(x, norm_w, 1e-6, False) if norm else x, w)
        return logits, export.first_argmax(logits) if argmax is None else argmax

    f32, bf16 = np.float32, jnp.bfloat16  # BF16 scales and biases, as an MLX checkpoint's (CUDA takes them so)
    specs = [jax.ShapeDtypeStruct(s, d) for s, d in (((k,), f32), ((rows, k // 8), np.uint32), ((rows, k // 64), bf16),
                                                     ((rows, k // 64), bf16), ((k,), np.float16))]
    text = extern.link(jax.export.export(jax.jit(fn), disabled_checks=extern.disabled_checks())(*specs).mlir_module())
    grid = extern.LM_HEAD_GRID if kernel.startswith("lm_head") else -(-rows // extern.GEMV_WARPS)
    assert re.search(rf"flow\.dispatch @gemv::@{kernel}\[", text), kernel
    assert f"_grid = arith.constant {grid} : index" in text
    # The argmax's and the norm's reductions are the graph's only where the kernel is gemv_q4_bf16.
    assert ("stablehlo.reduce" in text) == (kernel == "gemv_q4_bf16")
    if kernel.startswith("lm_head"):
        assert _constants(text, kernel) == [[rows, k, extern.NORM if norm else 0, extern.f32_bits(1e-6 if norm else 0.0)]]


def test_a_placeholder_it_cannot_read_is_an_error():
    with pytest.raises(RuntimeError, match="cannot link kernel placeholder"):
        extern.link("module @m {\n  %0 = stablehlo.custom_call @iree_ext_decode_attn_partial(%a) : weird\n}")
    with pytest.raises(ValueError, match="unknown kernel"):
        extern.call("nope", None, [], grid=1, constants=[])


def test_in_place_cache_writes_copy_no_cache(tmp_path):
    """IREE keeps the kernels' in-place writes in place: no copy in a CUDA step is as large as
    a cache (per-layer writes in JAX made it copy the whole cache for each layer)."""
    fam, cfg, spec = _spec("qwen3", "float16")
    cache_bytes = int(np.prod(spec.cache_shape)) * 2
    for tokens in (1, 8):
        text = export.export_step(fam, cfg, spec, tokens, "step", **iree_compile.export_options("cuda"))
        calls = re.findall(r"vm\.call @hal\.command_buffer\.copy_buffer\(([^)]*)\)", _vm_program(text, tmp_path))
        lengths = [int(re.match(r"%c(\d+)", c.split(", ")[7])[1]) for c in calls]
        assert lengths and max(lengths) < cache_bytes, (tokens, lengths, cache_bytes)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_cuda_steps_choose_their_token_with_the_sampling_kernel(family_name):
    """With the CUDA kernels, prefill and decode (dense and packed) end in one sample_token
    dispatch (kernels/sample.cu) over the vocabulary, whose [token, status] is the step's
    second result; the CPU and --no-kernels steps return [argmax, 0] from the graph."""
    from test_packed import _packed_spec

    for fam, cfg, spec in (_spec(family_name, "float16"), _packed_spec(family_name, "float16", "cuda")):
        for tokens in (1, 8):
            text = export.export_step(fam, cfg, spec, tokens, "step", **iree_compile.export_options("cuda"))
            assert _constants(text, "sample_token") == [[cfg.vocab_size]], (tokens, spec.packed != ())
            # It writes the step's tokens into the history (the step's argument, tied: in place),
            # which the repetition penalty reads on the device.
            tied = re.search(r"@sample_token\[.*\) -> \(tensor<2xi32>, %\w+, tensor<[\dx]+xf32>, tensor<[\dx]+xf32>, "
                             rf"(%arg\d+)\)$", text, re.M)
            assert tied and f"{tied[1]}: tensor<{spec.capacity}xi32>" in text, (tokens, spec.packed != ())
            grid = re.search(r"%ext(\d+)_grid = arith.constant (\d+) : index(?=[\s\S]*@sample_token\[%ext\1_grid\])", text)
            assert int(grid[2]) == -(-cfg.vocab_size // extern.SAMPLE_PER_BLOCK)
        assert export.samples_on_device("cuda", cfg.vocab_size)
    fam, cfg, spec = _spec(family_name, "float32", "cpu")
    assert "@sample_token" not in export.export_step(fam, cfg, spec, 1, "step", **iree_compile.export_options("cpu"))
    fam, cfg, spec = _spec(family_name, "float16")
    text = export.export_step(fam, cfg, spec, 1, "step", **iree_compile.export_options("cuda", kernels=False))
    assert "@sample_token" not in text
    assert not export.samples_on_device("cpu", cfg.vocab_size) and not export.samples_on_device(None, cfg.vocab_size)


def test_the_sampling_kernel_takes_vocabularies_up_to_its_candidates():
    """128 blocks of 2048 logits, 16 candidates each (kernels/sample.cu MAX_BLOCKS): Gemma3's
    262144 tokens fit, one more does not (its steps then leave sampling to the host)."""
    assert extern.sample_fits(262_144) and not extern.sample_fits(262_145)
    assert not export.samples_on_device("cuda", 262_145)
    src = (extern.KERNEL_DIR / "sample.cu").read_text()
    defines = dict(re.findall(r"^#define (\w+) \(?(\w+)", src, re.M))
    assert int(defines["PER_BLOCK"]) == extern.SAMPLE_PER_BLOCK and int(defines["TOP"]) == extern.SAMPLE_TOP
    assert int(defines["MAXC"]) // int(defines["TOP"]) == extern.SAMPLE_MAX_BLOCKS
