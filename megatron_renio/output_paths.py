"""The paths a command writes to: checks made before any model work, and atomic writes.

A path that cannot receive the output must be refused at start-up with one line naming the flag, not
found at the first save, hours into a run. Permission bits do not tell (root passes ``os.access``
on read-only mounts such as ``/proc``), so writability is probed: a folder is created and removed
in the nearest existing folder of the path.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Iterable

from megatron_renio.errors import UserInputError


# The probe folder's name prefix: a folder test for emptiness skips such entries (another rank of the
# same job may be probing the same folder at that moment).
PROBE_PREFIX = ".write-check-"


def is_empty_folder(path: str | Path) -> bool:
    """``path`` is a folder holding nothing but other processes' probe folders."""
    return not any(not entry.name.startswith(PROBE_PREFIX) for entry in Path(path).iterdir())


def _nearest_existing(path: Path) -> Path:
    """``path`` itself when it exists, else its closest existing ancestor."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _refuse_broken_link(path: Path, label: str) -> None:
    """A symbolic link whose target is missing looks absent, but nothing can be created in its place."""
    if path.is_symlink() and not path.exists():
        raise UserInputError(f"{label} is a symbolic link to {os.readlink(path)}, which does not exist")


def check_output_folder(path: str | Path, label: str) -> None:
    """``path`` is a folder, or can be created as one (its missing parents too), and can be written in.
    ``label`` starts each message (the flag and the path, as the command line has them)."""
    path = Path(path)
    _refuse_broken_link(path, label)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{label} exists and is not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserInputError(f"{label}: {base} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=base))
    except OSError as e:
        raise UserInputError(f"{label}: cannot write in {base} ({e.strerror or e})") from None


def check_every_rank_sees(path: str | Path, label: str) -> None:
    """Collective: every rank must see ``path``, which rank 0 has found (a checkpoint it read, a file it
    wrote). On storage that each node mounts on its own (node-local scratch, a stale network-file
    cache) ranks would otherwise go separate ways: one resuming, another starting over, until a
    collective hangs. One line names the first rank that does not see it, and its host."""
    from megatron_renio.distributed import raise_if_any_rank

    raise_if_any_rank(_unseen(path, label))


def _unseen(path: str | Path, label: str) -> UserInputError | None:
    """The error of a rank that does not see ``path`` (None when it does); an unreadable path (a
    stale network-file handle, a lost permission) counts as not seen."""
    try:
        if Path(path).exists():
            return None
        reason = "does not see"
    except OSError as e:
        reason = f"cannot read ({e.strerror or e})"
    return UserInputError(f"{label}: rank {_rank()} (host {socket.gethostname()}) {reason} {path}, which rank 0 "
                          "sees: every rank must reach it on one filesystem that all nodes share")


def check_shared_folder(path: str | Path, label: str) -> None:
    """Collective: every rank can write in the folder ``path`` (:func:`check_output_folder`), and it is
    the same folder on every rank: rank 0 writes a probe file there (or, before the folder exists, in
    its nearest existing parent) and every rank must see it (:func:`check_every_rank_sees`); then rank
    0 removes it. Ranks writing one checkpoint together need both: a rank that cannot write fails at
    the first save, and on node-local storage each node would hold only its own shards."""
    from megatron_renio.distributed import on_rank0, raise_if_any_rank

    def write_probe() -> str:
        name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        (_nearest_existing(Path(path)) / name).touch()
        return name

    name = on_rank0(write_probe)
    probe = None
    try:
        probe = _nearest_existing(Path(path)) / name  # where this rank finds the folder
        check_output_folder(path, label)
        error = _unseen(probe, label)
    except (UserInputError, OSError) as e:
        error = e if isinstance(e, UserInputError) else UserInputError(f"{label}: {e.strerror or e}")
    try:
        raise_if_any_rank(error)
    finally:
        if _rank() == 0 and probe is not None:
            probe.unlink(missing_ok=True)


def _rank() -> int:
    """This process's global rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def check_output_file(path: str | Path, label: str, create_folder: bool = False) -> None:
    """``path`` is not a folder, and its folder exists (or, ``create_folder``, can be created) and can be
    written in; ``label`` as in :func:`check_output_folder`. A path that ends with a separator
    (``out/``) names a folder, which ``Path`` would read as a file."""
    if Path(path).is_dir() or str(path).endswith(os.sep):
        raise UserInputError(f"{label} is a folder, not a file")
    path = Path(path)
    _refuse_broken_link(path, label)
    folder = path.absolute().parent
    if not create_folder and not folder.is_dir():
        raise UserInputError(f"{label}: folder {folder} does not exist")
    check_output_folder(folder, label)


def check_log_outputs(metrics_file: str | None, tensorboard_dir: str | None) -> None:
    """A ``--metrics-file`` (its folder is made when missing) and a ``--tensorboard-dir``, when given."""
    if metrics_file:
        check_output_file(metrics_file, f"--metrics-file {metrics_file}", create_folder=True)
    if tensorboard_dir:
        check_output_folder(tensorboard_dir, f"--tensorboard-dir {tensorboard_dir}")


def fsync(path: str | Path) -> None:
    """Flush ``path`` to stable storage: a file's data, or a folder's entries (the names created,
    renamed or removed in it). Until then a written file or a rename may live only in the page cache
    of the node that made it: other processes see it, but a crash of that node (power, kernel) loses
    it, and a marker that was flushed could name a checkpoint that was not. A filesystem that cannot
    sync a folder (FUSE mounts of object stores refuse with EINVAL or ENOTSUP) has nothing to flush
    there: that refusal is ignored; any other error, and every error on a file, is raised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP) or not os.path.isdir(path):
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def storage_error(error: Exception, path: str | Path, action: str) -> UserInputError:
    """The one line of a write or sync that failed (a full disk, a lost permission, storage that fails to
    flush): the file ``error`` names, else ``path``; ``action``; the system's reason (an error that is no
    OSError, such as torch.save's RuntimeError, gives its message)."""
    return UserInputError(f"{getattr(error, 'filename', None) or path}: {action} "
                          f"({getattr(error, 'strerror', None) or error})")


def fsync_tree(path: str | Path, synced_by_writers: tuple[str, ...] = ()) -> None:
    """:func:`fsync` every folder under the folder ``path`` (itself included) and every file but those
    whose name ends with one of ``synced_by_writers`` (synced by the processes that wrote them), each
    file and folder before the folder that names it."""
    for here, _, files in os.walk(path, topdown=False):  # sub-folders come before their parent
        for name in files:
            if not name.endswith(synced_by_writers):  # endswith(()) is False
                fsync(os.path.join(here, name))
        fsync(here)


def hidden_sibling(target: Path, kind: str) -> Path:
    """A fresh hidden sibling ``.<name>.<kind>-<id>`` of the absolute path ``target``: ``partial``, what
    a write of ``target`` fills before renaming it into place; ``replaced``, an old ``target`` renamed
    aside."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def hidden_siblings(target: Path, kind: str) -> list[Path]:
    """The :func:`hidden_sibling` s of ``kind`` that ``target`` has now: what killed writes left."""
    return list(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"))


def write_atomic(path: str, lines: Iterable[str]) -> None:
    """Write ``lines`` to a temporary file beside ``path``, flushed to stable storage, then rename it to
    ``path`` and flush the rename (:func:`fsync`). An ``OSError`` names ``path``, not the temporary file.
    A write killed before its rename leaves its temporary file (:func:`hidden_siblings` of ``partial``):
    only the writer's caller knows whether another write of ``path`` is still under way."""
    target = Path(path).absolute()
    partial = hidden_sibling(target, "partial")
    try:
        with open(partial, "x", encoding="utf-8") as f:
            f.writelines(lines)
        fsync(partial)
        os.replace(partial, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        if isinstance(e, OSError) and e.filename == str(partial):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fsync(target.parent)
