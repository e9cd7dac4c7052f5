"""Errors that cross layers. The CLI maps each to an exit code and one line of text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document: where it is and what is wrong."""

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return f"{where}: {self.message}"


class GrayagentError(Exception):
    """Base of the errors the CLI reports as one line with exit code 1."""

    exit_code = 1


class InvalidDocument(GrayagentError):
    """A rule document failed parsing, the schema or a semantic check."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StoreError(GrayagentError):
    """The store could not be reached or answered something unusable."""


class VersionNotFound(GrayagentError):
    """A version that the store does not hold."""


class Conflict(GrayagentError):
    """Compare-and-set lost: somebody published first."""

    exit_code = 3

    def __init__(self, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"conflict: expected current version {expected}, but the store is at {actual}; "
                         "re-read and publish again")


class UsageError(GrayagentError):
    """A bad flag, URL or combination of options."""

    exit_code = 2
