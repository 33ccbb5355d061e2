"""The built-in arithmetic task: correct worked solutions, disjoint seeded splits, its tokenizer."""

import json
import re

import pytest

from megatron_renio.data.arithmetic_task import (
    CHARACTERS,
    Difficulty,
    build_char_tokenizer,
    check_answer,
    make_splits,
    write_jsonl,
)
from megatron_renio.data.prompts import PromptRecord, load_prompt_records
from megatron_renio.data.templates import build_prompt_ids
from megatron_renio.data.tokenizer import load_tokenizer
from megatron_renio.errors import UserInputError

_EXPRESSION = re.compile(r"^(?:Compute|What is|Evaluate|Calculate) (.+)[.?]$")
_STEP = re.compile(r"^(-?\d+) ([-+*]) (\d+) = (-?\d+)\.$")


def _boxed(solution):
    return int(re.search(r"\\boxed\{(-?\d+)\}$", solution).group(1))


def test_solutions_are_correct_step_by_step():
    train, test = make_splits(seed=0, num_train=300, num_test=50)
    for p in train + test:
        expression = _EXPRESSION.match(p.problem).group(1)
        assert expression == p.expression
        value = eval(expression)  # noqa: S307 - generated digits and + - * ( ) only
        assert _boxed(p.solution) == value == int(p.answer)
        steps = p.solution.rsplit(" \\boxed", 1)[0].split(". ")
        current = None
        for step in steps:
            lhs, op, rhs, result = _STEP.match(step if step.endswith(".") else step + ".").groups()
            assert current is None or int(lhs) == current
            assert eval(f"{lhs} {op} {rhs}") == int(result)  # noqa: S307
            current = int(result)
        assert current == value
        assert 2 <= len(steps) <= 4


def test_difficulty_controls_operations_and_operands():
    difficulty = Difficulty(min_ops=3, max_ops=3, min_operand=50, max_operand=60)
    train, _ = make_splits(1, 200, 0, difficulty)
    for p in train:
        operands = [int(n) for n in re.findall(r"\d+", p.expression)]
        assert len(operands) == 4 and all(50 <= n <= 60 for n in operands)
    with pytest.raises(UserInputError, match="min_ops <= max_ops"):
        Difficulty(min_ops=4, max_ops=2)
    with pytest.raises(UserInputError, match="found only .* distinct problems"):
        make_splits(0, 50, 0, Difficulty(min_ops=1, max_ops=1, min_operand=1, max_operand=2))


def test_splits_disjoint_and_seeded():
    train, test = make_splits(seed=5, num_train=400, num_test=100)
    assert len(train) == 400 and len(test) == 100
    assert not {p.expression for p in train} & {p.expression for p in test}
    assert len({p.expression for p in train}) == 400
    assert make_splits(seed=5, num_train=400, num_test=100) == (train, test)
    assert make_splits(seed=6, num_train=400, num_test=100)[0] != train


def test_write_jsonl_loads_as_prompt_records(tmp_path):
    train, _ = make_splits(seed=2, num_train=5, num_test=0)
    path = str(tmp_path / "train.jsonl")
    write_jsonl(path, train)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert set(rows[0]) == {"problem", "solution", "answer"}
    records = load_prompt_records([path], require_solution=True)
    assert [(r.problem, r.solution, r.answer) for r in records] == [
        (p.problem, p.solution, p.answer) for p in train
    ]


def test_check_answer():
    assert check_answer("22 * 3 = 66. \\boxed{66}", "66")
    assert check_answer("\\boxed{5} no, wait: \\boxed{ -7 }", -7)
    assert not check_answer("\\boxed{66} then \\boxed{65}", "66")
    assert not check_answer("the answer is 66", "66")
    assert not check_answer("\\boxed{6x}", "6")


def test_char_tokenizer(tmp_path):
    tok = load_tokenizer(build_char_tokenizer(str(tmp_path / "tok")))
    real = tok.vocab_size - 4
    assert real == len(CHARACTERS) < 64
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    unk = 3
    train, _ = make_splits(seed=3, num_train=50, num_test=0)
    for p in train:
        ids = tok.encode(p.solution)
        assert unk not in ids and len(ids) == len(p.solution)
        assert tok.decode(ids) == p.solution
        record = PromptRecord(p.problem, p.solution, p.answer, "t:1")
        for role in ("student", "teacher"):
            prompt = build_prompt_ids(tok, record, "math", role, "opsd")
            assert unk not in prompt
            assert prompt[0] == tok.bos_id
    assert tok.decode(tok.encode("What is 2?")) == "what is 2?"
    assert tok.encode("é") == [unk]
    assert tok.id_to_piece(tok.encode("+")[0]) == "+"
    assert check_answer(tok.decode(tok.encode(train[0].solution) + [tok.eos_id]), train[0].answer)
