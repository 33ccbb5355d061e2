"""Prompt files (JSONL, JSONL.gz, parquet), their one-line errors, the per-rank PromptSampler."""

import gzip
import json
import sys

import pytest

from megatron_renio.data.prompts import PromptRecord, PromptSampler, load_prompt_records
from megatron_renio.errors import UserInputError


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _row(problem="What is 1 + 1?", solution="1 + 1 = 2. \\boxed{2}", answer="2", **extra):
    row = {"problem": problem, "solution": solution, "answer": answer, **extra}
    return json.dumps({k: v for k, v in row.items() if v is not None})


def _error(paths, **kwargs):
    with pytest.raises(UserInputError) as err:
        load_prompt_records(paths, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- reading


def test_jsonl_records_sources_and_blank_lines(tmp_path):
    a = _write_lines(tmp_path / "a.jsonl", [_row("p1"), "", "   ", _row("p2", answer=None)])
    b = _write_lines(tmp_path / "b.jsonl", [_row("p3", solution=None, answer=7)])
    records = load_prompt_records([a, b])
    assert records == [
        PromptRecord("p1", "1 + 1 = 2. \\boxed{2}", "2", f"{a}:1"),
        PromptRecord("p2", "1 + 1 = 2. \\boxed{2}", None, f"{a}:4"),
        PromptRecord("p3", None, "7", f"{b}:1"),
    ]


def test_custom_field_names_and_gzip(tmp_path):
    path = tmp_path / "humaneval.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "def f():", "canonical_solution": "    return 1"}) + "\n")
    (record,) = load_prompt_records(
        [str(path)], problem_field="prompt", solution_field="canonical_solution",
        require_solution=True,
    )
    assert (record.problem, record.solution, record.answer) == ("def f():", "    return 1", None)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "data.parquet")
    pq.write_table(
        pa.table(
            {"problem": ["p1", "p2"], "solution": ["s1", None], "answer": [3, 4], "x": [0, 0]}
        ),
        path,
    )
    records = load_prompt_records([path])
    assert records == [
        PromptRecord("p1", "s1", "3", f"{path}:1"),
        PromptRecord("p2", None, "4", f"{path}:2"),
    ]
    message = _error([path], require_solution=True)
    assert path in message and "row 2" in message and "'solution'" in message


def test_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "data.parquet")
    pq.write_table(pa.table({"question": ["p1"]}), path)
    message = _error([path])
    assert path in message and "row 1" in message and "missing field 'problem'" in message


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    message = _error([str(path)])
    assert str(path) in message and "pip install pyarrow" in message


def test_broken_parquet(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    path.write_bytes(b"definitely not parquet")
    assert f"{path}: cannot read parquet" in _error([str(path)])


# ----------------------------------------------------------------------------- errors


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [_row(), _row(), '{"problem": "x",'])
    message = _error([path])
    assert message.startswith(f"{path} line 3: malformed JSON")


def test_non_object_line(tmp_path):
    path = _write_lines(tmp_path / "list.jsonl", [_row(), "[1, 2]"])
    assert _error([path]) == f"{path} line 2: expected a JSON object, got list"


def test_missing_problem_field(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [_row(), json.dumps({"question": "q"})])
    assert _error([path]) == f"{path} line 2: missing field 'problem' (name another field with --problem-field)"
    assert _error([path], problem_field="query") == (
        f"{path} line 1: missing field 'query' (name another field with --problem-field)")


def test_missing_solution_only_when_required(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [_row(), _row(), _row(solution=None)])
    assert load_prompt_records([path])[2].solution is None
    assert _error([path], require_solution=True) == (
        f"{path} line 3: missing field 'solution' (name another field with --solution-field)")
    null = _write_lines(tmp_path / "n.jsonl", [_row(), json.dumps({"problem": "p", "solution": None})])
    assert _error([null], require_solution=True) == (  # was "missing field", though the field is there
        f"{null} line 2: field 'solution' is null (name another field with --solution-field)")


def test_empty_required_solution(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [_row(solution="  ")])
    assert _error([path], require_solution=True) == f"{path} line 1: field 'solution' is empty"


def test_empty_problem(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [_row(), _row(problem=" \t")])
    assert _error([path]) == f"{path} line 2: field 'problem' is empty"


def test_wrong_field_types(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [_row(problem=5)])
    assert _error([path]) == f"{path} line 1: field 'problem' must be a string, got int"
    path = _write_lines(tmp_path / "e.jsonl", [_row(answer=[1, 2])])
    assert "line 1: field 'answer' must be a string or a number" in _error([path])


def test_empty_file(tmp_path):
    good = _write_lines(tmp_path / "good.jsonl", [_row()])
    empty = _write_lines(tmp_path / "empty.jsonl", ["", ""])
    assert _error([good, empty]) == f"prompt data file {empty} is empty (no records)"


def test_unknown_extension_and_missing_file(tmp_path):
    csv = _write_lines(tmp_path / "data.csv", ["problem", "x"])
    message = _error([csv])
    assert csv in message and "unknown extension" in message and ".jsonl" in message
    missing = str(tmp_path / "missing.jsonl")
    assert _error([missing]) == f"prompt data file {missing} not found"
    assert _error([]) == "no prompt data files given"


def test_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_row().encode() + b"\n" + '{"problem": "caf\xe9"}'.encode("latin-1") + b"\n")
    assert _error([str(path)]).startswith(f"{path} line 2: not valid UTF-8")


def test_a_lone_surrogate_escape_is_refused_naming_file_line_and_field(tmp_path):
    """Half of a surrogate pair (an emoji cut in two by a program that counts UTF-16 units) is valid JSON
    but no text a tokenizer takes: refused wherever it is in a record, keys and nested values included;
    a whole pair is an emoji."""
    from megatron_renio.data.records import RECORD_EXTENSIONS, read_rows

    good = _row(problem="a smile \U0001F600")  # json.dumps writes it as the pair \ud83d\ude00
    assert "\\ud83d\\ude00" in good
    cases = {
        '{"problem": "the cat \\ud800 sat"}': "field 'problem' holds \\ud800",
        '{"problem": "p", "meta": {"notes": ["ok", "cut \\ude00"]}}': "field 'meta' holds \\ude00",
        '{"problem": "p", "x\\udbff": 1}': "field 'x\\udbff' holds \\udbff",
        '{"problem": "p", "meta": {"k\\udc00": 1}}': "field 'meta' holds \\udc00",  # a nested key
    }
    for line, message in cases.items():
        path = _write_lines(tmp_path / "s.jsonl", [good, line])
        assert _error([path]).startswith(f"{path} line 2: {message}, half of a UTF-16 surrogate pair")
    assert load_prompt_records([_write_lines(tmp_path / "ok.jsonl", [good])])[0].problem == "a smile \U0001F600"
    array = tmp_path / "a.json"
    array.write_text('[{"problem": "p"}, {"problem": "\\uDFFF"}]')  # hex digits in either case
    with pytest.raises(UserInputError, match=rf"^{array} record 2: field 'problem' holds \\udfff"):
        list(read_rows(str(array), RECORD_EXTENSIONS))


def test_json_nested_too_deeply_names_the_line_or_file(tmp_path):
    from megatron_renio.data.records import RECORD_EXTENSIONS, read_rows

    path = _write_lines(tmp_path / "deep.jsonl", [_row(), "[" * 100000])
    assert _error([path]) == f"{path} line 2: JSON nested too deeply (deeper than Python's recursion limit)"
    array = tmp_path / "deep.json"
    array.write_text("[" * 100000)
    with pytest.raises(UserInputError, match=rf"^{array}: JSON nested too deeply"):
        list(read_rows(str(array), RECORD_EXTENSIONS))


def test_a_key_given_twice_or_an_integer_python_cannot_read_is_one_line(tmp_path):
    """json keeps a repeated key's last value silently and raises a bare ValueError for an integer of
    more than 4,300 digits: both are refused with the line (or, in a JSON array file, the file)."""
    from megatron_renio.data.records import RECORD_EXTENSIONS, read_rows

    twice = _write_lines(tmp_path / "twice.jsonl", [_row(), '{"problem": "first", "x": {"a": 1, "a": 2}}'])
    assert _error([twice]) == f"{twice} line 2: field 'a' given twice in one object"
    long = _write_lines(tmp_path / "long.jsonl", [_row(), '{"problem": "p", "answer": ' + "9" * 5000 + "}"])
    assert _error([long]) == f"{long} line 2: a JSON integer has more than 4300 digits, more than Python reads"
    array = tmp_path / "twice.json"
    array.write_text('[{"problem": "first", "problem": "second"}]')
    with pytest.raises(UserInputError, match=rf"^{array}: field 'problem' given twice in one object$"):
        list(read_rows(str(array), RECORD_EXTENSIONS))


def test_a_byte_order_mark_at_the_start_of_the_file_is_skipped(tmp_path):
    from megatron_renio.data.records import RECORD_EXTENSIONS, read_rows

    bom = "\ufeff"
    path = _write_lines(tmp_path / "bom.jsonl", [bom + _row("p1"), _row("p2")])
    assert [r.problem for r in load_prompt_records([path])] == ["p1", "p2"]
    packed = tmp_path / "bom.jsonl.gz"
    packed.write_bytes(gzip.compress((bom + _row("p1") + "\n").encode()))
    assert [r.problem for r in load_prompt_records([str(packed)])] == ["p1"]
    array = tmp_path / "bom.json"
    array.write_text(bom + json.dumps([{"problem": "p1"}]), encoding="utf-8")
    assert [row.fields for row in read_rows(str(array), RECORD_EXTENSIONS)] == [{"problem": "p1"}]
    inside = _write_lines(tmp_path / "inside.jsonl", [_row("p1"), bom + _row("p2")])  # only the file's start
    assert _error([inside]).startswith(f"{inside} line 2: malformed JSON")


def test_a_blank_or_nan_answer_is_no_answer_and_an_infinite_one_is_refused(tmp_path):
    """A blank answer or NaN (JSON's NaN; a float column's missing value in a pandas-written parquet) is no answer, as a
    missing field is (its samples are not graded), not the text "nan" that every sample would fail;
    an infinite number is refused."""
    rows = [_row()] + ['{"problem": "p", "answer": %s}' % value
                       for value in ("NaN", '""', '" \\t"', "7", "0.5", "3.0", "1e16")]
    path = _write_lines(tmp_path / "a.jsonl", rows)
    # a whole-number float is its digits: str(1e16) is '1e+16', which no boxed integer would match
    assert [r.answer for r in load_prompt_records([path])][1:] == [None, None, None, "7", "0.5", "3",
                                                                   "10000000000000000"]
    path = _write_lines(tmp_path / "inf.jsonl", [_row(), '{"problem": "p", "answer": -Infinity}'])
    assert _error([path]) == f"{path} line 2: field 'answer' must be a finite number, got -inf"


def test_corrupt_gzip_data(tmp_path):
    """A valid gzip header over damaged compressed data (zlib's error) is one line naming the file."""
    path = tmp_path / "damaged.jsonl.gz"
    data = bytearray(gzip.compress(("\n".join(_row() for _ in range(50)) + "\n").encode()))
    data[20:40] = bytes(20)
    path.write_bytes(bytes(data))
    assert _error([str(path)]).startswith(f"{path}: cannot read")


# ----------------------------------------------------------------------------- sampler


def _global_batches(num_records, global_batch, dp_size, seed, steps):
    """Per step, the concatenation of every rank's share (rank order)."""
    samplers = [PromptSampler(num_records, global_batch, r, dp_size, seed) for r in range(dp_size)]
    return [[i for s in samplers for i in s.next_batch()] for _ in range(steps)]


def test_sampler_deterministic():
    first = _global_batches(50, 8, 2, seed=3, steps=10)
    assert _global_batches(50, 8, 2, seed=3, steps=10) == first
    assert _global_batches(50, 8, 2, seed=4, steps=10) != first


def test_sampler_dp_shares_disjoint_and_cover_global_batch():
    num_records, global_batch = 40, 12
    single = _global_batches(num_records, global_batch, 1, seed=0, steps=7)
    for dp_size in (2, 3, 4):
        samplers = [PromptSampler(num_records, global_batch, r, dp_size, 0) for r in range(dp_size)]
        for step in range(7):
            shares = [s.next_batch() for s in samplers]
            assert all(len(share) == global_batch // dp_size for share in shares)
            flat = [i for share in shares for i in share]
            assert len(set(flat)) == global_batch  # disjoint
            assert flat == single[step]  # contiguous split of the same global batch


def test_sampler_epochs_cover_data_and_reshuffle():
    sampler = PromptSampler(30, 10, 0, 1, seed=7)
    assert sampler.batches_per_epoch == 3
    epoch0 = [i for _ in range(3) for i in sampler.next_batch()]
    assert sampler.epoch == 0 and sampler.position == 30
    epoch1 = [i for _ in range(3) for i in sampler.next_batch()]
    assert sampler.epoch == 1
    assert sorted(epoch0) == sorted(epoch1) == list(range(30))
    assert epoch0 != epoch1


def test_sampler_remainder_is_skipped_not_mixed():
    sampler = PromptSampler(25, 10, 0, 1, seed=0)
    first = sampler.next_batch() + sampler.next_batch()
    assert len(set(first)) == 20
    third = sampler.next_batch()  # 5 prompts left in epoch 0: starts epoch 1 instead
    assert sampler.epoch == 1 and sampler.position == 10
    assert third == sampler._permutation(1)[:10]


def test_sampler_resume_mid_epoch():
    reference = PromptSampler(23, 6, 1, 2, seed=11)
    for _ in range(5):  # crosses into epoch 1
        reference.next_batch()
    state = reference.state_dict()
    assert state["epoch"] == 1 and state["position"] == 12
    expected = [reference.next_batch() for _ in range(6)]

    resumed = PromptSampler(23, 6, 1, 2, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == expected

    used = PromptSampler(23, 6, 1, 2, seed=11)
    used.next_batch()  # holds epoch 0's order before loading a state from epoch 1
    used.load_state_dict(state)
    assert [used.next_batch() for _ in range(6)] == expected


def test_sampler_resume_with_other_dp_size():
    one = PromptSampler(40, 8, 0, 1, seed=2)
    for _ in range(3):
        one.next_batch()
    state = one.state_dict()
    expected = one.next_batch()
    shares = []
    for rank in range(4):
        s = PromptSampler(40, 8, rank, 4, seed=2)
        s.load_state_dict(state)
        shares += s.next_batch()
    assert shares == expected


def test_sampler_errors():
    with pytest.raises(UserInputError, match="--global-batch-size 10 is not divisible by .* 4"):
        PromptSampler(100, 10, 0, 4, seed=0)
    with pytest.raises(UserInputError, match="holds 5 prompts, fewer than --global-batch-size 8"):
        PromptSampler(5, 8, 0, 1, seed=0)
    from megatron_renio.training.components import fitting_data_label

    label = fitting_data_label(5, "examples", 3, 64)  # the count is what is left after the length filter
    with pytest.raises(UserInputError, match=r"^the prompt data holds 5 examples that fit --seq-length 64 \(3 longer "
                                             r"ones skipped\), fewer than --global-batch-size 8$"):
        PromptSampler(5, 8, 0, 1, seed=0, data_label=label)
    assert fitting_data_label(5, "prompts", 0, 64) == "the prompt data holds 5 prompts"
    with pytest.raises(UserInputError, match="^--global-batch-size 16 / --samples-per-prompt 16 = 1 prompts per step "
                                             "is not divisible by the data-parallel size 2$"):
        PromptSampler(100, 1, 0, 2, seed=0, batch_label="--global-batch-size 16 / --samples-per-prompt 16 = 1 prompts "
                                                        "per step")
    sampler = PromptSampler(40, 8, 0, 1, seed=0)
    with pytest.raises(UserInputError, match="saved for 41 prompts"):
        sampler.load_state_dict({"epoch": 0, "position": 8, "num_records": 41, "seed": 0})
    with pytest.raises(UserInputError, match="saved with seed 1"):
        sampler.load_state_dict({"epoch": 0, "position": 8, "num_records": 40, "seed": 1})


def test_sampler_state_is_valid_for_its_data_fingerprint_only():
    """Another fingerprint (the same number of other prompts) is refused; a state or a sampler without
    one (checkpoints of earlier versions) is not compared."""
    state = PromptSampler(40, 8, 0, 1, seed=0, data_fingerprint="aa").state_dict()
    assert state["data_fingerprint"] == "aa"
    with pytest.raises(UserInputError, match=r"^the checkpoint's prompt sampler was saved for other prompts \(40 of "
                                             r"them too: other files, another order or other text"):
        PromptSampler(40, 8, 0, 1, seed=0, data_fingerprint="bb").load_state_dict(state)
    for sampler, saved in ((PromptSampler(40, 8, 0, 1, seed=0, data_fingerprint="aa"), state),
                           (PromptSampler(40, 8, 0, 1, seed=0), state),
                           (PromptSampler(40, 8, 0, 1, seed=0, data_fingerprint="bb"),
                            {k: v for k, v in state.items() if k != "data_fingerprint"})):
        sampler.load_state_dict(saved)
