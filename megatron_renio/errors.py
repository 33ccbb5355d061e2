"""The one exception type for bad user input.

Every check at a boundary (flags, config files, data files, checkpoints, tokenizers) raises
:class:`UserInputError` with a single readable line that names the flag, file, line or field at
fault. Command-line entry points catch it, print ``error: <message>`` on stderr and exit with
status 2, without a traceback (unless ``--debug`` is given).
"""


class UserInputError(ValueError):
    """Bad input from the user: a one-line message naming what is wrong and where."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
