"""Reading lists of input paths (.txt/.lst, .csv, .parquet), which scripts write and nobody checks.

Lists are read line by line with a bound on the line length, decoded as strict UTF-8 per line
(so the error names the right line), and every problem is an ``ArrowVisionError`` saying which
line and why, never a traceback. Odd but readable paths (a NUL byte, a name too long for the
OS) are kept: they fail as rows of the errors table, and the job goes on.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ArrowVisionError

LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # what a folder or glob yields
HEADER_NAMES = {"path", "file", "filename", "file_name", "filepath", "image", "image_path", "img"}
MAX_LINE_BYTES = 64 << 10  # paths are at most 4 KiB on Linux; longer lines mean a wrong file


def read_path_list(path: Path) -> list[str]:
    """The paths listed in ``path`` (one of LIST_SUFFIXES), blanks skipped, in order."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_paths(path)
    try:
        if suffix == ".csv":
            return _csv_paths(path)
        return [line for line in (text.strip() for _, text in _lines(path)) if line and not line.startswith("#")]
    except OSError as exc:
        raise ArrowVisionError(f"{path}: cannot read the list ({exc.strerror})") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, checked line by line."""
    with open(path, "rb") as handle:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise ArrowVisionError(f"{path}: line {number} is longer than {MAX_LINE_BYTES} bytes; is this a list of paths?")
            if number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise ArrowVisionError(f"{path}: the list is UTF-16; save it as UTF-8")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ArrowVisionError(
                    f"{path}: line {number} is not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                    "lists of paths must be UTF-8 text"
                ) from None
            yield number, text.removeprefix("\ufeff") if number == 1 else text


def _csv_paths(path: Path) -> list[str]:
    """The column named like ``path``/``file`` if the header has one, else the first column; a
    first row that names no existing file and has no image extension is a header too."""
    from .urlfetch import is_url

    lines = _lines(path)
    reader = csv.reader(text for _, text in lines)
    try:
        rows = [row for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise ArrowVisionError(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from None
    if not rows:
        return []
    names = [cell.strip().lower() for cell in rows[0]]
    column = next((i for i, name in enumerate(names) if name in HEADER_NAMES), None)
    if column is not None:
        rows = rows[1:]
    else:
        column, first = 0, rows[0][0].strip()
        if not is_url(first) and Path(first).suffix.lower() not in IMAGE_EXTENSIONS and not (path.parent / first).is_file():
            rows = rows[1:]  # a header with other names, e.g. "name,label"
    return [row[column].strip() for row in rows if len(row) > column and row[column].strip()]


def _parquet_paths(path: Path) -> list[str]:
    try:
        file = pq.ParquetFile(path)
        if "path" not in file.schema_arrow.names:
            raise ArrowVisionError(f"{path}: a Parquet list of inputs needs a 'path' column")
        column = file.read(columns=["path"]).column("path")
    except (pa.ArrowException, OSError) as exc:
        raise ArrowVisionError(f"{path}: cannot read the Parquet list ({exc})") from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ArrowVisionError(f"{path}: the 'path' column must hold strings, not {column.type}")
    return [p for p in column.to_pylist() if p]
