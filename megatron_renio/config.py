"""Training configuration: Megatron-LM style flags, an optional YAML file, validation.

``python -m megatron_renio.train [--config run.yaml] [flags]``: the YAML keys are the flag names
(with or without the leading dashes, ``-`` or ``_``) and each value is the text the flag takes on the
command line, converted by the same function (``lr: 1e-6``, ``kd_token_clip: none``, ``bf16: true``);
flags given on the command line override the file. :func:`parse_train_args` validates every value
before any process-group work, raising :class:`UserInputError` with one line naming the flag (or the
config file and key) and the allowed range.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_renio.errors import UserInputError
from megatron_renio.models.presets import PRESETS

# The choices that the core modules also define (renio.weights, data.templates, losses.fused) are
# repeated here so that parsing flags imports no torch; tests/test_config.py checks they agree.
LOSSES = ("forward_kl", "reverse_kl", "jsd", "sampled_rkl")
RENIO_NORMS = ("none", "batch_mean", "ema", "clamp")
RENIO_SCOPES = ("local", "global")
TEACHERS = ("fixed", "ema", "separate")
MODES = ("opd", "opsd")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
LOSS_IMPLS = ("auto", "triton", "chunked", "unfused")
RECOMPUTE_GRANULARITIES = ("none", "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
TASKS = ("math", "coding")
MICRO_BATCH_ORDERS = ("data", "length")
EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
# The allowed values of the flags that name a choice (``--help`` lists them; ``validate`` checks them).
CHOICES = {"mode": MODES, "teacher": TEACHERS, "loss": LOSSES, "loss_impl": LOSS_IMPLS, "renio_norm": RENIO_NORMS,
           "renio_scope": RENIO_SCOPES, "lr_decay_style": LR_DECAY_STYLES, "task": TASKS,
           "recompute_granularity": RECOMPUTE_GRANULARITIES, "recompute_method": RECOMPUTE_METHODS,
           "micro_batch_order": MICRO_BATCH_ORDERS, "exit_signal": EXIT_SIGNALS}
# Defaults that depend on other flags, in --help's words (parse_train_args applies them).
DEFAULT_WORDS = {"teacher": "separate with --mode opd, --teacher-load or --teacher-model; else fixed"}
# What a flag does, for ``--help`` (left out: Megatron-LM's flags, and flags whose name says it).
HELP = {
    "lr_decay_iters": "iterations the learning rate decays over (Megatron-LM); none = --train-iters. Set it to "
                      "resume with more --train-iters on the same schedule",
    "overlap_grad_reduce": "start each gradient bucket's data-parallel reduction during the last micro-batch's "
                           "backward (Megatron-LM)",
    "dist_ckpt_optim_fully_reshardable": "save --use-distributed-optimizer's state in the format that loads at any "
                                         "TP/PP/DP layout: each rank gathers its model-parallel shard's whole state "
                                         "(12 bytes per parameter / (TP x PP) of host memory); without it each rank "
                                         "writes its own shard, which loads at the same TP/PP (Megatron-LM)",
    "recompute_granularity": "recompute the student's activations in backward instead of keeping them: full = "
                             "whole layers (see --recompute-method), selective = the core attention (without TE "
                             "its [b, heads, s, s] probabilities); none keeps everything",
    "recompute_method": "with --recompute-granularity full: uniform = checkpoints of --recompute-num-layers layers "
                        "each; block = only the first --recompute-num-layers layers of each pipeline stage",
    "recompute_num_layers": "layers per checkpoint (uniform) or recomputed layers per stage (block)",
    "mode": "opd: a separate teacher model; opsd: on-policy self-distillation, the teacher sees the "
            "solution in its prompt",
    "teacher": "fixed: a frozen copy of the initial student; ema: its exponential moving average "
               "(--ema-decay); separate: the model of --teacher-load / --teacher-model",
    "student_load": "model checkpoint folder (converted with checkpoints_conversion.hf_to_megatron)",
    "teacher_load": "model checkpoint folder of the separate teacher (--teacher separate)",
    "ema_decay": "decay of the EMA teacher (--teacher ema) per step",
    "tokenizer": "tokenizer folder (without it: the student checkpoint's)",
    "chat_template_kwargs": "JSON object of variables for the tokenizer's chat template (transformers' and vLLM's "
                            "chat_template_kwargs): '{\"enable_thinking\": false}' renders Qwen3's prompts without "
                            "thinking; each must be a variable the template reads",
    "problem_field": "field of a data record holding the prompt",
    "solution_field": "field holding the solution (the OPSD teacher's privileged information)",
    "answer_field": "field holding the final answer (graded in the saved samples)",
    "model": "named preset to build the student from, randomly initialised (instead of --student-load): "
             + ", ".join(sorted(PRESETS)),
    "teacher_model": "named preset of the separate teacher, randomly initialised (instead of --teacher-load)",
    "load": "run folder to resume (a --save folder); may be empty only when it is the --save folder",
    "override_save": "start a new run in a --save folder that holds checkpoints",
    "ckpt_fully_parallel_load": "each data-parallel replica reads a part of the checkpoint shards the replicas share "
                                "and they exchange them (storage read once per model-parallel shard, not per "
                                "replica; Megatron-LM)",
    "override_teacher_check": "on resume, accept a frozen teacher (--student-load of --teacher fixed, --teacher-load) "
                              "whose files differ from the saved run's, e.g. the same weights saved at another layout",
    "loss": "per-token divergence (jsd with --kd-beta), or sampled_rkl: the sampled-token reverse KL",
    "kd_beta": "JSD mixture weight of --loss jsd (0, the default, = forward KL, 1 = reverse KL; 0.5 = the symmetric "
               "JSD; other losses take none)",
    "kd_temperature": "temperature of both models' distributions in the loss",
    "kd_token_clip": "clamp of each vocabulary entry of the divergence to [0, k]; none = no clamp",
    "kd_top_k": "both models restricted to the teacher's k most likely tokens and renormalised over them (not fused); none = full vocabulary",
    "loss_impl": "auto: the fused vocab-parallel loss, its Triton kernels on GPUs and the chunked PyTorch path "
                 "elsewhere; triton / chunked: that one (triton needs a GPU and the triton package); unfused: "
                 "plain autograd on gathered copies of the completion rows",
    "renio": "weight each sample by its ReNIO weight",
    "renio_clip": "clip c of the log-ratio s - u",
    "renio_threshold": "tokens with a clipped log-ratio >= this are pivotal",
    "renio_temperature": "weight = exp(mean pivotal log-ratio / temperature)",
    "renio_norm": "how the weights are normalised",
    "renio_scope": "local: per micro-batch, as the reference; global: over every micro-batch and DP rank",
    "renio_max_weight": "cap of a normalised weight (batch_mean, ema)",
    "exit_signal": "the signal that makes every rank save a checkpoint and exit 0 after the current step "
                   "(Megatron-LM's; SLURM's --signal=TERM@N, or USR1 with --signal=USR1@N)",
    "rollout_temperature": "sampling temperature of the student's rollout",
    "rollout_top_p": "nucleus sampling of the rollout: the most likely tokens whose probability reaches p; 1 = off",
    "rollout_top_k": "the rollout samples among the k most likely tokens; 0 = off",
    "log_interval": "console progress every N iterations (the metrics file, TensorBoard and W&B get every step)",
    "max_new_tokens": "longest completion of the rollout",
    "rollout_batch_size": "most samples a replica generates at once (one KV cache each, of the turn's longest prompt "
                          "plus --max-new-tokens positions, at most --seq-length); more are generated in turns, "
                          "with the same draws. 0 = its whole share of the batch",
    "samples_per_prompt": "completions per prompt (consecutive rows of the batch)",
    "micro_batch_order": "how a rank's samples form micro-batches: data = in sampling order (the reference's); "
                         "length = longest first, so that each micro-batch pads to samples of similar length "
                         "(needs --renio-scope global, where the grouping does not change the loss)",
    "data_path": "prompt files: JSONL (.jsonl, .jsonl.gz) or parquet",
    "task": "the prompts' instruction (math: reason step by step, answer in \\boxed{}; coding: one python code block); math completions are also graded in the saved samples",
    "peak_tflops": "per-device peak TFLOP/s for the MFU log; 0 = known GPUs by name",
    "metrics_file": "JSONL of the step metrics (without it: --save/metrics.jsonl)",
    "save_samples_interval": "every N steps, write each completion with its weight to --save/samples_rank*.jsonl",
    "max_skipped_steps": "stop after this many non-finite steps in a row",
    "keep_last": "checkpoints kept in --save",
    "debug": "show tracebacks instead of one-line errors",
    "distributed_timeout_minutes": "longest wait in a collective; data-parallel replicas wait there for the "
                                   "slowest one's rollout, so keep it above the longest rollout",
}


@dataclass
class TrainConfig:
    """Every training flag; field ``foo_bar`` is flag ``--foo-bar``."""

    # parallelism and batch
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    recompute_granularity: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    micro_batch_size: int = 1
    micro_batch_order: str = "data"
    global_batch_size: int = 8
    seq_length: int = 4096
    # optimisation (Megatron-LM names)
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_decay_style: str = "constant"
    lr_decay_iters: int | None = None
    lr_warmup_iters: int = 0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    train_iters: int = 100
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    dist_ckpt_optim_fully_reshardable: bool = False
    bf16: bool = False
    seed: int = 1234
    # checkpoints and logging
    save: str | None = None
    load: str | None = None
    save_interval: int = 0
    override_save: bool = False
    # on resume, take the LR / weight-decay schedule from these flags instead of refusing a change
    override_opt_param_scheduler: bool = False
    override_teacher_check: bool = False
    ckpt_fully_parallel_load: bool = False
    exit_interval: int = 0
    exit_signal: str = "SIGTERM"
    exit_duration_in_mins: float = 0.0
    # per-device peak FLOP/s for the MFU log (TFLOP/s); 0 = known GPUs by name, none on the CPU
    peak_tflops: float = 0.0
    keep_last: int = 2
    log_interval: int = 1
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    metrics_file: str | None = None
    save_samples_interval: int = 0
    max_skipped_steps: int = 10
    distributed_timeout_minutes: float = 60.0
    # models
    mode: str = "opsd"
    model: str | None = None
    teacher_model: str | None = None
    student_load: str | None = None
    teacher_load: str | None = None
    teacher: str = "fixed"
    ema_decay: float = 0.999
    # loss
    loss: str = "forward_kl"
    kd_beta: float = 0.0
    kd_temperature: float = 1.1
    kd_token_clip: float | None = 0.05
    kd_top_k: int | None = None
    loss_impl: str = "auto"
    # ReNIO
    renio: bool = False
    renio_clip: float = 2.5
    renio_threshold: float = 0.8
    renio_temperature: float = 1.0
    renio_norm: str = "batch_mean"
    renio_scope: str = "local"
    renio_max_weight: float = 10.0
    # rollout
    rollout_temperature: float = 1.1
    rollout_top_p: float = 1.0
    rollout_top_k: int = 0
    max_new_tokens: int = 1024
    rollout_batch_size: int = 0
    samples_per_prompt: int = 1
    # data
    data_path: list[str] = field(default_factory=list)
    task: str = "math"
    problem_field: str = "problem"
    solution_field: str = "solution"
    answer_field: str = "answer"
    tokenizer: str | None = None
    chat_template_kwargs: str | None = None
    debug: bool = False


def flag_name(field: str) -> str:
    """The command-line flag of a config field: ``--`` and the name with dashes for underscores."""
    return "--" + field.replace("_", "-")


# Flags that other flags can leave without effect: (when, in words, the fields). Megatron-LM accepts such
# flags too; a note says so, so that a YAML file shared by a run and its ablation (``--renio`` on and off)
# still works. ``--renio-scope`` is not among them: without ReNIO it still picks the loss's normalisation.
INERT_WHEN = (
    (lambda c: not c.renio, "on the loss without --renio (clip and threshold still shape the logged pivotal "
     "statistics)", ("renio_clip", "renio_threshold", "renio_temperature", "renio_norm", "renio_max_weight")),
    (lambda c: c.renio and c.renio_norm in ("clamp", "none"), "with --renio-norm clamp or none (the cap bounds the "
     "weights of batch_mean and ema)", ("renio_max_weight",)),
    (lambda c: c.teacher != "ema", "without --teacher ema", ("ema_decay",)),
    (lambda c: c.lr_decay_style == "constant", "with --lr-decay-style constant", ("min_lr", "lr_decay_iters")),
    (lambda c: c.loss == "sampled_rkl", "with --loss sampled_rkl (its loss reads only the sampled tokens' log-probs)",
     ("kd_token_clip", "kd_top_k")),
)


def inert_notes(cfg: TrainConfig) -> list[str]:
    """Settings changed from their defaults that the other flags leave without effect (:data:`INERT_WHEN`)."""
    notes = []
    for applies, words, names in INERT_WHEN:
        changed = [flag_name(n) for n in names if getattr(cfg, n) != getattr(TrainConfig, n)]
        if applies(cfg) and changed:
            notes.append(f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect {words}")
    return notes


def typed_arg(kind, check, allowed: str):
    """An argparse ``type``: ``kind(text)`` that must pass ``check``; the message says ``allowed``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def path_arg(text: str) -> str:
    """The argparse ``type`` of a path flag: the text, unless it is empty (``--save "$OUT"`` with
    ``OUT`` unset), which would name the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("must be a path, got '' (an unset shell variable?)")
    return text


def json_object_arg(text: str) -> str:
    """The argparse ``type`` of ``--chat-template-kwargs``: the text, which must be a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}")
    return text


# the file's scalars are read as text (``false`` is 'false'), so its mappings could not give JSON's types
json_object_arg.expects = """a JSON object in quotes ('{"enable_thinking": false}')"""


def template_variables(text: str | None) -> dict:
    """The chat template variables of a ``--chat-template-kwargs`` value (checked by :func:`json_object_arg`)."""
    return json.loads(text) if text else {}


POSITIVE_INT = typed_arg(int, lambda v: v >= 1, "an integer >= 1")
NON_NEGATIVE_INT = typed_arg(int, lambda v: v >= 0, "an integer >= 0")


def _bool_arg(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def finite_float(value: str) -> float:
    """A number flag's converter: inf and nan are refused (an infinite --lr or temperature trains on
    nothing, or saves a non-finite model, without an error)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


# What each converter accepts, in words (for the one-line error on a bad YAML value).
_KIND_WORDS = {int: "an integer", finite_float: "a finite number", str: "a string", _bool_arg: "true or false"}
# YAML's spellings of null, unquoted (the config loader reads them as None).
_YAML_NULLS = ("", "~", "null", "Null", "NULL")


def _optional(kind):
    def parse(value: str):
        return None if str(value).lower() in ("none", "null", "off", "~", "") else kind(value)

    parse.__name__ = kind.__name__
    parse.expects = f"{_KIND_WORDS[kind]} or none"
    parse.takes_null = True  # a YAML null is its 'none'
    return parse


def _kind(f: dataclasses.Field):
    """The converter from a flag's command-line text to the field's value; YAML values go through it too."""
    if isinstance(f.default, bool):
        return _bool_arg
    if f.name == "kd_token_clip":
        return _optional(finite_float)
    if f.name in ("kd_top_k", "lr_decay_iters"):
        return _optional(int)
    if f.name == "chat_template_kwargs":
        return json_object_arg
    return {int: int, float: finite_float}.get(type(f.default), str)


class _OneLineErrorParser(argparse.ArgumentParser):
    """Errors are one :class:`UserInputError` line; no abbreviated flags (``--mode`` must not pass for
    ``--model``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})
        # A value of "-" and a digit is a negative number, in exponent form too (--renio-threshold -1e1):
        # argparse before Python 3.13 read that as an unknown flag. 3.13's own rule; no flag starts with a digit.
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message):
        raise UserInputError(message)


def lr_decay_iters(c: TrainConfig) -> int:
    """The iterations the LR decays over: ``--lr-decay-iters``, else ``--train-iters`` (as Megatron-LM)."""
    return c.train_iters if c.lr_decay_iters is None else c.lr_decay_iters


class _GivenOnce(argparse.Action):
    """A flag that may be given once (argparse keeps the last of several silently); a flag of several
    values (``nargs='+'``) too, whose user may have meant the values of both."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            if isinstance(values, list):
                parser.error(f"{option_string} given twice: give all its values after one {option_string}")
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): give one")
        setattr(namespace, self.dest, values)


def pad_multiple(c: TrainConfig) -> int:
    """What batches are padded to a multiple of: 8, and the TP size with sequence parallelism (Megatron
    splits the sequence over the TP ranks)."""
    return math.lcm(8, c.tensor_model_parallel_size) if c.sequence_parallel else 8


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field, typed from the field's default; ``--help`` shows what it
    does (:data:`HELP`), its allowed values (:data:`CHOICES`) and its default."""
    parser = _OneLineErrorParser(prog="megatron_renio.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=_GivenOnce, type=path_arg,
                        help="YAML file whose keys are flag names; CLI flags override it")
    for f in dataclasses.fields(TrainConfig):
        flag = flag_name(f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        words = [HELP.get(f.name), f"one of {', '.join(CHOICES[f.name])}" if f.name in CHOICES else None,
                 "required" if f.name == "data_path" else
                 f"default: {DEFAULT_WORDS.get(f.name, 'none' if default is None else default)}"]
        text = "; ".join(w for w in words if w).replace("%", "%%")
        if f.name == "data_path":
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=text)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, nargs="?", const=True, type=_kind(f), default=argparse.SUPPRESS, help=text)
        else:
            metavar = "{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else f.name.upper()
            parser.add_argument(flag, type=_kind(f), default=argparse.SUPPRESS, metavar=metavar, help=text)
    return parser


def _yaml_value(path: str, key, f: dataclasses.Field, value):
    """One value of the config file (as written: a string, or a list or mapping of them) as the flag's value.

    A string goes through the flag's command-line converter, so the file accepts exactly what the
    command line does; a list is taken by ``data_path`` only; a YAML null (``~``, ``null``, empty;
    unquoted) leaves a flag whose default is None unset, is the ``none`` of a flag that takes one
    (``kd_token_clip``), and is refused for any other. Anything else raises :class:`UserInputError`
    naming the file, the key and what the flag takes.
    """
    kind = _kind(f)
    if value is None:  # an unquoted null (the loader's)
        if f.default is None or getattr(kind, "takes_null", False):
            return None
        raise UserInputError(f"--config {path}: key {key!r} is null: give a value, or leave the key out")
    if f.name == "data_path":
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(item, str) and item for item in items):
            return items
        expected = "a file path or a list of file paths"
    else:
        if isinstance(value, str):
            try:
                return kind(value)
            except (ValueError, argparse.ArgumentTypeError):
                pass
        expected = getattr(kind, "expects", None) or _KIND_WORDS[kind]
    raise UserInputError(f"--config {path}: key {key!r} must be {expected}, got {value!r}")


def _unique_key_loader():
    """``yaml.BaseLoader`` that refuses a key given twice in one mapping (YAML keeps the last silently)
    and a key that is not a plain name (a complex key, ``? [a, b]``, is a list or a mapping)."""
    import yaml

    class Loader(yaml.BaseLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise yaml.constructor.ConstructorError(
                        None, None, f"a key must be a flag name, not a {key_node.id}", key_node.start_mark)
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

        def construct_scalar(self, node):
            """The text of a scalar, or None for an unquoted null (``~``, ``null``, nothing): quoted,
            ``"null"`` stays text."""
            value = super().construct_scalar(node)
            return None if node.style is None and value in _YAML_NULLS else value

    return Loader


def _load_yaml(path: str) -> dict:
    """The config file's values by field name, each converted by :func:`_yaml_value`.

    The file is read with ``yaml.BaseLoader``: no scalar is typed by YAML's own rules (which read
    ``1e-6`` as a string and ``off`` as a boolean), every one reaches the flag's converter as written.
    """
    import yaml

    p = Path(path)
    if p.is_dir():
        raise UserInputError(f"--config {path} is a folder, not a YAML file")
    if not p.is_file():
        raise UserInputError(f"--config {path}: file not found")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except UnicodeDecodeError as e:
        raise UserInputError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None)
        raise UserInputError(f"--config {path}:{where} not valid YAML" + (f" ({problem})" if problem else "")) from None
    if not isinstance(data, dict):
        raise UserInputError(f"--config {path}: expected a mapping of flag names to values")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in fields:
            raise UserInputError(f"--config {path}: unknown key {key!r}")
        if name in out:
            raise UserInputError(f"--config {path}: key {key!r} sets {flag_name(name)} again")
        out[name] = _yaml_value(path, key, fields[name], value)
    return out


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (and ``--config``), validate them, return the config."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    values = _load_yaml(config_file) if config_file is not None else {}
    values.update(args)
    if "teacher" not in values and (values.get("mode") == "opd" or values.get("teacher_load")
                                    or values.get("teacher_model")):
        values["teacher"] = "separate"  # what --mode opd or a teacher model asks for (DEFAULT_WORDS)
    config = TrainConfig(**values)
    validate(config)
    check_loss_impl_here(config)
    return config


def check_loss_impl_here(c: TrainConfig) -> None:
    """``--loss-impl triton`` needs a GPU and the triton package on this machine: refused with the flags
    (each node's first rank prints it, not every rank), before anything is built."""
    if c.loss_impl != "triton":
        return
    import torch

    from megatron_renio.losses.fused import triton_available

    gpu, importable = torch.cuda.is_available(), triton_available()
    if not (gpu and importable):
        raise UserInputError(
            f"--loss-impl triton needs a GPU and the triton package (here: {'a GPU' if gpu else 'no GPU'}, "
            f"triton {'importable' if importable else 'missing'}); use --loss-impl auto or chunked")


# Bounds of two flags every model command takes: seeds of 32 bits (numpy's range; torch's is wider); the
# process-group timeout must stay a valid timedelta and gloo's millisecond count.
MAX_SEED = 2**32 - 1
MAX_TIMEOUT_MINUTES = 7 * 24 * 60
# Shorter waits fail the start-up itself: the rendezvous of a job's processes takes seconds, and more
# on a busy cluster.
MIN_TIMEOUT_MINUTES = 1
TIMEOUT_RANGE = f"in [{MIN_TIMEOUT_MINUTES}, {MAX_TIMEOUT_MINUTES}] (a minute to a week)"
# Below it the distributions of the loss are one-hot to float32 for any logit gap above 0.1 (exp(-100)
# is no float32 number), and its log-probs lose their digits.
MIN_KD_TEMPERATURE = 1e-3
FLOAT32_TINY = 2.0 ** -126  # torch.finfo(torch.float32).tiny (this module imports no torch)


def _check(condition: bool, flag: str, allowed: str, value) -> None:
    if not condition:
        raise UserInputError(f"{flag} must be {allowed}, got {value!r}")


def _importable(module: str) -> bool:
    """Whether ``import module`` would find it (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a spec (a stand-in): importable
        return True


def validate(c: TrainConfig) -> None:
    """Range and cross-flag checks for every flag (one line naming the flag and the allowed range)."""
    positive_ints = (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
        "global_batch_size", "seq_length", "train_iters", "log_interval", "max_new_tokens",
        "samples_per_prompt", "max_skipped_steps", "keep_last", "recompute_num_layers",
    )
    for name in positive_ints:
        value = getattr(c, name)
        _check(isinstance(value, int) and value >= 1, flag_name(name), "an integer >= 1", value)
    for name in ("save_interval", "exit_interval", "lr_warmup_iters", "rollout_top_k", "save_samples_interval",
                 "rollout_batch_size"):
        value = getattr(c, name)
        _check(isinstance(value, int) and value >= 0, flag_name(name), "an integer >= 0", value)
    for f in dataclasses.fields(c):  # what `--save "$SAVE"` passes when the variable is unset
        value = getattr(c, f.name)
        if value == "" or (isinstance(value, list) and "" in value):
            raise UserInputError(f"{flag_name(f.name)} is empty (an unset shell variable?): give a value or leave the flag out")
    _check(c.lr >= 0, "--lr", ">= 0", c.lr)
    _check(0 <= c.min_lr <= max(c.lr, 0), "--min-lr", f"in [0, --lr={c.lr}]", c.min_lr)
    _check(c.weight_decay >= 0, "--weight-decay", ">= 0", c.weight_decay)
    _check(c.clip_grad >= 0, "--clip-grad", ">= 0 (0 disables clipping)", c.clip_grad)
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(c, name) < 1, flag_name(name), "in [0, 1)", getattr(c, name))
    _check(c.adam_eps >= FLOAT32_TINY, "--adam-eps", f">= {FLOAT32_TINY:.3g} (float32's smallest normal number: a "
           "smaller one adds 0 to the square root of a zero second moment, and 0 / 0 is NaN)", c.adam_eps)
    for name, allowed in CHOICES.items():
        _check(getattr(c, name) in allowed, flag_name(name), f"one of {', '.join(allowed)}", getattr(c, name))
    _check(0 < c.ema_decay < 1, "--ema-decay", "in (0, 1)", c.ema_decay)
    _check(0 <= c.kd_beta <= 1, "--kd-beta", "in [0, 1]", c.kd_beta)
    _check(c.kd_beta == 0 or c.loss == "jsd", "--kd-beta",
           f"0 with --loss {c.loss} (only --loss jsd mixes by beta; pass --loss jsd --kd-beta {c.kd_beta:g})", c.kd_beta)
    _check(c.kd_temperature >= MIN_KD_TEMPERATURE, "--kd-temperature", f">= {MIN_KD_TEMPERATURE} (below it the "
           "tempered distributions are one-hot in float32)", c.kd_temperature)
    _check(c.kd_token_clip is None or c.kd_token_clip > 0, "--kd-token-clip", "> 0 or none", c.kd_token_clip)
    _check(c.kd_top_k is None or c.kd_top_k >= 1, "--kd-top-k", "an integer >= 1 or none", c.kd_top_k)
    _check(c.renio_clip > 0, "--renio-clip", "> 0", c.renio_clip)
    _check(c.renio_threshold <= c.renio_clip, "--renio-threshold",
           f"<= --renio-clip {c.renio_clip:g} (a clipped log-ratio never exceeds the clip: no token would be pivotal "
           "and every weight would be 1)", c.renio_threshold)
    _check(c.renio_temperature > 0, "--renio-temperature", "> 0", c.renio_temperature)
    from megatron_renio.renio.weights import MAX_EXPONENT, weight_exponent_bound  # here: this module imports no torch

    _check(weight_exponent_bound(c.renio_clip, c.renio_threshold, c.renio_temperature) <= MAX_EXPONENT,
           "--renio-temperature",
           f">= max(--renio-clip, -(--renio-threshold)) / {MAX_EXPONENT:g} (the weights exp(a / temperature) must "
           "stay finite in float32)", c.renio_temperature)
    _check(c.renio_max_weight > 0, "--renio-max-weight", "> 0", c.renio_max_weight)
    _check(c.rollout_temperature > 0, "--rollout-temperature", "> 0", c.rollout_temperature)
    _check(0 < c.rollout_top_p <= 1, "--rollout-top-p", "in (0, 1]", c.rollout_top_p)
    _check(c.exit_duration_in_mins >= 0, "--exit-duration-in-mins", ">= 0 (0 disables it)", c.exit_duration_in_mins)
    _check(c.peak_tflops >= 0, "--peak-tflops", ">= 0 (0 = by GPU name)", c.peak_tflops)
    if c.wandb_project and not _importable("wandb"):  # refused now: the run would log nothing to W&B
        raise UserInputError("--wandb-project needs the wandb package, which is not installed (pip install wandb)")
    _check(MIN_TIMEOUT_MINUTES <= c.distributed_timeout_minutes <= MAX_TIMEOUT_MINUTES,
           "--distributed-timeout-minutes", TIMEOUT_RANGE, c.distributed_timeout_minutes)
    _check(0 <= c.seed <= MAX_SEED, "--seed", f"an integer in [0, {MAX_SEED}]", c.seed)
    multiple = pad_multiple(c)
    _check(c.seq_length % multiple == 0, "--seq-length",
           f"a multiple of {multiple} (batches are padded to multiples of 8"
           + (", and of --tensor-model-parallel-size with --sequence-parallel)" if multiple != 8 else ")"),
           c.seq_length)
    _check(c.max_new_tokens < c.seq_length, "--max-new-tokens", f"smaller than --seq-length ({c.seq_length})", c.max_new_tokens)
    # Megatron's OptimizerParamScheduler decays over --train-iters and asserts the warmup is shorter.
    _check(c.lr_decay_iters is None or c.lr_decay_iters >= 1, "--lr-decay-iters", "an integer >= 1 or none",
           c.lr_decay_iters)
    decay = "--train-iters" if c.lr_decay_iters is None else "--lr-decay-iters"
    _check(c.lr_warmup_iters < lr_decay_iters(c), "--lr-warmup-iters", f"smaller than {decay} ({lr_decay_iters(c)})",
           c.lr_warmup_iters)
    if c.mode == "opd" and c.teacher != "separate":
        raise UserInputError("--mode opd needs --teacher separate (a teacher checkpoint or preset)")
    if c.teacher == "separate" and not (c.teacher_load or c.teacher_model):
        needs = "--mode opd needs a teacher model:" if c.mode == "opd" else "--teacher separate needs"
        raise UserInputError(f"{needs} --teacher-load (a converted checkpoint) or --teacher-model (a preset)")
    if c.teacher != "separate" and (c.teacher_load or c.teacher_model):
        given = "--teacher-load" if c.teacher_load else "--teacher-model"
        kind = "a frozen copy of the initial student" if c.teacher == "fixed" else "the student's moving average"
        raise UserInputError(f"{given} needs --teacher separate (--teacher {c.teacher}: the teacher is {kind})")
    for one, other in (("student_load", "model"), ("teacher_load", "teacher_model")):
        if getattr(c, one) and getattr(c, other):
            raise UserInputError(f"give either {flag_name(one)} or {flag_name(other)}, not both")
    if not (c.student_load or c.model):  # the trainer builds the student from these; --load only restores state
        raise UserInputError(
            "no student model: give --student-load (a converted checkpoint) or --model (a preset), "
            "also when resuming with --load"
        )
    if not c.data_path:
        raise UserInputError("--data-path is required (one or more .jsonl, .jsonl.gz or .parquet files)")
    if c.sequence_parallel and c.tensor_model_parallel_size == 1:
        raise UserInputError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if c.global_batch_size % c.samples_per_prompt:
        raise UserInputError(
            f"--global-batch-size {c.global_batch_size} is not divisible by --samples-per-prompt {c.samples_per_prompt}"
        )
    if c.dist_ckpt_optim_fully_reshardable and not c.use_distributed_optimizer:
        raise UserInputError("--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer (the other "
                             "optimizer's state is saved in parameter shapes, which any layout loads)")
    if c.save_samples_interval and not c.save:
        raise UserInputError("--save-samples-interval needs --save (the samples go to <save>/samples_rank<dp>.jsonl)")
    if c.micro_batch_order == "length" and c.renio_scope != "global":
        raise UserInputError(
            "--micro-batch-order length needs --renio-scope global (--renio-scope local normalises over each "
            "micro-batch, so regrouping the samples by length would change the loss)"
        )
    if c.global_batch_size % c.micro_batch_size:
        raise UserInputError(
            f"--global-batch-size {c.global_batch_size} is not divisible by --micro-batch-size {c.micro_batch_size}"
        )
