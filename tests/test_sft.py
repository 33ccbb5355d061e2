"""Supervised fine-tuning (megatron_renio.sft): the loss falls, layouts agree, flags are checked."""

import json
import re

import pytest

from megatron_renio.data.arithmetic_task import build_char_tokenizer, make_splits, write_jsonl
from megatron_renio.errors import UserInputError
from megatron_renio.models.checkpoint import read_checkpoint_metadata
from megatron_renio.sft import parse_sft_args
from tests.torchrun_harness import REPO_ROOT, run_torchrun


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_task")
    train, _ = make_splits(seed=3, num_train=64, num_test=0)
    write_jsonl(str(root / "train.jsonl"), train)
    return root / "train.jsonl", build_char_tokenizer(str(root / "tokenizer"))


@pytest.fixture(scope="module")
def launched(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_runs")
    results = run_torchrun(REPO_ROOT / "tests" / "workers" / "sft_worker.py", 2, out, *map(str, task))
    return out, results


def test_loss_falls_and_a_model_checkpoint_is_saved(launched):
    out, results = launched
    curve = results[0]["curve"]
    assert len(curve) == 8 and curve[-1] < 0.8 * curve[0], curve
    assert results[1]["curve"] == curve  # every rank reports the same, DP-reduced loss
    meta = read_checkpoint_metadata(out / "init")
    assert meta.preset.num_layers == 2 and (meta.tokenizer_dir / "tokenizer.json").is_file()
    assert meta.extra["iterations"] == 8
    records = [json.loads(line) for line in (out / "init_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))  # every step (--log-interval 3 paces the console)
    assert [r["loss"] for r in records] == pytest.approx(curve, rel=1e-6)


def test_flags_the_schedule_leaves_without_effect_are_noted_as_train_notes_them(launched):
    _, results = launched
    assert results[0]["dp2_notes"] == ["note: --min-lr has no effect with --lr-decay-style constant"]
    assert results[1]["dp2_notes"] == []  # rank 0 prints


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_first_step_loss_is_the_same_in_every_layout(launched, layout):
    _, results = launched
    assert results[0][layout] == pytest.approx(results[0]["dp2"], rel=1e-5)


def test_a_non_empty_save_folder_is_refused_before_training(task, tmp_path):
    """Refused while parsing the flags, not after the last step (the folder of the starting checkpoint, say)."""
    data, tokenizer = task
    (tmp_path / "renio_model.json").write_text("{}")
    with pytest.raises(UserInputError, match=f"^--save {re.escape(str(tmp_path))} exists and is not empty$"):
        parse_sft_args(["--data-path", str(data), "--tokenizer", tokenizer, "--model", "tiny-qwen3",
                        "--save", str(tmp_path)])


def test_an_earlier_runs_metrics_file_is_refused_not_appended_to(task, tmp_path):
    """SFT has no resume: a second run would mix its steps 1..N into the first run's records."""
    data, tokenizer = task
    metrics = tmp_path / "metrics.jsonl"
    argv = ["--data-path", str(data), "--tokenizer", tokenizer, "--model", "tiny-qwen3",
            "--save", str(tmp_path / "out"), "--metrics-file", str(metrics)]
    metrics.write_text("")
    assert parse_sft_args(argv).train.metrics_file == str(metrics)  # an empty file is a new file
    metrics.write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(UserInputError, match=f"--metrics-file {re.escape(str(metrics))} holds an earlier run"):
        parse_sft_args(argv)


def test_help_describes_fine_tuning_not_distillation():
    from megatron_renio.config import build_parser
    from megatron_renio.sft import SFT_HELP, build_sft_parser

    texts = {action.dest: action.help for action in build_sft_parser()._actions}
    assert "--pretrained-checkpoint's" in texts["tokenizer"] and "reference solution" in texts["data_path"]
    assert texts["metrics_file"] == SFT_HELP["metrics_file"] and "--save/metrics.jsonl" not in texts["metrics_file"]
    assert texts["lr"] == "default: 1e-06"  # the other flags keep the trainer's text
    trainer = {action.dest: action.help for action in build_parser()._actions}
    assert "the student checkpoint's" in trainer["tokenizer"]  # the shared actions are not changed


def test_coding_targets_are_fenced_as_the_instruction_asks():
    """Bare-code solutions become the python code block the coding instruction asks for."""
    from megatron_renio.data.templates import answer_text

    assert answer_text("def f():\n    return 1\n", "coding") == "```python\ndef f():\n    return 1\n```"
    assert answer_text("```python\nprint(1)\n```", "coding") == "```python\nprint(1)\n```"
    assert answer_text(" 42 \n", "math") == "42"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--renio"], "unrecognized arguments: --renio"),
        (["--model", "tiny-qwen3", "--pretrained-checkpoint", "x"], "either --pretrained-checkpoint or --model"),
        (["--privileged-prompt-fraction", "1.5"], "--privileged-prompt-fraction must be in [0, 1]"),
        (["--lr", "-1"], "--lr must be >= 0"),
        (["--mode", "opd"], "unrecognized arguments: --mode opd"),  # not an abbreviation of --model
        (["--metrics-file", "out/metrics.jsonl"], "--metrics-file out/metrics.jsonl is inside --save out, which "
                                                  "receives only the model checkpoint"),
        (["--tensorboard-dir", "out"], "--tensorboard-dir out is inside --save out"),
        (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),  # it saved an all-inf model
        (["--save", "/proc/sft"], "--save /proc/sft: cannot write in /proc"),  # found only after training
        (["--metrics-file", "/proc/m.jsonl"], "--metrics-file /proc/m.jsonl: cannot write in /proc"),
        (["--tensorboard-dir", __file__], f"--tensorboard-dir {__file__} exists and is not a folder"),
    ],
)
def test_bad_flags_are_one_line_errors(task, flags, message):
    data, tokenizer = task
    base = ["--data-path", str(data), "--tokenizer", tokenizer, "--save", "out"]
    if "--save" in flags:
        base = base[:-2]
    if "--model" not in flags and "--pretrained-checkpoint" not in flags:
        base += ["--model", "tiny-qwen3"]
    with pytest.raises(UserInputError, match=re.escape(message)):
        parse_sft_args(base + flags)


def test_examples_are_every_student_prompt_then_the_privileged_teacher_prompts(task):
    """load_sft_examples against the examples built here from the records: every record's student prompt,
    then the teacher prompts (with the reference solution) of the privileged records in record order,
    each with its solution and EOS as the target; what does not fit --seq-length is counted, not kept."""
    import random

    from megatron_renio.data.prompts import load_prompt_records
    from megatron_renio.data.templates import answer_text, build_prompt_ids
    from megatron_renio.data.tokenizer import load_tokenizer
    from megatron_renio.sft import load_sft_examples

    data, tokenizer_dir = task
    tokenizer = load_tokenizer(tokenizer_dir)
    records = load_prompt_records(str(data), "problem", "solution", require_solution=True)
    cfg = parse_sft_args(["--data-path", str(data), "--tokenizer", tokenizer_dir, "--model", "tiny-qwen3",
                          "--save", "unused", "--privileged-prompt-fraction", "0.25", "--seed", "5"])
    privileged = sorted(random.Random(5).sample(range(len(records)), round(0.25 * len(records))))
    expected = ([(build_prompt_ids(tokenizer, r, "math", "student", "opsd"), r) for r in records]
                + [(build_prompt_ids(tokenizer, records[i], "math", "teacher", "opsd"), records[i]) for i in privileged])
    targets = [tokenizer.encode(answer_text(r.solution, "math")) + [tokenizer.eos_id] for _, r in expected]
    examples = load_sft_examples(cfg, tokenizer)
    assert len(privileged) == 16 and examples.skipped_too_long == 0
    assert list(examples.prompts) == [prompt for prompt, _ in expected]
    assert list(examples.targets) == targets
    longest = max(len(p) + len(t) for (p, _), t in zip(expected, targets))
    cfg.train.seq_length = longest - 1
    fitting = [(p, t) for (p, _), t in zip(expected, targets) if len(p) + len(t) <= longest - 1]
    examples = load_sft_examples(cfg, tokenizer)
    assert examples.skipped_too_long == len(expected) - len(fitting) > 0
    assert list(zip(examples.prompts, examples.targets)) == fitting


def test_an_answer_field_sft_does_not_use_is_not_checked(task, tmp_path):
    """SFT trains on the solutions: a record whose 'answer' is a list (which training's answer check
    refuses) is still an example."""
    from megatron_renio.data.tokenizer import load_tokenizer
    from megatron_renio.sft import load_sft_examples

    data, tokenizer_dir = task
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["answer"] = ["1", "2"]
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = ["--tokenizer", tokenizer_dir, "--model", "tiny-qwen3", "--save", "unused"]
    tokenizer = load_tokenizer(tokenizer_dir)
    plain = load_sft_examples(parse_sft_args(["--data-path", str(data), *flags]), tokenizer)
    examples = load_sft_examples(parse_sft_args(["--data-path", str(odd), *flags]), tokenizer)
    assert list(examples.prompts) == list(plain.prompts) and list(examples.targets) == list(plain.targets)


def test_chat_template_kwargs_reach_the_run_config(tmp_path):
    """Fine-tuning renders its prompts as the trainer does, so it takes the trainer's --chat-template-kwargs
    (load_run_tokenizer applies them: tests/test_train.py)."""
    cfg = parse_sft_args(["--data-path", "d.jsonl", "--model", "tiny-qwen3", "--save", str(tmp_path / "out"),
                          "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert cfg.train.chat_template_kwargs == '{"enable_thinking": false}'
