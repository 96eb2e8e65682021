"""The README's two opening commands stay true to what CI runs and to what the CLI offers."""

import re
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


def test_every_generate_option_is_in_the_readme():
    help_text = CliRunner().invoke(main, ["generate", "--help"]).stdout
    options = set(re.findall(r"^\s+(?:-\w+, )?(--[a-z-]+)", help_text, re.M)) - {"--help"}
    assert len(options) > 15
    missing = sorted(o for o in options if f"`{o}" not in README and f", {o}`" not in README)
    assert missing == []
