"""From tokens to final text: UTF-8 across tokens, stop strings held back and cut, finish rules.

Contract: `TextStream(engine, request).push(token)` returns (text now final, finish reason or
None): "stop" for an end-of-generation token of the base (no text), "stop_string" when a stop
string completes (the string and what follows are cut), "length" at `request.max_tokens`.
`close()` returns what is still held back when an answer ends otherwise; `copy()` is a stream
in the same state. `STOPPED` are the finish reasons of answers stopped from outside.
"""

from __future__ import annotations

import codecs
import copy


STOPPED = ("cancelled", "interrupted")  # finish reasons of answers stopped from outside


class StopMatcher:
    """Holds back text that may be the start of a stop string; reports where one completes."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to show, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for k in range(min(len(self.pending), max((len(s) for s in self.stops), default=1) - 1),
                       0, -1):
            if any(s.startswith(self.pending[-k:]) for s in self.stops):
                hold = k
                break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """One sequence's tokens to final text: UTF-8 across tokens, stop strings held back and cut,
    and the finish rules (end of generation, stop string, max tokens)."""

    def __init__(self, engine, request):
        self.model, self.max_tokens = engine.model, request.max_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(request.stop)
        self.n = 0

    def push(self, token: int) -> tuple[str, str | None]:
        """(text now final, finish reason or None) after one more token."""
        self.n += 1
        if self.model.is_eog(token):
            return self.close(), "stop"
        text, stopped = self.stops.feed(self.decoder.decode(self.model.token_bytes(token)))
        if stopped:
            return text, "stop_string"
        if self.n >= self.max_tokens:
            return text + self.stops.feed(self.decoder.decode(b"", final=True))[0] + \
                self.stops.flush(), "length"
        return text, None

    def copy(self) -> "TextStream":
        """A stream in the same state (an answer that goes on as a copy of another)."""
        out = copy.copy(self)
        out.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out.decoder.setstate(self.decoder.getstate())
        out.stops = copy.copy(self.stops)
        return out

    def close(self) -> str:
        """What is still held back, when the sequence ends early."""
        return self.stops.flush() + self.decoder.decode(b"", final=True)
