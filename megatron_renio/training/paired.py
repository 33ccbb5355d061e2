"""Student and frozen teacher as one pipeline-parallel module.

Both models have the same TP/PP layout, so a pipeline stage holds the same layers of each. One
Megatron ``forward_backward`` schedule drives :class:`PairedModel`: between stages the p2p tensor
carries both hidden states, concatenated on the hidden dimension::

    [seq, micro_batch, student_hidden | teacher_hidden]

:func:`paired_tensor_shapes` widens the schedule's p2p shapes accordingly (Megatron honours
``adjust_tensor_shapes_fn`` in the non-interleaved 1F1B schedule). The teacher runs under
``no_grad`` on a detached copy of its slice, so the backward pass sends zeros for the teacher's
half and only student parameters receive gradients. Both sequences must have the same padded
length (the batching pads them together).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.utils import unwrap_model


@dataclass
class PairedOutput:
    """Last-stage output: vocab-parallel logits ``[b, s, V/TP]`` of each model."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor


class PairedModel(torch.nn.Module):
    """``student`` (trainable, possibly DDP-wrapped) + ``teacher`` (frozen) for one pipeline stage.

    ``forward`` returns a :class:`PairedOutput` on the last stage and the concatenated hidden
    states elsewhere. ``config`` is the student's: Megatron's schedules read it.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.student_hidden = student_hidden
        self.teacher_hidden = teacher_hidden
        self.config = unwrap_model(student).config
        self.model_type = unwrap_model(student).model_type
        self._post_process = unwrap_model(student).post_process

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received p2p tensor between the two models (first stage receives None)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            student_in = teacher_in = None
        else:
            student_in, teacher_in = torch.split(input_tensor, [self.student_hidden, self.teacher_hidden], dim=-1)
            teacher_in = teacher_in.detach()
        unwrap_model(self.student).set_input_tensor(student_in)
        unwrap_model(self.teacher).set_input_tensor(teacher_in)

    def forward(self, student_tokens, student_position_ids, teacher_tokens, teacher_position_ids):
        with torch.no_grad():
            teacher_out = self.teacher(teacher_tokens, teacher_position_ids, attention_mask=None)
        student_out = self.student(student_tokens, student_position_ids, attention_mask=None)
        if self._post_process:
            return PairedOutput(student_out, teacher_out)
        return torch.cat([student_out, teacher_out], dim=-1)


def paired_tensor_shapes(student_hidden: int, teacher_hidden: int):
    """``adjust_tensor_shapes_fn`` for the 1F1B schedule: widen the hidden dim of every p2p shape."""

    def adjust(recv_shapes, send_shapes):
        widen = lambda shapes: [(s, b, student_hidden + teacher_hidden) for (s, b, _h) in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    return adjust
