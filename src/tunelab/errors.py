"""The one error type users see: a one-line message with its location, exit status 2."""

from __future__ import annotations


class TunelabError(Exception):
    """A problem with the user's input (config, data, arguments, files).

    The CLI prints ``tunelab: <where>: <message>`` on one line and exits with status 2; tracebacks
    only with ``--debug``. ``where`` is a file, ``file:line``, or a config key.
    """

    exit_code = 2

    def __init__(self, message: str, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def one_line(text: object) -> str:
    """Collapse an arbitrary exception message onto one line."""
    return " ".join(str(text).split())
