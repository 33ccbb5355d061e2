"""Streaming safetensors I/O for checkpoint conversion: one tensor in memory at a time.

Reading: :func:`scan` parses the headers of every ``*.safetensors`` file of a Hugging Face model
folder (through ``model.safetensors.index.json`` when present) and validates them without
reading any tensor data; a :class:`FileReader` then reads one tensor at a time with plain file
reads, into a fresh tensor or straight into its final place (e.g. a slice of a Megatron
parameter). Nothing is memory-mapped, so a file's pages never linger in the process's resident
memory while the next file is read. A missing, corrupt or truncated file, a
tensor listed twice, or an index that disagrees with the files is a one-line
:class:`~megatron_renio.errors.UserInputError` naming the file.

Writing: :func:`write_sharded` writes ``model-0000K-of-0000N.safetensors`` files of at most
``max_shard_bytes`` each (a single larger tensor gets a file of its own) plus
``model.safetensors.index.json``. Tensors come from zero-argument callables that are called one
at a time while the file is written, so a whole shard is never held in memory.

This module imports torch lazily: :func:`scan` runs before any heavy import, so that bad input
is reported in a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_renio.errors import UserInputError
from megatron_renio.output_paths import fsync

INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9
_MAX_HEADER_BYTES = 100 * 2**20

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype code, shape and absolute byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one file's header; the entries are ordered by their offset in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UserInputError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise UserInputError(
                    f"{path}: corrupt or truncated safetensors file (header of {header_len} bytes, "
                    f"file of {size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: corrupt safetensors header ({e})") from None

    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start)
    ordered = sorted(entries.values(), key=lambda e: e.begin)
    expected_end = data_start + sum(e.end - e.begin for e in ordered)
    for previous, entry in zip(ordered, ordered[1:]):
        if entry.begin < previous.end:
            raise UserInputError(
                f"{path}: corrupt safetensors header (tensors {previous.name} and {entry.name} overlap)"
            )
    if size < expected_end:
        raise UserInputError(
            f"{path}: truncated safetensors file ({size} bytes, the header describes {expected_end})"
        )
    return {e.name: e for e in ordered}


def _entry(path: Path, name: str, info, data_start: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise UserInputError(f"{path}: corrupt safetensors header (bad entry for tensor {name!r})") from None
    if end - begin != math.prod(shape) * DTYPES[dtype][1]:
        raise UserInputError(
            f"{path}: corrupt safetensors header (tensor {name!r}: {end - begin} bytes for shape "
            f"{list(shape)} {dtype})"
        )
    return TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)


def _not_a_file(path: Path) -> str:
    """Why ``path`` is not a file to read, as the end of a sentence naming it."""
    if path.is_symlink() and not path.exists():
        return f"is a broken symbolic link (to {os.readlink(path)})"
    return "is not a file" if path.exists() else "does not exist"


def scan(model_dir: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a Hugging Face model folder, by name, in file then offset order.

    Uses ``model.safetensors.index.json`` when present (every file it names must exist and hold
    exactly the tensors the index assigns to it), every ``*.safetensors`` file otherwise.
    """
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_index(index_path)
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise UserInputError(
                f"no *.safetensors files in {model_dir} (only safetensors checkpoints are supported)"
            )
    entries: dict[str, TensorEntry] = {}
    for file_name in files:
        path = model_dir / file_name
        if not path.is_file():  # the index's entry, or what the glob found (an HF cache's dangling link)
            where = f"{index_path}: lists {file_name}, which" if weight_map is not None else str(path)
            raise UserInputError(f"{where} {_not_a_file(path)}")
        for name, entry in read_header(path).items():
            if name in entries:
                raise UserInputError(f"tensor {name} is stored twice: in {entries[name].file.name} and {file_name}")
            if weight_map is not None and weight_map.get(name) != file_name:
                raise UserInputError(
                    f"{index_path}: disagrees with {file_name}, which holds tensor {name} "
                    f"(the index says {weight_map.get(name, 'nothing')})"
                )
            entries[name] = entry
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(entries))
        if absent:
            raise UserInputError(
                f"{index_path}: lists tensor {absent[0]} in {weight_map[absent[0]]}, which does not hold it"
            )
    return entries


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and "/" not in v for v in weight_map.values()
        ):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserInputError(f"{index_path}: corrupt index (expected a 'weight_map' of tensor -> file)") from None
    return weight_map


class FileReader:
    """Reads tensors of one safetensors file with plain file reads (no memory map).

    Use as a context manager; :meth:`read` takes entries from :func:`scan` for this file, best in
    offset order (then the reads are sequential).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    def __enter__(self) -> "FileReader":
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise UserInputError(f"{self.path}: cannot read ({e.strerror})") from None
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def read(self, entry: TensorEntry, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """The tensor of ``entry``, read into ``out`` when given (a contiguous CPU tensor of the
        entry's dtype and size, any shape) or into a fresh tensor."""
        import torch

        dtype = getattr(torch, DTYPES[entry.dtype][0])
        if out is None:
            out = torch.empty(entry.shape, dtype=dtype)
        elif not (out.is_contiguous() and out.dtype == dtype and out.device.type == "cpu"
                  and out.numel() * out.element_size() == entry.end - entry.begin):
            raise ValueError(f"{entry.name}: cannot read into a {out.dtype} {tuple(out.shape)} {out.device} tensor")
        buffer = out.detach().reshape(-1).view(torch.uint8).numpy()
        try:
            self._file.seek(entry.begin)
            complete = self._file.readinto(buffer) == entry.end - entry.begin
        except OSError as e:
            raise UserInputError(f"{self.path}: cannot read ({e.strerror})") from None
        if not complete:
            raise UserInputError(f"{self.path}: truncated safetensors file (tensor {entry.name} is cut off)")
        return out


def dtype_code(dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    name = str(dtype).removeprefix("torch.")
    for code, (torch_name, _) in DTYPES.items():
        if torch_name == name:
            return code
    raise ValueError(f"dtype {dtype} has no safetensors code")


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its name, shape and dtype up front, its data from ``produce()`` later."""

    name: str
    shape: tuple[int, ...]
    dtype: "torch.dtype"
    produce: Callable[[], "torch.Tensor"]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[dtype_code(self.dtype)][1]


def write_sharded(
    out_dir: str | Path, tensors: list[PendingTensor], max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[Path]:
    """Write ``tensors`` in order into shards of at most ``max_shard_bytes`` plus the index.

    Returns the shard paths. Each produced tensor must have the announced shape and dtype.
    """
    out_dir = Path(out_dir)
    shards: list[list[PendingTensor]] = []
    shard_bytes = 0
    for tensor in tensors:
        if not shards or (shard_bytes + tensor.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            shard_bytes = 0
        shards[-1].append(tensor)
        shard_bytes += tensor.nbytes

    paths, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _write_file(path, shard)
        weight_map.update({t.name: path.name for t in shard})
        paths.append(path)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _write_file(path: Path, tensors: list[PendingTensor]) -> None:
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": dtype_code(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            data = t.produce()
            if tuple(data.shape) != tuple(t.shape) or data.dtype != t.dtype:
                raise RuntimeError(
                    f"{t.name}: produced {tuple(data.shape)} {data.dtype}, announced {t.shape} {t.dtype}"
                )
            f.write(data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    fsync(path)
