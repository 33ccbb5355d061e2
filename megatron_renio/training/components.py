"""Building the pieces of a run: tokenizer, student (DDP), teacher, optimizer, LR schedule, data.

Each function takes the validated :class:`TrainConfig` and returns one piece, or checks one
setting; :mod:`megatron_renio.train` and :mod:`megatron_renio.sft` wire them into their loops. The
builders (models, DDP, optimizer) and the collective checks run after
:func:`megatron_renio.distributed.initialize`; the flag checks, ``loss_settings``, ``resolve_model``,
``paired_vocab`` and ``load_run_tokenizer`` also run before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_renio.config import TrainConfig, lr_decay_iters, template_variables
from megatron_renio.data.prompts import load_prompt_records
from megatron_renio.data.templates import build_prompt_ids
from megatron_renio.data.token_sequences import TokenSequences, sha256_of
from megatron_renio.data.tokenizer import Tokenizer, load_tokenizer
from megatron_renio.distributed import ParallelConfig, log0
from megatron_renio.errors import UserInputError, about_flag
from megatron_renio.losses.divergence import DivergenceConfig
from megatron_renio.models.builder import ModelInfo, build_gpt_model, freeze, padded_vocab_size
from megatron_renio.models.presets import ModelPreset, get_preset
from megatron_renio.renio.weights import ReNIOConfig
from megatron_renio.training.step import LossSettings


def parallel_config(cfg: TrainConfig) -> ParallelConfig:
    return ParallelConfig(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.sequence_parallel)


def samples_per_replica(cfg: TrainConfig, dp_size: int) -> int:
    """--global-batch-size / DP: a data-parallel replica's samples per step, a whole number of
    micro-batches (refused with one line otherwise)."""
    samples, remainder = divmod(cfg.global_batch_size, dp_size)
    if remainder or samples % cfg.micro_batch_size:
        raise UserInputError(f"--global-batch-size {cfg.global_batch_size} is not divisible by --micro-batch-size "
                             f"{cfg.micro_batch_size} x data-parallel size {dp_size}")
    return samples


def model_dtype(cfg: TrainConfig) -> str:
    return "bf16" if cfg.bf16 else "fp32"


def loss_settings(cfg: TrainConfig, training: bool = False) -> LossSettings:
    """Map the loss / ReNIO flags onto the core configs (validated there too). ``--loss sampled_rkl``
    computes the reverse KL's terms: its loss reads only their log-probs, so in ``training`` the
    divergence is computed without ``--kd-token-clip`` and ``--kd-top-k`` (which shape only the
    divergence that score reports)."""
    divergence_unused = training and cfg.loss == "sampled_rkl"
    divergence = DivergenceConfig(
        kind="reverse_kl" if cfg.loss == "sampled_rkl" else cfg.loss, beta=cfg.kd_beta, temperature=cfg.kd_temperature,
        token_clip=None if divergence_unused else cfg.kd_token_clip, top_k=None if divergence_unused else cfg.kd_top_k,
    )
    renio = ReNIOConfig(
        enabled=cfg.renio, clip=cfg.renio_clip, threshold=cfg.renio_threshold, temperature=cfg.renio_temperature,
        norm=cfg.renio_norm, scope=cfg.renio_scope, max_weight=cfg.renio_max_weight,
    )
    divergence.validate()
    renio.validate()
    return LossSettings(divergence, renio, "sampled_rkl" if cfg.loss == "sampled_rkl" else "divergence", cfg.loss_impl)


@dataclass
class ModelSource:
    """Where a model comes from: a converted/trained checkpoint folder, or a preset (random init);
    ``generation_config``: the checkpoint's ``generation_config.json`` (the model's sampling defaults
    and stop ids), if it has one."""

    preset: ModelPreset
    checkpoint: Path | None
    tokenizer_dir: Path | None
    generation_config: Path | None = None


def resolve_model(checkpoint: str | None, preset_name: str | None, load_flag: str, preset_flag: str | None = None
                  ) -> ModelSource:
    """The model that ``checkpoint`` (the value of ``load_flag``) or else preset ``preset_name`` (of
    ``preset_flag``) names; errors name the flag."""
    from megatron_renio.models.checkpoint import read_checkpoint_metadata

    if checkpoint:
        with about_flag(load_flag):
            meta = read_checkpoint_metadata(checkpoint)
        return ModelSource(meta.preset, Path(checkpoint), meta.tokenizer_dir, meta.generation_config)
    if preset_name:
        with about_flag(preset_flag):
            return ModelSource(get_preset(preset_name), None, None)
    raise UserInputError(f"{'/'.join(filter(None, (load_flag, preset_flag)))}: no checkpoint or preset given")


def note_untrained_positions(seq_length: int, role: str, preset: ModelPreset) -> None:
    """Log (rank 0) when ``--seq-length`` reaches positions the model (of ``preset``) never saw in its
    training."""
    if seq_length > preset.max_position_embeddings:
        log0(f"note: --seq-length {seq_length} exceeds the {role}'s max_position_embeddings "
             f"({preset.max_position_embeddings}); positions beyond it were not trained")


def note_local_attention_memory(cfg: TrainConfig, preset: ModelPreset, gpu_without_te: bool | None = None) -> None:
    """Log (rank 0) the size of the attention probabilities that Megatron's local attention (a GPU
    without Transformer Engine; ``gpu_without_te`` None: as this process finds it) keeps per layer for
    backward, [micro-batch, heads / TP, s, s], from 1 GB up and unless ``--recompute-granularity``
    recomputes them: at 8k-16k tokens they do not fit."""
    from megatron_renio.models.builder import use_transformer_engine

    if gpu_without_te is None:
        gpu_without_te = torch.cuda.is_available() and not use_transformer_engine()
    if not gpu_without_te or cfg.recompute_granularity != "none":
        return
    heads = preset.num_attention_heads // cfg.tensor_model_parallel_size
    gigabytes = cfg.micro_batch_size * heads * cfg.seq_length ** 2 * (2 if cfg.bf16 else 4) / 1e9
    if gigabytes >= 1:
        log0(f"note: without transformer-engine the attention keeps [micro-batch, heads, s, s] probabilities for "
             f"backward: {gigabytes:.1f} GB per layer at --seq-length {cfg.seq_length} ({preset.num_layers} layers); "
             "install transformer-engine or pass --recompute-granularity selective")


def fitting_data_label(count: int, unit: str, skipped_too_long: int, seq_length: int) -> str:
    """How many prompts or examples the data gives, for the sampler's "fewer than the batch" error."""
    if not skipped_too_long:
        return f"the prompt data holds {count} {unit}"
    return (f"the prompt data holds {count} {unit} that fit --seq-length {seq_length} "
            f"({skipped_too_long} longer ones skipped)")


def load_run_tokenizer(cfg: TrainConfig, student: ModelSource, teacher: ModelSource | None) -> Tokenizer:
    """``--tokenizer`` or the student checkpoint's copy. A teacher checkpoint's tokenizer must have its
    vocabulary (an error otherwise); a ``--tokenizer`` whose vocabulary differs from the student
    checkpoint's gets a note (its ids would mean other tokens to the student). With ``--tokenizer``,
    generation also stops on the EOS ids of the student checkpoint's own generation config (the ids
    the model was trained to end with)."""
    path = cfg.tokenizer or (student.tokenizer_dir and str(student.tokenizer_dir))
    if not path:
        raise UserInputError("no tokenizer: give --tokenizer (an HF tokenizer folder or a sentencepiece model)")
    with about_flag("--tokenizer" if cfg.tokenizer else None):
        tokenizer = load_tokenizer(path)
    with about_flag("--chat-template-kwargs"):
        tokenizer.set_template_variables(template_variables(cfg.chat_template_kwargs))
    if cfg.tokenizer and student.generation_config is not None:
        tokenizer.add_stop_ids(student.generation_config.parent)
    label = f"--tokenizer {path}" if cfg.tokenizer else f"the student's ({path})"
    if cfg.tokenizer and student.tokenizer_dir is not None:
        if load_tokenizer(str(student.tokenizer_dir)).fingerprint() != tokenizer.fingerprint():
            log0(f"note: the vocabulary of --tokenizer {path} differs from the student checkpoint's tokenizer "
                 f"({student.tokenizer_dir})")
    if teacher is not None and teacher.tokenizer_dir is not None:
        other = load_tokenizer(str(teacher.tokenizer_dir))
        if other.fingerprint() != tokenizer.fingerprint():
            raise UserInputError(
                f"teacher tokenizer ({teacher.tokenizer_dir}) differs from {label}: OPD needs one shared vocabulary"
            )
    for source, who in ((student, "student"), (teacher, "teacher")):
        if source is not None and source.preset.vocab_size < tokenizer.vocab_size:
            raise UserInputError(
                f"{who} model vocabulary ({source.preset.vocab_size}) is smaller than the tokenizer's "
                f"({tokenizer.vocab_size})"
            )
    return tokenizer


def paired_vocab(cfg: TrainConfig, student: ModelPreset, teacher: ModelPreset) -> tuple[int, int]:
    """(padded width to build both models with, the real vocabulary of the rollout and the loss).

    Models of one family may pad their vocabularies differently (DeepSeek-R1-Distill-Qwen-1.5B has
    151,936 rows, -7B 152,064; both tokenizers hold 151,665 ids): both models are built with the
    wider padded width, so that their logits split the same way at any TP size, and only the ids
    that both models hold are real; the rest is padding, masked in both (the tokenizer's ids are
    checked to fit, :func:`load_run_tokenizer`). ``--kd-top-k`` must not exceed the real vocabulary
    (refused here, before the models are built).
    """
    tp = cfg.tensor_model_parallel_size
    width = max(padded_vocab_size(student.vocab_size, tp), padded_vocab_size(teacher.vocab_size, tp))
    real = min(student.vocab_size, teacher.vocab_size)
    if cfg.kd_top_k is not None and cfg.kd_top_k > real:
        raise UserInputError(f"--kd-top-k {cfg.kd_top_k} exceeds the vocabulary that both models hold ({real})")
    return width, real


def recompute_settings(cfg: TrainConfig) -> dict:
    """Megatron ``TransformerConfig`` fields of ``--recompute-granularity`` (Megatron-LM's flags): full
    recomputes whole layers (method and layer count), selective the core attention; none: {}. They act
    in training mode only, so a teacher built with them (in eval mode, under no_grad) keeps none."""
    if cfg.recompute_granularity == "none":
        return {}
    if cfg.recompute_granularity == "selective":
        return {"recompute_granularity": "selective"}
    return {"recompute_granularity": "full", "recompute_method": cfg.recompute_method,
            "recompute_num_layers": cfg.recompute_num_layers}


def check_recompute(cfg: TrainConfig, preset: ModelPreset) -> None:
    """``--recompute-num-layers`` must fit the layers of a pipeline stage (Megatron indexes past the
    stage's last layer otherwise, at the first backward): with ``uniform`` it divides them, with
    ``block`` it is at most their number. One line before the model is built."""
    if cfg.recompute_granularity != "full":
        return
    per_stage = preset.num_layers // cfg.pipeline_model_parallel_size
    n = cfg.recompute_num_layers
    fits = per_stage % n == 0 if cfg.recompute_method == "uniform" else n <= per_stage
    if not fits:
        need = "divide" if cfg.recompute_method == "uniform" else "be at most"
        raise UserInputError(f"--recompute-num-layers {n} must {need} the {per_stage} layers of each pipeline "
                             f"stage with --recompute-method {cfg.recompute_method} ({preset.num_layers} layers, "
                             f"--pipeline-model-parallel-size {cfg.pipeline_model_parallel_size})")


def build_model(source: ModelSource, cfg: TrainConfig, padded_vocab: int | None = None, load_weights: bool = True):
    """A GPTModel for this stage (``padded_vocab``: see ``build_gpt_model``), with the checkpoint's
    weights when there is one and ``load_weights`` (a resume loads its own)."""
    from megatron_renio.models.checkpoint import load_model_checkpoint

    model, info = build_gpt_model(source.preset, parallel_config(cfg), model_dtype(cfg), max_sequence_length=cfg.seq_length,
                                  padded_vocab=padded_vocab, **recompute_settings(cfg))
    if source.checkpoint is not None and load_weights:
        load_model_checkpoint(model, source.checkpoint, cfg.ckpt_fully_parallel_load)
    return model, info


def wrap_ddp(model, use_distributed_optimizer: bool, overlap_grad_reduce: bool = False):
    """Megatron DDP: fp32 gradient buffers, gradients summed (the step divides by its denominator).
    ``overlap_grad_reduce`` (Megatron-LM's ``--overlap-grad-reduce``): each bucket's data-parallel
    reduction starts during the last micro-batch's backward, as soon as its gradients are complete;
    ``finalize_model_grads`` waits for them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model.config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def gradients_are_finite(student_ddp) -> bool:
    """Collective over every rank: True when the float32 sum of squares of every rank's student
    gradient buffers, summed over the world, is finite: no inf or NaN anywhere, and no gradient so
    large that Megatron's gradient norm overflows (it sums the squares of a part of the world: the
    model-parallel shards, once per replica; an entry of about 1.8e19 overflows it alone).

    Checked before the optimizer step because Megatron's optimizer does not check in bf16 without a
    loss scale, nor in fp32: a non-finite gradient would reach Adam (and the weights) before the
    gradient norm shows it, and with an infinite norm gradient clipping scales the gradient to 0 but
    Adam still moves the weights by its momentum. One SUM all-reduce makes every rank agree.
    """
    buffers = [*student_ddp.buffers, *student_ddp.expert_parallel_buffers]
    squares = torch.stack([torch.linalg.vector_norm(buffer.grad_data, dtype=torch.float32).square()
                           for buffer in buffers]).sum().reshape(1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(squares)
    return bool(torch.isfinite(squares).item())


def step_if_finite(optimizer, student_ddp, loss_is_finite: bool) -> tuple[bool, float | None]:
    """(stepped, gradient norm): the optimizer step, taken only when the loss (agreed on every rank)
    and every rank's gradient are finite (:func:`gradients_are_finite`). ``stepped`` is whether Megatron
    updated the weights; the norm it reports is logged as it is."""
    if not (loss_is_finite and gradients_are_finite(student_ddp)):
        return False, None
    updated, grad_norm, _ = optimizer.step()
    return bool(updated), grad_norm


def stop_after_skipped_steps(skipped_in_a_row: int, cfg: TrainConfig, iteration: int) -> None:
    """One line (UserInputError) once ``--max-skipped-steps`` steps in a row were skipped."""
    if skipped_in_a_row >= cfg.max_skipped_steps:
        raise UserInputError(
            f"{skipped_in_a_row} consecutive steps had a non-finite loss or gradient, or a rollout drawn from "
            "non-finite logits "
            f"(--max-skipped-steps {cfg.max_skipped_steps}); stopping at iteration {iteration}"
        )


def build_optimizer(student_ddp, cfg: TrainConfig):
    """Megatron's optimizer (Adam; fused when TE/apex are present) and its LR/WD scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.bf16, params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [student_ddp])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_iters else cfg.lr,
        **schedule_settings(cfg),
        wd_incr_style="constant",
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not cfg.override_opt_param_scheduler,
    )
    return optimizer, scheduler


# The scheduler settings a resume compares with its checkpoint's, and the flags that set them. The
# weight-decay increment length is not compared: the weight decay is constant (wd_incr_style).
_SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                   "lr_decay_style": "--lr-decay-style", "lr_decay_steps": "--lr-decay-iters",
                   "start_wd": "--weight-decay", "end_wd": "--weight-decay"}


def schedule_settings(cfg: TrainConfig) -> dict:
    """The LR / weight-decay settings of Megatron's ``OptimizerParamScheduler`` (constructor arguments
    and the keys of its ``state_dict``) that the flags set."""
    return {"max_lr": cfg.lr, "min_lr": cfg.min_lr, "lr_warmup_steps": cfg.lr_warmup_iters,
            "lr_decay_steps": lr_decay_iters(cfg), "lr_decay_style": cfg.lr_decay_style,
            "start_wd": cfg.weight_decay, "end_wd": cfg.weight_decay, "wd_incr_steps": cfg.train_iters}


def restore_scheduler(optimizer, scheduler, state: dict, cfg: TrainConfig) -> None:
    """A resumed run's LR / weight-decay schedule from the checkpoint's scheduler ``state``, which sets
    every parameter group's rate. With ``--override-opt-param-scheduler`` the flags' settings count,
    ``--lr`` and ``--min-lr`` included: megatron-core keeps ``max_lr`` and ``min_lr`` in each group (one
    value for all groups here), the loaded optimizer state brought the old ones back, and the scheduler
    reads them before its own settings (Megatron-LM issue 1138), so they are set first."""
    if cfg.override_opt_param_scheduler:
        for group in optimizer.param_groups:
            group["max_lr"], group["min_lr"] = cfg.lr, cfg.min_lr
    scheduler.load_state_dict(state)


def check_resumed_schedule(state: dict, cfg: TrainConfig) -> None:
    """Before a resume loads anything: the checkpoint's scheduler ``state`` must have the settings of
    the flags. Megatron's scheduler keeps the checkpoint's settings without a word, so a new ``--lr``
    or decay length would be ignored: a setting that differs is refused in one line naming its flag,
    unless ``--override-opt-param-scheduler`` asks for the new settings. The decay length and the
    minimum LR count only for a decaying LR (a constant one never reads them), so more
    ``--train-iters`` resume a constant-LR run as they are, and a decaying one with
    ``--lr-decay-iters`` set to the saved length.
    """
    if cfg.override_opt_param_scheduler:
        return
    current = schedule_settings(cfg)
    constant = cfg.lr_decay_style == "constant" and state.get("lr_decay_style", "constant") == "constant"
    for key, flag in _SCHEDULE_FLAGS.items():
        if key not in state or state[key] == current[key] or (key in ("lr_decay_steps", "min_lr") and constant):
            continue
        if key == "lr_decay_steps":
            given = "--train-iters (--lr-decay-iters not given)" if cfg.lr_decay_iters is None else flag
            raise UserInputError(
                f"--load {cfg.load}: the learning rate decays over {given} = {current[key]} iterations, but the run "
                f"being resumed decays over {state[key]}; pass --lr-decay-iters {state[key]} to go on with its "
                "schedule, or --override-opt-param-scheduler to take the new one"
            )
        raise UserInputError(
            f"--load {cfg.load}: {flag} sets {key}={current[key]!r} but the run being resumed has "
            f"{state[key]!r}; resume with the same value, or pass --override-opt-param-scheduler"
        )


def build_teacher(cfg: TrainConfig, student_source: ModelSource, teacher_source: ModelSource | None, student,
                  padded_vocab: int | None = None, student_is_initial: bool = True):
    """OPSD fixed/EMA: a frozen copy of the initial student; OPD separate: its own checkpoint/preset.
    ``student_is_initial`` False (a resume, which did not load the student's initial weights): the
    fixed teacher reads them from the student's checkpoint (the EMA teacher is restored from the run's)."""
    from megatron_renio.models.checkpoint import load_model_checkpoint

    if cfg.teacher == "separate":
        teacher, info = build_model(teacher_source, cfg, padded_vocab)
    else:
        teacher, info = build_gpt_model(student_source.preset, parallel_config(cfg), model_dtype(cfg),
                                        max_sequence_length=cfg.seq_length, padded_vocab=padded_vocab)
        if cfg.teacher == "fixed" and not student_is_initial and student_source.checkpoint is not None:
            load_model_checkpoint(teacher, student_source.checkpoint, cfg.ckpt_fully_parallel_load)
        else:
            teacher.load_state_dict(student.state_dict())
    freeze(teacher)
    return teacher, info


@dataclass
class PromptSet:
    """Tokenised prompts of the training data (student and teacher side) and what was skipped.

    ``student[i]`` and ``teacher[i]`` are the prompts of kept record ``i`` (a ``list[int]`` each time
    it is read); every rank holds them all, so they are stored at 4 bytes a token
    (:class:`~megatron_renio.data.token_sequences.TokenSequences`), not as lists of Python ints (~41)."""

    student: TokenSequences
    teacher: TokenSequences
    answers: list[str | None]
    sources: list[str]  # each kept record's "<file>:<line>" (PromptRecord.source)
    skipped_too_long: int
    budget_limited: int = 0  # kept prompts leaving less than --max-new-tokens of --seq-length
    # why prompts were skipped, when the teacher's prompt (OPSD: problem and solution) is what did not fit
    teacher_note: str = ""

    def fingerprint(self) -> str:
        """SHA-256 of both prompt stores (the kept prompts' ids, in order): the prompt order a checkpoint's
        sampler state continues is valid for this data only (:class:`~megatron_renio.data.prompts.PromptSampler`)."""
        return sha256_of(self.student, self.teacher)


def load_prompts(cfg: TrainConfig, tokenizer: Tokenizer) -> PromptSet:
    """Read ``--data-path``, build both prompts per record, drop prompts that cannot fit (counted).

    Each prompt goes into the compact store as it is tokenised: no list of every prompt's ids is built."""
    from megatron_renio.data.batching import filter_long_prompts

    records = load_prompt_records(
        cfg.data_path, cfg.problem_field, cfg.solution_field, cfg.answer_field, require_solution=cfg.mode == "opsd"
    )
    student = TokenSequences(build_prompt_ids(tokenizer, r, cfg.task, "student", cfg.mode) for r in records)
    teacher = TokenSequences(build_prompt_ids(tokenizer, r, cfg.task, "teacher", cfg.mode) for r in records)
    lengths = list(zip(student.lengths(), teacher.lengths()))
    kept = filter_long_prompts(lengths, cfg.seq_length, cfg.max_new_tokens)
    note = _teacher_note(lengths, cfg.seq_length)
    if not kept.kept:
        raise UserInputError(
            f"every prompt of --data-path is longer than --seq-length {cfg.seq_length} allows ({kept.skipped} skipped"
            f"{note})")
    if kept.skipped:  # else every record is kept, in order: the stores are already the result
        student, teacher = student.select(kept.kept), teacher.select(kept.kept)
    return PromptSet(
        student=student,
        teacher=teacher,
        answers=[records[i].answer for i in kept.kept],
        sources=[records[i].source for i in kept.kept],
        skipped_too_long=kept.skipped,
        budget_limited=kept.budget_limited,
        teacher_note=note,
    )


def _teacher_note(pairs: list[tuple[int, int]], seq_length: int) -> str:
    """``; N of them for their teacher prompt alone (...)`` when some records' student prompts fit in
    ``seq_length`` (with one completion token) and their longer teacher prompts (OPSD's problem with its
    solution) do not; else empty. ``pairs``: (student, teacher) prompt lengths per record."""
    alone = sum(s + 1 <= seq_length < t + 1 for s, t in pairs)
    if not alone:
        return ""
    return (f"; {alone} of them for their teacher prompt alone, the problem with its solution: teacher prompts have "
            f"up to {max(t for _, t in pairs)} tokens, student prompts up to {max(s for s, _ in pairs)}")


def model_info_summary(info: ModelInfo) -> str:
    p = info.preset
    return (f"{p.architecture} layers={p.num_layers} hidden={p.hidden_size} heads={p.num_attention_heads}/"
            f"{p.num_query_groups} vocab={p.vocab_size} (padded {info.padded_vocab_size})")


def forward_flops_per_position(preset: ModelPreset, seq_length: int) -> float:
    """Model FLOPs of one forward pass per position of a ``seq_length`` sequence (for the MFU log).

    2 per weight of a matrix multiply (the layers' and the output layer's; the input embedding is a
    lookup; norms and biases are counted too, a rounding error), plus causal attention: scores and
    weighted values over S/2 earlier positions on average, 2 * S * heads * head_dim per layer.
    A training step of the student costs 3 times its forward (backward: 2), the teacher's 1.
    """
    embeddings = preset.vocab_size * preset.hidden_size * (1 if preset.tie_word_embeddings else 2)
    matmul_weights = preset.num_parameters() - embeddings + preset.vocab_size * preset.hidden_size
    attention = 2 * preset.num_layers * seq_length * preset.num_attention_heads * preset.head_dim
    return 2 * matmul_weights + attention


# Dense bf16 datasheet peaks by device name; the first key the name contains decides (the NVL and
# PCIe parts before the SXM part's plain "H200" / "H100").
_PEAK_TFLOPS_BF16 = {"H200 NVL": 835.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                     "A100": 312.0, "L40S": 362.0}


def peak_flops(cfg: TrainConfig) -> float | None:
    """Peak FLOP/s of one device for the MFU log: ``--peak-tflops``, or the bf16 datasheet figure of
    a known GPU when training in bf16; None when unknown (MFU is then not logged)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if not (cfg.bf16 and torch.cuda.is_available()):
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in _PEAK_TFLOPS_BF16.items() if key in name), None)


def check_load_source(cfg: TrainConfig) -> None:
    """``--load`` names a run folder (the ``--save`` folder of a run) and resumes its latest checkpoint.
    It may hold none yet only when it is also ``--save``, as on the first launch of a job that is
    requeued with the same command (the run then starts fresh, as in Megatron-LM); otherwise a folder
    without the ``latest`` marker is refused with one line instead of silently starting over: a
    mistyped path, or a model checkpoint such as one ``iter_*`` folder or a converted model."""
    from megatron_renio.models.checkpoint import METADATA_FILE
    from megatron_renio.training.checkpointing import LATEST, latest_iteration

    if cfg.load is None or latest_iteration(cfg.load) is not None:
        return
    path = Path(cfg.load)
    if (path / METADATA_FILE).is_file():
        run = f"--load {path.parent} (its run folder) to resume, or " if (path.parent / LATEST).is_file() else ""
        raise UserInputError(f"--load {cfg.load} is a model checkpoint, not a run folder: pass {run}"
                             f"--student-load {cfg.load} to start a new run from its weights")
    if cfg.save and path.resolve() == Path(cfg.save).resolve():
        return
    what = "no such folder" if not path.exists() else f"no {LATEST}"
    raise UserInputError(f"--load {cfg.load} holds no checkpoint to resume ({what}); pass the --save folder of "
                         "the run to resume, or leave --load out to start a new run")


def check_resumed_student(cfg: TrainConfig, iteration: int, student: ModelPreset, student_flag: str) -> None:
    """The checkpoint that ``--load`` resumes (``iteration``) holds the architecture of the model
    ``student_flag`` names (token ids and maximum positions may differ, as at load): one line listing
    the fields that differ, at start-up, not after both models are built and loaded."""
    differences = _saved_model_differences(cfg.load, iteration, student)
    if differences:
        raise UserInputError(f"--load {cfg.load}: iteration {iteration} holds another model than {student_flag} "
                             f"(checkpoint vs {student_flag}: {differences}); resume with the run's student")


def _saved_model_differences(root: str, iteration: int, model: ModelPreset) -> str:
    """The fields where the model of checkpoint ``iteration`` of the run folder ``root`` differs from
    ``model``'s architecture (``ModelPreset.architecture_differences``), joined by '; '; empty when
    they are the same model."""
    from megatron_renio.models.checkpoint import read_checkpoint_metadata
    from megatron_renio.training.checkpointing import iteration_dir

    return "; ".join(read_checkpoint_metadata(iteration_dir(root, iteration)).preset.architecture_differences(model))


def check_run_outputs(cfg: TrainConfig) -> None:
    """``--save`` and ``--tensorboard-dir`` can be (or become) folders written in, ``--metrics-file`` a
    file: refused in one line at start-up, not at the first save or log line."""
    from megatron_renio.output_paths import check_log_outputs, check_output_folder

    if cfg.save:
        check_output_folder(cfg.save, f"--save {cfg.save}")
    check_log_outputs(cfg.metrics_file, cfg.tensorboard_dir)


def check_save_target(cfg: TrainConfig, student: ModelPreset) -> None:
    """``--save`` must not silently mix runs: a folder that already holds checkpoints of another
    model is refused unless ``--override-save``; one of the same model needs ``--load`` (resume) or
    ``--override-save`` (start over, older iterations are pruned as new ones are saved); the outputs
    must be writable (:func:`check_run_outputs`). A
    ``--student-load`` / ``--teacher-load`` inside one of its ``iter_*`` folders is refused: the saves
    would delete the model the run starts from (a resume rebuilds a frozen teacher from it)."""
    from megatron_renio.models.checkpoint import is_within
    from megatron_renio.training.checkpointing import latest_iteration

    check_run_outputs(cfg)
    if not cfg.save:
        return
    save = Path(cfg.save).resolve()
    for flag, source in (("--student-load", cfg.student_load), ("--teacher-load", cfg.teacher_load)):
        inside = Path(source).resolve().relative_to(save).parts if source and is_within(source, save) else ()
        if inside and inside[0].startswith("iter_"):
            raise UserInputError(f"{flag} {source} lies inside --save {cfg.save}, whose iter_* folders the run's "
                                 "saves prune (and --override-save replaces): copy it out of --save, or choose "
                                 "another --save")
    if cfg.override_save:
        return
    iteration = latest_iteration(cfg.save)
    if iteration is None:
        return
    differences = _saved_model_differences(cfg.save, iteration, student)
    if differences:  # fields that change no weight (token ids, max positions) do not make another model
        raise UserInputError(
            f"--save {cfg.save} holds checkpoints of another model (checkpoint vs this run: {differences}); "
            "choose another --save or pass --override-save"
        )
    if cfg.load is None or Path(cfg.load).resolve() != Path(cfg.save).resolve():
        raise UserInputError(
            f"--save {cfg.save} already holds iteration {iteration} of a run of this architecture: resume it with "
            f"--load {cfg.save}, or pass --override-save to start over"
        )
