"""Typed errors for fedhead, each with a process exit code and a hint for the user.

A user sees ``str(error)``: one line saying what is wrong and what to do. The CLI
turns an uncaught ``FedheadError`` into that line on stderr and its ``exit_code``.
"""

from __future__ import annotations

from collections.abc import Iterable


class FedheadError(Exception):
    """Base class: a problem the user can fix, reported as one line."""

    exit_code = 1
    title = "error"

    def __init_subclass__(cls, exit_code: int | None = None, title: str | None = None) -> None:
        """``class DataError(FedheadError, exit_code=3, title="data problem")``: a family
        of errors with its own exit code, and the title the user sees before the line."""
        super().__init_subclass__()
        if exit_code is not None:
            cls.exit_code = exit_code
        if title is not None:
            cls.title = title

    def __init__(self, what: str, hint: str = "") -> None:
        self.what = what.rstrip(".")
        self.hint = hint.rstrip(".")
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.what}; {self.hint}" if self.hint else self.what


class ConfigError(FedheadError, exit_code=2, title="invalid configuration"):
    """Invalid run or node configuration; lists every problem found at once."""

    def __init__(self, problems: Iterable[str], source: str = "configuration") -> None:
        self.problems = list(problems)
        self.title = f"invalid {source}"  # the user sees "<title>: <problems>; <hint>"
        which = "this setting" if len(self.problems) == 1 else "these settings"
        super().__init__("; ".join(self.problems), f"fix {which} and start again")


class UnknownBackboneError(ConfigError):
    """A backbone name that is not in the registry."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        known_list = ", ".join(sorted(known))
        super().__init__([f"backbone: unknown backbone {name!r} (known: {known_list})"])


class DataError(FedheadError, exit_code=3, title="data problem"):
    """A site's data path is missing, empty, unreadable or labelled wrongly."""


class WeightsError(FedheadError, exit_code=4, title="backbone weights problem"):
    """Backbone weights are missing or fail their sha256 check."""


class WeightsNotFoundError(WeightsError):
    """No copy of the weights file where it was looked for."""


class WeightsMismatchError(WeightsError):
    """A weights file (or received bytes) with another sha256 than expected."""


class ModelMismatchError(FedheadError, exit_code=5, title="model mismatch"):
    """Tensors received do not match the model's trainable set."""


class PackageError(FedheadError, exit_code=8, title="model package problem"):
    """A model package that is missing, malformed, altered or of an unknown format."""


class PackageFormatError(PackageError):
    """A model package written in a format version this fedhead does not read."""


class PackageExistsError(PackageError):
    """A model package already exists where a new one would be written."""


class ExportError(FedheadError, exit_code=9, title="export problem"):
    """An exported model could not be written or does not reproduce the package."""


class FederationError(FedheadError, exit_code=6, title="federation problem"):
    """The federation could not run: too few sites, a node refused the run, a timeout."""


class RunSpecError(FederationError, title="refused run description"):
    """A run description a site refuses: another protocol version, an unknown backbone,
    a weights file name that is not the plain name expected, or values out of range."""


class RefusedHeadError(FederationError, title="refused head"):
    """A head from the server that a site will not train from or evaluate: not the run's
    trainable tensors, not the run's initial head, or beyond a round's reach."""


class SetupError(FedheadError, exit_code=7, title="setup problem"):
    """A local setup step failed: a port in use, a missing program, a file in the way."""


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected error (a bug: please report it with the log)",
    ConfigError.exit_code: "invalid configuration or command-line arguments",
    DataError.exit_code: "site data missing, empty, unreadable or wrongly labelled",
    WeightsError.exit_code: "backbone weights missing or sha256 mismatch",
    ModelMismatchError.exit_code: "tensors (received or in a model package) do not match the model",
    FederationError.exit_code: "the federated run could not complete",
    SetupError.exit_code: "local setup problem (port in use, missing program, file in the way)",
    PackageError.exit_code: "model package missing, malformed, altered, in the way or unknown",
    ExportError.exit_code: "model export failed or does not reproduce the package",
}
