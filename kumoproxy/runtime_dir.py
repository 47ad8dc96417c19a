"""The supervisor's private runtime directory, and the clean-up of dead ones.

With ``workers`` > 1 the supervisor keeps the shared limit table and
prometheus_client's multiprocess files in a directory of its own, on tmpfs
(``/dev/shm``) where it can: both are written on every session, and on a
disk they would also be written back. It removes the directory when it
exits; a supervisor that is killed (``kill -9``, the OOM killer) cannot, and
tmpfs is memory.

So the supervisor holds an exclusive ``flock`` on a ``lock`` file in its
directory for as long as it runs, and each new supervisor first removes
every directory of this user whose lock it can take: the kernel dropped
that lock when its owner died. A directory still being set up (no lock
file yet) is left alone unless it is older than a minute.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "kumoproxy-"
LOCK_NAME = "lock"
#: A directory with no lock file is someone's set-up in progress for this
#: long at most; older, it was left by a supervisor killed during set-up.
UNLOCKED_GRACE = 60.0


def default_parent() -> Path:
    """``/dev/shm`` when writable (tmpfs), else the temporary directory."""
    shm = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private (0700) directory in it
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@dataclass(frozen=True, slots=True)
class RuntimeDir:
    """A live supervisor's directory: limit table, metric files, and its lock."""

    path: Path
    lock_fd: int

    @classmethod
    def create(cls, parent: Path) -> RuntimeDir:
        """A fresh private directory under ``parent``, locked as ours."""
        path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        fd = os.open(path / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new: nobody else can hold it
        (path / "metrics").mkdir()
        return cls(path, fd)

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    @property
    def limits_table(self) -> Path:
        return self.path / "limits"

    def remove(self) -> None:
        """Delete the directory, then give up the lock: until it is gone, it is ours."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.lock_fd)


def remove_stale(parent: Path, *, now: float | None = None) -> list[Path]:
    """Remove the runtime directories under ``parent`` left by dead supervisors."""
    now = time.time() if now is None else now
    removed = []
    for entry in parent.glob(PREFIX + "*"):
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        if not entry.is_dir() or entry.is_symlink() or info.st_uid != os.getuid():
            continue
        if _remove_if_abandoned(entry, info.st_mtime, now):
            removed.append(entry)
    return removed


def _remove_if_abandoned(path: Path, mtime: float, now: float) -> bool:
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        if now - mtime <= UNLOCKED_GRACE:
            return False  # being set up right now
        shutil.rmtree(path, ignore_errors=True)
        return True
    except OSError:
        return False  # not ours to judge
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its supervisor is alive
        # Removed while we hold its lock: another supervisor starting now
        # sees it locked and leaves it to us.
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        os.close(fd)
