"""Model and task names, and ``name@version`` references."""

from __future__ import annotations

import re

from zoo.errors import InvalidName

# Letters, digits, dot, dash, underscore; no leading dot or dash so a name is never
# a hidden file or an option.
# What a registered model can be; the schema checks it and `zoo list` filters by it.
KINDS = ("base", "expert", "adapter", "merged", "protected")

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str, what: str = "model") -> str:
    """Return ``name`` if it is a valid registry name, else raise ``InvalidName``."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} name is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidName(f"{what} name {name!r} contains control characters")
    if "/" in name or "\\" in name:
        raise InvalidName(
            f"{what} name {name!r} contains a path separator; use letters, digits, '.', '-' and '_'"
        )
    if name in (".", "..") or not _NAME_RE.match(name):
        raise InvalidName(
            f"{what} name {name!r} is not allowed; use up to 128 letters, digits, '.', '-' and '_', "
            "not starting with '.' or '-'"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split ``name`` or ``name@version`` into the name and the version (None: latest)."""
    if "@" in ref:
        name, _, ver = ref.rpartition("@")
        if not ver.isdigit():
            raise InvalidName(f"bad version in {ref!r}: expected NAME@N with N a number")
        return validate_name(name), int(ver)
    return validate_name(ref), None
