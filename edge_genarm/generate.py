"""`edge-genarm generate`: one prompt in, the guided answer out (streamed, or one JSON line).

With --compare the unguided base answer is printed first, then the guided one, with the same
seed, so that the effect of the ARMs can be read side by side.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
from pathlib import Path

import click

from . import llama
from .batch import run_job
from .cluster import ClusterSpec, require_ray
from .errors import UserError
from .generation import Result
from .model import Model
from .options import from_click, generation_options


@click.command()
@generation_options
@click.option("--compare", is_flag=True, help="Print the unguided base answer, then the guided "
              "one (same seed).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on one line and "
              "nothing else on stdout.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), default=None,
              metavar="PROMPTS", help="Batch mode: a JSONL file ({\"prompt\"} or "
              "{\"messages\"}, optional \"id\") or a text file of one prompt per line.")
@click.option("--output", type=click.Path(path_type=Path), default=None, metavar="OUT.jsonl",
              help="Batch mode: where each finished record is appended (never overwritten).")
@click.option("--n-parallel", "-np", type=int, default=4, show_default=True,
              envvar="EDGE_GENARM_N_PARALLEL", help="Batch mode: sequences decoded together "
              "[env EDGE_GENARM_N_PARALLEL].")
@click.option("--resume", is_flag=True, help="Batch mode: continue an --output, skipping the "
              "ids it holds.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None,
              metavar="[ADDRESS]", help="Batch mode: spread the lines over Ray actors on the "
              "cluster at ADDRESS (none: RAY_ADDRESS, one on this machine, or a new local "
              "one); needs `pip install 'edge-genarm[cluster]'`.")
@click.option("--workers", type=int, default=None, help="Batch mode with --ray: Ray actors, "
              "each loading the models once with --n-parallel sequences and --threads threads "
              "[default: one per node].")
@click.argument("prompt", required=False)
def generate(prompt: str | None, compare: bool, as_json: bool, input_path: Path | None,
             output: Path | None, n_parallel: int, resume: bool, ray_address: str | None,
             workers: int | None, **kwargs) -> None:
    """Generate an answer to PROMPT (- reads it from stdin), guided by the --arm models; or, with
    --input and --output, answer a whole file of prompts."""
    batch = input_path is not None or output is not None
    if batch and (input_path is None or output is None):
        raise click.UsageError("batch mode needs both --input and --output")
    if batch and (prompt is not None or compare or as_json):
        raise click.UsageError("--input takes the prompts from a file: drop PROMPT, --compare "
                               "and --json")
    if not batch and prompt is None:
        raise click.UsageError("give a PROMPT (- reads stdin), or --input and --output")
    if not batch and resume:
        raise click.UsageError("--resume continues a batch run: add --input and --output")
    if (ray_address is not None or workers is not None) and not batch:
        raise UserError("--ray and --workers run a batch: add --input and --output")
    if workers is not None and ray_address is None:
        raise UserError("--workers spreads a batch over Ray actors: add --ray [ADDRESS]")
    if ray_address is not None:
        require_ray()
    # one answer at a time; --compare's two each decode their prompt whole, as alone
    config = from_click(kwargs, parallel=("--n-parallel", n_parallel if batch else 1))
    llama.set_verbose(config.load.verbose)
    if batch:
        cluster = None
        if ray_address is not None:
            cluster = ClusterSpec(ray_address or None, workers, config)
            if workers is not None:
                cluster.check()
        return run_job(config, input_path, output, resume, cluster)
    if prompt == "-":
        # bytes that are not UTF-8 are kept for the tokenizer, which refuses them in one line
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt  # `echo ... |` adds one
    if config.request.seed is None:  # one seed for both of --compare's answers
        config = dataclasses.replace(config, request=dataclasses.replace(
            config.request, seed=secrets.randbelow(2**31)))
    with Model(config, share_prefixes=not compare) as model:
        if compare:
            base = _run(model, prompt, as_json, "base (unguided)",
                        arms={name: 0.0 for name in model.arms}, method="genarm")
            guided = _run(model, prompt, as_json, f"guided ({_describe(model)})")
            if as_json:
                _print_json({"base": base.to_dict(), "guided": guided.to_dict()})
        else:
            result = _run(model, prompt, as_json, None)
            if as_json:
                _print_json(result.to_dict())


def _run(model: Model, prompt: str, as_json: bool, heading: str | None, **options) -> Result:
    """One answer through the Python API, streamed to stdout unless --json."""
    if heading and not as_json:
        click.echo(f"--- {heading} ---")
    for chunk in model.stream(prompt, **options):
        if not as_json:
            _stream_out(chunk.text)
        if chunk.result is not None:
            result = chunk.result
    if not as_json:
        click.echo("")
    if result.finish_reason == "context_full":
        click.echo(f"warning: the context of {model.engine.n_ctx} tokens is full, the "
                   "answer stops here; raise --ctx-size for longer answers", err=True)
    return result


def _stream_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _describe(model: Model) -> str:
    request = model.config.request  # the settings every answer of this command gets
    if request.method != "genarm":
        return (f"{request.method}: reward model x {request.reward_weight:g} over the top "
                f"{request.candidates or model.config.load.candidates}")
    arms = ", ".join(f"{name} x {alpha:g}" for name, alpha in model.arms.items())
    return arms or "no ARM"


def _print_json(data: dict) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))
