"""A run's logs: the step metrics (JSONL, TensorBoard, W&B) and the saved samples.

Every step's metrics go to :class:`MetricsLogger` on global rank 0; with ``--save-samples-interval``
each data-parallel rank appends its completions, weights and grades to ``--save/samples_rank<dp>.jsonl``
(:func:`save_samples`). A run keeps one record per step across restarts: a resumed run drops the steps
it takes again (:func:`drop_steps_after`), and a new run refuses an earlier run's records
(:func:`check_new_run_logs`). Non-finite values are written as null (:func:`standard_json`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_renio.config import TrainConfig
from megatron_renio.errors import UserInputError
from megatron_renio.output_paths import storage_error, write_atomic


def metrics_path(cfg: TrainConfig) -> Path | None:
    """The JSONL metrics file: ``--metrics-file``, else ``--save/metrics.jsonl``, else none."""
    path = cfg.metrics_file or (str(Path(cfg.save) / "metrics.jsonl") if cfg.save else None)
    return Path(path) if path else None


_TAIL_BLOCK = 1 << 20  # bytes read at a time when a log is scanned from its end


def _lines_from_end(f, end: int):
    """``(offset, line)`` of each line of the binary file ``f`` up to byte ``end``, the last first
    (without its ``\n``; a file ending in ``\n`` gives an empty last line), reading blocks backwards."""
    pending, position = b"", end
    while position > 0:
        start = max(0, position - _TAIL_BLOCK)
        f.seek(start)
        parts = (f.read(position - start) + pending).split(b"\n")
        position, pending = start, parts[0]
        offset = start + len(pending) + 1
        complete = []
        for part in parts[1:]:
            complete.append((offset, part))
            offset += len(part) + 1
        yield from reversed(complete)
    yield 0, pending


def drop_steps_after(path: Path, iteration: int) -> None:
    """Cut the JSONL file ``path`` of per-step records after its last record of a step up to
    ``iteration``: a run resumed at ``iteration`` (0: a requeued run that had saved no checkpoint)
    takes the later steps again, so each step keeps one record. Records are appended in step order,
    so only the end of the file is read (a resume does not read the run's whole samples files); the
    last line, when a killed process cut it short (no ``\n``), goes too. A line that is not a record
    of this trainer's (not UTF-8 text, not a JSON object with an integer ``step``) is refused in one
    line naming the file and the line, which is left as it is."""

    def refuse(f, offset: int, what: str) -> UserInputError:
        f.seek(0)
        line = 1 + sum(f.read(min(_TAIL_BLOCK, offset - start)).count(b"\n") for start in range(0, offset, _TAIL_BLOCK))
        return UserInputError(f"{path}: line {line} {what}, so not a log of this trainer; repair or remove the "
                              "file to resume")

    try:
        f = open(path, "rb+")
    except OSError as e:
        raise UserInputError(f"{path}: cannot cut the steps a resumed run takes again ({e.strerror}); make it "
                             "writable to resume") from None
    with f:
        end = f.seek(0, os.SEEK_END)
        keep = 0
        for offset, line in _lines_from_end(f, end):
            if not line.strip() or offset + len(line) == end:  # nothing, or the last line cut short
                continue
            try:
                record = json.loads(line.decode())
            except UnicodeDecodeError as e:
                raise refuse(f, offset, f"is not UTF-8 text (byte {line[e.start]:#04x})") from None
            except json.JSONDecodeError:
                record = None
            if not (isinstance(record, dict) and type(record.get("step")) is int):
                raise refuse(f, offset, "is not a JSON record of a step")
            if record["step"] <= iteration:
                keep = offset + len(line) + 1
                break
        if keep < end:
            f.truncate(keep)


def drop_repeated_steps(cfg: TrainConfig, iteration: int, save_starts_over: bool = False) -> None:
    """Collective: rank 0 drops the steps after ``iteration`` from every log of the run (:func:`log_files`,
    :func:`drop_steps_after`), and with ``save_starts_over`` (``--override-save``) every step from the
    logs inside ``--save``; a log it cannot read stops every rank with its line (``on_rank0``)."""
    from megatron_renio.distributed import on_rank0
    from megatron_renio.models.checkpoint import is_within

    def drop() -> None:
        for path in log_files(cfg):
            if path.is_file():
                starts_over = save_starts_over and bool(cfg.save) and is_within(path, cfg.save)
                drop_steps_after(path, 0 if starts_over else iteration)

    on_rank0(drop)


def standard_json(record: dict) -> dict:
    """``record`` with non-finite floats as None: JSON has no NaN or Infinity (``jq`` and other strict
    readers refuse them), and a skipped step's loss may be either."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in record.items()}


WANDB_RUN_ID_FILE = "wandb_run_id"


def wandb_run_id(cfg: TrainConfig, continues: bool) -> str | None:
    """The W&B run id of this run: the one in ``--save/wandb_run_id`` when the run ``continues`` an
    attempt that wrote it (a requeued or resumed run: its steps go on in the same W&B run), else a new
    id, written there first; None without ``--save`` (W&B then starts a run of its own)."""
    if not cfg.save:
        return None
    path = Path(cfg.save) / WANDB_RUN_ID_FILE
    try:
        if continues and path.is_file():
            run_id = path.read_text(encoding="utf-8", errors="replace").strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(str(path), [run_id + "\n"])
    except OSError as e:
        raise storage_error(e, path, "cannot read or write the W&B run id") from None
    if not run_id or not all(c.isascii() and (c.isalnum() or c in "-_") for c in run_id):
        raise UserInputError(f"{path}: not a W&B run id ({run_id[:40]!r}); delete the file to start a new W&B run")
    return run_id


class MetricsLogger:
    """Rank-0 sinks: a JSONL file, TensorBoard and W&B (each only when asked for). A run started with
    ``--load`` at iteration ``resumed_at`` (0 when it found no checkpoint) first drops the later steps
    of an earlier attempt from TensorBoard (``purge_step``; the JSONL files: :func:`drop_steps_after`),
    so that each step is recorded once, and logs to that attempt's W&B run (:func:`wandb_run_id`;
    W&B drops a step at or below its last one, so the retaken steps keep the earlier attempt's values
    there) unless it ``replaces_run`` (``--override-save``)."""

    def __init__(self, cfg: TrainConfig, resumed_at: int | None = None, replaces_run: bool = False):
        """Collective: rank 0 opens the sinks (with ``--wandb-project`` it first reads or writes the W&B
        run id); a damaged id file, or a W&B run that does not start (no credentials, no network on the
        compute nodes), stops every rank with one line, not rank 0 alone while the others go on to
        their next collective."""
        from megatron_renio.distributed import on_rank0, raise_if_any_rank

        self.rank0 = torch.distributed.get_rank() == 0
        self.jsonl = None
        self.tb = None
        self.wandb = None
        continues = resumed_at is not None and not replaces_run
        run_id = on_rank0(lambda: wandb_run_id(cfg, continues)) if cfg.wandb_project else None
        error = None
        if self.rank0:
            try:
                self._open_sinks(cfg, resumed_at, run_id)
            except Exception as e:  # every rank must learn of it
                error = e
        raise_if_any_rank(error)

    def _open_sinks(self, cfg: TrainConfig, resumed_at: int | None, run_id: str | None) -> None:
        path = metrics_path(cfg)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(path, "a")
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard_dir, purge_step=None if resumed_at is None else resumed_at + 1)
        if cfg.wandb_project:  # config.validate checked that wandb is installed
            import wandb

            try:
                self.wandb = wandb.init(project=cfg.wandb_project, config=asdict(cfg), id=run_id, resume="allow")
            except Exception as e:  # wandb's own errors (wandb.errors.UsageError, CommError) and the network's
                reason = (str(e).strip().splitlines() or [""])[0]
                raise UserInputError(f"--wandb-project {cfg.wandb_project}: W&B did not start ({type(e).__name__}: "
                                     f"{reason}); log in (wandb login, WANDB_API_KEY), or set WANDB_MODE=offline "
                                     "where the nodes have no network") from None

    def log(self, step: int, metrics: dict) -> None:
        if not self.rank0:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **standard_json(metrics)}) + "\n")
            self.jsonl.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        for sink in (self.jsonl, self.tb):
            if sink:
                sink.close()
        if self.wandb:
            self.wandb.finish()


def norm_text(grad_norm: float | None) -> str:
    """A step's gradient norm for :class:`ConsoleProgress`: ``-`` for a skipped step (no norm)."""
    return "-" if grad_norm is None else f"{grad_norm:.3g}"


class ConsoleProgress:
    """Global rank 0's progress on the console: a tqdm bar on stderr when both stdout and stderr are a
    terminal (``terminal``, default: asked of them); otherwise (a job's log file, where a bar is one
    long line of carriage returns) one line on stdout per ``log_interval`` iterations and at the
    last, ``<name> iteration N/TOTAL | key value | ...``, as Megatron-LM logs. Other ranks show
    nothing."""

    def __init__(self, name: str, total: int, initial: int, log_interval: int, terminal: bool | None = None):
        self.name, self.total, self.log_interval = name, total, log_interval
        self.enabled = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if terminal is None:
            terminal = sys.stdout.isatty() and sys.stderr.isatty()
        self.bar = None
        if self.enabled and terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, file=sys.stderr)

    def update(self, iteration: int, fields: dict[str, str]) -> None:
        """Iteration ``iteration`` is done; ``fields``: what to show of it (formatted values)."""
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(iteration - self.bar.n)
        elif self.enabled and (iteration % self.log_interval == 0 or iteration == self.total):
            parts = [f"{self.name} iteration {iteration}/{self.total}", *(f"{k} {v}" for k, v in fields.items())]
            print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "ConsoleProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on an exception: tqdm's bar leaves the terminal on a fresh line


def log_files(cfg: TrainConfig) -> list[Path]:
    """The JSONL files a run appends to: its metrics file and, under ``--save``, the saved samples."""
    metrics = metrics_path(cfg)
    return ([metrics] if metrics else []) + (sorted(Path(cfg.save).glob("samples_rank*.jsonl")) if cfg.save else [])


# In --save: the logs outside --save that the run writes (its --metrics-file), as a JSON list of
# resolved paths; a requeue that finds no checkpoint yet may trim those, and no other run's.
CLAIMED_LOGS_FILE = "run_logs.json"


def _outside_logs(cfg: TrainConfig) -> list[Path]:
    from megatron_renio.models.checkpoint import is_within

    return [path.resolve() for path in log_files(cfg) if not (cfg.save and is_within(path, cfg.save))]


def claim_logs(cfg: TrainConfig) -> None:
    """Record in ``--save`` (:data:`CLAIMED_LOGS_FILE`) the run's logs outside it, at the start of a run
    that resumes nothing (with no ``--save`` nothing is recorded)."""
    if cfg.save:
        Path(cfg.save).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(cfg.save) / CLAIMED_LOGS_FILE, [json.dumps([str(p) for p in _outside_logs(cfg)]) + "\n"])


def _claimed_logs(cfg: TrainConfig) -> set[Path]:
    path = Path(cfg.save) / CLAIMED_LOGS_FILE if cfg.save else None
    if path is None or not path.is_file():
        return set()
    try:
        claimed = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(claimed, list) and all(isinstance(p, str) for p in claimed)):
            raise ValueError("not a list of paths")
    except OSError as e:
        raise UserInputError(f"{path}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise UserInputError(f"{path}: not this trainer's record of the run's logs ({e}); remove it to go on") from None
    return {Path(p) for p in claimed}


def check_new_run_logs(cfg: TrainConfig, requeued: bool = False) -> None:
    """A run that resumes nothing must not append to an earlier run's JSONL files: one line for a
    non-empty one, except the files inside ``--save`` with ``--override-save`` (the run starts that
    folder over: they are emptied), and with ``requeued`` (a ``--load`` that found no checkpoint yet:
    an earlier attempt of this run may have logged steps before its first save, which it drops) the
    files inside ``--save`` and those its :data:`CLAIMED_LOGS_FILE` names."""
    from megatron_renio.models.checkpoint import is_within

    metrics = metrics_path(cfg)
    claimed = _claimed_logs(cfg) if requeued else set()
    for path in log_files(cfg):
        if not path.is_file() or path.stat().st_size == 0:
            continue
        in_save = bool(cfg.save) and is_within(path, cfg.save)
        if (in_save and (cfg.override_save or requeued)) or path.resolve() in claimed:
            continue
        choose = f"remove it or choose another {'--metrics-file' if path == metrics else '--save'}"
        if in_save:
            raise UserInputError(f"{path} holds records of an earlier run; pass --load {cfg.save} to continue that "
                                 f"run, or {choose}, or pass --override-save to start the --save folder over")
        raise UserInputError(f"{path} holds records of an earlier run; {choose}")


def save_samples(path: Path, iteration: int, dp_rank: int, records: list[int], completions: list[list[int]],
                  per_sample: dict, tokenizer, prompts, cfg: TrainConfig) -> None:
    """Append this rank's samples of step ``iteration`` to ``path``, one JSON object per completion:
    step, rank (DP), index (row in this rank's batch, in micro-batch order), prompt_index (``records[index]``: the
    prompt's place among the kept prompts of ``--data-path``, after the too-long filter), source (its record's
    ``<file>:<line>``, :class:`~megatron_renio.training.components.PromptSet`), completion (text), completion_ids (EOS included when
    generated), num_tokens, weight (the ReNIO weight applied, 1 without ``--renio``), raw_weight
    (exp(a_i / gamma) before normalisation), sample_loss (L_i); with ``--task math`` and an answer in
    the record also answer and correct (:func:`~megatron_renio.eval.math_grader.grade_math`). The
    fields read by ``megatron-renio analyze`` (completion, correct, weight, num_tokens) have its names."""
    from megatron_renio.eval.math_grader import grade_math

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row, (prompt_index, ids) in enumerate(zip(records, completions)):
            text = tokenizer.decode(ids)
            record = {
                "step": iteration, "rank": dp_rank, "index": row, "prompt_index": prompt_index,
                "source": prompts.sources[prompt_index], "completion": text, "completion_ids": ids, "num_tokens": len(ids),
                "weight": float(per_sample["weights"][row]), "raw_weight": float(per_sample["raw_weights"][row]),
                "sample_loss": float(per_sample["per_sample_loss"][row]),
            }
            answer = prompts.answers[prompt_index]
            if cfg.task == "math" and answer is not None:
                record.update(answer=answer, correct=grade_math(text, answer))
            f.write(json.dumps(standard_json(record)) + "\n")
