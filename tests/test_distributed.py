"""Distributed start-up: layout validation, the rendezvous of a single process, cross-rank config agreement."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from megatron_renio.distributed import ParallelConfig, fingerprint
from megatron_renio.errors import UserInputError
from megatron_renio.models.builder import check_divisibility
from megatron_renio.models.presets import get_preset
from tests.torchrun_harness import REPO_ROOT, run_torchrun, torchrun_args


def test_world_size_must_be_divisible_by_tp_times_pp():
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert parallel.data_parallel_size(8) == 2
    with pytest.raises(UserInputError, match=r"world size 6 is not divisible .*tensor-model-parallel-size 2.* = 4"):
        parallel.data_parallel_size(6)


@pytest.mark.parametrize(
    "tp, what",
    [(4, "attention heads"), (3, "query groups")],
)
def test_tp_must_divide_heads_and_groups(tp, what):
    preset = get_preset("tiny-qwen3-wide")  # 6 heads, 2 query groups
    check_divisibility(preset, ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(UserInputError, match=f"--tensor-model-parallel-size {tp} does not divide the model's {what}"):
        check_divisibility(preset, ParallelConfig(tensor_model_parallel_size=tp))


def test_tp_must_divide_ffn_and_pp_the_layers():
    preset = get_preset("tiny-qwen3").replace(num_attention_heads=4, num_query_groups=4, ffn_hidden_size=130)
    with pytest.raises(UserInputError, match="FFN hidden size"):
        check_divisibility(preset, ParallelConfig(tensor_model_parallel_size=4))
    with pytest.raises(UserInputError, match="does not divide the model's 2 layers"):
        check_divisibility(preset, ParallelConfig(pipeline_model_parallel_size=4))
    with pytest.raises(UserInputError, match="^--pipeline-model-parallel-size 4 does not divide the teacher's 2 layers$"):
        check_divisibility(preset, ParallelConfig(pipeline_model_parallel_size=4), "teacher")


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_parallel_sizes_are_validated(bad):
    with pytest.raises(UserInputError, match="--tensor-model-parallel-size must be an integer >= 1"):
        ParallelConfig(tensor_model_parallel_size=bad).validate()
    with pytest.raises(UserInputError, match="--sequence-parallel"):
        ParallelConfig(sequence_parallel=True).validate()


def test_fingerprint_is_stable_and_sensitive():
    a = ParallelConfig(tensor_model_parallel_size=2)
    assert fingerprint(a, {"lr": 1e-5}) == fingerprint(ParallelConfig(tensor_model_parallel_size=2), {"lr": 1e-5})
    assert fingerprint(a, {"lr": 1e-5}) != fingerprint(a, {"lr": 2e-5})


def test_ranks_that_disagree_get_one_line_error(tmp_path):
    results = run_torchrun(REPO_ROOT / "tests" / "workers" / "config_agreement_worker.py", 2, tmp_path)
    for r in results:
        assert r["agree"] == "ok"
        assert r["disagree"].startswith("ranks disagree on the configuration: rank 1 differs from rank 0")
        assert "\n" not in r["disagree"]
        assert r["dp_size"] == 2 and r["device"] == "cpu"
    # same_on_every_rank: a result that differs is refused on every rank, naming the first odd rank;
    # an error of one rank is raised on every rank (a copy reported by it)
    # (every rank finds that one alike: rank 1 raises it as rank 0's, which prints it)
    assert [r["same_differs"] for r in results] == [
        "UserInputError: ranks disagree on the rank: rank 1 differs from rank 0 (a remedy)",
        "UserInputError: ranks disagree on the rank: rank 1 differs from rank 0 (a remedy) [reported by 0]"]
    assert [r["same_fails"] for r in results] == ["UserInputError: no such file [reported by 1]",
                                                  "UserInputError: no such file"]
    # the trainer's data: other prompts on rank 1, or a file rank 1 does not have, stop both ranks
    assert [r["train_other_data"] for r in results] == [
        "ranks disagree on the tokenised prompts of --data-path: rank 1 differs from rank 0 "
        "(every rank must read the same files with the same tokenizer)"] * 2
    assert [r["train_data_missing_on_rank1"] for r in results] == ["prompt data file only0.jsonl not found"] * 2
    # on_rank0: rank 0's value everywhere; its error raised on rank 0 as it is, on the others as one line
    assert [r["on_rank0"] for r in results] == [{"rank": 0}, {"rank": 0}]
    # (a copy names the rank that reports the error: entry points print it there and on rank 0 only)
    assert [r["user_error"] for r in results] == ["UserInputError: bad flag", "UserInputError: bad flag [reported by 0]"]
    assert [r["crash"] for r in results] == [
        "ZeroDivisionError: division by zero",
        "RankFailure: rank 0 failed: ZeroDivisionError: division by zero [reported by 0]"]
    # raise_if_any_rank: the failing rank raises its own error, every other rank a copy reported by it
    assert [r["none_fails"] for r in results] == ["no error"] * 2
    assert [r["rank1_fails"] for r in results] == ["UserInputError: disk full [reported by 1]", "UserInputError: disk full"]
    assert [r["rank1_crashes"] for r in results] == ["RankFailure: rank 1 failed: OSError: no space [reported by 1]",
                                                     "OSError: no space"]
    # run folders: one shared folder passes; folders each rank resolves on its own are refused on both
    # ranks, naming rank 1 (which does not see what rank 0 does), and no probe file is left behind
    for r in results:
        outcomes = dict(r["shared_folders"])
        assert outcomes["shared"] == outcomes["seen"] == "ok"
        assert outcomes["read_only"] == f"--save shared: cannot write in {r['shared_dir']} (Read-only file system)"
        assert outcomes["stale"].startswith("--load shared: rank 1 (host ")
        assert f") cannot read (Stale file handle) {r['shared_dir']}, which rank 0 sees" in outcomes["stale"]
        for label, flag in (("local", "--save run/save"), ("unseen", "--load run")):
            assert outcomes[label].startswith(f"{flag}: rank 1 (host "), outcomes[label]
            assert outcomes[label].endswith("every rank must reach it on one filesystem that all nodes share")
        assert r["probes_left"] == []
    # a resume's log trimming runs on rank 0 only: its unreadable log stops rank 1 with rank 0's line
    line = results[0]["log_trimming"]
    assert line.startswith("UserInputError: ") and "metrics.jsonl: line 2 is not UTF-8 text" in line, line
    assert [r["log_trimming"] for r in results] == [line, line + " [reported by 0]"]
    # the trainer acts on it: a --save that rank 1 resolves elsewhere, or a run to resume that only rank
    # 0's storage holds, is refused on both ranks before any model is built
    for r in results:
        assert r["train_node_local_save"].startswith("--save run/opd: rank 1 (host "), r["train_node_local_save"]
        assert r["train_node_local_load"].startswith("--load resume: rank 1 (host "), r["train_node_local_load"]
        assert r["train_node_local_load"].split(") ", 1)[1].startswith(
            "does not see resume/iter_0000001/train_state.pt, which rank 0 sees")


def _start(env: dict, code: str) -> subprocess.CompletedProcess:
    """``code`` after ``from megatron_renio import ...`` in a fresh interpreter with ``env`` added."""
    prefix = "from megatron_renio import cpu_backend, distributed, entrypoint\nimport torch\n"
    return subprocess.run([sys.executable, "-c", prefix + code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})


def test_one_process_ignores_launcher_variables_of_the_shell():
    """A world of one rendezvouses on a private port even when the shell exports MASTER_ADDR (some
    clusters do) without MASTER_PORT; before, that was a traceback."""
    out = _start({"MASTER_ADDR": "10.255.255.1", "WORLD_SIZE": "1"},
                 "ctx = distributed.initialize(distributed.ParallelConfig(), seed=0)\n"
                 "print('ok', ctx.world_size)\ndistributed.destroy()\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["ok", "1"]


def test_one_process_under_torchrun(tmp_path):
    """torchrun --nproc-per-node 1 (its worker may only connect to the agent's store): starts at once."""
    script = tmp_path / "one.py"
    script.write_text("from megatron_renio import distributed\n"
                      "ctx = distributed.initialize(distributed.ParallelConfig(), seed=0, timeout_minutes=0.5)\n"
                      "print('ok', ctx.world_size, ctx.dp_size)\ndistributed.destroy()\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", str(script)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["ok", "1", "1"]


def test_a_rank_on_another_backend_is_one_line_not_a_hang(tmp_path):
    """A node that sees no GPU joins on gloo while the others use NCCL: refused at the rendezvous with one
    line naming both (it would hang until the timeout). Rank 1 is told it has a GPU here."""
    script = tmp_path / "mixed.py"
    script.write_text(
        "import os, torch\nfrom megatron_renio import distributed, entrypoint\n"
        "if os.environ['RANK'] == '1':\n"
        "    distributed.select_backend = lambda local_rank=0: ('nccl', torch.device('cpu'))\n"
        "raise SystemExit(entrypoint.run_command(lambda argv: None, lambda _: distributed.initialize("
        "distributed.ParallelConfig(), timeout_minutes=2), []))\n")
    started = time.monotonic()
    out = subprocess.run([sys.executable, *torchrun_args(2), str(script)], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode != 0 and time.monotonic() - started < 60
    assert ("error (rank 1): rank 1 runs on a GPU (NCCL), rank 0 on the CPU (gloo: no GPU visible): every rank needs a GPU, "
            "or none does (check this node's CUDA_VISIBLE_DEVICES and driver)") in out.stderr


_FAILS_BEFORE_THE_GROUPS = (
    "import os, sys\nfrom megatron_renio import distributed, entrypoint\nfrom megatron_renio.errors import UserInputError\n"
    "def parse(argv):\n"
    "    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')  # FAILING_ATTEMPTS: torchrun's attempts that fail\n"
    "    if os.environ['RANK'] == os.environ['FAILING_RANK'] and attempt in os.environ.get('FAILING_ATTEMPTS', attempt):\n"
    "        raise (UserInputError if os.environ['FAILURE'] == 'flag' else RuntimeError)('argument --lr: not a number')\n"
    "def start(_):\n"
    "    distributed.initialize(distributed.ParallelConfig(), timeout_minutes=10)\n"
    "if os.environ.get('ROUNDS') == '2':  # a first start that succeeds (run_command destroys the groups after it)\n"
    "    assert entrypoint.run_command(lambda argv: None, start, []) == 0\n"
    "raise SystemExit(entrypoint.run_command(parse, start, []))\n"
)


@pytest.mark.parametrize("launch, failing_rank, failure", [
    ("two_nodes", 1, "flag"), pytest.param("two_nodes", 0, "bug", marks=pytest.mark.slow), ("without_torchrun", 0, "bug")])
def test_a_rank_failing_before_the_process_groups_stops_every_node(tmp_path, launch, failing_rank, failure):
    """One node's rank fails before the process groups exist (a flag, a config file only that node
    lacks): the other node's rank, which torchrun does not stop, stops within seconds with one line
    naming the rank, not at the 10-minute timeout. Two torchrun agents of one process each joining one
    c10d rendezvous, as two nodes do; and two plain processes whose rank 0 hosts the store and leaves
    only after the other has read its error, in their second start (each start has its own keys). The
    failing rank's traceback is its own (the check-in does not raise it)."""
    from tests.torchrun_harness import free_port, subprocess_env

    script = tmp_path / "fails.py"
    script.write_text(_FAILS_BEFORE_THE_GROUPS)
    env = {**subprocess_env(), "FAILING_RANK": str(failing_rank), "FAILURE": failure}
    port = free_port()
    if launch == "two_nodes":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=renio-test", str(script)]
        procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    else:
        procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "ROUNDS": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    started = time.monotonic()
    outputs = [p.communicate(timeout=300) for p in procs]  # a hang would last the 10-minute timeout
    stderr = "\n".join(err for _, err in outputs)
    assert time.monotonic() - started < 120, stderr[-3000:]
    # torchrun exits 1 whatever its worker's status (and an agent may trace the other's leaving)
    expected = [1, 1] if launch == "two_nodes" else [2 if failure == "flag" else 1] * 2
    assert [p.returncode for p in procs] == expected, stderr[-3000:]
    if failure == "flag":  # the failing node's rank prints it; rank 0 prints the copy when another rank failed
        assert stderr.count("argument --lr: not a number") == 1 + (failing_rank != 0), stderr[-3000:]
        if failing_rank != 0:
            assert "error (rank 1): argument --lr: not a number" in stderr
    else:
        assert "error: rank 0 failed: RuntimeError: argument --lr: not a number (its traceback is in rank 0's log)" \
            not in stderr  # rank 0 failed itself: its own traceback, no copy of it
        assert "RuntimeError: argument --lr: not a number" in stderr and "Traceback" in stderr
        assert "check_in" not in stderr
    assert "DistStoreError" not in stderr  # no store timeout


def test_a_torchrun_restart_does_not_read_the_failure_of_the_attempt_before(tmp_path):
    """torchrun --max-restarts keeps its store across attempts: rank 1 failing at the first attempt's
    start-up only, the second attempt starts (each attempt checks in under its own keys; it stopped with
    the first attempt's error)."""
    from tests.torchrun_harness import free_port, subprocess_env

    script = tmp_path / "fails.py"
    script.write_text(_FAILS_BEFORE_THE_GROUPS)
    env = {**subprocess_env(), "FAILING_RANK": "1", "FAILURE": "flag", "FAILING_ATTEMPTS": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error (rank 1): argument --lr: not a number" in proc.stderr  # the first attempt's


def test_the_check_in_times_out_with_one_line_naming_how_many_ranks_came():
    """A rank that never checks in; a rank that posted its error and died before reading it back: the
    waiting rank stops at the store's timeout with one line counting the ranks that came."""
    import json
    from datetime import timedelta

    from megatron_renio.distributed import _described, check_in

    def store():
        hash_store = torch.distributed.HashStore()
        hash_store.set_timeout(timedelta(seconds=0.2))
        return hash_store

    with pytest.raises(UserInputError, match=r"^only 1 of 2 ranks reached the start-up check-in within the timeout: "
                                             r"a rank did not start or died before it \(its log says why\)"):
        check_in(store(), "round", 0, 2, "gloo")
    dead_after_posting = store()
    rank_1 = torch.distributed.PrefixStore("round", dead_after_posting)
    rank_1.set("failure", json.dumps([1, *_described(UserInputError("argument --lr: not a number"))]))
    rank_1.add("checked_in", 1)
    with pytest.raises(UserInputError, match=r"^only 1 of 2 ranks read the error posted at the start-up check-in "
                                             r"within the timeout"):
        check_in(dead_after_posting, "round", 0, 2, "gloo")


@pytest.mark.slow  # a guard against a 5-minute wait; the check-in's CI cases cover the report itself
def test_a_rank_that_cannot_reach_the_rendezvous_fails_at_its_timeout_only(tmp_path):
    """No store at MASTER_PORT: the rank fails when the rendezvous times out (3 s here), and its failed
    start does not try the rendezvous again (for report_failed_start's 5 minutes)."""
    from tests.torchrun_harness import free_port, subprocess_env

    from tests.python_forkserver import run_python

    started = time.monotonic()
    out = run_python(["-c", "from megatron_renio import distributed, entrypoint\n"
                      "entrypoint.run_command(lambda argv: None, lambda _: distributed.initialize("
                      "distributed.ParallelConfig(), timeout_minutes=0.05), [])\n"], timeout=300,
                     env={**subprocess_env(), "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert out.returncode != 0 and time.monotonic() - started < 60, out.stderr[-3000:]


def test_several_processes_without_a_rendezvous_are_one_line_and_leave_torch_unpatched():
    out = _start({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"},
                 "code = entrypoint.run_command(lambda argv: None, lambda _: distributed.initialize("
                 "distributed.ParallelConfig()), [])\n"
                 "print('exit', code, cpu_backend.is_active(), torch.distributed.is_initialized())\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.strip() == "error: WORLD_SIZE=2 without MASTER_PORT: launch with torchrun"
    assert out.stdout.split()[-4:] == ["exit", "2", "False", "False"]


@pytest.mark.parametrize("address, port, expected", [
    ("127.0.0.1", "abc", "error: environment variable MASTER_PORT='abc' is not an integer"),
    ("127.0.0.1", "70000", "error: environment variable MASTER_PORT=70000 is not a port number (1 to 65535)"),
    ("no.such.host.invalid", "29500", "error: environment variable MASTER_ADDR='no.such.host.invalid': no such host ("),
])
def test_a_rendezvous_address_that_cannot_work_is_one_line(address, port, expected):
    """A manual launch's MASTER_PORT or MASTER_ADDR typo: one line naming the variable, not the rendezvous's
    traceback."""
    out = _start({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": address, "MASTER_PORT": port},
                 "code = entrypoint.run_command(lambda argv: None, lambda _: distributed.initialize("
                 "distributed.ParallelConfig()), [])\n"
                 "print('exit', code, torch.distributed.is_initialized())\n")
    assert out.stderr.strip().startswith(expected), out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["exit", "2", "False"]


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "1", "RANK": "1"}, {"WORLD_SIZE": "0"},
                                 {"WORLD_SIZE": "2", "RANK": "-1"}, {"LOCAL_RANK": "-1"}])
def test_rank_variables_that_do_not_fit_together_are_one_line(env, monkeypatch):
    """RANK=1 in a world of 1 was gloo's 'rank < size' enforcement traceback."""
    from megatron_renio import distributed
    from megatron_renio.distributed import ParallelConfig

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserInputError, match=r"^environment variables RANK=-?\d+, WORLD_SIZE=\d+, LOCAL_RANK=-?\d+ "
                                             r"do not fit together \(0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0\)"):
        distributed.initialize(ParallelConfig())
    assert not torch.distributed.is_initialized()


def test_fractional_timeouts_reach_megatron_groups(monkeypatch):
    """--distributed-timeout-minutes 1.5 bounds the TP / PP / DP groups by 1.5 minutes (was rounded to 1)."""
    from megatron.core import parallel_state

    from megatron_renio import distributed

    seen = {}
    original = parallel_state.initialize_model_parallel

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(parallel_state, "initialize_model_parallel", spy)
    try:
        distributed.initialize(ParallelConfig(), seed=0, timeout_minutes=1.5)
    finally:
        distributed.destroy()
    assert seen["distributed_timeout_minutes"] == 1.5


def test_initialising_again_replaces_the_groups_and_their_threads():
    """Each initialize destroys the groups of the one before (Megatron's destroy_model_parallel only
    forgets them, and each gloo group keeps two threads and a TCP loop): a process that initialises
    again and again keeps the same number of groups and threads."""
    from torch.distributed.distributed_c10d import _world

    from megatron_renio import distributed

    def threads():
        return len(os.listdir("/proc/self/task"))

    try:
        distributed.initialize(ParallelConfig(), seed=0)
        groups, before = len(_world.pg_map), threads()
        assert groups > 10  # Megatron's groups besides the default one
        for _ in range(3):
            distributed.initialize(ParallelConfig(), seed=0)
            assert len(_world.pg_map) == groups
        assert threads() <= before
    finally:
        distributed.destroy()


def test_a_local_rank_beyond_the_gpus_is_one_line(monkeypatch):
    """More processes per node than GPUs: one line naming LOCAL_RANK (was CUDA's invalid-ordinal traceback)."""
    import torch

    from megatron_renio import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserInputError, match="^LOCAL_RANK 1 has no GPU: this machine has 1 "):
        distributed.select_backend(1)


@pytest.mark.parametrize("variable", ["SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_tasks_of_srun_or_mpirun_without_torchrun_are_refused(variable, monkeypatch):
    """Each of several processes started without WORLD_SIZE would train alone into the same --save: one
    line before any process group; one such process (a batch script's own) and torchrun's workers start."""
    from megatron_renio import distributed

    for name in ("WORLD_SIZE", "RANK", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "4")
    try:
        with pytest.raises(UserInputError, match=f"^{variable}=4 without WORLD_SIZE: .* launch with torchrun"):
            distributed.initialize(ParallelConfig())
        monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's worker inside an srun task: not this check's business
        distributed._refuse_launcher_without_torchrun()
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.setenv(variable, "1")
        distributed._refuse_launcher_without_torchrun()
    finally:
        distributed.destroy()


def test_a_layout_error_every_rank_finds_is_printed_once_by_sft_and_eval(tmp_path):
    """TP 2 on a model of 3 heads: sft and eval check the model against the layout on every rank alike,
    and rank 0 alone prints the refusal (each rank printed its own: a thousand lines at a thousand ranks)."""
    from megatron_renio import distributed
    from megatron_renio.data.arithmetic_task import build_char_tokenizer, make_splits, write_jsonl
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import build_gpt_model
    from megatron_renio.models.checkpoint import save_model_checkpoint
    from megatron_renio.models.presets import get_preset
    from tests.torchrun_harness import subprocess_env, torchrun_args

    train, _ = make_splits(seed=3, num_train=8, num_test=0)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    tokenizer = build_char_tokenizer(str(tmp_path / "tok"))
    (tmp_path / "bench.jsonl").write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        model, info = build_gpt_model(get_preset("tiny-qwen3").replace(num_attention_heads=3, num_query_groups=3),
                                      ParallelConfig())
        save_model_checkpoint(model, info, tmp_path / "odd", tokenizer_dir=tokenizer)
    finally:
        distributed.destroy()
    commands = {
        "sft": ["-m", "megatron_renio.sft", "--pretrained-checkpoint", tmp_path / "odd", "--data-path",
                tmp_path / "train.jsonl", "--seq-length", "384", "--global-batch-size", "2", "--train-iters", "1",
                "--save", tmp_path / "sft_out"],
        "eval": ["-m", "megatron_renio.eval.runner", "--load", tmp_path / "odd", "--benchmark",
                 tmp_path / "bench.jsonl", "--max-new-tokens", "2", "--greedy", "--out", tmp_path / "eval.jsonl"],
    }
    for name, command in commands.items():
        proc = subprocess.run([sys.executable, *torchrun_args(2), *map(str, command), "--tensor-model-parallel-size", "2"],
                              cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        assert errors == ["error: --tensor-model-parallel-size 2 does not divide the model's attention heads (3)"], \
            (name, proc.stderr[-3000:])
