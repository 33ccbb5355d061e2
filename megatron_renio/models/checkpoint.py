"""The project's model checkpoint: what conversion writes and ``--load`` / ``--student-load`` /
``--teacher-load`` read.

A model checkpoint is a folder::

    renio_model.json   format version, the ModelPreset (with the TRUE vocabulary size), dtype,
                       the tokenizer folder (relative), the layout it was saved from, extra metadata
    model/             a Megatron-Core dist_checkpointing (torch_dist) checkpoint of
                       ``GPTModel.sharded_state_dict()``: loadable at any TP/PP layout, because
                       dist_checkpointing reshards on load (vocabulary padding included)
    tokenizer/         the tokenizer files copied from the tokenizer folder given to the saver, and
                       ``generation_config.json`` (sampling defaults and every EOS id generation stops
                       on, read from here by the tokenizer loader and the export): the saver's
                       ``generation_config`` (conversion passes the source model's), else the
                       tokenizer folder's; kept alone here when the checkpoint has no tokenizer files

Tied embeddings follow ``GPTModel.sharded_state_dict``: the output layer of a tied model is stored
as (a replica of) ``embedding.word_embeddings.weight`` and reloaded from it on the last stage.
Where a rank holds a whole global tensor that Megatron would write in pieces (the SwiGLU
``linear_fc1`` at TP=1), it is written and read as one piece: same global tensors, less memory.

Saving writes everything into a hidden sibling folder (``.<name>.partial-<id>``) and renames it
to the target only when every rank is done, so an interrupted save never looks like a checkpoint;
the next save to the same target deletes what a killed one left.
dist_checkpointing's writer starts helper processes (one of them by "spawn", which re-imports the
entry script): the script that calls :func:`save_model_checkpoint` must guard its entry point with
``if __name__ == "__main__":``, and ``psutil`` must be installed.

:func:`save_model_checkpoint` and :func:`load_model_checkpoint` are collective: every rank of the
job calls them. Problems with the folder or its content are one-line
:class:`~megatron_renio.errors.UserInputError` s that name the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from megatron_renio.data.tokenizer import GENERATION_CONFIG_FILE, SENTENCEPIECE_FILE
from megatron_renio.distributed import on_rank0, raise_if_any_rank
from megatron_renio.errors import UserInputError
from megatron_renio.models.presets import ModelPreset
from megatron_renio.output_paths import (check_output_folder, fsync, fsync_tree, hidden_sibling, hidden_siblings,
                                         is_empty_folder, storage_error)

FORMAT = "megatron_renio.model"
FORMAT_VERSION = 1
METADATA_FILE = "renio_model.json"
MODEL_SUBDIR = "model"
TOKENIZER_SUBDIR = "tokenizer"
# Files a Hugging Face tokenizer is made of.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json",
)
# transformers' folder of named chat templates (``<name>.jinja``), beside the tokenizer's files
CHAT_TEMPLATES_SUBDIR = "additional_chat_templates"


@dataclass(frozen=True)
class CheckpointMetadata:
    """The content of ``renio_model.json``, with ``tokenizer_dir`` resolved to a path.

    ``extra`` is whatever the saver passed as ``extra_metadata``; conversion stores ``source``
    (where the weights came from) there.
    """

    directory: Path
    format_version: int
    preset: ModelPreset
    dtype: str
    padded_vocab_size: int
    tokenizer_dir: Path | None
    saved_layout: dict
    extra: dict

    @property
    def source(self) -> str | None:
        return self.extra.get("source")

    @property
    def generation_config(self) -> Path | None:
        """The checkpoint's ``generation_config.json`` (in its tokenizer folder, also when that holds
        no tokenizer files), or None."""
        path = (self.tokenizer_dir or self.directory / TOKENIZER_SUBDIR) / GENERATION_CONFIG_FILE
        return path if path.is_file() else None


# The files of dist_checkpointing's shards (torch_dist), each synced to stable storage by the process
# that writes it (megatron-core's FileSystemWriterAsync, use_fsync=True): savers sync only the others.
SHARD_SUFFIX = ".distcp"


def tokenizer_files(directory: str | Path) -> dict[str, Path]:
    """The tokenizer files of ``directory`` by their path in a tokenizer folder (``TOKENIZER_FILES``,
    ``*.tiktoken`` and the named chat templates of ``CHAT_TEMPLATES_SUBDIR``; not its
    ``generation_config.json``); empty when it holds none. A sentencepiece ``.model`` file given
    instead of a folder is its own one file, ``SENTENCEPIECE_FILE``."""
    directory = Path(directory)
    if directory.is_file() and directory.suffix == ".model":
        return {SENTENCEPIECE_FILE: directory}
    found = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    found += sorted(directory.glob("*.tiktoken"))
    if found:
        found += sorted((directory / CHAT_TEMPLATES_SUBDIR).glob("*.jinja"))
    return {path.relative_to(directory).as_posix(): path for path in found}


def copy_tokenizer_files(files: dict[str, Path], target: Path) -> None:
    """Copy ``files`` (as :func:`tokenizer_files` names them) into the folder ``target``."""
    for name, path in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / name)


def is_within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symbolic links resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def checkpoint_fingerprint(directory: str | Path, sample_bytes: int = 1 << 20) -> str:
    """A hex digest that tells the weights of two model checkpoints apart without reading them whole:
    SHA-256 of the architecture and dtype (``renio_model.json``'s preset without ``pad_token_id``,
    which presets carry since 2026-11-28, and dtype; not its other fields, which name where it came
    from) and, per file of ``model/`` other than ``.metadata``
    (which torch_dist writes with a random id), in name order, its relative path, its size and its
    first and last ``sample_bytes`` bytes. A moved or copied checkpoint keeps it, and so does the
    same HF model converted again; trainings of one architecture differ (their weight bytes do)."""
    directory = Path(directory)
    metadata = json.loads((directory / METADATA_FILE).read_text())
    preset = metadata.get("preset")
    if isinstance(preset, dict):
        preset = {key: value for key, value in preset.items() if key != "pad_token_id"}
    digest = hashlib.sha256(json.dumps([preset, metadata.get("dtype")], sort_keys=True).encode())
    model = directory / MODEL_SUBDIR
    for path in sorted(p for p in model.rglob("*") if p.is_file() and p.name != ".metadata"):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(model).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(sample_bytes))
            if size > sample_bytes:
                f.seek(max(size - sample_bytes, sample_bytes))
                digest.update(f.read())
    return digest.hexdigest()


def check_target_directory(directory: str | Path, overwrite: bool = False, label: str | None = None,
                           inputs: tuple[tuple[str, str | Path], ...] = (),
                           overwrite_flag: str | None = "--overwrite") -> None:
    """A save target must not exist (and be creatable), or be an empty folder, or (``overwrite``) be a
    folder, written in by a probe (:func:`~megatron_renio.output_paths.check_output_folder`); and it must
    not be, hold or lie inside one of ``inputs`` ((flag, path) pairs: what the command reads), which
    replacing it would delete or change, nor be or hold the current working directory (``--save .``,
    or ``--save "$OUT"`` with ``OUT`` unset), even with ``overwrite``.

    ``label`` names the target the way a command line does (e.g. ``"--save /out"``); errors name the
    bare path by default. ``overwrite_flag``: the flag a refusal of a non-empty folder suggests (with
    ``label``), None for a command without one.
    """
    directory = Path(directory)
    try:
        cwd = Path.cwd()
    except FileNotFoundError:  # the working folder was removed (a long run's scratch): nothing to replace there
        cwd = None
    if cwd is not None and is_within(cwd, directory):
        relation = "is" if directory.resolve() == cwd.resolve() else "holds"
        raise UserInputError(f"{label or directory} {relation} the current working directory {cwd}, which writing "
                             "there would replace; choose another folder")
    for flag, source in inputs:
        if is_within(source, directory):
            relation = "is" if Path(source).resolve() == directory.resolve() else "holds"
            raise UserInputError(f"{label or directory} {relation} the {flag} input, which writing there would "
                                 "replace; choose another folder")
        if is_within(directory, source):
            raise UserInputError(f"{label or directory} lies inside the {flag} input {source}; choose a folder "
                                 "outside it")
    check_output_folder(directory, label or str(directory))
    if not overwrite and directory.exists() and not is_empty_folder(directory):
        hint = f" (pass {overwrite_flag} to replace it)" if label and overwrite_flag else ""
        raise UserInputError(f"{label or directory} exists and is not empty{hint}")


def staging_directory(target: str | Path) -> Path:
    """A fresh hidden sibling of ``target`` to write into before :func:`publish_directory`."""
    target = Path(target).absolute()
    return hidden_sibling(target, "partial")


def publish_directory(staging: Path, target: str | Path) -> None:
    """Move the finished ``staging`` folder (its content already on stable storage: ``fsync_tree``) to
    ``target``, replacing whatever ``target`` held, and flush the rename.

    An empty or absent target is replaced in one rename; a non-empty one is first renamed aside
    and deleted only after the new folder is in place. The hidden leftovers of earlier saves to
    ``target`` that were killed (``.<name>.partial-*``, ``.<name>.replaced-*``: a full-size copy
    each) are deleted then too.
    """
    target = Path(target).absolute()
    if target.is_dir() and any(target.iterdir()):
        os.replace(target, hidden_sibling(target, "replaced"))
    os.replace(staging, target)
    fsync(target.parent)
    for kind in ("partial", "replaced"):
        for leftover in hidden_siblings(target, kind):
            shutil.rmtree(leftover, ignore_errors=True)


def set_aside_folders(target: str | Path) -> list[Path]:
    """The folders that :func:`publish_directory` renamed aside from ``target`` and did not delete,
    newest first: a publish killed between its two renames leaves ``target`` missing and its old,
    complete content in the first of them."""
    return sorted(hidden_siblings(Path(target).absolute(), "replaced"), key=lambda path: path.stat().st_mtime,
                  reverse=True)


def _dtype_name(torch_dtype) -> str:
    from megatron_renio.models.builder import DTYPES

    return next(name for name, value in DTYPES.items() if value == torch_dtype)


def _whole_tensor(factory):
    """The ShardedTensor of ``factory``'s whole tensor, when its pieces are that tensor cut along
    one axis into slices that, in the same order, also fill that axis of the global tensor
    completely (Megatron's SwiGLU ``linear_fc1`` factory at TP=1: the pieces are gate and up);
    None otherwise (e.g. at TP > 1, where a rank's gate and up are not adjacent globally)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    pieces = factory.build()
    if not isinstance(pieces, list) or not pieces or not all(isinstance(p, ShardedTensor) for p in pieces):
        return None
    first = pieces[0]
    axes = {a for p in pieces for a, (x, y) in enumerate(zip(p.global_offset, first.global_offset)) if x != y}
    same = (first.key, first.global_shape, first.replica_id)
    if len(axes) != 1 or any((p.key, p.global_shape, p.replica_id) != same for p in pieces):
        return None
    (axis,) = axes
    local_axis = axis - first.prepend_axis_num
    if local_axis < 0 or first.global_offset[axis] != 0:
        return None
    position = 0
    for piece in pieces:
        if piece.global_offset[axis] != position:
            return None
        if piece.data.data_ptr() != factory.data.narrow(local_axis, position, 1).data_ptr():
            return None
        position += piece.local_shape[local_axis]
    if position != first.global_shape[axis] or position != factory.data.shape[local_axis]:
        return None
    fragmentations = list(first.axis_fragmentations)
    fragmentations[axis] = 1
    return dataclasses.replace(
        first, data=factory.data, local_shape=tuple(factory.data.shape), axis_fragmentations=tuple(fragmentations)
    )


def _sharded_state_dict(module) -> dict:
    """``module.sharded_state_dict()`` with every factory that only cuts a tensor into adjacent
    pieces of the same global tensor replaced by one ShardedTensor of the whole tensor (see
    :func:`_whole_tensor`). The checkpoint holds the same global tensors and reloads at any layout;
    saving no longer copies the pieces (the writer clones views) and loading reads straight into
    the parameter instead of concatenating a copy: at TP=1 this saves about a third of a model
    in memory."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    state = module.sharded_state_dict()
    for key, value in state.items():
        if isinstance(value, ShardedTensorFactory):
            whole = _whole_tensor(value)
            if whole is not None:
                state[key] = whole
    return state


# Rows of a tensor checked at a time by all_finite: bounds its temporary (one byte per element).
_FINITE_CHECK_ELEMENTS = 1 << 24


def all_finite(tensor) -> bool:
    """No NaN or inf in ``tensor``: one pass, in slices of its first dim (a bool temporary of at most
    about ``_FINITE_CHECK_ELEMENTS`` elements, never one of the tensor's size); stops at the first
    slice with one."""
    import torch

    if tensor.dim() == 0 or tensor.numel() == 0:  # a scalar, or nothing to check (no first row to size by)
        return bool(torch.isfinite(tensor).all())
    rows = max(1, _FINITE_CHECK_ELEMENTS // (tensor.numel() // tensor.shape[0]))
    return all(bool(torch.isfinite(part).all()) for part in tensor.split(rows))


def _check_finite_weights(module, directory: Path) -> None:
    """Collective: refuse to save a model with a non-finite weight on any rank (a run whose update
    overflowed, a --lr too large for bf16): :func:`~megatron_renio.distributed.any_rank`; the rank
    holding one names its first such parameter, the others say where to look."""
    from megatron_renio.distributed import any_rank

    bad = next((name for name, param in module.named_parameters() if not all_finite(param.detach())), None)
    if any_rank(bad is not None, next(module.parameters()).device):
        where = f"parameter {bad}" if bad else "a parameter on another rank"
        raise UserInputError(f"the model holds non-finite weights ({where}); not saved to {directory}")


def _replica_group():
    """The data-parallel group when there are several replicas (the fully parallel save and load
    spread their work over it), else None."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        return parallel_state.get_data_parallel_group()
    return None


def _write_results_in_process() -> None:
    """Give Megatron's torch_dist writer a results queue of this process. Megatron-Core 0.16 makes it,
    at the first save, a queue of a spawned ``multiprocessing`` Manager
    (``dist_checkpointing.strategies.filesystem_async._get_write_results_queue``), built for its
    asynchronous save; a synchronous save, the only kind made here, puts and gets the results in
    the calling process. The Manager would live on as a process of its own with no SIGTERM handler:
    the SIGTERM that SLURM sends to every process of a job step (preemption, ``--signal``) kills it,
    and every later save, the one made on the way out included, fails with a broken pipe."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(getattr(filesystem_async, "_results_queue", None), queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def save_sharded(sharded_state_dict: dict, directory: str | Path) -> None:
    """``dist_checkpointing.save`` with Megatron's torch_dist writer, and with data parallelism its
    fully parallel save (Megatron-LM's ``--ckpt-fully-parallel-save``, on by default there): a shard
    that the data-parallel replicas hold in common is written by one of them, the writes spread
    evenly over the group, instead of every shard by DP rank 0. The writer's results come back
    through this process (:func:`_write_results_in_process`). Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    _write_results_in_process()
    strategy, group = get_default_save_sharded_strategy(), _replica_group()
    if group is not None:
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    dist_checkpointing.save(sharded_state_dict, str(directory), sharded_strategy=strategy)


def load_sharded(sharded_state_dict: dict, directory: str | Path, fully_parallel: bool = False, **kwargs) -> dict:
    """``dist_checkpointing.load`` (``kwargs``: its options); ``fully_parallel`` with data parallelism:
    Megatron's fully parallel load (Megatron-LM's ``--ckpt-fully-parallel-load``): each data-parallel
    replica reads its part of the shards the replicas share and the group exchanges them, so storage
    is read once per model-parallel shard instead of once per replica. Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    group = _replica_group() if fully_parallel else None
    if group is not None:
        kwargs["sharded_strategy"] = FullyParallelLoadStrategyWrapper(
            get_default_load_sharded_strategy(str(directory)), group)
    return dist_checkpointing.load(sharded_state_dict, str(directory), **kwargs)


def save_model_checkpoint(
    model,
    info,
    directory: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    generation_config: str | Path | None = None,
    extra_metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` (this rank's GPTModel stage, possibly DDP/Float16-wrapped) as a model checkpoint.

    Collective. ``info`` is the :class:`~megatron_renio.models.builder.ModelInfo` from
    ``build_gpt_model``. ``directory`` must not exist or be an empty folder (with ``overwrite``,
    a non-empty folder is replaced once the new checkpoint is complete). ``tokenizer_dir``: a folder
    whose tokenizer files are copied into ``tokenizer/`` (it must hold at least one), or a
    sentencepiece ``.model`` file. ``generation_config``: the ``generation_config.json`` file saved in
    ``tokenizer/`` (also without a tokenizer); default: ``tokenizer_dir``'s, when it has one.
    ``extra_metadata``: JSON-able dict stored as ``extra``. Returns the checkpoint path.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    try:
        import psutil  # noqa: F401  (dist_checkpointing's writer needs it; megatron-core does not declare it)
    except ImportError:
        raise RuntimeError("saving a model checkpoint needs psutil: pip install psutil") from None

    directory = Path(directory).absolute()
    module = unwrap_model(model)
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": info.preset.to_dict(),
        "dtype": _dtype_name(module.config.params_dtype),
        "padded_vocab_size": info.padded_vocab_size,
        "tokenizer_dir": TOKENIZER_SUBDIR if tokenizer_dir is not None else None,
        "saved_layout": {
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        },
        "extra": dict(extra_metadata or {}),
    }
    json.dumps(metadata)  # fail before any collective if extra_metadata is not JSON-able
    _check_finite_weights(module, directory)

    def prepare() -> str:
        check_target_directory(directory, overwrite)
        if tokenizer_dir is not None and not tokenizer_files(tokenizer_dir):
            raise UserInputError(
                f"no tokenizer files in {tokenizer_dir} (looked for {', '.join(TOKENIZER_FILES[:3])}, ...)"
            )
        staging = staging_directory(directory)
        try:
            (staging / MODEL_SUBDIR).mkdir(parents=True)
        except OSError as e:
            raise UserInputError(f"cannot create {staging}: {e.strerror}") from None
        return str(staging)

    staging = Path(on_rank0(prepare))

    def finish() -> None:
        files = tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else {}  # path in tokenizer/ -> source
        if generation_config is not None:
            files[GENERATION_CONFIG_FILE] = Path(generation_config)
        elif tokenizer_dir is not None and (tokenizer_dir / GENERATION_CONFIG_FILE).is_file():
            files[GENERATION_CONFIG_FILE] = tokenizer_dir / GENERATION_CONFIG_FILE
        try:
            copy_tokenizer_files(files, staging / TOKENIZER_SUBDIR)
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
            # the files dist_checkpointing writes but does not sync (common.pt, metadata.json), not its shards
            fsync_tree(staging, synced_by_writers=(SHARD_SUFFIX,))
            publish_directory(staging, directory)
        except OSError as e:
            raise storage_error(e, staging, f"cannot write the model checkpoint {directory}") from None

    try:
        save_sharded(_sharded_state_dict(module), staging / MODEL_SUBDIR)
        if dist.is_initialized():
            dist.barrier()
        on_rank0(finish)
    except BaseException:
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_checkpoint_metadata(directory: str | Path) -> CheckpointMetadata:
    """Read ``renio_model.json`` of a model checkpoint (no collective; any rank may call it). A field of
    the wrong type or value (a preset field, a ``dtype`` that is not bf16 / fp16 / fp32, a
    ``padded_vocab_size`` below the vocabulary) is one line naming the file and the field."""
    from megatron_renio.models.builder import DTYPES

    directory = Path(directory)
    if not directory.is_dir():
        found = "is a file, not a folder" if directory.exists() else "does not exist"
        raise UserInputError(f"model checkpoint folder {directory} {found}")
    path = directory / METADATA_FILE
    if not path.is_file():
        from megatron_renio.training.checkpointing import LATEST, iteration_dir, latest_iteration

        hint = ""
        if (directory / "config.json").is_file():
            hint = (": it is a Hugging Face model folder, convert it first with "
                    "python -m checkpoints_conversion.hf_to_megatron")
        elif (directory / LATEST).is_file():
            try:
                hint = (f": it is a training run folder; pass one of its checkpoints, the latest is "
                        f"{iteration_dir(directory, latest_iteration(directory))}")
            except UserInputError:  # a corrupt marker: the folder is still not a model checkpoint
                hint = ": it is a training run folder"
        raise UserInputError(f"{directory} is not a model checkpoint (no {METADATA_FILE}){hint}")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        version = int(data["format_version"])
        if version > FORMAT_VERSION:
            raise UserInputError(
                f"{path}: format version {version} is newer than this code reads ({FORMAT_VERSION}); "
                "update megatron_renio"
            )
        tokenizer, dtype, padded = data["tokenizer_dir"], data["dtype"], data["padded_vocab_size"]
        preset = ModelPreset.from_dict(data["preset"])
        if not (isinstance(dtype, str) and dtype in DTYPES):
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if type(padded) is not int or padded < preset.vocab_size:
            raise ValueError(f"padded_vocab_size must be an integer of at least the preset's vocab_size "
                             f"({preset.vocab_size}), got {padded!r}")
        metadata = CheckpointMetadata(
            directory=directory,
            format_version=version,
            preset=preset,
            dtype=dtype,
            padded_vocab_size=padded,
            tokenizer_dir=None if tokenizer is None else directory / tokenizer,
            saved_layout=dict(data["saved_layout"]),
            extra=dict(data["extra"]),
        )
    except UserInputError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        detail = e.msg if isinstance(e, json.JSONDecodeError) else f"{type(e).__name__}: {e}"
        raise UserInputError(f"{path}: corrupt checkpoint metadata ({detail})") from None
    if metadata.tokenizer_dir is not None and not metadata.tokenizer_dir.is_dir():
        raise UserInputError(f"{directory}: the tokenizer folder {tokenizer}/ named in {METADATA_FILE} is missing")
    return metadata


def _rope_frequencies(preset: ModelPreset):
    """The inverse RoPE frequencies ``build_gpt_model`` gives a model of ``preset`` (on the CPU):
    Megatron's ``RotaryEmbedding``, then the builder's llama3 scaling when the preset has one."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_renio.models.builder import apply_llama3_rope_scaling

    rope = RotaryEmbedding(preset.head_dim, 1.0, rotary_base=preset.rope_theta, use_cpu_initialization=True)
    if preset.rope_scaling is not None:
        apply_llama3_rope_scaling(rope, preset)
    return rope.inv_freq


def _mismatches(model, preset: ModelPreset) -> list[str]:
    """Fields where the built model differs from the checkpoint's preset.

    ``rope_scaling`` is seen in the model's inverse RoPE frequencies (they are all a built model keeps
    of it), compared with those of the model's own ``rope_theta`` and ``head_dim`` under the
    checkpoint's scaling. ``max_position_embeddings`` is not compared: with RoPE it changes no weight
    and no result, and a run builds its model for its own ``--seq-length``.
    """
    import torch

    config = model.config
    pairs = {
        "num_layers": (config.num_layers, preset.num_layers),
        "hidden_size": (config.hidden_size, preset.hidden_size),
        "ffn_hidden_size": (config.ffn_hidden_size, preset.ffn_hidden_size),
        "num_attention_heads": (config.num_attention_heads, preset.num_attention_heads),
        "num_query_groups": (config.num_query_groups or config.num_attention_heads, preset.num_query_groups),
        "head_dim": (config.kv_channels, preset.head_dim),
        "qk_layernorm": (bool(config.qk_layernorm), preset.qk_layernorm),
        "add_qkv_bias": (bool(config.add_qkv_bias), preset.add_qkv_bias),
        "rms_norm_eps": (config.layernorm_epsilon, preset.rms_norm_eps),
        "tie_word_embeddings": (model.share_embeddings_and_output_weights, preset.tie_word_embeddings),
        "rope_theta": (float(model.rotary_base), preset.rope_theta),
    }
    result = [
        f"{name} {ckpt} (checkpoint) vs {built} (model)" for name, (built, ckpt) in pairs.items() if built != ckpt
    ]
    expected = _rope_frequencies(preset.replace(rope_theta=float(model.rotary_base), head_dim=config.kv_channels))
    if not torch.allclose(model.rotary_pos_emb.inv_freq.float().cpu(), expected, rtol=1e-5, atol=0):
        result.append(f"rope_scaling {preset.to_dict()['rope_scaling']} (checkpoint) vs other RoPE frequencies (model)")
    if model.vocab_size < preset.vocab_size:
        result.append(f"vocab_size {preset.vocab_size} (checkpoint) > {model.vocab_size} (model)")
    return result


def load_model_checkpoint(model, directory: str | Path, fully_parallel: bool = False) -> CheckpointMetadata:
    """Load a model checkpoint into ``model`` (this rank's stage, any TP/PP layout). Collective.

    The checkpoint's preset must describe the model's architecture; every tensor the model asks for
    must be in the checkpoint and every checkpoint tensor must be used (as
    ``torch.nn.Module.load_state_dict(strict=True)``). ``fully_parallel``: see :func:`load_sharded`.
    Returns the checkpoint's metadata.
    """
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.utils import unwrap_model

    metadata = read_checkpoint_metadata(directory)
    module = unwrap_model(model)
    mismatches = _mismatches(module, metadata.preset)
    if mismatches:
        raise UserInputError(f"{directory} does not fit the model: {'; '.join(mismatches)}")
    state_dict = load_part(_sharded_state_dict(module), Path(directory) / MODEL_SUBDIR, "the model weights",
                           fully_parallel, strict=StrictHandling.RAISE_ALL)
    module.load_state_dict(state_dict, strict=True)
    return metadata


def load_part(request: dict, directory: str | Path, what: str, fully_parallel: bool = False, **kwargs) -> dict:
    """Collective: :func:`load_sharded` of ``request`` from ``directory``, which holds ``what`` (for the
    message). A folder that cannot be loaded (a file missing, torn, or of another model) is one line
    naming it, raised on every rank (:func:`~megatron_renio.distributed.raise_if_any_rank`: the first
    failing rank's line; no rank goes on into the next collective)."""
    from torch.distributed.checkpoint.api import CheckpointException

    state, error = None, None
    try:
        state = load_sharded(request, directory, fully_parallel, **kwargs)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        error = UserInputError(f"{directory}: cannot load {what}, missing or corrupt files ({describe_load_error(e)})")
    raise_if_any_rank(error)
    return state


def describe_load_error(error: BaseException) -> str:
    """One short line for a load failure; torch DCP wraps per-rank failures, name the first."""
    from torch.distributed.checkpoint.api import CheckpointException

    prefix = ""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (error, _) = next(iter(error.failures.items()))
        prefix = f"rank {rank}: "
    detail = " ".join(str(error).split())[:300]
    return prefix + type(error).__name__ + (f": {detail}" if detail else "")
