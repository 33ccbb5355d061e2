"""The W&B run of a requeued or resumed training run (megatron_renio/training/run_logs.py).

wandb is not a dependency and is not installed here: a stand-in module records what ``wandb.init``
is given, which is what decides whether a restarted run goes on in the W&B run of its earlier attempt.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest

from megatron_renio.config import TrainConfig
from megatron_renio.errors import UserInputError
from megatron_renio.training import run_logs


@pytest.fixture
def wandb_inits(monkeypatch):
    """The keyword arguments of every ``wandb.init`` call, through a stand-in wandb module on rank 0."""
    calls = []

    class Run:
        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    def init(**kwargs):
        calls.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setattr(run_logs.torch.distributed, "get_rank", lambda: 0)
    return calls


def open_logger(cfg: TrainConfig, **kwargs) -> None:
    run_logs.MetricsLogger(cfg, **kwargs).close()


def test_a_restarted_run_logs_to_the_w_and_b_run_of_its_first_attempt(wandb_inits, tmp_path):
    cfg = dataclasses.replace(TrainConfig(), save=str(tmp_path / "run"), wandb_project="p")
    open_logger(cfg)  # a new run
    open_logger(cfg, resumed_at=40)  # requeued: resumes from its checkpoint
    open_logger(cfg, resumed_at=0)  # requeued before its first checkpoint
    first, resumed, requeued = (call["id"] for call in wandb_inits)
    assert first == resumed == requeued and len(first) == 16
    assert (tmp_path / "run" / run_logs.WANDB_RUN_ID_FILE).read_text() == first + "\n"
    assert all(call["resume"] == "allow" and call["project"] == "p" for call in wandb_inits)


def test_a_new_or_replacing_run_starts_a_new_w_and_b_run(wandb_inits, tmp_path):
    cfg = dataclasses.replace(TrainConfig(), save=str(tmp_path / "run"), wandb_project="p")
    open_logger(cfg)
    open_logger(cfg)  # not a restart: another run in the same folder
    open_logger(cfg, resumed_at=0, replaces_run=True)  # --override-save over an earlier run
    ids = [call["id"] for call in wandb_inits]
    assert len(set(ids)) == 3
    assert (tmp_path / "run" / run_logs.WANDB_RUN_ID_FILE).read_text() == ids[-1] + "\n"
    open_logger(dataclasses.replace(cfg, save=None, metrics_file=str(tmp_path / "m.jsonl")), resumed_at=3)
    assert wandb_inits[-1]["id"] is None  # no --save to keep an id in: W&B picks one


def test_a_damaged_or_unwritable_run_id_file_is_one_line(wandb_inits, tmp_path):
    cfg = dataclasses.replace(TrainConfig(), save=str(tmp_path / "run"), wandb_project="p")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / run_logs.WANDB_RUN_ID_FILE).write_text("not an id\n")
    with pytest.raises(UserInputError, match=r"wandb_run_id: not a W&B run id \('not an id'\); delete the file"):
        open_logger(cfg, resumed_at=5)
    (tmp_path / "run" / run_logs.WANDB_RUN_ID_FILE).unlink()
    (tmp_path / "run" / run_logs.WANDB_RUN_ID_FILE).mkdir()  # where the id would go, a folder: it cannot be written
    # the rename of the written id onto the folder fails: the line names the written file
    with pytest.raises(UserInputError,
                       match=r"/\.?wandb_run_id(\.partial-\w+)?: cannot read or write the W&B run id \(\w"):
        open_logger(cfg)
    assert wandb_inits == []


def test_a_w_and_b_run_that_does_not_start_is_one_line(monkeypatch, tmp_path):
    """Rank 0 alone starts W&B; its failure is one line that every rank raises (raise_if_any_rank), not
    rank 0's traceback while the other ranks go on to their next collective."""
    class UsageError(Exception):
        pass

    def init(**kwargs):
        raise UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore details")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setattr(run_logs.torch.distributed, "get_rank", lambda: 0)
    cfg = dataclasses.replace(TrainConfig(), save=str(tmp_path / "run"), wandb_project="p")
    with pytest.raises(UserInputError, match=r"^--wandb-project p: W&B did not start \(UsageError: api_key not "
                                             r"configured \(no-tty\)\. call wandb\.login\(key=\[your_api_key\]\)\); log "
                                             r"in \(wandb login, WANDB_API_KEY\), or set WANDB_MODE=offline where the "
                                             r"nodes have no network$"):
        open_logger(cfg)
