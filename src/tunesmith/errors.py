"""User-facing errors: one line, no traceback, non-zero exit (the CLI catches these)."""


class UserError(Exception):
    """Bad input from the user (config, data, paths). The message is shown as a single line."""


class Stopped(Exception):
    """A run stopped on request (SIGTERM, Ctrl-C) at a clean point: the message is one line saying what was kept and
    how to resume; the CLI exits with ``exit_code`` (128 + the signal's number)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def at(path, line=None, field=None) -> str:
    """Format a location for an error message: ``file:line: field 'x'``."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field is not None:
        loc += f": field '{field}'"
    return loc


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors often run to many lines), or its class name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
