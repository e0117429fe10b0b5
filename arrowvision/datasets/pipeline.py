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
import hashlib
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ArrowVisionError, ImageError
from ..inputs import decode as decoding
from ..inputs.decode import MAX_IMAGE_FILE_BYTES, check_mode, gpu_cpu_share, read_image_bytes  # noqa: F401 (limit re-exported)
from ..inputs.pathlists import IMAGE_EXTENSIONS, LIST_SUFFIXES, read_path_list
from ..inputs.preprocess import normalize_sketch_image
from ..inputs.uris import is_remote, is_uri, list_uri, local_path
from ..inputs.urlfetch import UrlPolicy, is_url
from ..util.interrupts import stop_on_signals
from ..util.progress import progress_bar
from ..util.similarity import l2_normalize
from .writer import ERRORS_DIR, META_PREFIX  # noqa: F401 (re-exported: the dataset layout)
from .writer import ChunkBuffer, EmbeddingWriter, Plan, dataset_metadata, plan


def identity(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """An image's one identity: its resolved absolute path (relative paths resolve against ``base``);
    a remote URI (``s3://...``) is its own identity, a ``file://`` URI is its local path."""
    text = os.fspath(path)
    if is_remote(text):
        return text
    path = Path(os.path.expanduser(local_path(text) if is_uri(text) else text))
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    try:
        return str(path.resolve())
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop (RuntimeError before 3.13): kept as
        # given, it fails as a row later
        return os.path.abspath(path)


def input_root(source: str) -> Path | str:
    """The folder that ``relpath`` values are relative to: the input folder, the folder a glob
    starts from, or the folder of a list file / single image (for a URI: the prefix)."""
    if is_remote(source):
        one_object = Path(source).suffix.lower() in IMAGE_EXTENSIONS
        return source.rsplit("/", 1)[0] if one_object else source.rstrip("/")
    path = Path(local_path(source) if is_uri(source) else source)
    source = str(path)
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
    absolute paths, in order. Relative entries of a list resolve against the list's folder. A
    remote URI (``s3://bucket/prefix``) lists the images under that prefix."""
    if is_url(source):  # an http(s) URL: one image, fetched with the SSRF guard
        return [source.strip()]
    if is_remote(source):
        return list_uri(source, IMAGE_EXTENSIONS) or _no_images(source)
    if is_uri(source):
        source = local_path(source)
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


def _no_images(source: str) -> list[str]:
    raise ArrowVisionError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")


def relpath_function(root: str | os.PathLike | None) -> Callable[[str], str]:
    """The ``relpath`` column: a path relative to ``root`` (default: the current folder); an
    object relative to a URI prefix ``root``; a remote URI outside it as it is."""
    if root is not None and is_remote(os.fspath(root)):
        prefix = os.fspath(root).rstrip("/") + "/"
        return lambda path: path[len(prefix):] if path.startswith(prefix) else path
    base = Path(root).resolve() if root is not None else Path.cwd()
    return lambda path: path if is_remote(path) else os.path.relpath(path, base)


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

    def count(self, written: Sequence[Any], failed: Sequence[Any]) -> None:
        """Add one written chunk's rows (``path``/``error`` attributes): every engine counts alike."""
        self.embedded += len(written)
        self.failed += len(failed)
        self.errors += [(row.path, row.error) for row in failed]

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0

    @property
    def model_busy(self) -> float:
        """Share of wall time the model was running (on a GPU: its own GPU time, from CUDA events)."""
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


def _decode(path: str, preprocess: Callable[[Any], np.ndarray], transform: Callable | None) -> _Item:
    """Read, decode, (sketch-normalize,) preprocess one file (float32 pixels, for engines whose
    backends take those). Every failure, of any exception type, becomes an error item: a worker
    that raised would leave the consumer waiting forever."""
    try:
        data = read_image_bytes(path)  # local file or remote URI; odd paths are an ImageError
    except ImageError as exc:
        return _Item(path, None, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure is this row's failure, not the job's
        return _Item(path, None, error=f"{path}: {exc or type(exc).__name__}")
    return decode_data(path, data, preprocess, transform)


def decode_data(path: str, data: bytes, preprocess: Callable[[Any], np.ndarray], transform: Callable | None) -> _Item:
    """Decode, (sketch-normalize,) preprocess the bytes of the input ``path``; any failure is an
    error item (shared by the engines that read the bytes elsewhere, e.g. from object storage)."""
    from ..inputs.preprocess import load_image

    try:
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


def _produce(feeder: Any, todo: list, finished: threading.Event, batches: queue.Queue, encoder: Any, gpu: Any) -> None:
    """The decoding thread of ``embed_paths``: fed batches, made ready for the model (staged on its
    device for uint8 backends), into ``batches``; then None, or ``_WorkerDied`` if it failed."""
    backend = encoder.backend
    try:
        for fed in feeder.batches(todo, stop=finished.is_set):
            if finished.is_set():
                break
            if gpu is not None:
                ok, ready = gpu.assemble(fed.decoded, fed.pixels, fed.jpegs)
            elif not fed.decoded:
                ok, ready = [], None
            elif backend.accepts_uint8:
                ok, ready = fed.decoded, backend.stage(fed.pixels)  # a copy: the slot may be reused now
            else:
                ok, ready = fed.decoded, encoder.preprocessor.normalize(fed.pixels)
            batches.put((fed.items, ok, ready))
    except BaseException as exc:  # noqa: BLE001 - reported by the consumer, which would wait forever
        batches.put(_WorkerDied(exc))
        return
    batches.put(None)


def _launch(backend: Any, ready: Any) -> Any:
    """Start the model on one batch; on a GPU this returns before it finishes."""
    if backend.accepts_uint8:
        return backend.launch(ready)
    tick = time.perf_counter()
    return _Done(backend(ready), time.perf_counter() - tick)


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
    url_policy: UrlPolicy | None = None,
) -> EmbedStats:
    """Embed ``paths`` into the dataset folder ``output``, resuming where a previous run stopped.

    Paths are keyed by their resolved absolute path; ``relpath`` is stored relative to ``root``
    (default: the current folder). Inputs that failed before are retried unless ``skip_failed``;
    either way they count as failed. Every part chunk holds exactly ``chunk_size`` rows (the last
    one fewer). Setting ``stop`` (or SIGINT/SIGTERM in the main thread) ends the run after the
    current batch, with the rows embedded so far written as one more chunk. ``decode``: exact,
    fast or gpu (see ``arrowvision.inputs.decode``); ``decode_pool``: auto (processes when the model is
    on a GPU, else threads), thread or process."""
    from ..inputs.feeder import Feeder, choose_pool

    decoding.URL_POLICY[0] = url_policy  # http(s) inputs: None keeps the SSRF guard on
    if batch_size < 1 or chunk_size < 1:
        raise ArrowVisionError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    backend = encoder.backend
    check_mode(decode)
    if encoder.config.naflex and decode != "exact":
        raise ArrowVisionError(f"decode={decode!r}: SigLIP 2 NaFlex models decode images exactly (--decode exact)")
    gpu = None
    if decode == "gpu":
        from ..inputs.gpu_decode import GpuDecoder

        gpu = GpuDecoder(encoder.preprocessor, backend)  # refuses clearly without CUDA / torchvision
    transform = normalize_sketch_image if sketch else None
    pool = choose_pool(decode_pool, backend.device)
    feeder = Feeder(encoder.preprocessor, batch_size=batch_size, workers=workers, mode=decode, transform=transform,
                    pool=pool, cpu_share=gpu_cpu_share(workers) if decode == "gpu" and pool == "process" else 0.0)
    with EmbeddingWriter(output, encoder.embedding_dim, dataset_metadata(encoder, sketch=sketch, normalize=normalize)) as writer:
        work = plan(writer, list(dict.fromkeys(identity(p) for p in paths)), skip_failed)
        return _embed(encoder, feeder, work, ChunkBuffer(writer, chunk_size, relpath_function(root)),
                      gpu=gpu, normalize=normalize, progress=progress, stop=stop or threading.Event())


def _embed(encoder: Any, feeder: Any, work: Plan, chunks: ChunkBuffer, *, gpu: Any, normalize: bool, progress: bool,
           stop: threading.Event) -> EmbedStats:
    """The run itself, with the output folder locked: decoding (``feeder``) in a thread, the model
    here, rows into ``chunks``."""
    backend = encoder.backend
    stats = EmbedStats()
    todo, stats.skipped, stats.errors, stats.failed = work.todo, work.skipped, work.prior_errors, len(work.prior_errors)
    batches: queue.Queue = queue.Queue(maxsize=2)  # batches ready for the model (staged on its device)
    finished = threading.Event()

    start_time = time.perf_counter()
    producer = threading.Thread(target=_produce, args=(feeder, todo, finished, batches, encoder, gpu), daemon=True)
    processed = 0  # inputs embedded or failed in this run
    bar = progress_bar(len(todo), progress, desc="embedding", unit="img")

    def finish(items: list, ok: list, running: Any) -> None:
        """Collect one launched batch's embeddings and buffer its rows (and failures) for writing."""
        nonlocal processed
        if running is not None:
            vectors = running.result()
            stats.inference_seconds += running.seconds
            vectors = l2_normalize(vectors) if normalize else vectors
            for item, vector in zip(ok, vectors):
                item.embedding = vector
        stats.count(*chunks.add(items))
        processed += len(items)
        bar.update(len(items))

    in_flight: tuple | None = None  # the batch the model is running while the next one is launched
    try:
        with stop_on_signals(stop, say=lambda message: bar.write(message, file=sys.stderr)):
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
                    chunks.flush()  # keep every finished row
                    exc = entry.exc
                    raise ArrowVisionError(f"a decoding worker died ({type(exc).__name__}: {exc}); "
                                           "finished chunks are kept, rerun to resume")
                items, ok, ready = entry
                running = _launch(backend, ready) if ok else None
                if in_flight is not None:
                    finish(*in_flight)
                in_flight = (items, ok, running)
            if in_flight is not None:
                finish(*in_flight)
                in_flight = None
            stats.interrupted = stop.is_set() and processed < len(todo)  # work was left undone
            chunks.flush()  # the last chunk, or what was embedded before a stop
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
