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


class PromptDataError(ZooError):
    """A generative task file that cannot be used: unreadable, malformed, empty or too long."""


class MoeConfigError(ZooError):
    """A mergekit-moe config that cannot be built: bad YAML, an unknown key, a bad value."""


class IncompatibleModels(ZooError):
    """Models that cannot be combined: shapes, vocabulary or layout differ."""


class InUse(ZooError):
    """A model that other models depend on."""


class NonFiniteValues(ZooError):
    """A tensor read as input holds NaN or an infinity: merges and protection refuse it."""

    def __init__(self, tensor: str, model: str | None = None):
        where = f"{model} has NaN or infinite values in {tensor}" if model else \
            f"{tensor} has NaN or infinite values"
        super().__init__(f"{where}; nothing was written. `zoo check` lists every such tensor")


class StorageError(ZooError):
    """A failure of the blob store, such as a full disk."""


class PushConflict(ZooError):
    """The branch moved on between reading its head and committing on it."""


class HubError(ZooError):
    """An error of ``zoo serve``, with the HTTP status and the ``X-Error-Code`` the Hub would send."""

    status = 400
    code = "BadRequest"

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class RepoNotFound(HubError):
    status, code = 404, "RepoNotFound"


class RevisionNotFound(HubError):
    status, code = 404, "RevisionNotFound"


class EntryNotFound(HubError):
    status, code = 404, "EntryNotFound"


class Conflict(HubError):
    status, code = 412, "Conflict"
