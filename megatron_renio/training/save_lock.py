"""One run at a time per ``--save`` folder.

Two runs saving into one folder (a job submitted twice, a requeue while the first attempt still runs)
delete each other's checkpoints: each one's saves prune the other's ``iter_*`` folders and replace
the ``latest`` marker. Global rank 0 of a training run therefore holds an exclusive ``flock`` on
``DIR/.run_lock`` from its start-up checks to its end; a second run on the folder is refused in one
line that names the holder (host, process id and start time, which the holder writes into the file).

The kernel drops the lock when the holding process ends, however it ends (a crash, ``kill -9``, a
lost node once a network file system notices: NFS v4 after its lease, about 90 s), so a requeued run
takes the folder over without a stale lock to clear; forked children close their copies of it. The
trainer claims the folder twice: before it reads it, when the lock file exists (any folder a run of
this version saved into), so that a second run stops before it reads a checkpoint the first one may
be pruning or loads models for minutes; and, creating it, once every check has passed. A file
system that does not lock (Lustre mounted without ``flock``) leaves the run unprotected, with one
line saying so.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from megatron_renio.errors import UserInputError
from megatron_renio.output_paths import storage_error

LOCK_FILE = ".run_lock"

# The locks this process holds: resolved folder -> the file descriptor whose open file holds it.
_held: dict[Path, int] = {}


def claim_save_folder(root: str | Path, create: bool = True) -> str | None:
    """Hold the lock of the run folder ``root`` until :func:`release_save_folder` or the end of the
    process; a folder this process already holds is kept as it is. Another process holding it: one
    line naming it. ``create``: make the folder and its lock file when missing; without it a folder
    without a lock file is left as it is, unlocked (the trainer's first claim, before it reads the
    folder: bad input must leave --save as it was). Returns a note when the file system cannot lock
    (the run goes on unprotected), else None."""
    root = Path(root)
    key = root.resolve()
    path = root / LOCK_FILE
    if key in _held or not (create or path.is_file()):
        return None
    try:
        if create:
            root.mkdir(parents=True, exist_ok=True)
        # 0o666 less the umask, as every other file of the run: in a group-shared folder a teammate resumes it
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise storage_error(e, path, "cannot open the run's lock file for writing") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return (f"note: --save {root}: the file system does not lock {path} ({e.strerror or e}), so a second "
                    "run started on this folder would not be refused")
        holder = path.read_text(errors="replace").strip() or "a process that has not yet named itself"
        raise UserInputError(f"--save {root} is in use by another run ({holder}); two runs saving into one folder "
                             "delete each other's checkpoints: wait for that run to end or stop it, or choose "
                             "another --save") from None
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise storage_error(e, path, "cannot write the run's lock file") from None
    _held[key] = fd
    return None


def _forget_in_forked_child() -> None:
    """A forked child (Megatron's checkpoint writer processes) closes its copies of the lock's file
    descriptors: a child left behind by a trainer killed during a save kept the lock, and every requeue
    was refused. The lock stays with the trainer's own descriptor."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_forked_child)


def release_save_folder(root: str | Path) -> None:
    """Drop the lock :func:`claim_save_folder` took on ``root`` (nothing when this process holds none).
    The file stays: removing it would let a run that opened it just before hold a lock on a file that
    no longer has a name, beside a new one."""
    fd = _held.pop(Path(root).resolve(), None)
    if fd is not None:
        os.close(fd)
