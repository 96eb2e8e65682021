"""The `edge-genarm` command group. It holds no logic: each command lives in its own module.

Errors: bad input of any kind ends with one line on stderr, `Error: ...`, and a non-zero exit
status (2 for command-line syntax, 1 for everything else, 130 for Ctrl-C), never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from .errors import EngineError, UserError


def run_command(command: click.Command, args=None, prog_name=None, complete_var=None,
                standalone_mode=True, **extra):
    """Run a click command with edge-genarm's error handling (one line, exit status)."""
    try:
        code = click.Command.main(command, args, prog_name, complete_var, standalone_mode=False,
                                  **extra)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        code = _fail(f"{exc.format_message()}{hint}", 2)
    except click.ClickException as exc:
        code = _fail(exc.format_message(), exc.exit_code)
    except (UserError, EngineError) as exc:
        code = _fail(str(exc), 1)
    except (KeyboardInterrupt, click.Abort):
        code = _fail("interrupted", 130)
    except BrokenPipeError:  # `edge-genarm generate ... | head`: the reader left, fine
        sys.stderr.close()
        code = 0
    if not standalone_mode:
        return code
    sys.exit(code if isinstance(code, int) else 0)


class _Group(click.Group):
    """Commands are imported when used, so that `convert` (torch) costs nothing to chat."""

    lazy = {"generate": "edge_genarm.generate:generate", "chat": "edge_genarm.chat:chat",
            "convert": "edge_genarm.convert.cli:convert",
            "models": "edge_genarm.models:models", "serve": "edge_genarm.serve.cli:serve",
            "train": "edge_genarm.train.cli:train"}

    def list_commands(self, ctx):
        return sorted(self.lazy)

    def get_command(self, ctx, name):
        if name not in self.lazy:
            return None
        module, attr = self.lazy[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        """Each command's whole first paragraph, wrapped (click cuts it at one short line)."""
        rows = []
        for name in self.list_commands(ctx):
            text = (self.get_command(ctx, name).help or "").split("\n\n")[0]
            rows.append((name, " ".join(text.split())))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, *args, **kwargs):
        return run_command(self, *args, **kwargs)


def _fail(message: str, code: int) -> int:
    click.echo(f"Error: {message}", err=True)
    return code


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-genarm")
def main() -> None:
    """Test-time alignment on local hardware: guide a llama.cpp model with autoregressive reward
    models (GenARM)."""

