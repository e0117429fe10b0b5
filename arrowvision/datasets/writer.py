"""The embeddings dataset on disk, shared by every engine (local threads, Ray Data).

A dataset folder holds ``part-NNNNN.parquet`` chunks of embedded rows and
``_errors/errors-NNNNN.parquet`` chunks of failed inputs, each written atomically (temp file +
rename) and stamped with the model checksum and preprocessing in the Arrow schema metadata.
Whatever engine wrote a folder, any engine resumes it: ``EmbeddingWriter`` reads back what is
done, ``plan`` leaves it out, and ``ChunkBuffer`` cuts the new rows into chunks of exactly
``chunk_size`` rows (the last one fewer). Only the process that owns the writer writes: on Ray,
the driver, never a worker, so a retried task can never write a row twice; and only one writer
owns a folder at a time (``OutputLock``): a second run into the same folder is refused, since
both would number their chunks alike and replace each other's rows.

Paths are stored as valid UTF-8 (``dataset_text``): a file name with bytes that are not UTF-8
(which Python holds as lone surrogates) is stored with each such byte written ``\\xNN``.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ArrowVisionError, OutputBusy
from ..util.fsutil import atomic_output

META_PREFIX = b"arrowvision."
ERRORS_DIR = "_errors"  # dataset discovery (pyarrow, Spark, Hive) skips "_" folders
LOCK_FILE = ".lock"  # dataset discovery skips "." files too
OWNER_FILE = ".lock.owner.json"  # who holds the lock, for the refusal message


def dataset_text(text: str) -> str:
    """``text`` as valid UTF-8 for the dataset: a byte of a file name that is not UTF-8 (held by
    Python as a lone surrogate, PEP 383) becomes the four characters ``\\xNN``, so the row is kept
    and names its file unambiguously for a reader. Valid text is returned unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes the OS gave us
    except UnicodeEncodeError:  # other lone surrogates (not from a file name): escape them as \udXXX
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


class OutputLock:
    """One writer per dataset folder: an exclusive ``flock`` on ``FOLDER/.lock`` (``filelock``),
    taken without waiting and held until ``release``. The kernel drops it when its process ends,
    however it ends, so the lock of a crashed or killed run is simply free for the next one; the
    owner file beside it only names the holder in the refusal message."""

    def __init__(self, folder: Path, run_id: str, *, write_owner: bool = True):
        from filelock import FileLock, Timeout

        self.folder = folder
        self._lock = FileLock(str(folder / LOCK_FILE), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            raise OutputBusy(f"{folder} is being written by another arrowvision run{self._holder()}; wait for it "
                             "to finish or write to another folder (one writer per output folder)") from None
        self._owns_file = write_owner
        if write_owner:
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            with atomic_output(folder / OWNER_FILE) as tmp:
                Path(tmp).write_text(json.dumps(owner))

    def _holder(self) -> str:
        try:
            owner = json.loads((self.folder / OWNER_FILE).read_text())
            return f" (pid {owner['pid']} on {owner['host']}, since {owner['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def release(self) -> None:
        if self._lock.is_locked:
            if self._owns_file:
                (self.folder / OWNER_FILE).unlink(missing_ok=True)
            self._lock.release()


def ensure_output_free(folder: str | os.PathLike) -> None:
    """Refuse at once (``OutputBusy``) if another run holds ``folder``: checked before the model
    loads, so a refused run costs nothing. The writer still takes the lock for the run itself."""
    folder = Path(folder)
    if folder.is_dir():
        OutputLock(folder, run_id="probe", write_owner=False).release()


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
    latest reason); only ``done`` ones are skipped by a new run. The folder is locked from here
    until ``close`` (or the end of a ``with`` block): a second writer is refused with
    ``OutputBusy``. Error rows carry this run's ``run_id`` and the time they were written."""

    def __init__(self, folder: str | os.PathLike, dim: int, metadata: dict[str, str],
                 extra_fields: Sequence[pa.Field] = ()):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ArrowVisionError(f"{self.folder}: exists and is not a folder; give a new or existing dataset folder")
        try:
            (self.folder / ERRORS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArrowVisionError(f"{self.folder}: cannot create the output folder ({exc.strerror})") from None
        self.run_id = uuid.uuid4().hex[:12]
        self._lock = OutputLock(self.folder, self.run_id)
        try:
            self._open(dim, metadata, extra_fields)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let another run write the folder."""
        self._lock.release()

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open(self, dim: int, metadata: dict[str, str], extra_fields: Sequence[pa.Field]) -> None:
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
            [pa.field("path", pa.string(), nullable=False), pa.field("relpath", pa.string()), pa.field("error", pa.string()),
             pa.field("run_id", pa.string()), pa.field("time", pa.timestamp("ms", tz="UTC"))],
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
                    "path": [dataset_text(r.path) for r in good],
                    "relpath": [dataset_text(_relpath(r, relpath)) for r in good],
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
            self.done.update(table.column("path").to_pylist())
        if bad:
            now_ms = time.time_ns() // 1_000_000
            table = pa.table({"path": [dataset_text(r.path) for r in bad], "relpath": [dataset_text(_relpath(r, relpath)) for r in bad],
                              "error": [dataset_text(r.error) for r in bad], "run_id": [self.run_id] * len(bad),
                              "time": pa.array([now_ms] * len(bad), pa.timestamp("ms", tz="UTC"))}, schema=self.error_schema)
            _atomic_write(table, self.folder / ERRORS_DIR / f"errors-{self.next_index:05d}.parquet")
            self.next_index += 1
            self.failed.update(zip(table.column("path").to_pylist(), table.column("error").to_pylist()))


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
    stored = {p: dataset_text(p) for p in paths}  # how each path is spelled in the dataset
    todo = [p for p in paths if stored[p] not in writer.done and not (skip_failed and stored[p] in writer.failed)]
    prior = [(p, writer.failed[stored[p]]) for p in paths
             if stored[p] not in writer.done and stored[p] in writer.failed] if skip_failed else []
    return Plan(todo, sum(stored[p] in writer.done for p in paths), prior)


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
            if row.path in self._seen or dataset_text(row.path) in self.writer.done:
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
