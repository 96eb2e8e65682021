"""Offline batch generation: `edge-genarm generate --input PROMPTS --output OUT.jsonl`.

Contract:
- Input: JSONL lines with `prompt` (a string) or `messages` (a chat), and an optional `id`; or a
  plain text file, one prompt per line (a `.jsonl`/`.ndjson` name, or a first line starting with
  `{`, means JSONL). An item without an id gets its line number. A malformed line is reported with
  its number and skipped.
- `run_batch` hands every line to the Python API (`Model.as_completed`): up to K sequences decode
  together (one sequence id each in the base and every ARM context), one batch per model per
  step; a finished sequence's slot takes the next prompt right away, its prefill riding in the
  same batch.
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
import secrets
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from . import fields
from .cluster import ClusterSpec
from .config import Config, RequestParams
from .errors import UserError, plural
from .generation import method_of
from .model import Completion, Model

JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass
class Item:
    id: object
    line: int
    prompt: str | None = None
    messages: list[dict] | None = None
    overrides: dict = field(default_factory=dict)  # the line's own arms, temperature, seed...


def line_options(request_cls: type = RequestParams) -> dict[str, fields.Spec]:
    """The keys a JSONL line may carry to override the command line for itself: every request
    option that travels on the wire (as in a server body)."""
    return {s.name: s for s in fields.specs(request_cls) if s.option.wire}


@dataclass(frozen=True)
class Malformed:
    line: int
    reason: str


# -- input ----------------------------------------------------------------------------------------
def read_items(path: Path, request_cls: type = RequestParams) -> Iterator[Item | Malformed]:
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
    keys = line_options(request_cls)
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        item = _parse_jsonl(text, number, keys) if jsonl else Item(number, number, prompt=text)
        if isinstance(item, Item):
            key = json.dumps(item.id)
            if key in seen:
                item = Malformed(number, f"id {key} appears on an earlier line")
            seen.add(key)
        yield item


def _parse_jsonl(text: str, number: int, keys: dict[str, fields.Spec]) -> Item | Malformed:
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
    overrides = {k: row[k] for k in keys if k in row}
    for key, value in overrides.items():
        try:
            overrides[key] = fields.coerce(keys[key], value)
        except (fields.SettingError, UserError):
            return Malformed(number, f'"{key}" must be {fields.kind(keys[key])}, not '
                             f'{json.dumps(value)}')
    return Item(item_id, number, prompt=prompt, messages=messages, overrides=overrides)


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


# -- the requests ---------------------------------------------------------------------------------
def item_call(item: Item, run_seed: int) -> dict:
    """One input line as a batch item of the Python API: its prompt or messages and its own
    request options over the command line's settings."""
    given = {"prompt": item.prompt} if item.prompt is not None else {"messages": item.messages}
    return given | {"seed": seed_for(run_seed, item.id)} | item.overrides


def run_batch(model: Model, items: Iterable[Item], run_seed: int, emit) -> None:
    """Generate every item on the model, `emit(record)` getting each as it finishes. A line the
    model refuses (an unknown ARM, a bad value, a prompt too long) is emitted with its error
    and the run goes on."""
    items = list(items)
    for done in model.as_completed([item_call(item, run_seed) for item in items]):
        item = items[done.index]
        if done.error is not None:
            emit(_record(item, None) | {"error": f"line {item.line}: {done.error}"})
            continue
        answers = [{"text": r.text, "tokens": r.tokens, **r.usage.to_dict()}
                   for r in done.results]
        record = _record(item, done) | answers[0]
        if len(answers) > 1:
            record["answers"] = answers
        emit(record)


def _record(item: Item, done: Completion | None) -> dict:
    """The fields every record has; `run_job` adds the run-wide ones."""
    given = {"prompt": item.prompt} if item.prompt is not None else {"messages": item.messages}
    request = None if done is None else done.request
    used = {} if request is None else {
        "seed": request.seed, "alphas": {name: w if request.method == "genarm" else 0.0
                                         for name, w in done.results[0].alphas.items()},
        **method_of(request), "sampling": dataclasses.asdict(request.sampling),
        "max_tokens": request.max_tokens, "n": request.n}
    return {"id": item.id, **given, **used, "text": None, "tokens": [], "finish_reason": None,
            "error": None}


# -- the job --------------------------------------------------------------------------------------
def run_job(config: Config, input_path: Path, output: Path, resume: bool,
            cluster: ClusterSpec | None = None) -> None:
    """Read, skip what is done, generate the rest with a progress line, summarise; on the
    Ray cluster `cluster` names, if one does."""
    parsed = list(read_items(input_path, type(config.request)))
    malformed = [m for m in parsed if isinstance(m, Malformed)]
    for m in malformed:
        click.echo(f"{input_path} line {m.line}: {m.reason}; skipped", err=True)
    out = RecordFile(output, resume)
    defaults = config.request
    run_seed = defaults.seed if defaults.seed is not None else secrets.randbelow(2**31)
    if resume and out.done and defaults.seed is None:  # go on with the interrupted run's seed
        run_seed = next(iter(out.done.values())).get("run_seed", run_seed)
    todo = [i for i in parsed if isinstance(i, Item) and json.dumps(i.id) not in out.done]
    settings = {"stop": list(defaults.stop), "system": defaults.system, "run_seed": run_seed}
    progress = Progress(len(todo))
    failed = 0
    try:
        with (Model(config) if cluster is None else _cluster_model(cluster)) as model:
            out.open()
            if out.torn_bytes:
                click.echo(f"{output}: cut a torn last line ({out.torn_bytes} bytes) left by a "
                           "crash", err=True)

            def emit(record: dict) -> None:
                nonlocal failed
                failed += record["error"] is not None
                out.write(record | settings)
                progress.update(sum(a.get("completion_tokens", 0)
                                    for a in record.get("answers", [record])))

            run_batch(model, todo, run_seed, emit)
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


def _cluster_model(cluster: ClusterSpec):
    from .cluster.batch import ClusterModel
    return ClusterModel(cluster)


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
