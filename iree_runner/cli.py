"""`iree-generate`: generate text (the default command), or `iree-generate compile` a bundle.

The CLI only parses options and prints the stream; errors the user can fix are one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .sampling import SamplingParams

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, RuntimeError, FloatingPointError)


class DefaultGroup(click.Group):
    """`iree-generate --model ...` runs `generate`; `iree-generate compile ...` the subcommand."""

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["generate", *args]
        return super().parse_args(ctx, args)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="iree-runner")
def main():
    """Run LLMs compiled ahead of time by IREE. `iree-generate --model DIR --prompt TEXT`."""


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (config.json, safetensors, tokenizer). Default: the embedded model.")
@click.option("--prompt", default="The function", show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="A bundle from `iree-generate compile`; without it the model is compiled for the CPU (cached).")
@click.option("--max-context", type=int, default=None, help="Context to compile for (prompt + generation).")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Apply the model's chat template when it has one.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--packed/--no-packed", default=None, help="Without --bundle: as `compile --packed/--no-packed`.")
def generate(model_dir, prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
             stop_strings, device, bundle, max_context, chat, fmt, packed):
    """Generate from a prompt (the default command)."""
    from .generate import DEFAULT_MODEL, load_model, stream_generate

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    try:
        params.validate()
        if max_tokens < 1:
            raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
        model = load_model(model_dir or DEFAULT_MODEL, device=device, bundle=bundle, max_context=max_context,
                           packed=packed)
        prompt_ids = model.tokenizer.encode_prompt(prompt, chat=chat)
        text_parts = []
        for r in stream_generate(model, prompt_ids, params, max_tokens, tuple(stop_strings)):
            text_parts.append(r.text)
            if fmt == "text" and r.text:
                click.echo(r.text, nl=False)
    except USER_ERRORS as e:
        _fail(str(e))
    if fmt == "text":
        click.echo()
        click.echo(r.stats.line(), err=True)
    else:
        click.echo(json.dumps({"prompt_tokens": prompt_ids, "tokens": r.tokens, "text": "".join(text_parts),
                               "finish_reason": r.finish_reason, "stats": vars(r.stats)}))


@main.command("compile")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory. Default: the embedded model.")
@click.option("--target", default="cpu", show_default=True, help="Comma-separated: cpu, cuda.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--max-context", type=int, default=None, help="Longest prompt + generation (default 512).")
@click.option("--prefill-chunk", type=int, default=None, help="Prompt tokens per prefill call (default 128 for a cuda-only bundle, else 32).")
@click.option("--long-prefill-chunk", "prefill_long", type=int, default=None,
              help="Prompt tokens per call of a second prefill step, run while more than half that many prompt "
                   "tokens remain; 0 for none (default 512 for a cuda-only bundle with f16 weights, else none).")
@click.option("--weight-dtype", type=click.Choice(["f16", "f32"]), default=None,
              help="Weights on the device. Default: f32 for cpu, f16 for cuda (f32 there matches an fp32 oracle).")
@click.option("--no-kernels", is_flag=True,
              help="Build the one-token step from IREE's codegen alone, without the hand-written kernels "
                   "(to compare or to debug).")
@click.option("--packed/--no-packed", default=None,
              help="Keep the checkpoint's 4- and 8-bit weights packed on the device (read by the kernels, "
                   "dequantized inside the step elsewhere) instead of dequantizing them when loaded; or none. "
                   "Default: the 4-bit ones (the one-token kernels read them), on cpu and cuda.")
def compile_cmd(model_dir, target, out, max_context, prefill_chunk, prefill_long, weight_dtype, no_kernels, packed):
    """Compile a model ahead of time into a bundle that the runtime alone can run."""
    try:
        from .compile import build
    except ImportError as e:
        _fail(f"compiling needs the compile extra (pip install 'iree-runner[compile]'): {e}")
    from .generate import DEFAULT_MODEL

    targets = [t.strip() for t in target.split(",") if t.strip()]
    try:
        manifest = build.compile_bundle(model_dir or DEFAULT_MODEL, targets, out,
                                        max_context=max_context or build.DEFAULT_MAX_CONTEXT,
                                        prefill_chunk=prefill_chunk, prefill_long=prefill_long,
                                        weight_dtype=weight_dtype, kernels=not no_kernels, packed=packed)
    except USER_ERRORS as e:
        _fail(str(e))
    click.echo(f"wrote {out} ({manifest.model_type}; targets: {', '.join(manifest.targets)})", err=True)


if __name__ == "__main__":
    main()
