"""Errors: nothing here changes a number. The errors every module raises, and what each tells the user.

cli.cli_main turns them into exit codes: UsageError (and DataError) exit 2 with one line and no traceback;
StopRun (NonFiniteError, DiskFull) exits 1 with one line saying what is intact.
"""


class UsageError(ValueError):
    """A problem with what the user passed (path, flag value, model dir): exit 2, one line, no traceback."""


class DataError(UsageError):
    """A bad data file or row; the message names the file, the 1-based row and the field."""


class StopRun(RuntimeError):
    """A run stopped on purpose (a non-finite value, --max-kl, too many failed requests) or by a full disk:
    exit 1, one line saying what is intact."""


class NonFiniteError(StopRun):
    """A non-finite loss, gradient norm or weight: the run stops before anything non-finite is written."""


class DiskFull(StopRun):
    """A write that ran out of space (full disk, quota, file-size limit): its temp file is removed and the
    previous complete output is left as it was."""


def first_line(e):
    """An exception's message, first line only (library messages run to pages)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
