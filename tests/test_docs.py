"""The documentation site stays true: it builds with no warning (so no broken link), its
command-line reference, generated from the click definitions, names every option of every
command, and the runnable examples of the Python API page run."""

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_genarm.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# A fenced Python block right after this line (blank lines between allowed) is run by the tests.
RUN_MARKER = "<!-- run -->"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once with --strict: any warning (a broken link or anchor, a page missing
    from the nav, an object mkdocstrings cannot find) fails the build."""
    out = tmp_path_factory.mktemp("site")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}  # Material's banner, not a build warning
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                            str(out)], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=600)
    return out, build


def test_the_site_builds_strictly(site):
    _, build = site
    assert build.returncode == 0, build.stdout + build.stderr


def sections(page: str) -> dict[str, str]:
    """The text under each heading of a built page, by the heading's id."""
    parts = re.split(r'<h[1-6] id="([^"]+)"', page)
    return {parts[i]: html.unescape(parts[i + 1]) for i in range(1, len(parts) - 1, 2)}


@pytest.mark.parametrize("command", [["generate"], ["chat"], ["serve"], ["convert"], ["train"],
                                     ["models", "show"]], ids=" ".join)
def test_every_option_is_in_the_generated_reference(site, command):
    out, build = site
    assert build.returncode == 0, build.stdout + build.stderr
    help_text = CliRunner().invoke(main, [*command, "--help"], terminal_width=200).stdout
    options = set(re.findall(r"^\s+(?:-\w+, )?(--[a-z-]+)(?: / (--[a-z-]+))?", help_text, re.M))
    options = {o for pair in options for o in pair if o} - {"--help"}
    assert len(options) >= 2
    reference = sections((out / "cli" / "index.html").read_text())
    section = reference[command[-1]]  # each command under a heading of its own name
    missing = sorted(o for o in options if not re.search(rf"(?<![\w-]){o}(?![\w-])", section))
    assert missing == []


def runnable_blocks(path: Path) -> list[str]:
    return re.findall(rf"^{re.escape(RUN_MARKER)}\s*\n```python\n(.*?)\n```", path.read_text(),
                      re.M | re.S)


EXAMPLES = runnable_blocks(DOCS / "python-api.md")


def test_the_python_api_page_has_runnable_examples():
    assert 1 <= len(EXAMPLES) <= 3  # each loads the demo model: keep the suite quick
    for code in EXAMPLES:
        sizes = [int(n) for n in re.findall(r"max_tokens=(\d+)", code)]
        assert sizes and max(sizes) <= 16, code


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i + 1}" for i in range(len(EXAMPLES))])
def test_the_python_api_examples_run(code):
    """Each in a fresh interpreter from the repository root, as a reader would paste it."""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{code}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
