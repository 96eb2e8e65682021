"""`edge-genarm convert` and `python -m edge_genarm.convert`: trained ARM checkpoints to GGUF.

SOURCE is a Hugging Face model directory (-> a full GGUF model) or a PEFT LoRA adapter
directory (-> a GGUF LoRA adapter, or with --merge a full model). Every argument is checked first
(checks.py), so a refused command changes no file; an existing --out is replaced only with
--force. Everything is written to a hidden file beside --out, quantized and verified there, and
renamed to --out only at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edge_genarm.errors import ConversionError
from edge_genarm.files import publishable, staged

from . import tokenizer as tok
from .checkpoint import Checkpoint
from .checks import check_options, check_out, source_kind, staging_file
from .gguf_out import QTYPES, write_gguf, write_lora_adapter
from .lora import Adapter, BaseInfo, base_info_from_dir, base_info_from_gguf
from .model import plan_model, read_config


@click.command("convert")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="FILE.gguf",
              help="The GGUF to write; its folder must exist.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (it is only replaced "
              "once the new file is complete).")
@click.option("--outtype", type=click.Choice(sorted(QTYPES)), default=None,
              help="Storage type: f16 for models, f32 for adapters by default.")
@click.option("--quantize", "quant", metavar="TYPE", help="Quantize the model with llama.cpp "
              "(Q4_K_M, Q5_K_M, Q8_0, ...); full models and --merge only.")
@click.option("--base", type=click.Path(path_type=Path), metavar="GGUF|DIR",
              help="The base an adapter belongs to: its GGUF or Hugging Face directory.")
@click.option("--merge", is_flag=True, help="Merge a LoRA adapter into --base-model and write a "
              "full model.")
@click.option("--base-model", type=click.Path(path_type=Path), metavar="DIR",
              help="The base's Hugging Face directory (for --merge, and to --verify an adapter).")
@click.option("--tokenizer-from", type=click.Path(path_type=Path), metavar="BASE.gguf",
              help="Take the tokenizer from the base GGUF (checked against the checkpoint's); "
              "full models and --merge only.")
@click.option("--verify", is_flag=True, help="Compare with PyTorch on probe prompts and fail "
              "beyond the output type's tolerance.")
def convert(source, out, outtype, quant, base, merge, base_model, tokenizer_from, verify,
            force=False):
    """Convert SOURCE (a Hugging Face model or PEFT LoRA directory) to a GGUF at --out."""
    kind = source_kind(source)
    check_options(source, kind, outtype, quant, base, merge, base_model, tokenizer_from)
    check_out(out, force, {"--base": base, "--tokenizer-from": tokenizer_from})
    # Every check passed: from here on the only file touched is the staging one, until the end.
    staging = staging_file(out)
    try:
        if kind == "adapter" and not merge:
            report = _adapter(source, staging, outtype or "f32", base, base_model, verify)
        else:
            report = _model(source, staging, outtype or "f16", quant, base_model, tokenizer_from,
                            verify, merge)
        publishable(staging)
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    if report is not None:
        click.echo(report.line(), err=True)
    size = out.stat().st_size
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
    click.echo(f"wrote {out} ({shown})", err=True)


def _model(source, staging, outtype, quant, base_model, tokenizer_from, verify, merge):
    adapter = Adapter(source) if merge else None
    model_dir = source
    if merge:
        model_dir = base_model or adapter.base_hint()
        if model_dir is None:
            raise ConversionError("--merge needs the base's Hugging Face directory: pass "
                                  "--base-model DIR")
    read_config(model_dir)  # before the tokenizer, whose loader reads config.json too
    ckpt = Checkpoint(model_dir)
    tokenizer = _tokenizer(model_dir, tokenizer_from)
    hook = None
    if adapter is not None:
        adapter.check_fits(lambda w: ckpt.shape(w) if w in ckpt else None, str(model_dir))
        hook = adapter.merge_hook()
    plan = plan_model(ckpt, tokenizer, outtype, source.name, hook)
    write_gguf(staging, plan.arch.name, plan.add_metadata, plan.tensors, _progress(), staged=True)
    if quant:
        from edge_genarm.llama import quantize_model

        with staged(staging) as quantized:
            quantize_model(staging, quantized, quant)
    if not verify:
        return None
    from .verify import TOLERANCE, verify as run_verify

    report = run_verify(staging, model_dir, adapter)
    _check(report, TOLERANCE.get(outtype) if not quant else None, quant or outtype)
    return report


def _adapter(source, staging, outtype, base, base_model, verify):
    adapter = Adapter(source)
    base = base or adapter.base_hint() or base_model
    if base is None:
        raise ConversionError(f"{source}: name the base it belongs to with --base BASE.gguf or "
                              "--base DIR (its base_model_name_or_path is not a local directory)")
    torch_dir = base_model or (base if base.is_dir() else adapter.base_hint())
    if verify and torch_dir is None:
        raise ConversionError("--verify of an adapter needs the base's Hugging Face directory: "
                              "pass --base-model DIR")
    info: BaseInfo = base_info_from_dir(base) if base.is_dir() else base_info_from_gguf(base)
    adapter.check_fits(info.shape, str(base))
    write_lora_adapter(staging, info.arch.name, adapter.gguf_alpha(), adapter.gguf_pairs(info),
                       outtype, source.name, _progress(), staged=True)
    if not verify:
        return None
    from .verify import TOLERANCE, verify as run_verify

    base_gguf = base if not base.is_dir() else _base_gguf(torch_dir, staging)
    try:
        report = run_verify(staging, torch_dir, adapter, base_gguf=base_gguf)
    finally:
        if base_gguf != base:
            base_gguf.unlink(missing_ok=True)
    _check(report, TOLERANCE.get(outtype), outtype)
    return report


def _base_gguf(model_dir: Path, beside: Path) -> Path:
    """An F32 GGUF of the base, for running an adapter in llama.cpp during --verify."""
    path = beside.with_name(beside.name + ".base")
    plan = plan_model(Checkpoint(model_dir), _tokenizer(model_dir, None), "f32", model_dir.name)
    return write_gguf(path, plan.arch.name, plan.add_metadata, plan.tensors)


def _tokenizer(model_dir: Path, tokenizer_from: Path | None):
    own = tok.from_checkpoint(model_dir)
    given = tok.from_gguf(tokenizer_from) if tokenizer_from else None
    if own is not None and given is not None:
        tok.check_agree(given, own)
    if own is None and given is None:
        raise ConversionError(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); "
                              "pass --tokenizer-from BASE.gguf")
    return given or own


def _check(report, tolerance, kind) -> None:
    from .verify import MIN_TOP1

    if tolerance is None:
        return
    if report.likely_abs_diff > tolerance or report.top1_agreement < MIN_TOP1:
        raise ConversionError(f"{report.line()}: beyond the {kind} tolerance ({tolerance} for "
                              f"likely tokens, top-1 {100 * MIN_TOP1:.0f}%); the output was not "
                              "written")


def _progress():
    bar = {}

    def update(i: int, n: int, name: str) -> None:
        if "bar" not in bar:
            bar["bar"] = click.progressbar(length=n, label="writing tensors", file=sys.stderr)
            bar["bar"].__enter__()
        bar["bar"].update(1)
        if i == n:
            bar["bar"].__exit__(None, None, None)
    return update


def main() -> None:
    from edge_genarm.cli import run_command

    run_command(convert, prog_name="python -m edge_genarm.convert")
