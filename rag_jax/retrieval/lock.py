"""One writer at a time: a lock file naming its holder (pid, host, start time).

    with WriterLock("wiki_index.lock", "build-index wiki_index") as lock:
        if lock.took_over:
            print(lock.took_over)        # "taking over the stale lock of pid 123 ..."
        ...

Mutual exclusion comes from ``fcntl.flock`` on the open file: the kernel drops
it when the holder exits, however it dies (``kill -9`` included), so a lock
left by a dead process is never mistaken for a live one on this host. The
file's JSON body (pid, host, command, start) is only for messages: a second
writer stops with one line naming the holder; a leftover body from a dead
process on this host is taken over, with a message. A body written on another
host is refused even when ``flock`` succeeds: on a network file system the
holder may be alive elsewhere, and only a person can tell (the message says
which file to delete).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class LockedError(ValueError):
    """Another live process holds the lock; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    what = f" ({holder['what']})" if holder.get("what") else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}{what}"


class WriterLock:
    """Exclusive, non-blocking lock on ``path``; released (and the file removed) on exit."""

    def __init__(self, path: str | os.PathLike, what: str = "") -> None:
        self.path = Path(path)
        self.what = what
        self.took_over: str | None = None
        self._fd: int | None = None

    def _read_holder(self, fd: int) -> dict:
        try:
            body = os.pread(fd, 4096, 0)
            holder = json.loads(body.decode()) if body.strip() else {}
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder(fd)
                os.close(fd)
                raise LockedError(f"{self.path}: held by {_describe(holder)}; wait for it to finish") from None
            # The previous holder may have unlinked the file between our open and
            # our flock: then we locked an orphan inode and must start over.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = self._read_holder(fd)
        if old:
            if old.get("host") != host:
                os.close(fd)
                raise LockedError(
                    f"{self.path}: held by {_describe(old)}, which cannot be checked from host {host}; "
                    f"if that job is gone, delete {self.path}"
                )
            # flock succeeded, so the recorded process holds nothing: it died
            # (or its pid now belongs to an unrelated process).
            state = "no longer running" if not _pid_alive(int(old.get("pid", 0))) else "no longer holding it"
            self.took_over = f"taking over the stale lock {self.path} of {_describe(old)}: {state}"
        body = json.dumps({"pid": os.getpid(), "host": host, "started": time.time(), "what": self.what})
        os.ftruncate(fd, 0)
        os.pwrite(fd, body.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock, so no one can lock the old inode
        # and believe it current (acquire checks the inode against the path).
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
