"""One run at a time per --save folder (megatron_renio.training.save_lock): the flock of DIR/.run_lock."""

import errno
import fcntl
import os
import subprocess
import sys

import pytest

from megatron_renio.errors import UserInputError
from megatron_renio.training import save_lock
from megatron_renio.training.save_lock import LOCK_FILE, claim_save_folder, release_save_folder
from tests.torchrun_harness import REPO_ROOT, subprocess_env

CLAIM = """
import sys, time
from megatron_renio.errors import UserInputError
from megatron_renio.training.save_lock import claim_save_folder
try:
    claim_save_folder(sys.argv[1])
except UserInputError as e:
    print(e)
    sys.exit(2)
print("claimed", flush=True)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
"""


def claim_in_another_process(folder, hold_s=None):
    args = [sys.executable, "-c", CLAIM, str(folder)] + ([str(hold_s)] if hold_s else [])
    return subprocess.Popen(args, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_second_run_on_the_folder_is_refused_naming_the_first(tmp_path):
    save = tmp_path / "run"
    assert claim_save_folder(save) is None  # made when missing
    try:
        holder = (save / LOCK_FILE).read_text()
        assert holder.startswith(f"host {os.uname().nodename}, pid {os.getpid()}, started ")
        assert claim_save_folder(save) is None  # held by this process already: kept
        second = claim_in_another_process(save)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert out == (f"--save {save} is in use by another run ({holder.strip()}); two runs saving into one folder "
                       "delete each other's checkpoints: wait for that run to end or stop it, or choose another "
                       "--save\n")
    finally:
        release_save_folder(save)
    third = claim_in_another_process(save)
    assert third.communicate(timeout=120)[0] == "claimed\n" and third.returncode == 0


def test_the_lock_ends_with_the_process_that_held_it(tmp_path):
    """A killed run leaves no stale lock: its requeue takes the folder over."""
    first = claim_in_another_process(tmp_path, hold_s=600)
    assert first.stdout.readline() == "claimed\n"
    with pytest.raises(UserInputError, match=f"pid {first.pid}, started "):
        claim_save_folder(tmp_path)
    first.kill()
    first.communicate(timeout=60)
    try:
        assert claim_save_folder(tmp_path) is None
        assert f"pid {os.getpid()}, " in (tmp_path / LOCK_FILE).read_text()  # the new holder's name replaces it
    finally:
        release_save_folder(tmp_path)


def test_a_file_system_that_does_not_lock_leaves_the_run_unprotected_with_a_note(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    note = claim_save_folder(tmp_path)
    assert note == (f"note: --save {tmp_path}: the file system does not lock {tmp_path / LOCK_FILE} "
                    f"({os.strerror(errno.ENOLCK)}), so a second run started on this folder would not be refused")
    assert save_lock._held == {}


def test_a_folder_it_cannot_create_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match=f"^{tmp_path / 'file' / 'run'}.*: cannot open the run's lock file"):
        claim_save_folder(tmp_path / "file" / "run")


def test_the_lock_file_follows_the_umask_as_the_runs_other_files(tmp_path):
    """In a group-shared folder (umask 002) a teammate resumes the run: the lock file must be group-writable
    as the checkpoints are (it was 0o644 whatever the umask)."""
    old = os.umask(0o002)
    try:
        claim_save_folder(tmp_path / "shared")
    finally:
        os.umask(old)
        release_save_folder(tmp_path / "shared")
    assert (tmp_path / "shared" / LOCK_FILE).stat().st_mode & 0o777 == 0o664


FORKS_AND_DIES = """
import os, sys, time
from megatron_renio.training.save_lock import claim_save_folder
claim_save_folder(sys.argv[1])
child = os.fork()
if child == 0:  # as Megatron's checkpoint writer processes, left behind when the trainer is killed
    time.sleep(600)
    os._exit(0)
print(child, flush=True)
os._exit(0)
"""


def test_a_forked_child_left_behind_does_not_keep_the_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", FORKS_AND_DIES, str(tmp_path)], cwd=REPO_ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())  # the child keeps the pipe open: no waiting for its end
    assert proc.wait(timeout=60) == 0  # the process that claimed the folder is gone; its child lingers
    try:
        assert claim_save_folder(tmp_path) is None
    finally:
        release_save_folder(tmp_path)
        os.kill(child, 9)


def test_the_first_claim_creates_nothing_and_refuses_a_held_folder(tmp_path):
    """Before the trainer reads --save: a folder without a lock file is left as it is (bad input must not
    change it), one whose lock another run holds is refused."""
    assert claim_save_folder(tmp_path / "new", create=False) is None and not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    assert claim_save_folder(tmp_path / "old", create=False) is None and list((tmp_path / "old").iterdir()) == []
    holder = claim_in_another_process(tmp_path / "held", hold_s=600)
    try:
        assert holder.stdout.readline() == "claimed\n"
        with pytest.raises(UserInputError, match=f"^--save {tmp_path / 'held'} is in use by another run"):
            claim_save_folder(tmp_path / "held", create=False)
    finally:
        holder.kill()
        holder.communicate(timeout=60)
