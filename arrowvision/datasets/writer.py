"""The embeddings dataset on disk, shared by every engine (local threads, Ray Data).

A dataset folder holds ``part-NNNNN.parquet`` chunks of embedded rows and
``_errors/errors-NNNNN.parquet`` chunks of failed inputs, each written atomically (temp file +
rename) and stamped with the model checksum and preprocessing in the Arrow schema metadata.
Whatever engine wrote a folder, any engine resumes it: ``EmbeddingWriter`` reads back what is
done, ``plan`` leaves it out, and ``ChunkBuffer`` cuts the new rows into chunks of exactly
``chunk_size`` rows (the last one fewer). Only the process that owns the writer writes: on Ray,
the driver, never a worker, so a retried task can never write a row twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ArrowVisionError
from ..util.fsutil import atomic_output

META_PREFIX = b"arrowvision."
ERRORS_DIR = "_errors"  # dataset discovery (pyarrow, Spark, Hive) skips "_" folders


class Row(Protocol):
    """One input's result: ``embedding`` (and size, digest) when it worked, ``error`` when not."""

    path: str
    width: int
    height: int
    digest: str
    error: str
    embedding: np.ndarray | None


def dataset_metadata(encoder: Any, *, sketch: bool, normalize: bool) -> dict[str, str]:
    """What a dataset is stamped with: rows of another model or preprocessing never mix in."""
    return {
        "model_checksum": encoder.checksum,
        "family": encoder.config.family,
        "dim": str(encoder.embedding_dim),
        "sketch": str(bool(sketch)).lower(),
        "normalized": str(bool(normalize)).lower(),
    }


def _atomic_write(table: pa.Table, path: Path) -> None:
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _chunk_index(path: Path) -> int:
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return -1


class EmbeddingWriter:
    """Chunked, atomic, resumable writer of the embeddings dataset folder.

    ``done`` holds the identities already embedded, ``failed`` those recorded as bad (with the
    latest reason); only ``done`` ones are skipped by a new run."""

    def __init__(self, folder: str | os.PathLike, dim: int, metadata: dict[str, str],
                 extra_fields: Sequence[pa.Field] = ()):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ArrowVisionError(f"{self.folder}: exists and is not a folder; give a new or existing dataset folder")
        try:
            (self.folder / ERRORS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArrowVisionError(f"{self.folder}: cannot create the output folder ({exc.strerror})") from None
        self.dim = dim
        self.metadata = {META_PREFIX + k.encode(): v.encode() for k, v in metadata.items()}
        self.schema = pa.schema(
            [
                pa.field("path", pa.string(), nullable=False),
                pa.field("relpath", pa.string()),
                pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
                pa.field("width", pa.int32()),
                pa.field("height", pa.int32()),
                pa.field("sha256", pa.string()),
                *extra_fields,  # embed --column: the id and --keep-columns, from each row's ``extras``
            ],
            metadata=self.metadata,
        )
        self.extra_fields = list(extra_fields)
        self.error_schema = pa.schema(
            [pa.field("path", pa.string(), nullable=False), pa.field("relpath", pa.string()), pa.field("error", pa.string())],
            metadata=self.metadata,
        )
        for legacy in self.folder.glob("errors-*.parquet"):  # written beside the parts by older versions
            os.replace(legacy, self.folder / ERRORS_DIR / legacy.name)
        chunks = sorted(self.folder.glob("part-*.parquet")) + sorted((self.folder / ERRORS_DIR).glob("errors-*.parquet"))
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        for chunk in sorted(chunks, key=_chunk_index):
            self._read_existing(chunk)
        for path in self.done & self.failed.keys():  # failed once, embedded by a later run
            del self.failed[path]
        self.next_index = 1 + max((_chunk_index(p) for p in chunks), default=-1)

    def _read_existing(self, chunk: Path) -> None:
        try:
            file = pq.ParquetFile(chunk)
        except (pa.ArrowException, OSError) as exc:
            raise ArrowVisionError(f"{chunk}: unreadable chunk in the output folder ({exc})") from None
        existing = file.schema_arrow.metadata or {}
        for key in (b"model_checksum", b"sketch"):
            if existing.get(META_PREFIX + key) != self.metadata[META_PREFIX + key]:
                raise ArrowVisionError(
                    f"{self.folder} holds embeddings from another model or preprocessing ({chunk.name}); "
                    "use a new output folder"
                )
        if "error" in file.schema_arrow.names:
            rows = file.read(columns=["path", "error"]).to_pydict()
            self.failed.update(zip(rows["path"], rows["error"]))
        else:
            self.done.update(file.read(columns=["path"]).column("path").to_pylist())

    def write(self, good: Sequence[Row], bad: Sequence[Row], relpath: Callable[[str], str]) -> None:
        """One part chunk for ``good`` and one errors chunk for ``bad`` (either may be empty)."""
        if good:
            embeddings = np.stack([r.embedding for r in good]).astype(np.float32)
            table = pa.table(
                {
                    "path": [r.path for r in good],
                    "relpath": [_relpath(r, relpath) for r in good],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), self.dim),
                    "width": pa.array([r.width for r in good], pa.int32()),
                    "height": pa.array([r.height for r in good], pa.int32()),
                    "sha256": [r.digest for r in good],
                    **{f.name: pa.array([r.extras[f.name] for r in good], f.type) for f in self.extra_fields},
                },
                schema=self.schema,
            )
            _atomic_write(table, self.folder / f"part-{self.next_index:05d}.parquet")
            self.next_index += 1
            self.done.update(r.path for r in good)
        if bad:
            table = pa.table({"path": [r.path for r in bad], "relpath": [_relpath(r, relpath) for r in bad],
                              "error": [r.error for r in bad]}, schema=self.error_schema)
            _atomic_write(table, self.folder / ERRORS_DIR / f"errors-{self.next_index:05d}.parquet")
            self.next_index += 1
            self.failed.update((r.path, r.error) for r in bad)


def _relpath(row: Row, relpath: Callable[[str], str]) -> str:
    """A row's own ``relpath`` (table rows: ``file#row``), else derived from its path."""
    return getattr(row, "relpath", None) or relpath(row.path)


@dataclass
class Plan:
    """What a run has to do: ``todo`` in input order; the rest was done (or failed, and is skipped)."""

    todo: list[str]
    skipped: int
    prior_errors: list[tuple[str, str]] = field(default_factory=list)


def plan(writer: EmbeddingWriter, paths: Sequence[str], skip_failed: bool) -> Plan:
    """Leave out what the dataset already holds; failed inputs are retried unless ``skip_failed``."""
    todo = [p for p in paths if p not in writer.done and not (skip_failed and p in writer.failed)]
    prior = [(p, writer.failed[p]) for p in paths if p not in writer.done and p in writer.failed] if skip_failed else []
    return Plan(todo, sum(p in writer.done for p in paths), prior)


class ChunkBuffer:
    """Rows in, part chunks of exactly ``chunk_size`` rows out (errors ride along with the next
    chunk); ``flush`` writes the remainder. ``add`` drops a row whose path is already in the
    dataset or was added before, so an input delivered twice (a retried task) lands exactly once."""

    def __init__(self, writer: EmbeddingWriter, chunk_size: int, relpath: Callable[[str], str]):
        self.writer, self.chunk_size, self.relpath = writer, chunk_size, relpath
        self.good: list[Row] = []
        self.bad: list[Row] = []
        self._seen: set[str] = set()

    def add(self, rows: Sequence[Row]) -> tuple[list[Row], list[Row]]:
        """Buffer ``rows``; -> the (embedded, failed) rows that were new."""
        fresh = []
        for row in rows:
            if row.path in self._seen or row.path in self.writer.done:
                continue
            self._seen.add(row.path)
            fresh.append(row)
        good = [r for r in fresh if not r.error]
        bad = [r for r in fresh if r.error]
        self.good += good
        self.bad += bad
        while len(self.good) >= self.chunk_size:
            self._write(self.good[: self.chunk_size], self.bad)
            self.good, self.bad = self.good[self.chunk_size :], []
        return good, bad

    def flush(self) -> None:
        if self.good or self.bad:
            self._write(self.good, self.bad)
            self.good, self.bad = [], []

    def _write(self, good: list[Row], bad: list[Row]) -> None:
        self.writer.write(good, bad, self.relpath)
