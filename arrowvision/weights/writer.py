"""Writing the Parquet weights format (see ``format`` and docs/FORMAT.md): one row group per
tensor, each tensor's bytes moved onto a 64-byte boundary by the ``pad`` column, atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError
from ..util.fsutil import atomic_output
from .format import (ALIGNMENT, FORMAT_VERSION, LAYOUT, MAX_TENSOR_BYTES, META_PREFIX, PAD_BASE, SCHEMA, TOKENIZER_PREFIX,
                     dtype_name, tensor_checksum, weights_checksum)


def _row_group(name: str, dtype: str, shape, nbytes: int, checksum: str, pad: int, data: pa.Buffer) -> pa.Table:
    offsets = pa.py_buffer(np.array([0, nbytes], dtype=np.int32))
    data_array = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, data])  # no copy
    return pa.Table.from_arrays(
        [
            pa.array([name], pa.string()),
            pa.array([dtype], pa.string()),
            pa.array([list(shape)], SCHEMA.field("shape").type),
            pa.array([nbytes], pa.int64()),
            pa.array([checksum], pa.string()),
            pa.array([b"\0" * pad], pa.binary()),
            data_array,
        ],
        schema=SCHEMA,
    )


def _parquet_writer(sink) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        sink,
        SCHEMA,
        compression="none",
        use_dictionary=False,
        write_statistics=["name"],
        data_page_version="1.0",
        write_page_index=False,
    )


def _bytes_before_data(table: pa.Table) -> int:
    """Size of a row group up to its tensor bytes; row groups carry no absolute offsets."""
    sink = pa.MockOutputStream()
    writer = _parquet_writer(sink)
    writer.write_table(table)
    size = sink.tell() - 4  # leading magic
    writer.close()
    return size - table.column("nbytes")[0].as_py()


def write_weights(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    config: Mapping,
    family: str,
    source: Mapping | None = None,
    source_checksum: str | None = None,
    tower: str = "vision",
    extra_metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Write tensors to ``path`` in the canonical aligned layout, atomically.

    ``tensors`` yields ``(hf_name, array)``; arrays are written as C-contiguous bytes. Returns a
    summary (tensor count, parameters, bytes, weights checksum)."""
    seen: set[str] = set()
    entries: list[tuple[str, str, tuple[int, ...], str]] = []
    parameters = total_bytes = 0
    with atomic_output(path) as tmp_name:
        with pa.OSFile(tmp_name, "wb") as sink, _parquet_writer(sink) as writer:
            for name, array in tensors:
                if not name or name in seen:
                    raise FormatError(f"tensor name {name!r} is empty or duplicated")
                seen.add(name)
                array = np.ascontiguousarray(array)
                dtype = dtype_name(array.dtype)
                if array.nbytes > MAX_TENSOR_BYTES:
                    raise FormatError(f"tensor {name!r} has {array.nbytes} bytes; the format allows 2 GiB per tensor")
                data = pa.py_buffer(array.reshape(-1).view(np.uint8))
                checksum = tensor_checksum(data)
                table = _row_group(name, dtype, array.shape, array.nbytes, checksum, PAD_BASE, data)
                data_start = sink.tell() + _bytes_before_data(table)
                pad = PAD_BASE + (-data_start) % ALIGNMENT
                if pad != PAD_BASE:
                    table = _row_group(name, dtype, array.shape, array.nbytes, checksum, pad, data)
                writer.write_table(table)
                if (sink.tell() - array.nbytes) % ALIGNMENT:
                    raise FormatError(f"internal error: tensor {name!r} ended up unaligned")
                entries.append((name, dtype, tuple(array.shape), checksum))
                if not name.startswith(TOKENIZER_PREFIX):  # tokenizer files are bytes, not parameters
                    parameters += array.size
                total_bytes += array.nbytes
                if on_tensor:
                    on_tensor(name, array.nbytes)
            checksum = weights_checksum(entries, config)
            metadata = {
                "format_version": FORMAT_VERSION,
                "layout": LAYOUT,
                "alignment": str(ALIGNMENT),
                "config": json.dumps(config, sort_keys=True),
                "family": family,
                "tower": tower,
                "source": json.dumps(dict(source or {}), sort_keys=True),
                "source_checksum": source_checksum or "",
                "weights_checksum": checksum,
                **(extra_metadata or {}),
            }
            writer.add_key_value_metadata({META_PREFIX + k: v for k, v in metadata.items()})
    return {"tensors": len(entries), "parameters": parameters, "bytes": total_bytes, "weights_checksum": checksum}
