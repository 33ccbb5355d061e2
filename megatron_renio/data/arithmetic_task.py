"""The quickstart's built-in task: multi-step integer arithmetic with worked solutions.

Problems are generated from a seed. Each one is a left-to-right chain of 2-4 operations (``+``,
``-``, ``*``) on integers drawn from an operand range, written with the parentheses ordinary
precedence needs, e.g. ``Compute (17 + 5) * 3 - 8.``. The solution evaluates one operation per
step and ends with the boxed result: ``17 + 5 = 22. 22 * 3 = 66. 66 - 8 = 58. \\boxed{58}``.

:func:`make_splits` returns disjoint train and test splits (no expression appears in both);
:func:`write_jsonl` writes the ``problem``, ``solution`` and ``answer`` fields that
:func:`megatron_renio.data.prompts.load_prompt_records` reads. :func:`build_char_tokenizer` saves a
character-level Hugging Face tokenizer folder (59 characters + 4 special tokens) that covers the
problems, the solutions and the math prompts of :mod:`megatron_renio.data.templates`; it lowercases
its input, so its decoded text is lowercase. :func:`check_answer` grades a completion by its last
``\\boxed{...}`` integer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from typing import Sequence

from megatron_renio.errors import UserInputError

_OPERATORS = ("+", "-", "*")
_PHRASINGS = ("Compute {}.", "What is {}?", "Evaluate {}.", "Calculate {}.")

# The character vocabulary: lowercase letters, digits and the punctuation the task and the math
# templates use. The tokenizer lowercases its input first.
CHARACTERS = (
    "abcdefghijklmnopqrstuvwxyz"
    "0123456789"
    " \n.,:;!?'(){}[]+-*/=\\_`"
)
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard the generated problems are: operations per problem and operand range (inclusive)."""

    min_ops: int = 2
    max_ops: int = 4
    min_operand: int = 1
    max_operand: int = 20

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise UserInputError(
                f"arithmetic task: need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}"
            )
        if not 0 <= self.min_operand <= self.max_operand:
            raise UserInputError(
                "arithmetic task: need 0 <= min_operand <= max_operand, "
                f"got {self.min_operand}, {self.max_operand}"
            )


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    """One generated problem; ``answer`` is the decimal text of the result."""

    expression: str
    problem: str
    solution: str
    answer: str


def _generate(rng: random.Random, difficulty: Difficulty) -> ArithmeticProblem:
    """Draw one problem: operands, operators, phrasing, and its step-by-step solution."""

    def operand() -> int:
        return rng.randint(difficulty.min_operand, difficulty.max_operand)

    value = operand()
    expression = str(value)
    last_op = None  # the top-level operator of ``expression``
    steps = []
    for _ in range(rng.randint(difficulty.min_ops, difficulty.max_ops)):
        op, rhs = rng.choice(_OPERATORS), operand()
        if op == "*" and last_op in ("+", "-"):
            expression = f"({expression})"
        expression = f"{expression} {op} {rhs}"
        result = {"+": value + rhs, "-": value - rhs, "*": value * rhs}[op]
        steps.append(f"{value} {op} {rhs} = {result}.")
        value, last_op = result, op
    return ArithmeticProblem(
        expression=expression,
        problem=rng.choice(_PHRASINGS).format(expression),
        solution=" ".join(steps) + f" \\boxed{{{value}}}",
        answer=str(value),
    )


def make_splits(
    seed: int, num_train: int, num_test: int, difficulty: Difficulty = Difficulty()
) -> tuple[list[ArithmeticProblem], list[ArithmeticProblem]]:
    """Generate ``num_train + num_test`` problems with distinct expressions and split them.

    The same arguments always give the same splits. Raises :class:`UserInputError` when the
    difficulty allows too few distinct expressions for the requested sizes.
    """
    if num_train < 0 or num_test < 0:
        raise UserInputError(
            f"arithmetic task: split sizes must be >= 0, got {num_train}, {num_test}"
        )
    rng = random.Random(seed)
    wanted = num_train + num_test
    seen: set[str] = set()
    problems: list[ArithmeticProblem] = []
    attempts = 0
    while len(problems) < wanted:
        attempts += 1
        if attempts > 20 * wanted + 1000:
            raise UserInputError(
                f"arithmetic task: found only {len(problems)} distinct problems of {wanted} "
                "requested; widen the operand range or the number of operations"
            )
        problem = _generate(rng, difficulty)
        if problem.expression not in seen:
            seen.add(problem.expression)
            problems.append(problem)
    return problems[:num_train], problems[num_train:]


def write_jsonl(path: str, problems: Sequence[ArithmeticProblem]) -> None:
    """Write ``problems`` as JSONL records with the fields problem, solution and answer."""
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"problem": p.problem, "solution": p.solution, "answer": p.answer}))
            f.write("\n")


_BOXED_INTEGER = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def check_answer(completion: str, answer: str | int) -> bool:
    """True when the last ``\\boxed{<integer>}`` in ``completion`` equals ``answer``."""
    found = _BOXED_INTEGER.findall(completion)
    return bool(found) and int(found[-1]) == int(answer)


def build_char_tokenizer(out_dir: str) -> str:
    """Save the task's character-level tokenizer as a Hugging Face folder; return ``out_dir``.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then :data:`CHARACTERS` in order.
    Input is lowercased; a character outside the vocabulary becomes ``<unk>``; encoding a whole
    input with special tokens prepends ``<bos>``; decoding concatenates characters.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    # A BPE model without merges splits every input into single characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
