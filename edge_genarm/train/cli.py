"""`edge-genarm train`: preference pairs in, a GGUF ARM out.

--base is a Hugging Face directory or a GGUF file; a GGUF base is dequantized into a PyTorch
checkpoint (out/base-hf) so that the ARM trains on exactly the weights llama.cpp runs, and its
own tokenizer and chat template encode the data, as they will at generation time.
Every option, the base, the data and --out are checked first (checks.py): a refused run prints
one line and leaves every file as it was, out/ included.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import click

from .base import encoder, inspect_base, torch_dir
from .checks import (check_fits_base, check_options, check_out, check_resume, output_name,
                     run_settings)
from .data import load_pairs
from .trainer import CHECKPOINT, TrainConfig, train as run_training

_D = TrainConfig()


def _options(command):
    """The training settings, each with its default from TrainConfig."""
    for decorator in reversed([
        click.option("--beta", type=float, default=_D.beta, show_default=True,
                     help="Beta of the loss -log sigmoid(beta * (log pi(chosen) - log "
                     "pi(rejected))); in (0, 1000]."),
        click.option("--lr", type=float, default=_D.lr, show_default=True,
                     help="AdamW learning rate; in (0, 1]."),
        click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]),
                     default=_D.schedule, show_default=True,
                     help="How the learning rate falls after the warm-up."),
        click.option("--warmup", type=float, default=_D.warmup, show_default=True,
                     help="Warm-up, as a fraction of the optimizer steps; in [0, 1)."),
        click.option("--epochs", type=int, default=_D.epochs, show_default=True,
                     help="Passes over the training pairs; 1 to 10000."),
        click.option("--batch-size", type=int, default=_D.batch_size, show_default=True,
                     help="Pairs per forward pass; 1 to 4096."),
        click.option("--grad-accum", type=int, default=_D.grad_accum, show_default=True,
                     help="Batches per optimizer step (the last of an epoch may have fewer); "
                     "1 to 4096."),
        click.option("--max-length", type=int, default=_D.max_length, show_default=True,
                     help="Most tokens of prompt plus response (longer responses are cut); at "
                     "least 2, at most the base's context length."),
        click.option("--seed", type=int, default=_D.seed, show_default=True,
                     help="Seeds the held-out split, the data order, the initial LoRA weights "
                     "and dropout."),
        click.option("--full", is_flag=True, help="Fine-tune every weight instead of a LoRA "
                     "(arm.gguf is then a full model)."),
        click.option("--lora-r", type=int, default=_D.lora_r, show_default=True,
                     help="LoRA rank; 1 to the base's hidden size."),
        click.option("--lora-alpha", type=float, default=_D.lora_alpha, show_default=True,
                     help="LoRA alpha (the update is scaled by alpha / r); in (0, 1000000]."),
        click.option("--lora-dropout", type=float, default=_D.lora_dropout, show_default=True,
                     help="Dropout on the LoRA's input during training; in [0, 1)."),
        click.option("--lora-targets", default=",".join(_D.lora_targets), show_default=True,
                     help="Comma-separated projections the LoRA adapts, among q_proj, k_proj, "
                     "v_proj, o_proj, gate_proj, up_proj, down_proj."),
        click.option("--length-norm", is_flag=True, help="Mean instead of sum of the "
                     "response's token log-probs."),
        click.option("--eval-fraction", type=float, default=_D.eval_fraction, show_default=True,
                     help="Fraction of the pairs held out (never trained on) for the final "
                     "preference accuracy; in [0, 1)."),
        click.option("--objective", type=click.Choice(["arm", "partial-bt", "full-bt"]),
                     default=_D.objective, show_default=True,
                     help="arm: an autoregressive reward model (GenARM, out/arm.gguf); "
                     "partial-bt: a scalar reward model trained on every prefix pair (PARGS); "
                     "full-bt: one trained on whole responses (ARGS, best-of-N); both write "
                     "out/reward.gguf, the backbone's LoRA with the reward head."),
        click.option("--save-every", type=int, default=_D.save_every, show_default=True,
                     help="Checkpoint every N optimizer steps (and at each epoch's end); at "
                     "least 1."),
    ]):
        command = decorator(command)
    return command


@click.command("train")
@click.option("--base", required=True, type=click.Path(path_type=Path), metavar="DIR|GGUF",
              help="The model the ARM starts from: a Hugging Face directory or a GGUF file.")
@click.option("--data", required=True, type=click.Path(path_type=Path), metavar="PREFS.jsonl",
              help='JSONL lines {"prompt", "chosen", "rejected"}.')
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Checkpoints, the trained adapter and arm.gguf go here (created with its "
              "parents if missing).")
@_options
@click.option("--resume", is_flag=True, help="Continue the unfinished run in --out from its "
              "checkpoint (the same settings are required).")
@click.option("--force", is_flag=True, help="Start over in an --out that holds a finished or "
              "unfinished run (its checkpoint and arm.gguf are deleted).")
def train(base, data, out, resume, force, lora_targets, **kw):
    """Train an ARM (or a scalar reward model) on preference pairs and write it as a GGUF
    (out/arm.gguf, or out/reward.gguf)."""
    if resume and force:
        raise click.UsageError("--resume continues a run and --force starts over; pass one of "
                               "them", click.get_current_context())
    targets = tuple(dict.fromkeys(t.strip() for t in lora_targets.split(",") if t.strip()))
    config = TrainConfig(lora_targets=targets, **kw)
    check_options(config, _given())
    info = inspect_base(base)
    check_fits_base(config, info)
    check_out(out, resume, force, output_name(config))
    pairs, skipped = load_pairs(data, encoder(info), config.max_length)
    settings = run_settings(config, base, data)
    if resume:
        check_resume(out, settings)
    # Every check passed: from here on files change.
    out.mkdir(parents=True, exist_ok=True)
    if force:
        _clear(out)
    for s in skipped:
        click.echo(f"skipped {data}:{s.line}: {s.reason}", err=True)
    click.echo(f"{len(pairs)} pairs ({len(skipped)} lines skipped)", err=True)
    base_dir = torch_dir(info, out)
    with click.progressbar(length=1, label="training", file=sys.stderr,
                           item_show_func=lambda s: s) as bar:
        def on_step(step, total, loss, acc):
            bar.length = total
            bar.update(1, f"step {step}/{total} loss {loss:.3f} acc {acc:.2f}")
        model, result = run_training(base_dir, pairs, config, out, 0, resume, on_step, settings)
    if result.eval_accuracy is not None:
        click.echo(f"held-out preference accuracy {result.eval_accuracy:.3f} on "
                   f"{result.eval_pairs} pairs; {result.steps} steps in {result.seconds:.0f} s",
                   err=True)
    _write_arm(model, base, base_dir, out, config)


def _given() -> set[str]:
    """The options given on the command line (not defaults)."""
    ctx = click.get_current_context()
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


def _clear(out: Path) -> None:
    """What an earlier run left that a new one must not mix with (base-hf is keyed, kept)."""
    for name in ("arm.gguf", "reward.gguf"):
        (out / name).unlink(missing_ok=True)
    for name in (CHECKPOINT, "adapter", "model"):
        shutil.rmtree(out / name, ignore_errors=True)


def _write_arm(model, base: Path, base_dir: Path, out: Path, config: TrainConfig,
               target: str = "arm.gguf") -> None:
    from edge_genarm.convert.cli import convert

    if config.objective != "arm":
        return _write_reward(model, base, base_dir, out, config)
    if config.full:
        saved = out / "model"
        model.save_pretrained(saved)
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            if (base_dir / name).exists():
                shutil.copy(base_dir / name, saved / name)
        convert.callback(source=saved, out=out / target, outtype="f16", quant=None,
                         base=None, merge=False, base_model=None,
                         tokenizer_from=None if base.is_dir() else base, verify=False)
    else:
        saved = out / "adapter"
        model.save_pretrained(saved)
        convert.callback(source=saved, out=out / target, outtype="f32", quant=None,
                         base=base, merge=False, base_model=None, tokenizer_from=None,
                         verify=False)


def _write_reward(net, base: Path, base_dir: Path, out: Path, config: TrainConfig) -> None:
    """The backbone written as an ARM would be (a LoRA GGUF, or a full model with --full), then
    copied with the head into out/reward.gguf; the head-less file does not stay."""
    from edge_genarm.convert.gguf_out import with_reward_head

    backbone = out / "backbone.gguf"
    backbone.unlink(missing_ok=True)  # what a run killed while writing left
    _write_arm(net.lm, base, base_dir, out, replace(config, objective="arm"), backbone.name)
    weight = net.head.weight.detach().float().numpy().ravel()
    try:
        with_reward_head(backbone, out / "reward.gguf", weight, float(net.head.bias.detach()),
                         config.objective)
    finally:
        backbone.unlink()
