"""Student / teacher prompt text and ids, plain and through a chat template."""

import pytest
from transformers import AutoTokenizer

from megatron_renio.data.arithmetic_task import build_char_tokenizer
from megatron_renio.data.prompts import PromptRecord
from megatron_renio.data.templates import (
    INSTRUCTIONS,
    REFERENCE_INTRO,
    TRANSITION,
    build_prompt_ids,
    build_prompt_text,
)
from megatron_renio.data.tokenizer import load_tokenizer
from megatron_renio.errors import UserInputError

RECORD = PromptRecord(
    problem="compute (2 + 3) * 4.",
    solution="2 + 3 = 5. 5 * 4 = 20. \\boxed{20}",
    answer="20",
    source="train.jsonl:7",
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    return load_tokenizer(build_char_tokenizer(str(tmp_path_factory.mktemp("plain"))))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    folder = build_char_tokenizer(str(tmp_path_factory.mktemp("base")))
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf.chat_template = CHAT_TEMPLATE
    chat_folder = str(tmp_path_factory.mktemp("chat"))
    hf.save_pretrained(chat_folder)
    return load_tokenizer(chat_folder)


def test_student_prompt_has_problem_and_instruction_but_no_solution():
    for mode in ("opd", "opsd"):
        text = build_prompt_text(RECORD, "math", "student", mode)
        assert text == f"{RECORD.problem}\n\n{INSTRUCTIONS['math']}"
        assert RECORD.solution not in text and REFERENCE_INTRO not in text


def test_opsd_teacher_prompt_has_solution_and_transition():
    text = build_prompt_text(RECORD, "math", "teacher", "opsd")
    assert text.startswith(RECORD.problem)
    assert f"{REFERENCE_INTRO}\n{RECORD.solution}" in text
    assert text.index(RECORD.solution) < text.index(TRANSITION) < text.index(INSTRUCTIONS["math"])
    assert "\\boxed{}" in text


def test_opd_teacher_prompt_equals_student_prompt():
    assert build_prompt_text(RECORD, "math", "teacher", "opd") == build_prompt_text(
        RECORD, "math", "student", "opd"
    )


def test_coding_prompts():
    record = PromptRecord("Write f returning 1.", "def f():\n    return 1", None, "c.jsonl:1")
    student = build_prompt_text(record, "coding", "student", "opsd")
    assert "```python" in student and "return 1" not in student
    teacher = build_prompt_text(record, "coding", "teacher", "opsd")
    assert "```python\ndef f():\n    return 1\n```" in teacher
    fenced = PromptRecord("p", "```python\nprint(1)\n```", None, "c.jsonl:2")
    assert build_prompt_text(fenced, "coding", "teacher", "opsd").count("```python") == 2


def test_plain_prompt_ids(plain_tokenizer):
    ids = build_prompt_ids(plain_tokenizer, RECORD, "math", "student", "opsd")
    assert ids[0] == plain_tokenizer.bos_id
    text = build_prompt_text(RECORD, "math", "student", "opsd")
    assert plain_tokenizer.decode(ids) == text.lower() + "\n"


def test_teacher_ids_contain_solution_student_ids_do_not(plain_tokenizer):
    solution_ids = plain_tokenizer.encode(RECORD.solution)
    student = build_prompt_ids(plain_tokenizer, RECORD, "math", "student", "opsd")
    teacher = build_prompt_ids(plain_tokenizer, RECORD, "math", "teacher", "opsd")

    def contains(seq, sub):
        return any(seq[k : k + len(sub)] == sub for k in range(len(seq) - len(sub) + 1))

    assert contains(teacher, solution_ids) and not contains(student, solution_ids)


def test_chat_template_path(chat_tokenizer, plain_tokenizer):
    text = build_prompt_text(RECORD, "math", "teacher", "opsd")
    ids = build_prompt_ids(chat_tokenizer, RECORD, "math", "teacher", "opsd")
    assert ids == chat_tokenizer.encode(f"<bos>user: {text}\nassistant:\n")
    assert chat_tokenizer.decode(ids).startswith("user: compute (2 + 3) * 4.")
    assert chat_tokenizer.decode(ids).endswith("\nassistant:\n")
    assert ids != build_prompt_ids(plain_tokenizer, RECORD, "math", "teacher", "opsd")


def test_errors():
    no_solution = PromptRecord("compute 1 + 1.", None, "2", "data/train.jsonl:12")
    assert build_prompt_text(no_solution, "math", "teacher", "opd")  # OPD needs no solution
    with pytest.raises(UserInputError, match=r"^data/train.jsonl:12: OPSD needs a reference"):
        build_prompt_text(no_solution, "math", "teacher", "opsd")
    with pytest.raises(UserInputError, match="unknown task 'poetry'"):
        build_prompt_text(RECORD, "poetry", "student", "opd")
    with pytest.raises(UserInputError, match="unknown role 'judge'"):
        build_prompt_text(RECORD, "math", "judge", "opd")
    with pytest.raises(UserInputError, match="unknown mode 'sft'"):
        build_prompt_text(RECORD, "math", "student", "sft")
