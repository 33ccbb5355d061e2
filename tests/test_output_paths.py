"""Output paths are checked before any model work: a path that cannot receive the output is one line
naming the flag at start-up, not a traceback (or an error) at the first save, hours into a run. And
what is published is on stable storage before its name is (fsync of files, then folders)."""

import errno
import os
from pathlib import Path

import pytest

from megatron_renio.errors import UserInputError
from megatron_renio.output_paths import check_output_file, check_output_folder, fsync_tree, write_atomic


def test_a_folder_output_must_be_or_become_a_folder_written_in(tmp_path):
    check_output_folder(tmp_path / "new" / "deeper", "--save x")  # missing parents are created later
    assert not (tmp_path / "new").exists() and not list(tmp_path.iterdir())  # the probe leaves nothing
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(UserInputError, match="^--save x exists and is not a folder$"):
        check_output_folder(afile, "--save x")
    with pytest.raises(UserInputError, match=f"^--save x: {afile} is a file, not a folder$"):
        check_output_folder(afile / "run", "--save x")
    # root passes os.access on /proc, where nothing can be created: the probe tells
    with pytest.raises(UserInputError, match="^--save x: cannot write in /proc "):
        check_output_folder("/proc/run", "--save x")


def test_a_broken_symbolic_link_is_refused(tmp_path):
    link = tmp_path / "dl"
    link.symlink_to(tmp_path / "missing")
    for check in (check_output_folder, check_output_file):  # the first save failed with FileExistsError
        with pytest.raises(UserInputError, match=f"^--save x is a symbolic link to {tmp_path / 'missing'}, which "
                                                 "does not exist$"):
            check(link, "--save x")


def test_other_ranks_probes_do_not_make_a_folder_non_empty(tmp_path):
    """Ranks of one job probe the same --save at once: an empty folder stays empty for each of them."""
    from megatron_renio.models.checkpoint import check_target_directory
    from megatron_renio.output_paths import PROBE_PREFIX, is_empty_folder

    (tmp_path / f"{PROBE_PREFIX}abc").mkdir()
    assert is_empty_folder(tmp_path)
    check_target_directory(tmp_path)
    (tmp_path / "model").mkdir()
    assert not is_empty_folder(tmp_path)


def test_a_file_output_must_not_be_a_folder(tmp_path):
    check_output_file(tmp_path / "m.jsonl", "--out m")
    with pytest.raises(UserInputError, match="^--out m is a folder, not a file$"):
        check_output_file(tmp_path, "--out m")
    with pytest.raises(UserInputError, match="^--out newdir/ is a folder, not a file$"):  # Path drops the "/"
        check_output_file(f"{tmp_path}/newdir/", "--out newdir/")
    with pytest.raises(UserInputError, match=f"^--out m: folder {tmp_path / 'no'} does not exist$"):
        check_output_file(tmp_path / "no" / "m.jsonl", "--out m")
    check_output_file(tmp_path / "no" / "m.jsonl", "--out m", create_folder=True)
    with pytest.raises(UserInputError, match="^--out m: cannot write in /proc "):
        check_output_file("/proc/m.jsonl", "--out m")


@pytest.mark.parametrize("field, value, message", [
    ("save", "/proc/run", "--save /proc/run: cannot write in /proc"),  # a traceback at the first save
    ("metrics_file", "{tmp}", "--metrics-file {tmp} is a folder, not a file"),  # a traceback at start-up
    ("tensorboard_dir", "{file}", "--tensorboard-dir {file} exists and is not a folder"),
])
def test_trainer_outputs_are_checked_at_start_up(tmp_path, field, value, message):
    from megatron_renio.config import TrainConfig
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import check_save_target

    afile = tmp_path / "afile"
    afile.write_text("")
    value, message = (text.format(tmp=tmp_path, file=afile) for text in (value, message))
    with pytest.raises(UserInputError, match=f"^{message}"):
        check_save_target(TrainConfig(**{field: value}), get_preset("tiny-qwen3"))


def test_trainer_metrics_file_may_be_in_a_folder_yet_to_be_made(tmp_path):
    from megatron_renio.config import TrainConfig
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import check_save_target

    check_save_target(TrainConfig(metrics_file=str(tmp_path / "logs" / "m.jsonl")), get_preset("tiny-qwen3"))


def test_quickstart_out_is_checked(tmp_path):
    from megatron_renio.quickstart import _prepare_out

    with pytest.raises(UserInputError, match="^--out /proc/qs: cannot write in /proc "):
        _prepare_out(Path("/proc/qs"))


def test_quickstart_out_of_an_earlier_run_is_emptied_also_as_the_current_folder(tmp_path, monkeypatch):
    """A re-run into an earlier quickstart's output replaces what is in it; given as ``.`` from inside it,
    the folder itself stays (removing the current folder failed half-way, with a traceback)."""
    from megatron_renio.quickstart import MARKER, _prepare_out

    earlier = tmp_path / "qs"
    (earlier / "runs" / "opd").mkdir(parents=True)
    (earlier / MARKER).write_text("earlier\n")
    (earlier / "summary.json").write_text("{}")
    (earlier / "link").symlink_to(tmp_path)  # a link is removed, not followed
    monkeypatch.chdir(earlier / "runs")
    with pytest.raises(UserInputError, match=r"^--out \.\. holds the current folder; run the quickstart from outside "
                                             "it$"):
        _prepare_out(Path(".."))
    monkeypatch.chdir(earlier)
    _prepare_out(Path("."))
    assert [p.name for p in earlier.iterdir()] == [MARKER] and tmp_path.is_dir()


def test_an_interrupted_atomic_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    target = tmp_path / "latest.txt"
    target.write_text("old\n")

    def lines():
        yield "new\n"
        raise KeyboardInterrupt  # the writer is stopped half-way

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, lines())
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["latest.txt"]
    write_atomic(target, ["new\n"])
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["latest.txt"]


def record_syncs_and_renames(monkeypatch, log: Path):
    """Make every os.fsync and os.replace (which still do their work) note ("fsync", path) or ("rename",
    source, target), absolute paths, as a line of the file ``log``, appended: processes forked from this
    one (dist_checkpointing's writers) note theirs there too. Returns a function that reads the events
    so far, in order."""
    fsync, replace = os.fsync, os.replace

    def note(*fields: str) -> None:
        with open(log, "a") as f:
            f.write("\t".join(fields) + "\n")

    def recording_fsync(fd):
        note("fsync", os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def recording_replace(source, target):
        note("rename", str(Path(source).absolute()), str(Path(target).absolute()))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return lambda: [tuple(line.split("\t")) for line in log.read_text().splitlines()] if log.exists() else []


def test_an_atomic_write_is_on_stable_storage_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = record_syncs_and_renames(monkeypatch, tmp_path / "events.log")
    (tmp_path / "out").mkdir()
    write_atomic(tmp_path / "out" / "latest.txt", ["7\n"])
    [(_, partial), rename, folder] = events()
    assert partial.startswith(str(tmp_path / "out" / ".latest.txt.partial-"))
    assert rename == ("rename", partial, str(tmp_path / "out" / "latest.txt"))
    assert folder == ("fsync", str(tmp_path / "out"))


def test_a_tree_is_synced_file_by_file_and_each_folder_after_what_it_names(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    for name in ("top.pt", "a/x.json", "a/b/y.distcp"):
        (tree / name).write_text(name)
    log = tmp_path / "events.log"
    events = record_syncs_and_renames(monkeypatch, log)
    fsync_tree(tree)
    order = [os.path.relpath(path, tree) for _, path in events()]
    assert sorted(order) == sorted([".", "a", "a/b", "top.pt", "a/x.json", "a/b/y.distcp"]) and order[-1] == "."
    for path in order[:-1]:  # every entry is synced before the folder that names it; the top folder last
        assert order.index(path) < order.index(os.path.dirname(path) or "."), order
    log.unlink()
    fsync_tree(tree, synced_by_writers=(".distcp",))  # files their writers synced: only their folders
    assert sorted(os.path.relpath(path, tree) for _, path in events()) == sorted([".", "a", "a/b", "top.pt", "a/x.json"])


def test_a_folder_that_cannot_be_synced_is_skipped_a_file_is_an_error_naming_it(tmp_path, monkeypatch):
    """FUSE mounts of object stores refuse to sync a folder (EINVAL): nothing to flush there. A file that
    cannot be synced (EIO: its data may be lost) is an error naming the file."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.pt").write_text("x")
    fsync = os.fsync

    def refuse_folders(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", refuse_folders)
    fsync_tree(tmp_path)

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output error") as error:
        fsync_tree(tmp_path)
    assert error.value.filename == str(tmp_path / "a" / "x.pt")


def test_write_atomic_errors_name_the_target_not_its_temporary_file(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(OSError) as err:
        write_atomic(str(gone / "out.jsonl"), ["x\n"])
    assert err.value.filename == str(gone / "out.jsonl")


def test_a_removed_working_folder_does_not_stop_a_save_elsewhere(tmp_path, monkeypatch):
    """A long run's working folder (a scratch folder) removed under it: Path.cwd() raises, and the check
    that a save target is not the working folder has nothing to guard."""
    from megatron_renio.models.checkpoint import check_target_directory

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    work.rmdir()
    check_target_directory(tmp_path / "save")
