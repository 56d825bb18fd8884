"""One process at a time per run folder: an exclusive lock held for the whole run.

Two ``fedwa run --resume`` of one folder at once each cut ``metrics.jsonl`` back to the
checkpoint and appended their own rounds, interleaved, and both exited 0. Every run therefore
takes an exclusive, non-blocking ``fcntl.flock`` on ``.fedwa.lock`` in its folder before it
reads the checkpoint or writes anything, new runs included (so a resume cannot start on a run
that is still going), and holds it until its ``summary.json`` is written. A second process
gets :class:`~fedwa.common.errors.RunFolderBusyError` naming the holder's process id and changes
nothing in the folder.

The holder removes the lock file before it lets go, so a folder keeps only the run's files and
a refused resume leaves the folder as it found it. A process that opened the file just before
it was removed could then lock a file that no longer has that name; so a process that got the
lock checks that the name still leads to the file it locked, and tries again when it does
not. The kernel drops the lock when its holder exits, also on SIGKILL, so a killed run never
leaves its folder locked (its stale lock file is simply locked anew).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedwa.common.errors import RunFolderBusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".fedwa.lock"


class RunLock:
    """The exclusive lock of one run folder.

    Parameters
    ----------
    run_dir : str or Path
        The run folder (it must exist).

    Examples
    --------
    >>> with RunLock(run_dir):  # doctest: +SKIP
    ...     ...  # run; a second process gets RunFolderBusyError meanwhile
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock now or raise :class:`RunFolderBusyError`; return ``self``."""
        if self._fd is not None or fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise RunFolderBusyError(
                    f"{self.run_dir} is in use by another fedwa run"
                    f"{f' (process {holder})' if holder.isdigit() else ''}; nothing was "
                    "changed. Wait for it to end (or stop it), then run this again") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it as we locked it: lock the new one
        # Who holds it, for the message a second process prints.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and let the folder go (closing the file drops the lock)."""
        if self._fd is not None:
            # Removed while still locked: no one can lock this file under its name after.
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def covers(self, run_dir: str | Path) -> bool:
        """Whether this lock is held and is that of ``run_dir``."""
        return self.held and Path(run_dir).resolve() == self.run_dir

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_if_empty(run_dir: str | Path) -> bool:
    """Remove ``run_dir`` when it holds nothing but, at most, its lock file (a run that failed
    before it wrote anything); return whether it was removed. Only for folders the caller
    created, while it holds their lock or after it let go."""
    run_dir = Path(run_dir)
    try:
        entries = [p.name for p in run_dir.iterdir()]
    except OSError:
        return False
    if any(name != LOCK_NAME for name in entries):
        return False
    (run_dir / LOCK_NAME).unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:  # something appeared meanwhile: keep it
        return False
    return True
