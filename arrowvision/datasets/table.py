"""``arrowvision embed TABLE --column image``: a Parquet table's image column -> the embeddings dataset.

The table is one Parquet file, a folder of them (recursive; ``_``/``.`` names skipped, as dataset
readers do) or a glob. Record batches are read one at a time (``read_rows`` rows, unbuffered
reads) and flow into ``embed_stream``, which decodes one model batch ahead, so memory holds a few
batches whatever the table's size, plus what Arrow's Parquet reader keeps of the current row group
(measured: about its column chunk, ~1.2x; see benchmarks/arrow.py). The dataset is ``embed``'s (``writer``): resumable, chunked, atomic, errors in
``_errors/``. A row's identity is ``--id-column``'s value, else ``FILE#ROW`` (the resolved file
and the row's number in it); the id column and ``--keep-columns`` are copied to each row.
"""

from __future__ import annotations

import glob as globlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ArrowVisionError
from ..arrow.columns import image_sources

READ_ROWS = 256  # rows per record batch read: ~15 MB of 640x480 JPEGs
DATASET_COLUMNS = ("path", "relpath", "embedding", "width", "height", "sha256")  # the writer's own


@dataclass
class TableRow:
    """One table row as the writer's ``Row``, with its own relpath and copied columns."""

    path: str  # identity: the id column's value, or FILE#ROW
    relpath: str
    extras: dict[str, Any] = field(default_factory=dict)
    width: int = 0
    height: int = 0
    digest: str = ""
    error: str = ""
    embedding: Any = None


def table_files(source: str) -> list[str]:
    """A Parquet file, a folder of them (recursive) or a glob -> resolved paths, sorted."""
    path = Path(source)
    if path.is_dir():
        files = [p for p in path.rglob("*.parquet")
                 if not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts)]
    elif any(ch in source for ch in "*?["):
        files = [Path(p) for p in globlib.glob(source, recursive=True) if Path(p).is_file()]
    elif path.is_file():
        files = [path]
    else:
        raise ArrowVisionError(f"{source}: no such Parquet file, folder or matching glob")
    if not files:
        raise ArrowVisionError(f"{source}: no Parquet files found")
    return sorted(str(f.resolve()) for f in files)


def check_columns(files: Sequence[str], column: str, id_column: str | None, keep: Sequence[str]) -> list[pa.Field]:
    """Every file must hold the named columns (one clear error naming the file and what it has);
    -> the fields copied to the dataset (the id column first, then ``keep``)."""
    for name in ([id_column] if id_column else []) + list(keep):
        if name in DATASET_COLUMNS:
            raise ArrowVisionError(f"--keep-columns/--id-column {name!r}: the dataset has its own {name!r} column; "
                                   "rename it in the table")
    copied: list[pa.Field] = []
    for number, file in enumerate(files):
        try:
            schema = pq.read_schema(file)
        except (pa.ArrowException, OSError) as exc:
            raise ArrowVisionError(f"{file}: not a readable Parquet file ({exc})") from None
        missing = [name for name in [column, id_column, *keep] if name and name not in schema.names]
        if missing:
            raise ArrowVisionError(f"{file}: no column {', '.join(map(repr, missing))} (it has: {', '.join(schema.names)})")
        if number == 0:
            copied = [schema.field(name) for name in dict.fromkeys(([id_column] if id_column else []) + list(keep))]
    return copied


def read_rows(files: Sequence[str], column: str, id_column: str | None, copied: Sequence[pa.Field],
              relpath: Any, skip: Any, read_rows: int = READ_ROWS, stop: threading.Event | None = None
              ) -> Iterator[tuple[TableRow, Any, str]]:
    """(row, image source, label) for every row ``skip(identity)`` does not leave out, streamed
    one record batch at a time. A null id or one seen before is the row's error, not a skip."""
    names = list(dict.fromkeys([column, *(f.name for f in copied)]))
    seen: set[str] = set()
    for file in files:
        shown = relpath(file)
        start = 0
        for batch in pq.ParquetFile(file, buffer_size=1 << 20, pre_buffer=False).iter_batches(batch_size=read_rows, columns=names):
            if stop is not None and stop.is_set():
                return
            sources = image_sources(batch.column(column))
            extras = batch.select([f.name for f in copied]).to_pylist() if copied else [{}] * batch.num_rows
            ids = batch.column(id_column).to_pylist() if id_column else None
            for i, source in enumerate(sources):
                where = f"{file}#{start + i}"
                identity = where if ids is None or ids[i] is None else str(ids[i])
                if skip(identity):
                    continue
                row = TableRow(identity, shown + f"#{start + i}" if ids is None else identity, extras[i])
                if ids is not None and ids[i] is None:
                    row.path, row.relpath, row.error = where, f"{shown}#{start + i}", f"{where}: null {id_column!r}"
                elif identity in seen:
                    row.path, row.relpath = where, f"{shown}#{start + i}"
                    row.error = f"{where}: {id_column} {identity!r} repeats an earlier row's"
                seen.add(identity)
                yield row, None if row.error else source, f"{shown}#{start + i}"
            start += batch.num_rows


def total_rows(files: Sequence[str]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def embed_table(encoder: Any, source: str, output: str | os.PathLike, *, column: str, id_column: str | None = None,
                keep_columns: Sequence[str] = (), batch_size: int = 32, chunk_size: int = 1024, workers: int = 2,
                decode: str = "exact", normalize: bool = True, skip_failed: bool = False, progress: bool = True,
                stop: threading.Event | None = None) -> Any:
    """Embed ``column`` of the Parquet table ``source`` into the dataset folder ``output``,
    resuming where a previous run stopped. Returns ``pipeline.EmbedStats``."""
    from ..arrow.columns import embed_stream
    from ..util.interrupts import stop_on_signals
    from ..util.progress import progress_bar
    from .pipeline import EmbedStats, relpath_function
    from .writer import ChunkBuffer, EmbeddingWriter, dataset_metadata

    if batch_size < 1 or chunk_size < 1:
        raise ArrowVisionError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    files = table_files(source)
    copied = check_columns(files, column, id_column, keep_columns)
    metadata = {**dataset_metadata(encoder, sketch=False, normalize=normalize), "source_column": column}
    stats, stop = EmbedStats(), stop or threading.Event()
    root = Path(source) if Path(source).is_dir() else Path(files[0]).parent
    relpath = relpath_function(root)

    def skip(identity: str) -> bool:
        if identity in writer.done:
            stats.skipped += 1
            return True
        if skip_failed and identity in writer.failed:
            stats.failed += 1
            stats.errors.append((identity, writer.failed[identity]))
            return True
        return False

    def count_model(seconds: float) -> None:
        stats.inference_seconds += seconds

    rows = read_rows(files, column, id_column, copied, relpath, skip, stop=stop)
    bar = progress_bar(total_rows(files), progress, "embedding", "img")
    started = time.perf_counter()
    writer = EmbeddingWriter(output, encoder.embedding_dim, metadata, copied)  # the folder is this run's until closed
    chunks = ChunkBuffer(writer, chunk_size, lambda path: path)
    try:
        with stop_on_signals(stop):
            stream = embed_stream(encoder, rows, batch_size=batch_size, workers=workers, decode=decode,
                                  normalize=normalize, digest=True, on_model=count_model)
            write_batches((_filled(keys, prepared, vectors) for keys, prepared, vectors in stream),
                          chunks, stats, bar, stop)
    finally:
        bar.close()
        writer.close()
    stats.seconds = time.perf_counter() - started
    return stats


def _filled(keys: list[TableRow], prepared: Sequence[Any], vectors: Any) -> list[TableRow]:
    """The table rows of one batch with what decoding and the model gave each."""
    done = iter(vectors)
    for row, item in zip(keys, prepared):
        row.error = row.error or item.error
        row.width, row.height, row.digest = item.width, item.height, item.digest
        row.embedding = None if row.error else next(done)
    return keys


def write_batches(row_batches: Iterator[Sequence[Any]], chunks: Any, stats: Any, bar: Any, stop: threading.Event) -> None:
    """Both column engines' write loop: each batch of rows into the chunk buffer, counted and
    shown, until the input ends or ``stop`` is set; then what is buffered is written."""
    for rows in row_batches:
        good, bad = chunks.add(rows)
        stats.count(good, bad)
        bar.update(len(rows))
        if stop.is_set():
            break
    stats.interrupted = stop.is_set()
    chunks.flush()
