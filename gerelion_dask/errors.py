"""Errors that reach the user as one clear line (the command line maps them to exit codes 2 and 3)."""

from __future__ import annotations

__all__ = ["InputError", "RunFailedError"]


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


class RunFailedError(RuntimeError):
    """A run that cannot go on although its input is good: a task failed on every worker that tried it.

    ``str(err)`` is one line: ``<what failed> - <what to do>`` (the command line prints it and exits with code 3).
    """

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(problem if not hint else f"{problem} - {hint}")

    def __reduce__(self):
        return (RunFailedError, (self.problem, self.hint))
