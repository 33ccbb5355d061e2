"""Resuming a run: what its checkpoint's ``train_state`` must agree with, and the state each rank takes.

:func:`check_resumed_settings` refuses, before any model is built, a flag the saved run cannot honour;
:func:`teacher_origin` names (and fingerprints) the frozen teacher every checkpoint records; the
ReNIO normaliser's state is saved per data-parallel replica (:func:`gather_normalizer_states`) and
handed back per replica (:func:`normalizer_state_for_replica`).
"""

from __future__ import annotations

import torch

from megatron_renio.config import TrainConfig, flag_name
from megatron_renio.errors import UserInputError
from megatron_renio.training.checkpointing import CONVERT_TO_FULLY_RESHARDABLE, DP_RESHARDABLE


def gather_normalizer_states(state: dict) -> list[dict]:
    """Every data-parallel replica's ``state`` as its last pipeline stage holds it, in DP-rank order, on
    every rank (collective over the data-parallel and pipeline groups).

    The ReNIO normaliser is used by the loss, which only the last stage computes; in local scope each
    replica's EMA follows its own micro-batches. The checkpoint's ``train_state`` is written by global
    rank 0, a first-stage rank of replica 0.
    """
    from megatron.core import parallel_state

    states = [None] * parallel_state.get_data_parallel_world_size()
    torch.distributed.all_gather_object(states, state, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [states]
        torch.distributed.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                                group=parallel_state.get_pipeline_model_parallel_group())
        states = box[0]
    return states


def normalizer_state_for_replica(states: list[dict] | dict, dp_rank: int) -> dict:
    """The saved normaliser state that data-parallel replica ``dp_rank`` resumes from: its own at the
    same DP size (every TP and PP rank of the replica takes the same one), replica ``dp_rank mod`` the
    saved DP size after a DP change (a local-scope EMA is per replica: more replicas repeat the saved
    ones, fewer keep the first ones). A single dict (checkpoints of earlier versions) serves every replica."""
    return states if isinstance(states, dict) else states[dp_rank % len(states)]


def check_resumed_settings(state: dict, cfg: TrainConfig, origin: dict | None) -> None:
    """Before any model is built, one line for a flag that the run being resumed (its ``train_state``)
    cannot honour: ``--mode`` or ``--teacher`` (they change the prompts or the teacher the run distils
    from), ``--use-distributed-optimizer`` and ``--bf16`` (the optimizer state's layout), another TP/PP
    layout for a distributed optimizer state saved in the format that loads only at its own
    (:data:`~megatron_renio.training.checkpointing.DP_RESHARDABLE`), Adam's betas and epsilon (the checkpoint's optimizer keeps its own), the model the frozen teacher is built from
    (``origin``: :func:`teacher_origin` of this run), and the LR / weight-decay schedule
    (:func:`~megatron_renio.training.components.check_resumed_schedule`). Checkpoints of earlier
    versions record fewer of these; what they lack is not checked."""
    from megatron_renio.training import components as C

    for flag, key in (("--mode", "mode"), ("--teacher", "teacher")):
        saved = state.get(key)
        if saved is not None and saved != getattr(cfg, key):
            raise UserInputError(f"--load {cfg.load}: the run was saved with {flag} {saved}; resume it with the "
                                 f"same {flag} (another one changes the prompts or the teacher it distils from)")
    for flag, key, field in (("--use-distributed-optimizer", "distributed_optimizer", "use_distributed_optimizer"),
                             ("--bf16", "bf16", "bf16")):
        if key in state and state[key] != getattr(cfg, field):
            said = "with" if state[key] else "without"
            raise UserInputError(f"--load {cfg.load}: the run was saved {said} {flag}; resume {said} it (the "
                                 "optimizer state's layout differs)")
    saved_format = state.get("optimizer_format")
    layout = {"tp": cfg.tensor_model_parallel_size, "pp": cfg.pipeline_model_parallel_size}
    if saved_format and saved_format["sharding"] == DP_RESHARDABLE and any(saved_format[k] != v for k, v in layout.items()):
        raise UserInputError(
            f"--load {cfg.load}: its distributed optimizer state was saved without --dist-ckpt-optim-fully-reshardable "
            f"(Megatron's {DP_RESHARDABLE} format), which loads only at the TP/PP it was saved at: resume with "
            f"--tensor-model-parallel-size {saved_format['tp']} --pipeline-model-parallel-size {saved_format['pp']} "
            f"(any DP size); to change the layout, {CONVERT_TO_FULLY_RESHARDABLE}")
    for key, saved in state.get("adam", {}).items():
        if saved != getattr(cfg, key):
            flag = flag_name(key)
            raise UserInputError(f"--load {cfg.load}: the run was saved with {flag} {saved:g}, which its optimizer "
                                 f"state keeps; resume with the same value, not {getattr(cfg, key):g}")
    saved_origin = state.get("teacher_origin")
    if saved_origin and origin and saved_origin["identity"] != origin["identity"] and not cfg.override_teacher_check:
        raise UserInputError(
            f"--load {cfg.load}: the run's frozen teacher was built from {saved_origin['flag']} "
            f"{saved_origin['source']}, but {origin['flag']} {origin['source']} holds another "
            f"model; resume with the run's {saved_origin['flag']} (the teacher must stay the one it distils from), "
            "or pass --override-teacher-check if it holds the same weights saved another way")
    C.check_resumed_schedule(state.get("scheduler", {}), cfg)


def teacher_origin(cfg: TrainConfig, student_source, teacher_source) -> dict | None:
    """What the frozen teacher is built from, recorded in every checkpoint and compared on resume: the
    initial student (``--teacher fixed``) or ``--teacher-load`` / ``--teacher-model`` (``separate``), as
    {'flag', 'source', 'identity'}; a checkpoint's identity is its
    :func:`~megatron_renio.models.checkpoint.checkpoint_fingerprint`, computed on global rank 0 only
    and broadcast (a collective). None for ``--teacher ema``, whose teacher the checkpoint holds."""
    from megatron_renio.distributed import on_rank0
    from megatron_renio.models.checkpoint import checkpoint_fingerprint

    if cfg.teacher == "ema":
        return None
    if cfg.teacher == "fixed":
        flag, value = (("--student-load", student_source.checkpoint) if student_source.checkpoint
                       else ("--model", cfg.model))
    else:
        flag, value = (("--teacher-load", teacher_source.checkpoint) if teacher_source.checkpoint
                       else ("--teacher-model", cfg.teacher_model))
    if flag.endswith("-model"):  # a preset: random initialisation from --seed (the sampler state compares
        # it), which depends on the layout
        layout = f"TP {cfg.tensor_model_parallel_size}, PP {cfg.pipeline_model_parallel_size}"
        return {"flag": flag, "source": f"{value} at {layout}", "identity": f"preset {value} at {layout}"}

    def fingerprint() -> str:
        try:
            return checkpoint_fingerprint(value)
        except (OSError, ValueError) as e:
            raise UserInputError(f"{flag} {value}: cannot read it to fingerprint ({e})") from e

    return {"flag": flag, "source": str(value), "identity": on_rank0(fingerprint)}
