"""Errors users see: one line naming the file, the field and the fix; the CLI prints them and exits 2."""
from __future__ import annotations


class NasError(Exception):
    """Base class for every error the CLI reports as one line (exit code 2) instead of a traceback."""


class ConfigError(NasError, ValueError):
    """A user-supplied file or value is invalid.

    `source` is the file (or "<string>"), `field` a dotted path inside it such as
    "stages[1].blocks[3].kernel"; the message says what is wrong and how to fix it.
    """

    def __init__(self, source: str | None, field: str | None, message: str):
        self.source = source or "<input>"
        self.field = field
        self.message = message
        where = f"{self.source}: {field}" if field else self.source
        super().__init__(f"{where}: {message}")


class NoSpaceError(NasError):
    """A write refused for want of space (a full disk, a quota, the file size limit); the message names the file, the
    cause and what to run once there is space again."""
