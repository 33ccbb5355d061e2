"""torchrun worker (2 ranks): initialize() compares config fingerprints across ranks; on_rank0 hands
rank 0's result or error to both ranks; raise_if_any_rank raises on both when one rank holds an error;
a folder each rank resolves on its own storage (relative to a per-rank working folder) is refused."""

import contextlib
import errno
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

from megatron_renio import distributed, train
from megatron_renio.data.arithmetic_task import build_char_tokenizer, make_splits, write_jsonl
from megatron_renio.config import TrainConfig
from megatron_renio.distributed import ParallelConfig, fingerprint
from megatron_renio.errors import UserInputError
from megatron_renio.output_paths import check_every_rank_sees, check_shared_folder
from megatron_renio.training import run_logs
from tests.torchrun_harness import save_rank_result


def main(out_dir):
    rank = int(os.environ["RANK"])
    parallel = ParallelConfig()
    result = {}
    ctx = distributed.initialize(parallel, config_fingerprint=fingerprint(parallel, {"lr": 1.0}))
    result["agree"] = "ok"
    result["dp_size"], result["device"] = ctx.dp_size, ctx.device.type
    result["on_rank0"] = distributed.on_rank0(lambda: {"rank": rank})  # rank 0's value on both ranks

    def described(e):  # what was raised, and the rank it names as the one that reports it
        return f"{type(e).__name__}: {e}" + ("" if getattr(e, "reported_by", None) is None else
                                             f" [reported by {e.reported_by}]")

    def fails(error):
        def fn():
            raise error
        return fn

    for name, error in (("user_error", UserInputError("bad flag")), ("crash", ZeroDivisionError("division by zero"))):
        try:
            distributed.on_rank0(fails(error))
            result[name] = "no error"
        except (UserInputError, RuntimeError, ZeroDivisionError) as e:
            result[name] = described(e)
    for name, error in (("none_fails", None), ("rank1_fails", UserInputError("disk full") if rank == 1 else None),
                        ("rank1_crashes", OSError("no space") if rank == 1 else None)):
        try:
            distributed.raise_if_any_rank(error)
            result[name] = "no error"
        except (UserInputError, RuntimeError, OSError) as e:
            result[name] = described(e)
    # one shared folder, then folders that each rank finds under its own working folder (node-local storage)
    shared = Path(out_dir) / "shared_run"
    outcomes = []
    def read_only_on_rank1():  # as a node that mounts the shared folder read-only (root ignores chmod)
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        with mock.patch.object(tempfile, "mkdtemp", refuse) if rank == 1 else contextlib.nullcontext():
            check_shared_folder(shared / "save", "--save shared")

    def stale_on_rank1():  # a stale network-file handle: stat raises instead of answering
        def stale(self):
            raise OSError(errno.ESTALE, "Stale file handle")

        with mock.patch.object(Path, "exists", stale) if rank == 1 else contextlib.nullcontext():
            check_every_rank_sees(shared, "--load shared")

    for label, check in (("shared", lambda: check_shared_folder(shared / "save", "--save shared")),
                         ("read_only", read_only_on_rank1), ("stale", stale_on_rank1),
                         ("local", lambda: check_shared_folder("run/save", "--save run/save")),
                         ("seen", lambda: check_every_rank_sees(shared, "--load shared")),
                         ("unseen", lambda: check_every_rank_sees("run/train_state.pt", "--load run"))):
        if label == "shared":
            shared.mkdir(exist_ok=True)
        if label == "local":
            node = Path(out_dir) / f"node{rank}"
            (node / "run").mkdir(parents=True)
            if rank == 0:  # a checkpoint file that only rank 0's storage holds
                (node / "run" / "train_state.pt").touch()
            os.chdir(node)
        try:
            check()
            outcomes.append((label, "ok"))
        except UserInputError as e:
            outcomes.append((label, str(e)))
    result["shared_folders"], result["shared_dir"] = outcomes, str(shared.absolute())
    result["probes_left"] = sorted(p.name for p in Path(out_dir).rglob(".write-check-*"))
    try:
        distributed.initialize(parallel, config_fingerprint=fingerprint(parallel, {"lr": 1.0 + rank}))
        result["disagree"] = "no error"
    except UserInputError as e:
        result["disagree"] = str(e)
    # the trainer with a relative --save that each rank resolves in its own working folder (node-local
    # storage): refused at start-up on both ranks, before any model is built
    data, tokenizer = Path(out_dir, "train.jsonl").absolute(), Path(out_dir, "tok").absolute()
    if rank == 0:
        write_jsonl(str(data), make_splits(0, 8, 0)[0])
        build_char_tokenizer(str(tokenizer))
        # a run folder to resume that only rank 0's storage holds
        resume = Path(out_dir, "node0", "resume")
        (resume / "iter_0000001").mkdir(parents=True)
        torch.save({"iteration": 1}, resume / "iter_0000001" / "train_state.pt")
        (resume / "latest_checkpointed_iteration.txt").write_text("1\n")
    torch.distributed.barrier()

    def train_refusal(*flags):
        try:
            train.run(train.parse_train_args(["--model", "tiny-qwen3", "--tokenizer", str(tokenizer), "--data-path",
                                              str(data), "--mode", "opsd", "--global-batch-size", "2",
                                              "--micro-batch-size", "1", *flags]))
            return "no error"
        except UserInputError as e:
            return str(e)

    # a resume's log trimming: rank 0 alone rewrites the logs, and a log it cannot read stops both ranks
    logs = Path(out_dir, "logs_run").absolute()
    if rank == 0:
        logs.mkdir()
        (logs / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": 2, "x": "\xff"}\n')
    torch.distributed.barrier()
    try:
        run_logs.drop_repeated_steps(TrainConfig(save=str(logs)), 1)
        result["log_trimming"] = "no error"
    except UserInputError as e:
        result["log_trimming"] = described(e)
    result["train_node_local_save"] = train_refusal("--save", "run/opd")
    result["train_node_local_load"] = train_refusal("--load", "resume")
    # data files each rank reads from its own storage (the working folder is node<rank>): other
    # prompts on rank 1, then a file only rank 0 has
    write_jsonl("prompts.jsonl", make_splits(rank, 8, 0)[0])
    if rank == 0:
        write_jsonl("only0.jsonl", make_splits(0, 8, 0)[0])
    torch.distributed.barrier()
    result["train_other_data"] = train_refusal("--data-path", "prompts.jsonl")
    result["train_data_missing_on_rank1"] = train_refusal("--data-path", "only0.jsonl")
    # same_on_every_rank itself: a value that differs, an error on rank 1 only
    try:
        distributed.same_on_every_rank(lambda: rank, str, "the rank", "a remedy")
        result["same_differs"] = "no error"
    except UserInputError as e:
        result["same_differs"] = described(e)
    try:
        distributed.same_on_every_rank(fails(UserInputError("no such file")) if rank == 1 else lambda: 7, str,
                                       "the data", "a remedy")
        result["same_fails"] = "no error"
    except UserInputError as e:
        result["same_fails"] = described(e)
    save_rank_result(out_dir, result)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
