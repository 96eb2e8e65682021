"""Preference data: JSONL lines {"prompt", "chosen", "rejected"}, encoded for training.

Contract: `load_pairs(path, encoder, max_length)` returns the encoded pairs and a list of
`Skipped(line, reason)` for every line that cannot be used (not UTF-8, not JSON, a missing or
empty field, chosen equal to rejected, a prompt that leaves no room for a response within
max_length). Nothing raises for a bad line; a missing file, a directory, an empty file, a file
that is not UTF-8 text and a file with no usable pair at all raise `UserError` (one line).
`batch_tensors(torch, pairs, pad_id)` lays a batch out for one forward pass (the ARM's and the
reward model's losses both read it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError


@dataclass(frozen=True)
class Pair:
    prompt: list[int]
    chosen: list[int]    # response ids, end-of-turn included
    rejected: list[int]
    line: int


@dataclass(frozen=True)
class Skipped:
    line: int
    reason: str


@dataclass(frozen=True)
class Encoder:
    """How text becomes ids: the prompt through the chat template, a response plus end-of-turn."""
    prompt: Callable[[str], list[int]]
    response: Callable[[str], list[int]]


def read_lines(path: str | Path) -> list[str | None]:
    """The file's lines, None for a line that is not UTF-8; a file that is not text is refused."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path} does not exist; pass a JSONL file of preference pairs")
    if path.is_dir():
        raise UserError(f"--data {path} is a directory; pass a JSONL file of preference pairs")
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"--data {path} is empty; each line needs a JSON object "
                        '{"prompt", "chosen", "rejected"}')
    lines = []
    for line in raw.removeprefix(b"\xef\xbb\xbf").splitlines():  # a byte-order mark is no text
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(None)
    # JSON text never holds a NUL byte: a file that does is binary, whatever else decodes
    if b"\0" in raw or not any(line is not None and line.strip() for line in lines):
        raise UserError(f"--data {path} is not UTF-8 text; it must be JSONL, one JSON object "
                        "per line")
    return lines


def _problem(text: str | None) -> tuple[dict | None, str | None]:
    """(the row, None) for a usable line, else (None, why not)."""
    if text is None:
        return None, "not UTF-8 text"
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return None, "not valid JSON"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row.get(k), str)]
    if missing:
        return None, f"missing field {missing[0]!r}"
    empty = [k for k in ("chosen", "rejected") if not row[k].strip()]
    if empty:
        return None, f"empty {empty[0]} response"
    if row["chosen"].strip() == row["rejected"].strip():
        return None, "chosen and rejected are identical"
    return row, None


def load_pairs(path: str | Path, encoder: Encoder, max_length: int
               ) -> tuple[list[Pair], list[Skipped]]:
    pairs, skipped = [], []
    for number, text in enumerate(read_lines(path), start=1):
        if text is not None and not text.strip():
            continue
        row, reason = _problem(text)
        if row is not None:
            prompt = encoder.prompt(row["prompt"])
            if len(prompt) >= max_length:
                reason = (f"prompt of {len(prompt)} tokens leaves no room within max length "
                          f"{max_length}")
            else:
                room = max_length - len(prompt)
                pairs.append(Pair(prompt, encoder.response(row["chosen"])[:room],
                                  encoder.response(row["rejected"])[:room], number))
                continue
        skipped.append(Skipped(number, reason))
    if not pairs:
        first = skipped[0]
        raise UserError(f"--data {path} has no usable preference pair ({len(skipped)} lines "
                        f"skipped, the first, line {first.line}: {first.reason}); each line "
                        'needs {"prompt", "chosen", "rejected"}')
    return pairs, skipped


def batch_tensors(torch, batch: list[Pair], pad_id: int):
    """chosen then rejected sequences, right-padded, with a mask over response tokens."""
    seqs = [p.prompt + p.chosen for p in batch] + [p.prompt + p.rejected for p in batch]
    starts = [len(p.prompt) for p in batch] * 2
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    response = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        response[i, start:len(seq)] = True
    return ids, attention, response
