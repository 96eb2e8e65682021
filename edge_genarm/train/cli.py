"""`edge-genarm train`: preference pairs in, a GGUF ARM out.

--base is a Hugging Face directory or a GGUF file; a GGUF base is dequantized into a PyTorch
checkpoint (out/base-hf) so that the ARM trains on exactly the weights llama.cpp runs, and its
own tokenizer and chat template encode the data, as they will at generation time.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from ..errors import UserError
from .data import Encoder, load_pairs
from .trainer import TrainConfig, train as run_training

_D = TrainConfig()


@click.command("train")
@click.option("--base", required=True, type=click.Path(path_type=Path), metavar="DIR|GGUF",
              help="The model the ARM starts from: a Hugging Face directory or a GGUF file.")
@click.option("--data", required=True, type=click.Path(path_type=Path), metavar="PREFS.jsonl",
              help='JSONL lines {"prompt", "chosen", "rejected"}.')
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Checkpoints, the trained adapter and arm.gguf go here.")
@click.option("--beta", type=float, default=_D.beta, show_default=True)
@click.option("--lr", type=float, default=_D.lr, show_default=True, help="Learning rate.")
@click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]),
              default=_D.schedule, show_default=True)
@click.option("--warmup", type=float, default=_D.warmup, show_default=True,
              help="Warm-up, as a fraction of the steps.")
@click.option("--epochs", type=int, default=_D.epochs, show_default=True)
@click.option("--batch-size", type=int, default=_D.batch_size, show_default=True)
@click.option("--grad-accum", type=int, default=_D.grad_accum, show_default=True)
@click.option("--max-length", type=int, default=_D.max_length, show_default=True)
@click.option("--seed", type=int, default=_D.seed, show_default=True)
@click.option("--full", is_flag=True, help="Fine-tune every weight instead of a LoRA.")
@click.option("--lora-r", type=int, default=_D.lora_r, show_default=True)
@click.option("--lora-alpha", type=float, default=_D.lora_alpha, show_default=True)
@click.option("--lora-dropout", type=float, default=_D.lora_dropout, show_default=True)
@click.option("--lora-targets", default=",".join(_D.lora_targets), show_default=True)
@click.option("--length-norm", is_flag=True, help="Mean instead of sum of token log-probs.")
@click.option("--eval-fraction", type=float, default=_D.eval_fraction, show_default=True)
@click.option("--save-every", type=int, default=_D.save_every, show_default=True,
              help="Checkpoint every N optimizer steps (and at each epoch's end).")
@click.option("--resume", is_flag=True, help="Continue from out/checkpoint.")
def train(base, data, out, resume, lora_targets, **kw):
    """Train an ARM on preference pairs and write it as a GGUF (out/arm.gguf)."""
    config = TrainConfig(lora_targets=tuple(t for t in lora_targets.split(",") if t), **kw)
    if not base.exists():
        raise UserError(f"{base} does not exist; pass a Hugging Face directory or a GGUF file")
    out.mkdir(parents=True, exist_ok=True)
    base_dir, encoder, pad_id = _prepare_base(base, out)
    pairs, skipped = load_pairs(data, encoder, config.max_length)
    for s in skipped:
        click.echo(f"skipped {data}:{s.line}: {s.reason}", err=True)
    click.echo(f"{len(pairs)} pairs ({len(skipped)} lines skipped)", err=True)
    with click.progressbar(length=1, label="training", file=sys.stderr,
                           item_show_func=lambda s: s) as bar:
        def on_step(step, total, loss, acc):
            bar.length = total
            bar.update(1, f"step {step}/{total} loss {loss:.3f} acc {acc:.2f}")
        model, result = run_training(base_dir, pairs, config, out, pad_id, resume, on_step)
    if result.eval_accuracy is not None:
        click.echo(f"held-out preference accuracy {result.eval_accuracy:.3f} on "
                   f"{result.eval_pairs} pairs; {result.steps} steps in {result.seconds:.0f} s",
                   err=True)
    _write_arm(model, base, base_dir, out, config)


def _prepare_base(base: Path, out: Path):
    """(Hugging Face directory, encoder, pad id) for a GGUF or a Hugging Face base."""
    if base.is_dir():
        return base, _hf_encoder(base), 0
    from convert.from_gguf import gguf_to_hf

    hf_dir = out / "base-hf"
    if not (hf_dir / "model.safetensors").exists():
        gguf_to_hf(base, hf_dir)
    return hf_dir, _gguf_encoder(base), 0


def _gguf_encoder(path: Path) -> Encoder:
    from ..llama import Model
    from ..templates import build_messages, render_chat

    model = Model(path, vocab_only=True)
    template = model.meta("tokenizer.chat_template")
    eos = model.special_token("eos")
    end = model.special_token("eot") if model.special_token("eot") >= 0 else eos
    bos_text = model.token_text(model.special_token("bos")) if model.special_token("bos") >= 0 else ""

    def prompt(text: str) -> list[int]:
        if template is None:
            return model.tokenize(text, add_special=True)
        rendered = render_chat(template, build_messages(text, None), bos_text,
                               model.token_text(eos))
        return model.tokenize(rendered, add_special=False)

    return Encoder(prompt, lambda text: model.tokenize(text, False, False) + [end])


def _hf_encoder(path: Path) -> Encoder:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    end = tok.eos_token_id

    def prompt(text: str) -> list[int]:
        if tok.chat_template:
            rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=False)
            return tok(rendered, add_special_tokens=False)["input_ids"]
        return tok(text)["input_ids"]

    return Encoder(prompt, lambda text: tok(text, add_special_tokens=False)["input_ids"] + [end])


def _write_arm(model, base: Path, base_dir: Path, out: Path, config: TrainConfig) -> None:
    from convert.cli import convert

    if config.full:
        saved = out / "model"
        model.save_pretrained(saved)
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            if (base_dir / name).exists():
                shutil.copy(base_dir / name, saved / name)
        convert.callback(source=saved, out=out / "arm.gguf", outtype="f16", quant=None,
                         base=None, merge=False, base_model=None,
                         tokenizer_from=None if base.is_dir() else base, verify=False)
    else:
        saved = out / "adapter"
        model.save_pretrained(saved)
        convert.callback(source=saved, out=out / "arm.gguf", outtype="f32", quant=None,
                         base=base, merge=False, base_model=None, tokenizer_from=None,
                         verify=False)
