"""Every option, typed and declared once: what a load fixes, and what a request may set.

Contract:
- `LoadConfig` holds what loading fixes (models, contexts, threads, GPU layers, repack, the
  reward and draft models, parallel sequences); `RequestParams` what each request may set
  (the prompt's ids, sampling and penalties as `SamplingSettings`, ARM weights, method and its
  settings, n, seed, log-probs, stop strings, max tokens, speculative decoding, system
  message). `Config` pairs a load with the defaults of its requests. Each field is an
  `fields.option`: type, default, range, one-line help and environment variable, from which
  the click options, the server's body schema, the batch line's keys, the presets' keys and
  the docs' tables are generated (`fields.specs`).
- `validate()` on each object is the one place a value is checked; it raises `UserError`
  naming the field (`UserError.param`). What a request asks of a loaded engine (n against its
  sequences, candidates against its reward model) is checked by the request's policy.
- Model references stay as the user gave them (a path, @NAME, MODEL+ADAPTER) until a node
  loads them (`options.engine_config`), so that a Ray worker resolves them in its own cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import fields
from .errors import UserError
from .fields import option
from .llama import REPACK_CHOICES
from .sampling import SamplingSettings

DEFAULT_BASE = "@smollm2"
# GenARM guides with the ARMs' log-probs; the tokenwise methods score the base's top
# candidates with the reward model (PARGS adds w * r to log-probs, ARGS to raw logits);
# best-of-n samples whole answers from the base and returns the one the reward model prefers;
# search samples segments from the guided distribution and goes on from the best ones
METHODS = ("genarm", "pargs", "args", "best-of-n", "search")
SEGMENTS = ("sentence", "line", "answer")  # or a token count
SEARCH_SCORES = ("arm", "arm-base", "guided", "reward")
# the drafters of speculative decoding: prompt lookup, the draft model alone or guided by the
# ARMs, an ARM that is a small model of its own
DRAFTERS = ("lookup", "model", "guided", "arm")
MAX_CANDIDATES = 64  # a reward model's candidate tokens per sequence and step
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1
MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS
MAX_DRAFT = 32  # each context reserves K + 1 rows of vocabulary-wide logits per sequence
DRAFT_TOKENS = 16  # the room a load reserves when speculation is on and no K is given


@dataclass(frozen=True)
class ArmRef:
    """An ARM as a user names it: a model (path or @NAME), or a LoRA `adapter` of that model,
    with its default weight; `name` (default: the file's or entry's name) is how requests and
    --alpha address it."""
    model: str
    alpha: float = 1.0
    name: str = ""
    adapter: str | None = None
    n_gpu_layers: int | None = None  # its own model's GPU layers (None: where the base runs)

    @property
    def label(self) -> str:
        named = self.adapter or self.model
        return self.name or (named[1:] if named.startswith("@") else Path(named).stem)


def split_adapter(ref: str) -> tuple[str, str | None]:
    """MODEL+ADAPTER -> (MODEL, ADAPTER); anything else (an existing file whose name has a '+'
    included) -> (ref, None)."""
    if "+" in ref and not Path(ref).expanduser().is_file():
        model, _, adapter = ref.partition("+")
        return model, adapter
    return ref, None


def _number(text: str, where: str, example: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{where}: the weight {text!r} is not a number; write {example}") \
            from None


def parse_arm(text: str) -> ArmRef:
    """PATH[:ALPHA] or MODEL+ADAPTER[:ALPHA]; a path that itself holds ':' is taken whole if
    it exists."""
    if Path(text).expanduser().is_file() or ":" not in text:
        ref, alpha = text, 1.0
    else:
        ref, _, alpha_text = text.rpartition(":")
        alpha = _number(alpha_text, text, "PATH:ALPHA, for example model.gguf:0.5")
    model, adapter = split_adapter(ref)
    return ArmRef(model, alpha, adapter=adapter)


def _arms(given) -> tuple[ArmRef, ...]:
    """ARMs as typed: one "PATH[:ALPHA]" each, several in one space-separated string (the
    environment variable's form), or a mapping PATH -> ALPHA."""
    if isinstance(given, dict):
        return tuple(ArmRef(*split_adapter(str(ref))[:1], float(alpha),
                            adapter=split_adapter(str(ref))[1]) for ref, alpha in given.items())
    texts = given.split() if isinstance(given, str) else given
    return tuple(parse_arm(t) for t in texts)


def _assignments(cast, form: str, example: str):
    """NAME=VALUE strings -> {NAME: VALUE}."""
    def parse(given) -> dict:
        out = {}
        for text in [given] if isinstance(given, str) else given:
            name, sep, value = text.partition("=")
            try:
                if not sep:
                    raise ValueError
                out[name.strip()] = cast(value.strip())
            except ValueError:
                raise UserError(f"{text}: write {form}, for example {example}") from None
        return out
    return parse


_LAYERS = "-1 (all), 0 (none) or a number of layers"
MAX_BIAS = 100.0  # OpenAI's logit_bias range; -100 bans a token


def _text_or_file(given) -> str:
    """A grammar or pattern as typed, or the text of the file it names."""
    path = Path(str(given)).expanduser()
    if "\n" not in str(given) and len(str(given)) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    return str(given)


def _json_object(given) -> dict:
    """A JSON Schema as typed: JSON text, or a file holding it."""
    text = _text_or_file(given)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"is neither a JSON object nor a file holding one ({exc})") from None
    if not isinstance(value, dict):
        raise UserError("must be a JSON object (a JSON Schema)")
    return value


@dataclass(frozen=True)
class LoadConfig:
    """What loading the models fixes."""
    models_file: str | None = option(
        None, "A models.toml merged over the shipped and user ones.",
        env="EDGE_GENARM_MODELS_FILE", metavar="PATH")
    base: str = option(
        DEFAULT_BASE, "Base model GGUF, or @NAME of a models.toml entry; MODEL+ADAPTER runs the "
        "base with a LoRA adapter of it (not merged).", env="EDGE_GENARM_BASE", metavar="PATH")
    arms: tuple[ArmRef, ...] = option(
        (), "An ARM: a full GGUF model, a GGUF LoRA adapter of the base, or MODEL+ADAPTER (a "
        "LoRA of another model: a small ARM for a large base), with its weight ALPHA (default "
        "1.0; negative steers away). Repeatable (the environment variable: space-separated).",
        flag="--arm", env="EDGE_GENARM_ARMS", metavar="PATH[:ALPHA]", parse=_arms)
    alphas: dict[str, float] = option(
        {}, "Set one ARM's weight by name (0 switches it off). Repeatable.", flag="--alpha",
        metavar="NAME=VALUE", parse=_assignments(float, "NAME=VALUE", "positive=0.5"))
    arm_gpu_layers: dict[str, int] = option(
        {}, "Layers of one ARM's own model to offload to the GPU (-1: all; default: as "
        "--n-gpu-layers), so that a small ARM can stay on the CPU. Repeatable.", low=-1,
        rule=_LAYERS, metavar="NAME=N", parse=_assignments(int, "NAME=N", "small=0"))
    reward_model: str | None = option(
        None, "A reward model GGUF (a model or LoRA of the base with a reward head), @NAME or "
        "MODEL+ADAPTER, for pargs, args and best-of-n.", env="EDGE_GENARM_REWARD_MODEL",
        metavar="PATH")
    candidates: int = option(
        10, "pargs, args: the base's top K tokens the reward model scores each step.", low=1,
        high=MAX_CANDIDATES, metavar="K")
    draft_model: str | None = option(
        None, "speculative: a small model sharing the base's tokenizer, for the model and "
        "guided drafters: a GGUF, @NAME or MODEL+ADAPTER (a model an ARM already loads shares "
        "its weights).", env="EDGE_GENARM_DRAFT_MODEL", metavar="PATH")
    raw: bool = option(False, "Send the prompt as is, without the chat template.", wire=False)
    chat_template: str | None = option(
        None, "A Jinja chat template, for a base GGUF that has none (a preset's).", cli=False)
    ctx_size: int = option(2048, "Context window of every model, in tokens.", short="-c",
                           low=16, rule="at least 16 tokens", env="EDGE_GENARM_CTX_SIZE")
    kv_size: int = option(
        0, "KV cache cells shared by all sequences (0: --ctx-size for each parallel sequence); "
        "a request still ends at --ctx-size tokens.", low=0, env="EDGE_GENARM_KV_SIZE",
        metavar="CELLS")
    threads: int | None = option(
        None, "CPU threads of each context (default: all cores; contexts run one after "
        "another).", low=1, high=MAX_THREADS, env="EDGE_GENARM_THREADS")
    n_gpu_layers: int = option(0, "Layers to offload to the GPU (-1: all).", short="-ngl",
                               low=-1, rule=_LAYERS, env="EDGE_GENARM_N_GPU_LAYERS")
    repack: str = option(
        "auto", "Repack CPU weights into llama.cpp's extra buffer types (AMX, CPU_REPACK) for "
        "faster kernels; auto: on, except where llama.cpp reports AMX, whose path crashes on "
        "some Intel CPUs.", choices=REPACK_CHOICES, env="EDGE_GENARM_REPACK")
    exact: bool = option(False, "F32 KV cache and no flash attention, to match a PyTorch "
                         "reference to about 1e-4.")
    parallel: int = option(4, "Sequences decoded together (1 to llama.cpp's most).", cli=False)
    verbose: bool = option(False, "Show llama.cpp's own log lines.", short="-v")

    def validate(self) -> None:
        fields.check(self)
        if self.kv_size and self.kv_size < self.ctx_size:
            raise UserError(f"kv_size must be 0 (every sequence a full context) or at least the "
                            f"context size ({self.ctx_size}), got {self.kv_size}", "kv_size")
        for arm in self.arms:
            if not math.isfinite(arm.alpha):
                raise UserError(f"arms {arm.model}:{arm.alpha}: the weight must be a finite "
                                f"number, not {arm.alpha}", "arms")
        from . import llama  # the build's limits, asked only where they matter
        if not 1 <= self.parallel <= llama.max_parallel_sequences():
            raise UserError(f"parallel must be between 1 and {llama.max_parallel_sequences()}, "
                            f"got {self.parallel}", "parallel")
        names = [a.label for a in self.arms]
        for setting in ("alphas", "arm_gpu_layers"):
            for name, value in getattr(self, setting).items():
                if name not in names:
                    raise UserError(f"{setting} {name}={value:g}: no ARM named {name!r}; the "
                                    f"ARMs are {', '.join(names) or 'none'}", setting)
        layers = [("n_gpu_layers", f"n_gpu_layers {self.n_gpu_layers}", self.n_gpu_layers)] + [
            ("arm_gpu_layers", f"arm_gpu_layers {a.label}={a.n_gpu_layers}", a.n_gpu_layers)
            for a in self.named_arms() if a.n_gpu_layers is not None]
        for param, shown, n in layers:
            if n != 0 and not llama.supports_gpu_offload():
                raise UserError(f"{shown}: this llama-cpp-python build has no GPU support; "
                                "drop the option, or install a CUDA or Metal build (see "
                                "llama-cpp-python's install notes)", param)

    def named_arms(self) -> tuple[ArmRef, ...]:
        """The ARMs with unique names (#2, #3... for files of the same name), their alphas and
        GPU layers set by name."""
        seen: dict[str, int] = {}
        out = []
        for arm in self.arms:
            label = arm.label
            seen[label] = seen.get(label, 0) + 1
            name = label if seen[label] == 1 else f"{label}#{seen[label]}"
            out.append(dataclasses.replace(
                arm, name=name, alpha=self.alphas.get(label, arm.alpha),
                n_gpu_layers=self.arm_gpu_layers.get(label, arm.n_gpu_layers)))
        return tuple(out)


@dataclass(frozen=True)
class RequestParams:
    """What one request may set; the loaded defaults fill what a call leaves out."""
    prompt_ids: tuple[int, ...] = ()
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int = option(256, "Most tokens to generate.", short="-n", low=0)
    stop: tuple[str, ...] = option((), "Stop when the text contains STRING (not included). "
                                   "Repeatable.", metavar="STRING")
    seed: int | None = option(None, "Random seed (default: a fresh one, reported with the "
                              "answer).", low=0, high=MAX_SEED)
    arms: dict[str, float] = option({}, "ARM weights by name for this request (others keep "
                                    "their loaded alpha).", cli=False)
    n: int = option(1, "Answers to the prompt.", low=1, cli=False)
    logprobs: int | None = option(None, "The chosen token's log-prob and the top k others' "
                                  "(None: none).", low=0, high=MAX_TOP_LOGPROBS, cli=False)
    method: str = option(
        "genarm", "How to guide: genarm (the ARMs); or with the reward model: pargs (the "
        "base's top K tokens scored log-prob + w * r), args (logit + w * r), best-of-n (N whole "
        "answers, the best kept); search (segments sampled from the guided distribution, the "
        "best kept, see --segment).", choices=METHODS, env="EDGE_GENARM_METHOD")
    candidates: int | None = option(
        None, "pargs, args: the base's top K the reward model scores (default: as many as it "
        "was loaded for).", low=1, high=MAX_CANDIDATES, cli=False)
    reward_weight: float = option(1.0, "pargs, args: the reward's weight w.", metavar="W")
    samples: int = option(4, "best-of-n: whole answers sampled from the base (at most the "
                          "parallel sequences).", low=1, metavar="N")
    search_width: int = option(
        4, "search: continuations sampled for each kept one at every segment.", low=1,
        metavar="K")
    beams: int = option(1, "search: continuations kept after each segment (1: greedy over "
                        "segments).", low=1, metavar="B")
    segment: str = option(
        "sentence", "search: where a segment ends: sentence, line, answer (one segment: "
        "best-of-N over the guided distribution) or a token count.", metavar="END")
    search_score: str = option(
        "arm", "search: what ranks continuations: arm (the ARMs' summed log-probs times their "
        "alphas: GenARM's reward), arm-base (the same less the base's log-probs: the reward "
        "against the base), guided (the guided log-prob), reward (the reward model).",
        choices=SEARCH_SCORES)
    search_fluency: float = option(
        0.0, "search, ranked by arm or arm-base: the weight of the base's own log-prob of each "
        "token, added to the score (more fluent answers rank higher; arm-base with F = the "
        "ARMs' alphas summed ranks as arm).", low=0, metavar="F")
    ignore_eos: bool = option(False, "Never end at end-of-generation: run to max_tokens (or a "
                              "stop string), as a fixed-length benchmark wants.", cli=False)
    json_schema: dict | None = option(
        None, "Answer with JSON valid against this JSON Schema (JSON text or a file); "
        '{"type": "object"} for any JSON object.', metavar="SCHEMA", parse=_json_object)
    grammar: str | None = option(
        None, "Answer in this grammar: GBNF (llama.cpp's) or Lark (llguidance's), text or a "
        "file.", metavar="GRAMMAR", parse=_text_or_file)
    regex: str | None = option(None, "Answer with text that matches this regular expression.",
                               metavar="PATTERN")
    choice: tuple[str, ...] = option((), "Answer with exactly one of these strings. "
                                     "Repeatable.", metavar="TEXT")
    grammar_trigger: str | None = option(
        None, "Leave the answer free until its text ends with TEXT (special tokens as their "
        "text), then hold what follows to the grammar; without it the grammar holds from the "
        "first token.", metavar="TEXT", cli=False)
    logit_bias: dict[str, float] = option(
        {}, "Add BIAS (-100 to 100, as OpenAI's; -100 bans the token) to a token's score "
        "before sampling. Repeatable.", low=-MAX_BIAS, high=MAX_BIAS, metavar="TOKEN_ID=BIAS",
        parse=_assignments(float, "TOKEN_ID=BIAS", "15043=-100"))
    speculative: str | None = option(
        "off", "Speculative decoding: a drafter proposes the next tokens and one decode of "
        "every model checks them, exactly (the same tokens greedy, the same distribution "
        "sampled). lookup: from the answer's own context; model: the draft model; guided: the "
        "draft model guided by the ARMs; arm: an ARM that is a small model of its own.",
        choices=("off",) + DRAFTERS, env="EDGE_GENARM_SPECULATIVE")
    draft_tokens: int | None = option(
        None, f"speculative: the most draft tokens one check takes (1 to {MAX_DRAFT}; fewer "
        f"after rejections); at load, every context reserves K + 1 rows of logits per sequence "
        f"(default {DRAFT_TOKENS}); a request's default is what its model reserved.", low=1,
        high=MAX_DRAFT, metavar="K", show=str(DRAFT_TOKENS))
    system: str | None = option(None, "System message for the chat template.", metavar="TEXT",
                                wire=False)
    # not an option: the Pydantic class a Python caller's response_format named, which its
    # results are parsed into
    response_model: type | None = None

    def validate(self) -> None:
        """Every value against its declaration, and the settings that go together."""
        fields.check(self)
        if self.method in ("best-of-n", "search") and self.n != 1:
            raise UserError(f"{self.method} returns one answer; ask for n = 1, not {self.n}",
                            "n")
        if self.segment not in SEGMENTS and not (self.segment.isdigit() and
                                                 int(self.segment) > 0):
            raise UserError(f"segment must be {', '.join(SEGMENTS)} or a token count (a whole "
                            f"number > 0), got {self.segment!r}", "segment")
        if self.search_fluency and not self.ranks_by_arms:
            raise UserError(f"search_fluency weights the base's log-probs in the arm and "
                            f"arm-base scores; search_score {self.search_score} has none to "
                            "weigh: rank by arm or arm-base, or drop search_fluency",
                            "search_fluency")
        constraints = self.constraint_fields
        if len(constraints) > 1:
            raise UserError(f"{' and '.join(constraints)} each constrain the answer: give one",
                            constraints[1])
        if self.grammar_trigger is not None and not constraints:
            raise UserError("grammar_trigger engages a grammar: give json_schema, grammar, "
                            "regex or choice with it", "grammar_trigger")
        if constraints and self.ignore_eos:
            raise UserError(f"ignore_eos would keep a {constraints[0]} answer from ending where "
                            "it is complete: drop one", "ignore_eos")
        for key in self.logit_bias:
            if not key.strip().isdigit():
                raise UserError(f"logit_bias {key!r}: keys are token ids (integers as strings, "
                                'as OpenAI\'s: {"15043": -100})', "logit_bias")
        if self.drafts and self.method != "genarm":
            raise UserError(f"speculative decoding verifies GenARM's guided target, one answer "
                            f"at a time; method {self.method} does not decode that way: drop "
                            "one", "speculative")

    @property
    def constraint_fields(self) -> list[str]:
        """The options that constrain its answers (at most one may be given)."""
        return [name for name in ("json_schema", "grammar", "regex", "choice")
                if getattr(self, name)]

    @property
    def ranks_by_arms(self) -> bool:
        """Whether its search score is the ARMs' reward (arm, arm-base): it needs an ARM
        switched on, and holds the base's log-probs that search_fluency weighs."""
        return self.search_score in ("arm", "arm-base")

    @property
    def needs_reward_model(self) -> bool:
        return self.method in ("pargs", "args", "best-of-n") or (
            self.method == "search" and self.search_score == "reward")

    @property
    def answers(self) -> int:
        """The sequences its answers decode side by side (best-of-n's samples, search's
        candidates)."""
        return {"best-of-n": self.samples,
                "search": self.search_width * self.beams}.get(self.method, self.n)

    @property
    def drafts(self) -> bool:
        """Whether its answers draft (speculative decoding is on)."""
        return self.speculative not in (None, "off")

    def cells(self, n_ctx: int, answers: int) -> int:
        """The most KV cells `answers` of its answers can take, each ending at n_ctx."""
        return min(n_ctx, len(self.prompt_ids) + self.max_tokens) * answers


@dataclass(frozen=True)
class Config:
    """A load and the defaults of its requests (a preset's and the user's options merged)."""
    load: LoadConfig = field(default_factory=LoadConfig)
    request: RequestParams = field(default_factory=RequestParams)
    preset: str | None = None

    def validate(self) -> "Config":
        self.load.validate()
        self.request.validate()
        if self.request.needs_reward_model and self.load.reward_model is None:
            what = "search_score reward" if self.request.method == "search" else \
                f"method {self.request.method}"
            raise UserError(f"{what} needs a reward model: pass --reward-model RM.gguf (or a "
                            "preset that names one)",
                            "search_score" if self.request.method == "search" else "method")
        return self

    @property
    def name(self) -> str:
        """The model's name in results and /v1/models: the preset's, else the base file's."""
        base = split_adapter(self.load.base)[0]
        return self.preset or (base[1:] if base.startswith("@") else Path(base).stem)


def split(values: dict, load_cls: type = LoadConfig) -> tuple[dict, dict]:
    """Option values by name -> (load's, request's); a name both declare (arms, candidates)
    goes to the load, as `load()` and the command line mean it."""
    load = fields.spec_map(load_cls)
    return ({k: v for k, v in values.items() if k in load},
            {k: v for k, v in values.items() if k not in load})
