"""``megatron-renio score`` (megatron_renio/eval/score.py) on a tiny converted student / teacher pair.

The pair is tests/workers/tiny_models.py's (Qwen3, student hidden 64 tied, teacher hidden 96
untied, vocabulary 34 of which the tokenizer knows 30). Every number is checked against
transformers on the same ids, through the independent formulas of tests/reference_renio.py: the
per-token log-probs at the loss temperature (1e-4), the raw ReNIO weights, the pivotal tokens, the
weights normalised over the whole file, the per-sample divergence.

Runs: the real command line in one plain process at TP=1 (micro-batch 2: the last schedule is
padded with a repeated row), then one 2-rank torchrun launch with TP=2, PP=2 and DP=2 (with
``--ckpt-fully-parallel-load``; each must reproduce the TP=1 output) and TP=2 with other loss and
ReNIO flags (checked against the reference), which also records which ranks took part in each
gather of the scores and what reached ``load_model_checkpoint``.
Bad input goes through ``main`` in this process: it fails before any process group or model exists.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from megatron_renio.errors import UserInputError
from megatron_renio.eval import score
from tests import reference_renio as ref
from tests.python_forkserver import run_python
from tests.torchrun_harness import REPO_ROOT, read_jsonl, run_torchrun, torchrun_args
from tests.workers.commands_worker import check_gather
from tests.workers.tiny_models import EXTRA_IDS, WORDS, tiny_checkpoints

WORKER = REPO_ROOT / "tests" / "workers" / "commands_worker.py"
VOCAB = len(WORDS) + EXTRA_IDS
SEQ_LENGTH = 32
DEFAULTS = dict(kind="forward_kl", beta=0.0, temperature=1.1, token_clip=0.05, clip=2.5, threshold=0.8, gamma=1.0,
                norm="batch_mean")
OTHER_FLAGS = ["--loss", "jsd", "--kd-beta", "0.3", "--kd-token-clip", "none", "--kd-temperature", "0.9",
               "--renio-clip", "1.5", "--renio-threshold", "0.3", "--renio-temperature", "2", "--renio-norm", "clamp"]
OTHER = dict(kind="jsd", beta=0.3, temperature=0.9, token_clip=None, clip=1.5, threshold=0.3, gamma=2.0, norm="clamp")
LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"],
           "dp2": ["--ckpt-fully-parallel-load"]}


def _rows():
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [
        {"id": "text", "prompt": "the cat sat on", "completion": "the mat so the answer is \\boxed{2} </s>",
         "correct": True},
        {"id": "ids", "prompt_ids": [1, 7, 8, 9], "teacher_prompt_ids": [1, 13, 14, 13, 15, 16],
         "completion_ids": rand(6) + [2] + rand(8), "completion": "not what is scored: ids win", "correct": False},
        {"id": "empty", "prompt_ids": [1, 20], "completion_ids": []},
        {"id": "long", "prompt_ids": [1, 10, 11], "teacher_prompt": "two plus two is four wait",
         "completion_ids": rand(40)},
        {"id": "mixed", "prompt": "so wait", "teacher_prompt_ids": [1, 17, 18], "completion": "four plus 3 4"},
    ]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.getbasetemp() / "tiny_models")


@pytest.fixture(scope="module")
def runs(paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()) + "\n")
    base = ["--student-load", str(paths["student"]), "--teacher-load", str(paths["teacher"]), "--data", str(data),
            "--seq-length", str(SEQ_LENGTH), "--micro-batch-size", "2", "--per-token"]
    cli = run_python(["-m", "megatron_renio.eval.score", *base, "--out", root / "tp1.jsonl"])
    assert cli.returncode == 0, cli.stderr[-5000:]
    jobs = [("megatron_renio.eval.score", base + flags + ["--out", str(root / f"{name}.jsonl")])
            for name, flags in LAYOUTS.items()]
    jobs.append(("megatron_renio.eval.score", base + OTHER_FLAGS + ["--tensor-model-parallel-size", "2",
                                                                    "--out", str(root / "other.jsonl")]))
    (root / "jobs.json").write_text(json.dumps(jobs))
    worker = run_torchrun(WORKER, 2, root / "worker", root / "jobs.json")
    outputs = {name: read_jsonl(root / f"{name}.jsonl") for name in ["tp1", *LAYOUTS, "other"]}
    return dict(outputs=outputs, stdout=cli.stdout, worker=worker)


@pytest.fixture(scope="module")
def reference(paths):
    """Per row: ids as score must see them and transformers' completion-position logits of both models."""
    import transformers

    from megatron_renio.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(paths["tokenizer"]))
    models = {side: transformers.AutoModelForCausalLM.from_pretrained(paths[f"hf_{side}"], dtype=torch.float32).eval()
              for side in ("student", "teacher")}
    rows = []
    for row in _rows():
        def ids(name, special):
            if f"{name}_ids" in row:
                return row[f"{name}_ids"]
            return tokenizer.encode(row[name], add_special_tokens=special) if name in row else None

        student, completion = ids("prompt", True), ids("completion", False)
        teacher = ids("teacher_prompt", True) or student
        n = min(len(completion), SEQ_LENGTH - max(len(student), len(teacher)))
        completion = completion[:n]
        logits = {}
        for side, prompt in (("student", student), ("teacher", teacher)):
            with torch.no_grad():
                out = models[side](torch.tensor([prompt + completion])).logits
            logits[side] = out[:, len(prompt) - 1:len(prompt) - 1 + n]
        rows.append(dict(completion=completion, truncated=n < len(ids("completion", False)), logits=logits,
                         pieces=[tokenizer.id_to_piece(t) for t in completion]))
    return rows


def _expected(reference, p):
    """Reference output fields of every row for the loss / ReNIO parameters ``p``."""
    expected = []
    for row in reference:
        n = len(row["completion"])
        tokens, mask = torch.tensor([row["completion"]]), torch.ones(1, n, dtype=torch.bool)
        s, u = (ref.sampled_logprobs(row["logits"][side], tokens, mask, VOCAB, p["temperature"])
                for side in ("student", "teacher"))
        r = torch.clamp(s - u, max=p["clip"])[0]
        pivotal = (r >= p["threshold"]).nonzero().flatten().tolist()
        divergence = ref.token_divergence(row["logits"]["student"], row["logits"]["teacher"], VOCAB, p["kind"],
                                          p["beta"], p["temperature"], p["token_clip"], None)
        expected.append(dict(
            raw_weight=float(ref.renio_weights(s, u, mask, p["clip"], p["threshold"], p["gamma"])[0]),
            mean_log_ratio=float(r[pivotal].mean()) if pivotal else 0.0,
            pivotal_positions=pivotal, pivotal_tokens=[row["pieces"][i] for i in pivotal], num_tokens=n,
            truncated=row["truncated"], divergence=float(divergence.sum()) / max(n, 1),
            student_logprobs=s[0].tolist(), teacher_logprobs=u[0].tolist(),
        ))
    weights = ref.Normaliser(p["norm"])(torch.tensor([e["raw_weight"] for e in expected], dtype=torch.float64))
    for e, w in zip(expected, weights.tolist()):
        e["weight"] = w
    return expected


def _check_against_reference(output, expected):
    assert len(output) == len(expected)
    for i, (got, want) in enumerate(zip(output, expected)):
        for key in ("pivotal_positions", "pivotal_tokens", "num_tokens", "truncated"):
            assert got[key] == want[key], (i, key)
        assert got["num_pivotal"] == len(want["pivotal_positions"])
        for key in ("student_logprobs", "teacher_logprobs"):
            torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64),
                                       torch.tensor(want[key], dtype=torch.float64), atol=1e-4, rtol=0)
        for key in ("raw_weight", "weight", "mean_log_ratio", "divergence"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (i, key)
        assert got["loss"] == pytest.approx(got["divergence"], rel=1e-5, abs=1e-7)


def test_tp1_matches_transformers_and_the_reference_formulas(runs, reference):
    output = runs["outputs"]["tp1"]
    _check_against_reference(output, _expected(reference, DEFAULTS))
    assert sum(r["num_pivotal"] for r in output) > 0 and len({r["weight"] for r in output}) > 2
    assert [r["truncated"] for r in output] == [False, False, False, True, False]
    assert "scored 5 rows" in runs["stdout"] and f"; cut at --seq-length {SEQ_LENGTH}: 1 (field truncated)" in runs["stdout"]


def test_output_rows_keep_order_and_input_fields(runs):
    output = runs["outputs"]["tp1"]
    rows = _rows()
    assert [r["id"] for r in output] == [r["id"] for r in rows]
    assert output[0]["correct"] is True and output[0]["prompt"] == rows[0]["prompt"]
    assert not any(key.endswith("_ids") for r in output for key in r)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_reproduce_tp1(runs, layout):
    tp1, other = runs["outputs"]["tp1"], runs["outputs"][layout]
    for a, b in zip(tp1, other, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                torch.testing.assert_close(torch.tensor(b[key]), torch.tensor(value), atol=1e-5, rtol=1e-5)
            else:
                assert b[key] == value, (a["id"], key)


def test_only_the_reporters_take_part_in_the_gather(runs):
    """The scores go to rank 0 over the reporters only (TP rank 0 of the last stage of each replica):
    at TP=2 rank 1 makes no call; at PP=2 rank 0 holds nothing and receives the list from rank 1 (the
    last stage) in one message; at DP=2 both gather over their data-parallel group. (A gather over the
    whole world had every rank send a buffer padded to the largest one.)"""
    for j, name in enumerate([*LAYOUTS, "other"]):
        entries = [rank["gathers"][j] for rank in runs["worker"]]
        check_gather(entries, "last")
        assert sorted(index for index, _, _ in entries[0]["returned"]) == list(range(len(_rows()))), name
    assert runs["worker"][0]["gathers"][1]["calls"] == [("recv_object_list", [0, 1], 1)]  # pp2


def test_ckpt_fully_parallel_load_reaches_the_checkpoint_loader(runs, paths, tmp_path):
    """Only the dp2 run asked for it; it loaded both models with it (and reproduces TP=1:
    test_layouts_reproduce_tp1)."""
    for rank in runs["worker"]:
        assert rank["loads"] == [[name == "dp2"] * 2 for name in [*LAYOUTS, "other"]]
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt_ids": [1, 7], "completion_ids": [8]}\n')
    argv = ["--student-load", str(paths["student"]), "--teacher-load", str(paths["teacher"]), "--data", str(data),
            "--seq-length", "64"]
    assert score.parse_args(argv).train.ckpt_fully_parallel_load is False
    assert score.parse_args(argv + ["--ckpt-fully-parallel-load"]).train.ckpt_fully_parallel_load is True
    assert score.parse_args(argv + ["--ckpt-fully-parallel-load", "false"]).train.ckpt_fully_parallel_load is False
    assert "--ckpt-fully-parallel-load" in score.build_parser().format_help()


def test_loss_and_renio_flags_are_the_training_ones(runs, reference):
    _check_against_reference(runs["outputs"]["other"], _expected(reference, OTHER))


def test_output_feeds_analyze(runs, tmp_path):
    from megatron_renio.eval.analysis import load_generations

    graded = [r for r in runs["outputs"]["tp1"] if "correct" in r]
    path = tmp_path / "graded.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in graded))
    assert [g.weight for g in load_generations(str(path))] == [r["weight"] for r in graded]


def _bad(argv, capsys, out):
    assert score.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return err[0]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(paths, capsys, tmp_path):
    models = ["--student-load", str(paths["student"]), "--teacher-load", str(paths["teacher"])]
    good = {"prompt_ids": [1, 7], "completion_ids": [8, 9]}
    files = {
        "good": [good],
        "bad_json": [good, "{oops"],
        "no_completion": [{"prompt_ids": [1, 7]}],
        "out_of_vocab": [{"prompt_ids": [1, 7], "completion_ids": [8, VOCAB]}],
        "not_ints": [{"prompt_ids": [1, 7], "completion_ids": [8, "9"]}],
        "empty_prompt": [{"prompt_ids": [], "completion_ids": [8]}],
        "long_prompt": [{"prompt_ids": [1] * 40, "completion_ids": [8]}],
        "nan_field": [good, '{"prompt_ids": [1, 7], "completion_ids": [8], "score": NaN}'],
    }
    for name, lines in files.items():
        (tmp_path / f"{name}.jsonl").write_text(
            "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    data = lambda name: ["--data", str(tmp_path / f"{name}.jsonl")]  # noqa: E731
    out = tmp_path / "out.jsonl"
    cases = {
        "--teacher-load is required": ["--student-load", str(paths["student"]), *data("good")],
        "unrecognized argument --lr": [*models, *data("good"), "--lr", "0.1"],
        "--kd-beta must be in [0, 1]": [*models, *data("good"), "--kd-beta", "2"],
        "--renio-norm must be one of": [*models, *data("good"), "--renio-norm", "median"],
        "--micro-batch-size must be an integer >= 1": [*models, *data("good"), "--micro-batch-size", "0"],
        "no such file": [*models, "--data", str(tmp_path / "missing.jsonl")],
        "bad_json.jsonl line 2: malformed JSON": [*models, *data("bad_json")],
        "missing field 'completion' or 'completion_ids'": [*models, *data("no_completion")],
        f"outside the vocabulary [0, {VOCAB})": [*models, *data("out_of_vocab")],
        "'completion_ids' must be a list of integers": [*models, *data("not_ints")],
        "field 'prompt' is empty": [*models, *data("empty_prompt")],
        "leaves no room for the completion in --seq-length 32": [*models, *data("long_prompt"), "--seq-length", "32"],
        "--student-load: " + str(tmp_path) + " is not a model checkpoint": ["--student-load", str(tmp_path), "--teacher-load", str(paths["teacher"]),
                                   *data("good")],
        "--tokenizer: tokenizer path " + str(tmp_path / "nowhere") + " does not exist":
            [*models, *data("good"), "--tokenizer", str(tmp_path / "nowhere")],
        "nan_field.jsonl line 2: field 'score' cannot be copied to the JSON output (Out of range float values "
        "are not JSON compliant": [*models, *data("nan_field")],
        "--tokenizer is empty (an unset shell variable?)": [*models, *data("good"), "--tokenizer", ""],
        "world size 1 is not divisible by --tensor-model-parallel-size 3":
            [*models, *data("good"), "--tensor-model-parallel-size", "3"],
    }
    for expected, argv in cases.items():
        assert expected in _bad(argv, capsys, out), expected
    assert score.main([*models, *data("bad_json"), "--seq-length", "512", "--out", str(out)]) == 2
    captured = capsys.readouterr()  # the note comes before the refusal
    assert "exceeds the student's max_position_embeddings (256)" in captured.out and "malformed JSON" in captured.err
    for out_name, message in (("", "argument --out: must be a path, got ''"),
                              ("s.jsonl.gz", "score writes plain JSON lines; give a name ending in .jsonl")):
        assert score.main([*models, *data("good"), "--out", out_name and str(tmp_path / out_name)]) == 2
        assert message in capsys.readouterr().err
    assert score.main([*models, *data("good"), "--out", str(tmp_path / "good.jsonl")]) == 2
    assert "is the --data file" in capsys.readouterr().err
    link = tmp_path / "link.jsonl"  # another name of the --data file, which writing would replace
    link.symlink_to(tmp_path / "good.jsonl")
    assert score.main([*models, *data("good"), "--out", str(link)]) == 2
    assert capsys.readouterr().err == f"error: --out {link} is the --data file\n"
    assert link.is_symlink() and json.loads((tmp_path / "good.jsonl").read_text()) == good


def test_command_line_error_has_no_traceback(paths, tmp_path):
    proc = run_python(["-m", "megatron_renio.cli", "score", "--student-load", paths["student"], "--teacher-load",
                       paths["teacher"], "--data", tmp_path / "missing.jsonl"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --data {tmp_path / 'missing.jsonl'}: no such file"]


# A copy of a checkpoint with one embedding row NaN (argv: GOOD BAD TOKEN JOBS.json RESULTS.json), then
# score.main on each job's argv, in this one process: {"rc", "stderr"} per job.
_NAN_MODEL_SCRIPT = r"""
import contextlib, io, json, shutil, sys
from pathlib import Path
import torch
from megatron.core import dist_checkpointing
from checkpoints_conversion.common import build_single_process_model
from megatron_renio import distributed
from megatron_renio.eval import score
from megatron_renio.models.checkpoint import _sharded_state_dict, load_model_checkpoint, read_checkpoint_metadata

good, bad, token = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
model, _ = build_single_process_model(read_checkpoint_metadata(good).preset, "fp32")
load_model_checkpoint(model, good)
with torch.no_grad():
    model.embedding.word_embeddings.weight[token] = float("nan")
shutil.copytree(good, bad, ignore=shutil.ignore_patterns("model"))
(bad / "model").mkdir()
dist_checkpointing.save(_sharded_state_dict(model), str(bad / "model"))  # (save_model_checkpoint refuses NaN)
distributed.destroy()
results = []
for argv in json.loads(Path(sys.argv[4]).read_text()):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = score.main(argv)
    results.append({"rc": rc, "stderr": err.getvalue()})
Path(sys.argv[5]).write_text(json.dumps(results))
"""
NAN_TOKEN = 25  # its embedding row is NaN in the broken copy of the (untied) teacher
NAN_ROWS = [
    {"id": "fine", "prompt_ids": [1, 7, 8], "completion_ids": [9, 10, 11, 12]},
    {"id": "in_completion", "prompt_ids": [1, 7], "completion_ids": [9, NAN_TOKEN, 10, 11]},
    {"id": "fine_too", "prompt_ids": [1, 12, 13], "completion_ids": [14, 15]},
    {"id": "in_prompt", "prompt_ids": [1, NAN_TOKEN, 3], "completion_ids": [13, 14]},
]


def test_non_finite_log_probs_are_refused_naming_the_row_and_the_model(paths, tmp_path):
    """A checkpoint with a NaN weight (the teacher's embedding row of one token) scored as the teacher,
    then as the student: one line naming the data file's first affected row (transformers, on the same
    broken weights, says which rows give non-finite log-probs) and the model, exit 2, nothing written;
    the good pair scores the same file."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(paths["hf_teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        hf.model.embed_tokens.weight[NAN_TOKEN] = float("nan")
        affected = []
        for i, row in enumerate(NAN_ROWS):
            prompt, completion = row["prompt_ids"], row["completion_ids"]
            logp = torch.log_softmax(hf(torch.tensor([prompt + completion])).logits[0], -1)
            u = logp[len(prompt) - 1:-1].gather(-1, torch.tensor(completion)[:, None])
            if not torch.isfinite(u).all():
                affected.append(i)
    assert affected == [1, 3], affected  # (the first row is fine: the error must pick the right one)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in NAN_ROWS))
    broken = tmp_path / "broken_teacher"
    common = ["--data", str(data), "--seq-length", str(SEQ_LENGTH), "--micro-batch-size", "2", "--per-token"]
    jobs = {
        "teacher": ["--student-load", str(paths["student"]), "--teacher-load", str(broken)],
        "student": ["--student-load", str(broken), "--teacher-load", str(paths["teacher"])],
        "good": ["--student-load", str(paths["student"]), "--teacher-load", str(paths["teacher"])],
    }
    (tmp_path / "jobs.json").write_text(json.dumps([argv + common + ["--out", str(tmp_path / f"{name}.jsonl")]
                                                    for name, argv in jobs.items()]))
    proc = run_python(["-c", _NAN_MODEL_SCRIPT, paths["teacher"], broken, NAN_TOKEN, tmp_path / "jobs.json",
                       tmp_path / "results.json"])
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = dict(zip(jobs, json.loads((tmp_path / "results.json").read_text())))
    for side in ("teacher", "student"):
        result = results[side]
        lines = result["stderr"].strip().splitlines()
        assert result["rc"] == 2 and len(lines) == 1, result
        assert lines[0].startswith(f"error: {data} line {affected[0] + 1}: the {side} (--{side}-load {broken}) gives "
                                   f"non-finite log-probs (NaN or inf) on this row's completion ({len(affected)} rows "
                                   "in all)"), lines[0]
        assert not (tmp_path / f"{side}.jsonl").exists()
    # with two data-parallel replicas every rank refuses (the other rank used to exit 0 in silence)
    launch = run_python([*torchrun_args(2), "-m", "megatron_renio.eval.score", *jobs["teacher"], *common,
                         "--out", tmp_path / "teacher.jsonl"])
    assert launch.returncode != 0 and "[rank0]:" not in launch.stderr  # no traceback
    assert f"error: {data} line {affected[0] + 1}: the teacher" in launch.stderr, launch.stderr[-3000:]
    assert "error (rank 1)" not in launch.stderr  # rank 1 stops with rank 0's finding, which rank 0 prints
    assert results["good"]["rc"] == 0, results["good"]
    output = read_jsonl(tmp_path / "good.jsonl")
    assert [r["id"] for r in output] == [r["id"] for r in NAN_ROWS]
    assert all(math.isfinite(r[key]) for r in output for key in ("raw_weight", "weight", "divergence", "loss"))
    assert sorted(p.name for p in tmp_path.iterdir() if "jsonl" in p.name) == ["good.jsonl", "rows.jsonl"]


def test_nonfinite_models_names_the_model_from_per_token_numbers():
    """Which model a row's non-finite numbers come from: s (student) / u (teacher) log-probs of its
    scored tokens (a token past them does not count); an infinite divergence with finite log-probs
    names both as 'student or teacher'."""
    def per_sample(s=0.0, u=0.0, d=0.0, loss=0.0):
        tokens = lambda v: torch.tensor([[-1.0, -2.0, v, float("nan")]])  # noqa: E731  (the 4th is not scored)
        return {"student_logprobs": tokens(s), "teacher_logprobs": tokens(u), "divergence": tokens(d),
                "per_sample_loss": torch.tensor([loss])}

    nan, inf = float("nan"), float("inf")
    assert score._nonfinite_models(per_sample(), 0, 3) is None
    assert score._nonfinite_models(per_sample(s=nan), 0, 3) == "student"
    assert score._nonfinite_models(per_sample(u=-inf), 0, 3) == "teacher"
    assert score._nonfinite_models(per_sample(s=inf, u=nan, d=nan), 0, 3) == "student and teacher"
    assert score._nonfinite_models(per_sample(d=nan), 0, 3) == "student or teacher"
    assert score._nonfinite_models(per_sample(loss=inf), 0, 3) == "student or teacher"
    assert score._nonfinite_models(per_sample(s=nan), 0, 2) is None


class _LlamaLikeTokenizer:
    """Characters as ids; BOS (id 1) added to a whole input, and read back from a literal '<s>'."""

    bos_id = 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        bos = text.startswith("<s>")
        ids = [1] * bos + [2 + ord(c) % 20 for c in text[3 * bos:]]
        return [1] + ids if add_special_tokens else ids


def test_a_text_prompt_that_starts_with_bos_gets_no_second_one():
    """Eval writes its prompts decoded with special tokens ('<s>...'): scoring them as text must not add
    another BOS; a plain text prompt still gets one, a completion none."""
    tok = _LlamaLikeTokenizer()
    assert score._ids({"prompt": "<s>ab"}, "prompt", "w", tok, 64) == [1, 2 + ord("a") % 20, 2 + ord("b") % 20]
    assert score._ids({"prompt": "ab"}, "prompt", "w", tok, 64) == [1, 2 + ord("a") % 20, 2 + ord("b") % 20]
    assert score._ids({"completion": "ab"}, "completion", "w", tok, 64) == [2 + ord("a") % 20, 2 + ord("b") % 20]


def test_data_rows_read_alike_from_jsonl_gzip_and_a_json_array(tmp_path):
    """--data takes the formats of the project's other readers (megatron_renio.data.records)."""
    import gzip

    rows = [{"prompt_ids": [1, 7], "completion_ids": [8, 9], "grade": 1}, {"prompt_ids": [2], "completion_ids": [3]}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.jsonl").write_text(text)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(text)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    read = [score.read_rows(str(tmp_path / name), None, VOCAB, 32) for name in ("a.jsonl", "a.jsonl.gz", "a.json")]
    assert read[0] == read[1] == read[2]
    assert [(r.student_prompt, r.completion, r.extra) for r in read[0]] == [([1, 7], [8, 9], {"grade": 1}),
                                                                          ([2], [3], {})]
    with pytest.raises(UserInputError, match="a.txt: unknown format"):
        score.parse_args(["--student-load", "s", "--teacher-load", "t", "--data", str(tmp_path / "a.txt")])


def test_seq_length_defaults_to_what_the_models_were_trained_for(paths, tmp_path):
    """Both tiny models have max_position_embeddings 256; the training default (4096) gave two notes per run."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt_ids": [1, 7], "completion_ids": [8]}\n')
    models = ["--student-load", str(paths["student"]), "--teacher-load", str(paths["teacher"]), "--data", str(data)]
    assert score.parse_args(models).train.seq_length == 256
    assert score.parse_args(models + ["--seq-length", "64"]).train.seq_length == 64
    short = tmp_path / "short_teacher"  # the smaller of the two, rounded down to a multiple of 8
    shutil.copytree(paths["teacher"], short)
    meta = json.loads((short / "renio_model.json").read_text())
    meta["preset"]["max_position_embeddings"] = 100
    (short / "renio_model.json").write_text(json.dumps(meta))
    models[3] = str(short)
    assert score.parse_args(models).train.seq_length == 96


def test_a_column_the_json_output_cannot_hold_is_refused_when_read(tmp_path):
    """Extra fields are copied to the output: a parquet date or bytes column is refused before any model
    runs, not by json.dumps after the whole scoring."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, column in (("day", pa.array([datetime.date(2026, 1, 1)])), ("raw", pa.array([b"\x00"]))):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"prompt_ids": [[1, 7]], "completion_ids": [[8]], name: column}), path)
        with pytest.raises(UserInputError, match=rf"^{path} row 1: field '{name}' cannot be copied to the JSON "
                                                 r"output \(Object of type \w+ is not JSON serializable\)$"):
            score.read_rows(str(path), None, VOCAB, 32)
