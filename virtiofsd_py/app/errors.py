"""The error that stops start-up: one line for the operator, exit status 1."""

from __future__ import annotations


class StartupError(Exception):
    """A problem that prevents serving; the message, one line, says what and why."""


def describe(e: OSError) -> str:
    """``e`` as the end of such a line: its strerror, with the file it names.

    ``str(e)`` would be ``[Errno 2] No such file or directory: 'x'``, and
    ``e.strerror`` is None for errors Python raises itself (``AF_UNIX path
    too long``).
    """
    text = e.strerror or str(e)
    if e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text
