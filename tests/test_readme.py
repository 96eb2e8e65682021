"""The README stays true: its two opening commands to what CI runs, its option tables to what the
CLI offers, and its promise that generating and chatting need no torch."""

import json
import re

import pytest
from pathlib import Path

from click.testing import CliRunner

from edge_genarm.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def opening_commands():
    return re.findall(r"```bash\n(.+?)\n```", README)[:2]


def test_ci_runs_exactly_the_readme_test_command():
    _, test_command = opening_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == test_command


@pytest.mark.parametrize("command, at_least", [("generate", 15), ("chat", 15), ("convert", 8),
                                                ("train", 20)])
def test_every_option_is_in_the_readme(command, at_least):
    help_text = CliRunner().invoke(main, [command, "--help"]).stdout
    options = set(re.findall(r"^\s+(?:-\w+, )?(--[a-z-]+)", help_text, re.M)) - {"--help"}
    assert len(options) >= at_least
    missing = sorted(o for o in options if f"`{o}" not in README and f", {o}" not in README)
    assert missing == []


HEAVY = ("torch", "transformers", "safetensors", "peft")

# Runs in a fresh interpreter: each CLI call of argv[1] (JSON: [args, input] pairs), then the
# JSON of their exit codes and output sizes and of the heavy modules imported by then.
PROBE = f"""
import json, sys
from click.testing import CliRunner
from edge_genarm.cli import main
runs = []
for args, text in json.loads(sys.argv[1]):
    if args == ["--import-torch"]:  # the control: a step that does import torch
        import torch
        runs.append([0, 1])
        continue
    r = CliRunner().invoke(main, args, input=text)
    runs.append([r.exit_code, len(r.stdout.strip())])
    if r.exit_code:
        print(r.stderr, file=sys.stderr)
print(json.dumps({{"runs": runs, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""


def probe(steps):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(steps)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_stays_out_of_generation(tmp_path):
    """A user who only generates or chats needs no torch: the commands import it lazily."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi!\nWhat is rain?\n")
    demo = ["--preset", "demo", "--greedy", "-n", "3"]
    steps = [[["generate", *demo, "--compare", "Hi!"], None],
             [["chat", *demo], "Hi!\n/alpha concise=1\nAnd now?\n"],
             [["generate", *demo, "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")],
              None],
             [["models", "list"], None],
             [["convert", "--help"], None]]
    result = probe(steps)
    # every command really ran and answered (batch mode writes its records, not stdout): a
    # command that failed early would prove nothing
    assert [code for code, _ in result["runs"]] == [0] * len(steps), result
    assert all(size > 0 for i, (_, size) in enumerate(result["runs"]) if i != 2), result
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["text"] and r["error"] is None for r in records)
    assert result["heavy"] == []
    # the same probe does see torch where a step imports it
    assert probe([[["--import-torch"], None]])["heavy"] == ["torch"]
