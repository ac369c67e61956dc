"""Ahead-of-time bundles and the artifact cache: what is refused, what is rebuilt, what is reused.

Also: the runtime never imports jax, and runs a bundle in a process where jax can't be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from checkpoints import FAMILIES, mlx_checkpoint
from iree_runner.bundle import BundleError, check_compatible, read_manifest
from iree_runner.compile import build

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt():
    return mlx_checkpoint("qwen3", "bfloat16", "q4", keys="v4")


def _shapes(ckpt) -> dict:
    from iree_runner.compile import family
    from iree_runner.weights import read_config

    cc = read_config(ckpt)
    fam = family.family_module(cc.model_type)
    return fam.weight_shapes(fam.Config.from_checkpoint(cc))


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    build.compile_bundle(ckpt, ["cpu", "cuda"], out, max_context=128)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_compiles_for_cpu_and_cuda(family, tmp_path):
    """CI's ahead-of-time step: both targets, no GPU needed."""
    m = build.compile_bundle(mlx_checkpoint(family, "bfloat16", "q4", keys="v4"), ["cpu", "cuda"], tmp_path,
                             max_context=128)
    assert set(m.targets) == {"cpu", "cuda"}
    assert m.targets["cuda"].weight_dtype == "float16" and m.targets["cpu"].weight_dtype == "float32"
    for t in m.targets.values():
        for rel in t.files.values():
            assert (tmp_path / rel).stat().st_size > 1000


def test_manifest_describes_bundle(bundle, ckpt):
    m = read_manifest(bundle)
    raw = json.loads((ckpt / "config.json").read_text())
    assert m.model_type == "qwen3" and m.max_context == 128
    assert m.prefill_chunk == build.DEFAULT_PREFILL_CHUNK == 32  # a cpu + cuda bundle shares the cpu's
    assert check_compatible(m, bundle, raw, "cpu").target == "cpu"
    assert "--iree-opt-level=O3" in m.targets["cuda"].flags


def test_refuses_other_target(bundle, ckpt, tmp_path):
    m = read_manifest(bundle)
    only_cpu = replace(m, targets={"cpu": m.targets["cpu"]})
    raw = json.loads((ckpt / "config.json").read_text())
    with pytest.raises(BundleError, match="not 'cuda'"):
        check_compatible(only_cpu, bundle, raw, "cuda")


def test_refuses_other_compiler_version(bundle, ckpt):
    m = replace(read_manifest(bundle), compiler_version="2.0.0")
    raw = json.loads((ckpt / "config.json").read_text())
    with pytest.raises(BundleError, match="compiled by IREE 2.0.0"):
        check_compatible(m, bundle, raw, "cpu")


def test_refuses_other_model_config(bundle, ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    with pytest.raises(BundleError, match="num_hidden_layers"):
        check_compatible(read_manifest(bundle), bundle, {**raw, "num_hidden_layers": 7}, "cpu")
    other = json.loads((mlx_checkpoint("llama", "bfloat16", "q4", keys="v4") / "config.json").read_text())
    with pytest.raises(BundleError, match="model_type 'qwen3'"):
        check_compatible(read_manifest(bundle), bundle, other, "cpu")


def test_same_architecture_other_quantization_is_accepted(bundle):
    """The graph gets dequantized weights: a q8 or bf16 copy of the same model runs the same bundle."""
    q8 = json.loads((mlx_checkpoint("qwen3", "float16", "q8", keys="v4") / "config.json").read_text())
    check_compatible(read_manifest(bundle), bundle, q8, "cpu")


def test_refuses_corrupt_bundle_file(bundle, ckpt, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "cpu" / "decode.vmfb").write_bytes(b"garbage")
    raw = json.loads((ckpt / "config.json").read_text())
    with pytest.raises(BundleError, match="decode.vmfb: corrupt"):
        check_compatible(read_manifest(copy), copy, raw, "cpu")


def test_refuses_a_bundle_of_another_format(bundle, tmp_path):
    """A bundle written by an earlier version (format 2: packed weights took .scales and .biases,
    not .scales_biases) is refused before any weight is read, saying what to do."""
    from iree_runner.bundle import FORMAT

    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(manifest | {"format": FORMAT - 1}))
    with pytest.raises(BundleError, match=rf"bundle format {FORMAT - 1}, this runtime reads format {FORMAT} "
                                          r"\(compile the bundle again"):
        read_manifest(old)
    assert read_manifest(bundle).model_type == manifest["model_type"]


def test_cache_reuses_rebuilds_and_rekeys(ckpt, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("IREE_RUNNER_CACHE", str(tmp_path))
    first = build.build_target(ckpt, "cpu", max_context=64)
    stamp = (first / "cpu" / "prefill.vmfb").stat().st_mtime_ns
    assert build.build_target(ckpt, "cpu", max_context=64) == first
    assert (first / "cpu" / "prefill.vmfb").stat().st_mtime_ns == stamp  # reused, not recompiled
    (first / "cpu" / "prefill.vmfb").write_bytes(b"\0" * 100)  # corrupt artifact: rebuilt
    assert build.build_target(ckpt, "cpu", max_context=64) == first
    assert "rebuilding" in capsys.readouterr().err
    check_compatible(read_manifest(first), first, json.loads((ckpt / "config.json").read_text()), "cpu")
    assert build.build_target(ckpt, "cpu", max_context=96) != first  # another key
    raw = json.loads((ckpt / "config.json").read_text())
    key = build.build_key(raw, "cpu", 64, 32, "float32")
    assert key != build.build_key(raw, "cuda", 64, 32, "float32")
    assert key != build.build_key(raw, "cpu", 64, 32, "float16")
    # --no-kernels changes the one-token step of either target, and so the key.
    assert build.build_key(raw, "cuda", 64, 32, "float16", kernels=False) != build.build_key(raw, "cuda", 64, 32, "float16")
    assert build.build_key(raw, "cpu", 64, 32, "float32", kernels=False) != key
    packed = build.packed_weights_of(ckpt, _shapes(ckpt))
    assert packed and build.build_key(raw, "cpu", 64, 32, "float32", packed_weights=packed) != key
    # The scale/bias pairs' dtype (as stored, which the kernels read; f32 in bundles made before
    # the CPU's kernels read them) is part of it.
    stored = build.stored_pairs(packed)
    assert {p.pairs for p in stored} == {"bfloat16"} and {p.pairs for p in packed} == {"float32"}
    assert (build.build_key(raw, "cuda", 64, 32, "float16", packed_weights=stored)
            != build.build_key(raw, "cuda", 64, 32, "float16", packed_weights=packed))


def test_weight_dtype_override(ckpt, tmp_path):
    """--weight-dtype f32 on CUDA: the bundle an fp32 oracle can be held to on the GPU."""
    m = build.compile_bundle(ckpt, ["cuda"], tmp_path, max_context=64, weight_dtype="f32")
    assert m.targets["cuda"].weight_dtype == "float32"
    assert m.prefill_chunk == build.DEFAULT_PREFILL_CHUNK_CUDA == 128  # a cuda-only bundle
    assert m.targets["cuda"].cache_shape[build.export.layers.CACHE_LAYOUT.index("S")] == 64 + 128
    with pytest.raises(ValueError, match="weight dtype 'bf16' is not supported"):
        build.compile_bundle(ckpt, ["cuda"], tmp_path, max_context=64, weight_dtype="bf16")


def test_runtime_never_imports_jax():
    code = ("import sys, iree_runner, iree_runner.cli, iree_runner.generate, iree_runner.session, "
            "iree_runner.weights, iree_runner.bundle, iree_runner.tokenizer, iree_runner.sampling; "
            "bad = [m for m in ('jax', 'jaxlib', 'torch', 'mlx', 'transformers', 'iree.compiler') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bundle_runs_without_jax(bundle, ckpt):
    """A runtime-only install: jax and the compiler can't be imported, the bundle still runs,
    with the same tokens as compiling on the fly."""
    block = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'jax' or name.startswith('iree.compiler'):
                    raise ImportError('blocked for this test: ' + name)
        sys.meta_path.insert(0, Block())
        from iree_runner.cli import main
        main()
    """)
    args = ["--model", str(ckpt), "--prompt", "hello world", "--max-tokens", "8", "--no-chat", "--format", "json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", block, *args, "--bundle", str(bundle)], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr
    q = subprocess.run([sys.executable, "-c", block, *args], capture_output=True, text=True, env=env)
    assert q.returncode == 2 and "compile" in q.stderr  # without a bundle it needs the compile extra
    r = subprocess.run([sys.executable, "-m", "iree_runner.cli", *args, "--max-context", "128"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(p.stdout)["tokens"] == json.loads(r.stdout)["tokens"]


def test_targets_keep_the_checkpoints_scale_pairs_and_refuse_another_dtype(bundle, ckpt):
    """Both targets' packed weights take their scales and biases as the checkpoint stores them
    (BF16 here: the device holds what the file holds, and the kernels widen them); weights of a
    checkpoint with F16 scales (same config) are refused for the BF16 bundle, naming the tensor."""
    from iree_runner.generate import ModelError, check_weights, gather_for
    from iree_runner.weights import open_checkpoint

    manifest = read_manifest(bundle)
    for target, pairs in (("cuda", "bfloat16"), ("cpu", "bfloat16")):
        t = manifest.targets[target]
        dtypes = dict(zip(t.weight_names, t.dtypes()))
        assert t.packed and {dtypes[n.removesuffix("weight") + "scales_biases"] for n in t.packed} == {pairs}
        weights = gather_for(open_checkpoint(ckpt), t)
        check_weights(ckpt, t, weights)
        sb = weights["model.embed_tokens.scales_biases"]
        with open_checkpoint(ckpt) as c:
            want = c.load_packed("model.embed_tokens.weight", "scales", widen=False)
        assert sb.dtype == pairs and np.array_equal(sb[..., 0].astype(np.float32), want.astype(np.float32))
    other = mlx_checkpoint("qwen3", "float16", "q4", keys="v4")
    t = manifest.targets["cuda"]
    with pytest.raises(ModelError, match=r"tensor model\.\S+\.scales_biases is float16 .* expects bfloat16 .*"
                                         r"scales' dtype"):
        check_weights(other, t, gather_for(open_checkpoint(other), t))


def test_long_prefill_step_defaults_and_limits(ckpt, tmp_path):
    """A CUDA-only bundle gets a 512-token prefill step where the context can hold more than half
    of it; a mixed or short-context bundle gets none; one no longer than the prefill chunk is refused."""
    assert build._long_prefill(["cuda"], 128, None, 640) == build.DEFAULT_LONG_PREFILL_CUDA == 512
    assert build._long_prefill(["cuda"], 128, None, 256) == 0  # never more than 256 prompt tokens
    assert build._long_prefill(["cpu", "cuda"], 32, None, 640) == 0
    assert build._long_prefill(["cpu"], 32, 0, 640) == 0
    # f32 weights: none by default (IREE 3.13 fails on it); one asked for is built as asked
    assert build._long_prefill(["cuda"], 128, None, 640, "f32") == 0
    assert build._long_prefill(["cuda"], 128, None, 640, "f16") == 512
    assert build._long_prefill(["cuda"], 128, 512, 640, "f32") == 512
    with pytest.raises(ValueError, match="long prefill chunk 32: 0 \\(none\\) or more than the prefill chunk \\(32\\)"):
        build.compile_bundle(ckpt, ["cpu"], tmp_path, max_context=64, prefill_long=32)
    m = build.compile_bundle(ckpt, ["cuda"], tmp_path, max_context=384)
    assert m.prefill_long == 512 and set(m.targets["cuda"].files) == {"prefill", "prefill_long", "decode"}
    # Rows for the context and half the long chunk (it runs only where it ends within them).
    assert m.targets["cuda"].cache_shape[build.export.layers.CACHE_LAYOUT.index("S")] == 384 + 256


def test_a_manifest_without_a_long_prefill_step_reads(bundle, tmp_path):
    """Bundles made before the long prefill step (no "prefill_long" key) still read: one chunk size."""
    copy = tmp_path / "old"
    shutil.copytree(bundle, copy)
    d = json.loads((copy / "manifest.json").read_text())
    d.pop("prefill_long")
    (copy / "manifest.json").write_text(json.dumps(d))
    assert read_manifest(copy).prefill_long == 0


def test_a_context_of_any_length_compiles_for_cuda(ckpt, tmp_path):
    """The cache's rows are rounded up to a multiple of 32 (the decode attention kernel's blocks):
    --max-context 300 (428 rows, unrounded) fell back to IREE's own attention, which failed to compile."""
    m = build.compile_bundle(ckpt, ["cuda"], tmp_path, max_context=300, prefill_long=0)
    assert m.targets["cuda"].cache_shape[build.export.layers.CACHE_LAYOUT.index("S")] == 448
    assert m.targets["cuda"].capacity == 448


def test_a_default_long_prefill_step_that_fails_to_compile_is_left_out(ckpt, tmp_path, monkeypatch, capsys):
    """Should IREE fail on a default long step (as it does with f32 weights, which now get none
    by default), it is left out with a warning and the bundle runs the short chunks; one asked
    for fails the build."""
    iree_compile = build.iree_compile
    real = iree_compile.compile_mlir

    def failing(mlir, path, target, *, label, **kw):
        if label == "prefill_long":
            raise iree_compile.CompileError(label, "iree-compile failed for prefill_long (cuda):\n<stdin>:1:2: note: "
                                                   "here\nstep.mlir:7:3: error: failed to legalize (in this test)\nmore")
        return real(mlir, path, target, label=label, **kw)

    monkeypatch.setattr(iree_compile, "compile_mlir", failing)
    m = build.compile_bundle(ckpt, ["cuda"], tmp_path / "default", max_context=352)
    assert m.prefill_long == 0 and set(m.targets["cuda"].files) == {"prefill", "decode"}
    err = capsys.readouterr().err
    assert "the long prefill step (512 tokens a call) did not compile" in err
    assert "step.mlir:7:3: error: failed to legalize (in this test)" in err, "the compiler's reason, not its header"
    with pytest.raises(iree_compile.CompileError, match="failed for prefill_long"):
        build.compile_bundle(ckpt, ["cuda"], tmp_path / "asked", max_context=352, prefill_long=512)
