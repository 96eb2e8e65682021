"""The `edge-genarm` command group. It holds no logic: each command lives in its own module.

Errors: bad input of any kind ends with one line on stderr, `Error: ...`, and a non-zero exit
status (2 for command-line syntax, 1 for everything else, 130 for Ctrl-C), never a traceback.
"""

from __future__ import annotations

import sys

import click

from .errors import UserError


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            code = _fail(f"{exc.format_message()}{hint}", 2)
        except click.ClickException as exc:
            code = _fail(exc.format_message(), exc.exit_code)
        except UserError as exc:
            code = _fail(str(exc), 1)
        except (KeyboardInterrupt, click.Abort):
            code = _fail("interrupted", 130)
        except BrokenPipeError:  # `edge-genarm generate ... | head`: the reader left, fine
            sys.stderr.close()
            code = 0
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> int:
    click.echo(f"Error: {message}", err=True)
    return code


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-genarm")
def main() -> None:
    """Test-time alignment on local hardware: guide a llama.cpp model with autoregressive reward
    models (GenARM)."""


def _register() -> None:
    from .generate import generate

    main.add_command(generate)


_register()
