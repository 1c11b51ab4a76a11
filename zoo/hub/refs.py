"""Branches and tags of a served repository: their kinds, and which names they may take.

A ref name follows Git's rules (``git check-ref-format``): it must be a name Git
itself could hold, so that a clone of the repository elsewhere keeps it. Branches and
tags share one set of names in ``zoo serve``, so that a revision names one commit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zoo.errors import HubError

BRANCH, TAG = "branch", "tag"
GIT_PREFIX = {BRANCH: "refs/heads/", TAG: "refs/tags/"}
# A commit sha prefix, as git accepts one: at least 7 hex digits (git's own default abbreviation).
SHORT_SHA = re.compile(r"^[0-9a-fA-F]{7,40}$")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
MAX_REF_NAME = 200


@dataclass(frozen=True)
class Ref:
    """A branch or a tag, and the commit it points at."""

    name: str
    kind: str
    sha: str

    @property
    def git_ref(self) -> str:
        return GIT_PREFIX[self.kind] + self.name


def check_ref_name(name: str, kind: str) -> str:
    """A branch or tag name Git accepts, and that cannot be read as a full commit sha."""
    parts = name.split("/")
    bad = (not name or len(name) > MAX_REF_NAME or _FORBIDDEN.search(name) or ".." in name or "@{" in name
           or name == "@" or name.startswith(("-", "refs/")) or name.endswith((".", "/"))
           or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts)
           or re.fullmatch(r"[0-9a-fA-F]{40}", name))
    if bad:
        raise HubError(f"invalid {kind} name {name!r}: use letters, digits, '.', '-', '_' and '/' as in git "
                       f"(no '..', spaces, '~^:?*[\\', no 40-hex sha, at most {MAX_REF_NAME} characters)",
                       code="InvalidRef")
    return name
