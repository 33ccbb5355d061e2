"""``megatron-renio score``: what ReNIO makes of given completions, through the training code path.

    [torchrun --nproc-per-node N] python -m megatron_renio.eval.score --student-load S --teacher-load T
        --data rows.jsonl [--out scores.jsonl] [--per-token] [--tokenizer PATH] [training flags]

Input: JSONL (one object per line, blank lines skipped; also gzip-compressed), a JSON array of
objects, or parquet (:mod:`megatron_renio.data.records`). Each row holds a student prompt, an
optional teacher prompt (OPSD's privileged prompt; the student's when absent) and a completion, each
as text (``prompt``, ``teacher_prompt``, ``completion``) or as token ids (``prompt_ids``,
``teacher_prompt_ids``, ``completion_ids``; ids win when both are given). Text needs a tokenizer
(``--tokenizer``, else the student checkpoint's): prompts are encoded with the tokenizer's own
special tokens (e.g. BOS), completions without; prompt text is used verbatim, no template is
applied. Every token of the completion is scored, an EOS included (nothing is cut at EOS). The
output of ``megatron-renio eval`` is a valid input.

Computation: the student and teacher checkpoints run as in training (:class:`PairedModel` in one
Megatron schedule, forward only, any TP/PP; :class:`DistillationStep` with ``keep_token_terms``), so
every number is what the trainer computes with the same flags. For each row, with s_t / u_t the
student / teacher log-probs of completion token t at ``--kd-temperature`` and r_t = min(s_t - u_t,
``--renio-clip``) (README, 'The method, as implemented'):

* ``raw_weight``: w = exp(a / ``--renio-temperature``); ``mean_log_ratio``: a, the mean r_t over the
  pivotal tokens (0 without any); ``num_pivotal``, ``pivotal_positions`` (0-based completion token
  indices with r_t >= ``--renio-threshold``) and ``pivotal_tokens`` (their vocabulary pieces; null
  without a tokenizer);
* ``weight``: the raw weights normalised over the whole file as one batch (``--renio-norm``:
  batch_mean and ema give min(w / mean(w), ``--renio-max-weight``), clamp and none as in training);
* ``divergence``: the mean over the completion tokens of the per-token divergence (``--loss``,
  ``--kd-beta``, ``--kd-token-clip``, ``--kd-top-k``); ``loss``: the sample's loss L_i of ``--loss``
  (equal to ``divergence`` except for sampled_rkl);
* ``num_tokens`` (completion tokens scored) and ``truncated`` (the completion was cut to fit
  ``--seq-length``);
* with ``--per-token``: ``student_logprobs`` and ``teacher_logprobs``, one per scored token.

Output: JSONL, one row per input row in the same order: the input row's fields (except the token-id
lists) followed by the fields above, so ``megatron-renio analyze`` reads it directly when the input
carried grades. Default ``--out``: the input file name with ``.scores.jsonl`` for its extension.

Flags: besides ``--data``, ``--out`` and ``--per-token``, score takes these training flags, with
their training meaning, defaults and validation: ``--student-load``, ``--teacher-load`` (both
required), ``--tokenizer``, ``--seq-length`` (default: the smaller of the two models'
``max_position_embeddings``, rounded down to a multiple of 8), ``--micro-batch-size``,
``--tensor-model-parallel-size``, ``--pipeline-model-parallel-size``, ``--ckpt-fully-parallel-load``
(for both models), ``--bf16``, ``--distributed-timeout-minutes``, ``--debug`` and the loss / ReNIO
flags ``--loss``, ``--kd-beta``, ``--kd-temperature``, ``--kd-token-clip``, ``--kd-top-k``,
``--renio-clip``, ``--renio-threshold``, ``--renio-temperature``, ``--renio-norm``,
``--renio-max-weight``.

Parallelism: rows are sorted by length and dealt to the data-parallel replicas; every replica runs
the same number of schedules of ``--micro-batch-size`` x PP rows (short ones repeat a row whose
result is dropped); the last stage's first TP ranks gather their rows on the first of them, which
sends them to rank 0 when it is another rank (PP > 1; :func:`~megatron_renio.eval.runner.gather_to_rank0`);
rank 0 normalises and writes. Bad input: ``error: <one line>`` on stderr, exit status 2, no output file. A model whose
log-probs on a row's completion are NaN or inf (non-finite weights, overflowing logits) is bad input
too: the error names the first such row of ``--data`` and the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from array import array
from dataclasses import dataclass, field

from megatron_renio.config import TrainConfig, _OneLineErrorParser, check_loss_impl_here, flag_name, path_arg
from megatron_renio.config import build_parser as build_train_parser
from megatron_renio.config import validate as validate_train_config
from megatron_renio.data import records
from megatron_renio.data.records import RECORD_EXTENSIONS
from megatron_renio.data.token_sequences import TokenSequences, sha256_of
from megatron_renio.errors import UserInputError, about_flag
from megatron_renio.entrypoint import run_command
from megatron_renio.distributed import log0, on_rank0
from megatron_renio.eval.runner import gather_to_rank0, jsonl_lines, same_file
from megatron_renio.output_paths import check_output_file, storage_error, write_atomic

TRAINING_FLAGS = (
    "student_load", "teacher_load", "tokenizer", "seq_length", "micro_batch_size",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "ckpt_fully_parallel_load", "bf16",
    "distributed_timeout_minutes", "debug",
    "loss", "kd_beta", "kd_temperature", "kd_token_clip", "kd_top_k",
    "renio_clip", "renio_threshold", "renio_temperature", "renio_norm", "renio_max_weight",
)
FIELDS = ("prompt", "teacher_prompt", "completion")  # text fields; each has an ``<name>_ids`` twin


@dataclass
class ScoreArgs:
    """Parsed flags: the training config (loss, ReNIO, models, layout) and score's own flags."""

    train: TrainConfig
    data: str
    out: str
    per_token: bool


def build_parser() -> argparse.ArgumentParser:
    """Score's own flags; the training flags of :data:`TRAINING_FLAGS` are parsed by training's parser."""
    parser = _OneLineErrorParser(
        prog="megatron-renio score",
        description="ReNIO weights, pivotal tokens and divergences of given completions.",
        epilog="training flags accepted: " + " ".join(flag_name(name) for name in TRAINING_FLAGS),
    )
    parser.add_argument("--data", required=True, type=path_arg,
                        help="JSONL rows: prompt / teacher_prompt / completion, text or _ids")
    parser.add_argument("--out", type=path_arg, help="output JSONL (default: the --data name with .scores.jsonl)")
    parser.add_argument("--per-token", action="store_true", help="add every completion token's log-probs")
    return parser


def parse_args(argv: list[str]) -> ScoreArgs:
    """Parse and validate every flag (nothing is loaded)."""
    own, rest = build_parser().parse_known_args(argv)
    for token in rest:
        if token.startswith("--") and token[2:].split("=")[0].replace("-", "_") not in TRAINING_FLAGS:
            raise UserInputError(f"unrecognized argument {token.split('=')[0]} (see --help)")
    values = {k: v for k, v in vars(build_train_parser().parse_args(rest)).items() if k != "config"}
    for name in ("student_load", "teacher_load"):
        if not values.get(name):
            raise UserInputError(f"{flag_name(name)} is required")
    if not own.data.endswith(RECORD_EXTENSIONS):
        raise UserInputError(f"--data {own.data}: unknown format (expected one of {', '.join(RECORD_EXTENSIONS)})")
    if not os.path.isfile(own.data):
        raise UserInputError(f"--data {own.data}: no such file")
    if "seq_length" not in values:  # what both models were trained for
        from megatron_renio.models.checkpoint import read_checkpoint_metadata

        lengths = []
        for name in ("student_load", "teacher_load"):
            with about_flag(flag_name(name)):
                lengths.append(read_checkpoint_metadata(values[name]).preset.max_position_embeddings)
        longest = min(lengths)
        values["seq_length"] = max(8, longest // 8 * 8)
    micro_batch_size = values.get("micro_batch_size", TrainConfig.micro_batch_size)
    # Fixed settings that make training's cross-flag checks hold for a scoring run.
    train = TrainConfig(**values, mode="opd", teacher="separate", renio=True, data_path=[own.data],
                        max_new_tokens=1, global_batch_size=micro_batch_size)
    validate_train_config(train)
    check_loss_impl_here(train)
    stem = own.data.removesuffix(".gz").rsplit(".", 1)[0]  # without its RECORD_EXTENSIONS entry
    out = own.out or stem + ".scores.jsonl"
    if out.endswith(tuple(ext for ext in RECORD_EXTENSIONS if ext != ".jsonl")):  # what analyze reads as another format
        raise UserInputError(f"--out {out}: score writes plain JSON lines; give a name ending in .jsonl")
    check_output_file(out, f"--out {out}")
    if same_file(out, own.data):
        raise UserInputError(f"--out {out} is the --data file")
    return ScoreArgs(train, own.data, out, own.per_token)


@dataclass
class Row:
    """One input row, tokenised; ``extra`` holds the fields copied to the output; ``where`` names it
    in messages (``data.jsonl line 3``)."""

    student_prompt: list[int]
    teacher_prompt: list[int]
    completion: list[int]
    extra: dict
    where: str = field(default="", compare=False)

    @property
    def length(self) -> int:
        """The padded length this row needs: the longer prompt plus the completion."""
        return max(len(self.student_prompt), len(self.teacher_prompt)) + len(self.completion)


def _ids(record: dict, name: str, where: str, tokenizer, vocab_size: int) -> list[int] | None:
    """The ids of field ``name``: its ``_ids`` list, else its text encoded; None when both are absent.

    A prompt's text gets the special tokens the tokenizer adds to a whole input (Llama's BOS) unless
    it already starts with BOS, as eval's ``prompt`` field does (decoded with special tokens); a
    completion's text gets none.
    """
    ids_name = f"{name}_ids"
    if record.get(ids_name) is not None:
        ids = record[ids_name]
        if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise UserInputError(f"{where}: field '{ids_name}' must be a list of integers")
        if ids and not (0 <= min(ids) and max(ids) < vocab_size):
            raise UserInputError(f"{where}: field '{ids_name}' holds ids outside the vocabulary [0, {vocab_size})")
        return ids
    text = record.get(name)
    if text is None:
        return None
    if not isinstance(text, str):
        raise UserInputError(f"{where}: field '{name}' must be a string")
    if tokenizer is None:
        raise UserInputError(f"{where}: field '{name}' is text, which needs --tokenizer (the checkpoint has none)")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if name == "completion" or (tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id]):
        return ids
    return tokenizer.encode(text, add_special_tokens=True)


def read_rows(path: str, tokenizer, vocab_size: int, seq_length: int) -> list[Row]:
    """Read and tokenise the ``--data`` rows (:func:`megatron_renio.data.records.read_rows`);
    :class:`UserInputError` names the line and field."""
    rows = []
    for record in records.read_rows(path, RECORD_EXTENSIONS):
        where, fields = record.where, record.fields
        student, teacher, completion = (_ids(fields, name, where, tokenizer, vocab_size) for name in FIELDS)
        for name, ids in (("prompt", student), ("completion", completion)):
            if ids is None:
                raise UserInputError(f"{where}: missing field '{name}' or '{name}_ids'")
        teacher = student if teacher is None else teacher
        for name, ids in (("prompt", student), ("teacher_prompt", teacher)):
            if not ids:
                raise UserInputError(f"{where}: field '{name}' is empty")
            if len(ids) >= seq_length:
                raise UserInputError(
                    f"{where}: field '{name}' has {len(ids)} tokens, which leaves no room for the completion "
                    f"in --seq-length {seq_length}"
                )
        extra = {k: v for k, v in fields.items() if k not in {f"{name}_ids" for name in FIELDS}}
        for name, value in extra.items():  # copied to the output: refused now, not after the scoring
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as e:  # a parquet date or bytes column; NaN, which JSON has not
                raise UserInputError(f"{where}: field {name!r} cannot be copied to the JSON output ({e})") from None
        rows.append(Row(student, teacher, completion, extra, where))
    if not rows:
        raise UserInputError(f"--data {path}: no rows")
    return rows


def _row_scores(per_sample: dict, batch, j: int, raw, completion: list[int], tokenizer, per_token: bool) -> dict:
    """The output fields (all but ``weight``) of sample ``j`` of a scored batch."""
    n = int(batch.completion_lengths[j])
    positions = raw.pivotal[j, :n].nonzero().flatten().tolist()
    scores = {
        "raw_weight": float(raw.weight[j]),
        "mean_log_ratio": float(raw.mean_log_ratio[j]),
        "num_pivotal": len(positions),
        "pivotal_positions": positions,
        "pivotal_tokens": [tokenizer.id_to_piece(completion[p]) for p in positions] if tokenizer else None,
        "num_tokens": n,
        "truncated": bool(batch.truncated[j]),
        "divergence": float(per_sample["divergence"][j, :n].double().sum() / max(n, 1)),
        "loss": float(per_sample["per_sample_loss"][j]),
    }
    if per_token:  # float32 arrays until written: 4 bytes a value on rank 0, where a list of floats takes 32
        for side in ("student", "teacher"):
            scores[f"{side}_logprobs"] = array("f", per_sample[f"{side}_logprobs"][j, :n].float().cpu().numpy().tobytes())
    return scores


def _json_row(row: dict) -> dict:
    """``row`` with its float32 arrays (:func:`_row_scores`) as lists, for JSON (the same values)."""
    return {k: v.tolist() if isinstance(v, array) else v for k, v in row.items()}


def _nonfinite_models(per_sample: dict, j: int, n: int) -> str | None:
    """None when sample ``j``'s numbers are finite; else which model made them non-finite: ``student``,
    ``teacher`` or both by the per-token log-probs s / u of its ``n`` completion tokens (a NaN or +inf
    logit in a row makes that row's log-probs NaN), ``student or teacher`` when only the divergence or
    loss is not finite (an -inf logit: the log-probs cannot tell which). Per-token checks only: no
    pass over the logits."""
    import torch

    bad = [side for side in ("student", "teacher") if not torch.isfinite(per_sample[f"{side}_logprobs"][j, :n]).all()]
    if bad:
        return " and ".join(bad)
    if not (torch.isfinite(per_sample["divergence"][j, :n]).all() and torch.isfinite(per_sample["per_sample_loss"][j])):
        return "student or teacher"
    return None


def _nonfinite_error(row: Row, models: str, count: int, cfg: TrainConfig, out: str) -> UserInputError:
    """The refusal of a file with ``count`` rows that ``models`` (:func:`_nonfinite_models`) scored
    non-finite; ``row`` is the first of them."""
    flags = {"student": f"--student-load {cfg.student_load}", "teacher": f"--teacher-load {cfg.teacher_load}"}
    named = ", ".join(flag for side, flag in flags.items() if side in models)
    what = ("non-finite log-probs (NaN or inf)" if models != "student or teacher"
            else "finite log-probs but a non-finite divergence (an infinite logit)")
    also = f" ({count} rows in all)" if count > 1 else ""
    gives, its = ("give", "their") if " and " in models else ("gives", "its")
    return UserInputError(f"{row.where}: the {models} ({named}) {gives} {what} on this row's completion{also}: "
                          f"{its} weights hold NaN or inf, or {its} logits overflow; nothing written to --out {out}")


def _schedule(rows: list[Row], dp_rank: int, dp_size: int, chunk: int) -> tuple[list[int], int]:
    """This replica's row indices, padded to the same number of ``chunk``-row schedules on every
    replica by repeating a row, and how many of them are real."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i].length)
    mine = order[dp_rank::dp_size]
    per_replica = -(-len(rows) // dp_size)
    total = -(-per_replica // chunk) * chunk
    return mine + [order[0]] * (total - len(mine)), len(mine)


def run(args: ScoreArgs) -> list[dict] | None:
    """Score every row (collective over every rank); returns the output rows on rank 0 (``--per-token``
    log-probs as float32 arrays), None elsewhere.

    Leaves the process groups initialised (:func:`main` tears them down).
    """
    import torch

    from megatron_renio import distributed
    from megatron_renio.data.batching import pack_pairs
    from megatron_renio.models.builder import check_divisibility, freeze
    from megatron_renio.renio.weights import ReNIONormalizer, raw_weights
    from megatron_renio.training import components as C
    from megatron_renio.training.paired import PairedModel
    from megatron_renio.training.step import DistillationStep

    cfg = args.train
    settings = C.loss_settings(cfg)
    ctx = distributed.initialize(C.parallel_config(cfg), cfg.seed, distributed.fingerprint(args),
                                 cfg.distributed_timeout_minutes)

    def read_inputs():
        """The two models' sources, the vocabulary sizes, the tokenizer (or None) and the rows."""
        student_source = C.resolve_model(cfg.student_load, None, "--student-load")
        teacher_source = C.resolve_model(cfg.teacher_load, None, "--teacher-load")
        for role, source in (("student", student_source), ("teacher", teacher_source)):
            C.note_untrained_positions(cfg.seq_length, role, source.preset)
            check_divisibility(source.preset, C.parallel_config(cfg), role)  # names the model, before building
        # as in training: both built with the wider padded width, the ids both models hold are the vocabulary
        padded_vocab, vocab = C.paired_vocab(cfg, student_source.preset, teacher_source.preset)
        tokenizer = None
        if cfg.tokenizer or student_source.tokenizer_dir:
            tokenizer = C.load_run_tokenizer(cfg, student_source, teacher_source)
        return student_source, teacher_source, padded_vocab, vocab, tokenizer, read_rows(
            args.data, tokenizer, vocab, cfg.seq_length)

    def rows_digest(inputs) -> str:
        """The rows' student prompts, teacher prompts and completions, each as one store (:func:`sha256_of`)."""
        rows = inputs[-1]
        return sha256_of(*(TokenSequences(getattr(row, name) for row in rows)
                           for name in ("student_prompt", "teacher_prompt", "completion")))

    student_source, teacher_source, padded_vocab, vocab, tokenizer, rows = distributed.same_on_every_rank(
        read_inputs, rows_digest, "the tokenised rows of --data")
    student, student_info = C.build_model(student_source, cfg, padded_vocab)
    teacher, teacher_info = C.build_model(teacher_source, cfg, padded_vocab)
    freeze(student)
    freeze(teacher)
    paired = PairedModel(student, teacher, student_info.preset.hidden_size, teacher_info.preset.hidden_size)
    step = DistillationStep(paired, [student], settings, ReNIONormalizer(), vocab, keep_token_terms=True)

    chunk = cfg.micro_batch_size * ctx.pp_size
    indices, real = _schedule(rows, ctx.dp_rank, ctx.dp_size, chunk)
    reporter = ctx.is_last_stage and ctx.tp_rank == 0
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    scored: list[tuple[int, dict, str | None]] = []  # (row, output fields, models with non-finite numbers)
    for first in range(0, len(indices), chunk):
        group = [rows[i] for i in indices[first:first + chunk]]
        batch = pack_pairs([r.student_prompt for r in group], [r.teacher_prompt for r in group],
                           [r.completion for r in group], eos_id=-1, pad_id=pad_id, seq_length=cfg.seq_length,
                           pad_to_multiple=1)
        micro = batch.micro_batches(cfg.micro_batch_size, 1)
        with torch.no_grad():
            per_sample = step.run(micro, forward_only=True).per_sample
        if not reporter:
            continue
        raw = raw_weights(per_sample["student_logprobs"], per_sample["teacher_logprobs"], batch.completion_mask,
                          settings.renio)
        for j, index in enumerate(indices[first:first + chunk]):
            if first + j < real:
                scores = _row_scores(per_sample, batch, j, raw, rows[index].completion, tokenizer, args.per_token)
                nonfinite = _nonfinite_models(per_sample, j, int(batch.completion_lengths[j]))
                scored.append((index, scores, nonfinite))

    gathered = gather_to_rank0(scored, stage="last")

    def refuse_nonfinite():  # on rank 0: the first row scored non-finite, and how many there are
        bad = sorted((index, models) for index, _, models in gathered if models is not None)
        if bad:
            (index, models), count = bad[0], len(bad)
            raise _nonfinite_error(rows[index], models, count, cfg, args.out)

    on_rank0(refuse_nonfinite)  # every rank refuses (rank 0 prints it), before anything is written
    if gathered is None:
        return None
    by_row = {index: scores for index, scores, _ in gathered}
    raw_all = torch.tensor([by_row[i]["raw_weight"] for i in range(len(rows))], dtype=torch.float64)
    file_batch = dataclasses.replace(settings.renio, scope="local")
    weights = ReNIONormalizer().normalize(raw_all, file_batch).weights.tolist()
    output = [{**row.extra, "weight": weights[i], **by_row[i]} for i, row in enumerate(rows)]
    try:
        write_atomic(args.out, jsonl_lines(map(_json_row, output)))
    except OSError as e:
        raise storage_error(e, args.out, "cannot write the scores") from None
    truncated = sum(r["truncated"] for r in output)
    cut = f"; cut at --seq-length {cfg.seq_length}: {truncated} (field truncated)" if truncated else ""
    log0(f"scored {len(output)} rows: weight {min(weights):.4g} .. {max(weights):.4g}, "
         f"pivotal tokens {sum(r['num_pivotal'] for r in output)} of {sum(r['num_tokens'] for r in output)}"
         f"{cut}; wrote {args.out}")
    return output


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megatron-renio score``; returns the exit status (0, or 2 on bad input)."""
    return run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
