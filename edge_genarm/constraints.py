"""Constrained decoding with llguidance: a request's JSON Schema, grammar, regex or choice as a
token mask, per answer, inside the guided batch.

Contract:
- `compile_request(request, model)` turns a request's constraint option (at most one of
  `json_schema`, `grammar` (GBNF or Lark), `regex`, `choice`) into a `Grammar`, or None when the
  request has none. A schema or grammar that does not compile, uses a keyword llguidance does
  not implement, nests deeper than `MAX_DEPTH`, is longer than `MAX_CHARS` or accepts no text
  at all raises `UserError` naming the option; compiling is bounded by llguidance's parser
  limits (`LIMITS`), so a pathological grammar is refused rather than stalling the server.
  Compiled grammars are cached by text (a schema sent by many requests compiles once).
- `Grammar.start()` is a new answer's `Constraint`: its matcher (a copy of the compiled one)
  and, with `grammar_trigger`, the text that engages it: until the answer's text ends with it
  (special tokens as their text) the answer is free, and the grammar holds what follows.
  `Constraint.copy()` is a fork's (n > 1).
- `mask(rows, entries, n_vocab)` sets every forbidden token of the given rows to -inf: one
  entry (constraint, row, draft) per answer fills its row and, for a verify, the rows after each
  of its draft tokens, every answer's masks computed together by llguidance's threads and
  unpacked with NumPy. End-of-generation tokens are allowed only where the grammar accepts.
- While drafting, `draftable(draft)` is how many of a drafter's tokens the grammar allows in a
  row, `mask_row(row)` masks a drafter's row, `try_draft(token)` advances the matcher by a draft
  token (False: the draft must end before it) and `undo_drafts()` rolls those back.
- `accept(token)` advances the matcher by a token the answer keeps and says whether the answer
  ends: "stop" where the grammar is complete, "grammar_error" (with `error`) where the matcher
  failed; None goes on.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from .errors import UserError

MAX_DEPTH = 32          # nesting of a JSON Schema
MAX_CHARS = 256 * 1024  # a schema's JSON text or a grammar's text
# llguidance's own defaults, tightened: compiling and each step's mask stay within tens of ms
LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
              step_max_items=50_000, max_lexer_states=100_000, max_grammar_size=200_000,
              verbose_errors=False)
_FORMAT = {"json_schema": "json_schema", "grammar": "grammar", "regex": "regex",
           "choice": "choice"}


class Grammar:
    """A compiled constraint: the matcher every answer of a request starts from."""

    def __init__(self, matcher, trigger: bytes | None, field: str, n_vocab: int, piece):
        self.matcher, self.trigger, self.field = matcher, trigger, field
        self.words = (n_vocab + 31) // 32  # a mask's 32-bit words
        self.piece = piece  # token -> its bytes, special tokens as their text

    def follows(self, recent: bytes, token: int) -> tuple[bytes, bool]:
        """The answer's last bytes after `token`, and whether they end with the trigger."""
        recent = (recent + self.piece(token))[-len(self.trigger):]
        return recent, recent == self.trigger

    def start(self) -> "Constraint":
        return Constraint(self, self.matcher.deep_copy() if self.trigger is None else None)


class Constraint:
    """One answer's grammar state (see the module's contract)."""

    def __init__(self, grammar: Grammar, matcher, recent: bytes = b""):
        self.grammar = grammar
        self.matcher = matcher  # None: free until the trigger
        self.recent = recent    # the answer's last bytes, to find the trigger in
        self.drafted = 0
        self.scratch: bytes | None = None  # `recent` after the draft so far
        self.error: str | None = None

    @property
    def active(self) -> bool:
        return self.matcher is not None

    def copy(self) -> "Constraint":
        return Constraint(self.grammar, self.matcher.deep_copy() if self.active else None,
                          self.recent)

    def draftable(self, draft: list[int]) -> int:
        if not self.active:  # a draft never crosses the trigger: the grammar engages there
            recent = self.recent
            for i, token in enumerate(draft):
                recent, found = self.grammar.follows(recent, token)
                if found:
                    return i
            return len(draft)
        return int(self.matcher.validate_tokens(list(draft))) if draft else 0

    def mask_row(self, row: np.ndarray) -> np.ndarray:
        if not self.active:
            return row
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return _apply(row.copy(), np.unpackbits(bits, bitorder="little"))

    def try_draft(self, token: int) -> bool:
        if not self.active:
            self.scratch, found = self.grammar.follows(
                self.recent if self.scratch is None else self.scratch, token)
            return not found
        if self.matcher.is_stopped() or not self.matcher.consume_token(token):
            return False
        self.drafted += 1
        return True

    def undo_drafts(self) -> None:
        self.scratch = None
        if self.drafted:
            self.matcher.rollback(self.drafted)
            self.drafted = 0

    def accept(self, token: int) -> str | None:
        if not self.active:
            self.recent, found = self.grammar.follows(self.recent, token)
            if found:  # the grammar holds from the next token
                self.matcher = self.grammar.matcher.deep_copy()
            return None
        if not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or f"token {token} is not allowed here"
            return "grammar_error"
        return "stop" if self.matcher.is_stopped() else None


def mask(rows: np.ndarray, entries: list[tuple[Constraint, int, list[int]]]) -> np.ndarray:
    """Forbidden tokens of the entries' rows to -inf (in place); each entry's draft tokens are
    all allowed (`draftable`), its rows row, row + 1, ... follow them."""
    entries = [e for e in entries if e[0].active]
    if not entries:
        return rows
    words = entries[0][0].grammar.words  # every entry's model shares the base's vocabulary
    bitmask = np.full((rows.shape[0], words), -1, dtype=np.int32)
    plain = [(c.matcher, row) for c, row, draft in entries if not draft]
    drafted = [(c.matcher, row, list(draft)) for c, row, draft in entries if draft]
    size = (bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0])
    if plain:
        _executor().unsafe_compute_mask_ptr(plain, *size)
    if drafted:
        _executor().unsafe_compute_mask_ptr_with_draft_token(drafted, *size)
    at = np.array([row + i for _, row, draft in entries for i in range(len(draft) + 1)])
    allowed = np.unpackbits(bitmask[at].view(np.uint8), axis=1, bitorder="little")
    for r, bits in zip(at, allowed):
        _apply(rows[r], bits)
    return rows


def _apply(row: np.ndarray, bits: np.ndarray) -> np.ndarray:
    n = min(row.size, bits.size)
    forbidden = np.flatnonzero(bits[:n] == 0)
    row[forbidden] = -np.inf
    row[n:] = -np.inf  # ids past the grammar's vocabulary are never allowed
    return row


@functools.cache
def _executor():
    import llguidance
    return llguidance.LLExecutor()


def response_schema(value) -> tuple[dict | None, type | None]:
    """OpenAI's `response_format` (or a Pydantic model class, or a bare JSON Schema) as
    (the JSON Schema to hold answers to, the class to parse them into); (None, None): text."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return _closed(value.model_json_schema()), value
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise UserError("response_format must be a JSON Schema, a Pydantic model class or "
                        'OpenAI\'s {"type": "json_object"} / {"type": "json_schema", '
                        f'"json_schema": {{"schema": ...}}}}, not {type(value).__name__}',
                        "response_format")
    kind = value.get("type")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return {"type": "object"}, None
    if kind == "json_schema":
        inner = value.get("json_schema")
        schema = inner.get("schema", {}) if isinstance(inner, dict) else None
        if not isinstance(schema, dict):
            raise UserError('response_format json_schema needs {"name": ..., "schema": {...}}',
                            "response_format")
        return schema or {"type": "object"}, None
    return value, None  # a JSON Schema itself


def _closed(schema):
    """A Pydantic class's schema with its objects closed (additionalProperties false, as the
    openai SDK's parse() sends it): fields the class would drop are never generated."""
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def compile_request(request, model) -> Grammar | None:
    """The request's constraint compiled for `model` (a llama.Model), or None."""
    given = request.constraint_fields
    if not given:
        return None
    field = given[0]
    value = getattr(request, field)
    text = _grammar_text(field, value)
    trigger = request.grammar_trigger.encode() if request.grammar_trigger is not None else None
    tokenizer = model.grammar_tokenizer
    return Grammar(_compiled(tokenizer, text, field), trigger, field, tokenizer.vocab_size,
                   model.piece)


def _grammar_text(field: str, value) -> str:
    import llguidance
    if field == "json_schema":
        source = json.dumps(value)
        _check_size(field, source)
        if _depth(value) > MAX_DEPTH:
            raise UserError(f"json_schema nests more than {MAX_DEPTH} levels deep; flatten it "
                            "or use $ref", field)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(source)
        except ValueError as exc:
            raise UserError(f"json_schema: {exc}", field) from None
    if field == "choice":
        return llguidance.grammar_from("choice", json.dumps(list(value)))
    _check_size(field, value)
    try:
        return llguidance.grammar_from(_FORMAT[field], value)
    except ValueError as exc:  # a GBNF grammar its converter cannot read
        raise UserError(f"{field}: {_first_line(str(exc))}", field) from None


@functools.lru_cache(maxsize=64)
def _compiled(tokenizer, text: str, field: str):
    """A compiled matcher (never advanced: answers start from copies of it)."""
    import llguidance
    matcher = llguidance.LLMatcher(tokenizer, text, log_level=0,
                                   limits=llguidance.LLParserLimits(**LIMITS))
    if matcher.is_error():
        why = _first_line(matcher.get_error()) or "it accepts no text"
        raise UserError(f"{field} does not compile: {why}; fix it (llguidance's syntax and "
                        "keywords: https://github.com/guidance-ai/llguidance/tree/main/docs)",
                        field)
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
    if matcher.is_error() or not bits.any():
        raise UserError(f"{field} accepts no text: no token can start an answer", field)
    return matcher


def _check_size(field: str, text: str) -> None:
    if len(text) > MAX_CHARS:
        raise UserError(f"{field} is {len(text)} characters long; at most {MAX_CHARS} are "
                        "allowed", field)


def _depth(value, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()], default=level)
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value], default=level)
    return level


def _first_line(text: str) -> str:
    """An error message on one line (llguidance's span several, with carets), cut short."""
    words = " ".join(line.strip() for line in text.strip().splitlines()
                     if line.strip().strip("^|0123456789 "))
    return words if len(words) <= 300 else words[:297] + "..."
