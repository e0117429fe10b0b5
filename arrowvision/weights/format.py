"""The Parquet weights format: its constants and checksums, and the zero-copy reader (the writer is ``writer``).

One row per tensor, one row group per tensor, uncompressed PLAIN pages, so the bytes of every
tensor sit contiguously in the file at an offset computable from the Parquet footer alone:
``data_page_offset + total_compressed_size - nbytes`` of the ``data`` column chunk. A ``pad``
column placed just before ``data`` lets the writer move each tensor start onto a 64-byte
boundary. The result stays a plain Parquet file; see docs/FORMAT.md.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError, TensorNotFound
from ..util.safejson import MAX_CONFIG_BYTES, load_json

if TYPE_CHECKING:  # torch is optional here: the fast path must not import it
    import torch

log = logging.getLogger("arrowvision")

FORMAT_VERSION = "2"  # 2: may carry tokenizer files as ``tokenizer/<file>`` uint8 rows (text tower)
READABLE_VERSIONS = ("1", "2")  # version 1 files (vision only, no tokenizer rows) stay readable
TOKENIZER_PREFIX = "tokenizer/"
LAYOUT = "aligned-plain-v1"
ALIGNMENT = 64
MAX_TENSOR_BYTES = 2**31 - 1  # Parquet BYTE_ARRAY values carry a 4-byte length
MAX_NDIM = 8
MAX_NAME_LENGTH = 1024  # tensor names; HF names are < 100 characters
MAX_INDEX_BYTES = 64 << 20  # decoded size of the index columns (names, dtypes, shapes...)
MAX_INDEX_VALUES = 16 << 20
META_PREFIX = "arrowvision."

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None, "float64": np.float64, "int64": np.int64,
                 "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


class _Dtypes(Mapping[str, np.dtype]):
    """dtype name -> numpy dtype. bfloat16 uses ml_dtypes so numpy views stay bit-exact; it is
    imported on the first bfloat16 lookup only: importing it took 0.3-1 s of every process start
    (``serve --bundle`` never reads weights)."""

    def __getitem__(self, name: str) -> np.dtype:
        if name == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(_NUMPY_DTYPES[name])

    def __contains__(self, name: object) -> bool:
        return name in _NUMPY_DTYPES

    def __iter__(self) -> Iterator[str]:
        return iter(_NUMPY_DTYPES)

    def __len__(self) -> int:
        return len(_NUMPY_DTYPES)


DTYPES: Mapping[str, np.dtype] = _Dtypes()

SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.field("element", pa.int64(), nullable=False)), nullable=False),
        pa.field("nbytes", pa.int64(), nullable=False),
        pa.field("checksum", pa.string(), nullable=False),
        pa.field("pad", pa.binary(), nullable=False),
        pa.field("data", pa.binary(), nullable=False),
    ]
)
INDEX_COLUMNS = ["name", "dtype", "shape", "nbytes", "checksum"]
# Pad values of 60..123 bytes keep every varint in the pad page header the same width, so the
# row group grows by exactly one byte per pad byte and alignment can be computed in one pass.
PAD_BASE = 60


def dtype_name(dtype: np.dtype) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise FormatError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")


def tensor_checksum(buffer: Any) -> str:
    return "sha256:" + hashlib.sha256(buffer).hexdigest()


def weights_checksum(entries: Iterable[tuple[str, str, tuple[int, ...], str]], config: Mapping) -> str:
    """Checksum of the whole model: names, dtypes, shapes, tensor checksums and the config.

    It identifies the weights' content independently of how the file is laid out, which makes
    it the right key for caches (OpenVINO IR) and for embedding provenance."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, dtype, shape, checksum in entries:
        digest.update(f"{name}\0{dtype}\0{list(shape)}\0{checksum}\n".encode())
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: str
    offset: int | None  # byte offset of the tensor in the file; None when not mappable


# ----------------------------------------------------------------------------------- writer


# ----------------------------------------------------------------------------------- reader


def _select(names: Iterable[str], pattern: str | None) -> list[str]:
    if pattern is None:
        return list(names)
    if any(ch in pattern for ch in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [n for n in names if n.startswith(pattern)]


class WeightLoader:
    """Lazy, validating, zero-copy reader of a Parquet weights file.

    For the canonical layout every tensor is a view of one private (copy-on-write) memory map of
    the file: loading costs a footer parse, and pages are read only when touched. Other valid
    Parquet files (compressed, written by another tool) are decoded with pyarrow instead.

    >>> weights = WeightLoader("model.parquet")
    >>> weights.numpy("encoder.layers.0.")  # prefix or glob selection
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        self._decoded: dict[str, np.ndarray] = {}
        self.file_size = self._open()
        try:
            self._parquet = pq.ParquetFile(pa.py_buffer(self._mmap))
            metadata = self._parquet.metadata
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise FormatError(f"{self.path}: corrupt Parquet footer: {exc}") from None
        self.metadata = self._read_key_values(metadata)
        self.config: dict = self._json_metadata("config")
        self.source: dict = self._json_metadata("source")
        self.family: str = self.metadata.get("family", "")
        self.tower: str = self.metadata.get("tower", "")
        self.checksum: str = self.metadata.get("weights_checksum", "")
        self._check_index_size(metadata)
        try:
            index = self._parquet.read(columns=INDEX_COLUMNS, use_threads=False)
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            raise FormatError(f"{self.path}: corrupt or missing index columns: {exc}") from None
        self._infos = self._validate_index(index)
        self.zero_copy = self._locate_tensors(metadata)
        if not self.zero_copy:
            log.warning("%s: not in the canonical aligned layout; decoding with pyarrow (copies)", self.path)
        if verify:
            self.verify()

    # -- validation ---------------------------------------------------------------------

    def _open(self) -> int:
        """Map the file; only a readable regular file of Parquet size gets that far."""
        try:
            status = self.path.stat()
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            raise FormatError(f"{self.path}: cannot read weights file ({getattr(exc, 'strerror', None) or exc})") from None
        if not stat.S_ISREG(status.st_mode):
            kind = "a directory" if stat.S_ISDIR(status.st_mode) else "not a regular file"
            raise FormatError(f"{self.path}: cannot read weights file ({kind})")
        if status.st_size < 12:
            raise FormatError(f"{self.path}: file is {status.st_size} bytes, too small to be Parquet (truncated?)")
        try:
            with open(self.path, "rb") as handle:
                # Copy-on-write: writable views (torch wants them) that never touch the file.
                self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise FormatError(f"{self.path}: cannot read weights file ({getattr(exc, 'strerror', None) or exc})") from None
        if self._mmap[:4] != b"PAR1" or self._mmap[-4:] != b"PAR1":
            raise FormatError(f"{self.path}: wrong magic bytes, not a Parquet file (or truncated)")
        return status.st_size

    def _check_index_size(self, metadata: pq.FileMetaData) -> None:
        """Refuse index columns whose decoded size (from the footer) is out of proportion before
        decoding them: a small compressed file must not expand into gigabytes."""
        decoded = values = 0
        try:
            for group in range(metadata.num_row_groups):
                row_group = metadata.row_group(group)
                for column in range(row_group.num_columns):
                    chunk = row_group.column(column)
                    if chunk.path_in_schema.split(".")[0] in INDEX_COLUMNS:
                        decoded += max(chunk.total_uncompressed_size, 0)
                        values += max(chunk.num_values, 0)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise FormatError(f"{self.path}: corrupt Parquet footer: {exc}") from None
        if decoded > MAX_INDEX_BYTES or values > MAX_INDEX_VALUES:
            raise FormatError(
                f"{self.path}: index columns decode to {decoded} bytes / {values} values; at most "
                f"{MAX_INDEX_BYTES} / {MAX_INDEX_VALUES} allowed"
            )

    def _read_key_values(self, metadata: pq.FileMetaData) -> dict[str, str]:
        raw = metadata.metadata or {}
        values = {
            k.decode("utf-8", "replace")[len(META_PREFIX) :]: v.decode("utf-8", "replace")
            for k, v in raw.items()
            if k.startswith(META_PREFIX.encode())
        }
        for key in ("format_version", "config", "family"):
            if key not in values:
                raise FormatError(f"{self.path}: missing file metadata {META_PREFIX}{key}; not an arrowvision weights file")
        if values["format_version"] not in READABLE_VERSIONS:
            raise FormatError(
                f"{self.path}: format version {values['format_version']!r} is not supported "
                f"(this reader: {', '.join(READABLE_VERSIONS)})"
            )
        return values

    def _json_metadata(self, key: str) -> dict:
        what = f"{self.path}: metadata {META_PREFIX}{key}"
        value = load_json(self.metadata.get(key) or "{}", what, max_bytes=MAX_CONFIG_BYTES)
        if not isinstance(value, dict):
            raise FormatError(f"{what} must be a JSON object, not {type(value).__name__}")
        return value

    def _validate_index(self, index: pa.Table) -> dict[str, TensorInfo]:
        for field in SCHEMA:
            if field.name in INDEX_COLUMNS and field.name not in index.schema.names:
                raise FormatError(f"{self.path}: missing index column {field.name!r}; not an arrowvision weights file")
            if field.name in INDEX_COLUMNS and not index.schema.field(field.name).type.equals(field.type):
                raise FormatError(f"{self.path}: column {field.name!r} has type {index.schema.field(field.name).type}, expected {field.type}")
        infos: dict[str, TensorInfo] = {}
        rows = index.to_pydict()
        for name, dtype, shape, nbytes, checksum in zip(*(rows[c] for c in INDEX_COLUMNS)):
            label = f"{self.path}: tensor {_short(name)}"
            if not name or name in infos:
                raise FormatError(f"{label}: empty or duplicated tensor name")
            if len(name) > MAX_NAME_LENGTH or not name.isprintable():
                raise FormatError(f"{label}: tensor names must be printable and at most {MAX_NAME_LENGTH} characters")
            if dtype not in DTYPES:
                raise FormatError(f"{label}: unsupported dtype {_short(dtype)}")
            if shape is None or len(shape) > MAX_NDIM or any(d is None or d < 0 for d in shape):
                raise FormatError(f"{label}: invalid shape {_short(shape)}")
            itemsize = DTYPES[dtype].itemsize
            expected = extent = itemsize
            for dim in shape:  # Python ints: no overflow, and we compare before allocating
                expected *= dim
                extent *= max(dim, 1)  # numpy and torch refuse [0, 2**62] too: bound every dim
            if extent > MAX_TENSOR_BYTES:
                raise FormatError(f"{label}: shape {shape} x {dtype} is too large (the format allows 2 GiB per tensor)")
            if nbytes is None or expected != nbytes:
                raise FormatError(f"{label}: shape {shape} x {dtype} is {expected} bytes but nbytes says {nbytes}")
            if nbytes > self.file_size:
                raise FormatError(f"{label}: claims {nbytes} bytes, more than the whole file ({self.file_size})")
            infos[name] = TensorInfo(name, dtype, tuple(shape), nbytes, checksum or "", None)
        return infos

    def _locate_tensors(self, metadata: pq.FileMetaData) -> bool:
        """Find each tensor's bytes from the footer; False if the layout is not mappable."""
        if metadata.num_row_groups != len(self._infos) or metadata.num_columns != len(SCHEMA):
            return False
        data_column = SCHEMA.get_field_index("data")
        located = {}
        for group, info in zip(range(metadata.num_row_groups), self._infos.values()):
            chunk = metadata.row_group(group).column(data_column)
            if (
                metadata.row_group(group).num_rows != 1
                or chunk.compression != "UNCOMPRESSED"
                or chunk.has_dictionary_page
                or "PLAIN" not in chunk.encodings
                or chunk.num_values != 1
            ):
                return False
            offset = chunk.data_page_offset + chunk.total_compressed_size - info.nbytes
            if offset < 8 or offset + info.nbytes > self.file_size - 8:
                raise FormatError(f"{self.path}: tensor {info.name!r}: data at offset {offset} lies outside the file")
            (length,) = struct.unpack_from("<I", self._mmap, offset - 4)
            if length != info.nbytes:
                raise FormatError(
                    f"{self.path}: tensor {info.name!r}: value length {length} at offset {offset} does not match nbytes {info.nbytes}"
                )
            located[info.name] = TensorInfo(**{**info.__dict__, "offset": offset})
        self._infos = located
        return True

    def verify(self) -> None:
        """Recompute every tensor checksum; raise FormatError naming the first mismatch."""
        for info in self._infos.values():
            actual = tensor_checksum(self._raw(info))
            if actual != info.checksum:
                raise FormatError(f"{self.path}: tensor {info.name!r}: checksum mismatch (file corrupted or modified)")

    # -- access -------------------------------------------------------------------------

    def _raw(self, info: TensorInfo) -> memoryview | np.ndarray:
        if info.offset is not None:
            return memoryview(self._mmap)[info.offset : info.offset + info.nbytes]
        return self._decoded_bytes(info.name)

    def _decoded_bytes(self, name: str) -> np.ndarray:
        if not self._decoded:
            self._check_data_size()
            try:
                table = self._parquet.read(columns=["name", "data"], use_threads=False)
            except (pa.ArrowException, OSError) as exc:
                raise FormatError(f"{self.path}: cannot decode tensor data: {exc}") from None
            for row_name, value in zip(table.column("name").to_pylist(), _iter_binary(table.column("data"))):
                self._decoded[row_name] = value.copy()  # own, aligned memory: the decode is a copy anyway
        data = self._decoded[name]
        if data.nbytes != self._infos[name].nbytes:
            raise FormatError(f"{self.path}: tensor {name!r}: data has {data.nbytes} bytes, nbytes says {self._infos[name].nbytes}")
        return data

    def _check_data_size(self) -> None:
        """Before decoding a non-canonical file: its data column must not decode (per the footer)
        to more than the tensors the index declares, plus page overhead."""
        metadata = self._parquet.metadata
        declared = sum(info.nbytes for info in self._infos.values())
        allowed = declared + 4 * len(self._infos) + 1024 * metadata.num_row_groups + (64 << 10)
        decoded = 0
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for column in range(row_group.num_columns):
                chunk = row_group.column(column)
                if chunk.path_in_schema == "data":
                    decoded += max(chunk.total_uncompressed_size, 0)
        if decoded > allowed:
            raise FormatError(f"{self.path}: data column decodes to {decoded} bytes, but the index declares {declared}")

    def names(self, pattern: str | None = None) -> list[str]:
        """Tensor names in file order; ``pattern`` is a prefix, or a glob if it has * ? [."""
        return _select(self._infos, pattern)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def tensor(self, name: str) -> np.ndarray:
        """A numpy view of one tensor (read-only in spirit; writes stay private to the process)."""
        info = self.info(name)
        dtype = DTYPES[info.dtype]
        if info.offset is not None:
            array = np.frombuffer(self._mmap, dtype=dtype, count=info.nbytes // dtype.itemsize, offset=info.offset)
        else:
            array = self._decoded_bytes(name).view(dtype)
        return array.reshape(info.shape)

    def numpy(self, pattern: str | None = None) -> dict[str, np.ndarray]:
        return {name: self.tensor(name) for name in self._selection(pattern)}

    def _selection(self, pattern: str | None) -> list[str]:
        """``names(pattern)``, but a pattern that matches nothing is an error, not an empty dict."""
        names = self.names(pattern)
        if pattern is not None and not names:
            examples = ", ".join(list(self._infos)[:3])
            raise TensorNotFound(f"{self.path}: no tensor matches {pattern!r} (names look like {examples}, ...)")
        return names

    def torch(self, pattern: str | None = None) -> dict[str, torch.Tensor]:
        """Torch tensors sharing memory with the mapping (``torch.frombuffer``, no copy)."""
        import torch

        out = {}
        for name in self._selection(pattern):
            info = self._infos[name]
            torch_dtype = getattr(torch, "bool" if info.dtype == "bool" else info.dtype)
            if info.nbytes == 0:
                out[name] = torch.empty(info.shape, dtype=torch_dtype)
                continue
            buffer = self._mmap if info.offset is not None else self._decoded_bytes(name)
            count = info.nbytes // DTYPES[info.dtype].itemsize
            tensor = torch.frombuffer(buffer, dtype=torch_dtype, count=count, offset=info.offset or 0)
            out[name] = tensor.reshape(info.shape)
        return out

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer files stored with the text tower (``tokenizer/<file name>`` rows), by file name."""
        return {name[len(TOKENIZER_PREFIX) :]: self.tensor(name).tobytes() for name in self.names(TOKENIZER_PREFIX)}

    def tensors(self) -> Iterator[TensorInfo]:
        return iter(self._infos.values())

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    @property
    def mapped_region(self) -> tuple[int, int]:
        """(address, length) of the memory map, for checking that tensors are views into it."""
        base = np.frombuffer(self._mmap, dtype=np.uint8, count=1)
        return base.ctypes.data, self.file_size

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        family, zero_copy = getattr(self, "family", "?"), getattr(self, "zero_copy", "?")
        return f"WeightLoader({str(self.path)!r}, family={family!r}, tensors={len(getattr(self, '_infos', ()))}, zero_copy={zero_copy})"


def _short(value: Any, limit: int = 80) -> str:
    """repr() of a value from the file, cut short: hostile names must not flood error messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _iter_binary(column: pa.ChunkedArray) -> Iterator[np.ndarray]:
    """Yield each binary value of a column as a uint8 array viewing pyarrow's decoded buffer."""
    for chunk in column.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32 if chunk.type == pa.binary() else np.int64)
        values = chunk.buffers()[2]
        data = np.frombuffer(values, dtype=np.uint8) if values is not None else np.zeros(0, np.uint8)
        for i in range(len(chunk)):
            start, end = offsets[chunk.offset + i], offsets[chunk.offset + i + 1]
            yield data[start:end]
