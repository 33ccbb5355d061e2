"""Reading the records (rows) of data files: JSON lines, JSON arrays, gzip-compressed JSON, parquet.

:func:`read_rows` yields one :class:`Row` per record of a file, in file order. The format comes
from the file's extension; each caller names the extensions it accepts:

* ``.jsonl``, ``.jsonl.gz``: one JSON object per line, UTF-8; blank lines are skipped; a row's
  number is its 1-based physical line number;
* ``.json``, ``.json.gz``: one JSON array of objects when the text starts with ``[`` (a row's
  number is its 1-based position in the array), else JSON lines as above;
* ``.parquet``: one row per record, 1-based row numbers; read with pyarrow.

A UTF-8 byte order mark at the start of a JSON file is skipped.

Every row is a JSON object (a dict). Every problem with a file (unknown extension, unreadable
file, no parquet reader installed, invalid UTF-8, malformed JSON, JSON nested deeper than Python's
recursion limit, a record that is not an object, a string anywhere in a record, keys included, that
holds a lone UTF-16 surrogate escape such as ``"\\ud800"``: valid JSON, but no text a tokenizer
takes) raises :class:`~megatron_renio.errors.UserInputError` with one line naming the file and,
where there is one, the line, record or row, and the field.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import json
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from megatron_renio.errors import UserInputError

_JSON_ARRAY_EXTENSIONS = (".json", ".json.gz")
# Every extension :func:`read_rows` reads (what eval, score and analyze accept).
RECORD_EXTENSIONS = (".jsonl", ".jsonl.gz", *_JSON_ARRAY_EXTENSIONS, ".parquet")
# Surrogate code points, which only a JSON escape can put into a decoded string (UTF-8 text cannot
# hold them); JSON text without such an escape needs no search of its strings.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


@dataclasses.dataclass(frozen=True)
class Row:
    """One record: its ``fields``, its 1-based line / record / row ``number``, and ``where`` it is,
    e.g. ``"data.jsonl line 3"`` or ``"data.parquet row 2"``, for the caller's messages."""

    fields: dict[str, Any]
    number: int
    where: str


def read_rows(path: str, extensions: Sequence[str], *, parquet_columns: Sequence[str] | None = None) -> Iterator[Row]:
    """The rows of the file at ``path``, whose name must end with one of ``extensions``.

    ``parquet_columns``: read only those of these columns that the parquet file has (None reads
    all).

    The extension is checked at once; every other problem raises :class:`UserInputError` while
    iterating.
    """
    if not path.endswith(tuple(extensions)):
        raise UserInputError(
            f"{path}: unknown format (unknown extension, expected one of {', '.join(extensions)})"
        )
    if path.endswith(".parquet"):
        return _parquet_rows(path, parquet_columns)
    return _json_rows(path, lambda number: f"{path} line {number}")


def _json_rows(path: str, line_where: Callable[[int], str]) -> Iterator[Row]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            if file.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:  # a byte order mark is no record text
                file.seek(0)
            lines: Iterable[bytes] = file
            if path.endswith(_JSON_ARRAY_EXTENSIONS):  # one JSON array, or JSON lines
                data = file.read()
                if data.lstrip().startswith(b"["):
                    text = _decode_utf8(data, line_where)
                    array = _parse_json(text, line_where, whole=path)
                    escaped = bool(_SURROGATE_ESCAPE.search(text))
                    for number, value in enumerate(array, start=1):
                        yield _row(value, number, f"{path} record {number}", escaped)
                    return
                lines = io.BytesIO(data)
            for number, raw in enumerate(lines, start=1):
                line = _decode_utf8(raw.rstrip(b"\r\n"), line_where, first_line=number)  # without its line end
                if line.strip():
                    value = _parse_json(line, line_where, first_line=number)
                    yield _row(value, number, line_where(number), bool(_SURROGATE_ESCAPE.search(line)))
    except (OSError, EOFError, zlib.error) as exc:  # unreadable file, broken gzip header or stream
        raise UserInputError(f"{path}: cannot read ({exc})") from exc


def _decode_utf8(data: bytes, line_where: Callable[[int], str], first_line: int = 1) -> str:
    """``data`` (file text from line ``first_line`` on) decoded as UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise UserInputError(f"{line_where(line)}: not valid UTF-8 ({exc.reason})") from None


class _DuplicateKey(ValueError):
    """A JSON object names a key twice (``json`` would keep the last value silently)."""


def _object_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The dict of a JSON object's ``pairs``; :class:`_DuplicateKey` when a key comes twice."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return obj


def _parse_json(text: str, line_where: Callable[[int], str], first_line: int = 1, whole: str | None = None) -> Any:
    """The JSON value of ``text`` (file text from line ``first_line`` on); ``whole`` names all of
    ``text`` where no line can be told (default: line ``first_line``). An object that names a key
    twice is refused, not read with its last value."""
    where = whole or line_where(first_line)
    try:
        return json.loads(text, object_pairs_hook=_object_of)
    except json.JSONDecodeError as exc:
        line = first_line + exc.lineno - 1
        raise UserInputError(f"{line_where(line)}: malformed JSON ({exc.msg}, column {exc.colno})") from None
    except _DuplicateKey as exc:
        raise UserInputError(f"{where}: field {exc.args[0]!r} given twice in one object") from None
    except ValueError:  # the one other ValueError of json.loads, with no position
        raise UserInputError(f"{where}: a JSON integer has more than {sys.get_int_max_str_digits()} digits, more "
                             "than Python reads") from None
    except RecursionError:  # json gives no position
        raise UserInputError(f"{where}: JSON nested too deeply (deeper than Python's recursion limit)") from None


def _row(value: Any, number: int, where: str, escaped: bool) -> Row:
    """The row of the JSON ``value``; ``escaped``: its JSON text holds a ``\\uD800``-``\\uDFFF`` escape."""
    if not isinstance(value, dict):
        raise UserInputError(f"{where}: expected a JSON object, got {type(value).__name__}")
    if escaped:
        for field, field_value in value.items():
            _check_text(field, field_value, where)
    return Row(value, number, where)


def _check_text(field: str, value: Any, where: str) -> None:
    """Refuse a lone surrogate in ``field``'s name or in any string of its ``value`` (walked without
    recursion: the value may nest as deeply as the JSON parser allows)."""
    pending = [field, value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                name = field.encode("utf-8", "backslashreplace").decode("utf-8")
                raise UserInputError(
                    f"{where}: field '{name}' holds \\u{ord(found.group()):04x}, half of a UTF-16 surrogate pair "
                    "(a character cut in two), which is not text"
                )
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def _parquet_rows(path: str, columns: Sequence[str] | None) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # a declared dependency; an environment may still lack it
        raise UserInputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
        if columns is not None:
            columns = [name for name in columns if name in parquet.schema_arrow.names]
        records = parquet.read(columns=columns).to_pylist()
    except Exception as exc:  # pyarrow raises many types (ArrowInvalid, OSError, ...) for broken files
        reason = (str(exc).splitlines() or [""])[0]
        raise UserInputError(f"{path}: cannot read parquet ({type(exc).__name__}: {reason})") from exc
    for number, fields in enumerate(records, start=1):
        yield Row(fields, number, f"{path} row {number}")
