"""Errors a user can act on.

Contract: every message is one line that says what is wrong and what to do. The CLI prints it as
`Error: <message>` and exits non-zero with no traceback; library callers catch `UserError`.
"""


class UserError(Exception):
    """Bad input: a file, an option or a prompt that cannot be used as given. `param` names the
    request option at fault, where one is (a server's error body names it)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelFileError(UserError):
    """A model or adapter file that is missing, not GGUF, truncated or of the wrong kind."""


class IncompatibleModelsError(UserError):
    """A base and an ARM that cannot be combined (tokenizer or architecture differs)."""


class UnknownArmError(UserError):
    """A request names an ARM the model does not have, or gives one a weight that is not a number."""

    def __init__(self, message: str = ""):
        super().__init__(message, "arms")


class ContextFullError(UserError):
    """The sequence no longer fits the context window."""


class EngineError(Exception):
    """A failure inside llama.cpp (a decode that errs): not the user's input, unlike UserError."""


class ConversionError(UserError):
    """A checkpoint or adapter that cannot be converted as asked."""


def plural(n: int, word: str) -> str:
    """'1 turn', '2 turns': for the counts in messages."""
    return f"{n} {word}" + ("" if n == 1 else "s")
