"""Git and Git LFS facts that the Hub's client and server share.

A Hub repository is a Git repository: small files are Git blobs, named by Git's
object id; large files are LFS objects, named by their sha256 and stood in for in the
tree by a pointer file. Commits are named by 40-hex shas, files by relative paths (which
paths and repository ids are allowed is ``zoo.hub.names``).
"""

from __future__ import annotations

import hashlib
import re

DEFAULT_BRANCH = "main"
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
LFS_OID = re.compile(r"[0-9a-f]{64}")  # an LFS object's sha256 (match with fullmatch)
# What the Hub itself puts in a new repository's first commit.
GITATTRIBUTES = (
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
    "*.pth filter=lfs diff=lfs merge=lfs -text\n"
    "*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    "*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    "*.msgpack filter=lfs diff=lfs merge=lfs -text\n"
    "*.model filter=lfs diff=lfs merge=lfs -text\n"
    "*.zip filter=lfs diff=lfs merge=lfs -text\n"
).encode()


def git_blob_oid(data: bytes) -> str:
    """Git's object id of a file: sha1 of ``blob <size>\\0<bytes>``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file that stands in the git tree for a large file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs_oid(oid: str) -> bool:
    """Whether ``oid`` names an LFS object: 64 lowercase hex digits."""
    return LFS_OID.fullmatch(oid) is not None

