"""The EMA teacher of OPSD (``--teacher ema``): an exponential moving average of the student, in fp32.

After every optimizer step, teacher <- decay * teacher + (1 - decay) * student, parameter by parameter.

A bf16 teacher cannot hold this average: with decay 0.999 a step moves a weight by a thousandth of
its distance to the student, less than half a bf16 unit (2^-9 of the weight) unless the two differ
by more than half the weight, so rounding drops almost every update and the teacher stays where it
started. The average therefore lives in fp32 tensors, one per teacher parameter (same device, same
tensor- and pipeline-parallel shard), and is copied into the teacher after each update. Checkpoints
hold the fp32 average in the teacher's sharded layout, so a resume continues it exactly. An fp32
teacher is its own average (no copy).
"""

from __future__ import annotations

import dataclasses

import torch


class EmaTeacher:
    """The fp32 average behind a (possibly bf16) teacher ``GPTModel``; see the module docstring.

    ``sharded_state_dict`` / ``load_state_dict`` stand in for the teacher's own in training
    checkpoints: the same keys and sharding, the fp32 average as the values.
    """

    def __init__(self, teacher: torch.nn.Module, decay: float):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        self.teacher = teacher
        self.decay = decay
        self.average = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in teacher.parameters()]
        average_of = {p.data_ptr(): a for p, a in zip(teacher.parameters(), self.average)}
        # checkpoint key -> average, for the entries whose tensor is a whole teacher parameter
        self._average_by_key = {
            key: average_of[value.data.data_ptr()]
            for key, value in teacher.sharded_state_dict().items()
            if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and value.data is not None
            and value.data.data_ptr() in average_of and value.data.shape == average_of[value.data.data_ptr()].shape
        }

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        """One step of the average towards ``student`` (same architecture and layout), then the teacher."""
        targets = [target.detach() for target in student.parameters()]
        torch._foreach_mul_(self.average, self.decay)  # one launch per dtype group, not two per parameter
        torch._foreach_add_(self.average, targets, alpha=1.0 - self.decay)  # bf16 targets add in fp32
        copies = [(weight, average) for average, weight in zip(self.average, self.teacher.parameters())
                  if average.data_ptr() != weight.data_ptr()]
        if copies:
            torch._foreach_copy_(*map(list, zip(*copies)))

    def sharded_state_dict(self) -> dict:
        """The teacher's sharded state dict with the fp32 average in place of each parameter."""
        state = self.teacher.sharded_state_dict()
        for key, average in self._average_by_key.items():
            entry = state[key]
            fields = {field.name for field in dataclasses.fields(entry)}
            state[key] = dataclasses.replace(entry, data=average, **({"dtype": average.dtype} if "dtype" in fields else {}))
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the average and the teacher from a state dict loaded through :meth:`sharded_state_dict`."""
        self.teacher.load_state_dict(state)
        for key, average in self._average_by_key.items():
            average.copy_(state[key])
        covered = {id(average) for average in self._average_by_key.values()}
        for average, weight in zip(self.average, self.teacher.parameters()):
            if id(average) not in covered:  # a parameter the checkpoint holds under another entry
                average.copy_(weight)
