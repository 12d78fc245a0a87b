"""Errors that reach the user as one clear line (the command line maps them to exit code 2)."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input: a file that cannot be used, or an impossible option.

    ``str(err)`` is one line: ``<file>: <what is wrong>[ (<what to do>)]``.
    """

    def __init__(self, path: object, problem: str, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.hint = hint
        text = problem if self.path is None else f"{self.path}: {problem}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)

    def __reduce__(self):
        # picklable with its fields, so an error raised in a Dask task reaches the client intact
        return (InputError, (self.path, self.problem, self.hint))
