"""The options that generate, chat, batch and serve share, declared once.

Contract: `@generation_options` adds the shared click options to a command;
`GenerationOptions.from_kwargs(kwargs)` pops them from the command's keyword arguments, checks
them (raising `UserError` with one line) and builds the engine config and generation request.
"""

from __future__ import annotations

import math
import re
import secrets
import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from . import llama
from .engine import ArmSpec, EngineConfig, RewardSpec
from .errors import UserError
from .policy import METHODS, Request
from .llama import ContextSettings
from .registry import DEFAULT_BASE, Registry
from .reward import check_candidates
from .sampling import SamplingSettings
from .speculative import DRAFTERS

_SAMPLING = SamplingSettings()  # the defaults live in one place
MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS
MAX_DRAFT = 32  # each context reserves K + 1 rows of vocabulary-wide logits per sequence

_PRESET_HELP = ("A preset from models.toml: base, ARMs, alphas, sampling; explicit options "
                "override it [env EDGE_GENARM_PRESET].")
repack_option = click.option(
    "--repack", type=click.Choice(llama.REPACK_CHOICES), default="auto", show_default=True,
    envvar="EDGE_GENARM_REPACK", help="Repack CPU weights into llama.cpp's extra buffer types "
    "(AMX, CPU_REPACK) for faster kernels; auto: on, except where llama.cpp reports AMX, whose "
    "path crashes on some Intel CPUs [env EDGE_GENARM_REPACK].")

_OPTIONS = [
    click.option("--models-file", default=None, envvar="EDGE_GENARM_MODELS_FILE",
                 metavar="PATH", help="A models.toml merged over the shipped and user ones "
                 "[env EDGE_GENARM_MODELS_FILE]."),
    click.option("--base", default=DEFAULT_BASE, show_default=True, envvar="EDGE_GENARM_BASE",
                 metavar="PATH", help="Base model GGUF, or @NAME of a models.toml entry; "
                 "MODEL+ADAPTER runs the base with a LoRA adapter of it (not merged) "
                 "[env EDGE_GENARM_BASE]."),
    click.option("--arm", "arms", multiple=True, envvar="EDGE_GENARM_ARMS", metavar="PATH[:ALPHA]",
                 help="An ARM: a full GGUF model, a GGUF LoRA adapter of the base, or "
                 "MODEL+ADAPTER (a LoRA of another model: a small ARM for a large base), with "
                 "its weight ALPHA (default 1.0; negative steers away). Repeatable "
                 "[env EDGE_GENARM_ARMS, space-separated]."),
    click.option("--alpha", "alpha_overrides", multiple=True, metavar="NAME=VALUE",
                 help="Set one ARM's weight by name (0 switches it off). Repeatable."),
    click.option("--arm-gpu-layers", "arm_gpu_layers", multiple=True, metavar="NAME=N",
                 help="Layers of one ARM's own model to offload to the GPU (-1: all; default: "
                 "as --n-gpu-layers), so that a small ARM can stay on the CPU. Repeatable."),
    click.option("--method", type=click.Choice(METHODS), default="genarm", show_default=True,
                 envvar="EDGE_GENARM_METHOD", help="How to guide: genarm (the ARMs); or with "
                 "the reward model: pargs (the base's top K tokens scored log-prob + w * r), "
                 "args (logit + w * r), best-of-n (N whole answers, the best kept) "
                 "[env EDGE_GENARM_METHOD]."),
    click.option("--reward-model", default=None, envvar="EDGE_GENARM_REWARD_MODEL",
                 metavar="PATH", help="A reward model GGUF (a model or LoRA of the base with a "
                 "reward head), @NAME or MODEL+ADAPTER, for pargs and args "
                 "[env EDGE_GENARM_REWARD_MODEL]."),
    click.option("--candidates", type=int, default=10, show_default=True, metavar="K",
                 help="pargs, args: the base's top K tokens the reward model scores each step."),
    click.option("--reward-weight", type=float, default=1.0, show_default=True, metavar="W",
                 help="pargs, args: the reward's weight w."),
    click.option("--samples", type=int, default=4, show_default=True, metavar="N",
                 help="best-of-n: whole answers sampled from the base (at most --n-parallel, or "
                 "4 sequences for generate and chat)."),
    click.option("--speculative", type=click.Choice(("off",) + DRAFTERS), default="off",
                 show_default=True, envvar="EDGE_GENARM_SPECULATIVE", help="Speculative "
                 "decoding: a drafter proposes the next tokens and one decode of every model "
                 "checks them, exactly (the same tokens greedy, the same distribution sampled). "
                 "lookup: from the answer's own context (prompt and answer so far); model: the "
                 "--draft-model; guided: the draft model guided by the ARMs; arm: an ARM that is "
                 "a small model of its own [env EDGE_GENARM_SPECULATIVE]."),
    click.option("--draft-model", default=None, envvar="EDGE_GENARM_DRAFT_MODEL",
                 metavar="PATH", help="speculative: a small model sharing the base's "
                 "tokenizer, for the model and guided drafters: a GGUF, @NAME or MODEL+ADAPTER "
                 "(a model an ARM already loads shares its weights) "
                 "[env EDGE_GENARM_DRAFT_MODEL]."),
    click.option("--draft-tokens", type=int, default=16, show_default=True, metavar="K",
                 help=f"speculative: the most draft tokens one check takes (1 to {MAX_DRAFT}; "
                 "fewer after rejections); every context reserves K + 1 rows of logits per "
                 "sequence."),
    click.option("--temperature", "-t", type=float, default=_SAMPLING.temperature,
                 show_default=True, help="Sampling temperature; 0 takes the argmax."),
    click.option("--top-k", type=int, default=_SAMPLING.top_k, show_default=True,
                 help="Keep the k most likely tokens (0: off)."),
    click.option("--top-p", type=float, default=_SAMPLING.top_p, show_default=True,
                 help="Keep the most likely tokens up to this probability (1: off)."),
    click.option("--min-p", type=float, default=_SAMPLING.min_p, show_default=True,
                 help="Keep tokens at least this fraction as likely as the best (0: off)."),
    click.option("--greedy", is_flag=True, help="Always take the most likely token."),
    click.option("--presence-penalty", type=float, default=_SAMPLING.presence_penalty,
                 show_default=True, help="Subtract this from every token the answer already "
                 "holds (-2 to 2, as OpenAI's)."),
    click.option("--frequency-penalty", type=float, default=_SAMPLING.frequency_penalty,
                 show_default=True, help="Subtract this times its count from every token the "
                 "answer already holds (-2 to 2, as OpenAI's)."),
    click.option("--dry-multiplier", type=float, default=_SAMPLING.dry_multiplier,
                 show_default=True, help="DRY: penalize a token that would extend a repeat of "
                 "the answer's own text, by MULTIPLIER * BASE^(length - ALLOWED) (0: off)."),
    click.option("--dry-base", type=float, default=_SAMPLING.dry_base, show_default=True,
                 help="DRY: how fast the penalty grows with the repeat's length."),
    click.option("--dry-allowed-length", type=int, default=_SAMPLING.dry_allowed_length,
                 show_default=True, help="DRY: repeats up to this many tokens go unpenalized."),
    click.option("--dry-sequence-breaker", "dry_sequence_breakers", multiple=True,
                 metavar="STRING", help="DRY: a repeat never reaches back across a token holding "
                 "STRING (\\n for a newline). Repeatable; 'none' for no breakers [default: "
                 "\\n : \" *]."),
    click.option("--seed", type=int, default=None, help="Random seed (default: a fresh one, "
                 "reported with --json)."),
    click.option("--max-tokens", "-n", type=int, default=256, show_default=True,
                 help="Most tokens to generate."),
    click.option("--stop", multiple=True, metavar="STRING", help="Stop when the text contains "
                 "STRING (not included). Repeatable."),
    click.option("--system", default=None, metavar="TEXT", help="System message for the chat "
                 "template."),
    click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template."),
    click.option("--ctx-size", "-c", type=int, default=2048, show_default=True,
                 envvar="EDGE_GENARM_CTX_SIZE", help="Context window of every model, in tokens "
                 "[env EDGE_GENARM_CTX_SIZE]."),
    click.option("--kv-size", type=int, default=0, envvar="EDGE_GENARM_KV_SIZE", metavar="CELLS",
                 help="KV cache cells shared by all sequences (0: --ctx-size for each parallel "
                 "sequence); a request still ends at --ctx-size tokens [env EDGE_GENARM_KV_SIZE]."),
    click.option("--threads", type=int, default=None, envvar="EDGE_GENARM_THREADS",
                 help="CPU threads of each context (default: all cores; contexts run one after "
                 "another) [env EDGE_GENARM_THREADS]."),
    click.option("--n-gpu-layers", "-ngl", type=int, default=0, show_default=True,
                 envvar="EDGE_GENARM_N_GPU_LAYERS", help="Layers to offload to the GPU "
                 "(-1: all) [env EDGE_GENARM_N_GPU_LAYERS]."),
    repack_option,
    click.option("--exact", is_flag=True, help="F32 KV cache and no flash attention, to match a "
                 "PyTorch reference to about 1e-4."),
    click.option("--verbose", "-v", is_flag=True, help="Show llama.cpp's own log lines."),
]


def generation_options(command=None, *, many_presets: bool = False):
    """Decorator: add every shared option to a click command (`--preset` repeatable with
    `many_presets`, for a command that serves several)."""
    if command is None:
        return lambda c: generation_options(c, many_presets=many_presets)
    for option in reversed(_OPTIONS):
        command = option(command)
    preset = click.option("--preset", "-p", default=None, envvar="EDGE_GENARM_PRESET",
                          metavar="NAME", multiple=many_presets,
                          help=_PRESET_HELP + (" Repeatable: each preset is a model id."
                                               if many_presets else ""))
    return preset(command)


def _number(text: str, where: str, example: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: the weight {text!r} is not a number; write {example}") \
            from None
    if not math.isfinite(value):
        raise UserError(f"{where}: the weight must be a finite number, not {text}")
    return value


def sequence_breakers(given) -> tuple[str, ...]:
    """--dry-sequence-breaker values as strings: none given keeps the defaults, 'none' clears
    them; \\n, \\t and \\\\ are the escapes a shell makes awkward."""
    if not given:
        return _SAMPLING.dry_sequence_breakers
    if list(given) == ["none"]:
        return ()
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    return tuple(re.sub(r"\\([nt\\])", lambda m: escapes[m.group(1)], text) for text in given)


def parse_arm(text: str, registry: Registry) -> ArmSpec:
    """PATH[:ALPHA] or MODEL+ADAPTER[:ALPHA] -> ArmSpec; a path that itself contains ':' or
    '+' is taken whole if it exists."""
    if Path(text).expanduser().is_file() or ":" not in text:
        ref, alpha = text, 1.0
    else:
        ref, _, alpha_text = text.rpartition(":")
        alpha = _number(alpha_text, f"--arm {text}", "PATH:ALPHA, for example model.gguf:0.5")
    model, adapter = split_adapter(ref)
    named = adapter or model
    name = named[1:] if named.startswith("@") else ""
    return ArmSpec(registry.resolve(model), alpha, name,
                   registry.resolve(adapter) if adapter else None)


def split_adapter(ref: str) -> tuple[str, str | None]:
    """MODEL+ADAPTER -> (MODEL, ADAPTER); anything else (an existing file whose name has a '+'
    included) -> (ref, None)."""
    if "+" in ref and not Path(ref).expanduser().is_file():
        model, _, adapter = ref.partition("+")
        return model, adapter
    return ref, None


def apply_alphas(arms, overrides, flag: str = "--alpha") -> None:
    """NAME=VALUE settings on ARMs (anything with .name and .alpha) by name."""
    for text in overrides:
        name, sep, value = text.partition("=")
        if not sep:
            raise UserError(f"{flag} {text}: write NAME=VALUE, for example positive=0.5")
        matches = [a for a in arms if a.name == name.strip()]
        if not matches:
            known = ", ".join(a.name for a in arms) or "none"
            raise UserError(f"{flag} {text}: no ARM named {name!r}; the ARMs are {known}")
        matches[0].alpha = _number(value.strip(), f"{flag} {text}", "NAME=VALUE, for example "
                                   "positive=0.5")


def apply_gpu_layers(arms: list[ArmSpec], settings) -> None:
    """NAME=N GPU layers of one ARM's own model, by name."""
    for text in settings:
        name, sep, value = text.partition("=")
        matches = [a for a in arms if a.name == name.strip()]
        if not sep or not value.strip().lstrip("-").isdigit():
            raise UserError(f"--arm-gpu-layers {text}: write NAME=N, for example small=0")
        if not matches:
            known = ", ".join(a.name for a in arms) or "none"
            raise UserError(f"--arm-gpu-layers {text}: no ARM named {name.strip()!r}; the ARMs "
                            f"are {known}")
        matches[0].n_gpu_layers = int(value)


@dataclass
class GenerationOptions:
    base: Path
    arms: list[ArmSpec]
    sampling: SamplingSettings
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    system: str | None = None
    raw: bool = False
    context: ContextSettings = field(default_factory=ContextSettings)
    n_gpu_layers: int = 0
    base_adapter: Path | None = None  # a LoRA the base runs with (--base MODEL+ADAPTER)
    verbose: bool = False
    chat_template: str | None = None  # the preset's, for a base GGUF that has none
    seed_given: bool = False          # --seed was passed (not a fresh random one)
    method: str = "genarm"
    reward: RewardSpec | None = None  # loaded for a tokenwise method, or when given
    reward_weight: float = 1.0
    samples: int = 4
    repack: str = "auto"              # llama.cpp's extra CPU buffer types
    speculative: str = "off"          # the default drafter of requests; not off: room reserved
    draft_tokens: int = 16
    draft: Path | None = None         # the draft model (loaded when speculation is on)
    draft_adapter: Path | None = None

    @classmethod
    def from_kwargs(cls, kw: dict, explicit: set[str] | None = None) -> "GenerationOptions":
        """Pop the shared options from a command's kwargs, apply the preset, check them.
        `explicit`: the options the caller gave (default: those click saw given)."""
        registry = Registry.load(kw.pop("models_file"))
        preset = registry.preset(kw.pop("preset")) if kw.get("preset") else None
        kw.pop("preset", None)
        if preset is not None:
            _apply_preset(kw, preset, explicit_options(kw) if explicit is None else explicit)
        sampling = SamplingSettings(
            temperature=kw.pop("temperature"), top_k=kw.pop("top_k"), top_p=kw.pop("top_p"),
            min_p=kw.pop("min_p"), greedy=kw.pop("greedy"),
            presence_penalty=kw.pop("presence_penalty"),
            frequency_penalty=kw.pop("frequency_penalty"),
            dry_multiplier=kw.pop("dry_multiplier"), dry_base=kw.pop("dry_base"),
            dry_allowed_length=kw.pop("dry_allowed_length"),
            dry_sequence_breakers=sequence_breakers(kw.pop("dry_sequence_breakers")))
        try:
            sampling.validate()
        except ValueError as exc:  # messages start with the setting's name: make it the flag
            raise UserError(f"--{exc}") from None
        preset_arms = kw.pop("preset_arms", None)
        if preset_arms is not None:
            arms = [ArmSpec(registry.resolve(a.model), a.alpha, a.name,
                            registry.resolve(a.adapter) if a.adapter else None, a.n_gpu_layers)
                    for a in preset_arms]
        else:
            arms = [parse_arm(a, registry) for a in kw["arms"]]
        kw.pop("arms")
        apply_alphas(arms, kw.pop("alpha_overrides"))
        apply_gpu_layers(arms, kw.pop("arm_gpu_layers"))
        base, base_adapter = split_adapter(kw.pop("base"))
        method, candidates = kw.pop("method"), kw.pop("candidates")
        reward_ref = kw.pop("reward_model")
        if method != "genarm" and reward_ref is None:
            raise UserError(f"--method {method} needs a reward model: pass --reward-model RM.gguf "
                            "(or a preset that names one)")
        reward = None
        if reward_ref is not None:
            model, adapter = split_adapter(reward_ref)
            reward = RewardSpec(registry.resolve(model), candidates,
                                registry.resolve(adapter) if adapter else None)
        draft_model, draft_adapter = split_adapter(kw.pop("draft_model") or "")
        opts = cls(
            draft=registry.resolve(draft_model) if draft_model else None,
            draft_adapter=registry.resolve(draft_adapter) if draft_adapter else None,
            base=registry.resolve(base),
            base_adapter=registry.resolve(base_adapter) if base_adapter else None,
            arms=arms,
            sampling=sampling,
            max_tokens=kw.pop("max_tokens"),
            stop=tuple(kw.pop("stop")),
            seed=kw.pop("seed"),
            system=kw.pop("system"),
            raw=kw.pop("raw"),
            context=ContextSettings(n_ctx=kw.pop("ctx_size"), n_threads=kw.pop("threads") or 0,
                                    exact=kw.pop("exact"), n_cells=kw.pop("kv_size")),
            n_gpu_layers=kw.pop("n_gpu_layers"),
            verbose=kw.pop("verbose"),
            chat_template=preset.chat_template if preset else None,
            method=method,
            reward=reward,
            reward_weight=kw.pop("reward_weight"),
            samples=kw.pop("samples"),
            repack=kw.pop("repack"),
            speculative=kw.pop("speculative"),
            draft_tokens=kw.pop("draft_tokens"),
        )
        opts.seed_given = opts.seed is not None
        if opts.seed is None:
            opts.seed = secrets.randbelow(2**31)
        if opts.max_tokens < 0:
            raise UserError(f"--max-tokens must be >= 0, got {opts.max_tokens}")
        if not 1 <= opts.draft_tokens <= MAX_DRAFT:
            raise UserError(f"--draft-tokens must be between 1 and {MAX_DRAFT}, got "
                            f"{opts.draft_tokens}")
        if opts.context.n_ctx < 16:
            raise UserError(f"--ctx-size must be at least 16 tokens, got {opts.context.n_ctx}")
        if opts.context.n_cells and opts.context.n_cells < opts.context.n_ctx:
            raise UserError(f"--kv-size must be 0 (every sequence a full --ctx-size) or at least "
                            f"--ctx-size ({opts.context.n_ctx}), got {opts.context.n_cells}")
        _check_resources(opts)
        _check_reward(opts, candidates)
        _dedupe_arm_names(opts.arms)
        return opts

    def engine_config(self) -> EngineConfig:
        context = self.context
        if self.method == "best-of-n":  # one request's samples decode side by side
            context = replace(context, n_seq_max=max(context.n_seq_max, self.samples))
        if self.speculative != "off":  # a verify reads every drafted position's row
            context = replace(context, n_logits=self.draft_tokens + 1)
        return EngineConfig(base=self.base, arms=self.arms, context=context,
                            n_gpu_layers=self.n_gpu_layers, base_adapter=self.base_adapter,
                            reward=self.reward, repack=self.repack,
                            draft=self.draft if self.speculative != "off" else None,
                            draft_adapter=self.draft_adapter)

    def request(self, prompt_ids=(), **changes) -> Request:
        """A scheduler request with these options, for prompt_ids; `changes` override fields."""
        fields = dict(prompt_ids=tuple(prompt_ids), sampling=self.sampling,
                      max_tokens=self.max_tokens, stop=self.stop, seed=self.seed,
                      method=self.method, reward_weight=self.reward_weight, samples=self.samples,
                      candidates=self.reward.candidates if self.reward else 10,
                      speculative=None if self.speculative == "off" else self.speculative)
        return Request(**(fields | changes))

    def call(self, prompt_ids, given: dict) -> Request:
        """The request of one call (the Python API's, or an HTTP body's) for prompt_ids: its
        options by their Python names over these (None: not given). The one place where a
        call's temperature decides greedy, its stop strings are read and a seed is drawn."""
        sampling = {k: v for k, v in given.items() if k in SAMPLING_FIELDS and v is not None}
        if "temperature" in sampling and "greedy" not in sampling:
            sampling["greedy"] = sampling["temperature"] == 0
        settings = replace(self.sampling, **sampling)  # checked with the request, at submit
        own = {k: v for k, v in given.items() if k in CALL_FIELDS and v is not None}
        if "stop" in own:
            own["stop"] = (own["stop"],) if isinstance(own["stop"], str) else tuple(own["stop"])
        if "seed" not in own:
            own["seed"] = self.seed if self.seed_given else secrets.randbelow(2**31)
        return self.request(prompt_ids, sampling=settings, **own)


SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingSettings))
# a call's own request options beside the sampling settings
CALL_FIELDS = frozenset({"max_tokens", "stop", "seed", "arms", "n", "logprobs", "method",
                         "reward_weight", "candidates", "samples", "ignore_eos", "speculative",
                         "draft_tokens"})


def _check_resources(opts: "GenerationOptions") -> None:
    """Seeds, threads and GPU layers that this machine and llama.cpp can take."""
    if opts.seed < 0:
        raise UserError(f"--seed must be >= 0, got {opts.seed}")
    if not 0 <= opts.context.n_threads <= MAX_THREADS:
        raise UserError(f"--threads must be between 1 and {MAX_THREADS}, got "
                        f"{opts.context.n_threads}")
    placements = [("--n-gpu-layers", f"--n-gpu-layers {opts.n_gpu_layers}", opts.n_gpu_layers)]
    placements += [(f"--arm-gpu-layers {a.name}", f"--arm-gpu-layers {a.name}={a.n_gpu_layers}",
                    a.n_gpu_layers) for a in opts.arms if a.n_gpu_layers is not None]
    for flag, shown, layers in placements:
        if layers < -1:
            raise UserError(f"{flag} must be -1 (all), 0 (none) or a number of layers, got "
                            f"{layers}")
        if layers != 0 and not llama.supports_gpu_offload():
            raise UserError(f"{shown}: this llama-cpp-python build has no GPU support; drop the "
                            "option, or install a CUDA or Metal build (see llama-cpp-python's "
                            "install notes)")


def _check_reward(opts: "GenerationOptions", candidates: int) -> None:
    check_candidates(candidates)  # before any model loads
    if not math.isfinite(opts.reward_weight):
        raise UserError(f"--reward-weight must be a finite number, got {opts.reward_weight}")
    if opts.samples < 1:
        raise UserError(f"--samples must be at least 1, got {opts.samples}")


def explicit_options(kw: dict) -> set[str]:
    """The options the user gave (command line or environment), not defaults."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return set(kw)
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {name for name in kw if ctx.get_parameter_source(name) in given}


def _apply_preset(kw: dict, preset, explicit: set[str]) -> None:
    """Fill what the user did not give from the preset (ARMs resolved later, by name)."""
    if "base" not in explicit:
        kw["base"] = preset.base
    if "arms" not in explicit:
        kw["preset_arms"] = preset.arms
    if "reward_model" not in explicit and preset.reward_model and kw.get("method") != "genarm":
        kw["reward_model"] = preset.reward_model  # loaded only where a method uses it
    if "draft_model" not in explicit and preset.draft_model:
        kw["draft_model"] = preset.draft_model  # loaded only where speculation is on
    if "ctx_size" not in explicit and preset.ctx_size:
        kw["ctx_size"] = preset.ctx_size
    for key, value in (preset.sampling | preset.request).items():
        if key not in explicit and not (key == "system" and kw.get("raw")):
            kw[key] = tuple(value) if key == "stop" else value


def _dedupe_arm_names(arms: list[ArmSpec]) -> None:
    """Two ARMs from files of the same name get #2, #3... so that names stay unique."""
    seen: dict[str, int] = {}
    for arm in arms:
        seen[arm.name] = seen.get(arm.name, 0) + 1
        if seen[arm.name] > 1:
            arm.name = f"{arm.name}#{seen[arm.name]}"
