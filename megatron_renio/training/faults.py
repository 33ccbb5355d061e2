"""Fault injection for the crash-recovery tests: die with SIGKILL at a named point of an iteration.

Set ``MEGATRON_RENIO_FAULT=<phase>:<iteration>[:<rank>]`` in the environment, with phase one of
:data:`PHASES`, a 1-based iteration and optionally the one global rank that should die (every rank
otherwise); the process kills itself (SIGKILL: no handler, no cleanup, like an out-of-memory kill or
a node loss) when it reaches that point. Unset, this costs one dictionary lookup per point.
"""

import os
import signal

PHASES = ("rollout", "backward", "checkpoint")


def maybe_die(phase: str, iteration: int) -> None:
    """SIGKILL this process if ``MEGATRON_RENIO_FAULT`` names ``phase`` at ``iteration`` (and this rank)."""
    fault = os.environ.get("MEGATRON_RENIO_FAULT")
    if fault is None:
        return
    here = f"{phase}:{iteration}"
    if fault == here or fault == f"{here}:{os.environ.get('RANK', '0')}":
        os.kill(os.getpid(), signal.SIGKILL)
