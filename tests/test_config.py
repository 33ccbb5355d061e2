"""Training flags: Megatron-LM names, YAML config with CLI override, one-line validation errors."""

import dataclasses

import pytest

from megatron_renio.config import TrainConfig, build_parser, parse_train_args, template_variables
from megatron_renio.errors import RankFailure, UserInputError

BASE = ["--model", "tiny-qwen3", "--data-path", "train.jsonl", "--seq-length", "256", "--max-new-tokens", "32"]


def test_defaults_follow_the_reference():
    cfg = parse_train_args(BASE)
    assert (cfg.kd_temperature, cfg.kd_token_clip, cfg.renio_clip, cfg.renio_threshold) == (1.1, 0.05, 2.5, 0.8)
    assert (cfg.renio_temperature, cfg.renio_norm, cfg.renio_max_weight, cfg.rollout_temperature) == (1.0, "batch_mean", 10.0, 1.1)
    assert cfg.mode == "opsd" and cfg.teacher == "fixed"
    assert cfg.distributed_timeout_minutes == 60  # replicas wait in a collective for the slowest rollout


def test_the_flag_choices_are_the_ones_the_core_modules_take():
    """config.py repeats some choices to stay torch-free; they must stay the modules' own."""
    from megatron_renio import config
    from megatron_renio.data import templates
    from megatron_renio.losses import divergence, fused
    from megatron_renio.renio import weights

    assert config.RENIO_NORMS == weights.NORM_MODES and config.RENIO_SCOPES == weights.SCOPES
    assert config.TASKS == templates.TASKS and config.MODES == templates.MODES
    assert config.LOSS_IMPLS == (*fused.IMPLS, "unfused")
    import torch

    assert config.FLOAT32_TINY == torch.finfo(torch.float32).tiny
    assert set(config.LOSSES) - {"sampled_rkl"} == set(divergence.DIVERGENCE_KINDS)


def test_megatron_flag_names_parse():
    cfg = parse_train_args(BASE + [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
        "--micro-batch-size", "2", "--global-batch-size", "16", "--lr", "1e-5", "--min-lr", "1e-6",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "3", "--clip-grad", "0.5", "--adam-beta2", "0.95",
        "--bf16", "--use-distributed-optimizer", "--renio", "--kd-token-clip", "none", "--kd-top-k", "8",
    ])
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.sequence_parallel) == (2, 2, True)
    assert cfg.bf16 and cfg.use_distributed_optimizer and cfg.renio
    assert cfg.kd_token_clip is None and cfg.kd_top_k == 8 and cfg.lr == 1e-5


def test_yaml_config_with_cli_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3.0e-6\nrenio-norm: ema\n--train-iters: 7\ndata_path: [a.jsonl, b.jsonl]\nmodel: tiny-qwen3\n")
    cfg = parse_train_args(["--config", str(path), "--lr", "4e-6", "--seq-length", "64", "--max-new-tokens", "8"])
    assert cfg.lr == 4e-6 and cfg.renio_norm == "ema" and cfg.train_iters == 7 and cfg.data_path == ["a.jsonl", "b.jsonl"]


def test_a_flag_given_twice_keeps_its_last_value_data_path_too(tmp_path):
    """As in Megatron-LM, so that a launch script's appended flags override its own ("$@" after them)."""
    cfg = parse_train_args(BASE + ["--data-path", "b.jsonl", "c.jsonl", "--lr", "1e-5", "--lr", "2e-5"])
    assert cfg.data_path == ["b.jsonl", "c.jsonl"] and cfg.lr == 2e-5


def test_a_teacher_model_or_opd_means_a_separate_teacher_unless_told_otherwise(tmp_path):
    for flags, teacher in ((["--mode", "opd", "--teacher-load", "t"], "separate"),
                           (["--teacher-model", "tiny-qwen3"], "separate"), ([], "fixed"),
                           (["--teacher", "ema"], "ema")):
        assert parse_train_args(BASE + flags).teacher == teacher, flags
    config = tmp_path / "run.yaml"
    config.write_text("mode: opd\nteacher_load: t\n")
    assert parse_train_args(BASE + ["--config", str(config)]).teacher == "separate"
    help_text = " ".join(build_parser().format_help().split())
    assert "default: separate with --mode opd, --teacher-load or --teacher-model; else fixed" in help_text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--renio-clip", "0"], "--renio-clip must be > 0, got 0.0"),
        (["--kd-beta", "2"], r"--kd-beta must be in \[0, 1\], got 2.0"),
        (["--kd-beta", "0.5"], r"--kd-beta must be 0 with --loss forward_kl \(only --loss jsd mixes by beta; pass "
                               r"--loss jsd --kd-beta 0.5\), got 0.5"),  # was ignored: forward KL trained
        (["--loss", "sampled_rkl", "--kd-beta", "1"], "--kd-beta must be 0 with --loss sampled_rkl"),
        (["--renio-clip", "0.5"], r"--renio-threshold must be <= --renio-clip 0.5 \(a clipped log-ratio never "
                                  r"exceeds the clip: no token would be pivotal and every weight would be 1\), got 0.8"),
        (["--rollout-top-p", "0"], r"--rollout-top-p must be in \(0, 1\], got 0.0"),
        (["--rollout-batch-size", "-1"], "--rollout-batch-size must be an integer >= 0, got -1"),
        (["--lr", "-1"], "--lr must be >= 0, got -1.0"),
        (["--renio-norm", "median"], "--renio-norm must be one of none, batch_mean, ema, clamp"),
        (["--renio-temperature", "0.01"],
         r"--renio-temperature must be >= max\(--renio-clip, -\(--renio-threshold\)\) / 60 .*, got 0.01"),
        (["--loss", "mse"], "--loss must be one of forward_kl, reverse_kl, jsd, sampled_rkl"),
        (["--micro-batch-size", "3", "--global-batch-size", "8"], "--global-batch-size 8 is not divisible by --micro-batch-size 3"),
        (["--mode", "opd"], r"--mode opd needs a teacher model: --teacher-load \(a converted checkpoint\) or "
                            r"--teacher-model \(a preset\)"),
        (["--mode", "opd", "--teacher", "fixed"], "--mode opd needs --teacher separate"),
        (["--teacher", "separate"], "--teacher separate needs --teacher-load"),
        (["--teacher", "fixed", "--teacher-load", "big"], r"--teacher-load needs --teacher separate \(--teacher fixed: the teacher is a "
                                    r"frozen copy of the initial student\)"),  # it was ignored: self-distillation
        (["--teacher", "ema", "--teacher-model", "tiny-qwen3"], "--teacher-model needs --teacher separate"),
        (["--student-load", "ckpt"], "give either --student-load or --model, not both"),
        (["--teacher", "separate", "--teacher-load", "a", "--teacher-model", "tiny-qwen3"],
         "give either --teacher-load or --teacher-model, not both"),
        (["--global-batch-size", "8", "--samples-per-prompt", "3"], "--global-batch-size 8 is not divisible by --samples-per-prompt 3"),
        (["--save-samples-interval", "5"], "--save-samples-interval needs --save"),
        (["--dist-ckpt-optim-fully-reshardable"], "--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer"),
        (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size must be an integer >= 1"),
        (["--max-new-tokens", "300"], r"--max-new-tokens must be smaller than --seq-length \(256\)"),
        (["--seq-length", "100"], r"--seq-length must be a multiple of 8 .*, got 100"),
        (["--seq-length", "264", "--tensor-model-parallel-size", "16", "--sequence-parallel"],
         r"--seq-length must be a multiple of 16 \(batches are padded to multiples of 8, and of "
         r"--tensor-model-parallel-size with --sequence-parallel\), got 264"),
        (["--lr-warmup-iters", "256", "--train-iters", "256"],
         r"--lr-warmup-iters must be smaller than --train-iters \(256\), got 256"),
        (["--lr", "abc"], "argument --lr: expected a finite number, got 'abc'"),
        (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),  # weights went inf, exit 0
        (["--kd-temperature", "inf"], "argument --kd-temperature: expected a finite number"),  # loss 0, no error
        (["--kd-token-clip", "nan"], "argument --kd-token-clip: expected a finite number, got 'nan'"),
        (["--seed", "99999999999999999999"], r"--seed must be an integer in \[0, 4294967295\]"),  # a traceback
        (["--distributed-timeout-minutes", "1e30"], r"--distributed-timeout-minutes must be in \[1, 10080\] \(a minute "
                                                    r"to a week\), got 1e\+30"),
        (["--distributed-timeout-minutes", "0.001"], r"--distributed-timeout-minutes must be in \[1, 10080\]"),
        (["--adam-eps", "1e-300"], r"--adam-eps must be >= 1.18e-38 \(float32's smallest normal number"),
        (["--kd-temperature", "1e-9"], r"--kd-temperature must be >= 0.001 \(below it the tempered distributions "
                                       r"are one-hot in float32\), got 1e-09"),
        (["--seed", "-1"], r"--seed must be an integer in \[0, 4294967295\], got -1"),  # numpy's traceback
        (["--recompute-granularity", "bogus"], "--recompute-granularity must be one of none, full, selective"),
        (["--recompute-num-layers", "0"], "--recompute-num-layers must be an integer >= 1"),
        (["--micro-batch-order", "length"], r"--micro-batch-order length needs --renio-scope global \(--renio-scope "
                                            r"local normalises over each micro-batch"),
        (["--micro-batch-order", "sorted"], "--micro-batch-order must be one of data, length"),
        (["--lr-decay-iters", "0"], "--lr-decay-iters must be an integer >= 1 or none, got 0"),
        (["--save", ""], r"--save is empty \(an unset shell variable\?\): give a value or leave the flag out"),
        (["--data-path", "a.jsonl", ""], r"--data-path is empty \(an unset shell variable\?\)"),
        (["--lr-warmup-iters", "50", "--lr-decay-iters", "50"],
         r"--lr-warmup-iters must be smaller than --lr-decay-iters \(50\), got 50"),
        (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1"),
        (["--config", "a.yaml", "--config", "b.yaml"], r"--config given twice \(a.yaml and b.yaml\): give one"),
        (["--config", ""], r"argument --config: must be a path, got '' \(an unset shell variable\?\)"),  # not ignored
        (["--seq-len", "128"], "unrecognized arguments: --seq-len 128"),  # no abbreviations: --mod is not --mode
        (["--chat-template-kwargs", "enable_thinking=false"], r"argument --chat-template-kwargs: must be a JSON object "
                                                              r"such as '\{\"enable_thinking\": false\}', got "),
        (["--chat-template-kwargs", "[1]"], "argument --chat-template-kwargs: must be a JSON object"),
    ],
)
def test_bad_flags_give_one_line_naming_the_flag(flags, message):
    with pytest.raises(UserInputError, match=message) as err:
        parse_train_args(BASE + flags)
    assert "\n" not in str(err.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(UserInputError, match="--config .*missing.yaml: file not found"):
        parse_train_args(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(UserInputError, match="not valid YAML"):
        parse_train_args(["--config", str(bad)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rate: 1\n")
    with pytest.raises(UserInputError, match="unknown key 'learning_rate'"):
        parse_train_args(["--config", str(unknown)])


def test_yaml_values_are_converted_like_command_line_text(tmp_path):
    """YAML 1.1 reads 1e-6 as a string and off as a boolean: each value goes through the flag's converter."""
    path = tmp_path / "run.yaml"
    path.write_text(
        "lr: 1e-6\nkd_token_clip: ~\nkd_top_k: 8\ntrain_iters: 7\nsave: null\nmodel: tiny-qwen3\n"
        "data_path: train.jsonl\nseq_length: 256\nmax_new_tokens: 32\n"
    )
    cfg = parse_train_args(["--config", str(path)])
    assert cfg.lr == 1e-6 and isinstance(cfg.lr, float)
    assert cfg.kd_token_clip is None and cfg.kd_top_k == 8 and cfg.train_iters == 7 and cfg.save is None
    assert cfg.data_path == ["train.jsonl"]


def test_chat_template_kwargs_are_json_text_on_the_command_line_and_in_the_file(tmp_path):
    assert parse_train_args(BASE + ["--chat-template-kwargs", '{"enable_thinking": false}']).chat_template_kwargs == \
        '{"enable_thinking": false}'
    path = tmp_path / "run.yaml"
    path.write_text("""chat_template_kwargs: '{"enable_thinking": false}'\n""")
    assert template_variables(parse_train_args(["--config", str(path)] + BASE).chat_template_kwargs) == \
        {"enable_thinking": False}


def test_a_quoted_null_in_the_config_file_is_text(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text('problem_field: "null"\nkd_token_clip: ~\nsave:\n')
    cfg = parse_train_args(["--config", str(path)] + BASE)
    assert (cfg.problem_field, cfg.kd_token_clip, cfg.save) == ("null", None, None)


def test_yaml_bool_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("bf16: true\nrenio: yes\nuse_distributed_optimizer: off\ndebug: 1\n")
    cfg = parse_train_args(["--config", str(path)] + BASE)
    assert (cfg.bf16, cfg.renio, cfg.use_distributed_optimizer, cfg.debug) == (True, True, False, True)
    path.write_text("bf16: maybe\n")
    with pytest.raises(UserInputError, match="run.yaml: key 'bf16' must be true or false, got 'maybe'"):
        parse_train_args(["--config", str(path)] + BASE)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: fast", "key 'lr' must be a finite number, got 'fast'"),
        ("train_iters: 2.5", "key 'train_iters' must be an integer, got '2.5'"),
        ("kd_token_clip: [0.1]", r"key 'kd_token_clip' must be a finite number or none, got \['0.1'\]"),
        ("kd_top_k: eight", "key 'kd_top_k' must be an integer or none, got 'eight'"),
        ("model: {name: tiny}", "key 'model' must be a string, got {'name': 'tiny'}"),
        ("data_path: [[a.jsonl]]", "key 'data_path' must be a file path or a list of file paths"),
        ("lr: .inf", "key 'lr' must be a finite number, got '.inf'"),
        ("lr: 1e-5\nseed: 3\nlr: 1e-6", r"line 3 not valid YAML \(key 'lr' given twice\)"),  # the last one won
        ("lr: 1e-5\n--lr: 1e-6", "key '--lr' sets --lr again"),
        ("mode: null", "key 'mode' is null: give a value, or leave the key out$"),
        ("problem_field: ~", "key 'problem_field' is null: give a value, or leave the key out$"),  # was: the field '~'
        ("data_path:", "key 'data_path' is null: give a value, or leave the key out$"),
        ("data_path: [a.jsonl, ~]", r"key 'data_path' must be a file path or a list of file paths, got \['a.jsonl', "
                                    r"None\]"),
        ("chat_template_kwargs: {enable_thinking: false}", r"key 'chat_template_kwargs' must be a JSON object in quotes "
                                                           r"\('\{\"enable_thinking\": false\}'\), got \{'enable_thinking': "
                                                           r"'false'\}"),
    ],
)
def test_yaml_value_of_the_wrong_type_gives_one_line(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserInputError, match=f"--config {path}: {message}") as err:
        parse_train_args(["--config", str(path)] + BASE)
    assert "\n" not in str(err.value)


def test_threshold_at_the_clip_is_allowed():
    """r >= tau can hold at tau = c (a token whose log-ratio reaches the clip is pivotal)."""
    cfg = parse_train_args(BASE + ["--renio-clip", "1", "--renio-threshold", "1"])
    assert cfg.renio_threshold == cfg.renio_clip == 1.0


@pytest.mark.parametrize("value", ["-1e1", "-2.5E-1", "-.5", "-3"])
def test_a_negative_number_is_a_value_in_any_notation(value):
    """``--renio-threshold -1e1`` needs no ``=``: the value is not taken for a flag."""
    assert parse_train_args(BASE + ["--renio-threshold", value]).renio_threshold == float(value)


def test_config_file_that_is_not_yaml_text(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"lr: 1e-5\nmodel: \xff\xfe\n")
    with pytest.raises(UserInputError, match=f"^--config {path}: not UTF-8 text \\(byte 16\\)$"):
        parse_train_args(["--config", str(path)] + BASE)
    with pytest.raises(UserInputError, match=f"^--config {tmp_path} is a folder, not a YAML file$"):
        parse_train_args(["--config", str(tmp_path)] + BASE)


def test_load_alone_is_no_student_model():
    """--load restores training state; the trainer builds the student from --student-load or --model."""
    rest = ["--data-path", "train.jsonl", "--seq-length", "256", "--max-new-tokens", "32", "--load", "runs/x"]
    with pytest.raises(UserInputError, match="no student model: give --student-load .* or --model"):
        parse_train_args(rest)
    assert parse_train_args(rest + ["--student-load", "ckpt/student"]).load == "runs/x"


@pytest.mark.parametrize("argv, debug", [
    (["--lr", "1", "--debug"], True), (["--debug", "--lr", "1"], True), (["--debug=true"], True),
    (["--debug", "yes"], True), (["--debug=false"], False), (["--debug", "0"], False), (["--lr", "1"], False),
    (["--debug", "--debug=false"], False), (["--debug=false", "--debug"], True), (["--debug", "0", "--debug"], True),
])
def test_debug_flag_is_read_as_its_parser_reads_it(argv, debug):
    """--debug=true and --debug yes show the traceback too, --debug=false does not (was: the exact word)."""
    from megatron_renio.entrypoint import debug_requested, run_command

    assert debug_requested(argv) is debug

    def parse(_argv):
        raise UserInputError("bad flag")

    if debug:
        with pytest.raises(UserInputError):
            run_command(parse, print, argv)
    else:
        assert run_command(parse, print, argv) == 2


def test_debug_from_a_config_file_shows_the_traceback(tmp_path):
    """debug: true in --config counts once the flags parse (the command line alone does not say it)."""
    from megatron_renio.entrypoint import run_command

    config = tmp_path / "c.yaml"
    config.write_text("debug: true\n")

    def run(_cfg):
        raise UserInputError("bad data")

    with pytest.raises(UserInputError, match="bad data"):
        run_command(parse_train_args, run, BASE + ["--config", str(config)])
    assert run_command(parse_train_args, run, BASE) == 2


@pytest.mark.parametrize("rank, error, status, printed", [
    ("0", UserInputError("disk full"), 2, "error: disk full"),
    ("3", UserInputError("disk full"), 2, "error (rank 3): disk full"),
    ("0", UserInputError("disk full", reported_by=3), 2, "error (rank 3): disk full"),
    ("5", UserInputError("disk full", reported_by=3), 2, ""),
    ("0", RankFailure(3, "OSError: no space"), 1,
     "error: rank 3 failed: OSError: no space (its traceback is in rank 3's log)"),
    ("5", RankFailure(3, "OSError: no space"), 1, ""),
    ("", UserInputError("environment variable RANK='' is not an integer"), 2,
     "error: environment variable RANK='' is not an integer"),  # not a traceback of int('') in the handler
])
def test_an_error_of_every_rank_is_printed_by_the_rank_that_found_it_and_rank_0(rank, error, status, printed,
                                                                                monkeypatch, capsys):
    """A copy of another rank's error (a collective made every rank raise it) is printed on rank 0 only:
    a thousand ranks print it twice, not a thousand times; a copy of a crash gives exit status 1."""
    from megatron_renio.entrypoint import run_command

    def run(_cfg):
        raise error

    monkeypatch.setenv("RANK", rank)
    assert run_command(lambda argv: None, run, []) == status
    assert capsys.readouterr().err == (printed + "\n" if printed else "")


@pytest.mark.parametrize("rank, local_rank, printed", [
    ("0", "0", "error: argument --lr: expected a finite number, got 'nan'"),
    ("3", "3", ""),
    ("8", "0", "error (rank 8): argument --lr: expected a finite number, got 'nan'"),  # another node's first rank
])
def test_a_flag_error_is_printed_once_per_node(rank, local_rank, printed, monkeypatch, capsys):
    """Parsing reads only the command line and the files it names, alike on the ranks of a node: a flag
    error is printed by the node's local rank 0, not by every rank; every rank exits with status 2."""
    from megatron_renio.entrypoint import run_command

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert run_command(parse_train_args, lambda cfg: None, BASE + ["--lr", "nan"]) == 2
    assert capsys.readouterr().err == (printed + "\n" if printed else "")


def test_wandb_project_without_wandb_is_refused_at_parse_time(monkeypatch):
    """It was a warning after the models were built, and the run logged nothing to W&B."""
    from megatron_renio import config

    assert config._importable("json") and not config._importable("no_such_module_for_megatron_renio")
    monkeypatch.setattr(config, "_importable", lambda module: module != "wandb")
    with pytest.raises(UserInputError, match=r"^--wandb-project needs the wandb package, which is not installed "
                                             r"\(pip install wandb\)$"):
        parse_train_args(BASE + ["--wandb-project", "p"])


def test_deprecation_notices_of_megatron_and_torch_distributed_are_hidden_without_debug():
    """Megatron's distributed optimizer calls torch's collectives by their deprecated names, and torch's
    wrapper warns from torch.distributed.c10d_logger on every rank (4 lines a run at 2 ranks); the
    project's own warnings still show."""
    import warnings

    from megatron_renio.entrypoint import run_command

    def run(_cfg):
        for module in ("torch.distributed.c10d_logger", "megatron.core.optimizer", "torch.distributed.checkpoint.x",
                       "megatron_renio.train"):
            warnings.warn_explicit(f"{module} is deprecated", FutureWarning, "f.py", 1, module=module)

    for argv, shown in (([], ["megatron_renio.train"]), (["--debug"], ["torch.distributed.c10d_logger",
                        "megatron.core.optimizer", "torch.distributed.checkpoint.x", "megatron_renio.train"])):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert run_command(lambda argv: None, run, argv) == 0
        assert [str(w.message).split()[0] for w in seen] == shown


def test_help_names_each_flags_choices_and_default():
    """--help shows every flag with its default (--data-path: required), and the allowed values of the
    flags that name a choice (the same tuples the validation checks)."""
    from megatron_renio.config import CHOICES, build_parser

    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        if f.name in CHOICES:
            assert f"{flag} {{{','.join(CHOICES[f.name])}}}" in text and f"one of {', '.join(CHOICES[f.name])}" in text
    assert text.count("default: ") == len(dataclasses.fields(TrainConfig)) - 1  # --data-path: required
    assert "one of opd, opsd; default: opsd" in text


@pytest.mark.parametrize("text, line, kind", [
    ("? [lr, seed]\n: 1\n", 1, "sequence"),
    ("seed: 3\n? {lr: 1}\n: 2\n", 2, "mapping"),
])
def test_a_yaml_complex_key_gives_one_line(tmp_path, text, line, kind):
    """A complex key (a list or mapping, which a Python dict cannot hold as a key) names the file and line."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserInputError, match=f"^--config {path}: line {line} not valid YAML "
                                             rf"\(a key must be a flag name, not a {kind}\)$"):
        parse_train_args(["--config", str(path)] + BASE)


@pytest.mark.parametrize("script", ["opsd_qwen3_1.7b.sh", "opd_qwen3_1.7b_from_8b.sh", "opsd_r1_distill_qwen_7b.sh",
                                    "slurm_opsd.sbatch"])
def test_the_example_scripts_pass_flags_the_trainer_accepts(script, tmp_path):
    """Each example launches (a stand-in torchrun on PATH records its arguments; the SLURM script's srun
    and scontrol are stand-ins too) with flags that parse and validate, and multi-node settings reach
    torchrun."""
    import json
    import os
    import subprocess

    from tests.torchrun_harness import REPO_ROOT

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    stand_ins = {
        "torchrun": f'#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open("{record}", "w"))\n',
        "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": "#!/usr/bin/env bash\necho node-a\necho node-b\n",
    }
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "x",
           "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_CPUS_PER_TASK": "64"}
    proc = subprocess.run(["bash", f"examples/{script}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(record.read_text())
    flags = argv[argv.index("megatron_renio.train") + 1:]
    cfg = parse_train_args(flags)
    assert cfg.renio and cfg.renio_scope == "global" and cfg.micro_batch_order == "length"
    if script.endswith(".sbatch"):
        assert argv[argv.index("--rdzv-endpoint") + 1] == "node-a:29500" and argv[argv.index("--nnodes") + 1] == "4"
        assert cfg.save.startswith(str(tmp_path)) and cfg.exit_duration_in_mins == 1400 and cfg.ckpt_fully_parallel_load


def test_every_loss_flag_reaches_the_loss_settings():
    """Each loss and ReNIO flag, at a value other than its default, arrives in the configs the loss
    reads (a flag dropped from loss_settings trained with its default silently)."""
    from megatron_renio.losses.divergence import DivergenceConfig
    from megatron_renio.renio.weights import ReNIOConfig
    from megatron_renio.training import components as C

    cfg = TrainConfig(loss="jsd", kd_beta=0.3, kd_temperature=0.9, kd_token_clip=None, kd_top_k=7, renio=True,
                      renio_clip=1.5, renio_threshold=0.3, renio_temperature=2.0, renio_norm="clamp",
                      renio_scope="global", renio_max_weight=3.0, loss_impl="unfused")
    settings = C.loss_settings(cfg)
    assert settings.divergence == DivergenceConfig(kind="jsd", beta=0.3, temperature=0.9, token_clip=None, top_k=7)
    assert settings.renio == ReNIOConfig(enabled=True, clip=1.5, threshold=0.3, temperature=2.0, norm="clamp",
                                         scope="global", max_weight=3.0)
    assert (settings.loss_kind, settings.impl) == ("divergence", "unfused")


def test_about_flag_names_the_flag_in_input_errors_only():
    from megatron_renio.errors import UserInputError, about_flag

    with pytest.raises(UserInputError, match=r"^--load: folder x does not exist$") as raised:
        with about_flag("--load"):
            raise UserInputError("folder x does not exist", reported_by=3)
    assert raised.value.reported_by == 3
    with pytest.raises(UserInputError, match=r"^folder x does not exist$"), about_flag(None):
        raise UserInputError("folder x does not exist")
    with pytest.raises(KeyError), about_flag("--load"):  # not bad input: left as it is
        raise KeyError("x")


@pytest.mark.parametrize("local_rank, printed", [("0", True), ("1", False), (None, True)])
def test_ctrl_c_is_one_line_per_node_and_exit_status_130(local_rank, printed, monkeypatch, capsys):
    """SIGINT reaches every rank of a node: each printed a KeyboardInterrupt traceback."""
    from megatron_renio.entrypoint import run_command

    def run(_cfg):
        raise KeyboardInterrupt

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert run_command(lambda argv: None, run, []) == 130
    assert capsys.readouterr().err == ("interrupted (SIGINT)\n" if printed else "")
    with pytest.raises(KeyboardInterrupt):
        run_command(lambda argv: None, run, ["--debug"])
