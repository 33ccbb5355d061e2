"""The exception types for bad user input and for a failure that another rank reports.

Every check at a boundary (flags, config files, data files, checkpoints, tokenizers) raises
:class:`UserInputError` with a single readable line that names the flag, file, line or field at
fault. Command-line entry points catch it, print ``error: <message>`` on stderr and exit with
status 2, without a traceback (unless ``--debug`` is given).

A collective that learns of one rank's error makes every rank raise, so that none waits for the
failed one until the timeout (:func:`megatron_renio.distributed.raise_if_any_rank`,
:func:`~megatron_renio.distributed.on_rank0`). The other ranks raise a copy that names the rank
which reports it (``reported_by``): a :class:`UserInputError` for bad input, a :class:`RankFailure`
for anything else. Entry points print a copy on global rank 0 only, so a job of a thousand ranks
shows the error twice (the failing rank and rank 0), not a thousand times; an error that every rank
finds alike (start-up checks run through :func:`~megatron_renio.distributed.on_every_rank`, or on
values the ranks agreed on) is printed once, by rank 0. An error in the flags, found before the ranks
can exchange anything, is printed once per node (:func:`~megatron_renio.entrypoint.run_command`).
"""

import contextlib


class UserInputError(ValueError):
    """Bad input from the user: a one-line message naming what is wrong and where.

    ``reported_by``: None where this rank found the problem; else the rank that found it and prints
    it (this rank stops with it).
    """

    def __init__(self, message: str, reported_by: int | None = None):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
        self.reported_by = reported_by


class RankFailure(RuntimeError):
    """Rank ``reported_by`` failed with an error other than bad input (its log has the traceback);
    raised on the other ranks so that they stop too."""

    def __init__(self, reported_by: int, described: str):
        super().__init__(f"rank {reported_by} failed: {described}")
        self.reported_by = reported_by


@contextlib.contextmanager
def about_flag(flag: str | None):
    """Reading the value of command-line flag ``flag`` (a path it gives): a :class:`UserInputError`
    raised inside starts with ``flag: ``, so that a message naming only the file also names the flag
    that gave it. ``flag`` None (the value came from no flag): messages pass unchanged."""
    try:
        yield
    except UserInputError as e:
        if flag is None:
            raise
        raise UserInputError(f"{flag}: {e}", e.reported_by) from e
