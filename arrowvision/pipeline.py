"""Corpus embedding: many images in, a resumable Parquet dataset of embeddings out.

Decoding and preprocessing run in a thread pool (Pillow and OpenCV release the GIL) while the
backend runs inference on the previous batch. Results are written in chunks, each an atomic
``part-NNNNN.parquet`` (temp file + rename): after a crash the same command skips every image
already in a chunk and never writes one twice; Ctrl-C/SIGTERM first writes the rows already
embedded as one more chunk. An image's identity is its resolved absolute path, so every spelling
of the same input folder resumes the same dataset. Bad images go to ``_errors/errors-NNNNN.parquet``
(a folder dataset discovery skips, so any Parquet reader sees the embeddings only) and are retried
by the next run.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import queue
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ArrowVisionError, ImageError
from .fsutil import atomic_output
from .pathlists import LIST_SUFFIXES, read_path_list
from .urlfetch import UrlError, UrlFetcher, UrlPolicy, is_url

MAX_IMAGE_FILE_BYTES = 1 << 30  # read into memory whole; the pixel limit is checked after
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
META_PREFIX = b"arrowvision."
ERRORS_DIR = "_errors"  # dataset discovery (pyarrow, Spark, Hive) skips "_" folders


def identity(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """An image's one identity: its resolved absolute path (relative paths resolve against ``base``);
    an http(s) URL is its own identity."""
    if is_url(path):
        return str(path).strip()
    path = Path(os.path.expanduser(os.fspath(path)))
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    try:
        return str(path.resolve())
    except (OSError, ValueError):  # a NUL byte, a symlink loop: kept as given, it fails as a row later
        return os.path.abspath(path)


def input_root(source: str) -> Path:
    """The folder that ``relpath`` values are relative to: the input folder, the folder a glob
    starts from, or the folder of a list file / single image."""
    path = Path(source)
    if path.is_dir():
        return path.resolve()
    if any(ch in source for ch in "*?["):
        fixed = []
        for part in path.parts:
            if any(ch in part for ch in "*?["):
                break
            fixed.append(part)
        return Path(*fixed).resolve() if fixed else Path.cwd()
    return path.resolve().parent


def collect_inputs(source: str) -> list[str]:
    """A folder (recursive), a glob, or a .txt/.csv/.parquet list of paths -> unique resolved
    absolute paths, in order. Relative entries of a list resolve against the list's folder; http(s)
    URLs (in a list, or given directly) are kept as they are."""
    path = Path(source)
    base: Path | None = None
    if is_url(source):
        files = [source]
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    elif any(ch in source for ch in "*?["):
        files = sorted(p for p in globlib.glob(source, recursive=True) if Path(p).is_file())
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        files, base = read_path_list(path), path.resolve().parent
    elif path.is_file():
        files = [str(path)]
    elif path.exists():
        raise ArrowVisionError(f"{source}: not a folder, image, list file or glob")
    else:
        raise ArrowVisionError(f"{source}: no such folder, file or matching glob")
    if not files:
        if base is not None:
            raise ArrowVisionError(f"{source}: the list names no images")
        raise ArrowVisionError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return list(dict.fromkeys(identity(f, base) for f in files))  # unique, order kept


@dataclass
class EmbedStats:
    embedded: int = 0
    skipped: int = 0  # already embedded by an earlier run
    failed: int = 0  # failed now, or failed before and skipped (--skip-failed)
    seconds: float = 0.0
    inference_seconds: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C/SIGTERM (rows embedded so far were written)
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0

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


def _chunk_index(path: Path) -> int:
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return -1


class EmbeddingWriter:
    """Chunked, atomic, resumable writer of the embeddings dataset folder.

    ``done`` holds the identities already embedded, ``failed`` those recorded as bad (with the
    latest reason); only ``done`` ones are skipped by a new run."""

    def __init__(self, folder: str | os.PathLike, dim: int, metadata: dict[str, str]):
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
            ],
            metadata=self.metadata,
        )
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

    def write(self, good: list[_Item], bad: list[_Item], relpath: Callable[[str], str]) -> None:
        """One part chunk for ``good`` and one errors chunk for ``bad`` (either may be empty)."""
        if good:
            embeddings = np.stack([r.embedding for r in good]).astype(np.float32)
            table = pa.table(
                {
                    "path": [r.path for r in good],
                    "relpath": [relpath(r.path) for r in good],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), self.dim),
                    "width": pa.array([r.width for r in good], pa.int32()),
                    "height": pa.array([r.height for r in good], pa.int32()),
                    "sha256": [r.digest for r in good],
                },
                schema=self.schema,
            )
            _atomic_write(table, self.folder / f"part-{self.next_index:05d}.parquet")
            self.next_index += 1
            self.done.update(r.path for r in good)
        if bad:
            table = pa.table({"path": [r.path for r in bad], "relpath": [relpath(r.path) for r in bad],
                              "error": [r.error for r in bad]}, schema=self.error_schema)
            _atomic_write(table, self.folder / ERRORS_DIR / f"errors-{self.next_index:05d}.parquet")
            self.next_index += 1
            self.failed.update((r.path, r.error) for r in bad)


def _decode(path: str, preprocess: Callable[[Any], np.ndarray], transform: Callable | None,
            fetch: Callable[[str], bytes] | None = None) -> _Item:
    """Read (or fetch, for a URL), decode, (sketch-normalize,) preprocess one file. Every failure,
    of any exception type, becomes an error item: a worker that raised would leave the consumer
    waiting forever."""
    from .preprocess import load_image

    try:
        if is_url(path):
            try:
                data = (fetch or UrlFetcher().fetch)(path)
            except UrlError as exc:
                return _Item(path, None, error=str(exc))
            image = load_image(data, name=path)
            width, height = image.size
            if transform is not None:
                image = transform(image)
            return _Item(path, preprocess(image), width, height, hashlib.sha256(data).hexdigest())
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
            return _Item(path, None, error=f"{path}: cannot read ({exc.strerror})")
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


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop`` (the caller finishes its batch and writes what it has); a
    second signal interrupts at once. Only the main thread can handle signals: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handle(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in signals:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    root: str | os.PathLike | None = None,
    skip_failed: bool = False,
    stop: threading.Event | None = None,
    url_policy: UrlPolicy | None = None,
) -> EmbedStats:
    """Embed ``paths`` into the dataset folder ``output``, resuming where a previous run stopped.

    Paths are keyed by their resolved absolute path; ``relpath`` is stored relative to ``root``
    (default: the current folder). Inputs that failed before are retried unless ``skip_failed``;
    either way they count as failed. Every part chunk holds exactly ``chunk_size`` rows (the last
    one fewer). Setting ``stop`` (or SIGINT/SIGTERM in the main thread) ends the run after the
    current batch, with the rows embedded so far written as one more chunk. http(s) URLs among
    ``paths`` are fetched under ``url_policy`` (default: the SSRF guard on); one that fails is a
    row of the errors table."""
    from tqdm import tqdm

    from .encoder import l2_normalize
    from .preprocess import normalize_sketch_image

    if batch_size < 1 or chunk_size < 1:
        raise ArrowVisionError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    metadata = {
        "model_checksum": encoder.checksum,
        "family": encoder.config.family,
        "dim": str(encoder.embedding_dim),
        "sketch": str(bool(sketch)).lower(),
        "normalized": str(bool(normalize)).lower(),
    }
    writer = EmbeddingWriter(output, encoder.embedding_dim, metadata)
    root = Path(root).resolve() if root is not None else Path.cwd()

    def relpath(path: str) -> str:
        return path if is_url(path) else os.path.relpath(path, root)

    stats = EmbedStats()
    paths = list(dict.fromkeys(identity(p) for p in paths))
    todo = [p for p in paths if p not in writer.done and not (skip_failed and p in writer.failed)]
    stats.skipped = sum(p in writer.done for p in paths)
    if skip_failed:
        stats.errors = [(p, writer.failed[p]) for p in paths if p not in writer.done and p in writer.failed]
        stats.failed = len(stats.errors)
    transform = normalize_sketch_image if sketch else None
    fetcher = UrlFetcher(url_policy) if any(is_url(p) for p in todo) else None
    fetch = fetcher.fetch if fetcher else None
    batches: queue.Queue = queue.Queue(maxsize=2)  # decoded batches waiting for the model
    stop = stop or threading.Event()
    finished = threading.Event()

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                for start in range(0, len(todo), batch_size):
                    if finished.is_set():
                        break
                    chunk = todo[start : start + batch_size]
                    batches.put(list(pool.map(lambda p: _decode(p, encoder.preprocessor.pixels, transform, fetch), chunk)))
        except BaseException as exc:  # noqa: BLE001 - reported by the consumer, which would wait forever
            batches.put(_WorkerDied(exc))
            return
        batches.put(None)

    start_time = time.perf_counter()
    producer = threading.Thread(target=produce, daemon=True)
    good: list[_Item] = []
    bad: list[_Item] = []
    processed = 0  # inputs embedded or failed in this run
    bar = tqdm(total=len(todo), unit="img", desc="embedding", disable=not progress, dynamic_ncols=True)
    try:
        with stop_on_signals(stop):
            producer.start()
            while not stop.is_set() and (items := batches.get()) is not None:
                if isinstance(items, _WorkerDied):
                    if good or bad:
                        writer.write(good, bad, relpath)  # keep every finished row
                        good, bad = [], []
                    exc = items.exc
                    raise ArrowVisionError(f"a decoding worker died ({type(exc).__name__}: {exc}); "
                                           "finished chunks are kept, rerun to resume")
                ok = [item for item in items if not item.error]
                if ok:
                    tick = time.perf_counter()
                    vectors = encoder.backend(np.stack([item.pixels for item in ok]))
                    stats.inference_seconds += time.perf_counter() - tick
                    vectors = l2_normalize(vectors) if normalize else vectors
                    for item, vector in zip(ok, vectors):
                        item.embedding, item.pixels = vector, None  # the pixels are not needed any more
                failed = [item for item in items if item.error]
                good, bad = good + ok, bad + failed
                stats.embedded += len(ok)
                stats.failed += len(failed)
                stats.errors += [(item.path, item.error) for item in failed]
                while len(good) >= chunk_size:
                    writer.write(good[:chunk_size], bad, relpath)
                    good, bad = good[chunk_size:], []
                processed += len(items)
                bar.update(len(items))
            stats.interrupted = stop.is_set() and processed < len(todo)  # work was left undone
            if good or bad:  # the last chunk, or what was embedded before a stop
                writer.write(good, bad, relpath)
    finally:
        finished.set()
        bar.close()
        while producer.is_alive():  # unblock and finish the producer
            try:
                batches.get_nowait()
            except queue.Empty:
                producer.join(0.05)
        if fetcher is not None:
            fetcher.close()
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
    return pa.concat_tables((pq.read_table(p) for p in part_files(folder)), promote_options="default")


def iter_embedding_batches(folder: str | os.PathLike, batch_rows: int = 65536) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream (paths, embeddings) batches without loading the whole dataset."""
    for part in part_files(folder):
        file = pq.ParquetFile(part)
        for batch in file.iter_batches(batch_size=batch_rows, columns=["path", "embedding"]):
            column = batch.column("embedding")
            dim = column.type.list_size
            vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
            yield batch.column("path").to_pylist(), vectors
