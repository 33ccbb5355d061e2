"""Prompt datasets: reading prompt records from JSONL / parquet, and the per-rank prompt order.

Files
-----
:func:`load_prompt_records` reads one or more files, in the order given, and returns one
:class:`PromptRecord` per row. Accepted formats, chosen by extension:

* ``.jsonl`` and ``.jsonl.gz``: one JSON object per line, UTF-8; blank lines are skipped; line
  numbers in messages and in ``PromptRecord.source`` are 1-based physical line numbers.
* ``.parquet``: one row per record (read with ``pyarrow``); row numbers are 1-based.

(:func:`megatron_renio.data.records.read_rows` reads the files.)

Each row must hold a non-empty string under ``problem_field``. ``solution_field`` is optional
unless ``require_solution`` (OPSD needs a reference solution for the teacher's privileged prompt);
a present solution must be a string. ``answer_field`` is optional; a present answer must be a
string or a finite number, kept as its text (blank or NaN: no answer). Every violation raises
:class:`~megatron_renio.errors.UserInputError` with one line naming the file, the line (or row) and
the field; a missing field's message also names the flag that chooses another field
(``--problem-field``, ``--solution-field``: the trainer's and ``sft``'s flag names).

Order
-----
:class:`PromptSampler` gives every data-parallel rank its share of each global batch of prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Sequence

import torch

from megatron_renio.data.records import read_rows
from megatron_renio.errors import UserInputError
from megatron_renio.eval.math_grader import number_answer

_EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet")


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt: the problem text, its reference solution and final answer when known.

    ``source`` is ``"<file>:<line>"`` (``"<file>:<row>"`` for parquet), for messages and logs.
    """

    problem: str
    solution: str | None
    answer: str | None
    source: str


def load_prompt_records(
    paths: Sequence[str] | str,
    problem_field: str = "problem",
    solution_field: str = "solution",
    answer_field: str | None = "answer",
    *,
    require_solution: bool = False,
) -> list[PromptRecord]:
    """Read prompt records from every file in ``paths`` (JSONL, JSONL.gz or parquet), in order;
    ``answer_field`` None: answers are not read (each record's is None).

    Raises :class:`UserInputError` for: no files given, a missing file, an unknown extension, a
    malformed JSON line or non-object row (file and line), a row without ``problem_field`` or, when
    ``require_solution``, without ``solution_field`` (field, file and line, and the flag that names
    another field), an empty problem or required solution, an infinite number as answer (file, line
    and field), a field of the wrong type, and a file with no records.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UserInputError("no prompt data files given")
    records: list[PromptRecord] = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise UserInputError(f"prompt data file {path} not found")
        if not os.path.isfile(path):
            raise UserInputError(f"prompt data path {path} is not a file")
        count = 0
        columns = tuple(name for name in (problem_field, solution_field, answer_field) if name is not None)
        for row in read_rows(path, _EXTENSIONS, parquet_columns=columns):
            records.append(
                PromptRecord(
                    problem=_text_field(row.fields, problem_field, "--problem-field", row.where, required=True),
                    solution=_text_field(row.fields, solution_field, "--solution-field", row.where,
                                         required=require_solution),
                    answer=None if answer_field is None else _answer_field(row.fields, answer_field, row.where),
                    source=f"{path}:{row.number}",
                )
            )
            count += 1
        if count == 0:
            raise UserInputError(f"prompt data file {path} is empty (no records)")
    return records


def _text_field(row: dict[str, Any], field: str, flag: str, where: str, required: bool) -> str | None:
    """``row``'s text under ``field`` (the value of ``flag``), None when absent and not ``required``."""
    value = row.get(field)
    if value is None:
        if required:
            # null: a JSON null, or a parquet column's missing value
            message = f"field '{field}' is null" if field in row else f"missing field '{field}'"
            raise UserInputError(f"{where}: {message} (name another field with {flag})")
        return None
    if not isinstance(value, str):
        raise UserInputError(
            f"{where}: field '{field}' must be a string, got {type(value).__name__}"
        )
    if required and not value.strip():
        raise UserInputError(f"{where}: field '{field}' is empty")
    return value


def _answer_field(row: dict[str, Any], field: str, where: str) -> str | None:
    """``row``'s answer under ``field`` as text (a number as
    :func:`~megatron_renio.eval.math_grader.number_answer` writes it); None when absent, blank or NaN
    (no answer: its samples are not graded)."""
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserInputError(
            f"{where}: field '{field}' must be a string or a number, got {type(value).__name__}"
        )
    if isinstance(value, float) and math.isnan(value):  # JSON's NaN, or a float column's missing value in a pandas-written parquet
        return None
    if isinstance(value, float) and math.isinf(value):
        raise UserInputError(f"{where}: field '{field}' must be a finite number, got {value}")
    text = number_answer(value)
    return text if text.strip() else None


class PromptSampler:
    """Deterministic, resumable order of prompt indices, split across data-parallel ranks.

    Every epoch is a fresh permutation of ``range(num_records)`` drawn with a ``torch.Generator``
    seeded from ``(seed, epoch)``, so all ranks compute the same global order without
    communicating. Each call of :meth:`next_batch` takes the next ``global_batch_prompts`` indices
    of the permutation (the global batch) and returns this rank's contiguous share: rank ``r`` gets
    positions ``[r * k, (r + 1) * k)`` of the global batch, ``k = global_batch_prompts / dp_size``.

    A global batch never spans two epochs: the last ``num_records % global_batch_prompts`` indices
    of each permutation are skipped (different ones each epoch, since each epoch is reshuffled).

    The state is ``(epoch, position)``, ``position`` counting prompts already taken from the
    current epoch's permutation. It does not depend on the rank or ``dp_size``, so a run may resume
    with another data-parallel size and the same global order.
    """

    def __init__(
        self, num_records: int, global_batch_prompts: int, dp_rank: int, dp_size: int, seed: int,
        batch_label: str | None = None, data_label: str | None = None, data_fingerprint: str | None = None,
    ):
        """``batch_label`` names ``global_batch_prompts`` in errors by the flags it comes from (default
        ``--global-batch-size N``), ``data_label`` what ``num_records`` counts (default ``the prompt
        data holds N prompts``); ``data_fingerprint`` identifies the records (a hash of their ids), so
        that a state saved for other records of the same count is refused."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"invalid data-parallel rank {dp_rank} of size {dp_size}")
        label = batch_label or f"--global-batch-size {global_batch_prompts}"
        if global_batch_prompts < 1:
            raise UserInputError(f"{label} must be positive")
        if global_batch_prompts % dp_size != 0:
            raise UserInputError(f"{label} is not divisible by the data-parallel size {dp_size}")
        self.data_label = data_label or f"the prompt data holds {num_records} prompts"
        if num_records < global_batch_prompts:
            raise UserInputError(f"{self.data_label}, fewer than {label}")
        self.num_records = num_records
        self.global_batch_prompts = global_batch_prompts
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.data_fingerprint = data_fingerprint
        self._epoch = 0
        self._position = 0
        self._order: list[int] | None = None  # permutation of the current epoch, built lazily

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Prompts of the current epoch's permutation already handed out."""
        return self._position

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one epoch (the remainder of each permutation is skipped)."""
        return self.num_records // self.global_batch_prompts

    def next_batch(self) -> list[int]:
        """This rank's indices of the next global batch: ``global_batch_prompts / dp_size`` ids."""
        if self._position + self.global_batch_prompts > self.num_records:
            self._epoch += 1
            self._position = 0
            self._order = None
        if self._order is None:
            self._order = self._permutation(self._epoch)
        share = self.global_batch_prompts // self.dp_size
        start = self._position + self.dp_rank * share
        self._position += self.global_batch_prompts
        return self._order[start : start + share]

    def _permutation(self, epoch: int) -> list[int]:
        digest = hashlib.sha256(f"prompt-sampler:{self.seed}:{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.randperm(self.num_records, generator=generator).tolist()

    def state_dict(self) -> dict:
        """The resumable state, plus the dataset size, seed and data fingerprint it is valid for."""
        state = {"epoch": self._epoch, "position": self._position, "num_records": self.num_records, "seed": self.seed}
        if self.data_fingerprint is not None:
            state["data_fingerprint"] = self.data_fingerprint
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, possibly of another rank or DP size).

        Raises :class:`UserInputError` when the state was saved for another dataset (size, or
        fingerprint where both have one) or seed: resuming would then silently follow a different order.
        """
        if state["num_records"] != self.num_records:
            raise UserInputError(
                f"the checkpoint's prompt sampler was saved for {state['num_records']} prompts, "
                f"but {self.data_label}: resume with the run's data and --seq-length"
            )
        saved = state.get("data_fingerprint")
        if saved is not None and self.data_fingerprint is not None and saved != self.data_fingerprint:
            raise UserInputError(
                f"the checkpoint's prompt sampler was saved for other prompts ({self.num_records} of them too: "
                "other files, another order or other text, or another tokenizer or template); resume with the "
                "run's data, or start a new run from one of its checkpoints with --student-load"
            )
        if state["seed"] != self.seed:
            raise UserInputError(
                f"the checkpoint's prompt sampler was saved with seed {state['seed']}, "
                f"but the seed is now {self.seed}"
            )
        if not 0 <= state["position"] <= self.num_records or state["epoch"] < 0:
            raise UserInputError(
                f"invalid prompt sampler state in checkpoint: epoch {state['epoch']}, "
                f"position {state['position']}"
            )
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._order = None
