"""Preference data: JSONL lines {"prompt", "chosen", "rejected"}, encoded for training.

Contract: `load_pairs(path, encoder, max_length)` returns the encoded pairs and a list of
`Skipped(line, reason)` for every line that cannot be used (not JSON, a missing or empty field,
chosen equal to rejected, a prompt that leaves no room for a response within max_length).
Nothing raises for a bad line; a file with no usable pair at all is an error.
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


def load_pairs(path: str | Path, encoder: Encoder, max_length: int
               ) -> tuple[list[Pair], list[Skipped]]:
    pairs, skipped = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a JSONL file of preference pairs") from None
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        reason = None
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row, reason = None, "not valid JSON"
        if reason is None and not isinstance(row, dict):
            reason = "not a JSON object"
        if reason is None:
            missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row.get(k), str)]
            empty = [k for k in ("chosen", "rejected") if not missing and not row[k].strip()]
            if missing:
                reason = f"missing field {missing[0]!r}"
            elif empty:
                reason = f"empty {empty[0]} response"
            elif row["chosen"].strip() == row["rejected"].strip():
                reason = "chosen and rejected are identical"
        if reason is None:
            prompt = encoder.prompt(row["prompt"])
            if len(prompt) >= max_length:
                reason = f"prompt of {len(prompt)} tokens leaves no room within max length {max_length}"
            else:
                room = max_length - len(prompt)
                pairs.append(Pair(prompt, encoder.response(row["chosen"])[:room],
                                  encoder.response(row["rejected"])[:room], number))
                continue
        skipped.append(Skipped(number, reason))
    if not pairs:
        raise UserError(f"{path} has no usable preference pair ({len(skipped)} lines skipped; "
                        "each line needs prompt, chosen and rejected)")
    return pairs, skipped
