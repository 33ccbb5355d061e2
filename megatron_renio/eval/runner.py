"""``megatron-renio eval``: generate with the Megatron model on benchmarks, grade, report avg@k and pass@k.

    [torchrun --nproc-per-node N] python -m megatron_renio.eval.runner --load CKPT
        --benchmark [PRESET=]FILE_OR_NAME [...] [--problem-field F] [--answer-field F] [--id-field F]
        [--samples-per-problem K] [--temperature T]
        [--top-p P] [--top-k K] [--max-new-tokens N] [--greedy] [--out FILE] [--summary FILE]
        [--tokenizer PATH] [--seq-length S] [--batch-size B] [--seed N] [--bf16]
        [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P] [--ckpt-fully-parallel-load]
        [--debug]

Benchmarks. Each ``--benchmark`` value is a benchmark file (JSONL, JSON or parquet, see
:mod:`megatron_renio.eval.benchmarks`) or the built-in name ``humaneval``, optionally prefixed with
a field preset: ``math500=/data/math500.jsonl``, ``minerva=/data/minerva.parquet``. A value is
split at its first ``=`` only when the part before it is a plain word (letters, digits, ``_``,
``-``), which must then be a preset; any other value is a path, so ``/data/run=3/aime.jsonl`` is a
file (write a file named like ``run=3.jsonl`` in the current folder as ``./run=3.jsonl``). Without
a preset the layout is detected from the first record, and ``--problem-field``, ``--answer-field``
and ``--id-field`` name the fields that hold the problem, the reference answer (math files; a code
file has tests instead) and the item id in every such file (GSM8K's ``question`` / ``answer``:
``--problem-field question``). A benchmark is reported under its preset name, else under its file
name without extensions; benchmarks that would share a name (``gsm8k/test.jsonl`` and
``svamp/test.jsonl``) are named by the end of their paths instead, as many folders as tell them apart
(``gsm8k/test``, ``svamp/test``; with a preset ``math500=a/test``); the built-in ``humaneval`` keeps its
name. A file given twice, and names that still clash (file names holding ``=``), are refused.

Prompts. Each problem becomes the student prompt of training
(:func:`~megatron_renio.data.templates.build_prompt_ids`, task math or coding: the problem, a blank
line and the task instruction, rendered through the tokenizer's chat template when it has one).

Generation. ``--load`` is a model checkpoint (converted or trained); it loads at any TP/PP layout.
With ``--ckpt-fully-parallel-load`` (training's flag, Megatron-LM's) each data-parallel replica
reads a part of the checkpoint shards the replicas share and they exchange them, so storage is
read once per model-parallel shard instead of once per replica.
The training rollout (:func:`~megatron_renio.rollout.generate.generate`) samples ``K`` completions
per problem. The list of (problem, sample) pairs is put in a fixed pseudo-random order (the same
for every run), so that each replica gets a mix of benchmarks and problems, easy and hard, and
the replicas finish together; that order is cut into one contiguous share per data-parallel
replica and each share into batches of ``--batch-size``. The sampling noise of a completion is
keyed by its place in that order, so completions depend on ``--seed`` but not on the layout or the
batch size. A completion ends at a stop id (``Tokenizer.stop_ids``, kept), at ``--max-new-tokens``,
or when prompt plus completion reach ``--seq-length`` (default: the model's maximum positions).

Sampling. The defaults come from the ``generation_config.json`` of the folder the tokenizer is
loaded from (``--tokenizer`` when given, else the checkpoint's; the file that also gives the stop
ids, to which a ``--tokenizer`` adds those of the checkpoint's own file; a sentencepiece ``.model``
file has none): each of ``--temperature``, ``--top-p``, ``--top-k``
not given takes its ``temperature``, ``top_p``, ``top_k``, else 1.0, 1.0 and 0 (off). ``--greedy``
takes the argmax; so does a temperature of 0 (flag or file, as in vLLM), and so does
``do_sample: false`` in that file (transformers then decodes greedily) unless ``--temperature``,
``--top-p`` or ``--top-k`` is given, which asks for sampling. Without ``do_sample`` the defaults
are sampled. The file's other sampling settings (``repetition_penalty``, ``min_p`` and the like)
are not applied; a start-up note names those it sets.

Grading. Completions are decoded without special tokens and graded by
:func:`~megatron_renio.eval.benchmarks.grade` (math: the last box, math-verify; code: the last
fenced Python block, or the last one defining the entry point when there is one, in the sandbox)
on the first rank of each replica, then gathered on rank 0 (over those ranks only:
:func:`gather_to_rank0`). The code items of a batch are graded together on :func:`grading_threads`
threads, each running one sandboxed child.

Output (rank 0). Per benchmark: problems, samples per problem k, avg@k (the mean fraction of
correct samples), pass@k (the unbiased estimator with n = k: the fraction of problems with a
correct sample), the mean completion length in tokens (EOS included) and the fraction of
completions that ended with EOS; printed, and written as JSON to ``--summary`` with the settings that
produced them (checkpoint, tokenizer, seed, lengths, sampling, dtype, chat template variables). ``--out`` gets one
JSON line per generation, in benchmark, problem, sample order, with the fields benchmark, id,
sample, prompt (the prompt ids decoded with special tokens), answer (the math reference, null for
code), completion, correct, num_tokens, finished (ended with EOS), prompt_ids, completion_ids: the
input of ``megatron-renio analyze`` and ``megatron-renio score`` as is.

Interrupted runs. With ``--out`` or ``--summary``, each replica's grader keeps its graded batches on
disk as it goes (:mod:`~megatron_renio.eval.progress`); the same command run again after a crash
generates only the batches that are missing, and gives the outputs of one uninterrupted run.

Bad input (flags, files, checkpoint, prompts that do not fit): ``error: <one line>`` on stderr,
exit status 2, no traceback (unless ``--debug``). Output files are written beside their target
under a temporary name and renamed into place when complete, so a failed run leaves none.

This module also holds what the model commands (eval, score) share: output files, gathering
results on rank 0, and the ``main`` wrapper.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from megatron_renio.config import HELP as TRAIN_HELP
from megatron_renio.config import (MAX_SEED, MAX_TIMEOUT_MINUTES, MIN_TIMEOUT_MINUTES, POSITIVE_INT, TIMEOUT_RANGE,
                                   _GivenOnce, _OneLineErrorParser, flag_name, json_object_arg, path_arg,
                                   template_variables, typed_arg)
from megatron_renio.config import build_parser as build_train_parser
from megatron_renio.distributed import log0
from megatron_renio.entrypoint import run_command
from megatron_renio.errors import UserInputError, about_flag
from megatron_renio.eval.progress import ReplicaLog, holds_key, progress_folder, read_finished, start_over
from megatron_renio.output_paths import check_output_file, storage_error, write_atomic
from megatron_renio.training.faults import fault_spec, maybe_die

BUILTIN_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
# generation_config.json settings of transformers' generate that change what is sampled, with the
# values that leave it unchanged; eval applies none of them (Qwen2.5-Instruct's file sets
# repetition_penalty 1.05), so a file that sets one gets a start-up note.
_UNAPPLIED_SAMPLING = {"repetition_penalty": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                       "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "num_beams": 1}


# -- helpers shared by the model commands (eval, score) -------------------------------------------


def jsonl_lines(records: Iterable[dict]) -> Iterable[str]:
    """One JSON line per record."""
    return (json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def same_file(path: str, other: str) -> bool:
    """Whether writing ``path`` would replace ``other``: the same absolute path, or (both existing) one
    file under two names (a symbolic or hard link)."""
    if os.path.abspath(path) == os.path.abspath(other):
        return True
    return os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other)


def gather_to_rank0(items: list, stage: str = "first") -> list | None:
    """The holders' ``items`` concatenated in rank order on rank 0, None elsewhere. Collective.

    The holders are the first tensor-parallel rank of pipeline stage ``stage`` (``"first"`` or
    ``"last"``) of every data-parallel replica, i.e. one of Megatron's data-parallel groups; the other
    ranks hold nothing (their ``items`` must be empty) and send nothing. Only the holders take part in
    the gather: ``gather_object`` pads every sender's pickled buffer to the largest one and allocates
    group size x largest bytes on the receiver (on its GPU with NCCL), so a gather over the whole world
    would cost rank 0 TP x PP times the data. The holders gather on the first of them; when that is
    not rank 0 (``stage="last"`` with PP > 1: the last stage of rank 0's pipeline), it sends the
    gathered list to rank 0 in one message. The order is the holders' global rank order (= their
    data-parallel rank order), as if every rank's ``items`` were gathered over the world.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.get_world_size() == 1:
        return list(items)
    if stage not in ("first", "last"):
        raise ValueError(f"stage must be 'first' or 'last', got {stage!r}")
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    holder = (parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_pipeline_model_parallel_rank() == (0 if stage == "first" else stages - 1))
    rank = dist.get_rank()
    if not holder:
        if items:
            raise ValueError(f"rank {rank} is not a holder of the {stage} stage but has items to gather")
        if rank != 0:
            return None
        received = [None]  # rank 0 is on the first stage: the last stage of its pipeline gathered them
        dist.recv_object_list(received, src=parallel_state.get_pipeline_model_parallel_last_rank())
        return received[0]
    first = parallel_state.get_data_parallel_src_rank()  # the holders' first (global) rank
    if parallel_state.get_data_parallel_world_size() == 1:
        parts = [items]
    else:
        parts = [None] * parallel_state.get_data_parallel_world_size() if rank == first else None
        dist.gather_object(items, parts, dst=first, group=parallel_state.get_data_parallel_group())
    if rank != first:
        return None
    gathered = [item for part in parts for item in part]
    if rank == 0:
        return gathered
    dist.send_object_list([gathered], dst=0)
    return None


# -- the eval command --------------------------------------------------------------------------


_SAMPLING_CHECKS = {  # name -> (kind, check, allowed)
    "temperature": (float, lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 = greedy)"),
    "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
}


# --<name>-field flag -> the key of the benchmark field layout it sets
FIELD_FLAGS = {"problem_field": "prompt", "answer_field": "answer", "id_field": "id"}


def build_parser() -> argparse.ArgumentParser:
    from megatron_renio.eval.benchmarks import PRESETS

    parser = _OneLineErrorParser(
        prog="megatron-renio eval",
        description="Generate with the Megatron model on benchmarks, grade, report avg@k and pass@k.",
    )
    parser.add_argument("--load", required=True, type=path_arg, help="model checkpoint folder (converted or trained)")
    parser.add_argument("--benchmark", required=True, nargs="+", action=_GivenOnce, type=path_arg,
                        metavar="[PRESET=]FILE_OR_NAME",
                        help="benchmark files or 'humaneval', optionally prefixed with a field preset (one of "
                             f"{', '.join(PRESETS)}); without one the layout is detected from the first record")
    field_name = typed_arg(str, bool, "a field name")
    for flag, what in (("problem", "the problem (default: problem for math; prompt, or text with test_list, for code)"),
                       ("answer", "the reference answer of a math file (default: answer)"),
                       ("id", "the item id (default: id for math, task_id for code; else FILE:LINE)")):
        parser.add_argument(f"--{flag}-field", type=field_name, metavar="FIELD",
                            help=f"field of the benchmark files given without a preset that holds {what}")
    parser.add_argument("--samples-per-problem", type=POSITIVE_INT, default=1, metavar="K",
                        help="completions per problem, the k of avg@k and pass@k; default: 1")
    for name, (kind, _, allowed) in _SAMPLING_CHECKS.items():
        parser.add_argument(flag_name(name), type=kind, default=None,
                            help=f"{allowed}; default: generation_config.json, else {BUILTIN_SAMPLING[name]}")
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=1024, help="default: 1024")
    parser.add_argument("--greedy", action="store_true",
                        help="argmax decoding (ignores temperature, top-p, top-k); also with a temperature of 0 "
                             "(flag or file), and when generation_config.json has do_sample false and no sampling "
                             "flag is given")
    parser.add_argument("--out", type=path_arg, help="JSONL file for every generation with its grade")
    parser.add_argument("--summary", type=path_arg, help="JSON file for the per-benchmark metrics")
    parser.add_argument("--tokenizer", type=path_arg,
                        help="tokenizer folder or .model file (default: the checkpoint's)")
    parser.add_argument("--chat-template-kwargs", type=json_object_arg, metavar="JSON",
                        help=TRAIN_HELP["chat_template_kwargs"].replace("%", "%%"))
    parser.add_argument("--seq-length", type=typed_arg(int, lambda v: v >= 2, "an integer >= 2"), default=None,
                        help="longest prompt + completion (default: the model's maximum positions)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="prompts per generation batch per replica; default: 16")
    parser.add_argument("--seed", type=typed_arg(int, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
                        default=1234, help="sampling seed; default: 1234")
    parser.add_argument("--bf16", action="store_true", help="run the model in bf16 (default fp32)")
    parser.add_argument("--tensor-model-parallel-size", type=POSITIVE_INT, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=POSITIVE_INT, default=1)
    # training's own flag (same name, values and help: a bare flag or true / false), off by default
    fully_parallel = {a.dest: a for a in build_train_parser()._actions}["ckpt_fully_parallel_load"]
    fully_parallel.default = False
    parser._add_action(fully_parallel)
    parser.add_argument("--distributed-timeout-minutes", default=60.0,
                        type=typed_arg(float, lambda v: MIN_TIMEOUT_MINUTES <= v <= MAX_TIMEOUT_MINUTES, TIMEOUT_RANGE),
                        help="longest wait in a collective; replicas wait there for the slowest one's generation "
                             "(default 60)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    return parser


def _benchmark_spec(spec: str) -> tuple[str | None, str]:
    """A ``--benchmark`` value -> (preset or None, file or built-in name), by the rule of the module
    docstring: split at the first ``=`` only when the part before it is a plain word, which must be a
    preset. The built-in ``humaneval`` has its preset."""
    from megatron_renio.eval.benchmarks import PRESETS

    preset, sep, path = spec.partition("=")
    if spec == "humaneval":
        return spec, spec
    if not (sep and re.fullmatch(r"[\w-]+", preset)):
        return None, spec
    if preset not in PRESETS:
        raise UserInputError(f"--benchmark {spec}: unknown field preset {preset!r} (known: {', '.join(PRESETS)})")
    return preset, path


def _benchmark_fields(args: argparse.Namespace) -> dict[str, str]:
    """The layout keys that ``--problem-field``, ``--answer-field`` and ``--id-field`` set."""
    return {key: getattr(args, flag) for flag, key in FIELD_FLAGS.items() if getattr(args, flag) is not None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the eval flags (cheap checks only: nothing is loaded)."""
    from megatron_renio.models.checkpoint import METADATA_FILE, is_within

    args = build_parser().parse_args(argv)
    specs = [_benchmark_spec(spec) for spec in args.benchmark]
    if _benchmark_fields(args) and all(preset is not None for preset, _ in specs):
        flag = next(flag_name(f) for f in FIELD_FLAGS if getattr(args, f) is not None)
        raise UserInputError(f"{flag} applies to the benchmark files given without a preset; every --benchmark "
                             "here has one (or is humaneval)")
    outputs = [(path, flag) for path, flag in ((args.out, "--out"), (args.summary, "--summary")) if path is not None]
    inputs = [(path, "--benchmark") for spec, (_, path) in zip(args.benchmark, specs) if spec != "humaneval"]
    if args.tokenizer is not None:
        inputs.append((args.tokenizer, "--tokenizer"))
    model_folders = [(args.load, "--load")] if os.path.isfile(os.path.join(args.load, METADATA_FILE)) else []
    if args.tokenizer is not None and os.path.isdir(args.tokenizer):
        model_folders.append((args.tokenizer, "--tokenizer"))
    for path, flag in outputs:
        check_output_file(path, f"{flag} {path}")
        for other, other_flag in inputs + [o for o in outputs if o[1] != flag]:
            if same_file(path, other):
                raise UserInputError(f"{flag} {path} is also the {other_flag} file; choose another")
        for folder, folder_flag in model_folders:  # e.g. --summary CKPT/renio_model.json would replace the metadata
            if is_within(path, folder):
                raise UserInputError(f"{flag} {path} is inside the {folder_flag} folder, whose files it could "
                                     "replace; choose another")
    return args


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its report name and items."""

    name: str
    items: list


def _load_benchmarks(specs: list[str], fields: dict[str, str] | None = None) -> list[Benchmark]:
    """``[PRESET=]FILE_OR_NAME`` values -> loaded benchmarks with distinct names; ``fields``
    (:func:`_benchmark_fields`) overrides the detected layout of the files given without a preset."""
    from megatron_renio.eval.benchmarks import load_benchmark

    field_flags = {key: flag_name(field) for field, key in FIELD_FLAGS.items()}  # for files without a preset
    parsed = [_benchmark_spec(spec) for spec in specs]
    return [Benchmark(name, load_benchmark(path, fields=preset or fields, field_flags=None if preset else field_flags))
            for name, (preset, path) in zip(_benchmark_names(parsed), parsed)]


def _benchmark_names(parsed: list[tuple[str | None, str]]) -> list[str]:
    """The report names of ``(preset, path)`` benchmarks, by the rule of the module docstring: the
    preset, else the file name without extensions; where names clash, the fewest trailing parts of
    the absolute paths that tell the clashing files apart (after ``PRESET=`` when there is one; the
    whole name, extensions too, of files that differ in those alone). The built-in humaneval keeps
    its name. Benchmarks whose names still clash (file names that hold ``=``) are refused."""
    def builtin(preset: str | None, path: str) -> bool:
        return (preset, path) == ("humaneval", "humaneval")

    def parts(preset: str | None, path: str) -> tuple[str, ...]:  # the folders, then the name without extensions
        if builtin(preset, path):
            return (path,)
        absolute = Path(os.path.abspath(path))
        return absolute.parts[1:-1] + (absolute.name.split(".")[0],)

    bases = [preset or parts(preset, path)[-1] for preset, path in parsed]
    names = []
    for i, (preset, path) in enumerate(parsed):
        rivals = [j for j, base in enumerate(bases) if base == bases[i] and j != i]
        if any(parsed[j][0] == preset and os.path.abspath(parsed[j][1]) == os.path.abspath(path) for j in rivals):
            raise UserInputError(f"--benchmark: {path} is given twice")
        mine = parts(preset, path)
        depth = next((n for n in range(1, len(mine) + 1)
                      if all(parts(*parsed[j])[-n:] != mine[-n:] for j in rivals)), None)
        tail = path if depth is None else "/".join(mine[-depth:])
        names.append(bases[i] if not rivals or builtin(preset, path) else f"{preset}={tail}" if preset else tail)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UserInputError(f"--benchmark: {parsed[names.index(name)][1]} and {parsed[i][1]} would both be "
                                 f"reported as {name!r}; rename one of the files")
    return names


def _sampling(args, tokenizer_path: str | Path):
    """The SamplingConfig, by the rule of the module docstring: each of temperature, top_p, top_k
    from its flag, else from the ``generation_config.json`` beside the tokenizer at
    ``tokenizer_path``, else :data:`BUILTIN_SAMPLING`; greedy with ``--greedy``, a temperature of 0,
    or when that file says ``do_sample: false`` and no sampling flag is given."""
    from megatron_renio.rollout.sampling import SamplingConfig

    from megatron_renio.data.tokenizer import read_generation_config

    config_file, defaults = read_generation_config(tokenizer_path)
    do_sample = defaults.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise UserInputError(f"{config_file}: do_sample must be true or false, got {do_sample!r}")
    sampling_flags = any(getattr(args, name) is not None for name in _SAMPLING_CHECKS)
    values = dict(BUILTIN_SAMPLING)
    for name, (kind, check, allowed) in _SAMPLING_CHECKS.items():
        if getattr(args, name) is not None:
            value, origin = getattr(args, name), flag_name(name)
        elif defaults.get(name) is not None:
            value, origin = defaults[name], f"{config_file}: {name}"
        else:
            continue
        numeric = (int, float) if kind is float else int
        if isinstance(value, bool) or not isinstance(value, numeric) or not check(value):
            raise UserInputError(f"{origin} must be {allowed}, got {value!r}")
        values[name] = kind(value)
    greedy = args.greedy or values["temperature"] == 0 or (do_sample is False and not sampling_flags)
    unapplied = [f"{name} {defaults[name]!r}" for name, neutral in _UNAPPLIED_SAMPLING.items()
                 if defaults.get(name) not in (None, neutral)]
    if unapplied:
        log0(f"note: {config_file} sets {', '.join(unapplied)}, which eval does not apply: it decodes with "
             f"temperature, top-p and top-k only")
    return SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=greedy, **values)


@dataclass(frozen=True)
class Job:
    """One completion to generate: benchmark index, item index, sample index, prompt ids."""

    benchmark: int
    item: int
    sample: int
    prompt_ids: list


def _jobs(benchmarks: list[Benchmark], tokenizer, samples: int, seq_length: int, length_source: str) -> list[Job]:
    """One job per benchmark item and sample; ``length_source`` names where ``seq_length`` came from
    (the flag, or the model's maximum positions) for the refusal of a prompt that fills it."""
    from megatron_renio.data.prompts import PromptRecord
    from megatron_renio.data.templates import build_prompt_ids

    jobs = []
    for b, bench in enumerate(benchmarks):
        for i, item in enumerate(bench.items):
            record = PromptRecord(problem=item.prompt, solution=None, answer=item.answer, source=item.id)
            ids = build_prompt_ids(tokenizer, record, "math" if item.task == "math" else "coding", "student", "opd")
            if len(ids) >= seq_length:
                raise UserInputError(
                    f"benchmark {bench.name} item {item.id}: the prompt has {len(ids)} tokens, which leaves no "
                    f"room for a completion in {length_source} {seq_length}"
                )
            jobs += [Job(b, i, s, ids) for s in range(samples)]
    return jobs


def _spread_order(count: int) -> list[int]:
    """A fixed permutation of ``range(count)``, the same for every run and layout: the jobs sorted by
    a hash of their index. Cut into contiguous shares, it gives each replica a mix of the jobs."""
    return sorted(range(count), key=lambda i: hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8).digest())


def _report(benchmarks: list[Benchmark], records: list[dict], samples: int) -> dict:
    """Per-benchmark metrics from the graded generations (in benchmark, problem, sample order)."""
    from megatron_renio.eval.benchmarks import avg_at_k, pass_at_k

    report = {}
    for bench in benchmarks:
        mine = [r for r in records if r["benchmark"] == bench.name]
        grades = [[r["correct"] for r in mine[i * samples:(i + 1) * samples]] for i in range(len(bench.items))]
        report[bench.name] = {
            "problems": len(bench.items),
            "samples_per_problem": samples,
            f"avg@{samples}": avg_at_k(grades),
            f"pass@{samples}": sum(pass_at_k(samples, sum(g), samples) for g in grades) / len(grades),
            "mean_completion_tokens": sum(r["num_tokens"] for r in mine) / len(mine),
            "finished_fraction": sum(r["finished"] for r in mine) / len(mine),
        }
    return report


def _graded_batch(benchmarks: list[Benchmark], batch: list[Job], completions: list[list[int]], tokenizer,
                  pool: ThreadPoolExecutor, concurrent_runs: int) -> list[dict]:
    """The output records of one generation batch, graded, in order.

    Code items are graded together on ``pool``'s threads, each waiting on its sandbox child (``concurrent_runs``
    of them may run at once on this machine, :func:`grading_threads` per rank; up to its
    timeout: one at a time, a batch of looping programs would keep every rank of the replica waiting
    that many times over); math items on this thread, where math_grader bounds an item with SIGALRM
    (on another thread it would start a child process per item). Text is decoded here.
    """
    from megatron_renio.eval.benchmarks import grade

    items = [benchmarks[job.benchmark].items[job.item] for job in batch]
    texts = [tokenizer.decode(completion, skip_special_tokens=True) for completion in completions]
    code = {k: pool.submit(grade, item, text, concurrent_runs) for k, (item, text) in enumerate(zip(items, texts))
            if item.task != "math"}
    correct = [code[k].result() if k in code else grade(item, text) for k, (item, text) in enumerate(zip(items, texts))]
    return [{
        "benchmark": benchmarks[job.benchmark].name, "id": item.id, "sample": job.sample,
        "prompt": tokenizer.decode(job.prompt_ids, skip_special_tokens=False), "answer": item.answer,
        "completion": text, "correct": bool(right), "num_tokens": len(completion),
        "finished": bool(completion) and completion[-1] in tokenizer.stop_ids,
        "prompt_ids": job.prompt_ids, "completion_ids": completion,
    } for job, item, text, right, completion in zip(batch, items, texts, correct, completions)]


#: The most threads one grading rank grades code items on (:func:`grading_threads`).
MAX_GRADING_THREADS = 16


def _local_world_size() -> int:
    """torchrun's ``LOCAL_WORLD_SIZE`` (the ranks of this node), 1 without one."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def grading_threads() -> int:
    """Threads that grade code items together on a replica's grading rank: the CPUs this process may
    use shared among the node's ranks, at least 1 and at most :data:`MAX_GRADING_THREADS`. Each runs
    one sandboxed child at a time (at most one CPU second per wall second of its timeout); each child's
    task limit leaves room for the threads of every child the node's ranks may run at once."""
    return max(1, min(MAX_GRADING_THREADS, len(os.sched_getaffinity(0)) // _local_world_size()))


def run(args: argparse.Namespace) -> dict | None:
    """Evaluate (collective over every rank); returns the report on rank 0, None elsewhere.

    Leaves the process groups initialised (:func:`main` tears them down), so that one process may
    run several evaluations.
    """
    from megatron_renio import distributed
    from megatron_renio.rollout.generate import generate

    fault_spec()
    parallel = distributed.ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    ctx = distributed.initialize(parallel, args.seed, distributed.fingerprint(vars(args)),
                                 args.distributed_timeout_minutes)
    meta, sampling, tokenizer, benchmarks, seq_length, jobs, inputs_digest = distributed.same_on_every_rank(
        lambda: _read_inputs(args), lambda inputs: inputs[-1],
        "the checkpoint's settings, the tokenizer and the benchmarks")
    model = _build_model(meta, parallel, "bf16" if args.bf16 else "fp32", seq_length, args.ckpt_fully_parallel_load)

    order = _spread_order(len(jobs))  # rows of the generation: positions in this order
    start, end = len(jobs) * ctx.dp_rank // ctx.dp_size, len(jobs) * (ctx.dp_rank + 1) // ctx.dp_size
    grader = ctx.tp_rank == 0 and ctx.pp_rank == 0
    folder = progress_folder(args.out or args.summary) if args.out or args.summary else None
    earlier: dict[int, dict] = {}  # rank 0: the records an interrupted run of this evaluation left

    def read_progress() -> tuple[str, list[int]]:
        """Rank 0: this run's key and the finished job indices in ``folder`` (none unless it holds the key)."""
        key = _progress_key(args, inputs_digest)
        found = read_finished(folder, key)
        if found is None:
            start_over(folder, key)
            return key, []
        earlier.update(found)
        log0(f"eval: continuing an interrupted run of these settings, {len(found)} of {len(jobs)} generations "
             f"already graded ({folder})")
        return key, sorted(found)

    key, finished = distributed.on_rank0(read_progress) if folder is not None else (None, [])
    finished = set(finished)
    progress = (ReplicaLog(folder, ctx.dp_rank, resumed=bool(finished))
                if grader and folder is not None and holds_key(folder, key) else None)
    records: list[tuple[int, dict]] = []  # (index in jobs, record)
    nonfinite = False  # a token was drawn from non-finite logits (GenerationResult.nonfinite)
    batches = [first for first in range(start, end, args.batch_size)
               if not finished.issuperset(order[first:min(first + args.batch_size, end)])]
    if ctx.rank == 0:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", dynamic_ncols=True, file=sys.stderr)
    threads = grading_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="grade") as pool:  # threads start on first use
        for number, first in enumerate(batches, 1):
            indices = order[first:min(first + args.batch_size, end)]
            batch = [jobs[i] for i in indices]
            result = generate(model, [j.prompt_ids for j in batch], sampling, eos_id=tokenizer.stop_ids,
                              true_vocab_size=meta.preset.vocab_size, seed=args.seed, max_sequence_length=seq_length,
                              rows=(first, len(jobs)))
            if result.nonfinite:  # the same on every rank of this replica: the rest would be as meaningless
                nonfinite = True
                break
            if grader:
                graded = list(zip(indices, _graded_batch(benchmarks, batch, result.completions, tokenizer, pool,
                                                                    threads * _local_world_size())))
                records += graded
                if progress is not None:
                    progress.append(graded)
            maybe_die("eval", number)
    if progress is not None:
        progress.close()
    if distributed.any_rank(nonfinite, ctx.device):  # every replica refuses together
        if folder is not None and ctx.rank == 0 and holds_key(folder, key):  # a run again would meet the same logits
            shutil.rmtree(folder, ignore_errors=True)
        raise UserInputError(f"--load {args.load}: the model's logits hold NaN or inf (non-finite weights, or "
                             f"values that overflow {'bf16' if args.bf16 else 'fp32'}); its completions would "
                             "be meaningless: nothing graded, nothing written")
    gathered = gather_to_rank0(records)
    if gathered is None:
        return None
    by_index = {**earlier, **dict(gathered)}  # a batch partly finished before was generated again, the same
    ordered = [by_index[i] for i in range(len(jobs))]
    report = _report(benchmarks, ordered, args.samples_per_problem)
    settings = {"load": args.load, "tokenizer": tokenizer.name_or_path, "seed": args.seed,
                "max_new_tokens": sampling.max_new_tokens, "seq_length": seq_length, "greedy": sampling.greedy,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                "bf16": args.bf16, "chat_template_kwargs": template_variables(args.chat_template_kwargs)}
    summary = {"settings": settings, "benchmarks": report}
    for path, lines in ((args.out, lambda: jsonl_lines(ordered)),
                        (args.summary, lambda: [json.dumps(summary, indent=2) + "\n"])):
        if path:
            try:
                write_atomic(path, lines())
            except OSError as e:  # the graded generations stay in the progress folder: a rerun writes them
                raise storage_error(e, path, f"cannot write it; the same command run again continues from {folder}") \
                    from None
    if folder is not None and holds_key(folder, key):
        shutil.rmtree(folder, ignore_errors=True)
    for name, m in report.items():
        k = args.samples_per_problem
        log0(f"{name}: {m['problems']} problems x {k}  avg@{k} {m[f'avg@{k}']:.4f}  pass@{k} {m[f'pass@{k}']:.4f}  "
             f"mean length {m['mean_completion_tokens']:.1f} tokens  finished {m['finished_fraction']:.1%}")
    return report


def _read_inputs(args) -> tuple:
    """What every rank reads for an evaluation: the checkpoint's metadata (its model checked against the
    layout), the sampling settings, the tokenizer, the benchmarks, the sequence length, the jobs, and
    their :func:`_inputs_digest`."""
    from megatron_renio.data.tokenizer import load_tokenizer
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import check_divisibility
    from megatron_renio.models.checkpoint import read_checkpoint_metadata
    from megatron_renio.training.components import note_untrained_positions

    with about_flag("--load"):
        meta = read_checkpoint_metadata(args.load)
    check_divisibility(meta.preset, ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size))
    tokenizer_path = args.tokenizer or meta.tokenizer_dir
    if tokenizer_path is None:
        raise UserInputError(f"--load {args.load} holds no tokenizer: give --tokenizer")
    sampling = _sampling(args, tokenizer_path)
    benchmarks = _load_benchmarks(args.benchmark, _benchmark_fields(args))
    with about_flag("--tokenizer" if args.tokenizer else "--load"):
        tokenizer = load_tokenizer(str(tokenizer_path))
    with about_flag("--chat-template-kwargs"):
        tokenizer.set_template_variables(template_variables(args.chat_template_kwargs))
    if args.tokenizer and meta.generation_config is not None:  # the model's own stop ids too
        tokenizer.add_stop_ids(meta.generation_config.parent)
    vocab = meta.preset.vocab_size
    if tokenizer.vocab_size > vocab:
        raise UserInputError(
            f"the tokenizer ({tokenizer.vocab_size} ids) is larger than the model's vocabulary ({vocab})"
        )
    seq_length = args.seq_length or meta.preset.max_position_embeddings
    note_untrained_positions(seq_length, "model", meta.preset)
    length_source = "--seq-length" if args.seq_length else "the model's max_position_embeddings (the default --seq-length)"
    jobs = _jobs(benchmarks, tokenizer, args.samples_per_problem, seq_length, length_source)
    digest = _inputs_digest(args, sampling, tokenizer, benchmarks, seq_length, jobs)
    return meta, sampling, tokenizer, benchmarks, seq_length, jobs, digest


def _inputs_digest(args, sampling, tokenizer, benchmarks: list[Benchmark], seq_length: int, jobs: list[Job]) -> str:
    """SHA-256 of the evaluation's inputs other than the model: sampling, lengths, stop ids, samples per
    problem, the benchmark items and every prompt."""
    settings = {"sampling": dataclasses.asdict(sampling), "seq_length": seq_length,
                "stop_ids": sorted(tokenizer.stop_ids), "samples": args.samples_per_problem,
                "benchmarks": [[b.name, [dataclasses.asdict(item) for item in b.items]] for b in benchmarks],
                "prompts": [job.prompt_ids for job in jobs if job.sample == 0]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _progress_key(args, inputs_digest: str) -> str:
    """SHA-256 of what an evaluation's generations and grades depend on (:mod:`~megatron_renio.eval.progress`):
    the model's weights (:func:`~megatron_renio.models.checkpoint.checkpoint_fingerprint`) and dtype, the
    seed, the other inputs (:func:`_inputs_digest`), and this package's version (the grader's)."""
    from megatron_renio import __version__
    from megatron_renio.models.checkpoint import checkpoint_fingerprint

    settings = {"version": __version__, "model": checkpoint_fingerprint(args.load), "bf16": args.bf16,
                "seed": args.seed, "inputs": inputs_digest}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _build_model(meta, parallel, dtype: str, seq_length: int, fully_parallel: bool = False):
    """This stage's GPTModel with the checkpoint's weights; ``fully_parallel``: ``--ckpt-fully-parallel-load``."""
    from megatron_renio.models.builder import build_gpt_model
    from megatron_renio.models.checkpoint import load_model_checkpoint

    model, _ = build_gpt_model(meta.preset, parallel, dtype, max_sequence_length=seq_length)
    load_model_checkpoint(model, meta.directory, fully_parallel)
    return model


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megatron-renio eval``; returns the exit status (0, or 2 on bad input)."""
    return run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
