"""Fault injection for the crash-recovery tests: die with SIGKILL at a named point of an iteration.

Set ``MEGATRON_RENIO_FAULT=<phase>:<iteration>`` in the environment of every rank, with phase one
of :data:`PHASES` and a 1-based iteration; the process kills itself (SIGKILL: no handler, no
cleanup, like an out-of-memory kill or a node loss) when it reaches that point. Unset, this costs
one dictionary lookup per point.
"""

import os
import signal

PHASES = ("rollout", "backward", "checkpoint")


def maybe_die(phase: str, iteration: int) -> None:
    """SIGKILL this process if ``MEGATRON_RENIO_FAULT`` names ``phase`` at ``iteration``."""
    if os.environ.get("MEGATRON_RENIO_FAULT") == f"{phase}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)
