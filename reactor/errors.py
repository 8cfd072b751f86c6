"""Errors the CLI turns into one-line messages instead of tracebacks."""

from __future__ import annotations


class UsageError(Exception):
    """Bad usage or bad configuration: the CLI prints the message and exits 2."""

    exit_code = 2


class RuntimeFailure(Exception):
    """A failure at run time (missing pid, permission denied…): message, exit 1."""

    exit_code = 1
