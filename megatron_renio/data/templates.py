"""Student and teacher prompts for OPD and OPSD.

Text
----
* Student prompt (both modes): the problem, a blank line, the task instruction.
* OPD teacher prompt: the same text as the student's (the teacher is a different model).
* OPSD teacher prompt (privileged context): the problem, the reference solution introduced by
  :data:`REFERENCE_INTRO`, then :data:`TRANSITION` and the task instruction, so that the teacher
  scores the student's completion as an attempt written *after* reading a worked solution::

      <problem>

      Here is a worked reference solution to this problem:
      <solution>

      Now that you have studied the reference solution, solve the problem again yourself, below.
      <instruction>

  For the coding task a solution that is not already fenced is put in a ```python block.

Tokens
------
When the tokenizer has a chat template the text is sent as one user message rendered with
``add_generation_prompt=True`` (the ids end where the assistant's reply begins). Otherwise the ids
are ``tokenizer.encode(text + "\\n", add_special_tokens=True)`` (BOS included when the tokenizer
adds one), the newline marking where the answer starts.
"""

from __future__ import annotations

from megatron_renio.data.prompts import PromptRecord
from megatron_renio.data.tokenizer import Tokenizer
from megatron_renio.errors import UserInputError

TASKS = ("math", "coding")
ROLES = ("student", "teacher")
MODES = ("opd", "opsd")

INSTRUCTIONS = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "coding": (
        "Think the problem through, then give your complete solution as a Python program "
        "in a single ```python code block."
    ),
}
REFERENCE_INTRO = "Here is a worked reference solution to this problem:"
TRANSITION = (
    "Now that you have studied the reference solution, solve the problem again yourself, below."
)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserInputError(f"unknown {name} '{value}' (expected one of: {', '.join(choices)})")


def build_prompt_text(record: PromptRecord, task: str, role: str, mode: str) -> str:
    """The prompt text for ``role`` ('student' | 'teacher') in ``mode`` ('opd' | 'opsd').

    Raises :class:`UserInputError` for an unknown task, role or mode, and for an OPSD teacher
    prompt whose record has no reference solution (naming the record's file and line).
    """
    _check_choice("task", task, TASKS)
    _check_choice("role", role, ROLES)
    _check_choice("mode", mode, MODES)
    instruction = INSTRUCTIONS[task]
    problem = record.problem.strip()
    if role == "student" or mode == "opd":
        return f"{problem}\n\n{instruction}"
    if record.solution is None or not record.solution.strip():
        raise UserInputError(
            f"{record.source}: OPSD needs a reference solution for the teacher prompt, "
            "but this record has none"
        )
    return f"{problem}\n\n{REFERENCE_INTRO}\n{answer_text(record.solution, task)}\n\n{TRANSITION}\n{instruction}"


def answer_text(solution: str, task: str) -> str:
    """A reference solution as the instruction asks for an answer: stripped, and for ``coding``
    inside a python code fence unless it already holds one (bare code from MBPP / APPS style data)."""
    solution = solution.strip()
    if task == "coding" and "```" not in solution:
        solution = f"```python\n{solution}\n```"
    return solution


def build_prompt_ids(
    tokenizer: Tokenizer, record: PromptRecord, task: str, role: str, mode: str
) -> list[int]:
    """Token ids of the prompt for ``role`` in ``mode`` (layout in the module docstring)."""
    text = build_prompt_text(record, task, role, mode)
    try:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    except UserInputError as e:  # a template that fails on some records only: name the record
        raise UserInputError(f"{record.source} ({role} prompt): {e}", e.reported_by) from e
    if ids is None:
        ids = tokenizer.encode(text + "\n", add_special_tokens=True)
    return ids
