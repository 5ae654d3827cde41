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


def write_failure(e: BaseException) -> str | None:
    """One line for an exception that means the disk is full (or a file-size limit was hit) while writing, as the
    libraries raise it — OSError ENOSPC / EDQUOT / EFBIG, torch's ``PytorchStreamWriter failed writing file`` /
    ``inline_container.cc`` RuntimeError, safetensors' serialization IoError — found anywhere in the exception's
    chain; None for any other exception."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            return f"writing failed: {e.strerror or 'no space left'}{where}"
        if ("PytorchStreamWriter failed" in text or "inline_container" in text or "file write failed" in text
                or "StorageFull" in text or "FileTooLarge" in text or "No space left" in text):
            return f"writing failed: the disk is full or a file-size limit was hit ({first_line(e)[:160]})"
        e = e.__cause__ or e.__context__
    return None
