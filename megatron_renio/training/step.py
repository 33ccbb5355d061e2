"""One distillation step inside one Megatron ``forward_backward`` schedule.

For every micro-batch the forward step runs :class:`PairedModel` (teacher under ``no_grad``,
student with grad; with PP > 1 both hidden states travel together). On the last pipeline stage
the loss function computes per-token divergences and log-probs on the shared ``[b, c_len]``
completion grid, then the ReNIO-weighted loss terms (:func:`distillation_loss`). The fused path
reads each model's completion rows where the model wrote them (``PairedBatch.*.gather_index`` as
``positions`` of :func:`fused_token_terms`, empty grid cells -1) and writes the gradient of the
whole ``[b, S, V]`` logits; the unfused path (:func:`token_terms`) gathers both models' rows onto the
grid first (two logits-sized copies, and a scatter of the gradient back).

Loss scaling. ``distillation_loss`` returns ``(numerator, denominator)`` per micro-batch, and the
step's loss is ``sum(numerators) / sum(denominators)`` over every micro-batch and data-parallel
rank. Megatron's per-token-loss machinery does exactly this deferral
(``calculate_per_token_loss=True``: DDP sums gradients and ``finalize_model_grads`` divides them by
a denominator it all-reduces over DP), but its schedules accumulate an *integer* token count. So
the loss function hands the schedule a zero count and accumulates the (real-valued) denominator
itself, and the ``finalize_model_grads_func`` installed here passes that sum to Megatron's
``finalize_model_grads``, which broadcasts it from the last stage, all-reduces it over DP and
scales the student's gradients by its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

import torch

from megatron_renio.data.batching import PairedBatch
from megatron_renio.losses.distillation import distillation_loss, effective_weights, reduce_stats
from megatron_renio.losses.divergence import DivergenceConfig, gather_grid, token_terms
from megatron_renio.losses.fused import fused_token_terms
from megatron_renio.renio.vocab_parallel import VocabShard
from megatron_renio.renio.weights import ReNIOConfig, ReNIONormalizer
from megatron_renio.training.paired import PairedModel, PairedOutput, paired_tensor_shapes


SUMMARY_KEYS = (
    "loss", "nonfinite", "weight_mean", "weight_min", "weight_max", "weight_std", "pivotal_fraction",
    "log_ratio_mean", "sample_loss_mean", "num_samples", "num_valid_tokens",
)


@dataclass(frozen=True)
class LossSettings:
    """What the last stage computes: divergence, ReNIO, loss kind and the kernel choice."""

    divergence: DivergenceConfig
    renio: ReNIOConfig
    loss_kind: str  # 'divergence' or 'sampled_rkl'
    impl: str = "auto"  # --loss-impl: 'auto' | 'triton' | 'chunked' (fused_token_terms' impl) | 'unfused'


@dataclass
class StepResult:
    """The step's loss (``sum numerators / sum denominators`` over micro-batches and DP) and logs.

    ``stats`` has every :data:`SUMMARY_KEYS` entry on every rank; ``per_sample`` holds, on the last
    pipeline stage only, this rank's weights (the effective weights, as ``weight_mean`` averages them,
    and the raw ones) and per-sample losses in micro-batch order; with ``keep_token_terms`` also the
    per-token ``student_logprobs``, ``teacher_logprobs`` and ``divergence`` [samples, c_len] on the
    completion grid (meaningless where the mask is 0).
    """

    loss: float
    nonfinite: bool
    stats: dict = field(default_factory=dict)
    per_sample: dict = field(default_factory=dict)


def schedule_seq_length(config, lengths: list[int], pipeline_parallel: bool) -> int:
    """The ``seq_length`` for Megatron's schedule over micro-batches of these padded lengths: the longest.
    Under pipeline parallelism, micro-batches of different lengths make the stages exchange each one's
    shape before its activations (``config.variable_seq_lengths``)."""
    longest = max(lengths)
    if pipeline_parallel:
        config.variable_seq_lengths = any(n != longest for n in lengths)
    return longest


class DistillationStep:
    """Forward/backward of one optimizer step over a list of micro-batches.

    ``keep_token_terms``: also hand back the per-token terms in ``StepResult.per_sample``.
    """

    def __init__(
        self,
        paired: PairedModel,
        student_chunks: list,
        settings: LossSettings,
        normalizer: ReNIONormalizer,
        true_vocab_size: int,
        keep_token_terms: bool = False,
    ):
        from megatron.core import parallel_state

        self.paired = paired
        self.student_chunks = student_chunks
        self.settings = settings
        self.normalizer = normalizer
        self.true_vocab_size = true_vocab_size
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self._denominator = None
        self._losses: list = []
        self.keep_token_terms = keep_token_terms
        self._terms: list = []
        self._inject_nonfinite = False
        config = paired.config
        config.calculate_per_token_loss = True
        if hasattr(student_chunks[0], "no_sync"):
            config.no_sync_func = student_chunks[0].no_sync

    # -- schedule callbacks -------------------------------------------------------------------
    def _finalize(self, model, num_tokens, pg_collection=None, force_all_reduce=False):
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(self.student_chunks, self._denominator, pg_collection=pg_collection,
                             force_all_reduce=force_all_reduce)

    def _forward_step(self, data_iterator, model):
        mb: PairedBatch = next(data_iterator)
        output = model(mb.student.tokens, mb.student.position_ids, mb.teacher.tokens, mb.teacher.position_ids)
        return output, partial(self._loss, mb)

    def _token_terms(self, mb: PairedBatch, output: PairedOutput):
        student, teacher = output.student_logits, output.teacher_logits.detach()
        if self._inject_nonfinite:
            student = student * float("nan")
        shard = VocabShard.for_rank(student.shape[-1], self.true_vocab_size, self.tp_group)
        args = (mb.completion_ids, self.settings.divergence, shard, self.tp_group)
        if self.settings.impl == "unfused":
            return token_terms(gather_grid(student, mb.student.gather_index),
                               gather_grid(teacher, mb.teacher.gather_index), *args)
        filled = mb.completion_mask > 0
        positions = tuple(torch.where(filled, side.gather_index, -1) for side in (mb.student, mb.teacher))
        return fused_token_terms(student, teacher, *args, impl=self.settings.impl, positions=positions)

    def _loss(self, mb: PairedBatch, output: PairedOutput):
        terms = self._token_terms(mb, output)
        loss = distillation_loss(terms, mb.completion_mask, self.settings.renio, self.normalizer, self.settings.loss_kind)
        self._denominator += loss.denominator
        # the schedule frees the data of the tensor it is handed on the last pipeline stage
        # (deallocate_pipeline_outputs): the statistics keep their own copy
        self._losses.append(replace(loss, numerator=loss.numerator.detach().clone()))
        if self.keep_token_terms:
            self._terms.append(terms)
        return loss.numerator, torch.zeros((), dtype=torch.int), {}

    # -- one step -----------------------------------------------------------------------------
    def run(self, micro_batches: list[PairedBatch], forward_only: bool = False, inject_nonfinite: bool = False) -> StepResult:
        """Run the schedule over ``micro_batches`` (all of one size; each may have its own padded length,
        :meth:`PairedBatch.trimmed`: under pipeline parallelism the stages then exchange each
        micro-batch's shape before its activations, Megatron's ``variable_seq_lengths``).

        ``inject_nonfinite`` (a testing aid, :mod:`~megatron_renio.training.faults`) turns the student's logits into NaN in this step.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = next(self.paired.student.parameters()).device
        # installed per run: several steps may share one model (bench_step builds two)
        self.paired.config.finalize_model_grads_func = self._finalize
        self._denominator = torch.zeros((), dtype=torch.float32, device=device)
        self._losses = []
        self._terms = []
        self._inject_nonfinite = inject_nonfinite
        mb0 = micro_batches[0]
        seq_length = schedule_seq_length(self.paired.config, [mb.seq_len for mb in micro_batches], self.pp_size > 1)
        kwargs = {}
        if self.pp_size > 1:
            kwargs["adjust_tensor_shapes_fn"] = paired_tensor_shapes(self.paired.student_hidden, self.paired.teacher_hidden)
        get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter([mb.to(device) for mb in micro_batches]),
            model=[self.paired],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=mb0.completion_ids.shape[0],
            forward_only=forward_only,
            **kwargs,
        )
        return self._result(device)

    def _result(self, device) -> StepResult:
        """Reduce the step's statistics over DP on the last stage (``reduce_stats``), then hand
        them to every pipeline stage so that any rank can log or act on them."""
        from megatron.core import parallel_state

        values = torch.zeros(len(SUMMARY_KEYS), dtype=torch.float64, device=device)
        per_sample = {}
        if self._losses:
            summary = reduce_stats(self._losses, self.dp_group)
            values = torch.tensor([summary[k] for k in SUMMARY_KEYS], dtype=torch.float64, device=device)
            per_sample = {
                "weights": effective_weights(self._losses, summary["weight_scale"]).float().cpu(),
                "raw_weights": torch.cat([lt.stats["raw_weight"].detach().float().cpu() for lt in self._losses]),
                "per_sample_loss": torch.cat([lt.per_sample_loss.float().cpu() for lt in self._losses]),
            }
            if self._terms:
                width = max(t.divergence.shape[1] for t in self._terms)  # micro-batches may have their own c_len
                for key in ("student_logprobs", "teacher_logprobs", "divergence"):
                    per_sample[key] = torch.cat([torch.nn.functional.pad(getattr(t, key).detach().float().cpu(),
                                                                         (0, width - t.divergence.shape[1]))
                                                 for t in self._terms])
            self.normalizer.end_step(self.settings.renio, self.dp_group)
        if self.pp_size > 1:
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            torch.distributed.broadcast(values, src=last, group=parallel_state.get_pipeline_model_parallel_group())
        summary = dict(zip(SUMMARY_KEYS, values.tolist()))
        return StepResult(loss=summary["loss"], nonfinite=summary["nonfinite"] > 0, stats=summary, per_sample=per_sample)
