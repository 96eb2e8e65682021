"""The request scheduler: requests in, events out, one llama.cpp batch per context per step.

Contract:
- `Scheduler(engine)` takes sequences from the engine's id pool and gives them back (all of
  them at `close()`, so that another scheduler can use the engine after it). `submit`
  builds a `Request`'s policy, which checks it at once (an unknown ARM name, a bad value, a
  prompt that leaves no room in the context raise `UserError`), and returns a `Handle`;
  `cancel(handle)` ends a request, its sequences freed at the start of the next step. Both are
  safe from other threads while one thread calls `step()`.
- `step()` admits waiting requests (first come, first served) while the engine has sequence
  ids free (or idle ones to give up) and KV cells to spare, then decodes every live sequence's
  new tokens in one batch per context, each row with its own request's ARM weights (an ARM
  context decodes only the rows that use it). What happens next is each request's own
  `policy.Policy`, built and checked at submit: its processors (the end-of-generation mask,
  PARGS/ARGS's rerank with the reward model), its penalties and sampler with the answer's own
  random generator, and its finish hook (best-of-n holds and judges; a hook reads an answer
  and returns the events to send). Drafting is the `speculative.Proposer`'s: the scheduler
  feeds each answer what its proposal says and takes back the tokens the proposer keeps. The
  scheduler keeps admission, prefix sharing, forks and KV cells, and is the only writer of its
  answers and handles. `step()` returns that step's `Event`s (events.py: one per new token, the
  last of each answer with its finish reason and `Usage`); log-probs are over the processed
  row, before the penalties.
- Shared prefixes: a prompt that starts with tokens another sequence holds (a live one, or a
  finished one kept while its id is idle) copies them instead of decoding them again.
- `n > 1` answers decode the prompt once, then fork; answer j samples with seed + j, so it is
  the answer that the same request alone with seed + j gives.
- An answer whose finish hook `waits` (a search's candidate at the end of its segment) is held:
  not decoded until the hook's `search.Regroup` after a step, which ends the request with one
  answer or makes each answer a fork of another (its own cells freed, the other's shared) with
  a new random generator.
- Errors belong to one request: an answer that outgrows the context ends with finish reason
  "context_full" and the others go on; a failure inside llama.cpp raises `EngineError` (not a
  `UserError`), for a server to tell a 500 from a 400.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import numpy as np

from .engine import Engine, Sequence
from .config import MAX_TOP_LOGPROBS, METHODS
from .events import Event, Handle, TokenLogprob, Usage, logprob_of
from .constraints import Constraint
from .policy import Ended, Policies, Policy, Request, RowView, run_processors
from .search import Regroup
from .speculative import Drafting, Proposal, Proposer
from .text import TextStream

__all__ = ["Event", "Handle", "MAX_TOP_LOGPROBS", "METHODS", "Request", "Scheduler",
           "TokenLogprob", "Usage"]


@dataclass
class _Slot:
    """One answer being generated: its sequence, sampler state and text so far."""
    handle: Handle
    index: int
    seq: Sequence
    pending: list[int]
    text: TextStream
    rng: np.random.Generator
    usage: Usage
    forks: list[Sequence] = field(default_factory=list)  # ids held for n > 1, filled after prefill
    tokens: list[int] = field(default_factory=list)
    t_first: float = 0.0
    drafting: Drafting | None = None  # its speculation state (the proposer's to write)
    constraint: Constraint | None = None  # its grammar's state (it has read `tokens`)
    held: bool = False  # waits, not decoded, for its policy's verdict (a search's segment)
    ended: str | None = None  # a waiting answer's finish reason, if it has ended

    @property
    def policy(self) -> Policy:
        return self.handle.policy

    @property
    def max_tokens(self) -> int:
        return self.handle.request.max_tokens


class Scheduler:
    def __init__(self, engine: Engine, share_prefixes: bool = True):
        self.engine = engine
        self.share_prefixes = share_prefixes
        self._lock = threading.Lock()
        self._waiting: deque[Handle] = deque()
        self._cancelled: dict[Handle, str] = {}  # handle -> finish reason
        self._slots: list[_Slot] = []
        self._idle: OrderedDict[int, Sequence] = OrderedDict()  # finished, cache kept
        self.policies = Policies(engine)
        self.proposer = Proposer(engine)

    # -- from any thread --------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        if request.seed is None:  # a fresh one, kept on the handle's request for the record
            request = replace(request, seed=secrets.randbelow(2**31))
        policy = self.policies.build(request)
        handle = Handle(policy.request, policy, time.perf_counter())
        with self._lock:
            self._waiting.append(handle)
        return handle

    def cancel(self, handle: Handle, interrupt: bool = False) -> None:
        """End a request at the next step: its sequences are freed ("cancelled"), or with
        `interrupt` kept with what they hold for a later prompt ("interrupted")."""
        with self._lock:
            self._cancelled[handle] = "interrupted" if interrupt else "cancelled"

    def forget(self) -> None:
        """Free the sequences kept for their prefixes (from the stepping thread)."""
        while self._idle:
            self.engine.release(self._idle.popitem()[1])

    def close(self) -> None:
        """Give every sequence back to the engine, live ones too (from the stepping thread):
        the engine may then serve another scheduler."""
        for slot in list(self._slots):
            self._finish(slot, "cancelled", [], keep=False)
        with self._lock:
            for handle in self._waiting:
                handle.finished = handle.n
            self._waiting.clear()
        self.forget()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet started."""
        with self._lock:
            return len(self._waiting)

    @property
    def cells_in_use(self) -> int:
        """KV cells that live and idle sequences hold (read it from the stepping thread)."""
        return sum(len(s.seq.tokens) for s in self._slots) + \
            sum(len(seq.tokens) for seq in self._idle.values())

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._slots or self._waiting)

    # -- the stepping thread ------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._drop_cancelled(events)
        self._admit(events)
        for slot in [s for s in self._slots if len(s.seq.tokens) + len(s.pending) >
                     self.engine.n_ctx and not s.held]:
            if slot.policy.finish.waits(slot.index, "context_full", slot.seq):
                self._hold(slot, "context_full")
            else:
                self._finish(slot, "context_full", events)
        if any(not s.held for s in self._slots):
            self._decode(events)
        for verdict in self.policies.after_step():
            if isinstance(verdict, Regroup):
                self._regroup(verdict, events)
                continue
            # a judged request: the winner goes on as answer 0
            verdict.handle.sequences = {0: verdict.handle.sequences[verdict.best]}
            events.extend(verdict.events)
        return events

    def _decode(self, events: list[Event]) -> None:
        """One decode of every live answer's new tokens (with the draft its proposal feeds);
        each row through its request's processors, then each answer's next tokens kept by the
        proposer (drawn by its policy, or its draft as the policy accepts it)."""
        slots = [s for s in self._slots if not s.held]
        proposals = self.proposer.propose(slots)
        counts = [p.rows for p in proposals]
        alphas = np.stack([s.policy.alphas for s in slots])
        seqs = [s.seq for s in slots]
        feeds = [p.feed for p in proposals]
        wants = [s.policy.finish.wants_rewards for s in slots]  # the base's weight, or None
        if any(w is not None for w in wants):
            rows, rewards = self.engine.step(seqs, feeds, alphas, counts, rewards=wants)
        else:
            rows, rewards = self.engine.step(seqs, feeds, alphas, counts), {}
        rows = run_processors(rows, [RowView(s, i, tuple(p.draft)) for s, p in
                                     zip(slots, proposals) for i in range(p.rows)])
        now, at = time.perf_counter(), 0
        for slot, proposal in zip(slots, proposals):
            own = rows[at:at + proposal.rows]
            own_rewards = [rewards.get(r) for r in range(at, at + proposal.rows)]
            at += proposal.rows
            for child in self._fork(slot):  # the prompt's one row: no draft yet
                self._emit(child, self.proposer.keep(child, Proposal([]), own), own, now, events,
                           own_rewards)
            self._emit(slot, self.proposer.keep(slot, proposal, own), own, now, events,
                       own_rewards)

    def run(self, handles: Iterable[Handle] = ()) -> Iterator[Event]:
        """Step until every given handle (every request, if none given) is done."""
        handles = list(handles)
        while (not all(h.done for h in handles)) if handles else self.busy:
            yield from self.step()

    # -- admission, forks, finishing ----------------------------------------------------------
    def _drop_cancelled(self, events: list[Event]) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, {}
            for handle in cancelled:
                if handle in self._waiting:
                    self._waiting.remove(handle)
                    handle.finished = handle.n
        for slot in [s for s in self._slots if s.handle in cancelled]:
            reason = cancelled[slot.handle]
            self._finish(slot, reason, events, keep=reason == "interrupted")
        for handle in cancelled:  # answers not forked yet end with their first
            handle.finished = handle.n

    def _admit(self, events: list[Event]) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                handle = self._waiting[0]
                if handle.n > self.engine.free_sequences + len(self._idle):
                    return
                donor, shared = self._best_prefix(list(handle.request.prompt_ids))
                if donor is not None and donor.behind(self.engine.base) < shared:
                    return  # its prefix is being decoded this step: copy it next step
                if not self._make_room(handle.request.cells(self.engine.n_ctx, handle.n),
                                       donor):
                    return  # the KV cells live answers may still need are spoken for
                self._waiting.popleft()
            self._start(handle, donor, shared, events)

    def _make_room(self, cells: int, keep: Sequence | None) -> bool:
        """Whether `cells` more fit beside what live answers may grow to, giving up idle
        sequences' caches (least recently finished first) to make them fit."""
        n_ctx, total = self.engine.n_ctx, self.engine.base.n_cells
        live = sum(s.handle.request.cells(n_ctx, 1 + len(s.forks)) for s in self._slots)

        def fits() -> bool:  # the donor's cells become the new answer's: counted in `cells`
            idle = sum(len(q.tokens) for q in self._idle.values() if q is not keep)
            return live + cells + idle <= total

        for seq_id in list(self._idle):
            if fits():
                break
            if self._idle[seq_id] is not keep:
                self.engine.release(self._idle.pop(seq_id))
        return fits()

    def _start(self, handle: Handle, donor: Sequence | None, shared: int,
               events: list[Event]) -> None:
        request = handle.request
        prompt = list(request.prompt_ids)
        if donor is not None and donor.seq_id in self._idle:
            seq = self._idle.pop(donor.seq_id)   # take the idle sequence over: no copy
            self.engine.truncate(seq, shared)
        else:
            seq = self._acquire()
            if donor is not None:
                self.engine.copy_prefix(donor, seq, shared)
        forks = [self._acquire() for _ in range(handle.n - 1)]
        usage = Usage(prompt_tokens=len(prompt), cached_tokens=shared)
        slot = _Slot(handle, 0, seq, prompt[shared:], TextStream(self.engine, request),
                     np.random.default_rng(request.seed), usage, forks,
                     drafting=handle.policy.drafting(), constraint=handle.policy.constraint())
        answers = [slot] + (self._children(slot) if request.max_tokens == 0 else [])
        self._slots.extend(answers)
        for answer in answers if request.max_tokens == 0 else []:
            self._finish(answer, "length", events)

    def _best_prefix(self, prompt: list[int]) -> tuple[Sequence | None, int]:
        """The sequence whose tokens (a live one's: with those it is about to decode) start
        like prompt for longest; one prompt token is always left to feed."""
        best, best_n = None, 0
        if not self.share_prefixes:
            return best, best_n
        candidates = [(s.seq, s.seq.tokens + s.pending) for s in self._slots] + \
            [(seq, seq.tokens) for seq in self._idle.values()]
        for seq, tokens in candidates:
            n = _common_prefix(tokens, prompt, len(prompt) - 1)
            if n > best_n:
                best, best_n = seq, n
        return best, best_n

    def _acquire(self) -> Sequence:
        if not self.engine.free_sequences:  # the least recently finished idle one gives way
            self.engine.release(self._idle.popitem(last=False)[1])
        return self.engine.new_sequence()

    def _children(self, slot: _Slot) -> list[_Slot]:
        """Slots for answers 1..n-1, on the sequences held for them."""
        request, children = slot.handle.request, []
        for j, seq in enumerate(slot.forks, start=1):
            children.append(_Slot(slot.handle, j, seq, [], TextStream(self.engine, request),
                                  np.random.default_rng(request.seed + j),
                                  Usage(slot.usage.prompt_tokens, 0, slot.usage.cached_tokens),
                                  drafting=slot.handle.policy.drafting(),
                                  constraint=slot.constraint and slot.constraint.copy()))
        slot.forks = []
        return children

    def _fork(self, slot: _Slot) -> list[_Slot]:
        """After the prompt's one decode, answers 1..n-1 take a copy of its cache."""
        if not slot.forks:
            return []
        self.engine.fork(slot.seq, slot.forks)
        children = self._children(slot)
        self._slots.extend(children)
        return children

    def _emit(self, slot: _Slot, tokens: list[int], rows: np.ndarray, now: float,
              events: list[Event], rewards: list) -> None:
        """An answer's next tokens out as events (the one after each row), until one ends it
        or its policy holds it."""
        policy = slot.policy
        for token, row, reward in zip(tokens, rows, rewards):
            if not slot.tokens:
                slot.t_first = now
                slot.usage.time_to_first_token = round(now - slot.handle.submitted, 6)
            slot.tokens.append(token)
            slot.pending = [token]
            top = policy.request.logprobs  # reported before the penalties
            logprob = logprob_of(row, token, top) if top is not None else None
            piece, finish = slot.text.push(token)
            if finish is None and slot.constraint is not None:
                finish = slot.constraint.accept(token)  # "stop" where the grammar is complete
                piece += slot.text.close() if finish else ""
            event = Event(slot.handle, slot.index, token, piece, logprob=logprob)
            events.extend(policy.finish.emit(event, row, reward))
            if policy.finish.waits(slot.index, finish, slot.seq):
                self._hold(slot, finish)
                return
            if finish:
                self._finish(slot, finish, events, event=event)
                return

    def _hold(self, slot: _Slot, finish: str | None) -> None:
        """An answer waits for its policy's verdict, its last token in its sequence where the
        policy reads it."""
        slot.held, slot.ended = True, finish
        if slot.policy.finish.whole(finish):
            self.engine.extend(slot.seq, slot.pending)
            slot.pending = []

    def _regroup(self, verdict: Regroup, events: list[Event]) -> None:
        """A search's verdict on its waiting candidates: the request ends with the winner
        (the others' sequences freed), or each candidate goes on, as a copy of its parent."""
        slots = sorted((s for s in self._slots if s.handle is verdict.handle),
                       key=lambda s: s.index)
        if verdict.winner is not None:
            for slot in slots:
                won = slot.index == verdict.winner
                self._finish(slot, slot.ended if won else "discarded", events, keep=won)
            verdict.handle.sequences = {0: slots[verdict.winner].seq}
            return
        for slot, parent, seed in zip(slots, verdict.parents, verdict.seeds):
            if parent != slot.index:
                src = slots[parent]
                self.engine.fork(src.seq, [slot.seq])  # its own cells freed, the parent's shared
                slot.tokens, slot.pending = list(src.tokens), list(src.pending)
                slot.text = src.text.copy()
                slot.constraint = src.constraint and src.constraint.copy()
            slot.rng = np.random.default_rng(seed)
            slot.held, slot.ended = False, None
        events.extend(verdict.events)

    def _finish(self, slot: _Slot, reason: str, events: list[Event], keep: bool = True,
                event: Event | None = None) -> None:
        """End an answer: its last event gets the reason and usage; its sequence goes idle
        (cache kept for a later prompt that starts the same way) or, cancelled, free."""
        hook = slot.policy.finish
        if event is None:
            event = Event(slot.handle, slot.index, None, slot.text.close())
            events.extend(hook.emit(event))
        usage = slot.usage
        usage.completion_tokens = usage.decoded_tokens = len(slot.tokens)
        steps, elapsed = len(slot.tokens) - 1, time.perf_counter() - slot.t_first
        usage.tokens_per_second = round(steps / elapsed, 3) if steps > 0 and elapsed > 0 else 0.0
        usage.finish_reason = event.finish_reason = reason
        if slot.constraint is not None and slot.constraint.error:
            usage.error = f"the answer broke its {slot.policy.grammar.field}: " \
                f"{slot.constraint.error}"
        if slot.drafting is not None:
            usage.drafted_tokens, usage.accepted_tokens = (slot.drafting.drafted,
                                                           slot.drafting.accepted)
        event.usage = usage
        self._slots.remove(slot)
        slot.handle.finished += 1
        slot.handle.sequences[slot.index] = slot.seq
        if hook.whole(reason):  # its last token, never decoded, joins the sequence it reads
            self.engine.extend(slot.seq, slot.pending)
            slot.pending = []
        events.extend(hook.ended(Ended(slot.handle, slot.index, reason, event, slot.seq)))
        for seq in [slot.seq] + slot.forks:
            if keep and seq is slot.seq and seq.tokens:
                self._idle[seq.seq_id] = seq
            else:
                self.engine.release(seq)
        slot.forks = []


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n, limit = 0, min(len(a), len(b), limit)
    while n < limit and a[n] == b[n]:
        n += 1
    return n
