"""File I/O helpers every floor may use: what counts as a full disk, and putting bytes on disk."""

from __future__ import annotations

import errno
import os

# errno values that mean "no room": the disk, the quota or the file size limit.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def datasync(fd: int) -> None:
    """Put a file's data on disk (fdatasync; fsync where there is none, as on macOS)."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting (Linux:
    POSIX_FADV_DONTNEED starts writeback of dirty pages); a no-op where unsupported."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (temp files are tagged with their writer's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
