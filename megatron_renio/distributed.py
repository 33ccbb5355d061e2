"""Distributed start-up: torch.distributed, Megatron's parallel state, seeds.

:func:`initialize` is the single entry point every command uses. It reads the torchrun environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; a plain ``python``
process is a world of one; several started by srun or an MPI launcher without ``WORLD_SIZE`` are
refused), picks NCCL when CUDA is present and gloo plus
:mod:`megatron_renio.cpu_backend` otherwise, builds Megatron's tensor / pipeline / data-parallel
groups (virtual pipeline off; DP = world / (TP x PP)) and seeds every generator the way
Megatron-LM does. Layout errors are reported as one-line :class:`UserInputError`, once the ranks
have met and agreed on the configuration (so that rank 0 alone prints them), before Megatron's
groups are built. Before ``init_process_group`` every rank checks in at the rendezvous store
(:func:`check_in`), where a rank that failed earlier posts its error (:func:`report_failed_start`),
so that no node waits for a rank that will never join.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import numpy as np
import torch

from megatron_renio import cpu_backend
from megatron_renio.errors import RankFailure, UserInputError

T = TypeVar("T")


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout: TP and PP sizes; DP is derived from the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False

    def validate(self) -> None:
        for flag, value in (
            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise UserInputError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise UserInputError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise _found_by_every_rank(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} = {model_parallel}"
            )
        return world_size // model_parallel


@dataclass(frozen=True)
class DistributedContext:
    """What a process knows about its place in the job after :func:`initialize`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def env_int(name: str, default: int) -> int:
    """The integer in the environment variable ``name`` (``default`` when unset); not an integer: one line
    naming the variable (launcher variables such as RANK, WORLD_SIZE, MASTER_PORT)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserInputError(f"environment variable {name}={value!r} is not an integer") from None


def _check_rendezvous_address() -> None:
    """MASTER_PORT must be a port number and MASTER_ADDR a host this machine resolves: one line naming
    the variable, not a traceback from the rendezvous (a manual launch, a job script's typo)."""
    port = env_int("MASTER_PORT", 0)
    if not 0 < port < 65536:
        raise UserInputError(f"environment variable MASTER_PORT={port} is not a port number (1 to 65535)")
    address = os.environ["MASTER_ADDR"]
    try:
        socket.getaddrinfo(address, port)
    except (socket.gaierror, UnicodeError) as e:
        raise UserInputError(f"environment variable MASTER_ADDR={address!r}: no such host ({e})") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_max(value, device) -> float:
    """The largest ``value`` (a number or bool, or a one-element tensor on ``device``) over every rank:
    one MAX all-reduce over the world in float64 (the value itself without a process group)."""
    value = torch.as_tensor(value, device=device).double().reshape(1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value.item()


def any_rank(flag, device) -> bool:
    """Whether ``flag`` (a bool, or a bool tensor on ``device``) holds on some rank (:func:`world_max`),
    so every rank takes the same branch."""
    return world_max(flag, device) > 0


def _collective_device() -> torch.device:
    """Where a small collective's tensor lives: this process's GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def raise_if_any_rank(error: Exception | None) -> None:
    """Collective: when some rank holds an ``error``, every rank raises, not only that one (the others
    would wait in their next collective until the timeout). The first such rank (the lowest) raises
    its own error; every other rank raises a copy reported by it (:mod:`~megatron_renio.errors`): a
    :class:`UserInputError` with its message, or :class:`RankFailure` for another exception. One MIN
    all-reduce, and a broadcast of the message only when there is an error."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    world = dist.get_world_size()
    first = torch.tensor([dist.get_rank() if error is not None else world], device=_collective_device())
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    source = int(first.item())
    if source == world:
        return
    payload = [_described(error)] if dist.get_rank() == source else [None]
    dist.broadcast_object_list(payload, src=source)
    if dist.get_rank() == source:
        raise error
    raise _copy_of(source, *payload[0])


def _described(error: Exception) -> tuple[bool, str, str]:
    """What other ranks need to raise a copy of ``error`` (:func:`_copy_of`)."""
    return isinstance(error, UserInputError), f"{type(error).__name__}: {error}", str(error)


def _copy_of(source: int, user: bool, described: str, message: str) -> Exception:
    """Rank ``source``'s error (:func:`_described`) as another rank raises it: a :class:`UserInputError`
    with its message, or :class:`RankFailure`, reported by ``source``."""
    return UserInputError(message, reported_by=source) if user else RankFailure(source, described)


def on_rank0(fn):
    """Run ``fn`` on global rank 0 only and hand its (picklable) result to every rank, or its error:
    rank 0 re-raises it, the others a copy reported by rank 0 (:class:`UserInputError` with its
    message, or :class:`RankFailure` for another exception), so no rank waits for a broadcast that
    never comes. Collective."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    payload = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # every rank must learn about it, or the others hang
            error = e
            payload = [("user", str(e)) if isinstance(e, UserInputError) else ("crash", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if error is not None:
        raise error
    if status == "user":
        raise UserInputError(value, reported_by=0)
    if status == "crash":
        raise RankFailure(0, value)
    return value


def log0(message: str) -> None:
    """Print on global rank 0 only (the RANK of the launcher before process groups exist)."""
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    else:
        rank = env_int("RANK", 0)
    if rank == 0:
        print(message, flush=True)


def _found_by_every_rank(message: str) -> UserInputError:
    """The error of a check whose outcome every rank computes alike from the same values (gathered, or
    agreed before): rank 0's own, a copy reported by rank 0 elsewhere (printed once)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return UserInputError(message, reported_by=None if rank == 0 else 0)


def _check_ranks_agree(digest: str, what: str, remedy: str) -> None:
    """Collective: every rank must hold the same ``digest`` of ``what``; else every rank raises one line
    naming the first rank that differs from rank 0, and ``remedy``."""
    digests: list[str] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(digests, digest)
    for rank, other in enumerate(digests):
        if other != digests[0]:
            raise _found_by_every_rank(f"ranks disagree on {what}: rank {rank} differs from rank 0 ({remedy})")


def on_every_rank(fn: Callable[[], T]) -> T:
    """Collective: ``fn()`` on every rank (checks, or reading files each rank reads for itself). An
    error on some ranks stops every rank (:func:`raise_if_any_rank`): none waits in its next collective
    for one that failed (a node missing a file), and an error every rank finds is printed by rank 0
    alone, not once per rank. ``fn`` must not run collectives itself."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # every rank must learn about it, or the others hang
        error = e
    raise_if_any_rank(error)
    return result


def same_on_every_rank(load: Callable[[], T], digest: Callable[[T], str], what: str,
                       remedy: str = "every rank must read the same files with the same tokenizer") -> T:
    """Collective: ``load()`` :func:`on_every_rank`, then check that every rank got the same: ``digest``
    of the result is compared across ranks (:func:`_check_ranks_agree`, naming ``what`` and ``remedy``)."""
    result = on_every_rank(load)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        _check_ranks_agree(digest(result), what, remedy)
    return result


def fingerprint(*configs) -> str:
    """A stable hash of dataclass configs (or plain JSON-able values) for cross-rank comparison."""
    payload = [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c for c in configs]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def set_seeds(seed: int) -> None:
    """Megatron-LM's seeding: a per-pipeline-stage base seed for python / numpy / torch, then
    Megatron's model-parallel tracker (a distinct stream per TP rank inside ``fork()``)."""
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def quiet_megatron_notices() -> None:
    """Silence Megatron-Core's import-time notices that TE / apex are missing (they are optional
    accelerations here) and its default-config deprecation notice; real warnings still show."""
    for pattern in (r".*(Transformer Engine|Apex).* not installed.*", r"full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def select_backend(local_rank: int = 0) -> tuple[str, torch.device]:
    """NCCL on this process's GPU when CUDA is available; otherwise gloo with the CPU backend
    activated. The CPU backend is never activated when CUDA is available."""
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserInputError(f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()} "
                                 "(start at most that many processes per node, or hide the GPUs with "
                                 "CUDA_VISIBLE_DEVICES= to run on the CPU)")
        torch.cuda.set_device(local_rank)
        return "nccl", torch.device("cuda", local_rank)
    cpu_backend.activate()
    return "gloo", torch.device("cpu")


_BACKEND_PLACES = {"nccl": "a GPU (NCCL)", "gloo": "the CPU (gloo: no GPU visible)"}


#: How long a rank whose command failed before its process groups existed waits for the other ranks
#: to read its error (:func:`report_failed_start`); the job stops either way.
FAILED_START_WAIT = timedelta(minutes=5)
_startup_round = 0  # start-up rendezvous this process has joined (the check-in's keys are per round)
_in_round = False  # this process joined one since its last destroy()


def _join_startup(rank: int, world_size: int, timeout: timedelta):
    """Begin this process's next start-up round and return the rendezvous store (:func:`_rendezvous_store`)
    and the round's key prefix for :func:`check_in` (a process may initialise several times, as the
    tests do: each round keeps its own keys; so does each attempt of torchrun ``--max-restarts`` whose
    ranks all restart together, as after a failed start: the store outlives the workers, and a new
    attempt read the last one's failure. An agent that restarts for a membership change keeps its
    count, so keys of nodes restarted for different reasons do not meet: that check-in waits until
    the timeout). A round that cannot reach the store still counts, so a failed start does not try it
    again (:func:`report_failed_start`)."""
    global _startup_round, _in_round
    _startup_round += 1
    _in_round = True
    attempt = env_int("TORCHELASTIC_RESTART_COUNT", 0)
    return _rendezvous_store(rank, world_size, timeout), f"megatron_renio/startup/{attempt}/{_startup_round}"


def check_in(store, prefix: str, rank: int, world_size: int, backend: str | None,
             failed: Exception | None = None) -> None:
    """The start-up check-in of every rank through the rendezvous ``store`` (keys under ``prefix``,
    :func:`_join_startup`), before ``init_process_group``: a rank that ``failed`` before it (a flag, a
    config file, a missing GPU; :func:`report_failed_start`) posts its error and every rank stops
    together, as :func:`raise_if_any_rank` makes them do once the process groups exist. Without it the
    other ranks wait in ``init_process_group`` until the timeout: torchrun stops the ranks of the
    failing rank's node, nothing stops the other nodes'.

    Rank 0 publishes its ``backend`` (None: it failed before choosing one); every other rank compares
    its own, and a mismatch is its error: a node whose GPUs are not visible (a driver fault, an empty
    ``CUDA_VISIBLE_DEVICES``) would join on gloo while the others use NCCL. The first error posted is
    kept. Every rank then counts in, and once all have, reads it, counts out (rank 0 may host the
    store, so no rank leaves before every rank has read) and raises its own backend refusal, or a copy
    of the posted error reported by the rank that posted it (:func:`_copy_of`); a rank that ``failed``
    returns (its caller raises its error, with its own traceback). A constant number of store calls
    per rank. A rank that never checks in stops the others at the store's timeout, with one line."""
    own = torch.distributed.PrefixStore(prefix, store)
    error = failed
    if rank == 0:
        own.set("backend_of_rank_0", backend or "")
    elif error is None:
        first = own.get("backend_of_rank_0").decode()
        if first and first != backend:
            error = UserInputError(
                f"rank {rank} runs on {_BACKEND_PLACES.get(backend, backend)}, rank 0 on "
                f"{_BACKEND_PLACES.get(first, first)}: every rank needs a GPU, or none does (check this node's "
                "CUDA_VISIBLE_DEVICES and driver)")
    if error is not None:
        own.compare_set("failure", "", json.dumps([rank, *_described(error)]))
    _all_reach(own, "checked_in", world_size, "reached the start-up check-in")
    if not own.check(["failure"]):
        return
    source, *described = json.loads(own.get("failure"))
    _all_reach(own, "read_the_failure", world_size, "read the error posted at the start-up check-in")
    if failed is None:
        raise error if error is not None else _copy_of(source, *described)


def _all_reach(store, point: str, world_size: int, reached: str) -> None:
    """Count this rank at ``point`` and wait until every rank has reached it (the last one to arrive
    says so); a store timeout is one line naming how many ranks did (``reached``: what they did)."""
    if store.add(point, 1) == world_size:
        store.set(f"all_{point}", "")
    try:
        store.wait([f"all_{point}"])
    except torch.distributed.DistStoreError:
        raise UserInputError(f"only {store.add(point, 0)} of {world_size} ranks {reached} within the timeout: a rank "
                             "did not start or died before it (its log says why), or the launch counts more ranks "
                             "than it started") from None


def report_failed_start(error: Exception) -> None:
    """A rank whose command failed with ``error`` before its process groups existed, in a launch of
    several ranks: take part in the start-up check-in with it (:func:`check_in`), so that every other
    rank stops with it instead of waiting until the timeout; wait at most :data:`FAILED_START_WAIT`.
    Nothing for a world of one, a rank that already checked in, or launcher variables that reach no
    store (their own error is the one to print): the caller reports ``error`` either way."""
    rank, world_size = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")
    if _in_round or torch.distributed.is_initialized() or not (rank.isdigit() and world_size.isdigit()):
        return
    rank, world_size = int(rank), int(world_size)
    if not 0 <= rank < world_size or world_size == 1:
        return
    with contextlib.suppress(Exception):  # a store that cannot be reached leaves the error as it is
        _check_rendezvous_address()
        store, prefix = _join_startup(rank, world_size, FAILED_START_WAIT)
        check_in(store, prefix, rank, world_size, None, failed=error)


def _rendezvous_store(rank: int, world_size: int, timeout: timedelta):
    """The store of torchrun's rendezvous (``env://``), as ``init_process_group`` would make it."""
    store, _, _ = next(torch.distributed.rendezvous("env://", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    return store


# Launchers that start one process per task without torchrun's variables: (variable, launcher).
_OTHER_LAUNCHERS = (("SLURM_STEP_NUM_TASKS", "srun"), ("OMPI_COMM_WORLD_SIZE", "mpirun"), ("PMI_SIZE", "an MPI launcher"))


def _launched_together(launchers) -> tuple[str, str, str] | None:
    """(variable, value, launcher) of the first of ``launchers`` whose variable says that more than one
    process was started together, else None."""
    for variable, launcher in launchers:
        value = os.environ.get(variable, "").strip()
        if value.isdigit() and int(value) > 1:
            return variable, value, launcher
    return None


def _refuse_launcher_without_torchrun() -> None:
    """Processes started several at once by srun or mpirun, without WORLD_SIZE, would each run alone
    (a world of one), as many separate runs writing into the same --save: one line instead."""
    if "WORLD_SIZE" in os.environ:
        return
    found = _launched_together(_OTHER_LAUNCHERS)
    if found:
        variable, value, launcher = found
        raise UserInputError(f"{variable}={value} without WORLD_SIZE: {launcher} started several "
                             "processes that would each train alone; launch with torchrun (e.g. one torchrun per "
                             "node under srun, with --nnodes and --rdzv-endpoint)")


def initialize_single_process(seed: int = 0) -> DistributedContext:
    """:func:`initialize` as a world of one for a command that runs in one plain process (conversion):
    several processes launched together (torchrun, srun, mpirun) are one line naming the variable that
    says so; a launcher's other variables left in the environment (RANK, LOCAL_RANK) are ignored."""
    found = _launched_together((("WORLD_SIZE", "torchrun"), *_OTHER_LAUNCHERS))
    if found:
        variable, value, launcher = found
        raise UserInputError(f"{variable}={value}: {launcher} started {value} processes, but this command runs in "
                             "one plain process: run it once with python (unset the variable if a job script "
                             "exported it)")
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ.pop(variable, None)
    return initialize(ParallelConfig(), seed=seed)


def _destroy_model_parallel_groups() -> None:
    """Destroy the process groups of an earlier ``initialize_model_parallel`` in this process, then
    Megatron's references to them. Megatron's ``destroy_model_parallel`` only drops the references:
    each group stays alive with its gloo threads and sockets (two threads and a TCP loop per group,
    a few dozen groups per layout), and a process that initialises layout after layout (tests,
    tools) ends up with thousands of threads. Every rank runs this at the same point of
    ``initialize``, where no collective is in flight."""
    from megatron.core import parallel_state
    from torch.distributed.distributed_c10d import GroupMember, _world

    if torch.distributed.is_initialized():
        for group in list(_world.pg_map):
            if group is not GroupMember.WORLD:
                torch.distributed.destroy_process_group(group)
    parallel_state.destroy_model_parallel()


def initialize(
    parallel: ParallelConfig,
    seed: int = 1234,
    config_fingerprint: str | None = None,
    timeout_minutes: float = 10.0,
) -> DistributedContext:
    """Initialise torch.distributed and Megatron's parallel state for ``parallel``.

    ``config_fingerprint`` (see :func:`fingerprint`) is compared across ranks; a mismatch is a
    one-line error. ``timeout_minutes`` bounds every collective, so a dead rank never makes the
    others hang forever.
    """
    quiet_megatron_notices()
    from megatron.core import parallel_state

    parallel.validate()
    _refuse_launcher_without_torchrun()
    rank, world_size = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    local_rank = env_int("LOCAL_RANK", 0)
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise UserInputError(f"environment variables RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} do "
                             "not fit together (0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0): launch with torchrun")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if world_size > 1 and missing and not torch.distributed.is_initialized():  # before the CPU backend's patches
        raise UserInputError(f"WORLD_SIZE={world_size} without {' and '.join(missing)}: launch with torchrun")
    if world_size > 1 and not torch.distributed.is_initialized():
        _check_rendezvous_address()

    backend, device = select_backend(local_rank)

    if not torch.distributed.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        if world_size == 1:
            # One process needs no rendezvous: an in-process store, whatever MASTER_ADDR the shell exports
            # and whether or not torchrun started it (its workers only connect to the agent's store).
            store = torch.distributed.HashStore()
        else:  # the rendezvous init_process_group would make, with the start-up check-in before it
            store, prefix = _join_startup(rank, world_size, timeout)
            check_in(store, prefix, rank, world_size, backend)
            store = torch.distributed.PrefixStore("default_pg", store)
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                             store=store)
    if config_fingerprint is not None:
        _check_ranks_agree(config_fingerprint, "the configuration",
                           "launch every rank with the same flags, config file and checkpoint")
    dp_size = parallel.data_parallel_size(world_size)  # after the flags agree: every rank finds the same

    _destroy_model_parallel_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=None,
        distributed_timeout_minutes=timeout_minutes,  # a timedelta in Megatron: fractions count
    )
    set_seeds(seed)
    return DistributedContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        tp_size=parallel.tensor_model_parallel_size,
        pp_size=parallel.pipeline_model_parallel_size,
        dp_size=dp_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy() -> None:
    """Tear down Megatron's groups, then the default process group (in that order: destroying
    the model-parallel groups first avoids an abort at interpreter exit on gloo), then undo the CPU
    backend's patches, so that code running later in the process sees torch as it is."""
    from megatron.core import parallel_state

    global _in_round
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _in_round = False
    cpu_backend.deactivate()
