"""The guided decoding engine: a base context, its ARM contexts and the live sequences.

Contract:
- `Engine.load(EngineConfig)` loads each distinct GGUF model once, gives the base and every ARM a
  context of its own (a LoRA ARM gets a context of the already loaded base model with the adapter
  attached), and refuses pairs whose vocabularies differ.
- A `Sequence` holds one conversation's token ids and, per context, how many of them that
  context's KV cache holds. Several sequences (one sequence id each) can live in one engine.
  Others read a sequence (`tokens`, `behind`); only the engine's methods write it: `step`,
  `extend` (tokens appended without a decode), `truncate`, `copy_prefix`, `fork`, `release`.
- `Engine.step(seqs, new_tokens, alphas)` appends tokens to sequences, brings the base and,
  for each ARM, the rows whose weight for it is not 0 up to date (an ARM switched back on catches
  up on what it missed) and returns guided scores, one row per sequence, each row with its own
  ARM weights. `advance` is `step` with the ARMs' own alphas for every row. Every model step of
  every context (base, ARMs, draft model, reward model) happens in this module.
- Sequence ids are the engine's: `new_sequence()` takes one from a pool of `n_seq_max` ids
  sized at load, `release(seq)` forgets its cache in every context and returns the id, so two
  conversations on one engine never share a cache.
- `fork(src, dsts)` and `copy_prefix(src, dst, n)` give sequences the cache of another without
  decoding it again (llama_memory_seq_cp in every context that holds it).
- With `EngineConfig.draft`, `engine.drafter` is a context of a draft model (sharing the base's
  tokenizer; a model already loaded, as a small ARM's, shares its weights) that follows every
  sequence like an ARM's. `draft_step(seqs, tokens, own, weights)` steps it (the rows where
  `own`) and the ARMs weighed, one token per sequence, and returns the weighted rows; the ARM
  rows it computed are held ahead for the next `step` of those sequences (a verify), which
  reads them instead of decoding those positions again. What to draft and what to keep is
  `speculative.py`'s.
- With `EngineConfig.reward`, `engine.reward` is a `reward.RewardModel` (the head and the
  candidates' bookkeeping) and `engine.reward_context` its context, which follows every sequence
  like an ARM's (released, truncated, copied with it). `candidate_rewards(seqs, candidates)`
  scores each sequence's candidate next tokens in one decode (PARGS, ARGS);
  `sequence_rewards(seqs)` scores whole sequences (best-of-N).
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence as Seq

import numpy as np

from . import guidance, memory
from .errors import (ContextFullError, EngineError, IncompatibleModelsError, ModelFileError,
                     UnknownArmError)
from .gguf_file import GGUFInfo, inspect_gguf
from .llama import Context, ContextSettings, LoraAdapter, Model
from .reward import RewardModel, read_head
from .reward import context_settings as reward_context


@dataclass
class ArmSpec:
    path: Path                   # a full model, or a LoRA adapter of the base
    alpha: float = 1.0
    name: str = ""
    adapter: Path | None = None  # a LoRA adapter of `path` (a full model other than the base)
    n_gpu_layers: int | None = None  # its own model's GPU layers (None: the base's setting)

    def __post_init__(self):
        self.path = Path(self.path)
        self.adapter = Path(self.adapter) if self.adapter else None
        self.name = self.name or (self.adapter or self.path).stem


@dataclass
class EngineConfig:
    base: Path
    arms: list[ArmSpec] = field(default_factory=list)
    context: ContextSettings = field(default_factory=ContextSettings)
    n_gpu_layers: int = 0
    base_adapter: Path | None = None  # a LoRA adapter the base runs with (MODEL+ADAPTER)
    reward: RewardSpec | None = None  # a scalar reward model, for tokenwise methods (PARGS)
    repack: str = "auto"  # llama.cpp's extra CPU buffer types: auto, on or off
    draft: Path | None = None          # a draft model for speculative decoding
    draft_adapter: Path | None = None  # a LoRA it runs with (MODEL+ADAPTER)


@dataclass
class RewardSpec:
    path: Path                   # a full model with a reward head, or a LoRA of the base with one
    candidates: int = 10         # the most candidate tokens one step scores per sequence
    adapter: Path | None = None  # a LoRA with the head, of `path` (a model other than the base)

    def __post_init__(self):
        self.path = Path(self.path)
        self.adapter = Path(self.adapter) if self.adapter else None


@dataclass
class Arm:
    name: str
    alpha: float
    context: Context
    kind: str  # "model" or "lora"
    path: Path


class Sequence:
    """One token stream (prompt and generation) and how far each context has read it.

    Read `tokens` (never change the list) and `behind(ctx)`; every write is the engine's, so that
    a sequence's tokens and each context's cache of them cannot disagree."""
    __slots__ = ("seq_id", "_tokens", "_n_past", "_ahead")

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self._tokens: list[int] = []
        self._n_past: dict[int, int] = {}  # id(context) -> tokens in its cache
        # id(context) -> (position, its rows): rows computed ahead of a step, which reads them
        # instead of decoding those positions again (a model drafter's ARM rows)
        self._ahead: dict[int, tuple[int, list]] = {}

    @property
    def tokens(self) -> list[int]:
        """The token ids so far (the engine's list: read it, never change it)."""
        return self._tokens

    def behind(self, ctx: Context) -> int:
        """How many of the tokens `ctx`'s cache holds for this sequence."""
        return self._n_past.get(id(ctx), 0)

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id}, {len(self._tokens)} tokens)"


def _hold(seq: Sequence, ctx: Context, n: int) -> None:
    """Record that `ctx`'s cache now holds seq's first n tokens (whoever decoded them)."""
    seq._n_past[id(ctx)] = n


class Engine:
    def __init__(self, base: Context, arms: list[Arm], models: list[Model],
                 reward: tuple[RewardModel, Context] | None = None,
                 drafter: Context | None = None):
        self.base = base
        self.arms = arms
        self.reward, self.reward_context = reward or (None, None)
        self.drafter = drafter
        self._models = models
        self.n_vocab = guidance.common_vocab_size(
            [base.model.n_vocab] + [a.context.model.n_vocab for a in arms])
        self.n_ctx = base.n_ctx
        self.n_seq_max = base.settings.n_seq_max
        self.max_draft = base.settings.n_logits - 1  # draft tokens one verify can check
        self._free_ids = list(reversed(range(self.n_seq_max)))  # a stack: id 0 is taken first

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig) -> "Engine":
        base_info = inspect_gguf(config.base)
        if base_info.is_adapter:
            raise ModelFileError(
                f"{config.base} is a LoRA adapter, not a model: pass a full GGUF model as --base "
                f"and the adapter as --arm {config.base}")
        if config.base_adapter is not None:
            inspect_gguf(config.base_adapter).check_adapter_fits(base_info)
        for spec in config.arms:  # before memory.check prices each file as what it claims
            if spec.adapter is not None and inspect_gguf(spec.path).is_adapter:
                raise ModelFileError(f"{spec.path} is a LoRA adapter; an ARM's model+adapter "
                                     "pair needs the full model first: MODEL.gguf+ADAPTER.gguf")
        if config.draft is not None and config.draft_adapter is None and \
                inspect_gguf(config.draft).is_adapter:
            raise ModelFileError(f"{config.draft} is a LoRA adapter; a draft model is a full "
                                 "model (MODEL.gguf, or MODEL.gguf+ADAPTER.gguf)")
        if config.reward is not None:  # before the dry runs price its context
            reward_context(config.context, config.reward.candidates)
        memory.check(config)
        models: dict = {}
        contexts: list[Context] = []
        try:
            base_model = _load_model(models, config.base, config.n_gpu_layers, config.repack)
            base = Context(base_model, config.context, config.base_adapter and
                           LoraAdapter(base_model, config.base_adapter))
            contexts.append(base)
            arms = []
            for spec in config.arms:
                arm = _load_arm(spec, base_model, base_info, models, config)
                contexts.append(arm.context)
                arms.append(arm)
            reward = config.reward and _load_reward(config.reward, base_model, base_info,
                                                    models, config)
            if reward is not None:
                contexts.append(reward[1])
            drafter = config.draft and _load_drafter(config, base_model, models)
            if drafter is not None:
                contexts.append(drafter)
        except BaseException:
            for ctx in contexts:
                ctx.close()
            for model in models.values():
                model.close()
            raise
        return cls(base, arms, list(models.values()), reward, drafter)

    def close(self) -> None:
        for ctx in self._contexts():
            ctx.close()
        for model in self._models:
            model.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sequences ------------------------------------------------------------------------------
    @property
    def model(self) -> Model:
        return self.base.model

    @contextlib.contextmanager
    def alphas_zeroed(self) -> Iterator[None]:
        """Run the base alone for a while (ARMs are not stepped), then restore every alpha."""
        saved = [a.alpha for a in self.arms]
        for arm in self.arms:
            arm.alpha = 0.0
        try:
            yield
        finally:
            for arm, alpha in zip(self.arms, saved):
                arm.alpha = alpha

    def active_arms(self) -> list[Arm]:
        return [a for a in self.arms if a.alpha != 0.0]

    @property
    def free_sequences(self) -> int:
        """Sequence ids not in use."""
        return len(self._free_ids)

    def new_sequence(self) -> Sequence:
        """An empty sequence on an id from the pool."""
        if not self._free_ids:
            raise EngineError(f"all {self.n_seq_max} sequence ids are in use; release one or "
                              "load the engine with more parallel sequences")
        return Sequence(self._free_ids.pop())

    def release(self, seq: Sequence) -> None:
        """Forget a sequence's cache in every context and return its id to the pool."""
        self._clear(seq)
        if seq.seq_id not in self._free_ids:
            self._free_ids.append(seq.seq_id)

    def _clear(self, seq: Sequence) -> None:
        for ctx in self._contexts():
            ctx.seq_remove(seq.seq_id)
        self._drop_candidates(seq)
        seq._tokens.clear()
        seq._n_past.clear()
        seq._ahead.clear()

    def extend(self, seq: Sequence, tokens: Seq[int]) -> None:
        """Append tokens to a sequence without decoding them: each context catches up when it
        next steps the sequence (a sequence to score, an answer's last token). Nothing is
        refused here: a step that would decode past the context refuses it."""
        seq._tokens.extend(tokens)

    def copy_prefix(self, src: Sequence, dst: Sequence, n: int) -> None:
        """Make dst's first n tokens those of src, copying whatever part of them each context
        holds; a context that holds fewer catches up when dst is next stepped."""
        self._clear(dst)
        dst._tokens.extend(src.tokens[:n])
        for ctx in self._contexts():
            held = min(n, src.behind(ctx))
            if held:
                ctx.seq_copy(src.seq_id, dst.seq_id, 0, held)
            _hold(dst, ctx, held)

    def fork(self, src: Sequence, dsts: Seq[Sequence]) -> None:
        """Each of dsts becomes a copy of src (tokens and every context's cache)."""
        for dst in dsts:
            self.copy_prefix(src, dst, len(src.tokens))

    def alphas(self, overrides: dict[str, float] | None = None) -> np.ndarray:
        """The ARMs' weights (alphas) in the engine's ARM order: their own, with `overrides` by
        name; an unknown name or a weight that is not finite raises `UnknownArmError`."""
        out = np.array([a.alpha for a in self.arms], dtype=np.float64)  # as given; f32 at use
        for name, value in (overrides or {}).items():
            names = [a.name for a in self.arms]
            if name not in names:
                raise UnknownArmError(f"no ARM named {name!r}; the ARMs are "
                                      f"{', '.join(names) or 'none'}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                    not np.isfinite(value):
                raise UnknownArmError(f"the weight of ARM {name!r} must be a finite number, "
                                      f"not {value!r}")
            out[names.index(name)] = value
        return out

    def truncate(self, seq: Sequence, n: int) -> None:
        """Keep the first n tokens of a sequence, in its list and in every KV cache."""
        del seq._tokens[n:]
        seq._ahead.clear()
        for ctx in self._contexts():
            if seq.behind(ctx) > n:
                ctx.seq_remove(seq.seq_id, n, -1)
                _hold(seq, ctx, n)

    # -- the step -------------------------------------------------------------------------------
    def advance(self, seqs: Seq[Sequence], new_tokens: Seq[Seq[int]]) -> np.ndarray:
        """`step` with the ARMs' own alphas for every sequence; one row per sequence, or a
        single row when one sequence is given."""
        alphas = np.tile(self.alphas(), (len(seqs), 1))
        rows = self.step(seqs, new_tokens, alphas)
        return rows if len(seqs) > 1 else rows[0]

    def step(self, seqs: Seq[Sequence], new_tokens: Seq[Seq[int]], alphas: np.ndarray,
             outputs: Seq[int] | None = None, rewards: Seq[float | None] | None = None):
        """Append tokens; return guided scores for each sequence's next token (rows x vocab).

        alphas[r, i] is sequence r's weight for ARM i: an ARM context decodes only the
        sequences whose weight for it is not 0, so requests with different weights share one
        batch. With `outputs`, sequence r gives the rows after each of its last outputs[r] new
        tokens (a draft verified in one decode; at most the contexts' n_logits), all sequences'
        rows in order. With `rewards`, it returns (scores, {row: reward row}) where a reward
        row is sum_i alphas[r, i] * log_softmax(ARM i) - rewards[r] * log_softmax(base) for
        each row of the sequences where rewards[r] is not None: GenARM's token-level reward of
        every next token (against the base's with rewards[r] = sum_i alphas[r, i]).
        """
        self._append(seqs, new_tokens)
        counts = np.ones(len(seqs), dtype=np.int64) if outputs is None else np.asarray(outputs)
        starts = np.cumsum(counts) - counts
        guided = np.array(self._catch_up(self.base, seqs, counts)[:, :self.n_vocab],
                          dtype=np.float32)
        base_weights = np.repeat([np.nan if b is None else b for b in rewards], counts) \
            if rewards is not None else np.full(len(guided), np.nan)
        wanted = ~np.isnan(base_weights)
        reward_rows = {int(r): np.float32(-base_weights[r]) * guidance.log_softmax(guided[r])
                       for r in np.flatnonzero(wanted)}
        for i, arm in enumerate(self.arms):
            on = np.flatnonzero(alphas[:, i])
            if on.size:
                logits = self._catch_up(arm.context, [seqs[r] for r in on], counts[on])
                if outputs is None:
                    rows, weights = on, alphas[on, i]
                else:
                    rows = np.concatenate([np.arange(starts[r], starts[r] + counts[r])
                                           for r in on])
                    weights = np.repeat(alphas[on, i], counts[on])
                for j in np.flatnonzero(wanted[rows]):  # before add_weighted reads the view
                    reward_rows[int(rows[j])] += np.float32(weights[j]) * \
                        guidance.log_softmax(logits[j])[:self.n_vocab]
                guidance.add_weighted(guided, rows, weights, logits)
        for seq in seqs:
            seq._ahead.clear()
        return guided if rewards is None else (guided, reward_rows)

    def draft_step(self, seqs: Seq[Sequence], new_tokens: Seq[Seq[int]], own: Seq[bool],
                   weights: np.ndarray) -> np.ndarray:
        """Append tokens; return each sequence's row for its next token from the draft model
        (where `own[r]`) plus weights[r, i] times ARM i's log-probs, one decode per context.
        The ARM rows are held for the sequence's next `step`, which reads them instead of
        decoding those positions again."""
        self._append(seqs, new_tokens)
        out = np.zeros((len(seqs), self.n_vocab), dtype=np.float32)
        mine = [r for r, o in enumerate(own) if o]
        if mine:
            out[mine] = self._catch_up(self.drafter, [seqs[r] for r in mine])[:, :self.n_vocab]
        for i, arm in enumerate(self.arms):
            on = np.flatnonzero(weights[:, i])
            if on.size:
                logits = self._catch_up(arm.context, [seqs[r] for r in on])
                guidance.add_weighted(out, on, weights[on, i], logits)
                for r, row in zip(on, logits):
                    _hold_ahead(seqs[r], arm.context, row)
        return out

    def score(self, seq: Sequence, tokens: Seq[int], alphas: np.ndarray | None = None
              ) -> np.ndarray:
        """Append tokens to seq; guided scores after each of them (len(tokens) rows), from one
        decode per context: teacher-forced scoring, or checking drafted tokens at once."""
        alphas = self.alphas() if alphas is None else alphas
        self._append([seq], [tokens])
        n, rows = len(tokens), np.arange(len(tokens))
        guided = np.array(self._catch_up(self.base, [seq], n)[:, :self.n_vocab], dtype=np.float32)
        for arm, w in zip(self.arms, alphas):
            if w:
                logits = self._catch_up(arm.context, [seq], n)
                guidance.add_weighted(guided, rows, np.full(n, w, dtype=np.float32), logits)
        return guided

    # -- the reward model's context ---------------------------------------------------------------
    def candidate_rewards(self, seqs: Seq[Sequence], candidates: Seq[Seq[int]]
                          ) -> list[np.ndarray]:
        """r(sequence + t) for every t of candidates[i], per sequence: each sequence's prefix
        brought up to date in the reward model's context, forked into one candidate sequence
        per token (llama_memory_seq_cp: cells shared, nothing copied), every candidate of every
        sequence decoded in one batch. At the next call the candidate that a sequence went on
        with becomes its next cell (no decode again) and the others are dropped."""
        model, ctx = self.reward, self.reward_context
        self._catch_up_reward(seqs, 0)
        entries = []
        for seq, toks in zip(seqs, candidates):
            end = len(seq._tokens)
            for cid, tok in zip(model.fork(seq.seq_id, end, toks), toks):
                ctx.seq_copy(seq.seq_id, cid, 0, end)
                entries.append((cid, [int(tok)], end))
        if model.batched:
            rewards = model.head(ctx.decode(entries))
        else:  # the head reads each decode's rows before the next decode overwrites them
            rewards = np.concatenate([model.head(ctx.decode([e])) for e in entries])
        return model.split(rewards, candidates)

    def sequence_rewards(self, seqs: Seq[Sequence]) -> np.ndarray:
        """r of each whole sequence (its last token's hidden state), one decode for all."""
        return self.reward.head(self._catch_up_reward(seqs, 1))

    def _catch_up_reward(self, seqs: Seq[Sequence], n_out: int) -> np.ndarray:
        """The reward context brought up to date, each sequence's chosen candidate first kept
        as its own cell and its candidates dropped."""
        ctx = self.reward_context
        for seq in seqs:
            cid = self.reward.chosen(seq.seq_id, seq._tokens, seq.behind(ctx))
            if cid is not None:
                held = seq.behind(ctx)
                ctx.seq_copy(cid, seq.seq_id, held, held + 1)
                _hold(seq, ctx, held + 1)
            self._drop_candidates(seq)
        return self._catch_up(ctx, seqs, n_out)

    def _drop_candidates(self, seq: Sequence) -> None:
        if self.reward is not None:
            for cid in self.reward.drop(seq.seq_id):
                self.reward_context.seq_remove(cid)

    def _append(self, seqs: Seq[Sequence], new_tokens: Seq[Seq[int]]) -> None:
        for seq, toks in zip(seqs, new_tokens):
            if len(seq._tokens) + len(toks) > self.n_ctx:
                raise ContextFullError(
                    f"{len(seq._tokens) + len(toks)} tokens do not fit the context of "
                    f"{self.n_ctx}; raise --ctx-size or shorten the input")
            seq._tokens.extend(toks)

    def _catch_up(self, ctx: Context, seqs: Seq[Sequence], n_out=1) -> np.ndarray:
        """Decode what ctx misses of each sequence; the rows of each one's last n_out tokens
        (n_out: one count for all, or one per sequence; 0: only the cache is wanted, nothing is
        decoded again, and the rows that come back are not to be read)."""
        counts = np.broadcast_to(np.asarray(n_out), (len(seqs),))
        entries, reused = [], []
        for seq, n in zip(seqs, counts):
            start, end = seq.behind(ctx), len(seq._tokens)
            rows = _rows_ahead(seq, ctx, end - n, start) if n else []
            if rows is None and start > end - n:  # rows it decoded before: decode them again
                ctx.seq_remove(seq.seq_id, end - n, -1)
                start = end - n
            reused.append(rows or [])
            if start < end:  # the last new token's row comes out, read or not
                entries.append((seq.seq_id, seq._tokens[start:], start,
                                int(min(max(n, 1), end - start))))
        logits = ctx.decode(entries) if entries else np.empty((0, ctx.model.n_vocab), np.float32)
        logits = logits if logits.ndim == 2 else logits[None]
        for seq in seqs:
            _hold(seq, ctx, len(seq._tokens))
        if not any(reused):
            return logits
        out, at = [], 0
        for rows, n in zip(reused, counts):
            out.extend(rows)
            out.extend(logits[at:at + n - len(rows)])
            at += n - len(rows)
        return np.stack(out)

    def _contexts(self) -> list[Context]:
        reward = [self.reward_context] if self.reward_context is not None else []
        drafter = [self.drafter] if self.drafter is not None else []
        return [self.base] + [a.context for a in self.arms] + reward + drafter


def _rows_ahead(seq: Sequence, ctx: Context, first: int, held: int) -> list | None:
    """The rows held ahead for positions first..held-1 of ctx (None: not all of them)."""
    if held <= first:
        return []
    at, rows = seq._ahead.get(id(ctx), (0, []))
    if at <= first and held <= at + len(rows):
        return rows[first - at:held - at]
    return None


def _hold_ahead(seq: Sequence, ctx: Context, row: np.ndarray) -> None:
    """Hold ctx's row for seq's last position ahead of its next step, if it follows on from
    the rows held so far."""
    at, rows = seq._ahead.setdefault(id(ctx), (len(seq._tokens) - 1, []))
    if at + len(rows) == len(seq._tokens) - 1:
        rows.append(np.array(row))


def _load_model(models: dict, path: Path, n_gpu_layers: int, repack: str) -> Model:
    """Each distinct file is loaded once per placement; an ARM that is the base file, placed
    alike, shares its weights."""
    key = (Path(path).resolve(), n_gpu_layers)
    if key not in models:
        models[key] = Model(path, n_gpu_layers=n_gpu_layers, repack=repack)
    return models[key]


def _load_arm(spec: ArmSpec, base_model: Model, base_info: GGUFInfo,
              models: dict, config: EngineConfig) -> Arm:
    info = inspect_gguf(spec.path)
    layers = config.n_gpu_layers if spec.n_gpu_layers is None else spec.n_gpu_layers
    if spec.adapter is not None:  # a LoRA of another model: a small ARM guiding a larger base
        inspect_gguf(spec.adapter).check_adapter_fits(info)
        model = _load_model(models, spec.path, layers, config.repack)
        check_vocab(base_model, model)
        adapter = LoraAdapter(model, spec.adapter)
        return Arm(spec.name, spec.alpha, Context(model, config.context, adapter), "lora",
                   spec.adapter)
    if info.is_adapter:
        info.check_adapter_fits(base_info)
        if layers != config.n_gpu_layers:
            raise IncompatibleModelsError(
                f"the ARM {spec.name!r} is a LoRA of the base and runs where the base's layers "
                f"run; its GPU layers follow the base's ({config.n_gpu_layers}), not {layers}")
        adapter = LoraAdapter(base_model, spec.path)
        return Arm(spec.name, spec.alpha, Context(base_model, config.context, adapter), "lora",
                   spec.path)
    model = _load_model(models, spec.path, layers, config.repack)
    check_vocab(base_model, model)
    return Arm(spec.name, spec.alpha, Context(model, config.context), "model", spec.path)


def check_vocab(base: Model, arm: Model, role: str = "an ARM") -> None:
    """Refuse an ARM (or another model of `role`) whose tokens differ from the base's over
    their common range."""
    if base is arm:
        return
    if base.vocab_type != arm.vocab_type:
        raise IncompatibleModelsError(
            f"{arm.path} uses another tokenizer type than the base {base.path} "
            f"({arm.vocab_type} vs {base.vocab_type}); {role} must share the base's tokenizer")
    for kind in ("bos", "eos", "eot"):
        if base.special_token(kind) != arm.special_token(kind):
            raise IncompatibleModelsError(
                f"{arm.path} has another {kind} token than the base {base.path} "
                f"({arm.special_token(kind)} vs {base.special_token(kind)}); {role} must share "
                "the base's tokenizer")
    mismatch = guidance.first_token_mismatch(base.token_texts, arm.token_texts)
    if mismatch is not None:
        raise IncompatibleModelsError(
            f"{arm.path} has another vocabulary than the base {base.path}: token {mismatch} is "
            f"{base.token_texts[mismatch]!r} in the base and {arm.token_texts[mismatch]!r} "
            f"in the {role.removeprefix('an ').removeprefix('a ')}; {role} must share the base's tokenizer")



def _load_drafter(config: EngineConfig, base_model: Model, models: dict) -> Context:
    """The draft model's context: one logits row per sequence, as a plain step reads."""
    if config.draft_adapter is not None:
        inspect_gguf(config.draft_adapter).check_adapter_fits(inspect_gguf(config.draft))
    model = _load_model(models, config.draft, config.n_gpu_layers, config.repack)
    check_vocab(base_model, model, "a draft model")
    adapter = LoraAdapter(model, config.draft_adapter) if config.draft_adapter else None
    return Context(model, replace(config.context, n_logits=1), adapter)


def _load_reward(spec: RewardSpec, base_model: Model, base_info: GGUFInfo, models: dict,
                 config: EngineConfig) -> tuple[RewardModel, Context]:
    """The reward model's context: hidden states out, k candidate sequence ids per sequence."""
    n, k = config.context.n_seq_max, spec.candidates
    info = inspect_gguf(spec.path)
    head_file = spec.adapter or spec.path
    head = read_head(head_file)  # before any weights load: a file without a head is refused
    settings = reward_context(config.context, k)
    if spec.adapter is not None:
        inspect_gguf(spec.adapter).check_adapter_fits(info)
    elif info.is_adapter:
        info.check_adapter_fits(base_info)
        return (RewardModel(head, n, k, base_model),
                Context(base_model, settings, LoraAdapter(base_model, spec.path)))
    model = _load_model(models, spec.path, config.n_gpu_layers, config.repack)
    check_vocab(base_model, model, "a reward model")
    adapter = LoraAdapter(model, spec.adapter) if spec.adapter is not None else None
    return RewardModel(head, n, k, model), Context(model, settings, adapter)
