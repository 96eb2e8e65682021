"""The README's two opening commands stay true to what CI runs and to what the CLI offers."""

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


def test_torch_stays_out_of_generation():
    """A user who only generates or chats needs no torch: the commands import it lazily."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from edge_genarm.cli import main; "
            "CliRunner().invoke(main, ['generate', '--greedy', '-n', '1', 'hi']); "
            "CliRunner().invoke(main, ['chat', '--greedy', '-n', '1'], input='hi\\n/alpha\\n'); "
            "CliRunner().invoke(main, ['convert', '--help']); "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
