"""When training stops early: ``--exit-signal`` (SIGTERM), ``--exit-duration-in-mins`` and ``--exit-interval``.

SLURM (and most schedulers) send a signal (SIGTERM, or the one ``--signal`` names) some time before
killing a job. :class:`ExitConditions`
records the signal instead of dying, and the trainer asks :meth:`ExitConditions.should_exit` at the
end of every iteration (a safe point: the optimizer step is done). The answer is agreed by all
ranks with one all-reduce (MAX) so that every rank saves the same checkpoint and exits 0 together,
even when the signal reached only some of them. The semantics follow Megatron-LM: exit after the
iteration during which the elapsed time passed ``--exit-duration-in-mins``, or after any iteration
divisible by ``--exit-interval``.
"""

from __future__ import annotations

import signal
import time

import torch


class ExitConditions:
    """Install with :meth:`install` after process groups exist; ask :meth:`should_exit` per iteration.

    ``started``: the ``time.monotonic()`` the exit duration counts from (default: now). The trainer
    passes the start of the run, as Megatron-LM counts from the start of ``pretrain``, so model and
    checkpoint loading count against the job's wall time too.
    """

    def __init__(self, exit_interval: int = 0, exit_duration_minutes: float = 0.0, started: float | None = None,
                 exit_signal: signal.Signals = signal.SIGTERM):
        self.exit_interval = exit_interval
        self.exit_signal = exit_signal
        self.exit_duration_s = exit_duration_minutes * 60.0
        self.started = time.monotonic() if started is None else started
        self.signal_received: int | None = None
        self._previous = None

    def install(self) -> "ExitConditions":
        self._previous = signal.signal(self.exit_signal, self._on_signal)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(self.exit_signal, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = signum

    def should_exit(self, iteration: int, device: torch.device) -> str | None:
        """The reason to stop after ``iteration`` (same answer on every rank), or None."""
        local = [
            self.signal_received is not None,
            self.exit_duration_s > 0 and time.monotonic() - self.started >= self.exit_duration_s,
        ]
        flags = torch.tensor([float(x) for x in local], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[0] > 0:
            return f"{self.exit_signal.name} received"
        if flags[1] > 0:
            return f"--exit-duration-in-mins {self.exit_duration_s / 60:g} reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"--exit-interval {self.exit_interval}"
        return None
