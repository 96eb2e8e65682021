"""OpenAI tool calling on top of the grammar request options (pure Python and llguidance's
grammar text; no engine).

Contract:
- `plan(tools, tool_choice, parallel_tool_calls, template)` checks a request's tools (each bad
  one a `UserError` naming its param: "tools[i].function.parameters" for a schema that does not
  compile, "tools" for a missing or repeated name, "tool_choice" for an unknown function or a
  choice without tools) and returns a `ToolPlan`, or None where the model may not call (no
  tools, or tool_choice "none"). The plan gives the request its `grammar` (llguidance Lark,
  holding from the first token: each call's arguments held to its tool's `parameters`, the
  name a constant) and the `tools` the chat template is given.
- Two formats, by the chat template (`template_format`): "hermes" for a template that renders
  `tools` itself and writes `<tool_call>` blocks (Qwen2.5's): the answer writes
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, several one after another
  (the `<tool_call>` token itself, never the same text in pieces). With "auto" it may instead
  answer in text, or call in text and then blocks, or write its calls' JSON bare, as small
  Qwen models do (an answer that begins with "{" is a call). "generic" for any other
  template: a system message describes the tools and the reply, and the answer is the JSON
  object {"tool_calls": [{"name": ..., "arguments": {...}}]}, or with "auto"
  {"response": "..."} instead (as llama-server's generic format).
- A conversation's earlier calls and results go to the template through
  `templates.tool_history`, in the shape the generic reply takes.
- `ToolCallParser(format)`: an answer's text pieces in, OpenAI chat deltas out: content deltas
  for free text; a call's header ({"index", "id", "type", "function": {"name", "arguments": ""}})
  once its name is complete, then fragments of its arguments' JSON text. `parse(text, format)`
  runs the same parser over a finished answer: (content or None, the calls).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError
from .templates import renders_tools

HERMES, GENERIC = "hermes", "generic"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
# small Qwen models also write a bare call in a code block (json, or python where a system
# message asked for Python code)
FENCES = ("```json\n", "```python\n", "```\n")
OPENERS = ("{",) + tuple(f + "{" for f in FENCES)  # how an answer that is a bare call begins
CHOICES = ("none", "auto", "required")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
NO_ARGUMENTS = {"type": "object", "properties": {}}
# Compact and fixed: flexible whitespace lets a small model pad a call with blank lines until
# it runs out of tokens; these separators are json.dumps', which the templates write too.
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
# a call written bare or in a fence may be pretty-printed, as models write code (bounded, so
# that whitespace cannot run on)
LOOSE_STYLE = {"whitespace_flexible": True, "whitespace_pattern": "[\n ]{0,24}"}


def template_format(template: str | None) -> str:
    """"hermes" where the template renders `tools` and writes <tool_call> blocks."""
    return HERMES if renders_tools(template) else GENERIC


@dataclass(frozen=True)
class ToolPlan:
    format: str                    # HERMES or GENERIC
    choice: str                    # "auto", "required" or the one function's name
    parallel: bool
    functions: tuple[dict, ...]    # each tool's checked "function" object
    tools: tuple[dict, ...]        # the tools as the request gave them (the template's)
    grammar: str                   # llguidance Lark

    @property
    def template_tools(self) -> list[dict] | None:
        """What the template's `tools` gets (a generic template is told in a system message)."""
        return list(self.tools) if self.format == HERMES else None

    def instruct(self, messages: list[dict]) -> list[dict]:
        """The messages with the generic format's instructions in the system message."""
        if self.format == HERMES:
            return messages
        text = _instructions(self.functions, self.choice, self.parallel)
        if messages and messages[0].get("role") == "system":
            first = dict(messages[0], content=f"{messages[0].get('content') or ''}\n\n{text}")
            return [first] + list(messages[1:])
        return [{"role": "system", "content": text}] + list(messages)


def plan(tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = None,
         template: str | None = None) -> ToolPlan | None:
    """The grammar and template tools for a request's tools (see the contract)."""
    functions = check_tools(tools)
    choice = check_choice(tool_choice, functions)
    if not functions or choice == "none":
        return None
    fmt = template_format(template)
    chosen = [f for f in functions if choice in ("auto", "required") or f["name"] == choice]
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    grammar = _grammar(fmt, chosen, choice, parallel)
    return ToolPlan(fmt, choice, parallel, tuple(functions), tuple(tools), grammar)


# -- checks ------------------------------------------------------------------------------------
def check_tools(tools: Any) -> list[dict]:
    """Each tool's "function" object, checked, its parameters defaulting to no arguments."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise UserError("tools must be a list of {\"type\": \"function\", \"function\": {...}}",
                        "tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise UserError(f"{where}: each tool must be {{\"type\": \"function\", "
                            "\"function\": {...}} (only functions are supported)", where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise UserError(f"{where}.function is required: an object with name, description "
                            "and parameters", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UserError(f"{where}.function.name must be 1 to 64 letters, digits, _, . or -"
                            f" (got {json.dumps(name)})", "tools")
        if name in seen:
            raise UserError(f"{where}.function.name: {name!r} names two tools; each needs its "
                            "own name", "tools")
        seen.add(name)
        params = NO_ARGUMENTS if fn.get("parameters") is None else fn["parameters"]
        check_schema(params, f"{where}.function.parameters")
        out.append({"name": name, "description": str(fn.get("description") or ""),
                    "parameters": params})
    return out


def check_schema(schema: Any, param: str) -> None:
    """A JSON Schema llguidance can compile, else a UserError naming `param`."""
    from llguidance import LLMatcher

    if not isinstance(schema, dict):
        raise UserError(f"{param} must be a JSON Schema object, got {json.dumps(schema)[:60]}",
                        param)
    try:
        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema))
    except (ValueError, TypeError) as exc:
        error = str(exc)
    if error:
        first = " ".join(error.strip().split("\n")[:3])
        raise UserError(f"{param} is not a JSON Schema this server can follow: {first}", param)


def check_choice(tool_choice: Any, functions: list[dict]) -> str:
    """"none", "auto", "required" or a function's name (OpenAI's default: auto with tools)."""
    if tool_choice is None:
        return "auto" if functions else "none"
    form = 'none, auto, required or {"type": "function", "function": {"name": ...}}'
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise UserError(f"tool_choice must be {form}, got {tool_choice!r}", "tool_choice")
        if tool_choice == "required" and not functions:
            raise UserError("tool_choice 'required' needs tools: give tools or drop "
                            "tool_choice", "tool_choice")
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or tool_choice.get("type", "function") != "function":
        raise UserError(f"tool_choice must be {form}", "tool_choice")
    if not functions:
        raise UserError(f"tool_choice names {name!r} but the request has no tools",
                        "tool_choice")
    if name not in {f["name"] for f in functions}:
        raise UserError(f"tool_choice names {name!r}, which is not among the tools ("
                        f"{', '.join(f['name'] for f in functions)})", "tool_choice")
    return name


# -- grammars ----------------------------------------------------------------------------------
def _grammar(fmt: str, functions: list[dict], choice: str, parallel: bool) -> str:
    """The llguidance Lark grammar of the answer."""
    call, defs = _call_schema(functions)
    root = {"x-guidance": JSON_STYLE, "$defs": defs}
    if fmt == HERMES:
        body = "call: %json " + json.dumps(call | root)
        block = f'{OPEN} "\\n" call "\\n" {CLOSE}'
        more = '("\\n" {})*'.format if parallel else (lambda _: "")
        if choice != "auto":
            return f"start: {block} {more(block)}\n{body}\n"
        # text, text then blocks, or calls written bare (in a fence or not): text may not
        # begin as a bare call does
        fence = " | ".join(json.dumps(f) for f in FENCES)
        loose = "bare: %json " + json.dumps(call | root | {"x-guidance": LOOSE_STYLE})
        return (f'start: TEXT | TEXT? blocks | calls | fence calls "\\n```"\nfence: {fence}\n'
                f'blocks: {block} {more(block)}\ncalls: bare {more("bare")}\n'
                f"{body}\n{loose}\nTEXT: /{_not_prefixed(OPENERS)}/\n")
    calls = {"type": "array", "items": call, "minItems": 1} | ({} if parallel else
                                                                {"maxItems": 1})
    reply = _object({"tool_calls": calls})
    if choice == "auto":
        reply = {"anyOf": [reply, _object({"response": {"type": "string"}})]}
    return "start: %json " + json.dumps(reply | root) + "\n"


def _not_prefixed(openers: tuple[str, ...], depth: int = 0) -> str:
    """A regular expression for any non-empty text that begins with none of `openers`: at
    some point it parts from each of them, or it stops short (a trie of the openers, walked)."""
    children: dict[str, list[str]] = {}
    for o in openers:
        children.setdefault(o[depth], []).append(o)
    esc = {"\n": "\\n", "{": "\\{", "`": "`"}
    other = "".join(esc.get(c, re.escape(c)) for c in sorted(children))
    parts = [f"[^{other}][\\s\\S]*"]
    for c, group in sorted(children.items()):
        if any(len(o) == depth + 1 for o in group):
            continue  # a whole opener: no text may begin with it
        parts.append(f"{esc.get(c, re.escape(c))}{_not_prefixed(tuple(group), depth + 1)}?")
    return "(" + "|".join(parts) + ")"


def _object(properties: dict) -> dict:
    """An object with exactly these properties, in this order (llguidance keeps the order:
    a call's name comes before its arguments, which the streaming parser relies on)."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _call_schema(functions: list[dict]) -> tuple[dict, dict]:
    """{"name": <const>, "arguments": <its parameters>}, any one of the functions; and the
    $defs that the grammar's root schema must hold for them."""
    branches, defs = [], {}
    for i, f in enumerate(functions):
        # each tool's schema under $defs of the grammar's root, its local references (which
        # point into the tool's own schema) rewritten to resolve there
        params = {k: v for k, v in f["parameters"].items() if k not in ("$schema", "$id")}
        defs[f"tool{i}"] = _rebase(params, f"#/$defs/tool{i}")
        branches.append(_object({"name": {"const": f["name"]},
                                 "arguments": {"$ref": f"#/$defs/tool{i}"}}))
    return (branches[0] if len(branches) == 1 else {"anyOf": branches}), defs


def _rebase(value: Any, root: str) -> Any:
    if isinstance(value, dict):
        out = {k: _rebase(v, root) for k, v in value.items()}
        ref = value.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            out["$ref"] = root + ref[1:]
        return out
    if isinstance(value, list):
        return [_rebase(v, root) for v in value]
    return value


def _instructions(functions: tuple[dict, ...], choice: str, parallel: bool) -> str:
    """The generic format's system text: the tools, and the reply's JSON shape."""
    listed = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    call = '{"name": "<function name>", "arguments": {<its arguments>}}'
    many = "one or more calls" if parallel else "exactly one call"
    text = (f"You can call these functions (each one's arguments are described by a JSON "
            f"Schema):\n{listed}\n\nRespond in JSON. To call functions, reply "
            f'{{"tool_calls": [{call}]}} with {many}')
    if choice == "auto":
        return text + ', or reply {"response": "<your answer>"} to answer directly.'
    if choice != "required":
        return text + f"; call {choice}."
    return text + "."


# -- answers -----------------------------------------------------------------------------------
class _JsonScanner:
    """JSON text a character at a time. Reports, as events, where each value starts and ends
    (by its path of keys and indices), the decoded pieces of each string value, and the raw
    text of the values whose path `raw(path)` picks. Tolerant: a character that cannot be JSON
    marks it broken, and it reads nothing after."""

    ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
               "t": "\t"}

    def __init__(self, raw: Callable[[tuple], bool]):
        self.raw = raw
        self.stack: list[list] = []    # [kind "{" or "[", key or index, what comes next]
        self.string: str | None = None  # "key" or "value" while inside one
        self.escape: str | None = None  # "" after a backslash, then \\u's hex digits
        self.high = ""                  # a high surrogate waiting for its pair
        self.scalar = False
        self.key: list[str] = []
        self.capture: tuple | None = None
        self.raw_buf: list[str] = []
        self.str_buf: list[str] = []
        self.done = self.broken = False
        self.events: list[tuple] = []

    def path(self) -> tuple:
        return tuple(frame[1] for frame in self.stack)

    def char(self, c: str) -> None:
        if self.done or self.broken:
            return
        if self.string is not None:
            self._take(c)
            self._string(c)
        elif self.scalar and c not in ",}] \t\r\n":
            self._take(c)
        else:
            if self.scalar:  # a number or literal ends before the character after it
                self.scalar = False
                self._end()
            self._structure(c)

    def drain(self) -> list[tuple]:
        self._flush()
        out, self.events = self.events, []
        return out

    def _structure(self, c: str) -> None:
        if c in " \t\r\n":
            self._take(c)
            return
        top = self.stack[-1] if self.stack else None
        state = top[2] if top else "value"
        if state == "value":
            if top and top[0] == "[" and c == "]":
                self._close(c)
            else:
                self._start(c)
        elif state == "key" and c == '"':
            self._take(c)
            self.string, self.key = "key", []
        elif state in ("key", "next") and c == "}" and top[0] == "{":
            self._close(c)
        elif state == "next" and c == "]" and top[0] == "[":
            self._close(c)
        elif state == "next" and c == ",":
            self._take(c)
            if top[0] == "{":
                top[2] = "key"
            else:
                top[1], top[2] = top[1] + 1, "value"
        elif state == "colon" and c == ":":
            self._take(c)
            top[2] = "value"
        else:
            self.broken = True

    def _start(self, c: str) -> None:
        if c not in '{["-0123456789tfn':
            self.broken = True
            return
        path = self.path()
        self._emit(("start", path))
        if self.capture is None and self.raw(path):
            self.capture = path
        self._take(c)
        if c == "{":
            self.stack.append(["{", None, "key"])
        elif c == "[":
            self.stack.append(["[", 0, "value"])
        elif c == '"':
            self.string = "value"
        else:
            self.scalar = True

    def _close(self, c: str) -> None:
        self._take(c)
        self.stack.pop()
        self._end()

    def _end(self) -> None:
        path = self.path()
        self._emit(("end", path))
        if self.capture == path:
            self.capture = None
        if self.stack:
            self.stack[-1][2] = "next"
        else:
            self.done = True

    def _string(self, c: str) -> None:
        if self.escape is None:
            if c == "\\":
                self.escape = ""
            elif c != '"':
                self._text(c)
            elif self.string == "key":
                self.string = None
                self.stack[-1][1], self.stack[-1][2] = "".join(self.key), "colon"
            else:
                self.string = None
                self._end()
            return
        self.escape += c
        if self.escape[0] != "u":
            self.escape = None
            self._text(self.ESCAPES.get(c, c))
        elif len(self.escape) == 5:
            try:
                code, self.escape = chr(int(self.escape[1:], 16)), None
            except ValueError:
                self.broken = True
                return
            if "\ud800" <= code < "\udc00":  # the first half of a pair: wait for the second
                self.high = code
                return
            pair, self.high = self.high + code, ""
            self._text(pair.encode("utf-16-le", "surrogatepass").decode("utf-16-le",
                                                                         "replace"))

    def _text(self, text: str) -> None:
        (self.key if self.string == "key" else self.str_buf).append(text)

    def _take(self, c: str) -> None:
        if self.capture is not None:
            self.raw_buf.append(c)

    def _emit(self, event: tuple) -> None:
        self._flush()
        self.events.append(event)

    def _flush(self) -> None:
        # pieces of one string value (or raw value) from one feed go out as one event
        if self.str_buf:
            self.events.append(("str", self.path(), "".join(self.str_buf)))
            self.str_buf = []
        if self.raw_buf:
            self.events.append(("raw", self.capture or self.path(), "".join(self.raw_buf)))
            self.raw_buf = []


@dataclass
class _Call:
    index: int
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))
    name: list[str] = field(default_factory=list)
    named: bool = False               # its name is complete and its header went out
    arguments: list[str] = field(default_factory=list)
    unsent: list[str] = field(default_factory=list)  # argument text that came before the name

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": "".join(self.name), "arguments": "".join(self.arguments)}}


class ToolCallParser:
    """One answer's text pieces in (`feed`), OpenAI chat deltas out; `finish()` at its end.
    `content` and `calls` hold what the answer said and called so far."""

    def __init__(self, fmt: str):
        self.format = fmt
        self.calls: list[_Call] = []
        self.content: list[str] = []
        self.text: list[str] = []       # every piece, for an answer that is not the format
        self.pending = ""               # hermes: free text that may begin <tool_call>
        self.space = ""                 # hermes: whitespace held until text follows it
        self.scanner: _JsonScanner | None = None
        self.closing = False            # hermes: a call's JSON ended, </tool_call> next
        self.by_path: dict[int, _Call] = {}
        self.shaped = False             # generic: the answer began a reply or its calls
        self.out: list[dict] = []
        if fmt == GENERIC:
            self.scanner = _JsonScanner(lambda p: len(p) == 3 and p[0] == "tool_calls"
                                        and p[2] == "arguments")

    @property
    def called(self) -> bool:
        return any(c.named for c in self.calls)

    def feed(self, piece: str) -> list[dict]:
        self.text.append(piece)
        if self.format == GENERIC:
            for c in piece:
                self.scanner.char(c)
            self._generic(self.scanner.drain())
        else:
            self.pending += piece
            self._hermes()
        out, self.out = self.out, []
        return out

    def finish(self) -> list[dict]:
        """The last deltas: held-back text, or the whole answer as content where it never
        took the format's shape (no call, no reply)."""
        if self.format == HERMES and self.scanner is None:
            self._say(self.pending)
            self.pending = ""
            if not self.called:
                self._content(self.space)
        elif self.format == GENERIC and not self.shaped:
            self._content("".join(self.text))
        out, self.out = self.out, []
        return out

    def message(self) -> tuple[str | None, list[dict]]:
        """(content, calls) in OpenAI's message shape: content None when it only called."""
        calls = [c.to_dict() for c in self.calls if c.named]
        content = "".join(self.content)
        return (None if calls and not content.strip() else content), calls

    # -- generic: one JSON object --
    def _generic(self, events: list[tuple]) -> None:
        for kind, path, *text in events:
            self.shaped = self.shaped or path in (("response",), ("tool_calls",))
            if path == ("response",) and kind == "str":
                self._content(text[0])
            elif len(path) >= 2 and path[0] == "tool_calls" and isinstance(path[1], int):
                self._call_event(self._call(path[1]), kind, path[2:], text)

    def _call(self, key: int) -> _Call:
        if key not in self.by_path:
            self.by_path[key] = _Call(len(self.calls))
            self.calls.append(self.by_path[key])
        return self.by_path[key]

    def _call_event(self, call: _Call, kind: str, path: tuple, text: list[str]) -> None:
        if path == ("name",) and kind == "str" and not call.named:
            call.name.append(text[0])
        elif path == ("name",) and kind == "end" and not call.named:
            call.named = True
            self.out.append({"tool_calls": [{"index": call.index, "id": call.id,
                                             "type": "function", "function": {
                                                 "name": "".join(call.name),
                                                 "arguments": ""}}]})
            self._arguments(call, "".join(call.unsent))
            call.unsent = []
        elif path == ("arguments",) and kind == "raw":
            if call.named:
                self._arguments(call, text[0])
            else:
                call.unsent.append(text[0])

    def _arguments(self, call: _Call, text: str) -> None:
        if text:
            call.arguments.append(text)
            self.out.append({"tool_calls": [{"index": call.index,
                                             "function": {"arguments": text}}]})

    def _content(self, text: str) -> None:
        if text:
            self.content.append(text)
            if self.out and "content" in self.out[-1]:
                self.out[-1] = {"content": self.out[-1]["content"] + text}
            else:
                self.out.append({"content": text})

    # -- hermes: free text and <tool_call> blocks --
    def _hermes(self) -> None:
        while self.pending:
            if self.scanner is not None:
                self._in_call()
            elif self.closing:  # a call's JSON ended: </tool_call> or a fence's end next
                stripped = self.pending.lstrip()
                end = next((e for e in (CLOSE, "```") if stripped.startswith(e)), "")
                if not end and any(e.startswith(stripped) for e in (CLOSE, "```")):
                    return  # wait for the rest
                self.pending, self.closing = stripped[len(end):], False
            elif not self.content and (bare := self._bare()) is not False:
                if bare is None:
                    return  # wait: it may yet open a call
            else:
                at = self.pending.find(OPEN)
                if at < 0:  # hold back what may begin <tool_call>
                    keep = next((n for n in range(len(OPEN) - 1, 0, -1)
                                 if self.pending.endswith(OPEN[:n])), 0)
                    self._say(self.pending[:len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep:]
                    return
                self._say(self.pending[:at])
                self.space, self.pending = "", self.pending[at + len(OPEN):]
                self._open_call()

    def _bare(self) -> bool | None:
        """At the answer's start, a call written bare (or in a code fence): True where one
        opened, None while too little has come to tell, False for text."""
        head = self.pending.lstrip()
        opener = next((o for o in OPENERS if head.startswith(o)), None)
        if opener:
            self.pending, self.space = head[len(opener) - 1:], ""
            self._open_call()
            return True
        return None if any(o.startswith(head) for o in OPENERS) else False

    def _open_call(self) -> None:
        self.scanner = _JsonScanner(lambda p: p == ("arguments",))
        self.by_path = {0: _Call(len(self.calls))}
        self.calls.append(self.by_path[0])

    def _in_call(self) -> None:
        used = 0
        for c in self.pending:
            used += 1
            self.scanner.char(c)
            if self.scanner.done or self.scanner.broken:
                break
        self.pending = self.pending[used:]
        call = self.by_path[0]
        for kind, path, *text in self.scanner.drain():
            self._call_event(call, kind, path, text)
        if self.scanner.done or self.scanner.broken:
            self.scanner, self.closing = None, True

    def _say(self, text: str) -> None:
        """Free text as content, whitespace before a call (or at the end) held back; between
        and after calls, whitespace alone is not content."""
        if not text:
            return
        body = text.rstrip()
        if body:
            self._content(self.space + body if self.content or not self.called
                          else body.lstrip())
            self.space = text[len(body):]
        else:
            self.space += text


def parse(text: str, fmt: str) -> tuple[str | None, list[dict]]:
    """A finished answer's (content, calls), as the streaming parser reads it."""
    parser = ToolCallParser(fmt)
    parser.feed(text)
    parser.finish()
    return parser.message()
