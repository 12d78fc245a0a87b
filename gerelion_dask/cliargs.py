"""The command line's argument parser: a bad flag is one line, like every other bad input.

:class:`ArgumentParser` is :class:`argparse.ArgumentParser` whose errors (an unknown flag, a missing value, a value
of the wrong type) raise :class:`~gerelion_dask.errors.InputError` instead of printing the whole usage text:
``gerelion`` then prints ``gerelion: error: <command>: <problem> (<hint>)`` and exits with code 2.  ``--help`` is
unchanged.  RELION flags that name a feature not built here get their own message (:data:`NOT_SUPPORTED`).
"""

from __future__ import annotations

import argparse

from .errors import InputError

__all__ = ["ArgumentParser", "NOT_SUPPORTED", "refuse_unsupported"]

# relion_refine flags of features this program does not have (README: flag table)
NOT_SUPPORTED = {
    "--bodies": "multi-body refinement is not implemented",
    "--helix": "helical refinement is not implemented",
    "--grad": "gradient-driven (VDAM) refinement is not implemented",
    "--blush": "Blush regularisation is not implemented",
}


def refuse_unsupported(argv, prog: str) -> None:
    """InputError for the first flag of ``argv`` in :data:`NOT_SUPPORTED` (or a helical ``--helical_*`` one)."""
    for a in argv:
        flag = a.split("=", 1)[0]
        if flag in NOT_SUPPORTED or flag.startswith("--helical_"):
            why = NOT_SUPPORTED.get(flag, "helical refinement is not implemented")
            raise InputError(None, f"{prog}: {flag}: {why} here", "leave the flag out, or run this job with RELION")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as one-line :class:`~gerelion_dask.errors.InputError`."""

    def error(self, message):
        raise InputError(None, f"{self.prog}: {message}", f"{self.prog} --help lists the flags")
