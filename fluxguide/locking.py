"""One writer per folder: a lock file naming its owner (pid, host, start time), held while a process writes.

A training run holds ``<run_dir>/.owner.lock`` (``fluxguide.harness.run.Run``) and a collection holds
``<dataset>/.owner.lock`` (``experiments/collect_data.py``, ``GuidanceDataCollector.collect_to``), so a second
process started on the same folder stops at once with an error naming the folder and the owner's pid instead
of interleaving its checkpoints, metrics or chunks with the first's.

The lock is an advisory ``flock`` on the file, which the kernel releases when the owner exits however it exits
(even ``kill -9``). A lock file left behind whose lock is free is stale: it is taken over with a warning
naming the dead owner. One process re-locking a folder it already holds (a notebook rerunning a cell after an
error) takes the lock over silently. A link planted as the lock file is refused, never opened (it would truncate
the file it points to).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from typing_extensions import Self

from fluxguide.errors import UserError
from fluxguide.serialization import open_no_follow

LOCK_FILE = ".owner.lock"

#: The locks this process holds, by folder (resolved): a second lock of the same folder takes the first's over.
_HELD: dict[Path, FolderLock] = {}


class FolderLockedError(UserError, RuntimeError):
    """Another process is writing to the folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class FolderLock:
    """The one-writer lock of ``folder`` (created if missing); :meth:`acquire` takes it, :meth:`release` frees it.

    Args:
        folder: the run or dataset folder.
        what: what the folder is, for messages ("run folder", "dataset folder").
    """

    def __init__(self, folder: str | Path, what: str = "folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> dict[str, Any]:
        """The owner recorded in the lock file (``{}`` if none can be read)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> Self:
        """Take the lock, or raise :class:`FolderLockedError` naming the folder and the owner's pid."""
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        previous = _HELD.pop(key, None)
        if previous is not None:  # this process held it (e.g. a run that raised): take it over
            previous.release()
        while True:
            fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # a planted link is refused
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None
                break
            try:  # the owner may have released (unlinked) the file between our open and flock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        if fd is None:
            owner = self.owner()
            raise FolderLockedError(
                f"the {self.what} {self.folder} is in use by another process (pid {owner.get('pid', '?')} on host "
                f"{owner.get('host', '?')}, started {owner.get('started', '?')}, running "
                f"{' '.join(owner.get('argv', [])) or '?'}): wait for it to finish or stop it, or choose another "
                f"folder; two writers would corrupt it"
            ) from None
        stale = self.owner()
        if stale and stale.get("pid") != os.getpid():
            where = stale.get("host")
            alive = where == socket.gethostname() and _pid_alive(int(stale.get("pid", -1)))
            warnings.warn(
                f"taking over the lock of the {self.what} {self.folder} left by pid {stale.get('pid')} on host "
                f"{where} (started {stale.get('started')}), which "
                + ("no longer holds it" if alive else "is no longer running"),
                stacklevel=2,
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _HELD[key] = self
        return self

    def release(self) -> None:
        """Free the lock and remove the lock file (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if _HELD.get(self.folder.resolve()) is self:
            del _HELD[self.folder.resolve()]
        try:
            self.path.unlink(missing_ok=True)  # still holding the flock: no other process owns the file yet
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


@atexit.register
def _release_all() -> None:
    """Release this process's locks at a normal exit (an exception included): only a killed owner leaves a
    stale lock file behind."""
    for lock in list(_HELD.values()):
        lock.release()
