"""`megatron-renio analyze`: reflection counts, lengths, weight AUC, report files, input errors."""

import json
import os
import random
import re
import shutil
import statistics
import sys

import numpy as np
import pytest

from megatron_renio.errors import UserInputError
from megatron_renio.eval.analysis import OUTPUT_FILES, analyze, auc_incorrect, load_generations, main
from megatron_renio.eval.reflection import DEFAULT_PHRASES, count_phrases, word_tokens
from tests.python_forkserver import run_python

# Surface forms of each default phrase (case, punctuation, hyphenation vary).
VARIANTS = {
    "wait": ["Wait,", "wait", "WAIT!", "(wait)"],
    "hmm": ["Hmm.", "hmm,"],
    "however": ["However,", "however"],
    "alternatively": ["Alternatively,"],
    "let me check": ["Let me check:", "let me check"],
    "verify": ["verify", "Verify:"],
    "double check": ["double-check", "Double check", "DOUBLE-CHECK"],
    "on second thought": ["On second thought,"],
}
# One-token words that must not count as any phrase ("waiting", "verified", ...).
FILLER = ["the", "number", "is", "waiting", "verified", "checks", "double", "let", "me", "thought", "x1", "so"]


def _build(rng, counts):
    """Text with exactly ``counts[phrase]`` occurrences of each phrase, and its word count."""
    pieces = []
    for phrase, n in counts.items():
        pieces += [rng.choice(VARIANTS[phrase]) for _ in range(n)]
    pieces += [rng.choice(FILLER) for _ in range(rng.randint(5, 40))]
    rng.shuffle(pieces)
    # "double" / "let me" filler right before a phrase could form a phrase; a separator word avoids it.
    text = " the ".join(pieces)
    words = sum(len(p.replace("-", " ").split()) for p in pieces) + len(pieces) - 1
    return text, words


def _fixture(rng, n, with_tokens=True, with_weights=True):
    records, expected = [], {g: {p: 0 for p in DEFAULT_PHRASES} for g in ("correct", "incorrect")}
    lengths = {"correct": [], "incorrect": []}
    for i in range(n):
        correct = i % 3 != 0
        group = "correct" if correct else "incorrect"
        counts = {p: rng.randint(0, 3 if group == "incorrect" else 1) for p in DEFAULT_PHRASES}
        text, words = _build(rng, counts)
        record = {"completion": text, "correct": correct}
        length = words
        if with_tokens:
            length = record["num_tokens"] = words + rng.randint(0, 30)
        if with_weights:
            record["weight"] = round(rng.uniform(0.5, 2.0) + (0.0 if correct else 0.4), 1)
        records.append(record)
        lengths[group].append(length)
        for p, c in counts.items():
            expected[group][p] += c
    return records, expected, lengths


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _brute_force_auc(pos, neg):
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_tokenisation_and_phrase_matching():
    tokens = word_tokens("Wait, WAIT... waiting! Let me double-check; let me check it. Isn't it verified? Verify.")
    counts = count_phrases(tokens, ["wait", "double check", "let me check", "verify", "isn't"])
    assert counts == {"wait": 2, "double check": 1, "let me check": 1, "verify": 1, "isn't": 1}
    assert count_phrases(word_tokens("ha ha ha"), ["ha ha"]) == {"ha ha": 2}
    with pytest.raises(ValueError):
        count_phrases(tokens, ["..."])
    # letters and digits of any script; underscores and other punctuation separate tokens
    assert word_tokens("Café NAÏVE—Ответ: 42; 等等, wait… snake_case L'été") == [
        "café", "naïve", "ответ", "42", "等等", "wait", "snake", "case", "l'été"]
    assert count_phrases(word_tokens("Attends, café... attendsx, ATTENDS"), ["attends", "café"]) == {
        "attends": 2, "café": 1}


def test_non_ascii_phrases_and_word_lengths(tmp_path):
    records = [{"completion": "等等, 我再检查一下。 Attends... Vérifions.", "correct": False},
               {"completion": "Donc ça fait 4.", "correct": True}]
    out = tmp_path / "o"
    assert main(["--generations", _write(tmp_path / "g.jsonl", records), "--out", str(out),
                 "--phrases", "等等, vérifions"]) == 0
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert groups["incorrect"]["total_length"] == 4  # 等等 | 我再检查一下 | attends | vérifions
    assert groups["correct"]["total_length"] == 4  # donc | ça | fait | 4
    assert {p: r["count"] for p, r in groups["incorrect"]["reflection"].items()} == {
        "等等": 1, "vérifions": 1, "all": 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_count(seed):
    rng = random.Random(seed)
    pos = [round(rng.gauss(1.2, 0.5), 1) for _ in range(rng.randint(1, 40))]
    neg = [round(rng.gauss(1.0, 0.5), 1) for _ in range(rng.randint(1, 40))]
    assert auc_incorrect(pos, neg) == pytest.approx(_brute_force_auc(pos, neg))


def test_auc_edge_cases():
    assert auc_incorrect([2.0, 3.0], [1.0]) == 1.0
    assert auc_incorrect([1.0], [2.0, 3.0]) == 0.0
    assert auc_incorrect([1.0, 1.0], [1.0]) == 0.5
    assert auc_incorrect([], [1.0]) is None


def test_analyze_reports_known_counts(tmp_path, capsys):
    rng = random.Random(1234)
    records, expected, lengths = _fixture(rng, 30)
    path = _write(tmp_path / "gens.jsonl", records)
    out = tmp_path / "report"
    assert main(["--generations", path, "--out", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["lengths.png", "reflection.png", "report.md", "summary.json", "weights.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["length_unit"] == "tokens"
    for group in ("correct", "incorrect"):
        g = summary["groups"][group]
        total = sum(lengths[group])
        assert g["count"] == len(lengths[group])
        assert g["total_length"] == total
        assert g["length"]["mean"] == pytest.approx(total / len(lengths[group]))
        ordered = sorted(lengths[group])
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        assert g["length"]["median"] == pytest.approx(median)
        assert ordered[int(0.8 * len(ordered))] <= g["length"]["p90"] <= ordered[-1]
        for phrase in DEFAULT_PHRASES:
            assert g["reflection"][phrase]["count"] == expected[group][phrase], (group, phrase)
            assert g["reflection"][phrase]["per_1k"] == pytest.approx(1000 * expected[group][phrase] / total)
        all_count = sum(expected[group].values())
        assert g["reflection"]["all"]["count"] == all_count
    weights = {
        group: [r["weight"] for r in records if r["correct"] == (group == "correct")]
        for group in ("correct", "incorrect")
    }
    assert summary["weight"]["correct"]["mean"] == pytest.approx(sum(weights["correct"]) / len(weights["correct"]))
    assert summary["weight"]["auc_incorrect"] == pytest.approx(
        _brute_force_auc(weights["incorrect"], weights["correct"])
    )
    report = (out / "report.md").read_text()
    assert f"{summary['weight']['auc_incorrect']:.3f}" in report
    assert "![lengths.png](lengths.png)" in report
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_word_lengths_without_num_tokens_and_no_weights(tmp_path):
    rng = random.Random(7)
    records, expected, lengths = _fixture(rng, 12, with_tokens=False, with_weights=False)
    path = _write(tmp_path / "g.jsonl", records)
    out = tmp_path / "o"
    assert main(["--generations", path, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["length_unit"] == "words"
    assert summary["weight"] is None
    assert not (out / "weights.png").exists()
    for group in ("correct", "incorrect"):
        assert summary["groups"][group]["total_length"] == sum(lengths[group])
        assert summary["groups"][group]["reflection"]["wait"]["count"] == expected[group]["wait"]


def test_custom_phrases(tmp_path):
    records = [
        {"completion": "Oops, oops. I see.", "correct": False},
        {"completion": "I see it now; oops", "correct": True},
    ]
    out = tmp_path / "o"
    assert main(["--generations", _write(tmp_path / "g.jsonl", records), "--out", str(out),
                 "--phrases", "oops, i see"]) == 0
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert groups["incorrect"]["reflection"]["oops"]["count"] == 2
    assert groups["correct"]["reflection"]["i see"]["count"] == 1
    out2 = tmp_path / "o2"  # a repeated phrase counts once in the total
    assert main(["--generations", _write(tmp_path / "g.jsonl", records), "--out", str(out2),
                 "--phrases", "oops, i see, oops"]) == 0
    assert json.loads((out2 / "summary.json").read_text())["groups"]["incorrect"]["reflection"]["all"]["count"] == 3


def test_phrase_named_all_is_refused(tmp_path, capsys):
    path = _write(tmp_path / "g.jsonl", [{"completion": "all of it", "correct": True}])
    assert main(["--generations", path, "--out", str(tmp_path / "o"), "--phrases", "wait, all"]) == 2
    assert "'all' names the total" in capsys.readouterr().err


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "o"
    path = _write(tmp_path / "g.jsonl", [{"completion": "wait", "correct": True, "weight": 1.0}])
    assert main(["--generations", path, "--out", str(out)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["report.md", "summary.json"]


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"completion": "a", "correct": true}', '{"completion": "b", "correct": '], r"g\.jsonl line 2: malformed JSON \(Expecting value, column 32\)"),
        (['{"completion": "a"}', '{"completion": "b", "correct": null}'],
         r"g\.jsonl: no record has a grade \(field 'correct'; 2 records read\)"),
        (['{"correct": false}'], r"g\.jsonl line 1: missing field 'completion'"),
        (['{"completion": "a", "correct": "yes"}'], r"g\.jsonl line 1: field 'correct' must be true or false"),
        (['{"completion": "a", "correct": true, "weight": "big"}'], r"g\.jsonl line 1: field 'weight'"),
        (['{"completion": "a", "correct": true, "num_tokens": -3}'], r"g\.jsonl line 1: field 'num_tokens'"),
        # integers too big for a float
        (['{"completion": "a", "correct": true}', '{"completion": "b", "correct": true, "weight": 1%s}' % ("0" * 400)],
         r"g\.jsonl line 2: field 'weight' must be a finite number"),
        (['{"completion": "a", "correct": true, "num_tokens": 2%s}' % ("0" * 308)],
         r"g\.jsonl line 1: field 'num_tokens' must be a non-negative integer \(at most about 1\.8e308\)"),
        (['["a", true]'], r"g\.jsonl line 1: expected a JSON object"),
        ([""], r"no generations"),
    ],
)
def test_bad_input_exits_2_without_output(tmp_path, capsys, lines, message):
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["--generations", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err)
    assert sorted(os.listdir(tmp_path)) == ["g.jsonl"]  # no output, no staging directory


def test_generations_given_twice_are_refused_not_cut_to_the_last_files(tmp_path, capsys):
    """--generations a --generations b kept b alone (argparse's last value) and analysed half the data."""
    files = [_write(tmp_path / f"g{i}.jsonl", [{"completion": "a", "correct": True}]) for i in range(2)]
    assert main(["--generations", files[0], "--generations", files[1], "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "error: --generations given twice: give all its values after one --generations\n"
    assert not (tmp_path / "out").exists()


def test_gzipped_json_array_and_parquet_read_like_jsonl(tmp_path, capsys):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"completion": "wait, so 4", "correct": False, "weight": 0.5, "num_tokens": 4},
               {"completion": "so 3", "correct": True, "weight": 1.5, "num_tokens": 2}]
    plain = tmp_path / "g.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records))
    with gzip.open(tmp_path / "g.json.gz", "wt") as f:
        json.dump(records, f)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "g.parquet")
    expected = analyze(load_generations(str(plain)))
    for name in ("g.json.gz", "g.parquet"):
        assert main(["--generations", str(tmp_path / name)]) == 0
        assert json.loads((tmp_path / "g_analysis" / "summary.json").read_text()) == expected
        shutil.rmtree(tmp_path / "g_analysis")  # the default --out drops the whole extension
    # no abbreviated flags, as in every other command; a bad flag is one line, as any bad input
    assert main(["--generations", str(plain), "--over"]) == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --over\n"
    assert main(["--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: the following arguments are required: --generations\n"
    with pytest.raises(UserInputError, match="^unrecognized arguments: --bogus$"):  # --debug shows the traceback
        main(["--generations", str(plain), "--bogus", "--debug"])


def test_missing_file_and_existing_output(tmp_path, capsys):
    assert main(["--generations", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []

    path = _write(tmp_path / "g.jsonl", [{"completion": "wait", "correct": True, "weight": 1.0},
                                         {"completion": "so", "correct": False, "weight": 2.0}])
    out = tmp_path / "o"
    assert main(["--generations", path, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == sorted(OUTPUT_FILES)  # every file analyze writes (weights, matplotlib)
    (out / "summary.json").write_text("old")
    assert main(["--generations", path, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "old"
    assert main(["--generations", path, "--out", str(out), "--overwrite"]) == 0  # an earlier output is replaced
    assert json.loads((out / "summary.json").read_text())["num_generations"] == 2
    assert sorted(os.listdir(tmp_path)) == ["g.jsonl", "o"]
    # --overwrite replaces only a folder of analyze's files: anything else there is refused, folders too
    for name, make in (("notes.txt", lambda p: p.write_text("mine")), ("summary.json", os.mkdir)):
        other = tmp_path / f"other_{name}"
        other.mkdir()
        make(other / name)
        assert main(["--generations", path, "--out", str(other), "--overwrite"]) == 2
        assert capsys.readouterr().err == (f"error: --out {other}: holds {name!r}, which analyze does not write, so "
                                           "the folder is not replaced; choose another\n")
        assert os.listdir(other) == [name]
        shutil.rmtree(other)
    # --overwrite never replaces the input: an --out folder holding the --generations file is refused
    assert main(["--generations", path, "--out", str(tmp_path), "--overwrite"]) == 2
    assert f"holds the --generations file {path}, which" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["g.jsonl", "o"]


def test_default_output_directory(tmp_path):
    path = _write(tmp_path / "gens.jsonl", [{"completion": "hmm", "correct": False}])
    assert main(["--generations", path]) == 0
    assert (tmp_path / "gens_analysis" / "summary.json").is_file()


def test_several_files_are_analysed_as_one_set(tmp_path, capsys):
    """The trainer writes one samples file per data-parallel rank: analyze takes them all at once, with
    the result of their concatenation; an error names the file and line; the default --out comes from
    the first file."""
    records, _, _ = _fixture(random.Random(11), 30)
    ranks = [_write(tmp_path / f"samples_rank{r}.jsonl", records[r::3]) for r in range(3)]
    together = _write(tmp_path / "all.jsonl", records[0::3] + records[1::3] + records[2::3])
    assert main(["--generations", *ranks]) == 0
    out = tmp_path / "samples_rank0_analysis"
    assert "analyzed 30 generations" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text()) == analyze(load_generations(together))
    assert f"Source: `{ranks[0]}`, `{ranks[1]}`, `{ranks[2]}`, 30 generations" in (out / "report.md").read_text()

    (tmp_path / "samples_rank1.jsonl").write_text('{"completion": "so", "correct": "yes"}\n')
    assert main(["--generations", *ranks, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {ranks[1]} line 1: field 'correct' must be true or false\n"
    assert main(["--generations", ranks[0], str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: --generations {tmp_path / 'nope.jsonl'}: no such file\n"
    again = str(tmp_path / "hard_link.jsonl")
    os.link(ranks[0], again)
    for second in (str(tmp_path / "." / "samples_rank0.jsonl"), again):
        assert main(["--generations", ranks[0], second, "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err == f"error: --generations {second}: the same file as {ranks[0]}\n"
    empty = [_write(tmp_path / "e1.jsonl", []), _write(tmp_path / "e2.jsonl", [])]
    assert main(["--generations", *empty, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {empty[0]}, {empty[1]}: no generations in the files\n"
    assert not (tmp_path / "o").exists()


def test_module_entry_point(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    proc = run_python(["-m", "megatron_renio.eval.analysis", "--generations", bad], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    good = _write(tmp_path / "good.jsonl", [{"completion": "wait", "correct": True}])
    proc = run_python(["-m", "megatron_renio.eval.analysis", "--generations", good, "--out", tmp_path / "o"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "report.md").is_file()


def test_ungraded_records_are_left_out(tmp_path, capsys):
    """The trainer's samples of --task code runs, or of prompts without an answer, have no 'correct'."""
    rng = random.Random(5)
    graded, _, _ = _fixture(rng, 20)
    ungraded = [{"completion": "wait, wait", "weight": 9.0},  # no num_tokens: the unit stays tokens
                {"completion": "hmm", "correct": None, "num_tokens": 1}]
    records = graded[:7] + ungraded + graded[7:] + ungraded
    path = _write(tmp_path / "mixed.jsonl", records)
    out = tmp_path / "o"
    assert main(["--generations", path, "--out", str(out)]) == 0
    assert "; 4 records without a grade were left out;" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    expected = analyze(load_generations(_write(tmp_path / "graded.jsonl", graded)))
    assert expected["num_ungraded"] == 0 and summary["num_ungraded"] == 4
    assert {**summary, "num_ungraded": 0} == expected
    assert summary["num_generations"] == 20 and summary["length_unit"] == "tokens"
    assert "20 generations (13 correct, 7 incorrect); 4 records without a grade were left out." in (
        (out / "report.md").read_text())
    assert main(["--generations", _write(tmp_path / "one.jsonl", graded[:1] + ungraded[:1]),
                 "--out", str(tmp_path / "o1")]) == 0
    assert "; 1 record without a grade was left out;" in capsys.readouterr().out


def _scaled(function, values, q=None):
    """numpy's ``function`` of ``values`` computed on the values times 2**-1000 (exact) and scaled
    back, so that nothing overflows: an independent check of the exact computation."""
    scaled = np.asarray(values, dtype=float) * 2.0**-1000
    return float((function(scaled) if q is None else function(scaled, q)) * 2.0**1000)


@pytest.mark.parametrize(
    "field,values",
    [
        ("weight", {"correct": [1e16, 1e16], "incorrect": [1e16]}),  # a single value numpy cannot widen by 0.5
        ("weight", {"correct": [1.0, 1.0000000000000002], "incorrect": [0.9999999999999999, 1.0]}),  # 1 ulp apart
        ("weight", {"correct": [1e308, 1.7e308], "incorrect": [-1e308, 5.0, 1.7976931348623157e308]}),
        ("num_tokens", {"correct": [2**62, 2**62], "incorrect": [2**62]}),
        ("num_tokens", {"correct": [10**300, 10**308, 0], "incorrect": [10**308, 10**308]}),
    ],
)
def test_large_finite_numbers_are_analysed(tmp_path, field, values):
    records = [{"completion": "wait", "correct": group == "correct", field: v}
               for group in ("correct", "incorrect") for v in values[group]]
    out = tmp_path / "o"
    assert main(["--generations", _write(tmp_path / "g.jsonl", records), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for group, group_values in values.items():
        mean = statistics.mean(group_values)  # exact (fractions), also for huge values
        assert _scaled(np.mean, group_values) == pytest.approx(mean, rel=1e-15)
        if field == "weight":
            stats = summary["weight"][group]
            assert stats["count"] == len(group_values)
        else:
            stats = summary["groups"][group]["length"]
            assert summary["groups"][group]["total_length"] == sum(group_values)
            assert stats["p90"] == pytest.approx(_scaled(np.percentile, group_values, 90), rel=1e-15)
        assert stats["mean"] == pytest.approx(mean, rel=1e-15)
        assert stats["median"] == pytest.approx(_scaled(np.median, group_values), rel=1e-15)
    if field == "weight":
        assert summary["weight"]["auc_incorrect"] == pytest.approx(
            _brute_force_auc(values["incorrect"], values["correct"]))
    report = (out / "report.md").read_text()
    if max(max(group_values) for group_values in values.values()) > 1e6:  # 4 significant digits, not all 300
        assert "000000000" not in report and "e+" in report
    png = b"\x89PNG\r\n\x1a\n"
    plots = ["lengths.png", "reflection.png"] + (["weights.png"] if field == "weight" else [])
    assert [(out / p).read_bytes()[:8] for p in plots] == [png] * len(plots)


def _mode(path):
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folder_permissions_follow_the_umask(tmp_path, umask):
    path = _write(tmp_path / "g.jsonl", [{"completion": "wait", "correct": True}])
    out = tmp_path / "o"
    old = os.umask(umask)
    try:
        assert main(["--generations", path, "--out", str(out)]) == 0
        assert _mode(out) == 0o777 & ~umask  # as os.mkdir makes it
        os.chmod(out, 0o755)
        assert main(["--generations", path, "--out", str(out), "--overwrite"]) == 0
        assert _mode(out) == 0o777 & ~umask
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["g.jsonl", "o"]


def test_out_link_to_a_folder_writes_into_its_target(tmp_path, capsys):
    path = _write(tmp_path / "g.jsonl", [{"completion": "wait", "correct": True}])
    target, link = tmp_path / "scratch" / "analysis", tmp_path / "results"
    target.mkdir(parents=True)
    link.symlink_to(target)
    assert main(["--generations", path, "--out", str(link)]) == 0
    assert f"report: {link}/report.md" in capsys.readouterr().out
    assert sorted(os.listdir(target)) == ["lengths.png", "reflection.png", "report.md", "summary.json"]
    (target / "summary.json").write_text("old")
    assert main(["--generations", path, "--out", str(link), "--overwrite"]) == 0
    assert json.loads((link / "summary.json").read_text())["num_generations"] == 1
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sorted(os.listdir(tmp_path)) == ["g.jsonl", "results", "scratch"]  # no staging or retired folder left
    assert os.listdir(tmp_path / "scratch") == ["analysis"]
