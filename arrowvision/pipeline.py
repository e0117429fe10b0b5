"""Corpus embedding: many images in, a resumable Parquet dataset of embeddings out.

Decoding runs in a pool (``feeder``: threads for CPU backends, processes when the model is on a
GPU, whose launching thread must not wait for the GIL) while the backend runs inference on the
previous batch; backends that take uint8 (torch) get uint8 batches and normalize on their device,
and on a GPU the copy and launch of the next batch overlap the current one. ``decode`` picks
exact (HF parity), fast (reduced JPEG decode) or gpu (nvJPEG) decoding, see ``decode``.

Results are written in chunks, each an atomic ``part-NNNNN.parquet`` (temp file + rename): after a crash the same command skips every image
already in a chunk and never writes one twice; Ctrl-C/SIGTERM first writes the rows already
embedded as one more chunk. An image's identity is its resolved absolute path, so every spelling
of the same input folder resumes the same dataset. Bad images go to ``_errors/errors-NNNNN.parquet``
(a folder dataset discovery skips, so any Parquet reader sees the embeddings only) and are retried
by the next run.
"""

from __future__ import annotations

import glob as globlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .decode import MAX_IMAGE_FILE_BYTES, Decoded, check_mode, gpu_cpu_share  # noqa: F401  (MAX_IMAGE_FILE_BYTES: re-exported)
from .errors import ArrowVisionError
from .fsutil import atomic_output
from .pathlists import LIST_SUFFIXES, read_path_list

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
META_PREFIX = b"arrowvision."
ERRORS_DIR = "_errors"  # dataset discovery (pyarrow, Spark, Hive) skips "_" folders


def identity(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """An image's one identity: its resolved absolute path (relative paths resolve against ``base``)."""
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
    absolute paths, in order. Relative entries of a list resolve against the list's folder."""
    path = Path(source)
    base: Path | None = None
    if path.is_dir():
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
    input_wait_seconds: float = 0.0  # the model thread waiting for decoded batches (decoding is the bottleneck)
    interrupted: bool = False  # stopped by Ctrl-C/SIGTERM (rows embedded so far were written)
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0

    @property
    def model_busy(self) -> float:
        """Share of wall time the model was running (on a GPU: its own GPU time, from CUDA events)."""
        return self.inference_seconds / self.seconds if self.seconds else 0.0


_Item = Decoded  # one input row: path, size, sha256, error, embedding


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
    decode: str = "exact",
    decode_pool: str = "auto",
) -> EmbedStats:
    """Embed ``paths`` into the dataset folder ``output``, resuming where a previous run stopped.

    Paths are keyed by their resolved absolute path; ``relpath`` is stored relative to ``root``
    (default: the current folder). Inputs that failed before are retried unless ``skip_failed``;
    either way they count as failed. Every part chunk holds exactly ``chunk_size`` rows (the last
    one fewer). Setting ``stop`` (or SIGINT/SIGTERM in the main thread) ends the run after the
    current batch, with the rows embedded so far written as one more chunk. ``decode``: exact,
    fast or gpu (see ``arrowvision.decode``); ``decode_pool``: auto (processes when the model is
    on a GPU, else threads), thread or process."""
    from .encoder import l2_normalize
    from .feeder import Feeder, choose_pool
    from .preprocess import normalize_sketch_image

    if batch_size < 1 or chunk_size < 1:
        raise ArrowVisionError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    backend = encoder.backend
    check_mode(decode)
    gpu = None
    if decode == "gpu":
        from .gpu_decode import GpuDecoder

        gpu = GpuDecoder(encoder.preprocessor, backend)  # refuses clearly without CUDA / torchvision
    uint8 = bool(getattr(backend, "accepts_uint8", False))
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
        return os.path.relpath(path, root)

    stats = EmbedStats()
    paths = list(dict.fromkeys(identity(p) for p in paths))
    todo = [p for p in paths if p not in writer.done and not (skip_failed and p in writer.failed)]
    stats.skipped = sum(p in writer.done for p in paths)
    if skip_failed:
        stats.errors = [(p, writer.failed[p]) for p in paths if p not in writer.done and p in writer.failed]
        stats.failed = len(stats.errors)
    transform = normalize_sketch_image if sketch else None
    pool = choose_pool(decode_pool, getattr(backend, "device", "cpu"))
    feeder = Feeder(encoder.preprocessor, batch_size=batch_size, workers=workers, mode=decode, transform=transform,
                    pool=pool, cpu_share=gpu_cpu_share(workers) if decode == "gpu" and pool == "process" else 0.0)
    batches: queue.Queue = queue.Queue(maxsize=2)  # batches ready for the model (staged on its device)
    stop = stop or threading.Event()
    finished = threading.Event()

    def produce() -> None:
        try:
            for fed in feeder.batches(todo, stop=finished.is_set):
                if finished.is_set():
                    break
                if gpu is not None:
                    ok, ready = gpu.assemble(fed.decoded, fed.pixels, fed.jpegs)
                elif not fed.decoded:
                    ok, ready = [], None
                elif uint8:
                    ok, ready = fed.decoded, backend.stage(fed.pixels)  # a copy: the slot may be reused now
                else:
                    ok, ready = fed.decoded, encoder.preprocessor.normalize(fed.pixels)
                batches.put((fed.items, ok, ready))
        except BaseException as exc:  # noqa: BLE001 - reported by the consumer, which would wait forever
            batches.put(_WorkerDied(exc))
            return
        batches.put(None)

    def launch(ready: Any) -> Any:
        """Start the model on one batch; on a GPU this returns before it finishes."""
        if uint8:
            return backend.launch(ready)
        tick = time.perf_counter()
        return _Done(backend(ready), time.perf_counter() - tick)

    start_time = time.perf_counter()
    producer = threading.Thread(target=produce, daemon=True)
    good: list[_Item] = []
    bad: list[_Item] = []
    processed = 0  # inputs embedded or failed in this run
    bar = _progress_bar(len(todo), progress)

    def finish(items: list[_Item], ok: list[_Item], running: Any) -> None:
        """Collect one launched batch's embeddings and queue its rows (and failures) for writing."""
        nonlocal good, bad, processed
        if running is not None:
            vectors = running.result()
            stats.inference_seconds += running.seconds
            vectors = l2_normalize(vectors) if normalize else vectors
            for item, vector in zip(ok, vectors):
                item.embedding = vector
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

    in_flight: tuple | None = None  # the batch the model is running while the next one is launched
    try:
        with stop_on_signals(stop):
            producer.start()
            while not stop.is_set():
                tick = time.perf_counter()
                entry = batches.get()
                stats.input_wait_seconds += time.perf_counter() - tick
                if entry is None:
                    break
                if isinstance(entry, _WorkerDied):
                    if in_flight is not None:
                        finish(*in_flight)
                        in_flight = None
                    if good or bad:
                        writer.write(good, bad, relpath)  # keep every finished row
                        good, bad = [], []
                    exc = entry.exc
                    raise ArrowVisionError(f"a decoding worker died ({type(exc).__name__}: {exc}); "
                                           "finished chunks are kept, rerun to resume")
                items, ok, ready = entry
                running = launch(ready) if ok else None
                if in_flight is not None:
                    finish(*in_flight)
                in_flight = (items, ok, running)
            if in_flight is not None:
                finish(*in_flight)
                in_flight = None
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
    stats.seconds = time.perf_counter() - start_time
    return stats


class _Done:
    """A model call that already finished (CPU backends), shaped like ``TorchBackend.launch``'s result."""

    def __init__(self, vectors: np.ndarray, seconds: float):
        self.vectors, self.seconds = vectors, seconds

    def result(self) -> np.ndarray:
        return self.vectors


def _progress_bar(total: int, enabled: bool) -> Any:
    """tqdm when shown; without it (or with progress off) a bar that does nothing."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="img", desc="embedding", dynamic_ncols=True)
        except ImportError:
            pass

    class Silent:
        def update(self, count: int) -> None: ...

        def close(self) -> None: ...

    return Silent()


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
