"""Fault injection for the tests: a process that dies at a named point of an iteration, or a step
whose numbers turn non-finite.

Set ``MEGATRON_RENIO_FAULT=<fault>:<iteration>[:<rank>]`` in the environment, with a 1-based
iteration (for ``eval``: the evaluation's batch, counted from 1 by each rank after its graded records
are on disk) and optionally the one global rank it applies to (every rank otherwise). ``fault`` is one
of :data:`FATAL` (the process kills itself with SIGKILL when it reaches that point: no handler, no
cleanup, like an out-of-memory kill or a node loss) or :data:`NONFINITE` (``nan-logits``: the
student's logits of the step are NaN; ``nan-grad``: one entry of the reduced student gradient is
NaN behind a finite loss; ``nan-rollout``: the step's rollout reports a token drawn from non-finite
logits, behind a finite loss) or :data:`SLOW` (``slow-rollout``: the rollout takes
:data:`SLOW_ROLLOUT_S` seconds longer, as on a replica whose completions run long) or :data:`SIGNALLED`
(``sigterm-in-checkpoint``: the process sends itself SIGTERM while it writes the iteration's checkpoint,
as a preemption notice that arrives during a save). Unset, each point costs one dictionary lookup.
"""

import os
import re
import signal

from megatron_renio.errors import UserInputError

FATAL = ("rollout", "backward", "checkpoint", "eval")
NONFINITE = ("nan-logits", "nan-grad", "nan-rollout")
SLOW = ("slow-rollout",)
SIGNALLED = ("sigterm-in-checkpoint",)
#: The delay of ``slow-rollout``.
SLOW_ROLLOUT_S = 3.0


def fault_spec() -> str | None:
    """The value of ``MEGATRON_RENIO_FAULT`` (None: unset); a value of another form, or naming no known
    fault, is a :class:`UserInputError` (the trainer checks it at start-up)."""
    spec = os.environ.get("MEGATRON_RENIO_FAULT")
    if spec is not None and (spec.split(":")[0] not in FATAL + NONFINITE + SLOW + SIGNALLED
                             or not re.fullmatch(r"[\w-]+:[1-9]\d*(:\d+)?", spec)):
        raise UserInputError(f"MEGATRON_RENIO_FAULT={spec}: expected <fault>:<iteration>[:<rank>], the fault one "
                             f"of {', '.join(FATAL + NONFINITE + SLOW + SIGNALLED)}")
    return spec


def injected(fault: str, iteration: int) -> bool:
    """Whether ``MEGATRON_RENIO_FAULT`` names ``fault`` at ``iteration`` (and this rank)."""
    spec = fault_spec()
    if spec is None:
        return False
    here = f"{fault}:{iteration}"
    return spec == here or spec == f"{here}:{os.environ.get('RANK', '0')}"


def maybe_die(phase: str, iteration: int) -> None:
    """SIGKILL this process if ``MEGATRON_RENIO_FAULT`` names ``phase`` (one of :data:`FATAL`) at
    ``iteration`` (and this rank); send it SIGTERM at ``checkpoint`` if it names ``sigterm-in-checkpoint``."""
    if injected(phase, iteration):
        os.kill(os.getpid(), signal.SIGKILL)
    if phase == "checkpoint" and injected("sigterm-in-checkpoint", iteration):
        os.kill(os.getpid(), signal.SIGTERM)
