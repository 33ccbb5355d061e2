"""An evaluation's graded generations kept on disk as they are made, so that the same evaluation run
again after a crash (an out-of-memory kill, a lost node, a job's time limit) generates only what is
missing.

The folder is ``.<name>.eval-progress`` beside the evaluation's first output (``--out``, else
``--summary``). It holds ``key``, a digest of everything the generations and grades depend on
(model, tokenizer stop ids, sampling, seed, lengths, benchmark items, prompts, the package version),
and one file per data-parallel replica, ``replica-<dp rank>.jsonl``, to which the replica's grader
appends one JSON line per generation (``{"index": <job index>, "record": <its output record>}``)
after every batch, flushed to stable storage (:class:`ReplicaLog`).

At start-up global rank 0 reads the folder (:func:`read_finished`): with the same key, the records
of every replica file are the finished jobs (a replica may have had another data-parallel rank, and
a line cut short by the crash is skipped); with another key, or none, the folder is emptied and
given this run's key (:func:`start_over`). Every rank learns the finished job indices, so each
replica skips the batches whose jobs are all finished (the sampling noise is keyed by a job's place
in the order, so what is generated again or after is what one uninterrupted run gives). Rank 0
removes the folder once the outputs are written, if it still holds this run's key (another
evaluation to the same output may have taken it over). The folder must be on storage every grader
writes and rank 0 reads (as ``--save`` is for training): a grader that does not see rank 0's key
there keeps no file, and a rerun generates its jobs again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_renio.output_paths import fsync, write_atomic

KEY_FILE = "key"


def progress_folder(output: str | Path) -> Path:
    """The progress folder of an evaluation whose first output is ``output``."""
    output = Path(output).absolute()
    return output.parent / f".{output.name}.eval-progress"


def holds_key(folder: Path, key: str) -> bool:
    """Whether ``folder`` holds (and this process sees) an evaluation of ``key``."""
    key_file = folder / KEY_FILE
    return key_file.is_file() and key_file.read_text(encoding="utf-8", errors="replace").strip() == key


def read_finished(folder: Path, key: str) -> dict[int, dict] | None:
    """The records in ``folder`` by job index when its key is ``key`` (lines that are not an index and a
    record, such as one cut short by a crash, are skipped); None when the folder holds another key, none,
    or an unreadable one."""
    if not holds_key(folder, key):
        return None
    finished = {}
    for path in sorted(folder.glob("replica-*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                if isinstance(entry["record"], dict):
                    finished[int(entry["index"])] = entry["record"]
            except (ValueError, KeyError, TypeError):
                continue
    return finished


def start_over(folder: Path, key: str) -> None:
    """Empty ``folder`` (made if missing) and give it ``key``, written last: a crash in between leaves a
    folder without a key, which the next run empties again."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_atomic(str(folder / KEY_FILE), [key + "\n"])


def _ends_mid_line(path: Path) -> bool:
    """Whether the file at ``path`` exists and its last byte is not a newline."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class ReplicaLog:
    """The grader's file of one replica: :meth:`append` adds a batch's records, on stable storage when
    it returns. ``resumed`` False: the file is started empty (a line from an earlier evaluation on a
    node whose storage rank 0 does not see must not be read later)."""

    def __init__(self, folder: Path, dp_rank: int, resumed: bool):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"replica-{dp_rank:05d}.jsonl"
        cut_short = resumed and _ends_mid_line(self.path)
        self._file = open(self.path, "a" if resumed else "w", encoding="utf-8")
        fsync(folder)  # the file's entry: without it a power loss could drop the whole file
        if cut_short:
            self._file.write("\n")  # end the line a crash cut short, so that the next one parses

    def append(self, records: list[tuple[int, dict]]) -> None:
        self._file.writelines(json.dumps({"index": i, "record": r}, ensure_ascii=False) + "\n" for i, r in records)
        self._file.flush()
        os.fsync(self._file.fileno())  # by descriptor: the folder may be gone (another eval to the same output)

    def close(self) -> None:
        self._file.close()
