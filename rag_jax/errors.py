"""The error boundary of ``rag-jax`` and ``launch/*.py``: a user's mistake is
one line on stderr and exit code 2; a bug keeps its traceback.

``run_reporting_errors(fn, prog, debug=...)`` runs a command and prints a
known error as ``PROG: error: FILE:LINE: reason`` (the message carries the
location). Known errors are

- the classes below and the other modules' error classes (``QAFormatError``,
  ``CheckpointError``), whose messages are written for the user;
- ``OSError``s that name a file (missing, unreadable, a directory...);
- ``ValueError`` / ``KeyError`` / ``FileNotFoundError`` raised by a ``raise``
  statement of this package: a message written here. The same classes raised
  inside a library, or by an operation in our code (a failed reshape), are
  bugs and keep their traceback.

This module imports only the standard library (absl only in
``debug_requested``), so the CLI can load it before anything heavy.
"""
from __future__ import annotations

import linecache
import sys
from pathlib import Path
from typing import Callable, Sequence

EXIT_USER_ERROR = 2  # as argparse's usage errors

# Error classes of other modules, looked up only once their module is loaded:
# an error of a module never imported cannot have been raised.
_MODULE_ERRORS = (
    ("rag_jax.data.qa_records", "QAFormatError"),
    ("rag_jax.hf.io", "CheckpointError"),
)
_PACKAGE_DIR = Path(__file__).resolve().parent


class UsageError(ValueError):
    """A wrong command line: an unknown flag, a flag value of the wrong type, a missing required flag."""


class ConfigError(UsageError):
    """A config field (``--config.a.b=value``) is unknown or mistyped; the message names it."""


def _known_classes() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = [UsageError]
    for module_name, class_name in _MODULE_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None:
            classes.append(getattr(module, class_name))
    return tuple(classes)


def _raised_by_our_raise_statement(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is a ``raise``
    statement of this package (so its message was written for the user)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def user_message(error: BaseException) -> str | None:
    """The one-line message of a known error, None for anything else (a bug)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
        text = f"{error.filename}: {error.strerror}"
    elif isinstance(error, _known_classes()) or (
        isinstance(error, (ValueError, KeyError, FileNotFoundError)) and _raised_by_our_raise_statement(error)
    ):
        # str(KeyError("msg")) is "'msg'": take the message itself.
        single = len(error.args) == 1 and isinstance(error.args[0], str)
        text = error.args[0] if single else str(error)
    else:
        return None
    # One line however the message was built (absl's flag errors span several).
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def run_reporting_errors(fn: Callable[[], int | None], prog: str, *, debug: bool = False) -> int:
    """Runs ``fn`` and returns its exit code (None counts as 0); a known error
    becomes ``PROG: error: MESSAGE`` on stderr and exit code 2. With ``debug``
    every error propagates with its full traceback."""
    try:
        return int(fn() or 0)
    except Exception as e:  # re-raised below unless it is a user error
        message = None if debug else user_message(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether an absl command line sets ``--debug`` (read before the full flag
    parse, whose own errors the boundary must already report)."""
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_bool("debug", False, "show tracebacks", flag_values=fv)
    try:
        fv(list(argv), known_only=True)
    except flags.Error:
        return False  # "--debug=maybe": the full parse reports it
    return bool(fv.debug)
