"""On-policy (self-)distillation with ReNIO: the training entry point.

    torchrun --nproc-per-node N -m megatron_renio.train [--config run.yaml] [flags]

One iteration: every data-parallel rank takes its share of the global batch of prompts, the
student samples completions on its live Megatron weights (KV cache, TP/PP as trained), the pairs
(student prompt | completion) and (teacher prompt | completion) go through one Megatron
``forward_backward`` schedule with the ReNIO-weighted distillation loss, and Megatron's optimizer
steps. Flags are documented in :mod:`megatron_renio.config`.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import torch

from megatron_renio.config import TrainConfig, inert_notes, pad_multiple, parse_train_args
from megatron_renio.distributed import log0
from megatron_renio.entrypoint import run_command
from megatron_renio.renio.weights import batch_mean_weight_bound
from megatron_renio.training import resume, run_logs
from megatron_renio.training.exit_conditions import ExitConditions
from megatron_renio.training.faults import SLOW_ROLLOUT_S, fault_spec, injected, maybe_die


def _renio_notes(cfg: TrainConfig) -> list[str]:
    """ReNIO settings that leave the weights or their cap without effect: in local scope batch_mean and
    clamp divide by the micro-batch's mean (one sample: every weight 1); batch_mean's cap binds only
    above the largest ratio to that mean (``batch_mean_weight_bound``)."""
    if not cfg.renio or cfg.renio_norm not in ("batch_mean", "clamp"):
        return []
    if cfg.renio_scope == "local" and cfg.micro_batch_size == 1:
        return [f"with --renio-scope local, --renio-norm {cfg.renio_norm} and --micro-batch-size 1 every ReNIO weight "
                "is 1 (a sample is its own micro-batch's mean); use --renio-scope global or a larger micro-batch"]
    if cfg.renio_norm != "batch_mean":
        return []
    bound = batch_mean_weight_bound(cfg.renio_clip, cfg.renio_threshold, cfg.renio_temperature, cfg.micro_batch_size)
    if cfg.renio_max_weight >= bound:
        return [f"--renio-max-weight {cfg.renio_max_weight:g} cannot bind with --micro-batch-size "
                f"{cfg.micro_batch_size}: a weight is at most {bound:.4g} times its micro-batch's mean here "
                "(one sample at exp(clip / temperature), the others at their smallest weight)"]
    return []


def _loss_notes(cfg: TrainConfig) -> list[str]:
    """Loss settings a user should know the cost or bias of: --loss jsd at --kd-beta 0 or 1 (its default
    is 0) is exactly the forward or reverse KL; --kd-top-k runs the unfused loss on gathered
    full-vocabulary copies of the completion rows; --loss sampled_rkl estimates the reverse KL's gradient
    at --kd-temperature only from completions sampled from that same distribution (another rollout
    temperature, top-p or top-k biases it)."""
    notes = []
    if cfg.loss == "jsd" and cfg.kd_beta in (0, 1):
        same = "forward_kl" if cfg.kd_beta == 0 else "reverse_kl"
        notes.append(f"--loss jsd with --kd-beta {cfg.kd_beta:g} is the --loss {same} (the mixture is one of the two "
                     "models); pass --kd-beta between 0 and 1 (0.5: the symmetric JSD) to mix them")
    if cfg.kd_top_k is not None and cfg.loss != "sampled_rkl":
        notes.append(f"--kd-top-k {cfg.kd_top_k} is not fused: the loss gathers full-vocabulary copies of the "
                     "completion rows (more time and memory than without it)")
    if cfg.loss != "sampled_rkl":
        return notes
    changes = []
    if cfg.rollout_temperature != cfg.kd_temperature:
        changes.append(f"--rollout-temperature {cfg.rollout_temperature:g} (--kd-temperature {cfg.kd_temperature:g})")
    if cfg.rollout_top_p < 1:
        changes.append(f"--rollout-top-p {cfg.rollout_top_p:g}")
    if cfg.rollout_top_k:
        changes.append(f"--rollout-top-k {cfg.rollout_top_k}")
    if changes:
        notes.append(f"--loss sampled_rkl with {', '.join(changes)}: completions are not sampled from the "
                     "distribution the loss compares, so the sampled-token loss is a biased estimate of the reverse KL")
    return notes


def _save_notes(cfg: TrainConfig) -> list[str]:
    """Checkpoint settings that write nothing: an interval without a folder (Megatron-LM ignores it too)."""
    if cfg.save_interval and not cfg.save:
        return [f"--save-interval {cfg.save_interval} without --save: no checkpoint is written"]
    return []


def _step_counts(completions: list[list[int]], eos: list[int], limits: list[int], generated: int,
                 positions: int, flops: float, rollout_seconds: float, device) -> dict[str, float]:
    """This step's rollout and batch counts summed over the data-parallel replicas (collective over the
    DP group; every rank of a replica holds the same completions): completions, their total and largest
    length, those cut at their limit (``--max-new-tokens``, or what the longer prompt leaves of
    ``--seq-length``) without a stop id, tokens generated, sequence positions
    computed by one model (padding included), and the model FLOPs of the replica's batch; and the
    slowest replica's rollout time (the others wait for it here, the replicas' first collective after
    their rollouts: the forward-backward timer starts after this)."""
    from megatron.core import parallel_state

    lengths = [len(c) for c in completions]
    cut = sum(n >= limit and (not c or c[-1] not in eos) for n, limit, c in zip(lengths, limits, completions))
    sums = torch.tensor([len(lengths), sum(lengths), cut, generated, positions, flops], dtype=torch.float64,
                        device=device)
    maxima = torch.tensor([max(lengths, default=0), rollout_seconds], dtype=torch.float64, device=device)
    group = parallel_state.get_data_parallel_group()
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=group)
    count, total, cut, generated, positions, flops = sums.tolist()
    longest, rollout_seconds = maxima.tolist()
    return {"completions": count, "length_sum": total, "cut": cut, "generated": generated, "positions": positions,
            "flops": flops, "longest": longest, "rollout_seconds": rollout_seconds}


def rows_of_prompts(indices: list[int], samples_per_prompt: int) -> list[int]:
    """The prompt record of each row of a step's batch: ``samples_per_prompt`` consecutive rows per
    index of ``indices`` (the student's and the teacher's prompts, and the saved samples, all read it)."""
    return [i for i in indices for _ in range(samples_per_prompt)]


def run(cfg: TrainConfig) -> dict:
    """Train for ``cfg.train_iters`` iterations; returns the last step's metrics."""
    started = time.monotonic()  # --exit-duration-in-mins counts model and checkpoint loading too
    from megatron_renio import distributed

    distributed.quiet_megatron_notices()
    from megatron_renio.data.batching import pack_pairs
    from megatron_renio.data.prompts import PromptSampler
    from megatron_renio.models.builder import check_divisibility
    from megatron_renio.renio.weights import ReNIONormalizer
    from megatron_renio.rollout.generate import generate
    from megatron_renio.rollout.sampling import SamplingConfig
    from megatron_renio.training import components as C
    from megatron_renio.output_paths import check_every_rank_sees, check_shared_folder
    from megatron_renio.training.checkpointing import (DP_RESHARDABLE, iteration_dir, load_training_checkpoint,
                                                       read_train_state, restore_set_aside_checkpoint,
                                                       save_training_checkpoint, saved_sharding, wait_for_pruning)
    from megatron_renio.training.ema import EmaTeacher
    from megatron_renio.training.paired import PairedModel
    from megatron_renio.training.save_lock import claim_save_folder, release_save_folder
    from megatron_renio.training.step import DistillationStep

    settings = C.loss_settings(cfg, training=True)
    sampling = SamplingConfig(temperature=cfg.rollout_temperature, top_p=cfg.rollout_top_p,
                              top_k=cfg.rollout_top_k, max_new_tokens=cfg.max_new_tokens)
    sampling.validate()
    fault_spec()
    ctx = distributed.initialize(C.parallel_config(cfg), cfg.seed, distributed.fingerprint(cfg),
                                 cfg.distributed_timeout_minutes)

    def resolve_models():
        """The check of the batch against the layout, then both models' sources (every rank reads them)."""
        samples = C.samples_per_replica(cfg, ctx.dp_size)
        student = C.resolve_model(cfg.student_load, cfg.model, "--student-load", "--model")
        teacher = (C.resolve_model(cfg.teacher_load, cfg.teacher_model, "--teacher-load", "--teacher-model")
                   if cfg.teacher == "separate" else None)
        return samples, student, teacher

    samples_per_rank, student_source, teacher_source = distributed.on_every_rank(resolve_models)

    def read_run_folders() -> dict | None:
        """On rank 0: the checks of --load and --save, and the train_state to resume (None: a new run).
        A --save that another run holds is refused first (the lock of a folder that has its lock file)."""
        if cfg.save:
            claim_save_folder(cfg.save, create=False)  # a file system that does not lock: noted below
            if cfg.load and Path(cfg.load).resolve() == Path(cfg.save).resolve():
                restored = restore_set_aside_checkpoint(cfg.save)
                if restored:
                    log0(f"note: {restored}")
        C.check_load_source(cfg)
        C.check_save_target(cfg, student_source.preset)
        state = read_train_state(cfg.load) if cfg.load else None
        if state is None:
            run_logs.check_new_run_logs(cfg, requeued=bool(cfg.load))
        return state

    # Every rank acts on what rank 0 found, and must see the same folders: separate decisions on
    # storage that nodes mount on their own would send ranks into different collectives.
    saved = distributed.on_rank0(read_run_folders)
    if cfg.save:
        check_shared_folder(cfg.save, f"--save {cfg.save}")
    if saved is not None:
        check_every_rank_sees(iteration_dir(cfg.load, saved["iteration"]) / "train_state.pt", f"--load {cfg.load}")
        distributed.on_rank0(lambda: C.check_resumed_student(cfg, saved["iteration"], student_source.preset,
                                                             "--student-load" if cfg.student_load else "--model"))
    teacher_origin = resume.teacher_origin(cfg, student_source, teacher_source)

    def check_models() -> tuple[int, int]:
        """Every rank checks the same values alike (rank 0 alone prints a refusal); returns the paired
        vocabulary (padded width, real size)."""
        if saved is not None:
            resume.check_resumed_settings(saved, cfg, teacher_origin)  # before any model is built
        for role, source in (("student", student_source), ("teacher", teacher_source)):
            if source is not None:
                check_divisibility(source.preset, C.parallel_config(cfg), role)  # names the model, before building
                C.note_untrained_positions(cfg.seq_length, role, source.preset)
        C.check_recompute(cfg, student_source.preset)
        C.note_local_attention_memory(cfg, student_source.preset)
        return C.paired_vocab(cfg, student_source.preset, (teacher_source or student_source).preset)

    padded_vocab, true_vocab = distributed.on_every_rank(check_models)

    def load_data():
        tokenizer = C.load_run_tokenizer(cfg, student_source, teacher_source)
        prompts = C.load_prompts(cfg, tokenizer)
        return tokenizer, prompts, prompts.fingerprint()

    tokenizer, prompts, data_fingerprint = distributed.same_on_every_rank(
        load_data, lambda loaded: loaded[2], "the tokenised prompts of --data-path")
    log0(f"data: {len(prompts.student)} prompts from --data-path {' '.join(cfg.data_path)}")
    if prompts.skipped_too_long:
        log0(f"skipped {prompts.skipped_too_long} prompts longer than --seq-length {cfg.seq_length} allows"
             f"{prompts.teacher_note}")
    if prompts.budget_limited:
        log0(f"note: {prompts.budget_limited} prompts leave fewer than --max-new-tokens {cfg.max_new_tokens} tokens "
             f"of --seq-length {cfg.seq_length}; their completions end there")
    for note in inert_notes(cfg) + _renio_notes(cfg) + _loss_notes(cfg) + _save_notes(cfg):
        log0(f"note: {note}")
    prompts_per_step = cfg.global_batch_size // cfg.samples_per_prompt
    batch_label = (f"--global-batch-size {cfg.global_batch_size} / --samples-per-prompt {cfg.samples_per_prompt} = "
                   f"{prompts_per_step} prompts per step" if cfg.samples_per_prompt > 1 else None)
    data_label = C.fitting_data_label(len(prompts.student), "prompts", prompts.skipped_too_long, cfg.seq_length)

    def data_sampler():
        sampler = PromptSampler(len(prompts.student), prompts_per_step, ctx.dp_rank, ctx.dp_size, cfg.seed,
                                batch_label, data_label, data_fingerprint)
        if saved is not None:
            sampler.load_state_dict(saved["sampler"])  # refuses other data or another seed before the models load
        return sampler

    sampler = distributed.on_every_rank(data_sampler)
    # a resume loads the student's weights from its checkpoint: the initial ones are not read for it
    student, student_info = C.build_model(student_source, cfg, padded_vocab, load_weights=saved is None)
    teacher, teacher_info = C.build_teacher(cfg, student_source, teacher_source, student, padded_vocab,
                                            student_is_initial=saved is None)
    ema = EmaTeacher(teacher, cfg.ema_decay) if cfg.teacher == "ema" else None
    student_ddp = C.wrap_ddp(student, cfg.use_distributed_optimizer, cfg.overlap_grad_reduce)
    optimizer, scheduler = C.build_optimizer(student_ddp, cfg)
    paired = PairedModel(student_ddp, teacher, student_info.preset.hidden_size, teacher_info.preset.hidden_size)
    normalizer = ReNIONormalizer()
    step_runner = DistillationStep(paired, [student_ddp], settings, normalizer, true_vocab)
    log0(f"student: {C.model_info_summary(student_info)}; teacher ({cfg.teacher}): {C.model_info_summary(teacher_info)}")

    iteration, skipped_total, skipped_in_a_row = 0, 0, 0
    if saved is not None:  # the checkpoint whose settings were checked before the models were built
        load_training_checkpoint(cfg.load, saved, student=student, optimizer=optimizer, teacher=ema,
                                 fully_parallel=cfg.ckpt_fully_parallel_load)
        iteration = saved["iteration"]
        skipped_total = saved["skipped_total"]
        skipped_in_a_row = saved.get("skipped_in_a_row", 0)  # --max-skipped-steps counts across a requeue
        normalizer.load_state_dict(resume.normalizer_state_for_replica(saved["normalizer"], ctx.dp_rank))
        C.restore_scheduler(optimizer, scheduler, saved["scheduler"], cfg)
        log0(f"resumed from {cfg.load} at iteration {iteration}")
    elif cfg.load:
        log0(f"no checkpoint in {cfg.load} yet: starting a new run")

    # once every check of the input has passed (bad input leaves --save as it was), before this run
    # writes there: a second run on the same --save is refused
    if cfg.save:
        note = distributed.on_rank0(lambda: claim_save_folder(cfg.save))
        if note:
            log0(note)
    if saved is None:
        distributed.on_rank0(lambda: run_logs.claim_logs(cfg))
    # --override-save starts the --save folder over unless the run resumes from that folder: its logs
    # now, every checkpoint of the run it replaces at its first save
    replaces_run = cfg.override_save and not (
        saved is not None and cfg.save and Path(cfg.load).resolve() == Path(cfg.save).resolve())
    # a resumed run (or a requeued one that saved nothing yet) drops the steps it takes again; before
    # the first step's collectives, so before any rank appends
    restarts = bool(cfg.load or cfg.override_save)
    if restarts:
        run_logs.drop_repeated_steps(cfg, iteration, save_starts_over=replaces_run)
    logger = run_logs.MetricsLogger(cfg, resumed_at=iteration if restarts else None, replaces_run=replaces_run)
    progress = run_logs.ConsoleProgress("train", cfg.train_iters, iteration, cfg.log_interval)
    first_iteration = iteration

    def save():
        nonlocal replaces_run
        save_training_checkpoint(
            cfg.save, iteration, student=student, student_info=student_info, optimizer=optimizer, teacher=ema,
            tokenizer_dir=cfg.tokenizer or student_source.tokenizer_dir,  # the one it trained with, as sft
            generation_config=student_source.generation_config,  # the model's own, also with --tokenizer
            keep_last=1 if replaces_run else cfg.keep_last,
            fully_reshardable=cfg.dist_ckpt_optim_fully_reshardable,
            train_state={"iteration": iteration, "skipped_total": skipped_total,
                         "skipped_in_a_row": skipped_in_a_row, "mode": cfg.mode,
                         "teacher": cfg.teacher, "sampler": sampler.state_dict(),
                         "normalizer": resume.gather_normalizer_states(normalizer.state_dict()),
                         "scheduler": scheduler.state_dict(), "bf16": cfg.bf16,
                         "adam": {key: getattr(cfg, key) for key in ("adam_beta1", "adam_beta2", "adam_eps")},
                         "teacher_origin": teacher_origin},
        )
        replaces_run = False

    if iteration >= cfg.train_iters:
        converts = (cfg.save and cfg.dist_ckpt_optim_fully_reshardable
                    and saved_sharding(saved) == DP_RESHARDABLE)
        if converts:  # what the refusal of another layout asks for: this checkpoint in the format any layout loads
            save()
        log0(f"the run is at iteration {iteration} of --train-iters {cfg.train_iters}: nothing to train "
             + (f"(saved again with --dist-ckpt-optim-fully-reshardable in {iteration_dir(cfg.save, iteration)}, "
                "which any layout loads)" if converts else "(raise --train-iters to go on)"))
    eos = tokenizer.stop_ids
    metrics: dict = {}
    peak_flops = C.peak_flops(cfg)
    exits = ExitConditions(cfg.exit_interval, cfg.exit_duration_in_mins, started,
                           signal.Signals[cfg.exit_signal]).install()
    try:
        while iteration < cfg.train_iters:
            t0 = time.perf_counter()
            records = rows_of_prompts(sampler.next_batch(), cfg.samples_per_prompt)
            s_prompts = [prompts.student[i] for i in records]
            t_prompts = [prompts.teacher[i] for i in records]
            # a completion may fill what the longer of its two prompts leaves of --seq-length
            limits = [min(cfg.max_new_tokens, cfg.seq_length - max(len(sp), len(tp)))
                      for sp, tp in zip(s_prompts, t_prompts)]
            # one seed per step for every replica; the noise is keyed by global sample row, so DP=1 and
            # DP=N sample the same completions for the same prompts
            rollout = generate(student, s_prompts, sampling, eos_id=eos, true_vocab_size=true_vocab,
                               seed=cfg.seed * 1_000_003 + iteration, max_sequence_length=cfg.seq_length,
                               rows=(ctx.dp_rank * samples_per_rank, cfg.global_batch_size), limits=limits,
                               max_batch=cfg.rollout_batch_size or None)
            if injected("slow-rollout", iteration + 1):
                time.sleep(SLOW_ROLLOUT_S)
            t_rollout = time.perf_counter() - t0
            maybe_die("rollout", iteration + 1)
            if injected("nan-rollout", iteration + 1):
                rollout = dataclasses.replace(rollout, nonfinite=True)

            batch = pack_pairs(s_prompts, t_prompts, rollout.completions, eos, tokenizer.pad_id, cfg.seq_length,
                               pad_multiple(cfg))
            completions = rollout.completions
            if cfg.micro_batch_order == "length":  # the samples' logs follow them in their new order
                order = batch.longest_first()
                batch = batch.reordered(order)
                records, completions = [records[i] for i in order], [completions[i] for i in order]
            micro = batch.micro_batches(cfg.micro_batch_size, pad_multiple(cfg))
            # every sequence position of both models is computed (a micro-batch's padding included): 3
            # student forwards' worth (forward and backward) and the teacher's forward per position; summed
            # over the micro-batches and the replicas. Their all-reduce is where the replicas first meet
            # after their rollouts: the forward-backward timer starts after it, not while a replica waits
            # for the slowest rollout (time_rollout_s already counts that)
            positions = sum(mb.student.tokens.numel() for mb in micro)
            flops = sum(mb.student.tokens.numel() * (3 * C.forward_flops_per_position(student_info.preset, mb.seq_len)
                                                     + C.forward_flops_per_position(teacher_info.preset, mb.seq_len))
                        for mb in micro)
            counts = _step_counts(rollout.completions, eos, limits, rollout.num_generated_tokens,
                                  positions, flops, t_rollout, ctx.device)
            t1 = time.perf_counter()
            student_ddp.zero_grad_buffer()
            optimizer.zero_grad()
            normalizer_before = normalizer.state_dict()  # a skipped step leaves the ReNIO EMA as it was
            result = step_runner.run(micro, inject_nonfinite=injected("nan-logits", iteration + 1))
            if injected("nan-grad", iteration + 1):
                student_ddp.buffers[0].grad_data[0] = float("nan")
            t_fwd_bwd = time.perf_counter() - t1
            maybe_die("backward", iteration + 1)

            t2 = time.perf_counter()
            # a completion drawn from non-finite logits (on any replica) is not trained on, whatever its loss
            drawn_nonfinite = distributed.any_rank(rollout.nonfinite, ctx.device)
            ok, grad_norm = C.step_if_finite(optimizer, student_ddp, not (result.nonfinite or drawn_nonfinite)
                                             and math.isfinite(result.loss))
            if ok:
                scheduler.step(increment=1)
                skipped_in_a_row = 0
                if ema is not None:
                    ema.update(student)
            else:
                normalizer.load_state_dict(normalizer_before)
                skipped_total += 1
                skipped_in_a_row += 1
            t_opt = time.perf_counter() - t2
            iteration += 1
            if cfg.save_samples_interval and iteration % cfg.save_samples_interval == 0 and result.per_sample \
                    and ctx.tp_rank == 0:
                run_logs.save_samples(Path(cfg.save) / f"samples_rank{ctx.dp_rank}.jsonl", iteration, ctx.dp_rank, records,
                                      completions, result.per_sample, tokenizer, prompts, cfg)

            step_time = time.perf_counter() - t0
            metrics = {
                "loss": result.loss,
                "skipped": not ok,
                "skipped_total": skipped_total,
                "rollout_nonfinite": drawn_nonfinite,  # a token was drawn from non-finite logits: skipped
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "lr": scheduler.get_lr(optimizer.param_groups[0]),  # after the update, as Megatron-LM logs it
                "completion_length_mean": counts["length_sum"] / max(counts["completions"], 1),
                "completion_length_max": counts["longest"],
                "completion_hit_limit_fraction": counts["cut"] / max(counts["completions"], 1),
                "rollout_tokens_per_s": counts["generated"] / max(counts["rollout_seconds"], 1e-9),
                "train_tokens_per_s": counts["positions"] / max(t_fwd_bwd, 1e-9),
                "time_rollout_s": counts["rollout_seconds"],
                "time_forward_backward_s": t_fwd_bwd,
                "time_optimizer_s": t_opt,
                "time_step_s": step_time,
                "skipped_prompts_too_long": prompts.skipped_too_long,
                **{k: v for k, v in result.stats.items() if k != "loss"},
            }
            if peak_flops:  # the model FLOPs of every replica over the peak of every rank
                metrics["mfu"] = counts["flops"] / max(t_fwd_bwd, 1e-9) / (peak_flops * ctx.world_size)
            if torch.cuda.is_available():
                # the fullest rank's (under PP the last stage holds the logits and the loss): world_max
                metrics["peak_memory_gb"] = distributed.world_max(torch.cuda.max_memory_allocated() / 1e9, ctx.device)
            logger.log(iteration, metrics)  # every step, as Megatron-LM's TensorBoard; the console per --log-interval
            progress.update(iteration, {
                "loss": f"{result.loss:.4g}", "grad norm": run_logs.norm_text(metrics["grad_norm"]),
                "lr": f"{metrics['lr']:.3g}", "completion length": f"{metrics['completion_length_mean']:.0f}",
                "step s": f"{step_time:.2f}", "rollout tokens/s": f"{metrics['rollout_tokens_per_s']:.0f}",
                "skipped": str(skipped_total)})
            C.stop_after_skipped_steps(skipped_in_a_row, cfg, iteration)  # once the step that stops the run is logged

            exit_reason = exits.should_exit(iteration, ctx.device)
            due = iteration == cfg.train_iters or (cfg.save_interval and iteration % cfg.save_interval == 0)
            if cfg.save and (due or exit_reason):
                save()
                # a signal that came during a periodic save: this iteration's checkpoint is written, so
                # stop now rather than after one more step and save (which may outlast the grace period)
                exit_reason = exit_reason or exits.should_exit(iteration, ctx.device)
            if exit_reason:
                log0(f"exiting after iteration {iteration}: {exit_reason}" + (f"; checkpoint in {cfg.save}" if cfg.save else ""))
                break
        else:
            if iteration == cfg.train_iters > first_iteration:
                log0(f"done: iteration {iteration} of --train-iters {cfg.train_iters}"
                     + (f"; checkpoint in {iteration_dir(cfg.save, iteration)}" if cfg.save else ""))
    finally:
        exits.uninstall()
        progress.close()
        logger.close()
        wait_for_pruning()  # a finished run leaves only the checkpoints it keeps
        if cfg.save:
            release_save_folder(cfg.save)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megatron-renio train``; returns the exit status (0, or 2 on bad input)."""
    return run_command(parse_train_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
