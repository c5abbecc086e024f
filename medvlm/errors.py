"""Errors raised on bad user input.

Every message says three things: what was expected, what was received, and how to fix it, so that a
user reading a CLI error or a server's JSON error can act on it without reading the code.
"""

from __future__ import annotations


class MedvlmError(Exception):
    """Base class of every error this project raises on purpose."""


class InputError(MedvlmError, ValueError):
    """User input (a file, an argument, a prompt) is not what the function accepts.

    Build it with :func:`input_error` so that the message always has the same three parts.
    """

    def __init__(self, message: str, *, expected: str = "", received: str = "", fix: str = "") -> None:
        self.expected = expected
        self.received = received
        self.fix = fix
        super().__init__(message)


class MissingDependencyError(MedvlmError, ImportError):
    """An optional dependency or weight file is not installed."""


def input_error(what: str, *, expected: str, received: str, fix: str) -> InputError:
    """Return an :class:`InputError` whose message reads ``what: expected ...; received ...; fix``."""
    message = f"{what}: expected {expected}; received {received}. How to fix: {fix}"
    return InputError(message, expected=expected, received=received, fix=fix)


def missing_dependency(feature: str, install: str) -> MissingDependencyError:
    """Return the error raised when an optional part is used without its package."""
    return MissingDependencyError(
        f"{feature} needs an optional dependency that is not installed. Install it with: {install}")
