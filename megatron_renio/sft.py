"""Supervised fine-tuning on reference solutions: ``python -m megatron_renio.sft [flags]``.

    torchrun --nproc-per-node N -m megatron_renio.sft --model PRESET | --pretrained-checkpoint CKPT \\
        --tokenizer TOK --data-path train.jsonl --save OUT [Megatron flags]

Each example is the student prompt of :mod:`megatron_renio.data.templates` (the same text the
distillation trainer's student reads) followed by the record's reference solution and EOS; the
loss is the token mean of Megatron's ``vocab_parallel_cross_entropy`` over the solution tokens
(EOS included) of the whole global batch: every micro-batch hands Megatron's schedule its summed
loss and its token count (``calculate_per_token_loss``), and ``finalize_model_grads`` divides the
DP-summed gradients by the DP-summed count. Padded vocabulary rows are masked to -inf first.

``--privileged-prompt-fraction F`` adds, for a seeded choice of ``F`` x the records, a second
example whose prompt is the OPSD teacher prompt (problem + worked solution + transition text): a
model trained this way has learnt to use a worked solution in its context, which is what an OPSD
teacher (the initial student given the solution) relies on.

Everything else is the distillation trainer's machinery (:mod:`megatron_renio.training.components`):
the same layouts (TP, PP, SP, DP = world / (TP x PP)), Megatron DDP, Megatron optimizer, LR
schedule, seeding, metrics logger and progress bar. The flags are the trainer's flags of the same
name (listed in :data:`SFT_FLAGS`, same types and checks) plus ``--pretrained-checkpoint`` (initial
weights: a model checkpoint folder; ``--model`` starts from a random initialisation instead) and
``--privileged-prompt-fraction``. At the end ``--save`` receives a model checkpoint
(:func:`~megatron_renio.models.checkpoint.save_model_checkpoint`, tokenizer included) that
``--student-load`` / ``--teacher-load`` read; it must not exist or be empty. There is no
intermediate save and no resume. Metrics go to ``--metrics-file`` (a new JSONL file), TensorBoard and W&B.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch

from megatron_renio.config import (TrainConfig, _OneLineErrorParser, build_parser, inert_notes, pad_multiple, path_arg,
                                   validate)
from megatron_renio.data.token_sequences import TokenSequences, sha256_of
from megatron_renio.entrypoint import run_command
from megatron_renio.errors import UserInputError
from megatron_renio.models.checkpoint import check_target_directory, is_within
from megatron_renio.output_paths import check_log_outputs

# The trainer's flags that supervised fine-tuning takes (same meaning, type and range checks).
SFT_FLAGS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel",
    "recompute_granularity", "recompute_method", "recompute_num_layers",
    "micro_batch_size", "global_batch_size", "seq_length",
    "lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "weight_decay", "clip_grad",
    "adam_beta1", "adam_beta2", "adam_eps", "train_iters", "use_distributed_optimizer", "overlap_grad_reduce",
    "bf16", "seed", "ckpt_fully_parallel_load",
    "model", "tokenizer", "chat_template_kwargs", "data_path", "task", "problem_field", "solution_field",
    "save", "log_interval", "tensorboard_dir", "wandb_project", "metrics_file",
    "distributed_timeout_minutes", "max_skipped_steps", "debug",
)
# Whole help texts of the flags whose trainer text says something untrue of fine-tuning.
SFT_HELP = {
    "tokenizer": "tokenizer folder (without it: the --pretrained-checkpoint's); default: none",
    "data_path": "records with a problem and its reference solution: JSONL (.jsonl, .jsonl.gz) or parquet; required",
    "model": "named preset, randomly initialised (instead of --pretrained-checkpoint); default: none",
    "solution_field": "field holding the reference solution, the training target; default: solution",
    "task": "prompt template and answer format of the targets; one of math, coding; default: math",
    "save": "folder that receives the fine-tuned model checkpoint, new or empty; required",
    "metrics_file": "JSONL of the step metrics, a new file; default: none",
    "distributed_timeout_minutes": "minutes a collective may wait for the other ranks before the run fails; "
                                   "default: 60",
}


@dataclass
class SFTConfig:
    """``train`` holds the shared flags (validated by :func:`megatron_renio.config.validate`);
    ``--pretrained-checkpoint`` is stored there as ``student_load``, the field the component
    builders read."""

    train: TrainConfig
    privileged_prompt_fraction: float = 0.0


def build_sft_parser() -> argparse.ArgumentParser:
    """The trainer's parser actions for :data:`SFT_FLAGS` plus the two SFT flags."""
    parser = _OneLineErrorParser(prog="megatron_renio.sft", description=__doc__.splitlines()[0])
    shared = {action.dest: action for action in build_parser()._actions}  # a new parser: its actions are ours
    for name in SFT_FLAGS:  # the very same actions: same flag names, types and checks
        action = shared[name]
        action.help = SFT_HELP.get(name, action.help)
        parser._add_action(action)
    parser.add_argument("--pretrained-checkpoint", type=path_arg, default=argparse.SUPPRESS,
                        help="model checkpoint folder with the initial weights (instead of --model)")
    parser.add_argument("--privileged-prompt-fraction", type=float, default=argparse.SUPPRESS,
                        help="fraction of records also trained with the OPSD teacher prompt (0..1); default: 0")
    return parser


def parse_sft_args(argv: list[str] | None = None) -> SFTConfig:
    """Parse and validate; bad values raise :class:`UserInputError` naming the flag."""
    values = vars(build_sft_parser().parse_args(argv))
    fraction = values.pop("privileged_prompt_fraction", 0.0)
    checkpoint = values.pop("pretrained_checkpoint", None)
    if checkpoint and values.get("model"):
        raise UserInputError("give either --pretrained-checkpoint or --model, not both")
    if not (checkpoint or values.get("model")):
        raise UserInputError("no model: give --model (a preset, random initialisation) or --pretrained-checkpoint")
    if not values.get("save"):
        raise UserInputError("--save is required (the folder that receives the fine-tuned model checkpoint)")
    check_target_directory(values["save"], label=f"--save {values['save']}",  # refused now, not after training
                           overwrite_flag=None)
    check_log_outputs(values.get("metrics_file"), values.get("tensorboard_dir"))
    for name in ("metrics_file", "tensorboard_dir"):  # they would fill --save before the model is written there
        if values.get(name) and is_within(values[name], values["save"]):
            raise UserInputError(f"--{name.replace('_', '-')} {values[name]} is inside --save {values['save']}, "
                                 "which receives only the model checkpoint; choose a path outside it")
    metrics = values.get("metrics_file")
    if metrics and os.path.isfile(metrics) and os.path.getsize(metrics):  # SFT has no resume to continue it
        raise UserInputError(f"--metrics-file {metrics} holds an earlier run's metrics; remove it or choose "
                             "another path (fine-tuning starts a new file)")
    if not 0.0 <= fraction <= 1.0:
        raise UserInputError(f"--privileged-prompt-fraction must be in [0, 1], got {fraction!r}")
    # SFT generates nothing: the rollout budget only has to pass the trainer's check against --seq-length.
    train = TrainConfig(**values, student_load=checkpoint, max_new_tokens=1)
    validate(train)
    return SFTConfig(train, fraction)


@dataclass
class SFTExamples:
    """Token ids of every example: prompt, and target (solution + EOS); what did not fit is counted."""

    prompts: TokenSequences  # each read back as a list[int]; held at 4 bytes a token on every rank
    targets: TokenSequences
    skipped_too_long: int


def load_sft_examples(cfg: SFTConfig, tokenizer) -> SFTExamples:
    """Read ``--data-path`` (solutions required) and build the examples (module docstring).

    Examples longer than ``--seq-length`` are skipped and counted; :class:`UserInputError` when none
    is left."""
    from megatron_renio.data.prompts import load_prompt_records
    from megatron_renio.data.templates import answer_text, build_prompt_ids

    t = cfg.train
    records = load_prompt_records(t.data_path, t.problem_field, t.solution_field, answer_field=None,
                                  require_solution=True)  # SFT trains on solutions: answers are not read
    privileged = random.Random(t.seed).sample(range(len(records)), round(cfg.privileged_prompt_fraction * len(records)))
    # every record's student prompt, then the privileged records' teacher prompts; each example goes
    # into the compact stores as it is tokenised
    roles = [(r, "student") for r in records] + [(records[i], "teacher") for i in sorted(privileged)]
    prompts, targets = TokenSequences(), TokenSequences()
    for record, role in roles:
        prompt = build_prompt_ids(tokenizer, record, t.task, role, "opsd")
        target = tokenizer.encode(answer_text(record.solution, t.task)) + [tokenizer.eos_id]
        if len(prompt) + len(target) <= t.seq_length:
            prompts.append(prompt)
            targets.append(target)
    if not prompts:
        raise UserInputError(f"every example of --data-path is longer than --seq-length {t.seq_length}")
    return SFTExamples(prompts, targets, len(roles) - len(prompts))


class SFTStep:
    """Forward/backward of one optimizer step over a list of micro-batches (``ModelInputs``)."""

    def __init__(self, model_ddp, true_vocab_size: int):
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        self.model = model_ddp
        self.true_vocab_size = true_vocab_size
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        config = model_ddp.config
        config.calculate_per_token_loss = True
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model_ddp.no_sync
        self._sums: list[torch.Tensor] = []

    def _forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        return model(mb.tokens, mb.position_ids, attention_mask=None), partial(self._loss, mb)

    def _loss(self, mb, logits: torch.Tensor):
        """Summed cross entropy over the masked tokens and their count (Megatron's per-token-loss form)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        from megatron_renio.renio.vocab_parallel import VocabShard

        shard = VocabShard.for_rank(logits.shape[-1], self.true_vocab_size, self.tp_group)
        # masked_fill makes a new tensor: vocab_parallel_cross_entropy shifts its fp32 input in place.
        logits = logits.float().masked_fill(~shard.valid_mask(logits.device), float("-inf"))
        losses = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), mb.labels.transpose(0, 1).contiguous())
        mask = mb.loss_mask.transpose(0, 1)
        loss_sum = torch.where(mask > 0, losses, 0.0).sum()
        num_tokens = mask.sum().to(torch.int)
        self._sums.append(torch.stack([loss_sum.detach().double(), num_tokens.double()]))
        return loss_sum, num_tokens, {}

    def run(self, micro_batches: list) -> float:
        """Run the schedule over micro-batches of one size, each of its own padded length; return the
        step's token-mean loss, the same on every rank."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_renio.training.step import schedule_seq_length

        device = next(self.model.parameters()).device
        self._sums = []
        seq_length = schedule_seq_length(self.model.config, [mb.tokens.shape[1] for mb in micro_batches],
                                         parallel_state.get_pipeline_model_parallel_world_size() > 1)
        get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter([mb.to(device) for mb in micro_batches]),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batches[0].tokens.shape[0],
        )
        sums = torch.stack(self._sums).sum(0) if self._sums else torch.zeros(2, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(sums, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        return float(sums[0] / sums[1].clamp(min=1))


def run(cfg: SFTConfig) -> list[float]:
    """Fine-tune for ``--train-iters`` steps and save; returns every step's loss (the loss of the
    batch *before* that step's update). Initialises the process group and Megatron's parallel state
    (a caller may run it again with another layout); :func:`main` tears them down."""
    from megatron_renio import distributed
    from megatron_renio.data.batching import pack_pairs
    from megatron_renio.data.prompts import PromptSampler
    from megatron_renio.models.checkpoint import save_model_checkpoint
    from megatron_renio.output_paths import check_shared_folder
    from megatron_renio.distributed import log0
    from megatron_renio.training.run_logs import ConsoleProgress, MetricsLogger, norm_text
    from megatron_renio.training import components as C

    t = cfg.train
    ctx = distributed.initialize(C.parallel_config(t), t.seed, distributed.fingerprint(cfg), t.distributed_timeout_minutes)
    # refuses a batch that does not split into micro-batches per replica
    distributed.on_every_rank(lambda: C.samples_per_replica(t, ctx.dp_size))
    check_shared_folder(t.save, f"--save {t.save}")  # every rank writes its shards of the model there

    def resolve_model():
        """The model's source and the checks of its shape against the layout (on every rank alike: rank 0
        alone prints a refusal)."""
        from megatron_renio.models.builder import check_divisibility

        source = C.resolve_model(t.student_load, t.model, "--pretrained-checkpoint", "--model")
        check_divisibility(source.preset, C.parallel_config(t))
        C.note_untrained_positions(t.seq_length, "model", source.preset)
        C.check_recompute(t, source.preset)
        C.note_local_attention_memory(t, source.preset)
        return source

    source = distributed.on_every_rank(resolve_model)
    for note in inert_notes(t):  # the schedule's, as train notes them (the others' flags sft does not take)
        log0(f"note: {note}")

    def load_data():
        tokenizer = C.load_run_tokenizer(t, source, None)
        return tokenizer, load_sft_examples(cfg, tokenizer)

    tokenizer, examples = distributed.same_on_every_rank(
        load_data, lambda loaded: sha256_of(loaded[1].prompts, loaded[1].targets),
        "the tokenised examples of --data-path")
    if examples.skipped_too_long:
        log0(f"skipped {examples.skipped_too_long} examples longer than --seq-length {t.seq_length}")
    # refuses fewer examples than a batch before the model is built
    sampler = distributed.on_every_rank(lambda: PromptSampler(
        len(examples.prompts), t.global_batch_size, ctx.dp_rank, ctx.dp_size, t.seed,
        data_label=C.fitting_data_label(len(examples.prompts), "examples", examples.skipped_too_long, t.seq_length)))
    model, info = C.build_model(source, t)
    model_ddp = C.wrap_ddp(model, t.use_distributed_optimizer, t.overlap_grad_reduce)
    optimizer, scheduler = C.build_optimizer(model_ddp, t)
    step = SFTStep(model_ddp, info.preset.vocab_size)
    log0(f"sft: {C.model_info_summary(info)}; {len(examples.prompts)} examples")
    losses = []
    skipped_in_a_row = 0
    # The logger is closed also when the run stops with an error, so that its last steps' metrics are
    # written out; save=None: --save is the model checkpoint folder, where no metrics go by default.
    with contextlib.closing(MetricsLogger(dataclasses.replace(t, save=None))) as logger, \
            ConsoleProgress("sft", t.train_iters, 0, t.log_interval) as progress:
        for iteration in range(1, t.train_iters + 1):
            t0 = time.perf_counter()
            indices = sampler.next_batch()
            prompts = [examples.prompts[i] for i in indices]
            # The student side of a (prompt, prompt, target) pair is a causal-LM example with its loss
            # mask on the target tokens.
            batch = pack_pairs(prompts, prompts, [examples.targets[i] for i in indices], tokenizer.eos_id,
                               tokenizer.pad_id, t.seq_length, pad_multiple(t))
            micro = [mb.student for mb in batch.micro_batches(t.micro_batch_size, pad_multiple(t))]
            model_ddp.zero_grad_buffer()
            optimizer.zero_grad()
            loss = step.run(micro)
            updated, grad_norm = C.step_if_finite(optimizer, model_ddp, math.isfinite(loss))
            if updated:
                scheduler.step(increment=1)
                skipped_in_a_row = 0
            else:
                skipped_in_a_row += 1
            losses.append(loss)
            lr = scheduler.get_lr(optimizer.param_groups[0])  # after the update, as Megatron-LM logs it
            logger.log(iteration, {"loss": loss, "skipped": not updated,
                                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                   "lr": lr, "time_step_s": time.perf_counter() - t0})
            progress.update(iteration, {"loss": f"{loss:.4g}", "grad norm": norm_text(grad_norm), "lr": f"{lr:.3g}"})
            C.stop_after_skipped_steps(skipped_in_a_row, t, iteration)  # once the step that stops the run is logged
    save_model_checkpoint(
        model, info, t.save, tokenizer_dir=t.tokenizer or source.tokenizer_dir, generation_config=source.generation_config,
        extra_metadata={"source": "megatron_renio.sft", "iterations": t.train_iters,
                        "final_loss": losses[-1], "data_path": list(t.data_path)},
    )
    log0(f"saved the fine-tuned model to {t.save}")
    return losses


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megatron-renio sft``; returns the exit status (0, or 2 on bad input)."""
    return run_command(parse_sft_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
