"""Hand-written kernels linked into exported steps (compile/extern.py for CUDA; the same path on
the CPU in bench/extern_dispatch.py --target cpu).

What runs them is checked on a GPU (bench/gpu_check.sh: greedy tokens against the HF fp32
oracle; bench/diag_cuda.py: CUDA against the CPU step). Here, without a GPU: which steps get
them, that the committed PTX is the current source's, and that IREE takes the linked text.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from checkpoints import FAMILIES
from iree_runner.compile import export, extern, iree_compile
from test_host_waits import _main_of_vm_program, _spec


@pytest.mark.parametrize("family_name", FAMILIES)
def test_cuda_decode_attention_is_the_kernel(family_name, tmp_path):
    fam, cfg, spec = _spec(family_name, "float16")
    layers = cfg.num_hidden_layers
    decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))
    assert "stablehlo.custom_call" not in decode
    for kernel in ("decode_attn_partial", "decode_attn_combine"):
        assert len(re.findall(rf"flow\.dispatch @decode_attention::@{kernel}\[", decode)) == layers
    main = _main_of_vm_program(decode, tmp_path)
    assert len(re.findall(r"@hal\.fence\.await\(", main)) == 1
    # --no-kernels, prefill, the CPU and an f32 cache keep the attention in JAX.
    text = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda", kernels=False))
    assert "@decode_attention" not in text and "@gemv" not in text
    for tokens, target, dtype in ((8, "cuda", "float16"), (1, "cpu", "float32"), (1, "cuda", "float32")):
        fam, cfg, spec = _spec(family_name, dtype)
        text = export.export_step(fam, cfg, spec, tokens, "step", **iree_compile.export_options(target))
        assert "@decode_attention" not in text, (tokens, target, dtype)


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
    attn = _constants(decode, "decode_attn_partial")
    S, KVH, G, Dh = spec.cache_shape[2], cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    assert all(c[:4] == [S, KVH, G, Dh] for c in attn)
    assert [c[4] for c in attn] == list(range(cfg.num_hidden_layers)), "each layer its own"
    assert {c[6] for c in attn} == {0, cfg.sliding_window}, "global layers pass window 0, sliding ones their window"
    # gemma3: both pre-norms fold into the kernels as 1 + w; the MLP's gate is GELU.
    flags = [c[2] for c in _constants(decode, "gemv")]
    assert flags.count(extern.NORM | extern.ONE_PLUS) == cfg.num_hidden_layers  # qkv
    assert flags.count(extern.NORM | extern.ONE_PLUS | extern.GATE | extern.GELU) == cfg.num_hidden_layers


def test_dense_decode_folds_norms_and_residuals():
    fam, cfg, spec = _spec("qwen3", "float16")
    decode = export.export_step(fam, cfg, spec, 1, "decode", **iree_compile.export_options("cuda"))
    flags = sorted(c[2] for c in _constants(decode, "gemv"))
    per_layer = sorted([extern.NORM, extern.RESIDUAL, extern.NORM | extern.GATE, extern.RESIDUAL])
    assert flags == sorted(per_layer * cfg.num_hidden_layers)


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


def test_a_placeholder_it_cannot_read_is_an_error():
    with pytest.raises(RuntimeError, match="cannot link kernel placeholder"):
        extern.link("module @m {\n  %0 = stablehlo.custom_call @iree_ext_decode_attn_partial(%a) : weird\n}")
    with pytest.raises(ValueError, match="unknown kernel"):
        extern.call("nope", None, [], grid=1, constants=[])


def test_a_c_kernel_runs_inside_a_cpu_step(tmp_path):
    """The same linking on the CPU (bench/extern_dispatch.py --target cpu: a C object in an
    llvm-cpu executable), compiled, run on local-task and compared with numpy: the path for
    hand-written CPU kernels."""
    path = Path(__file__).resolve().parents[1] / "bench" / "extern_dispatch.py"
    spec = importlib.util.spec_from_file_location("extern_dispatch", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert shutil.which(demo.CC[0]), f"{demo.CC[0]} (a C compiler) is needed to build the kernel object"
    demo.make(tmp_path, "cpu")
    assert demo.run(tmp_path, "cpu") < 1e-5
