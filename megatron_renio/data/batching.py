"""Packing (prompt, completion) pairs into student and teacher model inputs on a shared grid.

In OPD and OPSD the student and the teacher read the same completion after *different* prompts
(OPSD's teacher prompt carries the reference solution). :func:`pack_pairs` builds both inputs and
the index tensors that line up, for every completion token, the logits position of each model that
predicts it, so the loss is computed on one ``[b, c_len]`` completion grid.

Layout of one sample (student prompt length ps = 3, teacher prompt length pt = 5, completion
``c0 c1 c2`` of length c = 3 ending with EOS, padded sequence length S = 8)::

    position             0    1    2    3    4    5    6    7
    student tokens       s0   s1   s2   c0   c1   c2   pad  pad
    student labels       s1   s2   c0   c1   c2   pad  pad  pad      labels[t] = tokens[t + 1]
    student loss_mask    0    0    1    1    1    0    0    0
    student position_ids 0    1    2    3    4    5    6    7

    teacher tokens       t0   t1   t2   t3   t4   c0   c1   c2
    teacher labels       t1   t2   t3   t4   c0   c1   c2   pad
    teacher loss_mask    0    0    0    0    1    1    1    0

    completion grid j    0    1    2    (c_len = longest completion in the batch)
    completion_ids       c0   c1   c2
    completion_mask      1    1    1
    student gather_index 2    3    4    = ps - 1 + j
    teacher gather_index 4    5    6    = pt - 1 + j

The logits at ``gather_index[i, j]`` predict ``completion_ids[i, j]`` in each model:
``labels[i, gather_index[i, j]] == tokens[i, gather_index[i, j] + 1] == completion_ids[i, j]``.
So ``x.gather(1, gather_index)`` turns any per-position tensor ``x`` of shape ``[b, S]`` (or
``[b, S, ...]`` with the index expanded) into the grid. ``loss_mask`` is 1.0 exactly at the
gathered positions of valid completion tokens; on the grid, ``completion_mask`` plays that role.
Grid entries beyond a sample's completion hold ``pad_id`` (ids) and index 0 (positions) with mask
0.0.

Rules:

* Padding is on the right; position ids are ``0 .. S-1`` and causal attention needs no extra mask
  (padding comes after every real token).
* A completion ends at its first ``eos_id`` (or the first of several stop ids), which is kept (it
  is a token the student chose to emit and is trained on); anything after it (generation padding)
  is dropped. A completion without
  EOS (cut by the generation budget) is used as is: no EOS is added.
* Both sequences of a sample must fit in ``seq_length``: the completion is truncated to
  ``seq_length - max(ps, pt)`` tokens (``truncated`` records which samples were cut; a truncated
  completion keeps its first tokens and may lose its EOS). Prompts that leave no room for one
  completion token are a caller error: drop them beforehand with :func:`filter_long_prompts`.
* Student and teacher share the padded length ``S = max(ps + c, pt + c)`` over the batch, rounded
  up to a multiple of ``pad_to_multiple`` (sequence parallelism needs ``S`` divisible by the
  tensor-parallel size); ``seq_length`` must itself be such a multiple so that ``S <= seq_length``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple, Sequence

import torch

from megatron_renio.errors import UserInputError


@dataclasses.dataclass
class ModelInputs:
    """One model's side of a :class:`PairedBatch` (student or teacher); all tensors ``[b, S]``
    except ``gather_index`` ``[b, c_len]`` and ``prompt_lengths`` ``[b]``."""

    tokens: torch.Tensor  # int64
    labels: torch.Tensor  # int64, labels[:, t] = tokens[:, t + 1], pad_id at t = S - 1
    loss_mask: torch.Tensor  # float32, 1.0 where labels is a completion token
    position_ids: torch.Tensor  # int64
    gather_index: torch.Tensor  # int64, sequence positions whose logits predict completion_ids
    prompt_lengths: torch.Tensor  # int64

    def to(self, device: torch.device | str) -> "ModelInputs":
        """A copy with every tensor on ``device``."""
        return self.map(lambda t: t.to(device))

    def map(self, fn) -> "ModelInputs":
        """A copy with ``fn`` applied to every tensor."""
        return ModelInputs(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclasses.dataclass
class PairedBatch:
    """Student and teacher inputs over the same completions, plus the ``[b, c_len]`` grid.

    See the module docstring for the layout.
    """

    student: ModelInputs
    teacher: ModelInputs
    completion_ids: torch.Tensor  # [b, c_len] int64, pad_id past each completion
    completion_mask: torch.Tensor  # [b, c_len] float32, 1.0 on valid completion tokens
    completion_lengths: torch.Tensor  # [b] int64, tokens kept (after EOS cut and truncation)
    truncated: torch.Tensor  # [b] bool, completion shortened to fit seq_length

    @property
    def seq_len(self) -> int:
        """The padded sequence length S shared by student and teacher."""
        return self.student.tokens.shape[1]

    def to(self, device: torch.device | str) -> "PairedBatch":
        """A copy with every tensor on ``device``."""
        return self.map(lambda t: t.to(device))

    def rows(self, start: int, end: int) -> "PairedBatch":
        """Samples ``start:end`` (a micro-batch); the padded lengths stay those of the whole batch."""
        return self.map(lambda t: t[start:end])

    def sequence_lengths(self) -> torch.Tensor:
        """[b] int64: the positions each sample fills, ``max(ps, pt) + c`` (what it must be padded to)."""
        return torch.maximum(self.student.prompt_lengths, self.teacher.prompt_lengths) + self.completion_lengths

    def longest_first(self) -> list[int]:
        """The sample order by :meth:`sequence_lengths`, longest first (ties keep their order), so that
        consecutive micro-batches hold samples of similar lengths and pad little."""
        lengths = self.sequence_lengths().tolist()
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def reordered(self, order: Sequence[int]) -> "PairedBatch":
        """The samples in ``order`` (indices into this batch); padded lengths unchanged."""
        index = torch.as_tensor(list(order), dtype=torch.int64)
        return self.map(lambda t: t[index])

    def micro_batches(self, size: int, pad_to_multiple: int = 8) -> list["PairedBatch"]:
        """The consecutive micro-batches of ``size`` samples, each :meth:`trimmed` to its own length."""
        return [self.rows(i, i + size).trimmed(pad_to_multiple) for i in range(0, len(self.completion_lengths), size)]

    def trimmed(self, pad_to_multiple: int = 8) -> "PairedBatch":
        """A copy cut to what its own samples need, so that a micro-batch costs its own length, not the
        whole batch's longest: ``S`` = the longest ``max(ps, pt) + c`` of its rows rounded up to
        ``pad_to_multiple`` (never above the current ``S``), ``c_len`` = its longest completion (at least 1).
        Only padding is dropped: every real token, label and mask entry sits before the new lengths."""
        need = int(self.sequence_lengths().max())
        seq_len = -(-need // pad_to_multiple) * pad_to_multiple  # the slices below stop at the current S
        c_len = max(1, int(self.completion_lengths.max()))

        def side(inputs: ModelInputs) -> ModelInputs:
            cut = {name: getattr(inputs, name)[:, :seq_len].contiguous()
                   for name in ("tokens", "labels", "loss_mask", "position_ids")}
            return ModelInputs(**cut, gather_index=inputs.gather_index[:, :c_len].contiguous(),
                               prompt_lengths=inputs.prompt_lengths)

        return PairedBatch(student=side(self.student), teacher=side(self.teacher),
                           completion_ids=self.completion_ids[:, :c_len].contiguous(),
                           completion_mask=self.completion_mask[:, :c_len].contiguous(),
                           completion_lengths=self.completion_lengths, truncated=self.truncated)

    def map(self, fn) -> "PairedBatch":
        """A copy with ``fn`` applied to every tensor (both sides included)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return PairedBatch(**{k: v.map(fn) if isinstance(v, ModelInputs) else fn(v) for k, v in fields.items()})


def _cut_at_eos(completion: Sequence[int], eos_ids: frozenset[int]) -> list[int]:
    ids = [int(t) for t in completion]
    end = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    return ids if end is None else ids[: end + 1]


def _side(
    prompts: list[list[int]], completions: list[list[int]], seq_len: int, c_len: int, pad_id: int
) -> ModelInputs:
    b = len(prompts)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((b, seq_len), dtype=torch.float32)
    gather_index = torch.zeros((b, c_len), dtype=torch.int64)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        p, c = len(prompt), len(completion)
        tokens[i, : p + c] = torch.tensor(prompt + completion, dtype=torch.int64)
        loss_mask[i, p - 1 : p - 1 + c] = 1.0
        gather_index[i, :c] = torch.arange(p - 1, p - 1 + c)
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    return ModelInputs(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=torch.arange(seq_len, dtype=torch.int64).repeat(b, 1),
        gather_index=gather_index,
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.int64),
    )


def pack_pairs(
    student_prompts: Sequence[Sequence[int]],
    teacher_prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    eos_id: int | Sequence[int],
    pad_id: int,
    seq_length: int,
    pad_to_multiple: int = 8,
) -> PairedBatch:
    """Pack one batch of (student prompt, teacher prompt, completion) triples; see the module doc.

    ``eos_id``: the EOS id, or several stop ids (``Tokenizer.stop_ids``); a completion ends at the first.

    ``seq_length`` is the longest sequence either model may read; it must be a multiple of
    ``pad_to_multiple`` (:class:`UserInputError` naming ``--seq-length`` otherwise). A prompt that
    is empty or leaves no room for a completion token raises ``ValueError`` (a caller error:
    :func:`filter_long_prompts` removes such prompts).
    """
    if not len(student_prompts) == len(teacher_prompts) == len(completions):
        raise ValueError(
            f"batch sizes differ: {len(student_prompts)} student prompts, "
            f"{len(teacher_prompts)} teacher prompts, {len(completions)} completions"
        )
    if not student_prompts:
        raise ValueError("empty batch")
    if pad_to_multiple < 1 or seq_length % pad_to_multiple != 0:
        raise UserInputError(
            f"--seq-length {seq_length} must be a multiple of {pad_to_multiple} "
            "(sequence parallelism needs the padded length divisible by the tensor-parallel size)"
        )
    eos_ids = frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
    s_prompts = [[int(t) for t in p] for p in student_prompts]
    t_prompts = [[int(t) for t in p] for p in teacher_prompts]
    kept: list[list[int]] = []
    truncated: list[bool] = []
    for i, (sp, tp, completion) in enumerate(zip(s_prompts, t_prompts, completions)):
        longest = max(len(sp), len(tp))
        if not sp or not tp:
            raise ValueError(f"sample {i}: empty prompt")
        if longest >= seq_length:
            raise ValueError(
                f"sample {i}: prompt of {longest} tokens leaves no room for a completion in "
                f"seq_length {seq_length} (filter_long_prompts should have removed it)"
            )
        ids = _cut_at_eos(completion, eos_ids)
        room = seq_length - longest
        truncated.append(len(ids) > room)
        kept.append(ids[:room])

    longest_seq = max(
        max(len(sp), len(tp)) + len(c) for sp, tp, c in zip(s_prompts, t_prompts, kept)
    )
    seq_len = -(-longest_seq // pad_to_multiple) * pad_to_multiple
    c_len = max(1, max(len(c) for c in kept))

    completion_ids = torch.full((len(kept), c_len), pad_id, dtype=torch.int64)
    completion_mask = torch.zeros((len(kept), c_len), dtype=torch.float32)
    for i, c in enumerate(kept):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.int64)
        completion_mask[i, : len(c)] = 1.0
    return PairedBatch(
        student=_side(s_prompts, kept, seq_len, c_len, pad_id),
        teacher=_side(t_prompts, kept, seq_len, c_len, pad_id),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        completion_lengths=torch.tensor([len(c) for c in kept], dtype=torch.int64),
        truncated=torch.tensor(truncated, dtype=torch.bool),
    )


class PromptFilterResult(NamedTuple):
    """Outcome of :func:`filter_long_prompts`."""

    kept: list[int]  # indices of the records that fit, in their original order
    skipped: int  # records dropped because no completion token fits
    budget_limited: int  # kept records with room for fewer than max_new_tokens tokens


def filter_long_prompts(
    records_lengths: Iterable[Sequence[int]], seq_length: int, max_new_tokens: int
) -> PromptFilterResult:
    """Select the records whose prompts leave room for at least one completion token.

    ``records_lengths`` yields, per record ``k``, the lengths of the prompts it produces, e.g.
    ``(len(student_ids), len(teacher_ids))``; the longest one decides. Policy: a record is kept when
    ``longest + 1 <= seq_length`` (the condition :func:`pack_pairs` requires) and skipped otherwise;
    skipped records are counted, not errors, so that a few over-long problems do not stop a run.
    Kept records whose room ``seq_length - longest`` is below ``max_new_tokens`` are counted in
    ``budget_limited``: the trainer bounds their completions by that room (``generate``'s ``limits``).
    Raises :class:`UserInputError` naming ``--max-new-tokens`` when it is below 1.
    """
    if max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    kept: list[int] = []
    budget_limited = 0
    total = 0
    for k, lengths in enumerate(records_lengths):
        total += 1
        longest = max(lengths)
        if longest + 1 > seq_length:
            continue
        kept.append(k)
        if seq_length - longest < max_new_tokens:
            budget_limited += 1
    return PromptFilterResult(kept=kept, skipped=total - len(kept), budget_limited=budget_limited)
