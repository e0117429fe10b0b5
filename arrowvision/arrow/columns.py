"""Arrow columns in, ``FixedSizeList<float32, D>`` out: the one module that knows Arrow's layouts.

Every engine adapter (DuckDB, polars, pyarrow compute, Ray Data, Daft, LanceDB) and the
``embed --column`` command hand a column here and get one back; none of this imports an engine.

Image columns may be ``binary``/``large_binary``/``binary_view`` (image bytes),
``string``/``large_string``/``string_view`` (paths, ``s3://`` URIs or http(s) URLs, read as
``embed`` reads them), a dictionary of either, or a struct with ``bytes`` and/or ``path`` fields
(the Hugging Face image feature: bytes win, else the path is read), as an Array or a
ChunkedArray, sliced or not. Bytes are sliced out of the Arrow data buffer as memoryviews (no
Python ``bytes`` object per image); Pillow, which reads through a file object, still copies them
once into its own reader, as it would for a file. Decoding and preprocessing are
``VisionEncoder.prepare`` / ``load_image``, so a row embeds exactly as ``encoder.encode`` embeds
the same bytes.

The result keeps one (N, D) float32 buffer: each model batch is written into it once, and the
Arrow array wraps it without a copy. Null inputs give null rows; rows that cannot be read or
decoded give null rows too, and their reasons are in ``ColumnEmbeddings.errors``.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ArrowVisionError, ColumnTypeError, ImageError

ImageSource = Union[memoryview, str, None]  # bytes inside an Arrow buffer, a path/URI/URL, or null
BYTES_FIELD, PATH_FIELD = "bytes", "path"  # the Hugging Face image feature's struct fields


@dataclass
class ColumnEmbeddings:
    """One column's embeddings: ``vectors`` (N, D) float32 (zeros where ``valid`` is False) and
    why each non-null row that is not valid failed (row index -> reason)."""

    vectors: np.ndarray
    valid: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    sizes: np.ndarray | None = None  # (N, 2) int32 width, height of each decoded image (vision only)
    digests: list[str] | None = None  # SHA-256 of each row's bytes, when asked for

    @classmethod
    def empty(cls, count: int, dim: int) -> ColumnEmbeddings:
        return cls(np.zeros((count, dim), np.float32), np.zeros(count, bool))

    def to_arrow(self) -> pa.FixedSizeListArray:
        """``FixedSizeList<float32, D>`` over ``vectors`` itself (no copy), null where not valid."""
        count, dim = self.vectors.shape
        flat = pa.array(np.ascontiguousarray(self.vectors).reshape(-1))
        mask = None if bool(self.valid.all()) else pa.array(~self.valid)
        return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


# ----------------------------------------------------------------------------- reading columns


def _chunks(column: Any) -> list[pa.Array]:
    if isinstance(column, pa.ChunkedArray):
        return list(column.chunks)
    if isinstance(column, pa.Array):
        return [column]
    raise ColumnTypeError(f"expected a pyarrow Array or ChunkedArray, got {type(column).__name__}")


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t) or pa.types.is_fixed_size_binary(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _plain(array: pa.Array) -> pa.Array:
    """Dictionary-encoded and view layouts -> offsets + data (a view array is cast once: its
    per-row pointers cannot be sliced as one buffer)."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_binary_view(array.type) or pa.types.is_fixed_size_binary(array.type):
        array = array.cast(pa.large_binary())
    elif pa.types.is_string_view(array.type):
        array = array.cast(pa.large_string())
    return array


def _valid_mask(array: pa.Array) -> np.ndarray:
    if array.null_count == 0:
        return np.ones(len(array), dtype=bool)
    return array.is_valid().to_numpy(zero_copy_only=False)


def _byte_views(array: pa.Array) -> list[memoryview | None]:
    """One memoryview per row into the array's data buffer (None for nulls); offsets honoured."""
    _validity, offsets_buffer, data_buffer = array.buffers()[:3]
    width = np.int64 if pa.types.is_large_binary(array.type) or pa.types.is_large_string(array.type) else np.int32
    count = len(array)
    if count == 0:
        return []
    offsets = np.frombuffer(offsets_buffer, dtype=width)[array.offset : array.offset + count + 1].tolist()
    data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
    valid = _valid_mask(array).tolist()
    return [data[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(count)]


def _struct_sources(array: pa.StructArray) -> list[ImageSource]:
    names = [array.type.field(i).name for i in range(array.type.num_fields)]
    if BYTES_FIELD not in names and PATH_FIELD not in names:
        raise ColumnTypeError(f"a struct image column needs a {BYTES_FIELD!r} and/or {PATH_FIELD!r} field "
                              f"(the Hugging Face image feature); this one has {names}")
    children = dict(zip(names, array.flatten()))  # parent offset and nulls applied
    from_bytes = _image_sources(children[BYTES_FIELD]) if BYTES_FIELD in children else [None] * len(array)
    from_path = _image_sources(children[PATH_FIELD]) if PATH_FIELD in children else [None] * len(array)
    return [data if data is not None and len(data) else path if path is not None else data
            for data, path in zip(from_bytes, from_path)]


def _image_sources(array: pa.Array) -> list[ImageSource]:
    array = _plain(array)
    kind = array.type
    if pa.types.is_struct(kind):
        return _struct_sources(array)
    if _is_bytes(kind):
        return _byte_views(array)
    if _is_text(kind):
        return array.to_pylist()
    if pa.types.is_null(kind):
        return [None] * len(array)
    raise ColumnTypeError(f"an image column must be binary, large_binary or binary_view (image bytes), "
                          f"string (paths, URIs, URLs) or struct<bytes, path> (Hugging Face images), not {kind}")


def image_sources(column: pa.Array | pa.ChunkedArray) -> list[ImageSource]:
    """Every row of an image column as a memoryview of its bytes, a path string, or None."""
    return [source for chunk in _chunks(column) for source in _image_sources(chunk)]


def text_values(column: pa.Array | pa.ChunkedArray) -> list[str | None]:
    """Every row of a string column (None for nulls)."""
    values: list[str | None] = []
    for chunk in _chunks(column):
        chunk = _plain(chunk)
        if not (_is_text(chunk.type) or pa.types.is_null(chunk.type)):
            raise ColumnTypeError(f"a text column must be string, large_string or string_view, not {chunk.type}")
        values += chunk.to_pylist()
    return values


# ----------------------------------------------------------------------------- embedding


@dataclass
class Prepared:
    """One decoded row: the model's input row, or why there is none; the size and (if asked)
    the SHA-256 of the bytes are what the ``embed`` dataset records."""

    pixels: np.ndarray | None
    error: str = ""
    width: int = 0
    height: int = 0
    digest: str = ""


def prepare_source(encoder: Any, source: memoryview | str, label: str, decode: str = "exact",
                   digest: bool = False) -> Prepared:
    """One row -> the encoder's input row, decoded exactly as ``encoder.encode`` decodes it."""
    from ..inputs.decode import open_reduced, read_image_bytes
    from ..inputs.preprocess import load_image

    if isinstance(source, str):
        label, source = source, read_image_bytes(source)  # local, s3://..., or http(s) with the SSRF guard
    if decode == "fast":
        image, (width, height) = open_reduced(source, label, encoder.config.image_size)
    else:
        image = load_image(source, name=label)
        width, height = image.size
    sha256 = hashlib.sha256(source).hexdigest() if digest else ""
    return Prepared(encoder.prepare(image), "", width, height, sha256)


def _prepare_row(encoder: Any, source: memoryview | str | None, label: str, decode: str, digest: bool) -> Prepared:
    """Every failure, of any type, is this row's error (a worker that raised would lose the batch)."""
    if source is None:
        return Prepared(None, f"{label}: no image (null)")
    try:
        return prepare_source(encoder, source, label, decode, digest)
    except ImageError as exc:  # names the row (bytes) or the path
        return Prepared(None, str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the row's, not the column's
        return Prepared(None, f"{source if isinstance(source, str) else label}: {exc or type(exc).__name__}")


def embed_stream(encoder: Any, rows: Iterable[tuple[Any, ImageSource, str]], *, batch_size: int = 32,
                 workers: int = 2, decode: str = "exact", normalize: bool = True,
                 model_lock: threading.Lock | None = None, digest: bool = False,
                 on_model: Callable[[float], None] | None = None) -> Iterator[tuple[list[Any], list[Prepared], np.ndarray]]:
    """(key, source, label) rows -> per model batch: the keys, the decoded rows and the (ok, D)
    embeddings of the rows that decoded, in order. Decoding runs in ``workers`` threads one
    batch ahead of the model, across the whole stream; the model runs under ``model_lock``
    when one is given (a backend shared by an engine's threads); ``on_model`` hears each model
    call's seconds."""
    from ..util.similarity import l2_normalize

    if batch_size < 1 or workers < 1:
        raise ArrowVisionError(f"batch_size and workers must be >= 1, got {batch_size} and {workers}")
    if decode not in ("exact", "fast"):
        raise ArrowVisionError(f"decode={decode!r}: Arrow columns decode exact or fast")
    lock = model_lock or nullcontext()
    rows = iter(rows)
    with ThreadPoolExecutor(workers, thread_name_prefix="arrowvision-arrow") as pool:

        def submit() -> tuple[list[Any], list[Future]]:
            batch = list(itertools.islice(rows, batch_size))
            return [key for key, _, _ in batch], [pool.submit(_prepare_row, encoder, source, label, decode, digest)
                                                  for _, source, label in batch]

        keys, pending = submit()
        while keys:
            following = submit()  # decoded while the model runs this batch
            prepared = [future.result() for future in pending]
            pixels = [row.pixels for row in prepared if row.pixels is not None]
            vectors = np.zeros((0, encoder.embedding_dim), np.float32)
            if pixels:
                with lock:
                    tick = time.perf_counter()
                    vectors = encoder.run_prepared(np.stack(pixels)).astype(np.float32, copy=False)
                    if on_model is not None:
                        on_model(time.perf_counter() - tick)
                vectors = l2_normalize(vectors) if normalize else vectors
            for row in prepared:
                row.pixels = None  # the batch is embedded: free its pixels
            yield keys, prepared, vectors
            keys, pending = following


def embed_sources(encoder: Any, sources: Sequence[ImageSource], **options: Any) -> ColumnEmbeddings:
    """Every non-null source embedded (options: those of ``embed_stream``), into one buffer."""
    result = ColumnEmbeddings.empty(len(sources), encoder.embedding_dim)
    result.sizes = np.zeros((len(sources), 2), np.int32)
    result.digests = [""] * len(sources)
    rows = ((i, source, f"row {i}") for i, source in enumerate(sources) if source is not None)
    for keys, prepared, vectors in embed_stream(encoder, rows, **options):
        good = [i for i, row in zip(keys, prepared) if not row.error]
        result.errors.update((i, row.error) for i, row in zip(keys, prepared) if row.error)
        result.vectors[good] = vectors  # one copy per model batch into the column's buffer
        result.valid[good] = True
        for i, row in zip(keys, prepared):
            result.sizes[i] = (row.width, row.height)
            result.digests[i] = row.digest
    return result


def embed_image_column(encoder: Any, column: pa.Array | pa.ChunkedArray, **options: Any) -> ColumnEmbeddings:
    """An image column -> its embeddings (options: batch_size, workers, decode, normalize, model_lock)."""
    return embed_sources(encoder, image_sources(column), **options)


def embed_text_column(encoder: Any, column: pa.Array | pa.ChunkedArray, *, batch_size: int = 32,
                      normalize: bool = True, model_lock: threading.Lock | None = None) -> ColumnEmbeddings:
    """A string column -> text embeddings (null rows stay null)."""
    texts = text_values(column)
    result = ColumnEmbeddings.empty(len(texts), encoder.embedding_dim)
    rows = [i for i, text in enumerate(texts) if text is not None]
    if rows:
        with model_lock or nullcontext():
            output = encoder.encode([texts[i] for i in rows], batch_size=batch_size, normalize=normalize)
        result.vectors[rows] = output
        result.valid[rows] = True
    return result


def errors_message(errors: dict[int, str], limit: int = 3) -> str:
    """A short summary of per-row errors, for warnings."""
    shown = "; ".join(errors[row] for row in sorted(errors)[:limit])
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return f"{len(errors)} row(s) could not be embedded: {shown}{more}"


def as_array(values: Any) -> pa.Array | pa.ChunkedArray:
    """Anything pyarrow can make an array of (an Array, ChunkedArray, list, numpy...)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ColumnTypeError(f"cannot read the column as Arrow ({exc})") from None

