"""`edge-genarm chat`: a guided conversation in the terminal, with live control of the alphas.

Contract:
- `ChatSession(model)` holds one conversation (system prompt, turns, the ARMs' alphas and
  sampling of the next reply, the settings of each reply) on a loaded `api.Model`. Each reply
  renders the whole conversation with the model's chat template and is one request of the Python
  API, whose scheduler finds the conversation's cached prefix: a turn costs its new tokens.
  `/alpha` changes the session's alphas, sent with each request; the loaded model's stay.
- When a conversation outgrows the context, the oldest turns leave the prompt (the system prompt
  stays); the transcript keeps them.
- `ChatSession.command(line)` runs a slash command and returns the text to show; `/quit` raises
  `Quit`. Commands never end the session on bad input: they answer with one line.
- `main` reads lines from a terminal (readline editing and history, Ctrl-C stops a reply, Ctrl-D
  leaves) or, when stdin is not a terminal, one message or command per line until end of input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import click

from . import fields, files, llama
from .api import Model
from .errors import UserError, plural
from .generation import Result, encode_messages
from .config import LoadConfig
from .options import from_click, generation_options

Message = dict[str, str]


class Quit(Exception):
    """Raised by /quit."""


@dataclass(frozen=True)
class Resend:
    """What /retry returns: the user message to generate a reply to once more."""
    text: str


@dataclass
class Turn:
    user: str
    reply: str = ""
    settings: dict = field(default_factory=dict)  # how the reply was made, for /save


@dataclass
class ArmAlpha:
    name: str
    alpha: float


class ChatSession:
    def __init__(self, model: Model):
        engine, config = model.engine, model.config
        if config.load.raw:
            raise UserError("chat needs the model's chat template; --raw is for generate")
        self.template = model.template
        if self.template is None:
            raise UserError(f"{engine.model.path} has no chat template "
                            "(tokenizer.chat_template); chat needs one")
        self.model, self.engine, self.defaults = model, engine, config.request
        self.alphas = [ArmAlpha(name, alpha) for name, alpha in model.arms.items()]
        self.system = config.request.system
        self.sampling = config.request.sampling
        self.seed = config.request.seed if config.request.seed is not None else \
            secrets.randbelow(2**31)
        self.turns: list[Turn] = []
        self.first = 0            # turns before this one no longer fit the context
        self.n_generated = 0      # every reply, retries included, gets a seed of its own
        self.last: Result | None = None

    # -- the conversation ------------------------------------------------------------------
    def messages(self, turns: list[Turn]) -> list[Message]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for turn in turns:
            out.append({"role": "user", "content": turn.user})
            if turn is not turns[-1] or turn.reply:
                out.append({"role": "assistant", "content": turn.reply})
        return out

    def prompt_ids(self, notify: Callable[[str], None]) -> list[int]:
        """Tokens for the live turns, the last one awaiting its reply; drops the oldest turns
        (with a notice) while the prompt leaves too little room for a reply."""
        n_ctx = self.engine.n_ctx
        room = min(self.defaults.max_tokens, n_ctx // 4)
        dropped = 0
        while True:
            ids = encode_messages(self.engine, self.messages(self.turns[self.first:]),
                                  self.template)
            if len(ids) + room <= n_ctx or self.first == len(self.turns) - 1:
                break
            self.first += 1
            dropped += 1
        if dropped:
            notify(f"the conversation no longer fits the context of {n_ctx} tokens: the "
                   f"oldest {plural(dropped, 'turn')} left the prompt (the system prompt stays; "
                   "raise --ctx-size to keep more)")
        if len(ids) >= n_ctx:
            raise UserError(f"this message makes a prompt of {len(ids)} tokens but the context "
                            f"holds {n_ctx}; shorten it or raise --ctx-size")
        return ids

    def reply(self, text: str, on_text: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None,
              notify: Callable[[str], None] = lambda message: None) -> Turn:
        """Add a user message and generate the reply to it (streamed to `on_text`)."""
        self.turns.append(Turn(text))
        first = self.first
        try:
            ids = self.prompt_ids(notify)
        except UserError:
            self.turns.pop()
            self.first = first
            raise
        seed = self.seed + self.n_generated
        self.n_generated += 1
        for chunk in self.model.stream(ids, should_stop=should_stop, seed=seed,
                                       arms={a.name: a.alpha for a in self.alphas},
                                       temperature=self.sampling.temperature,
                                       greedy=self.sampling.greedy):
            if chunk.text and on_text is not None:
                on_text(chunk.text)
            if chunk.result is not None:
                result = chunk.result
        if result.finish_reason == "context_full":
            notify(f"the context of {self.engine.n_ctx} tokens is full, the reply stops "
                   "here; the next turn drops the oldest turns")
        turn = self.turns[-1]
        turn.settings = self._settings(result)
        turn.reply, self.last = result.text, result
        return turn

    def _settings(self, result: Result) -> dict:
        s = self.sampling
        return {"alphas": dict(result.alphas), **result.method,
                "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                "min_p": s.min_p, "greedy": s.greedy, **s.penalties(), "seed": result.seed,
                "max_tokens": self.defaults.max_tokens, "system": self.system,
                **result.usage.to_dict()}

    # -- slash commands ----------------------------------------------------------------------
    def command(self, line: str) -> str | Resend:
        """Run one slash command; the answer to show, or a message to reply to (/retry)."""
        name, _, arg = line.strip().partition(" ")
        entry = COMMANDS.get(name.lower())
        if entry is None:
            raise UserError(f"unknown command {name}; /help lists the commands")
        return entry[2](self, arg.strip())

    def cmd_alpha(self, arg: str) -> str:
        if arg:
            spec = fields.spec_map(LoadConfig)["alphas"]  # the --alpha option's own parse
            try:
                given = spec.option.parse(arg.split())
                fields.check_value(spec, given)
            except UserError as exc:
                raise UserError(f"/alpha {str(exc).removeprefix('alphas ')}") from None
            by_name = {a.name: a for a in self.alphas}
            for name, value in given.items():
                if name not in by_name:
                    raise UserError(f"/alpha {name}={value:g}: no ARM named {name!r}; the ARMs "
                                    f"are {', '.join(by_name) or 'none'}")
            for name, value in given.items():
                by_name[name].alpha = value
        return "\n".join(f"{a.name} = {a.alpha:g}" + ("  (off)" if a.alpha == 0 else "")
                         for a in self.alphas) or "no ARM: pass --arm or --preset"

    def cmd_arms(self, arg: str) -> str:
        return "\n".join(f"{a.name}: alpha {w.alpha:g}, {a.kind} {a.path}"
                         for a, w in zip(self.engine.arms, self.alphas)) \
            or "no ARM: pass --arm or --preset"

    def cmd_temp(self, arg: str) -> str:
        if arg:
            try:
                value = float(arg)
                sampling = dataclasses.replace(self.sampling, temperature=value, greedy=False)
                sampling.validate()
            except ValueError:
                raise UserError(f"/temp {arg}: write a number >= 0, for example /temp 0.7") \
                    from None
            self.sampling = sampling
        return f"temperature {self.sampling.temperature:g}" + \
            (" (greedy)" if self.sampling.is_greedy else "")

    def cmd_system(self, arg: str) -> str:
        if arg == "-":
            self.system = None
        elif arg:
            self.system = arg
        return f"system prompt: {self.system}" if self.system else "no system prompt"

    def cmd_retry(self, arg: str) -> Resend:
        if not self.turns:
            raise UserError("nothing to retry yet")
        last = self.turns.pop()
        self.first = min(self.first, len(self.turns))
        return Resend(last.user)

    def cmd_reset(self, arg: str) -> str:
        self.turns, self.first, self.last = [], 0, None
        return "conversation cleared" + (" (the system prompt stays)" if self.system else "")

    def cmd_save(self, arg: str) -> str:
        if not arg:
            raise UserError("/save needs a file name, for example /save chat.json")
        path = Path(arg).expanduser()
        write_atomic(path, json.dumps(self.transcript(), ensure_ascii=False, indent=2) + "\n")
        return f"saved {len(self.turns)} {plural(len(self.turns), 'turn')[2:]} to {path}"

    def cmd_stats(self, arg: str) -> str:
        r = self.last
        if r is None:
            return "no reply yet"
        u = r.usage
        return (f"last reply: {len(r.tokens)} tokens, {u.tokens_per_second:.1f} tokens/s; time to "
                f"first token {u.time_to_first_token:.3f} s ({r.prefilled_tokens} prompt tokens "
                f"decoded, {u.cached_tokens} reused from the cache)")

    def cmd_help(self, arg: str) -> str:
        return "\n".join(f"{name} {usage}".ljust(22) + text
                         for name, (usage, text, _) in COMMANDS.items()) + \
            '\nA line of """ starts and ends a message of several lines. Ctrl-C stops a reply.'

    def cmd_quit(self, arg: str) -> str:
        raise Quit()

    def transcript(self) -> dict:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.user})
            messages.append({"role": "assistant", "content": turn.reply,
                             "settings": turn.settings})
        return {"base": str(self.engine.model.path),
                "arms": [{"name": a.name, "kind": a.kind, "path": str(a.path)}
                         for a in self.engine.arms],
                "messages": messages}


COMMANDS: dict[str, tuple[str, str, Callable]] = {
    "/alpha": ("[NAME=VALUE]", "set an ARM's weight for the next replies; alone: list them",
               ChatSession.cmd_alpha),
    "/arms": ("", "list the ARMs: weight, kind, file", ChatSession.cmd_arms),
    "/temp": ("[VALUE]", "set the sampling temperature (0: greedy)", ChatSession.cmd_temp),
    "/system": ("[TEXT|-]", "set the system prompt (- clears it); alone: show it",
                ChatSession.cmd_system),
    "/retry": ("", "generate the last reply again, with a new seed", ChatSession.cmd_retry),
    "/reset": ("", "start a new conversation", ChatSession.cmd_reset),
    "/save": ("FILE", "write the transcript and each reply's settings as JSON",
              ChatSession.cmd_save),
    "/stats": ("", "speed of the last reply", ChatSession.cmd_stats),
    "/help": ("", "this list", ChatSession.cmd_help),
    "/quit": ("", "leave (so does Ctrl-D)", ChatSession.cmd_quit),
}


def write_atomic(path: Path, text: str) -> None:
    """Write through a hidden file in the same folder and rename: never a half-written file."""
    try:
        files.write_text(path, text)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


# -- the terminal ---------------------------------------------------------------------------------
@click.command(context_settings={"default_map": {"max_tokens": 512}})
@generation_options
@click.option("--history/--no-history", default=True, show_default=True,
              help="Keep the lines typed at a terminal in "
              "$XDG_STATE_HOME/edge-genarm/chat_history for the arrow keys of later sessions.")
def chat(history: bool, **kwargs) -> None:
    """Chat with the guided model; /help at the prompt lists the commands.

    When stdin is not a terminal, each line is a message (or a slash command) and each reply is
    written to stdout, the answers of commands to stderr.
    """
    config = from_click(kwargs)
    llama.set_verbose(config.load.verbose)
    with Model(dataclasses.replace(config, load=dataclasses.replace(config.load, parallel=1))) \
            as model:
        session = ChatSession(model)
        if sys.stdin.isatty():
            _run_terminal(session, _history_file() if history else None)
        elif _run_script(session):
            raise UserError("some lines of the input failed (see above)")


def _run_terminal(session: ChatSession, history: Path | None) -> None:
    read = _line_reader(history)
    arms = ", ".join(f"{a.name} x {a.alpha:g}" for a in session.alphas) or "no ARM"
    click.echo(f"edge-genarm chat: {session.engine.model.path.name} guided by {arms}. /help "
               "lists the commands, Ctrl-C stops a reply, Ctrl-D leaves.", err=True)
    while True:
        try:
            text = _read_message(read, "> ")
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:  # at the prompt, as in a shell: drop the line
            click.echo("", err=True)
            continue
        try:
            _handle(session, text, interactive=True)
        except Quit:
            return
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
        except KeyboardInterrupt:  # in the instant before a reply's own Ctrl-C handler is set
            click.echo("", err=True)


def _run_script(session: ChatSession) -> int:
    """One message or command per line of stdin; returns how many lines failed."""
    failed = 0

    def read(prompt: str) -> str:
        # bytes that are not UTF-8 reach the tokenizer, which refuses that line alone
        line = sys.stdin.buffer.readline().decode("utf-8", errors="surrogateescape")
        if not line:
            raise EOFError
        return line.rstrip("\n")

    while True:
        try:
            text = _read_message(read, "")
        except EOFError:
            return failed
        try:
            _handle(session, text, interactive=False)
        except Quit:
            return failed
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            failed += 1


def _read_message(read: Callable[[str], str], prompt: str) -> str:
    """One line, or the lines between two lines of \"\"\" as one message."""
    while True:
        line = read(prompt)
        if line.strip() == '"""':
            lines = []
            while (more := read("... " if prompt else "")).strip() != '"""':
                lines.append(more)
            return "\n".join(lines)
        if line.strip():
            return line


def _handle(session: ChatSession, text: str, interactive: bool) -> None:
    if text.startswith("/"):
        answer = session.command(text)
        if not isinstance(answer, Resend):
            click.echo(answer, err=not interactive)
            return
        text = answer.text
    with _interruptible() as stopped:
        turn = session.reply(text, on_text=_write, should_stop=stopped,
                             notify=lambda m: click.echo(f"note: {m}", err=True))
    click.echo("")
    if turn.settings["finish_reason"] == "interrupted":
        click.echo("[reply stopped; the conversation goes on]", err=True)


@contextlib.contextmanager
def _interruptible() -> Iterator[Callable[[], bool]]:
    """Ctrl-C sets a flag that the decode loop reads between tokens, so a model step is never
    cut in half and the KV caches stay consistent."""
    hit = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "edge-genarm" / "chat_history"


def _line_reader(history: Path | None) -> Callable[[str], str]:
    """input() with readline's editing, and the history file read at start and appended to."""
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input
        return input
    if history is not None:
        with contextlib.suppress(OSError):
            history.parent.mkdir(parents=True, exist_ok=True)
            history.touch()
            readline.read_history_file(history)
    readline.set_history_length(2000)

    def read(prompt: str) -> str:
        line = input(prompt)
        if history is not None and line.strip():
            with contextlib.suppress(OSError):
                readline.append_history_file(1, history)
        return line

    return read
