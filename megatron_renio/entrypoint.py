"""The ``main`` of every command: bad input becomes one line and exit status 2, never a traceback."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

from megatron_renio.errors import RankFailure, UserInputError


_TRUE = ("1", "true", "yes", "on")
# The modules whose warnings a command hides without --debug (run_command).
_QUIET_MODULES = r"megatron\.|torch\.distributed\.checkpoint\.|torch\.distributed\.c10d_logger$"


def debug_requested(argv: list[str]) -> bool:
    """Whether ``argv`` asks for ``--debug``, as the flag's parser reads it: its last occurrence
    decides, the flag alone (or before another flag) or with a true value, ``--debug=VALUE`` or
    ``--debug VALUE`` (1, true, yes, on). Used before parsing, so that a parse error shows its
    traceback too."""
    requested = False
    for i, arg in enumerate(argv):
        if arg == "--debug":
            following = argv[i + 1] if i + 1 < len(argv) else None
            requested = following is None or following.startswith("-") or following.lower() in _TRUE
        elif arg.startswith("--debug="):
            requested = arg.split("=", 1)[1].lower() in _TRUE
    return requested


def _env_rank(name: str) -> int | None:
    """The launcher's ``RANK`` or ``LOCAL_RANK`` (0 when unset); None when it is no number (the error
    that names it is then printed)."""
    value = os.environ.get(name, "0")
    return int(value) if value.isdigit() else None


def _parsed_debug(parsed, requested: bool) -> bool:
    """The parsed ``debug`` (a config file may set it), else ``requested``: commands keep it on their
    config or on its ``train`` part."""
    for holder in (parsed, getattr(parsed, "train", None)):
        value = getattr(holder, "debug", None)
        if isinstance(value, bool):
            return value
    return requested


def run_command(parse: Callable, run: Callable, argv: list[str] | None) -> int:
    """A model command's ``main``: ``run(parse(argv))``, then tear the process groups down.

    Bad input prints ``error: <one line>`` on stderr (ranks other than 0 name themselves) and gives
    exit status 2; an error in the flags (parsing reads only the command line and the files it names,
    alike for the ranks of a node) is printed by each node's local rank 0 alone. A copy of another
    rank's error (``reported_by``, :mod:`~megatron_renio.errors`) is
    printed on rank 0 only, naming that rank, and gives exit status 2 (bad input) or 1 (another
    failure, whose traceback is in that rank's log). With ``--debug`` the exception propagates with its
    traceback. Ctrl-C (SIGINT) ends the command with one line per node and exit status 130, not a
    traceback per rank. Without ``--debug``, warnings raised inside Megatron-Core, torch.distributed.checkpoint
    (deprecation notices of checkpoint loading) and torch.distributed's deprecation wrapper (the
    collectives Megatron's distributed optimizer calls by their old names) are not shown: every rank
    would print them, and none is the user's to act on.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        try:
            parsed = parse(argv)
        except UserInputError as e:
            if _env_rank("LOCAL_RANK") not in (0, None):
                e.reported_by = 0  # parsing reads argv and the files it names: the node's local rank 0 prints it
            raise
        debug = _parsed_debug(parsed, debug)
        if not debug:
            warnings.filterwarnings("ignore", module=_QUIET_MODULES)
        run(parsed)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of a node: one line from the node's first rank
        if debug:
            raise
        if _env_rank("LOCAL_RANK") in (0, None):
            print("interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        from megatron_renio import distributed

        distributed.report_failed_start(e)  # before the process groups: the other nodes' ranks stop too
        if not isinstance(e, (UserInputError, RankFailure)):
            raise
        rank = _env_rank("RANK")
        source = rank if e.reported_by is None else e.reported_by
        if isinstance(e, RankFailure):
            line = f"error: {e} (its traceback is in rank {source}'s log)"
        else:
            line = f"error: {e}" if source in (0, None) else f"error (rank {source}): {e}"
        if source == rank or rank == 0:
            print(line, file=sys.stderr, flush=True)
        if debug:
            raise
        return 2 if isinstance(e, UserInputError) else 1
    finally:
        import torch

        if torch.distributed.is_initialized():
            from megatron_renio import distributed

            distributed.destroy()
        else:  # a failed start may have patched torch for the CPU without a process group
            from megatron_renio import cpu_backend

            cpu_backend.deactivate()
    return 0
