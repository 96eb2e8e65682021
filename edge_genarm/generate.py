"""`edge-genarm generate`: one prompt in, the guided answer out (streamed, or one JSON line).

With --compare the unguided base answer is printed first, then the guided one, with the same
seed, so that the effect of the ARMs can be read side by side.
"""

from __future__ import annotations

import json
import sys

import click

from . import llama
from .engine import Engine
from .generation import Result, encode_prompt, generate as run_generation
from .options import GenerationOptions, generation_options


@click.command()
@generation_options
@click.option("--compare", is_flag=True, help="Print the unguided base answer, then the guided "
              "one (same seed).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on one line and "
              "nothing else on stdout.")
@click.argument("prompt")
def generate(prompt: str, compare: bool, as_json: bool, **kwargs) -> None:
    """Generate an answer to PROMPT (- reads it from stdin), guided by the --arm models."""
    opts = GenerationOptions.from_kwargs(kwargs)
    if prompt == "-":
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt  # `echo ... |` adds one
    llama.set_verbose(opts.verbose)
    with Engine.load(opts.engine_config()) as engine:
        prompt_ids = encode_prompt(engine, prompt, opts.system, opts.raw, opts.chat_template)
        if compare:
            with engine.alphas_zeroed():
                base = _run(engine, prompt_ids, opts, as_json, "base (unguided)")
            guided = _run(engine, prompt_ids, opts, as_json, f"guided ({_describe(engine)})")
            if as_json:
                _print_json({"base": base.to_dict(), "guided": guided.to_dict()})
        else:
            result = _run(engine, prompt_ids, opts, as_json, None)
            if as_json:
                _print_json(result.to_dict())


def _run(engine: Engine, prompt_ids: list[int], opts: GenerationOptions, as_json: bool,
         heading: str | None) -> Result:
    if heading and not as_json:
        click.echo(f"--- {heading} ---")
    on_text = None if as_json else _stream_out
    result = run_generation(engine, prompt_ids, opts.request(), on_text=on_text)
    if not as_json:
        click.echo("")
    if result.finish_reason == "context_full":
        click.echo(f"warning: the context of {engine.n_ctx} tokens is full, the answer stops "
                   "here; raise --ctx-size for longer answers", err=True)
    return result


def _stream_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _describe(engine: Engine) -> str:
    arms = ", ".join(f"{a.name} x {a.alpha:g}" for a in engine.arms)
    return arms or "no ARM"


def _print_json(data: dict) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))
