"""The README stays true: its two opening commands to what CI runs, its promise that generating
and chatting need no torch, and its shape: a short front page whose links lead somewhere. (Every
option of the CLI is checked against the generated reference in tests/test_docs.py.)"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def opening_commands():
    return re.findall(r"```bash\n(.+?)\n```", README)[:2]


def test_ci_runs_exactly_the_readme_test_command():
    _, test_command = opening_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == test_command


def test_the_readme_is_a_short_front_page():
    """The guide and the reference live in docs/; the README only opens the door."""
    assert len(README.splitlines()) <= 260


def test_every_relative_link_in_the_readme_leads_to_a_file():
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    relative = [t.split("#")[0] for t in targets
                if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert len(relative) >= 10  # the docs pages are linked from here
    missing = sorted({t for t in relative if not (ROOT / t).exists()})
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
