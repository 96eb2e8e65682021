"""From what a user gives to a checked `Config`, and from a `Config` to what the engine loads.

Contract:
- `configure(preset, given)` merges the declared defaults, a preset of models.toml and the
  options the user gave (by option name, typed or as typed on a command line) into a `Config`
  and validates it (`UserError`, one line naming the option). The Python API, the commands,
  the server and Ray workers all build their configuration here.
- `@generation_options` adds one click option per declared option (`fields.specs` of
  `LoadConfig` and `RequestParams`: flag, help, default, environment variable, choices) to a
  command; `from_click(kwargs)` pops them and returns the `Config` (only the options the user
  gave override the preset; a bad value names its flag).
- `call(defaults, prompt_ids, given)` is one call's request: its options (None: not given)
  over the loaded defaults, a fresh seed where neither gave one.
- `engine_config(config)` resolves model references (@NAME, MODEL+ADAPTER) on the node that
  loads them and sizes the contexts (parallel sequences, best-of-n's samples, draft rows).
"""

from __future__ import annotations

import dataclasses
import secrets

import click

from . import constraints, fields
from .config import (DRAFT_TOKENS, ArmRef, Config, LoadConfig, RequestParams, split,
                     split_adapter)
from .engine import ArmSpec, EngineConfig, RewardSpec
from .errors import UserError
from .fields import Spec
from .llama import ContextSettings
from .registry import Preset, Registry

_PRESET_HELP = ("A preset from models.toml: base, ARMs, alphas, sampling; explicit options "
                "override it [env EDGE_GENARM_PRESET].")


# -- the command line ------------------------------------------------------------------------
CLASSES = (LoadConfig, RequestParams)  # what a load fixes, what a request may set


def cli_specs(classes: tuple = CLASSES) -> list[Spec]:
    """The options a command line takes, load's first (a name both declare is load's)."""
    load = [s for s in fields.specs(classes[0]) if s.option.cli]
    names = {s.name for s in load}
    return load + [s for s in fields.specs(classes[1]) if s.option.cli and s.name not in names]


def click_option(spec: Spec):
    """One click option generated from a declared option."""
    opt = spec.option
    decls = [spec.flag] + ([opt.short] if opt.short else []) + [spec.name]
    text = opt.help + (f" [env {opt.env}]" if opt.env else "")
    kw: dict = {"help": text, "envvar": opt.env}
    if spec.base_type is bool:
        return click.option(*decls, is_flag=True, **kw)
    if spec.multiple:  # each occurrence a string, parsed with the others by the option
        if opt.show:
            kw["help"] += f" [default: {opt.show}]"
        return click.option(*decls, multiple=True, metavar=opt.metavar or "TEXT", **kw)
    kind = click.Choice(opt.choices) if opt.choices else \
        {int: click.INT, float: click.FLOAT}.get(spec.base_type, click.STRING)
    shown = opt.show if opt.show else spec.default is not None
    return click.option(*decls, type=kind, default=spec.default, show_default=shown,
                        metavar=opt.metavar, **kw)


def generation_options(command=None, *, many_presets: bool = False, classes: tuple = CLASSES):
    """Decorator: one click option per declared option (`--preset` repeatable with
    `many_presets`, for a command that serves several)."""
    if command is None:
        return lambda c: generation_options(c, many_presets=many_presets, classes=classes)
    for spec in reversed(cli_specs(classes)):
        command = click_option(spec)(command)
    preset = click.option("--preset", "-p", default=None, envvar="EDGE_GENARM_PRESET",
                          metavar="NAME", multiple=many_presets,
                          help=_PRESET_HELP + (" Repeatable: each preset is a model id."
                                               if many_presets else ""))
    return preset(command)


def given_options(kw: dict, classes: tuple = CLASSES) -> tuple[dict, dict]:
    """Pop the declared options from a command's kwargs: (the command's own defaults, those
    the user gave on the command line or in the environment), by name."""
    ctx = click.get_current_context(silent=True)
    source = click.core.ParameterSource
    given, defaults = {}, {}
    for spec in cli_specs(classes):
        value = kw.pop(spec.name)
        where = ctx.get_parameter_source(spec.name) if ctx is not None else source.COMMANDLINE
        if where in (source.COMMANDLINE, source.ENVIRONMENT):
            given[spec.name] = value
        elif where == source.DEFAULT_MAP:  # a command's own default (chat's max_tokens)
            defaults[spec.name] = value
    return defaults, given


def from_click(kw: dict, preset: str | None = None, classes: tuple = CLASSES,
               **command: tuple[str, object]) -> Config:
    """The Config of a command's options (popped from kw), with the command's own flags for
    options it spells itself (`parallel=("--n-parallel", 8)`); errors name the flag."""
    defaults, given = given_options(kw, classes)
    given |= {name: value for name, (_, value) in command.items()}
    try:
        return configure(preset if preset is not None else kw.pop("preset", None), given,
                         defaults=defaults, classes=classes)
    except UserError as exc:
        raise flagged(exc, {name: flag for name, (flag, _) in command.items()}, classes) \
            from None


def flagged(exc: UserError, flags: dict[str, str] | None = None, classes: tuple = CLASSES
            ) -> UserError:
    """A message that starts with an option's name, starting with its flag instead."""
    message = str(exc)
    flags = {s.name: s.flag for s in cli_specs(classes)} | (flags or {})
    if exc.param in flags and message.startswith(exc.param):
        return UserError(flags[exc.param] + message[len(exc.param):], exc.param)
    return exc


# -- defaults, preset and the user's options merged --------------------------------------------
def preset_options(preset: Preset) -> dict:
    """A preset's options by name, as the user's would be."""
    out = {"base": preset.base, "arms": tuple(preset.arms)}
    out |= {k: v for k, v in (("ctx_size", preset.ctx_size),
                              ("chat_template", preset.chat_template),
                              ("reward_model", preset.reward_model),
                              ("draft_model", preset.draft_model)) if v is not None}
    return out | preset.sampling | preset.request


def configure(preset: str | None = None, given: dict | None = None,
              registry: Registry | None = None, defaults: dict | None = None,
              classes: tuple = CLASSES) -> Config:
    """The checked Config of a preset (or none) with the user's options over it (and a
    caller's own `defaults` under it)."""
    given = dict(given or {})
    registry = registry or Registry.load(given.get("models_file"))
    values = dict(defaults or {})
    if preset is not None:
        values |= preset_options(registry.preset(preset))
        if given.get("raw"):  # a raw prompt has no template for the preset's system message
            values.pop("system", None)
    values |= given
    load, request = (fields.build(cls, part) for cls, part in
                     zip(classes, split(values, classes[0])))
    request = _defaults_yield(request, given)
    if not request.needs_reward_model and "reward_model" not in given:
        # a preset's reward model is loaded only where the method uses it
        load = dataclasses.replace(load, reward_model=None)
    return Config(load, request, preset).validate()


def _defaults_yield(request: RequestParams, given) -> RequestParams:
    """A default (a preset's, or the load's for its requests) that the request's method or
    score cannot use is off: a drafter for a method that does not draft, a fluency weight for a
    search score without the base's log-probs. One the caller named is checked, and refused."""
    if request.drafts and request.method != "genarm" and "speculative" not in given:
        request = dataclasses.replace(request, speculative="off")
    if request.search_fluency and not request.ranks_by_arms and "search_fluency" not in given:
        request = dataclasses.replace(request, search_fluency=0.0)
    return request


def call(defaults: RequestParams, prompt_ids, given: dict) -> RequestParams:
    """One call's request: its options by name (None: not given) over the loaded defaults; a
    call's temperature decides greedy, and a fresh seed is drawn where none was given."""
    own = {k: v for k, v in given.items() if v is not None}
    if "temperature" in own and "greedy" not in own:
        own["greedy"] = own["temperature"] == 0
    if own.get("seed", defaults.seed) is None:
        own["seed"] = secrets.randbelow(2**31)
    own["prompt_ids"] = tuple(prompt_ids)
    response_model = None
    if "response_format" in own:  # OpenAI's shape, a JSON Schema or a Pydantic class
        schema, response_model = constraints.response_schema(own.pop("response_format"))
        if schema is not None:
            own["json_schema"] = schema
    # the defaults' own class: a program's subclass keeps its options
    request = fields.build(type(defaults), {k: v for k, v in own.items() if k != "prompt_ids"},
                           defaults)
    request = _defaults_yield(request, own)
    return dataclasses.replace(request, prompt_ids=own["prompt_ids"],
                               response_model=response_model or request.response_model)


# -- what the engine loads ----------------------------------------------------------------------
def engine_config(config: Config, registry: Registry | None = None) -> EngineConfig:
    """Model files resolved here (a Hub file fetched, a derived one made) and contexts sized."""
    registry = registry or Registry.load(config.load.models_file)
    load, request = config.load, config.request

    def ref(text: str | None):
        if text is None:
            return None, None
        model, adapter = split_adapter(text)
        return registry.resolve(model), registry.resolve(adapter) if adapter else None

    context = ContextSettings(n_ctx=load.ctx_size, n_threads=load.threads or 0,
                              exact=load.exact, n_cells=load.kv_size, n_seq_max=load.parallel)
    if request.method in ("best-of-n", "search"):  # its samples or candidates side by side
        context = dataclasses.replace(context, n_seq_max=max(load.parallel, request.answers))
    speculating = request.drafts
    if speculating:  # a verify reads every drafted position's row
        context = dataclasses.replace(context, n_logits=(request.draft_tokens or DRAFT_TOKENS)
                                      + 1)
    base, base_adapter = ref(load.base)
    reward = None
    if load.reward_model is not None:
        path, adapter = ref(load.reward_model)
        reward = RewardSpec(path, load.candidates, adapter)
    draft, draft_adapter = ref(load.draft_model if speculating else None)
    return EngineConfig(base=base, arms=[_arm(a, registry) for a in load.named_arms()],
                        context=context, n_gpu_layers=load.n_gpu_layers,
                        base_adapter=base_adapter, reward=reward, repack=load.repack,
                        draft=draft, draft_adapter=draft_adapter)


def _arm(arm: ArmRef, registry: Registry) -> ArmSpec:
    return ArmSpec(registry.resolve(arm.model), arm.alpha, arm.name,
                   registry.resolve(arm.adapter) if arm.adapter else None, arm.n_gpu_layers)


def option_table(cls) -> str:
    """A Markdown table of a config class's options (the docs' option tables)."""
    rows = ["| option | command line | type | default | help |", "|---|---|---|---|---|"]
    for spec in fields.specs(cls):
        opt = spec.option
        flag = f"`{spec.flag}`" + (f" `{opt.short}`" if opt.short else "") if opt.cli else ""
        default = opt.show or ("" if spec.default in (None, (), {}) else repr(spec.default))
        rng = _range(spec)
        env = f" Env `{opt.env}`." if opt.env else ""
        rows.append(f"| `{spec.name}` | {flag} | {fields.kind(spec)}{rng} | {default} | "
                    f"{opt.help}{env} |".replace("\n", " "))
    return "\n".join(rows)


def _range(spec: Spec) -> str:
    low, high = spec.option.low, spec.option.high
    if low is None and high is None:
        return ""
    low, high = (f"{x:g}" if isinstance(x, float) else str(x) for x in (low, high))
    if high == "None":
        return f", {'>' if spec.option.above else '>='} {low}"
    if low == "None":
        return f", <= {high}"
    return f", {'(' if spec.option.above else '['}{low}, {high}]"


__all__ = ["Config", "LoadConfig", "RequestParams", "configure", "from_click", "call",
           "engine_config", "generation_options", "option_table"]
