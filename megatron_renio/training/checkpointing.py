"""Training checkpoints: crash-safe saves, keep-last-K, exact resume.

Layout of ``--save DIR``::

    DIR/iter_0000010/            one complete checkpoint (a model checkpoint folder, see
        renio_model.json         megatron_renio.models.checkpoint, so export and --student-load
        model/  tokenizer/       read it directly)
        optimizer/               dist_checkpointing of the optimizer state (its format:
                                 :data:`DP_RESHARDABLE` or :data:`FULLY_RESHARDABLE`)
        teacher/                 the EMA teacher's fp32 average (``--teacher ema`` only; EmaTeacher)
        train_state.pt           step, data position, ReNIO EMA, LR scheduler, counters
        rng/rank_00000.pt        every rank's python / numpy / torch / model-parallel RNG states
    DIR/latest_checkpointed_iteration.txt
    DIR/.run_lock                the lock of the run saving there (megatron_renio.training.save_lock)

A save is written to ``DIR/.tmp_iter_...`` and renamed when every rank has finished and its files
and folders are on stable storage (fsync); only then is the ``latest`` marker replaced (atomically,
and flushed too). A save interrupted at any point, or lost with a node that crashed, leaves the previous
checkpoint as the latest, and a ``.tmp_`` folder that the next save removes. A save of an iteration that
already has a folder (``--override-save`` over an earlier run) renames that folder aside, renames the new one
in, and only then deletes the old one; killed between those renames it leaves the marker's iteration without
a folder and the old one aside, which the requeue (``--load`` = ``--save``) renames back
(:func:`restore_set_aside_checkpoint`), so that the previous checkpoint is again the latest.
Then rank 0 prunes older
checkpoints (:func:`prune_checkpoints`) in a background thread while training goes on.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

from megatron_renio.distributed import on_rank0, raise_if_any_rank
from megatron_renio.errors import UserInputError
from megatron_renio.output_paths import fsync, fsync_tree, hidden_siblings, storage_error, write_atomic
from megatron_renio.training.faults import maybe_die

LATEST = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The iteration named by the ``latest`` marker, or None when there is no checkpoint. ``iter_*``
    folders without a marker (a partial copy of a run folder, a deleted marker, a first save cut between
    its rename and its marker) are one line: read as no checkpoint, a new run's first save would prune
    them all."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        unmarked = sorted(path.name for path in Path(root).glob("iter_*") if path.name[len("iter_"):].isdigit())
        if unmarked:
            raise UserInputError(
                f"{root} holds checkpoint folders ({', '.join(unmarked)}) but no {LATEST} naming the one to "
                f"resume: write the iteration of a complete one into {marker} to resume it, or start over "
                "without --load and with --override-save (which deletes them)")
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise UserInputError(f"{marker}: corrupt marker {text!r} (expected an iteration number)")
    final = iteration_dir(root, int(text))
    if not final.is_dir():
        from megatron_renio.models.checkpoint import set_aside_folders

        aside = set_aside_folders(final)
        cut = (f"; a save of that iteration was killed between its renames and left the checkpoint in {aside[0]} "
               f"(a requeue with --load and --save {root} renames it back; or rename it to {final.name})"
               if aside else "")
        raise UserInputError(f"{marker} names iteration {text}, but {final} is missing{cut}")
    return int(text)


def restore_set_aside_checkpoint(root: str | Path) -> str | None:
    """When the iteration that the marker of ``root`` names has no folder because a save of that same
    iteration (``--override-save``, or the re-save into another optimizer format) was killed between
    :func:`~megatron_renio.models.checkpoint.publish_directory`'s two renames: rename the checkpoint it
    set aside back, so that the save leaves the previous checkpoint the latest as a save cut anywhere
    else does, and return a note saying so; None when there is nothing to restore. For the run that
    holds the folder's lock (the one saving there)."""
    from megatron_renio.models.checkpoint import set_aside_folders

    marker = Path(root) / LATEST
    text = marker.read_text().strip() if marker.is_file() else ""
    if not text.isdigit():
        return None
    final = iteration_dir(root, int(text))
    aside = set_aside_folders(final)
    if final.exists() or not aside:
        return None
    try:
        os.replace(aside[0], final)
        fsync(root)
    except OSError as e:
        raise storage_error(e, root, f"cannot restore {final} from {aside[0].name}") from None
    return f"restored {final} from {aside[0].name}, which a save of that iteration killed between its renames left"


def prune_checkpoints(root: str | Path, published: int, keep_last: int) -> list[Path]:
    """After publishing iteration ``published``: keep it and the ``keep_last - 1`` latest iterations
    before it; remove the others, including any after it (a run started over with --override-save
    on a folder of a longer run). Returns the removed folders."""
    removed = []
    older = []
    for path in sorted(Path(root).glob("iter_*")):
        number = path.name[len("iter_"):]
        if not number.isdigit() or int(number) == published:
            continue
        (older if int(number) < published else removed).append(path)
    removed += older[: max(len(older) - (keep_last - 1), 0)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict, where: Path) -> None:
    """Restore :func:`_rng_state`'s states from file ``where``. States saved on the other kind of device
    (a CPU run's file resumed on GPUs, or the reverse; a CPU run saves no CUDA state) keep only the
    Python, NumPy and torch CPU generators: the model-parallel tracker's states are the other device's
    generator format (the tracker keeps the seeded ones, with a note: dropout draws then differ from an
    uninterrupted run)."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if (state["cuda"] is not None) != torch.cuda.is_available():
        if torch.distributed.get_rank() == 0:
            saved, here = ("a GPU", "the CPU") if state["cuda"] is not None else ("the CPU", "a GPU")
            print(f"note: {where} was saved on {saved} and this run is on {here}: the model-parallel RNG states "
                  "start from --seed instead (dropout draws differ from an uninterrupted run)", flush=True)
        return
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _distributed(optimizer) -> bool:
    """Whether ``optimizer`` is Megatron's distributed optimizer (its state sharded over DP)."""
    return bool(getattr(optimizer.config, "use_distributed_optimizer", False))


# The two formats of Megatron's distributed optimizer state that this trainer writes (Megatron-LM's
# ``--dist-ckpt-optim-fully-reshardable`` picks the second; its default is the first). Each
# checkpoint records its format and layout (:func:`optimizer_format`), and a resume loads that format.
# dp_reshardable: every DP rank writes its own shard of the flat gradient buckets, with no gather and no
# extra memory; it loads at the TP/PP layout it was saved at, at any DP size whose buckets are the same.
DP_RESHARDABLE = "dp_reshardable"
# fully_reshardable: every DP rank all-gathers its model-parallel shard's whole state into parameter
# shapes (main weights and Adam moments, 12 bytes per parameter / (TP x PP) of host memory at save
# and at load); it loads at any TP / PP / DP layout.
FULLY_RESHARDABLE = "fully_reshardable"


def optimizer_format(optimizer, fully_reshardable: bool) -> dict | None:
    """What a checkpoint records of its optimizer state's format: ``{'sharding', 'tp', 'pp'}`` for the
    distributed optimizer, None for the other (its state is saved in parameter shapes, any layout)."""
    from megatron.core import parallel_state

    if not _distributed(optimizer):
        return None
    return {"sharding": FULLY_RESHARDABLE if fully_reshardable else DP_RESHARDABLE,
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size()}


def _optimizer_state_dict(optimizer, model_sd, is_loading: bool, sharding: str | None):
    """Megatron's sharded state dict of ``optimizer``; ``sharding``: the distributed optimizer's format."""
    kwargs = {"metadata": {"distrib_optim_sharding_type": sharding}} if _distributed(optimizer) else {}
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, **kwargs)


def save_training_checkpoint(
    root: str | Path, iteration: int, *, student, student_info, optimizer, train_state: dict,
    teacher=None, tokenizer_dir: str | Path | None = None, generation_config: str | Path | None = None,
    keep_last: int = 2, fully_reshardable: bool = False,
) -> Path:
    """Collective: write iteration ``iteration`` under ``root`` (see the module docstring); ``teacher``:
    the :class:`~megatron_renio.training.ema.EmaTeacher` of ``--teacher ema``, else None;
    ``train_state``: written by global rank 0 (the same on every rank), with the optimizer's format
    added; ``tokenizer_dir`` and ``generation_config``: as for
    :func:`~megatron_renio.models.checkpoint.save_model_checkpoint`; ``fully_reshardable``: the
    distributed optimizer's state in :data:`FULLY_RESHARDABLE` format instead of :data:`DP_RESHARDABLE`."""
    from megatron_renio.models.checkpoint import SHARD_SUFFIX, publish_directory, save_model_checkpoint, save_sharded

    root = Path(root)
    rank = torch.distributed.get_rank()
    tmp = root / f".tmp_iter_{iteration:07d}"
    wait_for_pruning()

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        # an interrupted save's folder, the model writer's staging folder inside it (..tmp_iter_*.partial-*),
        # and a replaced checkpoint whose deletion was interrupted (publish_directory's .iter_*.replaced-*)
        for pattern in (".tmp_iter_*", "..tmp_iter_*.partial-*", ".iter_*.replaced-*"):
            for stale in root.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        for stale in hidden_siblings(root / LATEST, "partial"):  # a marker write cut before its rename
            stale.unlink(missing_ok=True)

    # Rank 0's file operations run through on_rank0: its failure (a full disk, a lost permission)
    # ends every rank with its message instead of leaving them in the next barrier until the timeout.
    _on_rank0_writing(prepare, root)
    save_model_checkpoint(student, student_info, tmp, tokenizer_dir=tokenizer_dir, generation_config=generation_config,
                          extra_metadata={"iteration": iteration})
    saved_format = optimizer_format(optimizer, fully_reshardable)
    optimizer_state = _optimizer_state_dict(optimizer, student.sharded_state_dict(), False,
                                            saved_format and saved_format["sharding"])
    for name, state in (("optimizer", optimizer_state),
                        ("teacher", teacher.sharded_state_dict() if teacher is not None else None)):
        if state is not None:
            _on_rank0_writing((tmp / name).mkdir, tmp / name)
            save_sharded(state, tmp / name)
    maybe_die("checkpoint", iteration)  # model and optimizer written, not yet published

    def write_train_state() -> None:
        (tmp / "rng").mkdir()
        torch.save({**train_state, "distributed_optimizer": _distributed(optimizer), "optimizer_format": saved_format,
                    "world_size": torch.distributed.get_world_size()}, tmp / "train_state.pt")

    _on_rank0_writing(write_train_state, tmp / "train_state.pt")
    rng_file = tmp / "rng" / f"rank_{rank:05d}.pt"
    try:
        torch.save(_rng_state(), rng_file)
        fsync(rng_file)  # by the rank that wrote it: on another node rank 0's fsync would not flush it
        error = None
    except Exception as e:  # every rank must reach raise_if_any_rank, whatever stopped its write
        error = _write_error(e, rng_file)
    raise_if_any_rank(error)
    final = iteration_dir(root, iteration)

    def publish() -> None:
        # on stable storage before the marker names them: what this save added to the model checkpoint
        # (save_model_checkpoint synced its own part; each shard and RNG file was synced by its writer),
        # then the renames
        try:
            for part in ("optimizer", "teacher"):
                if (tmp / part).exists():
                    fsync_tree(tmp / part, synced_by_writers=(SHARD_SUFFIX,))
            for path in (tmp / "train_state.pt", tmp / "rng", tmp):
                fsync(path)
            publish_directory(tmp, final)  # a folder of the same iteration is deleted only once this one is in place
            write_atomic(root / LATEST, [str(iteration)])
        except OSError as e:
            raise storage_error(e, root, f"cannot publish checkpoint {iteration}") from None

    on_rank0(publish)
    if rank == 0:  # nothing reads the older folders: training goes on while rank 0 deletes them
        _start_pruning(root, iteration, keep_last)
    return final


def _write_error(error: Exception, path: Path) -> UserInputError:
    """The one line of a checkpoint part that could not be written (a full disk, a lost permission or
    folder; torch.save reports them as RuntimeError, not OSError): :func:`storage_error`'s, and that
    the latest checkpoint stays."""
    return UserInputError(f"{storage_error(error, path, 'cannot write the checkpoint')}; the latest one stays")


def _on_rank0_writing(write, path: Path) -> None:
    """``on_rank0(write)``, its failure to write (:func:`_write_error`, naming ``path`` unless the system
    names the file) one line on every rank."""
    def guarded() -> None:
        try:
            write()
        except (OSError, RuntimeError) as e:
            raise _write_error(e, path) from None

    on_rank0(guarded)


_pruning: list[threading.Thread] = []


def _start_pruning(root: Path, published: int, keep_last: int) -> None:
    thread = threading.Thread(target=prune_checkpoints, args=(root, published, keep_last), name="prune-checkpoints")
    thread.start()
    _pruning.append(thread)


def wait_for_pruning() -> None:
    """Wait until the older checkpoints that earlier saves left to a background thread are removed
    (on rank 0; nothing to wait for elsewhere). Each save starts with it, and the process joins the
    thread before it exits (a non-daemon thread), so a finished run leaves only the kept folders."""
    while _pruning:
        _pruning.pop().join()


def read_train_state(root: str | Path) -> dict | None:
    """The ``train_state`` of the latest checkpoint under ``root`` (None when there is none), read
    without loading anything else: a resume checks its settings before the models load."""
    iteration = latest_iteration(root)
    return None if iteration is None else _load_train_state(iteration_dir(root, iteration))


def _load_train_state(path: Path) -> dict:
    state_file = path / "train_state.pt"
    if not state_file.is_file():
        raise UserInputError(f"{path}: {state_file.name} missing (incomplete checkpoint)")
    state = _load_file(state_file)
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        raise UserInputError(f"{state_file}: holds no training state (a file that this trainer did not write)")
    return state


def _load_file(file: Path):
    """``torch.load`` of one of a checkpoint's pickled files; one line naming it when it cannot be read."""
    from megatron_renio.models.checkpoint import describe_load_error

    try:
        return torch.load(file, weights_only=False)
    except Exception as e:  # torch reports a torn file as RuntimeError, EOFError, UnpicklingError, ValueError...
        raise UserInputError(f"{file}: cannot be read (truncated or not a checkpoint file: {describe_load_error(e)})") from e


def load_training_checkpoint(root: str | Path, train_state: dict, *, student, optimizer, teacher=None,
                             fully_parallel: bool = False) -> None:
    """Collective: restore the checkpoint under ``root`` whose ``train_state`` the caller read (with
    :func:`read_train_state`) and checked, so that what is loaded is what was checked. A rank that
    finds the RNG file of its rank number (saved by a world at least as large) continues those
    streams: exactly at the same layout; at another layout they are the streams of another role, as
    any seeded continuation would be; a file missing of a rank that the saving world had is noted.
    ``fully_parallel``: Megatron's fully parallel load of every part
    (:func:`~megatron_renio.models.checkpoint.load_sharded`). A part that cannot be loaded (a file
    missing, truncated or of something else) stops every rank with one line naming its file or folder,
    also where one rank alone reads it (its RNG file)."""
    from megatron_renio.models.checkpoint import describe_load_error, load_model_checkpoint, load_part

    path = iteration_dir(root, train_state["iteration"])
    load_model_checkpoint(student, path, fully_parallel)
    if teacher is not None:
        if not (path / "teacher").is_dir():
            raise UserInputError(f"{path}: no EMA teacher saved (was the run started with --teacher ema?)")
        teacher.load_state_dict(load_part(teacher.sharded_state_dict(), path / "teacher", "the EMA teacher",
                                           fully_parallel))
    optimizer_dir = path / "optimizer"
    if not optimizer_dir.is_dir():
        raise UserInputError(f"{path}: optimizer state missing (incomplete checkpoint)")
    _init_optimizer_state(optimizer)
    sharding = saved_sharding(train_state)
    request = _optimizer_state_dict(optimizer, student.sharded_state_dict(), True, sharding)
    if _distributed(optimizer) and sharding == DP_RESHARDABLE:
        _check_gradient_buckets(request, optimizer_dir)
    state = load_part(request, optimizer_dir, "the optimizer state", fully_parallel)
    if _distributed(optimizer):
        _load_distributed_optimizer_state(optimizer, state)
    else:
        optimizer.load_state_dict(state)
    _untie_step_tensors(optimizer)
    rank_file = path / "rng" / f"rank_{torch.distributed.get_rank():05d}.pt"
    if torch.distributed.get_rank() == 0:
        _note_missing_rng_files(path / "rng", train_state.get("world_size"))
    error = None
    if rank_file.is_file():
        try:
            _set_rng_state(_load_file(rank_file), rank_file)
        except UserInputError as e:
            error = e
        except Exception as e:  # a readable file without the states _rng_state saves (a state of the wrong
            # size: torch's RuntimeError); this rank must still reach the agreement below
            error = UserInputError(f"{rank_file}: holds no RNG states ({describe_load_error(e)})")
    raise_if_any_rank(error)  # this rank's own file: the others must not wait for it in the next collective


def _note_missing_rng_files(folder: Path, saved_world: int | None) -> None:
    """A note naming the files of ``folder`` missing of the ranks that both the saving world (of
    ``saved_world`` ranks; None: a checkpoint of an earlier version, which did not record it) and this
    one have: those ranks go on with the states this run seeded, so their dropout draws (if the model
    has dropout) differ from an uninterrupted run's; rollouts draw from generators keyed by seed,
    iteration and position, not from these states (a rank of a larger world has no file to miss)."""
    if saved_world is None:
        return
    shared = range(min(saved_world, torch.distributed.get_world_size()))
    missing = [name for name in (f"rank_{rank:05d}.pt" for rank in shared) if not (folder / name).is_file()]
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        print(f"note: {folder} lacks {shown} ({len(missing)} of the {saved_world} RNG files its run saved): those "
              "ranks go on from --seed's states (their dropout draws, if any, differ from an uninterrupted run's)",
              flush=True)


def _check_gradient_buckets(request: dict, optimizer_dir: Path) -> None:
    """A :data:`DP_RESHARDABLE` state is stored per gradient bucket: refuse one whose buckets (their
    number or sizes, read from the checkpoint's metadata) are not the ones this run loads into
    (``request``), in one line, before dist_checkpointing's load fails on a shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    wanted = {t.key: tuple(t.global_shape) for t in nested_values(request)
              if isinstance(t, ShardedTensor) and ".bucket_idx_" in t.key}
    error = None
    if wanted:
        group = next(iter(wanted)).split(".gbuf_idx_")[0]  # this model-parallel rank's keys
        try:
            metadata = dist_checkpointing.load_tensors_metadata(str(optimizer_dir))
        except Exception as e:  # every rank must reach the agreement below
            metadata, error = {}, UserInputError(f"{optimizer_dir}: cannot read the optimizer state's metadata ({e})")
        saved = {key: tuple(t.global_shape) for key, t in metadata.items()
                 if key.startswith(group + ".") and ".bucket_idx_" in key}

        def sizes(shapes):
            return sorted({(key.split(".bucket_idx_")[1].split(".")[0], shape[0]) for key, shape in shapes.items()})

        if error is None and saved != wanted:
            error = UserInputError(
                f"{optimizer_dir}: its optimizer state ({DP_RESHARDABLE}) was saved from other gradient buckets "
                f"((bucket, size) {sizes(saved)}, here {sizes(wanted)}): resume with the run's "
                f"--overlap-grad-reduce (with it the bucket size grows with DP beyond 40 ranks), or {CONVERT_TO_FULLY_RESHARDABLE}")
    raise_if_any_rank(error)  # each stage checks its own buckets: every rank refuses, none waits in the load


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _init_optimizer_state(optimizer) -> None:
    """Create Adam's state tensors so that the sharded load has targets.

    Megatron's ``init_state_fn`` for torch's Adam creates ``exp_avg`` and ``exp_avg_sq`` only; the
    distributed optimizer's ``state_dict`` (called by its ``sharded_state_dict`` on load) reads every
    parameter's ``step`` when neither Apex nor Transformer Engine provides the optimizer, so a
    placeholder step is added here; the loaded checkpoint overwrites it.
    """
    for opt in _inner_optimizers(optimizer):
        if hasattr(opt, "init_state_fn") and opt.init_state_fn is not None:
            opt.init_state_fn(opt.optimizer, getattr(opt, "config", None))
            if isinstance(opt.optimizer, torch.optim.Adam):
                for state in opt.optimizer.state.values():
                    state.setdefault("step", torch.zeros((), dtype=torch.float32))


#: How a checkpoint in :data:`DP_RESHARDABLE` format becomes one that any layout loads (train saves a
#: finished run's checkpoint again when resumed so).
CONVERT_TO_FULLY_RESHARDABLE = (
    "resume it once at the layout it was saved at with --dist-ckpt-optim-fully-reshardable (a finished run then "
    "saves its checkpoint again, one that has iterations left at its next save), which any layout loads")


def saved_sharding(train_state: dict) -> str:
    """The distributed optimizer format of the checkpoint whose ``train_state`` this is (checkpoints
    that record none were written in :data:`FULLY_RESHARDABLE` format)."""
    return (train_state.get("optimizer_format") or {}).get("sharding", FULLY_RESHARDABLE)


def _load_distributed_optimizer_state(optimizer, state: dict) -> None:
    """``DistributedOptimizer.load_state_dict`` in two parts, around megatron-core 0.16 limitations.

    With torch's Adam (neither Apex nor Transformer Engine installed) the inner optimizer's state
    holds a ``step`` per parameter once its state dict is loaded, and the parameter-state loader
    copies every state key from the checkpoint's shards, which carry no ``step``. So the step,
    param groups and grad scaler are loaded first, then the sharded parameter state (main weights,
    exp_avg, exp_avg_sq) with the ``step`` entries set aside, under ``no_grad`` (in fp32 the main
    weights are the model's parameters, which the loader copies into in place).
    """
    inner = _inner_optimizers(optimizer)
    if len(inner) != 1:
        raise RuntimeError(f"expected one distributed optimizer, found {len(inner)} chained optimizers")
    opt = inner[0]
    state = dict(state)
    param_state, sharding = state.pop("param_state"), state.pop("param_state_sharding_type")
    opt.load_state_dict(state)
    steps = {param: entry.pop("step") for param, entry in opt.optimizer.state.items() if "step" in entry}
    with torch.no_grad():
        if sharding == DP_RESHARDABLE:
            opt.load_parameter_state_from_dp_reshardable(param_state)
        else:
            opt.load_parameter_state_from_fully_reshardable(param_state)
    for param, step in steps.items():
        opt.optimizer.state[param]["step"] = step


def _untie_step_tensors(optimizer) -> None:
    """After a load every parameter must own its ``step`` tensor (a shared one would be advanced
    once per parameter)."""
    for opt in _inner_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
