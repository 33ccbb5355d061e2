"""On-policy rollout: the student generates completions on its live Megatron weights.

:func:`generate` runs the student's own ``GPTModel`` (optionally wrapped in Megatron's DDP /
``Float16Module``) under its tensor- and pipeline-parallel layout; nothing is copied to another
engine. Decoding uses Megatron's ``StaticInferenceContext`` as the KV cache: one prefill, then one
token per step. How the pieces fit:

- **Prompts of different lengths.** The batch is prefilled up to the length of the shortest prompt.
  From there every step feeds one position for the whole batch; a sample still inside its prompt
  is fed its next prompt token (the sampled token is discarded), the others feed the token they
  just drew. All samples share one position counter, so the KV cache needs no padding or masks;
  a very uneven batch costs one step per prompt token beyond the shortest prompt.
- **Tensor parallelism.** The last stage gathers the vocabulary of the last position
  (``runtime_gather_output=True``), drops Megatron's padded vocabulary rows, and samples with a
  generator seeded identically on every rank; TP rank 0's tokens are then broadcast over the TP
  group, so the ranks agree even if their logits differ in the last bit.
- **Pipeline parallelism.** Each step, a stage receives the hidden states of the step's positions
  from the previous stage (Megatron's inference p2p helpers, handed to the model with
  ``set_input_tensor``), runs its layers with its own KV cache, and sends its output on;
  the last stage samples and broadcasts the tokens to all stages of its pipeline.
- **Sequence parallelism** is switched off for the rollout (a one-token step cannot be split
  over the TP ranks) and restored afterwards.
- **Non-finite logits** do not raise: a device-side flag records whether a logits row that a sample's
  token was drawn from held NaN or inf (over the true vocabulary; Megatron's padded columns are not
  looked at), rides along with each step's token broadcast to every rank of the model-parallel group,
  and is read with the step's existing host sync (the count of running samples):
  :attr:`GenerationResult.nonfinite`. The trainer skips such a step through its loss check; a
  command that keeps completions refuses them.
- **Stopping.** A completion ends with EOS (included; several stop ids may be given), at
  ``max_new_tokens`` or its own limit, or when prompt plus completion reach ``max_sequence_length`` (the KV cache
  length); the loop ends when every sample has ended.
- **Finished samples leave the batch.** When at most ``_COMPACT_BELOW`` of the batch's rows still
  run, the running rows move to the front of the KV cache (the positions written so far) and the
  following steps feed only them, so ended samples stop costing compute. Sampling noise is keyed
  by the sample's global row, so which rows share a step does not change what a sample draws.

``use_kv_cache=False`` recomputes the whole prefix at every step through the model's training
forward (no inference context); it is the reference the tests compare the cached path against.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_renio.errors import UserInputError
from megatron_renio.rollout.sampling import SamplingConfig, sample_next

# Compact the batch when at most this fraction of its rows still runs (halving it at most about
# log(B) / log(4/3) times, each a copy of the KV cache written so far).
_COMPACT_BELOW = 0.75
# Module attributes that Megatron copies from ``config.sequence_parallel`` at construction.
_SEQUENCE_PARALLEL_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@dataclass(frozen=True)
class GenerationResult:
    """Completion token ids per prompt (EOS included when generated) and rollout statistics.

    ``nonfinite``: some generated token was drawn from a logits row (true vocabulary) holding NaN or
    inf, e.g. a model with non-finite weights; those completions are meaningless. The same on every
    rank of the model-parallel group.
    """

    completions: list[list[int]]
    num_generated_tokens: int
    seconds: float
    nonfinite: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated_tokens / self.seconds if self.seconds > 0 else 0.0


def _check_inputs(prompts, eos_ids: list[int], true_vocab_size: int, padded_vocab_size: int,
                  max_sequence_length: int) -> None:
    if not 0 < true_vocab_size <= padded_vocab_size:
        raise UserInputError(
            f"true vocabulary size {true_vocab_size} must be in [1, {padded_vocab_size}] (the model's padded vocabulary)"
        )
    if not eos_ids or not all(0 <= eos_id < true_vocab_size for eos_id in eos_ids):
        raise UserInputError(f"EOS ids {eos_ids} must be one or more ids in the vocabulary [0, {true_vocab_size})")
    if not prompts:
        raise UserInputError("generate() needs at least one prompt")
    for i, prompt in enumerate(prompts):
        if not 0 < len(prompt) < max_sequence_length:
            raise UserInputError(
                f"prompt {i} has {len(prompt)} tokens; it must have between 1 and "
                f"{max_sequence_length - 1} (max sequence length {max_sequence_length} minus one new token)"
            )
        if min(prompt) < 0 or max(prompt) >= true_vocab_size:
            raise UserInputError(f"prompt {i} holds token ids outside the vocabulary [0, {true_vocab_size})")


@contextlib.contextmanager
def _sequence_parallel_off(gpt):
    """Switch sequence parallelism off on ``gpt``'s config and every module that copied the flag;
    restore the saved values on exit."""
    if not gpt.config.sequence_parallel:
        yield
        return
    saved = [(m, a, getattr(m, a)) for m in gpt.modules() for a in _SEQUENCE_PARALLEL_ATTRS if hasattr(m, a)]
    gpt.config.sequence_parallel = False
    for module, attr, _ in saved:
        setattr(module, attr, False)
    try:
        yield
    finally:
        gpt.config.sequence_parallel = True
        for module, attr, value in saved:
            setattr(module, attr, value)


def _stage_forward(model, gpt, tokens, positions, context):
    """Run this pipeline stage on the positions in ``tokens`` [b, s]. On the last stage return the
    full-vocabulary logits of the last position [b, V_padded] (fp32); elsewhere send the hidden
    states to the next stage and return None."""
    from megatron.core import parallel_state
    from megatron.core.inference.communication_utils import recv_from_prev_pipeline_rank_, send_to_next_pipeline_rank
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if not parallel_state.is_pipeline_first_stage():
        config = gpt.config
        hidden = torch.empty(
            (tokens.size(1), tokens.size(0), config.hidden_size),
            dtype=config.pipeline_dtype or config.params_dtype, device=tokens.device,
        )
        recv_from_prev_pipeline_rank_(hidden)
        gpt.set_input_tensor(hidden)
    out = model(
        tokens, positions, attention_mask=None, inference_context=context,
        runtime_gather_output=context is not None,  # Megatron's inference path gathers itself
    )
    if not parallel_state.is_pipeline_last_stage():
        send_to_next_pipeline_rank(out.contiguous())
        return None
    last = out[:, -1, :]
    if context is None:
        last = gather_from_tensor_model_parallel_region(last.contiguous())
    return last.float()


def _share_tokens(sampled, batch_size: int, device) -> torch.Tensor:
    """TP rank 0 of the last stage decides; every rank of the model-parallel group gets its ``sampled``
    ([batch_size] on the last stage, None elsewhere)."""
    from megatron.core import parallel_state

    if parallel_state.is_pipeline_last_stage():
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                sampled, src=parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
    else:
        sampled = torch.empty(batch_size, dtype=torch.long, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            sampled, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return sampled


def _keep_cache_rows(context, keep: torch.Tensor, length: int) -> None:
    """Move batch rows ``keep`` (ascending) of every layer's KV cache to the front, positions [0, length)."""
    for memories in context.key_value_memory_dict.values():
        for memory in memories:  # [max_sequence_length, max_batch_size, ...]
            memory[:length, : len(keep)] = memory[:length, keep]


def _step_seed(seed: int, position: int) -> int:
    """The generator seed of sequence position ``position`` in a run seeded with ``seed`` (below 2**63;
    torch's CPU generator keeps its low 32 bits, so on the CPU two positions share their noise with
    probability about 2**-32; CUDA's keeps all 64)."""
    return (seed * 6364136223846793005 + position * 1442695040888963407) % (2**63 - 1)


def generate(
    model,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    *,
    eos_id: int | Sequence[int],
    true_vocab_size: int,
    seed: int,
    max_sequence_length: int,
    use_kv_cache: bool = True,
    rows: tuple[int, int] | None = None,
    limits: Sequence[int] | None = None,
    max_batch: int | None = None,
) -> GenerationResult:
    """Sample one completion per prompt with the student ``model`` (this rank's TP/PP shard).

    ``eos_id``: the EOS id, or several (``Tokenizer.stop_ids``); a completion ends at the first one.

    Every rank of the model-parallel group (TP x PP) must call this with the same arguments and
    gets the same result. Sampling noise is keyed by sample, not by batch: the token at sequence
    position ``p`` of the sample in global row ``r`` uses uniform number ``r`` of a generator seeded
    from ``(seed, p)``, with ``rows = (first_global_row, total_rows)`` placing this batch in the
    global batch (default: the batch is the whole batch). So data-parallel replicas sharing one
    ``seed`` (vary it across steps) draw exactly what one replica holding every sample would. Token ids at or above ``true_vocab_size``
    (Megatron's padded rows) are never sampled. A prompt must be shorter than
    ``max_sequence_length``, which bounds prompt + completion and sizes the KV cache; bad prompts,
    EOS ids or vocabulary sizes raise :class:`UserInputError`. ``limits`` (one per prompt, each at
    least 1) bounds each completion further, e.g. by what a longer teacher prompt leaves of the
    sequence. ``max_batch``: generate at most that many prompts at once (the KV cache holds that many
    rows), the next ones after them; the draws are the same (keyed by row). Runs under
    ``torch.no_grad`` in eval mode and restores the model's training mode (and
    sequence parallelism) afterwards. Non-finite logits do not raise: the result's ``nonfinite`` says
    whether a generated token was drawn from one (the caller decides what to do with the completions).
    """
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.utils import unwrap_model

    cfg.validate()
    gpt = unwrap_model(model)
    eos_ids = [int(eos_id)] if isinstance(eos_id, int) else [int(i) for i in eos_id]
    _check_inputs(prompts, eos_ids, true_vocab_size, gpt.vocab_size, max_sequence_length)
    most = [cfg.max_new_tokens] * len(prompts) if limits is None else [min(n, cfg.max_new_tokens) for n in limits]
    if len(most) != len(prompts) or min(most) < 1:
        raise ValueError(f"limits must hold one bound of at least 1 per prompt, got {list(limits)}")
    started = time.perf_counter()
    if max_batch is not None and len(prompts) > max_batch:
        first_row, total_rows = rows if rows is not None else (0, len(prompts))
        parts = [generate(model, prompts[i:i + max_batch], cfg, eos_id=eos_id, true_vocab_size=true_vocab_size,
                          seed=seed, max_sequence_length=max_sequence_length, use_kv_cache=use_kv_cache,
                          rows=(first_row + i, total_rows), limits=most[i:i + max_batch])
                 for i in range(0, len(prompts), max_batch)]
        return GenerationResult([c for part in parts for c in part.completions],
                                sum(part.num_generated_tokens for part in parts), time.perf_counter() - started,
                                nonfinite=any(part.nonfinite for part in parts))
    device = next(gpt.parameters()).device
    batch_size = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    most_new = torch.tensor(most, device=device)
    total = min(max(len(p) + n for p, n in zip(prompts, most)), max_sequence_length)
    tokens = torch.zeros((batch_size, total), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    positions = torch.arange(total, device=device).expand(batch_size, total)
    generated = torch.zeros(batch_size, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    first_row, total_rows = rows if rows is not None else (0, batch_size)
    if not (0 <= first_row and first_row + batch_size <= total_rows):
        raise UserInputError(f"rows={rows} does not hold a batch of {batch_size} samples")
    stop = torch.tensor(eos_ids, device=device)
    nonfinite = torch.zeros(1, dtype=torch.long, device=device)  # 1 once a token was drawn from non-finite logits
    noise = torch.Generator(device=device)
    context = StaticInferenceContext(batch_size, total) if use_kv_cache else None

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _sequence_parallel_off(gpt):
            fed = 0  # positions already in the KV cache
            pos = min(len(p) for p in prompts)  # the position the next token goes to
            rows_in_batch = torch.arange(batch_size, device=device)  # batch (and KV cache) row -> sample
            while True:
                first = fed if use_kv_cache else 0
                logits = _stage_forward(model, gpt, tokens[rows_in_batch, first:pos],
                                        positions[rows_in_batch, first:pos], context)
                in_prompt = pos < lengths[rows_in_batch]
                generating = ~in_prompt & ~done[rows_in_batch]  # the rows whose drawn token is kept
                shared = None
                if logits is not None:
                    real = logits[:, :true_vocab_size]  # padded columns are not part of the model's output
                    noise.manual_seed(_step_seed(seed, pos))
                    uniforms = torch.rand(total_rows, generator=noise, device=device)[first_row + rows_in_batch]
                    sampled = sample_next(real, cfg, uniforms=uniforms)
                    bad = (generating & ~torch.isfinite(real).all(dim=-1)).any()
                    shared = torch.cat((sampled, nonfinite | bad))  # the flag travels with the tokens
                shared = _share_tokens(shared, len(rows_in_batch) + 1, device)
                sampled, nonfinite = shared[:-1], shared[-1:]
                token = torch.where(in_prompt, tokens[rows_in_batch, pos], sampled)
                tokens[rows_in_batch, pos] = token
                generated[rows_in_batch] += generating.long()
                ended = generating & (torch.isin(token, stop) | (generated[rows_in_batch] >= most_new[rows_in_batch]))
                done[rows_in_batch] |= ended
                if use_kv_cache:
                    context.increment_sequence_len_offset(pos - fed)
                    context.enable_decode_mode()
                fed, pos = pos, pos + 1
                running = ~done[rows_in_batch]
                # the step's one host sync; it reads the flag too (the last step's value is the result)
                num_running, any_nonfinite = torch.cat((running.sum().reshape(1), nonfinite)).tolist()
                if pos == total or num_running == 0:
                    break
                if num_running <= _COMPACT_BELOW * len(rows_in_batch):
                    keep = running.nonzero().squeeze(1)
                    if use_kv_cache:
                        _keep_cache_rows(context, keep, fed)
                    rows_in_batch = rows_in_batch[keep]
    finally:
        gpt.set_input_tensor(None)
        model.train(was_training)

    counts = generated.tolist()
    completions = [tokens[i, len(p) : len(p) + n].tolist() for i, (p, n) in enumerate(zip(prompts, counts))]
    return GenerationResult(completions, sum(counts), time.perf_counter() - started, nonfinite=bool(any_nonfinite))
