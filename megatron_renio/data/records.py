"""Reading the records (rows) of data files: JSON lines, JSON arrays, gzip-compressed JSON, parquet.

:func:`read_rows` yields one :class:`Row` per record of a file, in file order. The format comes
from the file's extension; each caller names the extensions it accepts:

* ``.jsonl``, ``.jsonl.gz``: one JSON object per line, UTF-8; blank lines are skipped; a row's
  number is its 1-based physical line number;
* ``.json``, ``.json.gz``: one JSON array of objects when the text starts with ``[`` (a row's
  number is its 1-based position in the array), else JSON lines as above;
* ``.parquet``: one row per record, 1-based row numbers; read with pyarrow, or with pandas when
  pyarrow is not installed.

Every row is a JSON object (a dict). Every problem with a file (unknown extension, unreadable
file, no parquet reader installed, invalid UTF-8, malformed JSON, a record that is not an object)
raises :class:`~megatron_renio.errors.UserInputError` with one line naming the file and, where
there is one, the line, record or row.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from megatron_renio.errors import UserInputError

_JSON_ARRAY_EXTENSIONS = (".json", ".json.gz")
# Every extension :func:`read_rows` reads (what eval, score and analyze accept).
RECORD_EXTENSIONS = (".jsonl", ".jsonl.gz", *_JSON_ARRAY_EXTENSIONS, ".parquet")


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
    all; a hint only, ignored when pandas reads the file).

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
            lines: Iterable[bytes] = file
            if path.endswith(_JSON_ARRAY_EXTENSIONS):  # one JSON array, or JSON lines
                data = file.read()
                if data.lstrip().startswith(b"["):
                    array = _parse_json(_decode_utf8(data, line_where), line_where)
                    for number, value in enumerate(array, start=1):
                        yield _row(value, number, f"{path} record {number}")
                    return
                lines = io.BytesIO(data)
            for number, raw in enumerate(lines, start=1):
                line = _decode_utf8(raw.rstrip(b"\r\n"), line_where, first_line=number)  # without its line end
                if line.strip():
                    yield _row(_parse_json(line, line_where, first_line=number), number, line_where(number))
    except (OSError, EOFError, zlib.error) as exc:  # unreadable file, broken gzip header or stream
        raise UserInputError(f"{path}: cannot read ({exc})") from exc


def _decode_utf8(data: bytes, line_where: Callable[[int], str], first_line: int = 1) -> str:
    """``data`` (file text from line ``first_line`` on) decoded as UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise UserInputError(f"{line_where(line)}: not valid UTF-8 ({exc.reason})") from None


def _parse_json(text: str, line_where: Callable[[int], str], first_line: int = 1) -> Any:
    """The JSON value of ``text`` (file text from line ``first_line`` on)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = first_line + exc.lineno - 1
        raise UserInputError(f"{line_where(line)}: malformed JSON ({exc.msg}, column {exc.colno})") from None


def _row(value: Any, number: int, where: str) -> Row:
    if not isinstance(value, dict):
        raise UserInputError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return Row(value, number, where)


def _parquet_rows(path: str, columns: Sequence[str] | None) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    pandas = None
    if pq is None:
        try:
            import pandas
        except ImportError:
            raise UserInputError(f"{path}: reading parquet needs pyarrow or pandas, neither is installed "
                                 "(pip install pyarrow)") from None
    try:
        if pq is not None:
            parquet = pq.ParquetFile(path)
            if columns is not None:
                columns = [name for name in columns if name in parquet.schema_arrow.names]
            records = parquet.read(columns=columns).to_pylist()
        else:
            records = pandas.read_parquet(path).to_dict("records")
    except Exception as exc:  # pyarrow / pandas raise many types (ArrowInvalid, OSError, ...) for broken files
        reason = (str(exc).splitlines() or [""])[0]
        raise UserInputError(f"{path}: cannot read parquet ({type(exc).__name__}: {reason})") from exc
    for number, fields in enumerate(records, start=1):
        yield Row(fields, number, f"{path} row {number}")
