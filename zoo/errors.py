"""Errors that the CLI turns into one clear line and a non-zero exit.

Every error a user can cause by bad input is a ``ZooError``; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class ZooError(Exception):
    """A user-facing error: the message says what went wrong and what to do next."""

    exit_code = 1


class NotFound(ZooError):
    """A model, task or file that the registry does not know."""


class AlreadyExists(ZooError):
    """A name that is already taken."""


class InvalidName(ZooError):
    """A name that cannot be used as a model or task name."""


class CheckpointError(ZooError):
    """A checkpoint that cannot be read: missing, truncated, corrupt or pickled."""


class IncompatibleModels(ZooError):
    """Models that cannot be combined: shapes, vocabulary or layout differ."""


class InUse(ZooError):
    """A model that other models depend on."""


class StorageError(ZooError):
    """A failure of the blob store, such as a full disk."""
