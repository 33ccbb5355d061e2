"""Math answer grading: the last ``\\boxed{...}`` of a completion against a reference answer.

Contract
--------
* :func:`extract_boxed_answer` returns the content of the **last** complete ``\\boxed{...}`` or
  ``\\fbox{...}`` in a text (braces balanced, escaped braces ``\\{`` / ``\\}`` do not count), or
  the token after a brace-less ``\\boxed 5`` / ``\\fbox 5``, or ``None`` when there is none. A
  box whose closing brace is missing (a truncated completion) is skipped, so an earlier complete
  box is used if there is one.
* :func:`grade_math` is ``True`` only when the completion has a box and the boxed answer is
  equivalent to the reference according to the ``math_verify`` library (``parse`` + ``verify``,
  with the reference as the gold side). A completion without a box is graded wrong, never an
  error. A reference may itself contain a box (e.g. a full solution); its last box is used then.

What counts as equivalent (all checked in ``tests/test_math_grader.py``; math_verify 0.9):

* the same number in another notation: ``\\frac{1}{2}`` = ``\\dfrac12`` = ``1/2`` = ``0.5``;
  ``1{,}000`` = ``1,000`` = ``1000``; ``10`` = ``10.0``; ``50\\%`` = ``50`` = ``0.5``;
* decimals equal after rounding to 6 places: ``\\sqrt{2}`` = ``1.414214`` but not ``1.41``;
* symbolically equal expressions: ``\\frac{\\sqrt2}{2}`` = ``\\frac{1}{\\sqrt{2}}``,
  ``x^2+2x+1`` = ``(x+1)^2``, ``3+4i`` = ``4i+3``;
* intervals with the same end points and the same open/closed ends; sets and comma-separated
  lists compared as sets (``3,5`` = ``5,3``); matrices entry by entry;
* decorations that math_verify strips: units written with ``\\text{..}`` or plain (``5 cm`` = ``5``),
  degrees (``30^{\\circ}`` = ``30``), a dollar sign (``\\$5`` = ``5``), ``x=`` in front of a value;
* text answers compared case-insensitively after ``\\text{..}`` / ``\\textbf{..}`` is removed
  (``\\text{(C)}`` = ``C``).

Timeouts: one item (both parses and the comparison) is bounded by ``timeout_s`` of wall time;
a timed-out item is graded wrong. In the main thread the bound is a ``SIGALRM`` interval timer
(any timer the caller had set is restored afterwards), math_verify's own one-second-granular
timeouts are switched off so that they do not overwrite it. Signals only work in the main
thread, so called from any other thread the item is graded in a short-lived child process
(``python -m megatron_renio.eval.math_grader``, about a second of start-up) that is killed if it
overruns. The timer interrupts Python code between bytecodes; a single C call that never
returns is only stopped by the child-process path.
"""

from __future__ import annotations

import decimal
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

# ``\boxed`` / ``\fbox`` and then either an opening brace, or whitespace and a token: non-space
# characters (a backslash with the character after it as one) up to a closing ``$``, ``\)`` or
# ``\]`` delimiter.
_BOX_START = re.compile(
    r"\\(?:boxed|fbox)(?:\s*\{|\s+(?P<token>(?:\\[^\s)\]]|[^\s$\\])+))"
)

_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.S)  # a backslash and the character after it, or a brace
# Slack for the child process's interpreter start-up and imports, on top of ``timeout_s``.
_CHILD_STARTUP_ALLOWANCE_S = 30.0


class _SilenceDisabledTimeoutWarning(logging.Filter):
    """Drops math_verify's warning that its timeout is disabled: this module enforces its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_SilenceDisabledTimeoutWarning())


def number_answer(value: str | int | float) -> str:
    """A reference answer stored as a JSON or parquet string or number, as text: a string as it is; an
    int as ``str``; a float as the fixed-point digits of its shortest decimal form, without ``.0`` when
    whole (a float column of a pandas-written parquet holds every answer as a float). ``str`` would
    give ``'1e+16'`` and ``'1e-05'``, which math-verify matches to no boxed number, and ``int(1e23)``
    the binary value 99999999999999991611392. The shortest form is a guess at the number as written: a float that holds
    2**60 exactly reads 1152921504606847000 (written as a JSON integer, it stays exact)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, float):
        return str(value)
    if value == 0:
        return "0"
    number = decimal.Decimal(repr(float(value)))  # float(): numpy's repr of its float64 is np.float64(...)
    return format(number.to_integral_value() if value.is_integer() else number, "f")


def extract_boxed_answer(text: str) -> str | None:
    """The answer of the last complete box in ``text``: ``\\boxed`` or ``\\fbox`` followed by
    either a braced group or, without a brace, whitespace and a token.

    * Braced (``\\boxed{...}``): the content between the braces, stripped. Nested braces are
      balanced (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); a backslash makes the character
      after it content, so escaped braces ``\\{`` and ``\\}`` are not structure. A box whose
      closing brace is missing (a truncated completion) is skipped.
    * Brace-less (``\\boxed 5``), read only when there is no complete braced box (a later mention of
      the command in prose must not replace a braced answer): the run of non-space characters after
      the whitespace, ending before a closing ``$``, ``\\)`` or ``\\]`` delimiter (``$\\boxed 5$``
      gives ``5``), without trailing ``.``, ``,``, ``;`` or ``:`` (sentence punctuation); an escaped
      ``\\$`` is part of the token.

    Of each kind the box whose command starts last wins; ``None`` when ``text`` has no complete box.
    Time is linear in the length of ``text`` (one pass pairs every brace), also for a repetition loop
    of unclosed boxes.
    """
    matches = list(_BOX_START.finditer(text))
    closing = _closing_braces(text) if any(not match.group("token") for match in matches) else {}
    for match in reversed(matches):
        end = closing.get(match.end() - 1)  # the box's brace: never escaped (a letter or a space precedes it)
        if not match.group("token") and end is not None:
            return text[match.end() : end].strip()
    tokens = [match.group("token").rstrip(".,;:") for match in matches if match.group("token")]
    return next((token for token in reversed(tokens) if token), None)


def _closing_braces(text: str) -> dict[int, int]:
    """The position of the closing brace of every balanced ``{`` of ``text``, by the opening one's
    position; a backslash makes the character after it content (``\\{`` and ``\\}`` are not braces)."""
    closing, open_at = {}, []
    for match in _BRACE_OR_ESCAPE.finditer(text):
        ch = match.group()
        if ch == "{":
            open_at.append(match.start())
        elif ch == "}" and open_at:
            closing[open_at.pop()] = match.start()
    return closing


def _reference_answer(reference: str) -> str:
    """The answer part of a reference: its last box if it has one, else the text without ``$``."""
    boxed = extract_boxed_answer(reference)
    if boxed is not None:
        return boxed
    return reference.strip().strip("$").strip()


def _equivalent(answer: str, reference: str) -> bool:
    """math_verify equivalence of two bare answers, with math_verify's own timeouts off."""
    from math_verify import parse, verify

    gold = parse("\\boxed{" + reference + "}", parsing_timeout=None)
    pred = parse("\\boxed{" + answer + "}", parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


@functools.cache
def _load_checker() -> None:
    """Import math_verify and run it once (its parser loads sympy and the LaTeX grammar on first use):
    seconds that must not count against the first answer's timeout, or against every answer graded in a
    child process (a right answer was graded wrong when the import alone outlasted ``timeout_s``)."""
    _equivalent("1/2", "0.5")


class _Deadline(BaseException):
    """Raised by the SIGALRM handler; a BaseException so math_verify's ``except Exception`` lets it out."""


def _equivalent_with_alarm(answer: str, reference: str, timeout_s: float) -> bool:
    """:func:`_equivalent` bounded by an ITIMER_REAL timer (set once the checker is loaded:
    :func:`_load_checker`); main thread only."""

    def on_alarm(signum, frame):
        raise _Deadline()

    _load_checker()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    started = time.monotonic()
    try:
        try:
            return _equivalent(answer, reference)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        return False
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            remaining = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


def _package_root() -> str:
    """The directory that holds the ``megatron_renio`` package (for the child's PYTHONPATH)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _equivalent_in_child(answer: str, reference: str, timeout_s: float) -> bool:
    """:func:`_equivalent` in a child process that enforces ``timeout_s`` and is killed on overrun."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    request = json.dumps({"answer": answer, "reference": reference, "timeout_s": timeout_s})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_renio.eval.math_grader"],
            input=request,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s + _CHILD_STARTUP_ALLOWANCE_S,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and proc.stdout.strip() == "1"


def grade_math(completion: str, reference: str, timeout_s: float = 5.0) -> bool:
    """True when the last boxed answer of ``completion`` is equivalent to ``reference``.

    Missing box, unparsable answer, or more than ``timeout_s`` seconds spent: ``False``.
    See the module docstring for what counts as equivalent.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    answer = extract_boxed_answer(completion)
    if answer is None:
        return False
    reference = _reference_answer(reference)
    if threading.current_thread() is threading.main_thread():
        return _equivalent_with_alarm(answer, reference, timeout_s)
    return _equivalent_in_child(answer, reference, timeout_s)


def _child_main() -> None:
    """Worker for :func:`_equivalent_in_child`: JSON request on stdin, ``1`` or ``0`` on stdout."""
    request = json.load(sys.stdin)
    ok = _equivalent_with_alarm(request["answer"], request["reference"], request["timeout_s"])
    print("1" if ok else "0")


if __name__ == "__main__":
    _child_main()
