"""`iree-generate`: the contract scripts rely on, and one clear line for every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from checkpoints import mlx_checkpoint
from oracle import greedy, hf_model
from iree_runner.cli import main

MAX_CONTEXT = ["--max-context", "128"]


@pytest.fixture(scope="module")
def ckpt():
    return mlx_checkpoint("llama", "bfloat16", "q4", keys="v4")


def run(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result


def test_json_contract_and_oracle_tokens(ckpt):
    r = run("--model", ckpt, "--prompt", "The quick brown fox", "--max-tokens", 12, "--no-chat",
            "--format", "json", *MAX_CONTEXT)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"prompt_tokens", "tokens", "text", "finish_reason", "stats"}
    want, _ = greedy(hf_model(ckpt), out["prompt_tokens"], 12)
    # generated ids only; stops early only on EOS, which the oracle must then also produce
    assert out["tokens"] == want[:len(out["tokens"])]
    assert out["finish_reason"] == ("length" if len(out["tokens"]) == 12 else "stop")
    for key in ("prompt_tps", "decode_tps", "ttft_s", "peak_memory_mb"):
        assert out["stats"][key] > 0


def test_text_mode_streams_then_stats(ckpt):
    r = run("--model", ckpt, "--prompt", "def main():", "--max-tokens", 8, "--no-chat", *MAX_CONTEXT)
    assert r.exit_code == 0, r.output
    j = json.loads(run("--model", ckpt, "--prompt", "def main():", "--max-tokens", 8, "--no-chat",
                       "--format", "json", *MAX_CONTEXT).stdout)
    assert r.stdout == j["text"] + "\n"
    assert "tok/s" in r.stderr and "ttft" in r.stderr and "peak memory" in r.stderr


def test_seed_reproducible(ckpt):
    args = ("--model", ckpt, "--prompt", "hello", "--max-tokens", 10, "--no-chat", "--format", "json",
            "--temperature", "1.0", "--top-k", "50", *MAX_CONTEXT)
    a = json.loads(run(*args, "--seed", 7).stdout)["tokens"]
    b = json.loads(run(*args, "--seed", 7).stdout)["tokens"]
    c = json.loads(run(*args, "--seed", 8).stdout)["tokens"]
    assert a == b and a != c


def test_stop_string(ckpt):
    full = json.loads(run("--model", ckpt, "--prompt", "def main():", "--max-tokens", 16, "--no-chat",
                          "--format", "json", *MAX_CONTEXT).stdout)["text"]
    assert len(full) > 6
    stop = full[3:6]
    cut = json.loads(run("--model", ckpt, "--prompt", "def main():", "--max-tokens", 16, "--no-chat",
                         "--format", "json", "--stop", stop, *MAX_CONTEXT).stdout)
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"


def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_dir(tmp_path):
    _one_line_error(run("--model", tmp_path / "nope", "--prompt", "x"), "nope", "does not exist")


def test_unknown_model_type(ckpt, tmp_path):
    bad = tmp_path / "gpt2ish"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    _one_line_error(run("--model", bad, "--prompt", "x"), "gpt2", "llama", "qwen3_moe", "stablelm")


def test_unreadable_config(ckpt, tmp_path):
    bad = tmp_path / "broken"
    shutil.copytree(ckpt, bad)
    (bad / "config.json").write_text("{not json")
    _one_line_error(run("--model", bad, "--prompt", "x"), "config.json")


def test_prompt_longer_than_context(ckpt):
    _one_line_error(run("--model", ckpt, "--prompt", "word " * 400, "--no-chat", *MAX_CONTEXT),
                    "does not fit", "128")


def test_cuda_without_gpu(ckpt):
    _one_line_error(run("--model", ckpt, "--prompt", "x", "--device", "cuda"), "cuda")


@pytest.mark.parametrize("option,value,needle", [
    ("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"),
    ("--min-p", "1", "min_p"), ("--top-k", "-3", "top_k"), ("--repetition-penalty", "0", "repetition_penalty"),
    ("--max-tokens", "0", "max-tokens"),
])
def test_invalid_sampling_values(ckpt, option, value, needle):
    _one_line_error(run("--model", ckpt, "--prompt", "x", option, value), needle)


def test_entry_point_installed(ckpt):
    """The console script itself, as users call it: exit code and no traceback."""
    exe = shutil.which("iree-generate", path=str(__import__("pathlib").Path(sys.executable).parent))
    p = subprocess.run([exe, "--model", "/nonexistent", "--prompt", "x"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error: ")


def test_compile_without_the_hand_written_kernels(ckpt, tmp_path, monkeypatch):
    """`compile --no-kernels`: a CUDA bundle from IREE's codegen alone, cached under its own key."""
    monkeypatch.setenv("IREE_RUNNER_CACHE", str(tmp_path / "cache"))
    keys = {}
    for name, extra in (("kernels", []), ("no-kernels", ["--no-kernels"])):
        r = run("compile", "--model", ckpt, "--target", "cuda", "--out", tmp_path / name, *MAX_CONTEXT, *extra)
        assert r.exit_code == 0, r.output
        keys[name] = json.loads((tmp_path / name / "manifest.json").read_text())["targets"]["cuda"]["key"]
    assert keys["kernels"] != keys["no-kernels"]
