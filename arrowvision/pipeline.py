"""Corpus embedding: many images in, a resumable Parquet dataset of embeddings out.

Decoding and preprocessing run in a thread pool (Pillow and OpenCV release the GIL) while the
backend runs inference on the previous batch. Results are written in chunks, each an atomic
``part-NNNNN.parquet`` (temp file + rename): after a crash or Ctrl-C the same command skips
every path already in a chunk and never writes a path twice. Bad images go to
``errors-NNNNN.parquet`` chunks with the reason; the run continues.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ArrowVisionError, ImageError
from .fsutil import atomic_output
from .pathlists import LIST_SUFFIXES, read_path_list

MAX_IMAGE_FILE_BYTES = 1 << 30  # read into memory whole; the pixel limit is checked after
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
META_PREFIX = b"arrowvision."


def collect_inputs(source: str) -> list[str]:
    """A folder (recursive), a glob, or a .txt/.csv/.parquet list of paths -> unique paths, in order."""
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    elif any(ch in source for ch in "*?["):
        files = sorted(p for p in globlib.glob(source, recursive=True) if Path(p).is_file())
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        files = read_path_list(path)
    elif path.is_file():
        files = [str(path)]
    else:
        raise ArrowVisionError(f"{source}: no such folder, file or matching glob")
    return list(dict.fromkeys(files))  # unique, order kept


@dataclass
class EmbedStats:
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    inference_seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.embedded + self.failed) / self.seconds if self.seconds else 0.0

    @property
    def model_busy(self) -> float:
        """Share of wall time the model was running: end-to-end vs model-only throughput."""
        return self.inference_seconds / self.seconds if self.seconds else 0.0


@dataclass
class _Item:
    path: str
    pixels: np.ndarray | None
    width: int = 0
    height: int = 0
    digest: str = ""
    error: str = ""
    embedding: np.ndarray | None = None


def _atomic_write(table: pa.Table, path: Path) -> None:
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class EmbeddingWriter:
    """Chunked, atomic, resumable writer of the embeddings dataset folder."""

    def __init__(self, folder: str | os.PathLike, dim: int, metadata: dict[str, str]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.metadata = {META_PREFIX + k.encode(): v.encode() for k, v in metadata.items()}
        self.schema = pa.schema(
            [
                pa.field("path", pa.string(), nullable=False),
                pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
                pa.field("width", pa.int32()),
                pa.field("height", pa.int32()),
                pa.field("sha256", pa.string()),
            ],
            metadata=self.metadata,
        )
        self.error_schema = pa.schema(
            [pa.field("path", pa.string(), nullable=False), pa.field("error", pa.string())], metadata=self.metadata
        )
        self.done = self._existing_paths()
        self.next_index = 1 + max((int(p.stem.split("-")[1]) for p in self.folder.glob("*-*.parquet")), default=-1)

    def _existing_paths(self) -> set[str]:
        done: set[str] = set()
        for part in sorted(self.folder.glob("*-*.parquet")):
            try:
                file = pq.ParquetFile(part)
            except (pa.ArrowException, OSError) as exc:
                raise ArrowVisionError(f"{part}: unreadable chunk in the output folder ({exc})") from None
            existing = file.schema_arrow.metadata or {}
            model = existing.get(META_PREFIX + b"model_checksum")
            if model != self.metadata[META_PREFIX + b"model_checksum"] or existing.get(META_PREFIX + b"sketch") != self.metadata[META_PREFIX + b"sketch"]:
                raise ArrowVisionError(
                    f"{self.folder} holds embeddings from another model or preprocessing ({part.name}); "
                    "use a new output folder"
                )
            done.update(file.read(columns=["path"]).column("path").to_pylist())  # embedded or recorded as bad
        return done

    def write(self, rows: list[_Item]) -> None:
        good = [r for r in rows if not r.error]
        bad = [r for r in rows if r.error]
        if good:
            embeddings = np.stack([r.embedding for r in good]).astype(np.float32)
            table = pa.table(
                {
                    "path": [r.path for r in good],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), self.dim),
                    "width": pa.array([r.width for r in good], pa.int32()),
                    "height": pa.array([r.height for r in good], pa.int32()),
                    "sha256": [r.digest for r in good],
                },
                schema=self.schema,
            )
            _atomic_write(table, self.folder / f"part-{self.next_index:05d}.parquet")
            self.next_index += 1
        if bad:
            table = pa.table({"path": [r.path for r in bad], "error": [r.error for r in bad]}, schema=self.error_schema)
            _atomic_write(table, self.folder / f"errors-{self.next_index:05d}.parquet")
            self.next_index += 1
        self.done.update(r.path for r in rows)


def _decode(path: str, preprocess: Callable[[Any], np.ndarray], transform: Callable | None) -> _Item:
    """Read, decode, (sketch-normalize,) preprocess one file. Every failure, of any exception
    type, becomes an error item: a worker that raised would leave the consumer waiting forever."""
    from .preprocess import load_image

    try:
        if "\0" in path:
            return _Item(path, None, error=f"{path!r}: path contains a NUL byte")
        try:
            status = os.stat(path)
            if not stat.S_ISREG(status.st_mode):  # a FIFO or device would block or never end
                return _Item(path, None, error=f"{path}: not a regular file")
            if status.st_size > MAX_IMAGE_FILE_BYTES:
                return _Item(path, None, error=f"{path}: {status.st_size} bytes, larger than the {MAX_IMAGE_FILE_BYTES} allowed")
            data = Path(path).read_bytes()
        except OSError as exc:
            return _Item(path, None, error=f"cannot read: {exc.strerror}")
        image = load_image(data, name=path)
        width, height = image.size
        if transform is not None:
            image = transform(image)
        return _Item(path, preprocess(image), width, height, hashlib.sha256(data).hexdigest())
    except ImageError as exc:
        return _Item(path, None, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is this row's failure, not the job's
        return _Item(path, None, error=f"{path}: {exc or type(exc).__name__}")


class _WorkerDied:
    """Put on the batch queue instead of a batch when the decoding thread itself fails."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def embed_paths(
    encoder: Any,
    paths: list[str],
    output: str | os.PathLike,
    *,
    batch_size: int = 32,
    chunk_size: int = 1024,
    workers: int = 2,
    sketch: bool = False,
    progress: bool = True,
    normalize: bool = True,
) -> EmbedStats:
    """Embed ``paths`` into the dataset folder ``output``, resuming where a previous run stopped."""
    from tqdm import tqdm

    from .encoder import l2_normalize
    from .preprocess import normalize_sketch_image

    metadata = {
        "model_checksum": encoder.checksum,
        "family": encoder.config.family,
        "dim": str(encoder.embedding_dim),
        "sketch": str(bool(sketch)).lower(),
        "normalized": str(bool(normalize)).lower(),
    }
    writer = EmbeddingWriter(output, encoder.embedding_dim, metadata)
    stats = EmbedStats()
    todo = [p for p in paths if p not in writer.done]
    stats.skipped = len(paths) - len(todo)
    transform = normalize_sketch_image if sketch else None
    batches: queue.Queue = queue.Queue(maxsize=2)  # decoded batches waiting for the model
    stop = threading.Event()

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                for start in range(0, len(todo), batch_size):
                    if stop.is_set():
                        break
                    chunk = todo[start : start + batch_size]
                    batches.put(list(pool.map(lambda p: _decode(p, encoder.preprocessor.pixels, transform), chunk)))
        except BaseException as exc:  # noqa: BLE001 - reported by the consumer, which would wait forever
            batches.put(_WorkerDied(exc))
            return
        batches.put(None)

    start_time = time.perf_counter()
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    pending: list[_Item] = []
    bar = tqdm(total=len(todo), unit="img", desc="embedding", disable=not progress, dynamic_ncols=True)
    try:
        while (items := batches.get()) is not None:
            if isinstance(items, _WorkerDied):
                if pending:
                    writer.write(pending)  # keep every finished row
                    pending = []
                exc = items.exc
                raise ArrowVisionError(f"a decoding worker died ({type(exc).__name__}: {exc}); finished chunks are kept, rerun to resume")
            good = [item for item in items if not item.error]
            if good:
                tick = time.perf_counter()
                vectors = encoder.backend(np.stack([item.pixels for item in good]))
                stats.inference_seconds += time.perf_counter() - tick
                vectors = l2_normalize(vectors) if normalize else vectors
                for item, vector in zip(good, vectors):
                    item.embedding, item.pixels = vector, None  # the pixels are not needed any more
            for item in items:
                if item.error:
                    stats.failed += 1
                    stats.errors.append((item.path, item.error))
                else:
                    stats.embedded += 1
            pending += items
            if len(pending) >= chunk_size:
                writer.write(pending)
                pending = []
            bar.update(len(items))
        if pending:
            writer.write(pending)
    finally:
        stop.set()
        bar.close()
        while producer.is_alive():  # unblock and finish the producer on Ctrl-C
            try:
                batches.get_nowait()
            except queue.Empty:
                producer.join(0.05)
    stats.seconds = time.perf_counter() - start_time
    return stats


def part_files(dataset: str | os.PathLike) -> list[Path]:
    """The embedding chunks of a dataset folder (or a single part file given directly)."""
    dataset = Path(dataset)
    parts = sorted(dataset.glob("part-*.parquet")) if dataset.is_dir() else [dataset]
    if not parts or not parts[0].is_file():
        raise ArrowVisionError(f"{dataset}: no embeddings (part-*.parquet) found")
    return parts


def read_embeddings(folder: str | os.PathLike) -> pa.Table:
    """All embedded rows of a dataset folder (any Parquet reader can do the same)."""
    return pa.concat_tables(pq.read_table(p) for p in part_files(folder))


def iter_embedding_batches(folder: str | os.PathLike, batch_rows: int = 65536) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream (paths, embeddings) batches without loading the whole dataset."""
    for part in part_files(folder):
        file = pq.ParquetFile(part)
        for batch in file.iter_batches(batch_size=batch_rows, columns=["path", "embedding"]):
            column = batch.column("embedding")
            dim = column.type.list_size
            vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
            yield batch.column("path").to_pylist(), vectors
