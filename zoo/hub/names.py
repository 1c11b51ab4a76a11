"""Which repository ids and file paths a Hub repository may hold: one validator for
``zoo serve`` and for the client.

Repository ids follow the Hugging Face Hub's rules (``huggingface_hub``'s
``validate_repo_id``). A new repository may not use a word the server's routes read as
part of the API (``RESERVED``), or it could be created but never read. File paths are
refused when the Hub refuses them, and also when they would break a client on Windows or
macOS: a clone or ``snapshot_download`` writes every path to the client's disk, so a
name that disk cannot hold (``C:x``, ``CON``, ``a?``, a 300-byte part), one that
displays as another (bidi overrides, control characters), or one that differs from
another only in case (``README.md`` beside ``readme.md``) fails there, after the server
accepted it. Names are refused, never rewritten.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from zoo.errors import HubError

REPO_PART_MAX = 96  # characters, each of namespace and name
REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")  # no leading/trailing '-' or '.'

# Words the routes of zoo serve read as the API, not as a repository (each would make a
# repository that can be created but never read; tests/test_hub_names.py shows each one):
# - a name right after a namespace: /api/models/NS/NAME is read as repository NS and verb NAME;
API_VERBS = frozenset({
    "revision", "tree", "preupload", "commit", "xet-write-token", "xet-read-token", "paths-info", "commits",
    "refs", "branch", "tag", "discussions", "settings", "resolve-cache", "compare", "super-squash", "treesize",
    "notebook", "scan",
})
# - a namespace: /api/NAME/... is the API (repository api/models resolves into /api/models/),
#   and /datasets/... and /spaces/... are where clients look for datasets and Spaces.
API_PREFIXES = frozenset({"api", "datasets", "spaces"})
RESERVED = API_VERBS | API_PREFIXES  # refused as a new repository's name or namespace, in any case

PATH_MAX_BYTES = 1024  # a whole path, in UTF-8
PART_MAX_BYTES = 255  # one file or folder name, in UTF-8: what ext4, APFS and NTFS hold
WINDOWS_FORBIDDEN = '<>:"|?*'  # ':' also makes 'C:x' a drive-relative path
WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                             *(f"{d}{n}" for d in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3")})
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
FORBIDDEN_FOLDERS = frozenset({".git", ".cache"})  # Git's own; huggingface_hub's download state


def casefold_key(name: str) -> str:
    """The key two names share when a case-insensitive disk (Windows, macOS) sees one file:
    NFC-normalised (macOS stores decomposed forms), then casefolded."""
    return unicodedata.normalize("NFC", name).casefold()


def _shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for a one-line message: escapes control characters, cut when long."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


# -- repository ids -----------------------------------------------------------------------
def repo_id_problem(repo_id: object) -> str | None:
    """Why ``repo_id`` is not a Hub repository id (``name`` or ``namespace/name``), or None."""
    if not isinstance(repo_id, str) or not repo_id:
        return "it is empty"
    parts = repo_id.split("/")
    if len(parts) > 2:
        return "use 'name' or 'namespace/name', with one '/' at most"
    for part in parts:
        if not part:
            return "the namespace and the name must not be empty"
        if len(part) > REPO_PART_MAX:
            return f"{_shown(part)} is {len(part)} characters long (at most {REPO_PART_MAX})"
        if not REPO_PART.fullmatch(part):
            return (f"{_shown(part)} must use letters, digits, '-', '_' or '.' only, and not start or end "
                    "with '-' or '.'")
        if "--" in part or ".." in part:
            return f"{_shown(part)} holds '--' or '..'"
        if part.lower().endswith(".git"):
            return f"{_shown(part)} ends with '.git'"
    return None


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub repository id; a one-line ``HubError`` saying why not."""
    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise HubError(f"invalid repository id {_shown(str(repo_id))}: {problem}")
    return repo_id


def check_new_repo_id(repo_id: str) -> str:
    """A repository id a server may create: a Hub id without reserved words."""
    check_repo_id(repo_id)
    for part in repo_id.split("/"):
        if part.lower() in RESERVED:
            raise HubError(f"invalid repository id {repo_id!r}: {part!r} is a reserved word of the Hub's API "
                           "(a repository by that name could never be read); choose another name")
    return repo_id


# -- file paths ----------------------------------------------------------------------------
def _char_problem(c: str) -> str | None:
    o = ord(c)
    if o < 0x20 or 0x7F <= o <= 0x9F:
        return f"it holds the control character U+{o:04X}"
    if c in BIDI_CONTROLS:
        return f"it holds U+{o:04X}, a bidirectional text control that can make a name display as another"
    if 0xD800 <= o <= 0xDFFF:
        return f"it holds U+{o:04X}, a lone surrogate that is not valid Unicode"
    if c == "\\":
        return "it holds '\\', a folder separator on Windows (use '/')"
    if c in WINDOWS_FORBIDDEN:
        return f"it holds {c!r}, which Windows does not allow in a file name" + (
            " (it reads 'C:' as a drive)" if c == ":" else "")
    return None


def _part_problem(part: str) -> str | None:
    if part == "":
        return "it has an empty part (a leading, trailing or doubled '/')"
    if part in (".", ".."):
        return f"{part!r} is not a file or folder name"
    if part.casefold() in FORBIDDEN_FOLDERS:
        return f"{part!r} is reserved (Git's folder, or huggingface_hub's download state)"
    size = len(part.encode("utf-8"))
    if size > PART_MAX_BYTES:
        return f"a part is {size} bytes long in UTF-8 (at most {PART_MAX_BYTES})"
    if part[-1] in ". ":
        return f"{_shown(part)} ends with a dot or a space, which Windows drops"
    if part.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES:
        return f"{_shown(part)} is a reserved device name on Windows (CON, PRN, AUX, NUL, COM1, LPT1, ...)"
    return None


def path_problem(path: object) -> str | None:
    """Why ``path`` cannot be a file path in a repository, or None when it can."""
    if not isinstance(path, str) or not path:
        return "the path is empty"
    for c in path:
        if (problem := _char_problem(c)) is not None:
            return problem
    size = len(path.encode("utf-8"))
    if size > PATH_MAX_BYTES:
        return f"the path is {size} bytes long in UTF-8 (at most {PATH_MAX_BYTES})"
    for part in path.split("/"):
        if (problem := _part_problem(part)) is not None:
            return problem
    return None


def check_path(path: str) -> str:
    """``path`` if a repository may hold it; else a one-line ``HubError`` (400, ``InvalidPath``)
    that says why, so the client can rename the file.

    Clients write these paths under their download folder, so a path that could
    climb out of it, or that their disk cannot hold, is refused, never normalised.
    """
    problem = path_problem(path)
    if problem is not None:
        raise HubError(f"invalid file path {_shown(str(path))}: {problem}; rename it", code="InvalidPath")
    return path


def _names(path: str) -> Iterable[str]:
    """The path and each folder above it: ``a/b/c`` -> ``a``, ``a/b``, ``a/b/c``."""
    parts = path.split("/")
    return ("/".join(parts[:i]) for i in range(1, len(parts) + 1))


def check_case_unique(paths: Iterable[str], new: Iterable[str]) -> None:
    """Refuse a tree where a ``new`` path (or a folder above it) differs from another
    file or folder of ``paths`` only in case or Unicode normal form (``README.md`` and
    ``readme.md``, ``A/x`` and ``a/y``): a case-insensitive disk holds one of the two.
    Clashes among the other paths alone (an older commit's) are left for a later
    commit to clean up."""
    added = {n for p in new for n in _names(p)}
    seen: dict[str, str] = {}
    for path in sorted(set(paths) | set(new)):
        for name in _names(path):
            other = seen.setdefault(casefold_key(name), name)
            if other != name and (name in added or other in added):
                raise HubError(f"{_shown(name)} and {_shown(other)} differ only in case: Windows and macOS clients "
                               "cannot hold both; rename one", code="InvalidPath")
