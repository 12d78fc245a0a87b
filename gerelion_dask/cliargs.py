"""The command line's argument parser: a bad flag is one line, like every other bad input.

:class:`ArgumentParser` is :class:`argparse.ArgumentParser` whose errors (an unknown flag, a missing value, a value
of the wrong type) raise :class:`~gerelion_dask.errors.InputError` instead of printing the whole usage text:
``gerelion`` then prints ``gerelion: error: <command>: <problem> (<hint>)`` and exits with code 2.  ``--help`` is
unchanged.  RELION flags that name a feature not built here get their own message (:data:`NOT_SUPPORTED`).
"""

from __future__ import annotations

import argparse

from .errors import InputError

__all__ = ["ArgumentParser", "NOT_SUPPORTED", "NOT_SUPPORTED_PREFIXES", "refuse_unsupported"]

# relion_refine flags of features this program does not have (README: flag table)
NOT_SUPPORTED = {
    "--bodies": "multi-body refinement is not implemented",
    "--helix": "helical refinement is not implemented",
    "--ignore_helical_symmetry": "helical refinement is not implemented",
    "--grad": "gradient-driven (VDAM) refinement is not implemented",
    "--blush": "Blush regularisation is not implemented",
    "--sgd": "initial-model generation by SGD is not implemented",
    "--mu": "initial-model generation by SGD is not implemented",
    "--tau": "a fixed tau2 spectrum from a STAR file is not implemented (--tau2_fudge is)",
    "--stochastic_em": "initial-model generation by stochastic EM is not implemented",
    "--denovo_3dref": "de novo initial-model generation is not implemented",
    "--external_reconstruct": "reconstruction by an external program is not supported",
    "--local_symmetry": "local symmetry is not implemented",
    "--relax_sym": "symmetry relaxation is not implemented",
    "--fourier_mask": "Fourier-space masks are not implemented",
    "--skip_maximize": "an E-step without maximisation is not implemented",
    "--always_cc": "cross-correlation in every iteration is not implemented (--firstiter_cc is)",
    "--bimodal_psi": "bimodal psi priors are not implemented",
    "--psi_step": "an in-plane step apart from --healpix_order's is not implemented",
    "--pad_ctf": "CTF padding is not implemented",
    "--print_metadata_labels": "printing RELION's metadata labels is not implemented",
}
# families of relion_refine flags refused together: prefix -> why
NOT_SUPPORTED_PREFIXES = {"--helical_": "helical refinement is not implemented",
                          "--sgd_": "initial-model generation by SGD is not implemented"}


def refuse_unsupported(argv, prog: str) -> None:
    """InputError for the first flag of ``argv`` in :data:`NOT_SUPPORTED` or a family of
    :data:`NOT_SUPPORTED_PREFIXES` (``--helical_*``, ``--sgd_*``)."""
    for a in argv:
        flag = a.split("=", 1)[0]
        why = NOT_SUPPORTED.get(flag) or next((w for p, w in NOT_SUPPORTED_PREFIXES.items() if flag.startswith(p)),
                                              None)
        if why:
            raise InputError(None, f"{prog}: {flag}: {why} here", "leave the flag out, or run this job with RELION")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as one-line :class:`~gerelion_dask.errors.InputError`."""

    def error(self, message):
        raise InputError(None, f"{self.prog}: {message}", f"{self.prog} --help lists the flags")
