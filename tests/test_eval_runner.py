"""``megatron-renio eval`` (megatron_renio/eval/runner.py) end to end on a tiny converted model.

The model is the tiny Qwen3 student of tests/workers/tiny_models.py (its tokenizer has
``\\boxed{0}`` .. ``\\boxed{3}`` as single tokens). The benchmark's answers are derived from
transformers' own greedy completions of the same prompt ids: problems whose completion ends in a box
get that box's value (correct) or another value (wrong) in turn, so grades are known in advance.

Runs: the real command line in one plain process at TP=1 (greedy, 2 samples per problem), then
one 2-rank torchrun launch running TP=2, PP=2 and DP=2 (with ``--ckpt-fully-parallel-load``)
greedily and two sampled runs with different layouts and batch sizes; that launch also records
which ranks took part in each gather of the results and what reached ``load_model_checkpoint``. A
4-rank launch without a model (marked slow) checks the gather where the graders are a part of
several replicas.
Bad input goes through ``main`` in this process: it fails before any process group or model is made.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from megatron_renio.errors import UserInputError
from megatron_renio.eval import runner
from megatron_renio.eval.math_grader import extract_boxed_answer, grade_math
from tests.python_forkserver import run_python
from tests.torchrun_harness import REPO_ROOT, read_jsonl, run_torchrun, subprocess_env
from tests.workers.commands_worker import check_gather
from tests.workers.tiny_models import tiny_checkpoints

WORKER = REPO_ROOT / "tests" / "workers" / "commands_worker.py"
GATHER_WORKER = REPO_ROOT / "tests" / "workers" / "gather_worker.py"
PROBLEMS = ["the cat sat on a mat", "two plus two is four", "wait so the answer", "a cat", "the mat is",
            "four plus two", "so wait", "the answer is", "cat cat mat"]
MAX_NEW, SAMPLES = 12, 2
GREEDY_LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"],
                  "dp2": ["--batch-size", "4", "--ckpt-fully-parallel-load"]}
SAMPLED = ["--temperature", "1.3", "--top-p", "0.95", "--seed", "7", "--samples-per-problem", "3"]
SAMPLED_LAYOUTS = {"sampled_dp2": ["--batch-size", "5"], "sampled_tp2": ["--tensor-model-parallel-size", "2"]}
FIELD_FLAGS = ["--problem-field", "question", "--answer-field", "final", "--id-field", "key"]


def _hf_greedy(hf_dir, prompts):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    completions = []
    for ids in prompts:
        with torch.no_grad():
            inputs = torch.tensor([ids])
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=MAX_NEW,
                                 do_sample=False, eos_token_id=2, pad_token_id=0)
        completions.append(out[0, len(ids):].tolist())
    return completions


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.getbasetemp() / "tiny_models")


@pytest.fixture(scope="module")
def setup(paths, tmp_path_factory):
    from megatron_renio.data.prompts import PromptRecord
    from megatron_renio.data.templates import build_prompt_ids
    from megatron_renio.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("eval")
    tokenizer = load_tokenizer(str(paths["tokenizer"]))
    prompts = [build_prompt_ids(tokenizer, PromptRecord(p, None, None, "test"), "math", "student", "opd")
               for p in PROBLEMS]
    reference = _hf_greedy(paths["hf_student"], prompts)
    answers = []
    for i, ids in enumerate(reference):
        boxed = extract_boxed_answer(tokenizer.decode(ids))
        answers.append("7" if boxed is None else boxed if i % 2 == 0 else str((int(boxed) + 1) % 4))
    bench = root / "tiny_math.jsonl"  # GSM8K's field names, as --problem-field etc. name them
    bench.write_text("".join(json.dumps({"question": p, "final": a, "key": f"q{i}", "problem": "unused"}) + "\n"
                             for i, (p, a) in enumerate(zip(PROBLEMS, answers))))
    base = ["--load", str(paths["student"]), "--benchmark", str(bench), "--max-new-tokens", str(MAX_NEW),
            *FIELD_FLAGS]
    greedy = base + ["--greedy", "--samples-per-problem", str(SAMPLES)]

    # --seq-length beyond the model's 256 positions (noted), which these prompts and completions do not reach
    cli = run_python(["-m", "megatron_renio.eval.runner", *greedy, "--batch-size", "5", "--out", root / "tp1.jsonl",
                      "--summary", root / "tp1.json", "--seq-length", "300"])
    assert cli.returncode == 0, cli.stderr[-5000:]
    jobs = [("megatron_renio.eval.runner", greedy + flags + ["--out", str(root / f"{name}.jsonl")])
            for name, flags in GREEDY_LAYOUTS.items()]
    jobs += [("megatron_renio.eval.runner", base + SAMPLED + flags + ["--out", str(root / f"{name}.jsonl")])
             for name, flags in SAMPLED_LAYOUTS.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    worker = run_torchrun(WORKER, 2, root / "worker", root / "jobs.json")
    runs = {name: read_jsonl(root / f"{name}.jsonl") for name in ["tp1", *GREEDY_LAYOUTS, *SAMPLED_LAYOUTS]}
    return dict(root=root, prompts=prompts, reference=reference, answers=answers, runs=runs, worker=worker,
                stdout=cli.stdout, summary=json.loads((root / "tp1.json").read_text()))


def test_greedy_generations_equal_transformers_and_are_graded(setup):
    records = setup["runs"]["tp1"]
    assert len(records) == len(PROBLEMS) * SAMPLES
    for n, record in enumerate(records):
        i = n // SAMPLES
        assert (record["benchmark"], record["id"], record["sample"]) == ("tiny_math", f"q{i}", n % SAMPLES)
        assert record["prompt_ids"] == setup["prompts"][i]
        assert record["completion_ids"] == setup["reference"][i], f"problem {i}"
        assert record["answer"] == setup["answers"][i]
        assert record["num_tokens"] == len(record["completion_ids"])
        assert record["finished"] == (record["completion_ids"][-1:] == [2])
        assert record["correct"] == grade_math(record["completion"], record["answer"])
    grades = [r["correct"] for r in records]
    assert 0 < sum(grades) < len(grades), "the benchmark must hold both correct and wrong completions"


def test_report_has_avg_and_pass_at_k_and_mean_length(setup):
    records = setup["runs"]["tp1"]
    per_problem = [[r["correct"] for r in records[i * SAMPLES:(i + 1) * SAMPLES]] for i in range(len(PROBLEMS))]
    metrics = setup["summary"]["benchmarks"]["tiny_math"]
    assert metrics["problems"] == len(PROBLEMS) and metrics["samples_per_problem"] == SAMPLES
    assert metrics[f"avg@{SAMPLES}"] == pytest.approx(sum(sum(g) / SAMPLES for g in per_problem) / len(PROBLEMS))
    assert metrics[f"pass@{SAMPLES}"] == pytest.approx(sum(any(g) for g in per_problem) / len(PROBLEMS))
    assert metrics["mean_completion_tokens"] == pytest.approx(sum(r["num_tokens"] for r in records) / len(records))
    settings = setup["summary"]["settings"]
    assert settings["greedy"] is True and settings["seq_length"] == 300 and settings["bf16"] is False
    assert settings["chat_template_kwargs"] == {} and settings["tokenizer"].endswith("tokenizer")
    assert f"tiny_math: {len(PROBLEMS)} problems x {SAMPLES}  avg@{SAMPLES}" in setup["stdout"]
    assert ("note: --seq-length 300 exceeds the model's max_position_embeddings (256); positions beyond it were not "
            "trained") in setup["stdout"]


@pytest.mark.parametrize("layout", list(GREEDY_LAYOUTS))
def test_greedy_grades_are_identical_across_layouts(setup, layout):
    reference = setup["runs"]["tp1"]
    records = setup["runs"][layout]
    assert [r["correct"] for r in records] == [r["correct"] for r in reference]
    assert [r["completion_ids"] for r in records] == [r["completion_ids"] for r in reference]


def test_only_the_graders_take_part_in_the_gather(setup):
    """The graded records go to rank 0 over the graders only (TP rank 0 of the first stage of each
    replica): at TP=2 and PP=2 rank 1 holds nothing and makes no call (a gather over the whole world
    had it send a buffer padded to rank 0's size), at DP=2 both gather over their data-parallel group."""
    for j, name in enumerate([*GREEDY_LAYOUTS, *SAMPLED_LAYOUTS]):
        entries = [rank["gathers"][j] for rank in setup["worker"]]
        check_gather(entries, "first")
        assert len(entries[0]["returned"]) == len(setup["runs"][name]), name


def test_ckpt_fully_parallel_load_reaches_the_checkpoint_loader(setup):
    """Only the dp2 run asked for it; that run loaded with it (its completions equal TP=1's:
    test_greedy_grades_are_identical_across_layouts)."""
    for rank in setup["worker"]:
        assert rank["loads"] == [[name == "dp2"] for name in [*GREEDY_LAYOUTS, *SAMPLED_LAYOUTS]]
    load = ["--load", "ckpt", "--benchmark", "b"]
    assert runner.parse_args(load).ckpt_fully_parallel_load is False
    assert runner.parse_args(load + ["--ckpt-fully-parallel-load"]).ckpt_fully_parallel_load is True
    assert runner.parse_args(load + ["--ckpt-fully-parallel-load", "false"]).ckpt_fully_parallel_load is False
    with pytest.raises(UserInputError, match="--ckpt-fully-parallel-load"):
        runner.parse_args(load + ["--ckpt-fully-parallel-load", "maybe"])
    assert "--ckpt-fully-parallel-load" in runner.build_parser().format_help()


@pytest.mark.slow  # the suite's only 4-rank launch (about 13 s on two cores); the 2-rank checks above run in CI
def test_gather_takes_only_the_holders_and_keeps_the_world_gathers_order(tmp_path):
    """4 ranks, no model (tests/workers/gather_worker.py): at TP=2 x DP=2, PP=2 x DP=2 and TP=2 x PP=2,
    for eval's graders (first stage) and score's reporters (last stage: gathered on their first rank,
    which sends the list to rank 0), rank 0 gets what a gather over the whole world gives, in the same
    order, and no other rank takes part."""
    results = run_torchrun(GATHER_WORKER, 4, tmp_path)
    cases = results[0]["cases"]
    assert cases == [(tp, pp, stage) for tp, pp in ((2, 1), (1, 2), (2, 2)) for stage in ("first", "last")]
    for i, case in enumerate(cases):
        entries = [rank["gathers"][i] for rank in results]
        check_gather(entries, case[2])
        assert entries[0]["returned"] == results[0]["world"][i], case
    holders = [sorted({item[0] for item in results[0]["world"][i]}) for i in range(len(cases))]
    assert holders == [[0, 2], [0, 2], [0, 1], [2, 3], [0], [2]]  # graders and reporters of each layout


def test_sampled_completions_depend_on_the_seed_not_the_layout(setup):
    dp2, tp2 = setup["runs"]["sampled_dp2"], setup["runs"]["sampled_tp2"]
    assert [r["completion_ids"] for r in dp2] == [r["completion_ids"] for r in tp2]
    per_problem = [{tuple(r["completion_ids"]) for r in dp2[i * 3:(i + 1) * 3]} for i in range(len(PROBLEMS))]
    assert any(len(samples) > 1 for samples in per_problem), "samples of a problem should differ"


def test_an_interrupted_eval_run_again_generates_only_what_is_missing(setup, paths, tmp_path):
    """A run killed after its second batch (SIGKILL: no handler runs) left its graded batches in the
    progress folder; the same command again continues from them and writes what one uninterrupted run
    writes (the DP=2 run of the fixture, other batches: completions do not depend on them), then removes
    the folder. A folder left by other settings (another seed) is not used: the run starts over."""
    from megatron_renio.eval.progress import progress_folder

    base = ["-m", "megatron_renio.eval.runner", "--load", paths["student"], "--benchmark",
            setup["root"] / "tiny_math.jsonl", "--max-new-tokens", MAX_NEW, *FIELD_FLAGS, "--batch-size", "4"]
    out = tmp_path / "sampled.jsonl"
    killed = dict(subprocess_env(), MEGATRON_RENIO_FAULT="eval:2")
    assert run_python([*base, *SAMPLED, "--out", out], env=killed).returncode == -9
    assert not out.exists() and len((progress_folder(out) / "replica-00000.jsonl").read_text().splitlines()) == 8
    again = run_python([*base, *SAMPLED, "--out", out])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"continuing an interrupted run of these settings, 8 of {len(PROBLEMS) * 3} generations" in again.stdout
    assert read_jsonl(out) == setup["runs"]["sampled_dp2"] and not progress_folder(out).exists()

    other_seed = [*SAMPLED[:-4], "--seed", "8", *SAMPLED[-2:]]
    assert SAMPLED[-4:-2] == ["--seed", "7"]
    out.unlink()
    assert run_python([*base, *other_seed, "--out", out], env=killed).returncode == -9
    again = run_python([*base, *SAMPLED, "--out", out])
    assert again.returncode == 0 and "continuing" not in again.stdout, again.stderr[-3000:]
    assert read_jsonl(out) == setup["runs"]["sampled_dp2"] and not progress_folder(out).exists()


def test_a_replica_log_is_on_disk_per_batch_and_survives_its_folders_removal(tmp_path):
    """Another evaluation to the same output may take the folder over (start_over) while this one runs:
    appends go on to the open file, and this run no longer holds the key, so it removes nothing; a line
    cut short by a crash is ended before the next one, and skipped on reading, as is a line that is not
    a record; a key that is not text is no key (no traceback)."""
    from megatron_renio.eval.progress import ReplicaLog, holds_key, read_finished, start_over

    folder = tmp_path / ".out.jsonl.eval-progress"
    start_over(folder, "ours")
    log = ReplicaLog(folder, 0, resumed=False)
    log.append([(3, {"r": 3})])
    assert read_finished(folder, "ours") == {3: {"r": 3}} and read_finished(folder, "theirs") is None
    start_over(folder, "theirs")
    log.append([(4, {"r": 4})])
    log.close()
    assert not holds_key(folder, "ours") and read_finished(folder, "theirs") == {}
    start_over(folder, "ours")
    (folder / "replica-00001.jsonl").write_text('{"index": 1, "record": {"r": 1}}\n{"index": 6, "record": 7}\n'
                                                '{"index": 2, "rec')
    log = ReplicaLog(folder, 1, resumed=True)
    log.append([(5, {"r": 5})])
    log.close()
    assert read_finished(folder, "ours") == {1: {"r": 1}, 5: {"r": 5}}
    (folder / "key").write_bytes(b"\xff\xfe")  # a damaged key: another run's, so the next one starts over
    assert read_finished(folder, "ours") is None


def test_output_is_analyze_input(setup):
    from megatron_renio.eval.analysis import load_generations

    generations = load_generations(str(setup["root"] / "tp1.jsonl"))
    assert [g.correct for g in generations] == [r["correct"] for r in setup["runs"]["tp1"]]
    assert [g.num_tokens for g in generations] == [r["num_tokens"] for r in setup["runs"]["tp1"]]


def _bad(args, capsys, tmp_path):
    out = tmp_path / "out.jsonl"
    assert runner.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return err[0]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(paths, capsys, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"problem": "a cat", "answer": "1"}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"problem": "a cat", "answer": "1"}) + "\n{not json\n")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"problem": "a cat " * 200, "answer": "1"}) + "\n")
    load = ["--load", str(paths["student"])]
    cases = {
        "--bogus": [*load, "--benchmark", str(good), "--bogus"],
        "--samples-per-problem": [*load, "--benchmark", str(good), "--samples-per-problem", "0"],
        "--temperature": [*load, "--benchmark", str(good), "--temperature", "-0.5"],
        "--temperature must be a finite number >= 0": [*load, "--benchmark", str(good), "--temperature", "inf"],
        "--seed: must be an integer in [0, 4294967295]": [*load, "--benchmark", str(good), "--seed", "-1"],
        "--distributed-timeout-minutes: must be in [1, 10080] (a minute to a week)": [*load, "--benchmark", str(good),
                                                                 "--distributed-timeout-minutes", "1e30"],
        "--top-p": [*load, "--benchmark", str(good), "--top-p", "1.5"],
        f"--load: {tmp_path} is not a model checkpoint": ["--load", str(tmp_path), "--benchmark", str(good)],
        f"--tokenizer: tokenizer path {tmp_path / 'nowhere'} does not exist":
            [*load, "--benchmark", str(good), "--tokenizer", str(tmp_path / "nowhere")],
        "broken.jsonl line 2": [*load, "--benchmark", str(broken)],
        "no such file": [*load, "--benchmark", str(tmp_path / "missing.jsonl")],
        "unknown field preset": [*load, "--benchmark", f"nope={good}"],
        f"--benchmark: {good} is given twice": [*load, "--benchmark", str(good), str(good)],
        "benchmark 'math500' has no built-in data: give its file as --benchmark math500=FILE":
            [*load, "--benchmark", "math500"],
        f"--chat-template-kwargs: tokenizer {paths['student'] / 'tokenizer'} has no chat template to pass variables to":
            [*load, "--benchmark", str(good), "--chat-template-kwargs", '{"enable_thinking": false}'],
        "--benchmark given twice: give all its values after one --benchmark":
            [*load, "--benchmark", str(good), "--benchmark", str(long)],  # was: the last one alone, silently
        "argument --chat-template-kwargs: must be a JSON object":
            [*load, "--benchmark", str(good), "--chat-template-kwargs", "enable_thinking"],
        "--seq-length 8": [*load, "--benchmark", str(good), "--seq-length", "8"],
        "room for a completion in the model's max_position_embeddings (the default --seq-length) 256":
            [*load, "--benchmark", str(long)],
        "argument --tokenizer: must be a path, got '' (an unset shell variable?)":
            [*load, "--benchmark", str(good), "--tokenizer", ""],  # was: the checkpoint's tokenizer, silently
        "argument --summary: must be a path, got ''": [*load, "--benchmark", str(good), "--summary", ""],
    }
    for expected, args in cases.items():
        assert expected in _bad(args, capsys, tmp_path), expected
    assert "does not exist" in _bad([*load, "--benchmark", str(good), "--summary", str(tmp_path / "no" / "s.json")],
                                    capsys, tmp_path)
    assert "--summary /proc/s.json: cannot write in /proc" in _bad([*load, "--benchmark", str(good), "--summary",
                                                                     "/proc/s.json"], capsys, tmp_path)


def test_completions_from_non_finite_logits_are_refused(paths, capsys, tmp_path, monkeypatch):
    """generate() flags a token drawn from NaN / inf logits (tests/test_rollout.py); eval then stops
    generating (each completion from NaN logits would run to --max-new-tokens), refuses in one line and
    writes nothing instead of grading meaningless completions as wrong."""
    import dataclasses

    from megatron_renio.rollout import generate as rollout

    real, calls = rollout.generate, []

    def first_call_flagged(*args, **kwargs):
        calls.append(None)
        return dataclasses.replace(real(*args, **kwargs), nonfinite=len(calls) == 1)

    monkeypatch.setattr(rollout, "generate", first_call_flagged)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"problem": "a cat", "answer": "1"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert runner.main(["--load", str(paths["student"]), "--benchmark", str(good), "--max-new-tokens", "2",
                        "--samples-per-problem", "2", "--batch-size", "1", "--out", str(out), "--summary",
                        str(tmp_path / "summary.json")]) == 2
    assert len(calls) == 1  # of the two batches
    *progress, line = capsys.readouterr().err.strip().splitlines()  # after the progress bar
    assert all(p.startswith("eval:") for p in progress) and sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl"]
    assert line == (f"error: --load {paths['student']}: the model's logits hold NaN or inf (non-finite weights, or "
                    "values that overflow fp32); its completions would be meaningless: nothing graded, nothing written")


def test_an_output_that_cannot_be_written_is_one_line_and_the_rerun_continues(paths, capsys, tmp_path,
                                                                             monkeypatch):
    """A full disk at the end: one line naming the file and the progress folder the graded generations
    stay in; the same command run again writes the outputs (and removes the folder)."""
    import errno

    from megatron_renio.eval.progress import progress_folder

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"problem": "a cat", "answer": "1"}) + "\n")
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    argv = ["--load", str(paths["student"]), "--benchmark", str(good), "--max-new-tokens", "2", "--out", str(out),
            "--summary", str(summary)]
    real = runner.write_atomic

    def full_disk(path, lines):
        if path == str(summary):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, lines)

    monkeypatch.setattr(runner, "write_atomic", full_disk)
    assert runner.main(argv) == 2
    folder = progress_folder(out)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {summary}: cannot write it; the same command run again continues from {folder} "
        "(No space left on device)")
    assert folder.is_dir() and not summary.exists()
    monkeypatch.setattr(runner, "write_atomic", real)
    assert runner.main(argv) == 0
    assert "continuing an interrupted run" in capsys.readouterr().out
    assert summary.is_file() and not folder.exists()


def test_outputs_never_replace_an_input(tmp_path):
    """--out and --summary may not name a --benchmark file (also behind a preset or a link), each other, or
    a file of the --load or --tokenizer input."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"problem": "a cat", "answer": "1"}) + "\n")
    (tmp_path / "link.jsonl").symlink_to(good)
    for flags, message in ((["--benchmark", f"math500={good}", "--out", str(good)], "is also the --benchmark file"),
                           (["--benchmark", str(good), "--out", str(tmp_path / "link.jsonl")],
                            "is also the --benchmark file"),
                           (["--benchmark", str(good), "--out", str(tmp_path / "o.json"), "--summary",
                             str(tmp_path / "o.json")], "is also the --summary file")):
        with pytest.raises(UserInputError, match=f"^--out .* {message}; choose another$"):
            runner.parse_args(["--load", "ckpt", *flags])
    assert good.read_text().startswith('{"problem"')
    # nor a file of the model checkpoint or tokenizer read (--summary CKPT/renio_model.json replaced the metadata)
    ckpt, tokenizer = tmp_path / "ckpt", tmp_path / "tok"
    (ckpt / "tokenizer").mkdir(parents=True)
    (ckpt / "renio_model.json").write_text("{}")  # a model checkpoint folder (a folder that is not one is refused later)
    tokenizer.mkdir()
    (tmp_path / "sp.model").write_text("")
    for flags, message in (
            (["--load", str(ckpt), "--summary", str(ckpt / "renio_model.json")], "--summary .* is inside the --load"),
            (["--load", str(ckpt), "--out", str(ckpt / "tokenizer" / "o.jsonl")], "--out .* is inside the --load"),
            (["--load", "c", "--tokenizer", str(tokenizer), "--out", str(tokenizer / "tokenizer.json")],
             "--out .* is inside the --tokenizer"),
            (["--load", "c", "--tokenizer", str(tmp_path / "sp.model"), "--out", str(tmp_path / "sp.model")],
             "--out .* is also the --tokenizer file")):
        with pytest.raises(UserInputError, match=f"^{message}"):
            runner.parse_args(["--benchmark", str(good), *flags])
    assert runner.parse_args(["--load", str(ckpt), "--benchmark", str(good), "--out", str(tmp_path / "o.jsonl")])


def test_sampling_defaults_come_from_the_tokenizer_folder(paths, capsys, tmp_path):
    """The generation_config.json of --tokenizer's folder (the one that gives the stop ids), not the
    checkpoint's, gives the sampling defaults; a flag overrides its value."""
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(paths["tokenizer"], tokenizer)
    config = tokenizer / "generation_config.json"
    config.write_text(json.dumps({"eos_token_id": 2, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    args = runner.parse_args(["--load", str(paths["student"]), "--benchmark", "b", "--top-k", "5"])
    assert args.distributed_timeout_minutes == 60  # replicas wait for the slowest one's generation
    sampling = runner._sampling(args, tokenizer)
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.greedy) == (0.6, 0.95, 5, False)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"problem": "a cat", "answer": "1"}) + "\n")
    config.write_text(json.dumps({"top_p": 1.5}))
    err = _bad(["--load", str(paths["student"]), "--benchmark", str(good), "--tokenizer", str(tokenizer)],
               capsys, tmp_path)
    assert err == f"error: {config}: top_p must be in (0, 1], got 1.5"


def test_do_sample_false_is_greedy_unless_a_sampling_flag_is_given(tmp_path):
    """As transformers, do_sample false decodes greedily; --temperature, --top-p or --top-k asks for sampling
    (the other values still from the file); without do_sample the defaults are sampled."""
    config = tmp_path / "generation_config.json"

    def sampling(generation_config: dict, *flags: str):
        config.write_text(json.dumps(generation_config))
        return runner._sampling(runner.parse_args(["--load", "ckpt", "--benchmark", "b", *flags]), tmp_path)

    assert sampling({"do_sample": False, "temperature": 0.6}).greedy
    for flag in (["--temperature", "0.7"], ["--top-p", "0.9"], ["--top-k", "5"]):
        assert not sampling({"do_sample": False, "temperature": 0.6}, *flag).greedy, flag
    assert sampling({"do_sample": False, "temperature": 0.6}, "--top-k", "5").temperature == 0.6
    assert not sampling({"temperature": 0.6}).greedy and not sampling({"do_sample": True}).greedy
    assert sampling({"do_sample": True}, "--greedy").greedy
    # a temperature of 0 asks for greedy decoding (vLLM's convention), from the flag or the file
    assert sampling({"do_sample": True}, "--temperature", "0").greedy
    assert sampling({"do_sample": False, "temperature": 0.0}).greedy
    assert sampling({"temperature": 0}).greedy and sampling({"temperature": 0}).temperature == 0
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(config))}: do_sample must be true or false, got 'no'$"):
        sampling({"do_sample": "no"})


def test_a_sampling_setting_eval_does_not_apply_gets_a_note(tmp_path, capsys):
    """repetition_penalty, min_p and the like in generation_config.json: named in one note, unless they
    are at the value that changes nothing."""
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"temperature": 0.7, "repetition_penalty": 1.05, "min_p": 0.0, "typical_p": 0.9}))
    runner._sampling(runner.parse_args(["--load", "ckpt", "--benchmark", "b"]), tmp_path)
    assert capsys.readouterr().out == (f"note: {config} sets repetition_penalty 1.05, typical_p 0.9, which eval does "
                                       "not apply: it decodes with temperature, top-p and top-k only\n")
    config.write_text(json.dumps({"temperature": 0.7, "repetition_penalty": 1.0, "num_beams": 1}))
    runner._sampling(runner.parse_args(["--load", "ckpt", "--benchmark", "b"]), tmp_path)
    assert capsys.readouterr().out == ""


def test_benchmark_paths_may_hold_an_equals_sign(tmp_path):
    folder = tmp_path / "run=3"
    folder.mkdir()
    bench = folder / "aime.jsonl"
    bench.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    plain, preset = runner._load_benchmarks([str(bench), f"aime24={bench}"])
    assert (plain.name, preset.name) == ("aime", "aime24")
    assert plain.items == preset.items and plain.items[0].answer == "2"
    with pytest.raises(UserInputError, match="unknown field preset 'aime'"):
        runner._load_benchmarks([f"aime={bench}"])
    with pytest.raises(UserInputError, match="unknown field preset 'aime'"):  # before anything is loaded
        runner.parse_args(["--load", "ckpt", "--benchmark", f"aime={bench}"])
    # the output check reads the --benchmark value as _load_benchmarks does: this path is the file itself
    for spec in (str(bench), f"aime24={bench}"):
        with pytest.raises(UserInputError, match=r"^--out .* is also the --benchmark file; choose another$"):
            runner.parse_args(["--load", "ckpt", "--benchmark", spec, "--out", str(bench)])
    assert bench.read_text().startswith('{"problem"')


def test_benchmarks_of_one_file_name_are_named_by_their_folders(tmp_path, monkeypatch):
    """Files that share a name (one folder per benchmark, each with a test.jsonl) are reported under
    the fewest trailing folders that tell them apart, after the preset when there is one; a file
    alone keeps its own name."""
    monkeypatch.chdir(tmp_path)
    for folder in ("gsm8k", "svamp", "x/gsm8k"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "test.jsonl").write_text(json.dumps({"problem": folder, "answer": "1"}) + "\n")
    (tmp_path / "svamp" / "test.json").write_text(json.dumps({"problem": "json", "answer": "1"}) + "\n")
    specs = ["gsm8k/test.jsonl", "svamp/test.jsonl", "x/gsm8k/test.jsonl", f"aime24={tmp_path}/svamp/test.json"]
    loaded = runner._load_benchmarks(specs)
    assert [b.name for b in loaded] == [f"{tmp_path.name}/gsm8k/test", "svamp/test", "x/gsm8k/test", "aime24"]
    assert [b.items[0].prompt for b in loaded] == ["gsm8k", "svamp", "x/gsm8k", "json"]
    assert [b.name for b in runner._load_benchmarks(["svamp/test.jsonl"])] == ["test"]
    assert [b.name for b in runner._load_benchmarks(["svamp/test.jsonl", "svamp/test.json"])] == \
        ["svamp/test.jsonl", "svamp/test.json"]  # the same name but for the extensions
    assert [b.name for b in runner._load_benchmarks(["aime24=gsm8k/test.jsonl", "aime24=svamp/test.jsonl"])] == \
        ["aime24=gsm8k/test", "aime24=svamp/test"]
    with pytest.raises(UserInputError, match=r"^--benchmark: gsm8k/test\.jsonl is given twice$"):
        runner._load_benchmarks(["gsm8k/test.jsonl", "./gsm8k/test.jsonl"])
    # the built-in keeps its name beside a file of that name, whatever the current folder
    assert runner._benchmark_names([("humaneval", "humaneval"), ("humaneval", "x/humaneval.jsonl")]) == \
        ["humaneval", "humaneval=x/humaneval"]
    (tmp_path / "aime24=a.jsonl").write_text(json.dumps({"problem": "eq", "answer": "1"}) + "\n")  # '=' in a name
    with pytest.raises(UserInputError, match=r"^--benchmark: x/a\.jsonl and \./aime24=a\.jsonl would both be "
                                             r"reported as 'aime24=a'; rename one of the files$"):
        runner._benchmark_names([("aime24", "gsm8k/test.jsonl"), ("aime24", "x/a.jsonl"), (None, "./aime24=a.jsonl")])


def test_field_flags_name_the_fields_of_files_without_a_preset(tmp_path):
    """--problem-field, --answer-field and --id-field set the layout of the files given without a preset
    (end to end: the module fixture's benchmark uses other field names); a preset keeps its own layout,
    and flags that apply to no benchmark are refused."""
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": 2, "problem": "unused", "uid": "g1"}) + "\n")
    aime = tmp_path / "aime.jsonl"
    aime.write_text(json.dumps({"problem": "2+2?", "answer": "4", "id": "a1"}) + "\n")
    args = runner.parse_args(["--load", "ckpt", "--benchmark", str(gsm), f"aime24={aime}",
                              "--problem-field", "question", "--id-field", "uid"])
    plain, preset = runner._load_benchmarks(args.benchmark, runner._benchmark_fields(args))
    assert (plain.items[0].id, plain.items[0].prompt, plain.items[0].answer) == ("g1", "1+1?", "2")
    assert (preset.items[0].id, preset.items[0].prompt) == ("a1", "2+2?")
    with pytest.raises(UserInputError, match=r"gsm\.jsonl line 1: missing field 'final' \(name another field with "
                                             r"--answer-field\)$"):
        runner._load_benchmarks([str(gsm)], {"answer": "final"})
    unnamed = tmp_path / "unnamed.jsonl"  # the default layout's problem field is absent
    unnamed.write_text(json.dumps({"question": "1+1?", "answer": 2}) + "\n")
    with pytest.raises(UserInputError, match=r"unnamed\.jsonl line 1: missing field 'problem' \(name another field "
                                             r"with --problem-field\)$"):
        runner._load_benchmarks([str(unnamed)])
    with pytest.raises(UserInputError, match=r"unnamed\.jsonl line 1: missing field 'problem'$"):  # no flag sets a preset's
        runner._load_benchmarks([f"aime24={unnamed}"])
    for flags, message in (
        ([f"aime24={aime}", "humaneval", "--answer-field", "final"],
         "--answer-field applies to the benchmark files given without a preset; every --benchmark here has one"),
        ([str(gsm), "--id-field", ""], "argument --id-field: must be a field name, got ''"),
    ):
        with pytest.raises(UserInputError, match=re.escape(message)):
            runner.parse_args(["--load", "ckpt", "--benchmark", *flags])
    help_text = " ".join(runner.build_parser().format_help().split())
    assert "one of math500, aime24, aime25, amc23, hmmt, minerva, humaneval, mbpp" in help_text


def test_report_computes_pass_at_k_with_the_number_of_samples():
    """The report's metrics from hand-graded records (benchmark, problem, sample order): avg@k is the
    mean fraction of correct samples, pass@k (n = k) the fraction of problems with a correct sample."""
    from megatron_renio.eval.benchmarks import BenchmarkItem

    def records(name, grades):
        return [{"benchmark": name, "correct": g, "num_tokens": 4 + 2 * s, "finished": s == 0}
                for per_problem in grades for s, g in enumerate(per_problem)]

    two = runner.Benchmark("two", [BenchmarkItem(f"q{i}", "math", "p", "1") for i in range(2)])
    three = runner.Benchmark("three", [BenchmarkItem(f"r{i}", "math", "p", "1") for i in range(3)])
    report = runner._report([two], records("two", [[True, False], [False, False]]), 2)["two"]
    assert report["problems"] == 2 and report["samples_per_problem"] == 2
    assert report["avg@2"] == pytest.approx(0.25)  # (1/2 + 0) / 2
    assert report["pass@2"] == pytest.approx(0.5)  # one of two problems solved
    assert report["mean_completion_tokens"] == pytest.approx(5.0)  # 4, 6, 4, 6
    assert report["finished_fraction"] == pytest.approx(0.5)
    graded = [[False, False, True], [False, False, False], [True, True, False]]
    mixed = records("two", [[False, True, False], [True, True, True]]) + records("three", graded)
    report = runner._report([two, three], mixed, 3)
    assert report["two"]["avg@3"] == pytest.approx((1 / 3 + 1) / 2) and report["two"]["pass@3"] == pytest.approx(1.0)
    assert report["three"]["avg@3"] == pytest.approx((1 / 3 + 0 + 2 / 3) / 3)
    assert report["three"]["pass@3"] == pytest.approx(2 / 3)


def test_replicas_get_a_mix_of_the_jobs():
    # Two benchmarks of 60 jobs each, the second one hard: a contiguous cut would give it all to one replica.
    order = runner._spread_order(120)
    assert sorted(order) == list(range(120)) and order == runner._spread_order(120)
    assert order != list(range(120))
    for dp_size in (2, 4):
        for rank in range(dp_size):
            share = order[120 * rank // dp_size:120 * (rank + 1) // dp_size]
            hard = sum(i >= 60 for i in share)
            assert 0.3 < hard / len(share) < 0.7, (dp_size, rank, hard)


def test_command_line_error_has_no_traceback(paths, tmp_path):
    proc = run_python(["-m", "megatron_renio.cli", "eval", "--load", paths["student"], "--benchmark",
                       tmp_path / "missing.jsonl"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: benchmark file")
    assert "Traceback" not in proc.stderr


def test_a_batchs_code_items_are_graded_together_and_math_items_on_the_main_thread(monkeypatch):
    """Code items wait together on one barrier (graded one at a time it would break after its timeout);
    math items run on the calling thread (math_grader's SIGALRM bound). Records keep the batch order and
    each item's grade."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from megatron_renio.eval import benchmarks as bench_module
    from megatron_renio.eval.benchmarks import BenchmarkItem

    items = [BenchmarkItem(f"c{i}", "code", "p", tests="t") for i in range(3)] + [BenchmarkItem("m", "math", "p", "1")]
    bench = runner.Benchmark("mixed", items)
    barrier = threading.Barrier(3, timeout=60)
    threads = {}

    def grade(item, text, concurrent_runs=1):
        threads[item.id] = threading.current_thread()
        assert concurrent_runs == (12 if item.task == "code" else 1)  # the sandbox's task limit leaves room for them
        if item.task == "code":
            barrier.wait()
        return text == f"right {item.id}"

    monkeypatch.setattr(bench_module, "grade", grade)
    completions = {"m": [9], "c0": [8, 2], "c1": [7], "c2": [6]}  # 2 is the stop id
    decoded = {(1,): "prompt", (9,): "right m", (8, 2): "right c0", (7,): "wrong", (6,): "wrong"}
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: decoded[tuple(ids)], stop_ids=(2,))
    jobs = [runner.Job(0, i, 0, [1]) for i in (3, 0, 1, 2)]
    with ThreadPoolExecutor(4) as pool:
        records = runner._graded_batch([bench], jobs, [completions[items[j.item].id] for j in jobs], tokenizer, pool,
                                       12)
    assert [r["id"] for r in records] == ["m", "c0", "c1", "c2"]
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert [r["finished"] for r in records] == [False, True, False, False]
    assert threads["m"] is threading.main_thread()
    assert len({threads[k] for k in ("c0", "c1", "c2")} - {threading.main_thread()}) == 3


def test_grading_threads_share_the_cpus_among_the_nodes_ranks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for local_world_size, threads in (("8", 2), ("1", 16), ("32", 1), ("", 16)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
        assert runner.grading_threads() == threads
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert runner.grading_threads() == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(224)))
    assert runner.grading_threads() == runner.MAX_GRADING_THREADS == 16  # a fork bomb's bound grows with it
