"""Quantized weights kept packed on the device (`compile --packed`, compile/packed.py).

The packed step against the oracles: HF fp32 greedy tokens and logits for every family (4-bit
through the CPU kernel in test_models.py, the CPU's default; 8-bit dequantized inside the
graph and 4-bit dequantized when loaded here), and the in-graph dequantization against
mx.dequantize. Also which steps read the weights with a kernel, what the bundle
records, and what a mismatched checkpoint gets.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from checkpoints import FAMILIES, mlx_checkpoint
from test_models import MAX_CONTEXT, SEEDS, assert_matches_oracle

mx = pytest.importorskip("mlx.core", reason="mx.dequantize is the oracle")  # oracle extra


# The CPU's default packs 4-bit weights (test_models.py runs it); here the other two choices:
# 4-bit dequantized when loaded (--no-packed) and 8-bit kept packed (--packed: dequantized
# inside the step, no kernel reads 8 bits).
@pytest.mark.parametrize("family,dtype,quant,packed", [(f, "bfloat16", "q4", False) for f in FAMILIES]
                         + [(f, "float16", "q8", True) for f in FAMILIES], ids=str)
def test_greedy_matches_hf_fp32_packed_or_not(family, dtype, quant, packed):
    from iree_runner.generate import load_model

    ckpt = mlx_checkpoint(family, dtype, quant, keys="v4", seed=SEEDS.get((family, quant), 0))
    ours = load_model(ckpt, device="cpu", max_context=MAX_CONTEXT, packed=packed)
    assert ("model.layers.0.self_attn.qkv_proj.weight" in ours.session.build.packed) == packed
    assert_matches_oracle(ckpt, ours)


def test_what_each_target_packs_by_default(tmp_path):
    """The 4-bit weights (the one-token kernels read them), not 8-bit ones, on both targets."""
    from iree_runner.compile import build

    q4, q8 = (mlx_checkpoint("qwen3_moe", "bfloat16", "q4", keys="v4"), mlx_checkpoint("qwen3", "float16", "q8", keys="v4"))
    m = build.compile_bundle(q4, ["cpu", "cuda"], tmp_path / "q4", max_context=64)
    cpu = m.targets["cpu"].packed
    assert "model.layers.0.self_attn.qkv_proj.weight" in cpu and "model.layers.0.mlp.gate.weight" not in cpu  # 8-bit router
    assert m.targets["cuda"].packed == cpu
    q8_bundle = build.compile_bundle(q8, ["cpu", "cuda"], tmp_path / "q8", max_context=64)
    assert q8_bundle.targets["cpu"].packed == q8_bundle.targets["cuda"].packed == ()


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, 64)])
def test_in_graph_dequantize_matches_mx(bits, group_size):
    import jax
    import jax.numpy as jnp

    from iree_runner.compile.packed import Packed

    w = np.random.default_rng(bits * group_size).standard_normal((48, 256)).astype(np.float32)
    words, scales, biases = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=group_size, bits=bits)
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)  # exact (oracles.md)
    want = np.array(mx.dequantize(words, scales, biases, group_size=group_size, bits=bits))
    args = [np.array(a) for a in (words, scales, biases)]
    got = jax.jit(lambda p, s, b: Packed.of(p, s, b, bits, group_size, jnp.float32).dequantize())(*args)
    assert np.array_equal(np.asarray(got), want)
    rows = jax.jit(lambda p, s, b: Packed.of(p, s, b, bits, group_size, jnp.float32).rows(jnp.array([3, 0])).dequantize())
    assert np.array_equal(np.asarray(rows(*args)), want[[3, 0]])


def _packed_spec(family_name: str, weight_dtype: str, target: str = "cpu", ckpt_dtype: str = "bfloat16"):
    from iree_runner.compile import build, export, family, iree_compile
    from iree_runner.weights import read_config

    ckpt = mlx_checkpoint(family_name, ckpt_dtype, "q4", keys="v4", seed=SEEDS.get((family_name, "q4"), 0))
    cc = read_config(ckpt)
    fam = family.family_module(cc.model_type)
    cfg = fam.Config.from_checkpoint(cc)
    packed = build.packed_weights_for(ckpt, fam.weight_shapes(cfg), target)
    return fam, cfg, export.step_spec(fam, cfg, capacity=MAX_CONTEXT + 32, weight_dtype=weight_dtype,
                                      cache_dtype=weight_dtype, packed_weights=packed,
                                      cache_layout=iree_compile.CACHE_LAYOUT[target])


@pytest.mark.parametrize("family_name", FAMILIES)
def test_one_token_steps_read_packed_weights_with_a_kernel(family_name):
    """Every packed 4-bit linear layer of a decode step is a kernel dispatch (the CPU's and
    CUDA's): 4 per dense layer (qkv, o, gate_up, down; MoE layers have a router and their
    experts stay dequantized) and the lm_head; on the CPU, prefill's too. --no-kernels
    dequantizes in the graph."""
    from iree_runner.compile import export, iree_compile

    fam, cfg, spec = _packed_spec(family_name, "float32")
    four_bit = {p.name for p in spec.packed if p.bits == 4}  # qwen3_moe's routers are 8-bit
    lm_head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    expect = len(four_bit - {"model.embed_tokens.weight"}) + (lm_head in four_bit and cfg.tie_word_embeddings)
    assert expect >= 4 * cfg.num_hidden_layers // (2 if family_name == "qwen3_moe" else 1)
    for target, kernels, dtype in (("cpu", ("@q4_gemv::@q4_gemv[",), "float32"),
                                   ("cuda", ("@gemv::@gemv_q4_bf16[", "@gemv::@gemv_q4_gate_bf16["), "float16")):
        kernel = kernels[0]  # the lm_head's
        fam, cfg, spec = _packed_spec(family_name, dtype, target)
        decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options(target))
        assert sum(decode.count(f"flow.dispatch {k}") for k in kernels) == expect, target
        # Prefill's lm_head is one row, the one-token kernel's. Its layers: on the CPU the
        # several-token kernel, on CUDA dequantized to f16 by a kernel for IREE's matmuls.
        prefill = export.export_step(fam, cfg, spec, 8, "prefill", **iree_compile.export_options(target))
        assert prefill.count(f"flow.dispatch {kernel}") == (lm_head in four_bit)
        gemm = prefill.count("flow.dispatch @q4_gemv::@q4_gemm[")
        dequant = prefill.count("flow.dispatch @gemv::@dequant_q4[")
        assert (gemm, dequant) == ((expect - (lm_head in four_bit), 0) if target == "cpu"
                                   else (0, expect - (lm_head in four_bit))), target
        attention = prefill.count("flow.dispatch @prefill_attention::@prefill_attn[")
        sample = prefill.count("flow.dispatch @sample::@sample_token[")  # the step's token (CUDA)
        assert sample == (target == "cuda")
        assert prefill.count("flow.dispatch") == (lm_head in four_bit) + gemm + dequant + attention + sample
        text = export.export_step(fam, cfg, spec, 1, "step", **iree_compile.export_options(target, kernels=False))
        assert "flow.dispatch" not in text, target


def test_packed_cuda_step_compiles(tmp_path):
    """CI's ahead-of-time step with packed weights: the CUDA decode step with its 4-bit kernel."""
    from iree_runner.compile import build

    ckpt = mlx_checkpoint("qwen3", "bfloat16", "q4", keys="v4")
    m = build.compile_bundle(ckpt, ["cuda"], tmp_path, max_context=64, packed=True)
    assert (tmp_path / m.targets["cuda"].files["decode"]).stat().st_size > 0


def test_bundle_records_packed_weights_and_keeps_them_small(tmp_path):
    from iree_runner.bundle import read_manifest
    from iree_runner.generate import load_model

    ckpt = mlx_checkpoint("qwen3", "bfloat16", "q4", keys="v4")
    dense = load_model(ckpt, device="cpu", max_context=64, packed=False).session
    packed = load_model(ckpt, device="cpu", max_context=64, packed=True).session
    b = packed.build
    types = dict(zip(b.weight_names, b.dtypes()))
    for name in b.packed:
        base = name[: -len(".weight")]
        assert (types[name], types[f"{base}.scales_biases"]) == ("uint32", "bfloat16")  # as stored
    assert types["model.norm.weight"] == "float32"
    # f32 dense weights against 4-bit words plus 16-bit scales and biases per 64: about 1/7 for
    # the linear layers; norms stay f32 either way.
    assert packed.stats.weight_bytes < 0.25 * dense.stats.weight_bytes
    cache = 2 * int(np.prod(b.cache_shape)) * np.dtype(b.cache_dtype).itemsize
    assert packed.stats.weight_bytes + cache < packed.stats.device_bytes < packed.stats.weight_bytes + cache + (8 << 20)
    # IREE's allocator agrees: in a process of its own (its peak counts from the process's
    # first allocation), a session's peak over loading and generating is all in device_bytes
    # but the scalars and the sampling settings (a few KB).
    for s, flag in ((dense, False), (packed, True)):
        code = (f"from iree_runner.generate import generate_step, load_model; from iree_runner.sampling import SamplingParams;"
                f"s = load_model({str(ckpt)!r}, device='cpu', max_context=64, packed={flag}).session;"
                "list(generate_step(s, list(range(3, 40)), SamplingParams(temperature=0.7, seed=1), 8));"
                "print(s.device_peak_bytes)")
        peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
        assert s.stats.device_bytes <= peak < s.stats.device_bytes + (64 << 10), flag
    from iree_runner.compile import build as build_mod

    out = tmp_path / "bundle"
    build_mod.compile_bundle(ckpt, ["cpu"], out, max_context=64, packed=True)
    assert read_manifest(out).targets["cpu"] == packed.build.__class__.from_json("cpu", read_manifest(out).targets["cpu"].to_json())
    assert read_manifest(out).targets["cpu"].packed == b.packed


def test_a_bundle_with_f32_pairs_still_runs(tmp_path, monkeypatch):
    """A CPU bundle made before its kernels read the scale/bias pairs as stored (its manifest's
    pairs float32: widened when loaded, read by the kernels' f32 form) still loads and gives the
    greedy tokens of one with the BF16 pairs as stored."""
    from iree_runner.bundle import read_manifest
    from iree_runner.compile import build
    from iree_runner.generate import generate_step, load_model
    from iree_runner.sampling import SamplingParams

    ckpt = mlx_checkpoint("qwen3", "bfloat16", "q4", keys="v4")
    build.compile_bundle(ckpt, ["cpu"], tmp_path / "bfloat16", max_context=64, packed=True)
    monkeypatch.setattr(build, "stored_pairs", lambda specs: specs)  # what build.py gave the CPU before
    build.compile_bundle(ckpt, ["cpu"], tmp_path / "float32", max_context=64, packed=True)
    tokens = {}
    for pairs in ("bfloat16", "float32"):
        t = read_manifest(tmp_path / pairs).targets["cpu"]
        dtypes = dict(zip(t.weight_names, t.dtypes()))
        assert {dtypes[n.removesuffix("weight") + "scales_biases"] for n in t.packed} == {pairs}
        s = load_model(ckpt, device="cpu", bundle=tmp_path / pairs).session
        tokens[pairs] = list(generate_step(s, list(range(3, 30)), SamplingParams(), 12))
    assert len(tokens["bfloat16"]) == 12 and all(isinstance(t, int) for t in tokens["bfloat16"])
    assert tokens["float32"] == tokens["bfloat16"]


def test_packed_bundle_refuses_an_unquantized_checkpoint(tmp_path):
    from iree_runner.compile import build
    from iree_runner.generate import load_model
    from iree_runner.weights import CheckpointError

    out = tmp_path / "bundle"
    build.compile_bundle(mlx_checkpoint("qwen3", "bfloat16", "q4", keys="v4"), ["cpu"], out, max_context=64, packed=True)
    plain = mlx_checkpoint("qwen3", "float16", "none", keys="v4")
    with pytest.raises(CheckpointError, match=re.escape("'model.embed_tokens.weight' is not quantized")):
        load_model(plain, device="cpu", bundle=out)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_scales_and_biases_go_side_by_side(dtype):
    """A packed weight's second argument holds each group's scale and bias next to each other
    ([out, in / group, 2]: the checkpoint's values as stored, F16 or BF16, or widened exactly to
    f32), so a kernel reads both in one load; a stacked projection's parts are concatenated
    along the output axis."""
    from iree_runner.resident import packed_arguments, packed_tensor
    from iree_runner.weights import open_checkpoint

    with open_checkpoint(mlx_checkpoint("qwen3", dtype, "q4", keys="v4")) as ckpt:
        for name, parts in (("model.layers.0.mlp.down_proj.weight", ["model.layers.0.mlp.down_proj.weight"]),
                            ("model.layers.1.self_attn.qkv_proj.weight",
                             [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"])):
            words, scales_biases = packed_arguments(name)
            stored, widened = packed_tensor(ckpt, scales_biases), packed_tensor(ckpt, scales_biases, widen=True)
            for k, part in enumerate(("scales", "biases")):
                want = np.concatenate([ckpt.load_packed(p, part) for p in parts])
                assert stored.dtype == dtype and widened.dtype == np.float32
                assert stored.shape == widened.shape == (*want.shape, 2)
                np.testing.assert_array_equal(widened[..., k], want)
                np.testing.assert_array_equal(stored[..., k].astype(np.float32), want)
            assert packed_tensor(ckpt, words).shape[0] == stored.shape[0]


def test_load_packed_names_what_is_wrong():
    from iree_runner.weights import CheckpointError, open_checkpoint

    with open_checkpoint(mlx_checkpoint("qwen3", "bfloat16", "q4", keys="v4")) as ckpt:
        words = ckpt.load_packed("model.layers.0.mlp.down_proj.weight")
        scales = ckpt.load_packed("model.layers.0.mlp.down_proj.weight", "scales")
        assert words.dtype == np.uint32 and scales.dtype == np.float32
        assert words.shape[0] == scales.shape[0] and words.shape[1] * 8 == scales.shape[1] * 64
        with pytest.raises(CheckpointError, match="'model.norm.weight' is not quantized"):
            ckpt.load_packed("model.norm.weight")
        with pytest.raises(KeyError, match="no tensor 'nope.weight'"):
            ckpt.load_packed("nope.weight")
