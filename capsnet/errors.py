"""The errors the command line turns into one line and an exit code (see `capsulenet.main`)."""

from __future__ import annotations

EXIT_OS_ERROR = 1  # a full disk, a vanished folder: the message names the file
EXIT_BAD_INPUT = 2  # argparse's own code for a bad flag; ours for bad files and data too
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


class DataError(ValueError):
    """A dataset, image or class-names file that cannot be used; the message says why and what to do.

    Raised by the data modules (`capsnet.datasets`, `capsnet.image_folder`); the command line reports
    it as a `UserError`.
    """


class UserError(Exception):
    """A problem with the user's flags or files: printed as one line, exit code 2."""


class TrainingDivergedError(Exception):
    """The loss became NaN or inf; the last good checkpoint and backup are kept (exit code 3)."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most `limit` characters, or its type's name: what
    a one-line `error:` report can quote of a library's multi-line message."""
    lines = str(error).strip().splitlines()
    return (lines[0][:limit] if lines else "") or type(error).__name__
