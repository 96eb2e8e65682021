"""`edge-genarm models list|show|pull`: the presets and model files of models.toml.

list: every preset and model, where it comes from, whether it is here and its size.
show NAME: a preset's (or model's) resolved files, architecture, vocabulary, quantization,
parameters, chat template and alphas, read from the GGUF headers.
pull NAME: fetch every Hub file of a preset (or one model) into the Hugging Face cache.
"""

from __future__ import annotations

import click

from . import fields
from .config import LoadConfig
from .errors import UserError
from .options import click_option
from .registry import ModelEntry, Registry, hub_file

# the same options as the generating commands', generated from their one declaration
repack_option = click_option(fields.spec_map(LoadConfig)["repack"])
_registry_option = click_option(fields.spec_map(LoadConfig)["models_file"])


@click.group("models")
def models() -> None:
    """Presets and model files (models.toml)."""


def _size(path) -> str:
    size = path.stat().st_size
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _source(entry: ModelEntry) -> str:
    if entry.kind == "path":
        return f"path {entry.path}"
    if entry.kind == "package":
        return f"package {entry.package}/{entry.file}"
    if entry.kind == "derived":
        return f"{entry.source} as {entry.quantize.upper()} (made once, cached)"
    if entry.kind == "parts":
        return (f"{len(entry.parts)} package files joined (once, cached): "
                f"{entry.parts[0].partition(':')[0]} .. {entry.parts[-1].partition(':')[0]}")
    return f"hub {entry.hub}/{entry.file}@{entry.revision}"


def _status(registry: Registry, ref: str) -> str:
    path = registry.local_path(ref)
    return f"present, {_size(path)}" if path else "missing"


@models.command("list")
@_registry_option
def list_(models_file) -> None:
    """Every preset and model file, and whether each file is here."""
    reg = Registry.load(models_file)
    click.echo("presets:")
    for name, p in sorted(reg.presets.items()):
        arms = ", ".join(f"{a.name}={a.alpha:g} ({a.model})" for a in p.arms) or "no ARM"
        click.echo(f"  {name}: base {p.base} [{_status(reg, p.base)}]; {arms}")
    click.echo("models:")
    for name, entry in sorted(reg.models.items()):
        click.echo(f"  @{name}: {_source(entry)} [{_status(reg, '@' + name)}]")


@models.command("show")
@_registry_option
@repack_option
@click.argument("name")
def show(models_file, repack, name) -> None:
    """What a preset (or @model) resolves to, read from the GGUF files, and where llama.cpp puts
    its weights (the buffer types, as --repack chooses them)."""
    reg = Registry.load(models_file)
    if name.startswith("@"):
        refs = [("model", name, None)]
    else:
        preset = reg.preset(name)
        click.echo(f"preset {name}: {preset.description}")
        defaults = preset.sampling | preset.request | {
            k: v for k, v in (("reward_model", preset.reward_model),
                              ("draft_model", preset.draft_model)) if v}
        if defaults:  # the options a user's own flags override
            click.echo("defaults: " + ", ".join(f"{k} {v!r}" for k, v in defaults.items()))
        refs = [("base", preset.base, None)] + [(f"arm {a.name}", a.model, a.alpha)
                                                for a in preset.arms]
    for role, ref, alpha in refs:
        path = reg.local_path(ref)
        head = f"{role}: {ref}" + (f" (alpha {alpha:g})" if alpha is not None else "")
        if path is None:
            entry = reg.entry(ref)
            todo = (f"edge-genarm models pull {ref}" if entry is not None and entry.kind == "hub"
                    else f"create it: {entry.description if entry else ref}")
            click.echo(f"{head}\n  missing; {todo}")
            continue
        click.echo(f"{head}\n  file: {path} ({_size(path)})")
        for line in _describe(path, repack):
            click.echo(f"  {line}")


def _describe(path, repack: str) -> list[str]:
    from .gguf_file import inspect_gguf
    from .llama import Model

    info = inspect_gguf(path)
    if info.is_adapter:
        rank = next((s[1] for n, s in info.shapes.items() if n.endswith(".lora_a")), "?")
        return [f"LoRA adapter for {info.architecture}, rank {rank}, "
                f"{len(info.shapes) // 2} weights"]
    model = Model(path, repack=repack)
    try:
        n_params = sum(_count(s) for s in info.shapes.values())
        template = "yes" if model.meta("tokenizer.chat_template") else "no"
        return [f"architecture {info.architecture}, {n_params / 1e6:.0f}M parameters, "
                f"file type {model.meta('general.file_type') or '?'} "
                f"({_ftype_name(model.meta('general.file_type'))})",
                f"vocabulary {model.n_vocab} tokens, context {model.n_ctx_train}, "
                f"chat template: {template}",
                f"weights in {model.describe_buffers()}; weight repacking {model.repack_reason}"]
    finally:
        model.close()


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _ftype_name(value: str | None) -> str:
    from .llama import QUANT_TYPES

    names = {str(v): k for k, v in QUANT_TYPES.items()} | {"0": "F32"}
    return names.get(value or "", "unknown")


@models.command("pull")
@_registry_option
@click.argument("name")
def pull(models_file, name) -> None:
    """Fetch every Hub file of a preset (or one @model) into the Hugging Face cache."""
    reg = Registry.load(models_file)
    refs = [name] if name.startswith("@") else [reg.preset(name).base] + [
        a.model for a in reg.preset(name).arms]
    for ref in refs:
        entry = reg.entry(ref)
        if entry is not None and entry.kind in ("derived", "parts"):
            path = reg.resolve(ref)  # fetches its source if that is on the Hub, then makes it
            click.echo(f"{ref}: {path} ({_size(path)})", err=True)
            continue
        if entry is None or entry.kind != "hub":
            path = reg.local_path(ref)
            state = f"here ({path})" if path else "missing: not on the Hub; see its description"
            click.echo(f"{ref}: {state}", err=True)
            if path is None:
                raise UserError(f"{ref} is not a Hub file and is missing; "
                                f"{entry.description if entry else 'check the path'}")
            continue
        path = hub_file(entry)  # huggingface_hub draws its own progress bar
        click.echo(f"{ref}: {path} ({_size(path)})", err=True)
