"""CPU/gloo backend: run Megatron-Core 0.16's real code paths on a machine without CUDA.

Megatron-Core assumes CUDA in a handful of places. This module redirects exactly those to the CPU,
so that the project's tests exercise the real ``GPTModel``, tensor-parallel layers, pipeline
schedules, DDP, optimizer and ``dist_checkpointing`` on gloo. It is activated by
:func:`megatron_renio.distributed.initialize` when (and only when) CUDA is unavailable;
:func:`activate` refuses to run on a CUDA machine, so a GPU job can never be patched.

The patches, each with the Megatron-Core files that need it:

1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``: allocations such as
   ``torch.empty(..., device=torch.cuda.current_device())`` in ``tensor_parallel/layers.py``,
   ``tensor_parallel/mappings.py``, ``utils.py`` (global memory buffer), ``pipeline_parallel/
   p2p_communication.py`` and ``distributed/param_and_grad_buffer.py``.
2. ``torch.cuda.synchronize()`` is a no-op: ``pipeline_parallel/p2p_communication.py``,
   ``inference/communication_utils.py`` (the rollout's pipeline send / receive) and the async
   checkpoint writer in ``dist_checkpointing/strategies``.
3. Tensor factories (``torch.empty``, ``zeros``, ``ones``, ``full``, ``tensor``, ``arange``,
   ``*_like``, ...) called with a literal CUDA device allocate on the CPU instead:
   ``pipeline_parallel/schedules.py`` (``total_num_tokens``), ``optimizer/optimizer.py`` and
   ``optimizer/clip_grads.py`` (``found_inf``, norms), ``transformer/utils.py`` (attention masks),
   ``dist_checkpointing/exchange_utils.py``. The same wrappers drop ``pin_memory`` (pinning needs an
   accelerator, and a CPU tensor is already in host memory): ``utils.py`` (packed-sequence
   ``cu_seqlens``) and ``models/common/embeddings/rope_utils.py`` (context parallelism) ask for
   pinned buffers; the project runs neither path today, the wrappers keep them runnable. Patching the factory functions works in every thread
   (a ``TorchFunctionMode`` would only cover the thread that entered it). torch's default-device
   context (``with torch.device("meta")``, which transformers' ``from_pretrained`` builds models
   under) recognises factories by identity in a cached set, so that set is filled with the original
   functions before they are patched; filled later, it would hold the wrappers, and a model built
   in the same process would get some buffers (RoPE's ``inv_freq``) on the wrong device, left
   uninitialised.
4. ``Tensor.cuda()`` returns the tensor itself: ``optimizer/optimizer.py``,
   ``optimizer/distrib_optimizer.py``, ``dist_checkpointing/exchange_utils.py`` and
   ``models/common/language_module/language_module.py`` (tied embeddings under pipeline parallelism).
5. ``Tensor.type()`` without arguments reports the ``torch.cuda.*Tensor`` name that
   ``optimizer/clip_grads.py`` and ``optimizer/distrib_optimizer.py`` compare against.
6. The model-parallel RNG tracker (``tensor_parallel/random.py``) keeps and forks *CPU* generator
   states: :class:`CPURNGStatesTracker`. Seeded by Megatron's own ``model_parallel_cuda_manual_seed``,
   it gives each tensor-parallel rank its own stream inside ``fork()`` (weight initialisation,
   dropout in tensor-parallel regions) and every rank the same default stream outside it, exactly
   the contract of the CUDA tracker, so runs are seeded and deterministic.
7. The CUDA generator state that activation recompute saves and restores around each checkpointed
   block (``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` in ``tensor_parallel/random.py``, used by
   ``CheckpointFunction`` for ``--recompute-granularity``) is an empty placeholder: there is no CUDA
   generator, and the streams that exist (the CPU generator and the tracker's) are saved and restored
   by the same code.

``torch.cuda.is_available`` is left alone: Megatron's CPU fallbacks key on it.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_ACTIVE = False
_ORIGINALS: dict[tuple[object, str], object] = {}

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "rand", "randn",
    "randint", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "empty_strided",
)

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
}


def is_active() -> bool:
    """Whether the CPU backend patches are installed in this process."""
    return _ACTIVE


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare index means a CUDA ordinal in torch's factories


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


def _tensor_type(self, *args, **kwargs):
    original = _ORIGINALS[(torch.Tensor, "type")]
    if args or kwargs:
        return original(self, *args, **kwargs)
    name = original(self)
    return _CUDA_TYPE_NAMES.get(name, name)


def _patch(owner, name, replacement) -> None:
    """Set ``owner.name`` to ``replacement``, keeping the original for :func:`deactivate`. A name the
    installed torch or Megatron-Core lacks is an error naming it (the patches target Megatron-Core
    0.16.x), not a patch that silently does nothing."""
    if not hasattr(owner, name):
        from megatron.core import __version__

        raise RuntimeError(f"CPU backend: {getattr(owner, '__name__', owner)}.{name} does not exist in this "
                           f"torch {torch.__version__} / megatron-core {__version__}; it targets megatron-core 0.16.x")
    _ORIGINALS[(owner, name)] = getattr(owner, name)
    setattr(owner, name, replacement)


class CPURNGStatesTracker:
    """Named CPU generator states with Megatron's ``CudaRNGStatesTracker`` interface.

    ``add(name, seed)`` records the state of a CPU generator seeded with ``seed``; ``fork(name)``
    swaps that state into the default CPU generator for the duration of the block and stores the
    advanced state back on exit, restoring the outer stream.
    """

    def __init__(self):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Take ``states`` (:meth:`get_states`'s); each must be a CPU generator's state, checked here
        (RuntimeError) rather than at the first ``fork`` in the middle of a run."""
        for state in states.values():
            torch.Generator().set_state(state)
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    _patch(mp_random, "_CUDA_RNG_STATE_TRACKER", CPURNGStatesTracker())
    _patch(mp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    _patch(mp_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8))
    _patch(mp_random, "_set_cuda_rng_state", lambda *args, **kwargs: None)


def activate() -> None:
    """Install the patches listed in the module docstring (idempotent).

    Raises ``RuntimeError`` if CUDA is available: the CPU backend must never touch a GPU job.
    """
    global _ACTIVE
    if torch.cuda.is_available():
        raise RuntimeError("the CPU backend must not be activated when CUDA is available")
    if _ACTIVE:
        return
    _patch(torch.cuda, "current_device", lambda: torch.device("cpu"))
    _patch(torch.cuda, "synchronize", lambda device=None: None)
    from torch.utils._device import _device_constructors

    _device_constructors()  # cache the original factories (module docstring, patch 3)
    for name in _FACTORIES:
        _patch(torch, name, _redirect_device(getattr(torch, name)))
    _patch(torch.Tensor, "cuda", _tensor_cuda)
    _patch(torch.Tensor, "type", _tensor_type)
    _install_rng_tracker()
    _ACTIVE = True


def deactivate() -> None:
    """Undo every patch: :func:`megatron_renio.distributed.destroy` calls it, and the command entry
    point after a start that failed before the process group existed, so that code running later in
    the process sees torch as it is."""
    global _ACTIVE
    for (owner, name), original in reversed(list(_ORIGINALS.items())):
        setattr(owner, name, original)
    _ORIGINALS.clear()
    _ACTIVE = False
