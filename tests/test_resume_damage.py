"""A resume from a damaged training checkpoint or log stops with one line naming the file or folder.

One in-process world of one rank saves a training checkpoint (the default optimizer, an EMA teacher);
each case damages one file of a copy of it and resumes from the copy as ``train`` does
(:func:`read_train_state`, then :func:`load_training_checkpoint`). And a save is on stable storage
before its marker names it, so that a node's crash cannot leave such damage behind.
"""

import errno
import json
import os
import re
import shutil

import pytest
import torch

from megatron_renio.errors import UserInputError
from tests.test_output_paths import record_syncs_and_renames

UNREADABLE = "cannot be read (truncated or not a checkpoint file: "
OPTIMIZER = "cannot load the optimizer state, missing or corrupt files ("
TEACHER = "cannot load the EMA teacher, missing or corrupt files ("
# (file under iter_0000001/, its damage, whether the line names the file (else its folder), what it says next)
DAMAGES = [
    ("train_state.pt", "truncate", True, UNREADABLE),
    ("train_state.pt", "list", True, "holds no training state"),
    ("optimizer/__0_0.distcp", "truncate", False, OPTIMIZER),
    ("optimizer/metadata.json", "json", False, OPTIMIZER),
    ("optimizer/common.pt", "garbage", False, OPTIMIZER),
    ("teacher/__0_0.distcp", "truncate", False, TEACHER),
    ("teacher/metadata.json", "json", False, TEACHER),
    ("rng/rank_00000.pt", "garbage", True, UNREADABLE),
    ("rng/rank_00000.pt", "list", True, "holds no RNG states ("),
    ("rng/rank_00000.pt", "short_state", True, "holds no RNG states (RuntimeError"),  # torch's size check
    # the tracker's states in a CUDA generator's format in a CPU run's file: refused at the load, not at the
    # first dropout of the run
    ("rng/rank_00000.pt", "tracker_state", True, "holds no RNG states (RuntimeError"),
]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A single-process world and ``(checkpoint folder, build)``: ``build()`` makes a fresh student, its
    optimizer and an EMA teacher to load into."""
    from megatron_renio import distributed
    from megatron_renio.config import TrainConfig
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import build_gpt_model
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training import components as C
    from megatron_renio.training.ema import EmaTeacher

    cfg = TrainConfig()
    distributed.initialize(ParallelConfig(), seed=0)

    def build():
        model, info = build_gpt_model(get_preset("tiny-qwen3"), ParallelConfig())
        ddp = C.wrap_ddp(model, use_distributed_optimizer=False)
        teacher, _ = build_gpt_model(get_preset("tiny-qwen3"), ParallelConfig())
        return model, info, ddp, C.build_optimizer(ddp, cfg)[0], EmaTeacher(teacher, 0.9)

    root = tmp_path_factory.mktemp("saved")
    _step_and_save(build, root, 1)
    try:
        yield root, build
    finally:
        distributed.destroy()


def _step_and_save(build, root, iteration: int) -> None:
    """A fresh student, teacher and optimizer (``build``), one optimizer step, then a training checkpoint."""
    from megatron_renio.training.checkpointing import save_training_checkpoint

    model, info, ddp, optimizer, ema = build()
    tokens = torch.randint(0, 100, (2, 16))
    ddp(tokens, torch.arange(16).expand(2, 16), attention_mask=None).float().pow(2).mean().backward()
    ddp.finish_grad_sync()
    assert optimizer.step()[0]  # the optimizer state a checkpoint holds exists after a step
    save_training_checkpoint(root, iteration, student=model, student_info=info, optimizer=optimizer,
                             train_state={"iteration": iteration}, teacher=ema)


def test_a_save_is_on_stable_storage_before_the_marker_names_it(saved_run, tmp_path, monkeypatch):
    """Every file and folder of the published checkpoint was flushed (fsync) before the rename of the
    ``latest`` marker, the shards by dist_checkpointing's writer processes and the rest by the saver, and
    the run folder (the checkpoint's rename) between the two renames and after the marker's: a node that
    crashes cannot leave a marker naming a checkpoint it did not write out."""
    from megatron_renio.training.checkpointing import LATEST

    read_events = record_syncs_and_renames(monkeypatch, tmp_path / "events.log")  # the writers' forks note too
    _step_and_save(saved_run[1], tmp_path / "run", 3)
    events = read_events()
    root = tmp_path / "run"
    final, marker = root / "iter_0000003", str(root / LATEST)

    def published_name(path: str) -> str:  # where a path written during the save ends up
        path = re.sub(r"/\.\.tmp_iter_(\d+)\.partial-[0-9a-f]+", r"/iter_\1", path)
        return re.sub(r"/\.tmp_iter_(\d+)", r"/iter_\1", path)

    marker_at = next(i for i, event in enumerate(events) if event[0] == "rename" and event[2] == marker)
    checkpoint_at = next(i for i, event in enumerate(events) if event[0] == "rename" and event[2] == str(final))
    synced = {published_name(event[1]) for event in events[:marker_at] if event[0] == "fsync"}
    written = [final, *final.rglob("*")]
    assert {"model", "optimizer", "teacher", "rng", "train_state.pt"} <= {p.name for p in final.iterdir()}
    assert [str(p) for p in written if str(p) not in synced] == []
    folder = ("fsync", str(root))
    assert folder in events[checkpoint_at:marker_at] and folder in events[marker_at:]


def test_checkpoint_folders_without_the_marker_are_refused_not_read_as_none(saved_run, tmp_path):
    """A run folder whose ``latest`` marker is gone (a partial copy, a deleted marker): read as no
    checkpoint, a new run or a requeue (--load = --save) would start over and its first save prune every
    iter_* folder. One line instead; --override-save (which does not read it) still starts over."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.models.checkpoint import read_checkpoint_metadata
    from megatron_renio.training.checkpointing import LATEST, latest_iteration
    from megatron_renio.training.components import check_load_source, check_save_target

    run = tmp_path / "run"
    shutil.copytree(saved_run[0], run)
    assert latest_iteration(run) == 1
    (run / LATEST).unlink()
    message = (f"^{run} holds checkpoint folders \\(iter_0000001\\) but no {LATEST} naming the one to resume: write "
               f"the iteration of a complete one into {run / LATEST} to resume it, or start over without --load and "
               "with --override-save \\(which deletes them\\)$")
    student = read_checkpoint_metadata(run / "iter_0000001").preset
    for check, cfg in ((check_save_target, TrainConfig(save=str(run))),
                       (check_load_source, TrainConfig(load=str(run), save=str(run)))):
        with pytest.raises(UserInputError, match=message):
            check(cfg, student) if check is check_save_target else check(cfg)
    check_save_target(TrainConfig(save=str(run), override_save=True), student)
    assert latest_iteration(tmp_path / "empty") is None


class _Killed(BaseException):
    """The process dying at this point (no handler catches it)."""


@pytest.mark.parametrize("deleted_first", [True, False])
def test_a_save_over_the_latest_iteration_killed_while_the_old_folder_is_deleted(saved_run, tmp_path, monkeypatch,
                                                                                deleted_first):
    """A save of the iteration the marker already names (--override-save over an earlier run), killed
    while the old folder is being deleted (after the deletion or before it): the marker's iteration has a
    complete folder (the new one) and resumes; the next save removes what the kill left."""
    from megatron_renio.training.checkpointing import LATEST, read_train_state

    root = tmp_path / "run"
    _step_and_save(saved_run[1], root, 3)
    rmtree = shutil.rmtree

    def dies_deleting_an_iteration(path, *args, **kwargs):
        name = os.path.basename(path)
        if "iter_0000003" in name and not name.startswith(".tmp_"):
            if deleted_first:
                rmtree(path, *args, **kwargs)
            raise _Killed()
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies_deleting_an_iteration)
    with pytest.raises(_Killed):
        _step_and_save(saved_run[1], root, 3)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert (root / LATEST).read_text().strip() == "3" and read_train_state(root)["iteration"] == 3
    _resume(root, saved_run[1])
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert len(leftovers) == (0 if deleted_first else 1)
    _step_and_save(saved_run[1], root, 4)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "iter_0000004", LATEST]


def test_a_save_over_the_latest_iteration_killed_between_its_renames_is_restored(saved_run, tmp_path, monkeypatch):
    """A save of the iteration the marker already names, killed after it renamed the old folder aside and
    before it renamed the new one in: the marker's iteration has no folder. Reading the run folder is one
    line naming the folder set aside; restore_set_aside_checkpoint (the requeue's) renames it back, and
    the previous checkpoint resumes as after a save cut anywhere else."""
    from megatron_renio.training.checkpointing import latest_iteration, restore_set_aside_checkpoint

    root = tmp_path / "run"
    _step_and_save(saved_run[1], root, 3)
    before = plain_files(root / "iter_0000003")
    replace = os.replace

    def dies_renaming_the_new_folder_in(source, target):
        if os.path.basename(source).startswith(".tmp_iter_0000003"):
            raise _Killed()
        replace(source, target)

    monkeypatch.setattr(os, "replace", dies_renaming_the_new_folder_in)
    with pytest.raises(_Killed):
        _step_and_save(saved_run[1], root, 3)
    monkeypatch.setattr(os, "replace", replace)
    [aside] = root.glob(".iter_0000003.replaced-*")
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(root))}/\S+ names iteration 3, but \S+ is missing; "
                                             rf"a save of that iteration was killed between its renames and left "
                                             rf"the checkpoint in {re.escape(str(aside))} "):
        latest_iteration(root)
    assert restore_set_aside_checkpoint(root).startswith(f"restored {root / 'iter_0000003'} from {aside.name}")
    assert plain_files(root / "iter_0000003") == before and latest_iteration(root) == 3
    assert restore_set_aside_checkpoint(root) is None  # nothing more to restore
    _resume(root, saved_run[1])


def test_a_save_removes_the_marker_files_of_saves_killed_before_the_marker_rename(saved_run, tmp_path):
    """A save killed after it wrote the new marker's temporary file and before the rename leaves that
    file (write_atomic's .NAME.partial-*); the next save removes it, and nothing it does not own."""
    from megatron_renio.training.checkpointing import LATEST

    root = tmp_path / "run"
    _step_and_save(saved_run[1], root, 3)
    killed = [root / f".{LATEST}.partial-0badf00d", root / f".{LATEST}.partial-[x]"]
    kept = [root / ".other.txt.partial-0badf00d", root / "notes.txt"]
    for path in killed + kept:
        path.write_text("3")
    _step_and_save(saved_run[1], root, 4)
    expected = ["iter_0000003", "iter_0000004", LATEST, *(p.name for p in kept)]
    assert sorted(p.name for p in root.iterdir()) == sorted(expected)


def plain_files(folder):
    """The relative path and bytes of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, says", [
    ("renio_model.json", r"\S+/\.\.tmp_iter_0000003\.partial-\w+/renio_model\.json: cannot write the model checkpoint "),
    ("train_state.pt", r"\S+/\.tmp_iter_0000003/train_state\.pt: cannot publish checkpoint 3 "),
])
def test_a_checkpoint_that_cannot_be_synced_is_one_line_and_not_named_latest(saved_run, tmp_path, monkeypatch, name,
                                                                              says):
    """A file of the save that the storage fails to flush (EIO), in the model checkpoint or in what the
    training checkpoint adds, stops the save with one line naming it; the ``latest`` marker is not written."""
    from megatron_renio.training.checkpointing import LATEST

    fsync = os.fsync

    def fail_on_the_file(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            raise OSError(errno.EIO, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fail_on_the_file)
    with pytest.raises(UserInputError, match=f"^{says}.*\\(Input/output error\\)$"):
        _step_and_save(saved_run[1], tmp_path, 3)
    assert not (tmp_path / LATEST).exists()


def _damage(path, how):
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(min(100, path.stat().st_size // 2))
    elif how == "json":
        path.write_text("{\n")
    elif how == "garbage":
        path.write_text("garbage\n")
    elif how == "short_state":  # the RNG file's layout, with a torch generator state of the wrong size
        state = torch.load(path, weights_only=False)
        torch.save({**state, "torch": torch.zeros(10, dtype=torch.uint8)}, path)
    elif how == "tracker_state":  # the model-parallel tracker's states as a CUDA generator's (16 bytes)
        state = torch.load(path, weights_only=False)
        torch.save({**state, "tracker": {k: torch.zeros(16, dtype=torch.uint8) for k in state["tracker"]}}, path)
    else:  # a readable pickle of something else
        torch.save([1, 2], path)


def _resume(root, build):
    from megatron_renio.training.checkpointing import load_training_checkpoint, read_train_state

    model, _, _, optimizer, ema = build()
    load_training_checkpoint(root, read_train_state(root), student=model, optimizer=optimizer, teacher=ema)


def test_an_undamaged_copy_resumes(saved_run, tmp_path):
    """The copy that each damage case starts from loads (what fails below is the damage)."""
    root, build = saved_run
    shutil.copytree(root, tmp_path / "run")
    _resume(tmp_path / "run", build)


@pytest.mark.parametrize("name, how, names_file, says", DAMAGES, ids=[f"{d[0]}-{d[1]}" for d in DAMAGES])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(saved_run, tmp_path, monkeypatch, name, how, names_file,
                                                        says):
    """Each damaged file of a training checkpoint stops the resume with one UserInputError that names
    the file (a pickled one) or the folder (a dist_checkpointing one) and what is wrong; the loads of
    every rank (all but train_state.pt, which train reads on rank 0 under on_rank0) raise it through
    raise_if_any_rank, so that every rank stops with it, also for a file that one rank alone reads."""
    from megatron_renio.distributed import raise_if_any_rank
    from megatron_renio.models import checkpoint
    from megatron_renio.training import checkpointing

    agreed = []

    def agree(error):
        agreed.append(error)
        raise_if_any_rank(error)

    for module in (checkpointing, checkpoint):  # the RNG file's check; the sharded parts' (load_part)
        monkeypatch.setattr(module, "raise_if_any_rank", agree)
    root, build = saved_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    target = run / "iter_0000001" / name
    assert target.is_file()
    _damage(target, how)
    with pytest.raises(UserInputError) as caught:
        _resume(run, build)
    assert str(caught.value).startswith(f"{target if names_file else target.parent}: {says}"), caught.value
    assert (caught.value in agreed) == (name != "train_state.pt")


def test_rng_states_saved_on_a_gpu_resume_on_the_cpu_with_a_note(saved_run, tmp_path, capsys):
    """A GPU run's RNG file (a CUDA state, the tracker's in a CUDA generator's format) resumed on the
    CPU: the Python, NumPy and torch CPU generators are restored, the tracker keeps its seeded states,
    and a note says so (the tracker's states were another device's format: the run would fail later)."""
    import random

    from megatron.core import tensor_parallel

    root, build = saved_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    rng_file = run / "iter_0000001" / "rng" / "rank_00000.pt"
    state = torch.load(rng_file, weights_only=False)
    torch.save({**state, "cuda": torch.zeros(16, dtype=torch.uint8),
                "tracker": {k: torch.zeros(16, dtype=torch.uint8) for k in state["tracker"]}}, rng_file)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    seeded = {k: v.clone() for k, v in tracker.get_states().items()}
    _resume(run, build)
    assert random.getstate() == state["python"] and torch.equal(torch.get_rng_state(), state["torch"])
    assert all(torch.equal(seeded[k], v) for k, v in tracker.get_states().items())
    assert f"note: {rng_file} was saved on a GPU and this run is on the CPU: the model-parallel RNG states " \
           "start from --seed instead" in capsys.readouterr().out


def test_a_missing_rng_file_resumes_with_a_note_naming_it(saved_run, tmp_path, capsys):
    """A rank of the saving world whose RNG file is gone resumes from its seeded states, and a note
    names the file; an undamaged copy gives no such note."""
    root, build = saved_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    _resume(run, build)
    assert "RNG files its run saved" not in capsys.readouterr().out
    rng_folder = run / "iter_0000001" / "rng"
    (rng_folder / "rank_00000.pt").unlink()
    _resume(run, build)
    assert f"note: {rng_folder} lacks rank_00000.pt (1 of the 1 RNG files its run saved): those ranks go on " \
           "from --seed's states" in capsys.readouterr().out


def test_a_metrics_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    """drop_steps_after (a resume's rewrite of the JSONL logs) names a file that is not UTF-8 text and
    its line, and leaves it as it was."""
    from megatron_renio.training.run_logs import drop_steps_after

    path = tmp_path / "metrics.jsonl"
    content = b'{"step": 1}\n{"step": 2, "x": "\xff\xfe"}\n'
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: line 2 is not UTF-8 text"):
        drop_steps_after(path, 1)
    assert path.read_bytes() == content


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
def test_a_resume_cuts_each_log_after_its_last_kept_step_reading_only_its_end(tmp_path, monkeypatch, block):
    """drop_steps_after against a plain filter of the records, with the file read backwards in blocks
    of every size (a block boundary inside a line, on a newline, a block larger than the file); the
    kept part is not rewritten, a last line cut short goes, and a foreign line in the part to cut is
    refused, naming its line, with the file left as it was."""
    from megatron_renio.training import run_logs

    monkeypatch.setattr(run_logs, "_TAIL_BLOCK", block)
    records = [{"step": step, "text": "x" * (step * 5 % 11), "i": i} for step in range(1, 7) for i in range(step % 3)]
    lines = [json.dumps(r) + "\n" for r in records]
    path = tmp_path / "samples_rank0.jsonl"
    for iteration in (0, 1, 3, 6, 9):
        path.write_text("".join(lines) + '{"step": 7, "te')  # a killed run's last record, cut short
        inode = path.stat().st_ino
        run_logs.drop_steps_after(path, iteration)
        assert path.read_text() == "".join(line for r, line in zip(records, lines) if r["step"] <= iteration)
        assert path.stat().st_ino == inode  # cut in place, not rewritten
    assert [r["step"] for r in records[:3]] == [1, 2, 2]
    path.write_text(lines[0] + "not a record\n" + "".join(lines[1:]))
    content = path.read_bytes()
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: line 2 is not a JSON record of a step, so not "
                                             "a log of this trainer; repair or remove the file to resume$"):
        run_logs.drop_steps_after(path, 1)
    assert path.read_bytes() == content
    run_logs.drop_steps_after(path, 2)  # the foreign line lies in the part that is kept
    assert path.read_text() == lines[0] + "not a record\n" + lines[1] + lines[2]


def test_a_log_that_cannot_be_cut_is_one_line_naming_it(tmp_path):
    from megatron_renio.training.run_logs import drop_steps_after

    with pytest.raises(UserInputError, match=rf"^{re.escape(str(tmp_path))}: cannot cut the steps a resumed run takes "
                                             r"again \(Is a directory\); make it writable to resume$"):
        drop_steps_after(tmp_path, 1)


def test_an_overridden_schedule_sets_the_rates_from_the_new_lr_bounds(saved_run):
    """--override-opt-param-scheduler: the first resumed step trains at the new schedule's rate. The
    loaded optimizer state brings the old max_lr / min_lr back into every parameter group, and the
    scheduler sets the rates from them as it loads: the new bounds must be in place first (else
    7.5e-4 from the old 1e-3..0 decay, not 1.525e-3)."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.training import components as C

    _, build = saved_run
    linear = dict(lr_decay_style="linear")
    _, _, ddp, _, _ = build()
    _, old_scheduler = C.build_optimizer(ddp, TrainConfig(lr=1e-3, min_lr=0.0, train_iters=1, **linear))
    old_scheduler.step(increment=1)
    cfg = TrainConfig(lr=2e-3, min_lr=1e-4, train_iters=4, override_opt_param_scheduler=True, **linear)
    _, _, ddp, _, _ = build()
    optimizer, scheduler = C.build_optimizer(ddp, cfg)
    for group in optimizer.param_groups:  # what loading the checkpoint's optimizer state brings back
        group["max_lr"], group["min_lr"] = 1e-3, 0.0
    C.restore_scheduler(optimizer, scheduler, old_scheduler.state_dict(), cfg)
    # step 1 of a linear decay over 4 from 2e-3 to 1e-4
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1.525e-3] * len(optimizer.param_groups))


def test_a_model_checkpoint_with_tensors_the_model_lacks_is_refused(saved_run, tmp_path):
    """renio_model.json edited to tie the embeddings of an untied checkpoint: its trained output layer
    has no place in the tied model, and the load refuses it (strict), not drops it in silence."""
    import json

    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import build_gpt_model
    from megatron_renio.models.checkpoint import load_model_checkpoint, save_model_checkpoint
    from megatron_renio.models.presets import get_preset

    untied = get_preset("tiny-qwen3-untied")
    model, info = build_gpt_model(untied, ParallelConfig())
    save_model_checkpoint(model, info, tmp_path / "ckpt")
    metadata = tmp_path / "ckpt" / "renio_model.json"
    data = json.loads(metadata.read_text())
    data["preset"]["tie_word_embeddings"] = True
    metadata.write_text(json.dumps(data))
    tied, _ = build_gpt_model(untied.replace(tie_word_embeddings=True), ParallelConfig())
    with pytest.raises(UserInputError, match="cannot load the model weights, missing or corrupt files"):
        load_model_checkpoint(tied, tmp_path / "ckpt")
