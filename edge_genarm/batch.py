"""Offline batch generation: `edge-genarm generate --input PROMPTS --output OUT.jsonl`.

Contract:
- Input: JSONL lines with `prompt` (a string) or `messages` (a chat), and an optional `id`; or a
  plain text file, one prompt per line (a `.jsonl`/`.ndjson` name, or a first line starting with
  `{`, means JSONL). An item without an id gets its line number. A malformed line is reported with
  its number and skipped.
- `run_batch` keeps up to K sequences in the engine at once (one sequence id each in the base and
  every ARM context) and steps them together, one batch per model per step; a finished sequence's
  slot takes the next prompt right away, its prefill riding in the same batch.
- Each prompt's seed comes from the run seed and its id alone, so results do not depend on K or
  on the order of the prompts.
- Nothing is lost: each record is appended, flushed and synced the moment it is finished; a
  prompt that fails (too long, say) is written with its error and the run goes on. `--resume`
  first cuts a last line torn by a crash, then skips the ids already written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from . import llama
from .engine import Engine, Sequence
from .errors import UserError, plural
from .generation import Request, TextStream, chat_template, encode_messages, encode_prompt
from .options import GenerationOptions
from .sampling import make_sampler

JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass
class Item:
    id: object
    line: int
    prompt: str | None = None
    messages: list[dict] | None = None


@dataclass(frozen=True)
class Malformed:
    line: int
    reason: str


# -- input ----------------------------------------------------------------------------------------
def read_items(path: Path) -> Iterator[Item | Malformed]:
    """The prompts of a file, in order; malformed lines come out as `Malformed`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--input {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"--input {path} is a directory; name a JSONL or text file") from None
    except PermissionError:
        raise UserError(f"--input {path} cannot be read: permission denied") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--input {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") \
            from None
    first = next((line for line in lines if line.strip()), "")
    jsonl = path.suffix.lower() in JSONL_SUFFIXES or first.lstrip().startswith("{")
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        item = _parse_jsonl(text, number) if jsonl else Item(number, number, prompt=text)
        if isinstance(item, Item):
            key = json.dumps(item.id)
            if key in seen:
                item = Malformed(number, f"id {key} appears on an earlier line")
            seen.add(key)
        yield item


def _parse_jsonl(text: str, number: int) -> Item | Malformed:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return Malformed(number, f"not valid JSON ({exc.msg})")
    if not isinstance(row, dict):
        return Malformed(number, "not a JSON object")
    item_id = row.get("id", number)
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        return Malformed(number, "id must be a string or an integer")
    prompt, messages = row.get("prompt"), row.get("messages")
    if (prompt is None) == (messages is None):
        return Malformed(number, 'needs exactly one of "prompt" and "messages"')
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        return Malformed(number, '"prompt" must be a non-empty string')
    if messages is not None and not (
            isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages)):
        return Malformed(number, '"messages" must be a non-empty list of {"role", "content"}')
    return Item(item_id, number, prompt=prompt, messages=messages)


def encode_item(engine: Engine, item: Item, opts: GenerationOptions) -> list[int]:
    if item.prompt is not None:
        return encode_prompt(engine, item.prompt, opts.system, opts.raw, opts.chat_template)
    template = chat_template(engine, opts.chat_template)
    if opts.raw or template is None:
        raise UserError('"messages" need the chat template; give "prompt" instead')
    return encode_messages(engine, item.messages, template)


def seed_for(run_seed: int, item_id: object) -> int:
    """A prompt's seed: from the run seed and its id only (not its place or K)."""
    digest = hashlib.sha256(json.dumps([run_seed, item_id]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# -- output ---------------------------------------------------------------------------------------
class RecordFile:
    """The output JSONL: refused if it exists (unless resuming), appended one synced line at a time.

    On resume a torn last line (a crash mid-write) is cut off, and the ids written are known.
    """

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.done: dict[str, dict] = {}  # json.dumps(id) -> record
        self.torn_bytes = 0
        if path.is_dir():
            raise UserError(f"--output {path} is a directory; name a file, for example "
                            f"{path / 'out.jsonl'}")
        if path.exists() and not resume:
            raise UserError(f"--output {path} already exists; pass --resume to continue it, or "
                            "choose another --output")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise UserError(f"--output {path}: the folder {folder} does not exist; create it "
                            "first")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UserError(f"cannot write --output {path}: permission denied")
        if resume and path.exists():
            self._read()
        self.fh = None

    def open(self) -> None:
        """Cut a torn last line, then append: called once the models are loaded, so that a run
        refused before that leaves no file behind and changes none."""
        if self.torn_bytes:
            with open(self.path, "r+b") as fh:
                fh.truncate(self.path.stat().st_size - self.torn_bytes)
        try:
            self.fh = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write --output {self.path}: {exc.strerror}") from None

    def _read(self) -> None:
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        self.torn_bytes = len(data) - good
        for number, line in enumerate(data[:good].decode("utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
                self.done[json.dumps(record["id"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"--output {self.path} line {number} is not a record of this "
                                "tool; resume needs the file a run wrote") from None

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


# -- the scheduler --------------------------------------------------------------------------------
@dataclass
class Slot:
    """One prompt being generated: its sequence, sampler state and text so far."""
    item: Item
    seq: Sequence
    prompt_ids: list[int]
    seed: int
    text: TextStream
    rng: np.random.Generator
    pending: list[int]
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    tokens: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)


def run_batch(engine: Engine, items: Iterable[Item], opts: GenerationOptions, run_seed: int,
              n_parallel: int, emit) -> None:
    """Generate every item, up to n_parallel at once; `emit(record)` gets each finished one."""
    sampler = make_sampler(opts.sampling)
    request = opts.request()
    pending_items = iter(items)
    free = list(range(n_parallel - 1, -1, -1))
    slots: dict[int, Slot] = {}
    while True:
        while free and (item := next(pending_items, None)) is not None:
            slot = _start(engine, item, opts, request, run_seed, free[-1], emit)
            if slot is not None:
                slots[free.pop()] = slot
        if not slots:
            return
        for sid in [s for s, slot in slots.items()
                    if len(slot.seq.tokens) + len(slot.pending) > engine.n_ctx]:
            _finish(slots.pop(sid), "context_full", engine, emit)
            free.append(sid)
        if not slots:
            continue
        live = list(slots.items())
        rows = engine.advance([s.seq for _, s in live], [s.pending for _, s in live])
        rows = rows if rows.ndim == 2 else rows[None]
        now = time.perf_counter()
        for (sid, slot), row in zip(live, rows):
            token = sampler(row, slot.rng)
            slot.t_first = slot.t_first or now
            slot.tokens.append(token)
            piece, finish = slot.text.push(token)
            slot.parts.append(piece)
            slot.pending = [token]
            if finish:
                _finish(slots.pop(sid), finish, engine, emit)
                free.append(sid)


def _start(engine: Engine, item: Item, opts: GenerationOptions, request: Request, run_seed: int,
           seq_id: int, emit) -> Slot | None:
    seed = seed_for(run_seed, item.id)
    try:
        ids = encode_item(engine, item, opts)
        if len(ids) >= engine.n_ctx:
            raise UserError(f"the prompt is {len(ids)} tokens but the context holds "
                            f"{engine.n_ctx}; shorten it or raise --ctx-size")
    except UserError as exc:
        emit(_record(item, seed) | {"error": str(exc)})
        return None
    slot = Slot(item, engine.new_sequence(seq_id), ids, seed, TextStream(engine, request),
                np.random.default_rng(seed), pending=ids)
    if request.max_tokens == 0:
        _finish(slot, "length", engine, emit)
        return None
    return slot


def _finish(slot: Slot, reason: str, engine: Engine, emit) -> None:
    now = time.perf_counter()
    if reason == "context_full":
        slot.parts.append(slot.text.close())
    emit(_record(slot.item, slot.seed) | {
        "text": "".join(slot.parts), "tokens": slot.tokens, "finish_reason": reason,
        "prompt_tokens": len(slot.prompt_ids), "completion_tokens": len(slot.tokens),
        "first_token_seconds": round((slot.t_first or now) - slot.t_start, 4),
        "seconds": round(now - slot.t_start, 4)})


def _record(item: Item, seed: int) -> dict:
    """The fields every record has; `run_job` adds the run-wide ones."""
    given = {"prompt": item.prompt} if item.prompt is not None else {"messages": item.messages}
    return {"id": item.id, **given, "seed": seed, "text": None, "tokens": [],
            "finish_reason": None, "error": None}


# -- the job --------------------------------------------------------------------------------------
def run_job(opts: GenerationOptions, input_path: Path, output: Path, n_parallel: int,
            resume: bool) -> None:
    """Read, skip what is done, generate the rest with a progress line, summarise."""
    if not 1 <= n_parallel <= llama.max_parallel_sequences():
        raise UserError(f"--n-parallel must be between 1 and {llama.max_parallel_sequences()}, "
                        f"got {n_parallel}")
    parsed = list(read_items(input_path))
    malformed = [m for m in parsed if isinstance(m, Malformed)]
    for m in malformed:
        click.echo(f"{input_path} line {m.line}: {m.reason}; skipped", err=True)
    out = RecordFile(output, resume)
    run_seed = opts.seed
    if resume and out.done and not opts.seed_given:  # go on with the interrupted run's seed
        run_seed = next(iter(out.done.values())).get("run_seed", run_seed)
    todo = [i for i in parsed if isinstance(i, Item) and json.dumps(i.id) not in out.done]
    context = dataclasses.replace(opts.context, n_seq_max=n_parallel)
    settings = {"alphas": None, "sampling": dataclasses.asdict(opts.sampling),
                "max_tokens": opts.max_tokens, "stop": list(opts.stop), "system": opts.system,
                "run_seed": run_seed}
    progress = Progress(len(todo))
    failed = 0
    try:
        with Engine.load(dataclasses.replace(opts.engine_config(), context=context)) as engine:
            settings["alphas"] = {a.name: a.alpha for a in engine.arms}
            out.open()
            if out.torn_bytes:
                click.echo(f"{output}: cut a torn last line ({out.torn_bytes} bytes) left by a "
                           "crash", err=True)

            def emit(record: dict) -> None:
                nonlocal failed
                failed += record["error"] is not None
                out.write(record | settings)
                progress.update(record.get("completion_tokens", 0))

            run_batch(engine, todo, opts, run_seed, n_parallel, emit)
    except KeyboardInterrupt:
        progress.end()
        click.echo(f"interrupted: {progress.done} new records are in {output}; run the same "
                   "command with --resume to finish", err=True)
        raise
    finally:
        out.close()
    progress.end()
    click.echo(f"{progress.done} records written to {output} ({failed} with an error), "
               f"{len(parsed) - len(malformed) - len(todo)} already there; "
               f"{progress.tokens} tokens in {progress.elapsed():.1f} s, "
               f"{progress.rate():.1f} tokens/s", err=True)
    problems = [f"{plural(len(malformed), 'malformed input line')} skipped (see above)"] \
        if malformed else []
    if failed:
        problems.append(f"{plural(failed, 'prompt')} failed (see their error field in {output})")
    if problems:
        raise UserError("; ".join(problems))


class Progress:
    """One line on stderr: prompts done, tokens/s, time left (redrawn on a terminal, else a line
    every 10 %)."""

    def __init__(self, total: int):
        self.total, self.done, self.tokens = total, 0, 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> float:
        return self.tokens / self.elapsed() if self.elapsed() > 0 else 0.0

    def update(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        left = self.elapsed() / self.done * (self.total - self.done)
        line = (f"{self.done}/{self.total} prompts, {self.rate():.1f} tokens/s, "
                f"{_duration(left)} left")
        if self.tty:
            click.echo(f"\r{line}\033[K", nl=False, err=True)
        elif self.done * 10 // max(self.total, 1) != self.shown:
            self.shown = self.done * 10 // max(self.total, 1)
            click.echo(line, err=True)

    def end(self) -> None:
        if self.tty and self.done:
            click.echo("", err=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
