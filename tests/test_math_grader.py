"""Math grading: boxed-answer extraction and math_verify equivalence through grade_math."""

import threading
import time

import pytest

pytest.importorskip("math_verify")

from megatron_renio.eval.math_grader import extract_boxed_answer, grade_math  # noqa: E402

# (reference, boxed answer in the completion): each pair was checked against math_verify 0.9.
EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\frac{1}{2}", "1/2"),
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"\tfrac{1}{2}", "0.5"),
    (r"\frac{1}{2}", r"\frac{2}{4}"),
    (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"),
    (r"\frac{\sqrt2}{2}", r"\frac{1}{\sqrt{2}}"),
    (r"\sqrt{2}", "1.414214"),
    ("x^2+2x+1", "(x+1)^2"),
    (r"2\pi", r"2 \pi"),
    ("3+4i", "4i+3"),
    ("10", "10.0"),
    ("1000", "1,000"),
    ("1000", "1{,}000"),
    (r"50\%", "0.5"),
    ("[1, 3)", "[1,3)"),
    (r"(-\infty, 2]", r"(-\infty,2]"),
    (r"\{3,5\}", r"\{5, 3\}"),
    ("3,5", "5,3"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    ("5", r"5\text{ cm}"),
    ("5", "5 cm"),
    ("30", r"30^{\circ}"),
    ("5", r"\$5"),
    ("3", "x=3"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"\text{(C)}", "C"),
    (r"\textbf{(C)}", r"\text{(C)}"),
]

NOT_EQUIVALENT = [
    (r"\frac{1}{2}", "0.6"),
    ("0.5", "0.50001"),
    ("2", "3"),
    ("-1", "1"),
    (r"\sqrt{2}", "1.41"),
    (r"\pi", "3.14"),
    ("[1,3)", "(1,3)"),
    ("1,2", "1,3"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\3\end{pmatrix}"),
    (r"\text{Evelyn}", r"\text{Bob}"),
    ("5", ""),
]


@pytest.mark.parametrize("reference,answer", EQUIVALENT)
def test_equivalent_answers_are_correct(reference, answer):
    completion = f"Some reasoning... so the answer is $\\boxed{{{answer}}}$."
    assert grade_math(completion, reference)


@pytest.mark.parametrize("reference,answer", NOT_EQUIVALENT)
def test_different_answers_are_wrong(reference, answer):
    completion = f"Some reasoning... so the answer is $\\boxed{{{answer}}}$."
    assert not grade_math(completion, reference)


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is 1/2.",
        r"The answer is $\frac{1}{2}$.",
        r"Final: \boxed{1/2",  # truncated box
        "",
    ],
)
def test_completion_without_a_box_is_wrong(completion):
    assert extract_boxed_answer(completion) is None
    assert not grade_math(completion, r"\frac{1}{2}")


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\fbox{7}", "7"),
        (r"\boxed {  42 }", "42"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\left\{ x \right\}}", r"\left\{ x \right\}"),
        (r"\boxed{a{b{c}}d} trailing", "a{b{c}}d"),
        (r"\boxed{3} and later a cut-off \boxed{4", "3"),
        (r"\boxedx{3}", None),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so the answer is $\boxed 5$.", "5"),
        (r"\boxed 5", "5"),
        (r"\(\boxed 12\)", "12"),
        (r"\[\fbox -3\]", "-3"),
        ("\\boxed\n7", "7"),
        (r"$\boxed \frac12$", r"\frac12"),
        (r"$\boxed \$5$", r"\$5"),  # an escaped dollar is not the closing delimiter
        (r"\boxed{3} then \boxed 4", "3"),  # a braced box wins
        (r"The answer is \boxed{5}, written with \boxed as asked.", "5"),
        (r"answer: \boxed 5.", "5"),
        (r"\boxed 5, so", "5"),
        (r"\boxed 3 then a cut-off \boxed{4", "3"),
        (r"$\boxed $", None),
    ],
)
def test_a_box_without_braces_takes_the_next_token(text, expected):
    assert extract_boxed_answer(text) == expected


def test_a_box_without_braces_is_graded():
    assert grade_math(r"Hence $\boxed 5$.", "5")
    assert grade_math(r"answer: \boxed 5.", "5")
    assert not grade_math(r"Hence $\boxed 6$.", "5")


def test_an_escaped_brace_is_content_even_when_unbalanced():
    """After a backslash the next character is content: a lone escaped brace neither closes nor
    opens a level of the box."""
    assert extract_boxed_answer(r"\boxed{a\}b}") == r"a\}b"
    assert extract_boxed_answer(r"\boxed{x\{y} done") == r"x\{y"
    assert extract_boxed_answer(r"\boxed{\}") is None  # the only closing brace is escaped
    assert extract_boxed_answer(r"\boxed{1} \boxed{\}") == "1"


def test_only_the_last_box_is_graded():
    assert grade_math(r"First \boxed{3}, no wait: \boxed{4}", "4")
    assert not grade_math(r"First \boxed{4}, no wait: \boxed{3}", "4")


def test_reference_with_a_full_solution_uses_its_box():
    solution = r"We compute $2+2$ and get $\boxed{4}$, as claimed."
    assert grade_math(r"\boxed{4}", solution)
    assert not grade_math(r"\boxed{2}", solution)


def test_dollar_delimited_reference():
    assert grade_math(r"\boxed{0.5}", r"$\frac{1}{2}$")


def test_slow_comparison_times_out_as_wrong():
    started = time.monotonic()
    assert not grade_math(r"\boxed{9^{9^{9^9}}}", "3", timeout_s=0.5)
    assert time.monotonic() - started < 3.0


def test_a_slow_comparison_in_a_worker_thread_times_out_as_wrong():
    """Off the main thread each answer is graded in a child process, which enforces the same timeout."""
    results = {}

    def work():
        started = time.monotonic()
        results["graded"] = grade_math(r"\boxed{9^{9^{9^9}}}", "3", timeout_s=0.5)
        results["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert results["graded"] is False and results["seconds"] < 30.0, results


def test_loading_the_checker_does_not_count_against_the_first_answers_timeout(monkeypatch):
    """The first use of math_verify loads sympy and its LaTeX grammar (seconds on a loaded machine): it
    happens before the timer starts, so a right answer is not graded wrong for it."""
    from megatron_renio.eval import math_grader

    math_grader._load_checker.cache_clear()
    real, calls = math_grader._equivalent, []

    def first_use_is_slow(answer, reference):
        if not calls:
            time.sleep(0.5)  # as the first import and parse do
        calls.append(answer)
        return real(answer, reference)

    monkeypatch.setattr(math_grader, "_equivalent", first_use_is_slow)
    assert grade_math(r"\boxed{1/2}", "0.5", timeout_s=0.2)


def test_the_reference_is_math_verifys_gold_side():
    """math_verify is not symmetric: an interval answer matches a reference written as an inequality, not
    the other way round. The reference must be its gold (first) argument."""
    assert grade_math(r"The answer is \boxed{(1,2)}", "1<x<2", timeout_s=30)
    assert not grade_math(r"The answer is \boxed{1<x<2}", "(1,2)", timeout_s=30)


def test_outer_alarm_timer_is_restored():
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert grade_math(r"\boxed{1/2}", "0.5")
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_grading_from_a_worker_thread():
    results = {}

    def work():
        results["right"] = grade_math(r"\boxed{0.5}", r"\frac{1}{2}")
        results["wrong"] = grade_math(r"\boxed{0.6}", r"\frac{1}{2}")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert results == {"right": True, "wrong": False}


def test_non_positive_timeout_is_rejected():
    with pytest.raises(ValueError):
        grade_math(r"\boxed{1}", "1", timeout_s=0)
