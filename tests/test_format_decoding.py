"""The pyarrow-decoding fallback of WeightLoader (files not in our aligned layout): 64-bit
offsets, corrupt data pages and data that disagrees with the index, each a clear FormatError."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arrowvision import FormatError, WeightLoader
from arrowvision.weights.format import SCHEMA


def _rewrite(source, target, transform=lambda table: table, **write_options):
    """``source`` rewritten by plain pyarrow (so not zero-copy), our metadata kept."""
    table = pq.read_table(source)
    ours = {k: v for k, v in pq.read_metadata(source).metadata.items() if k.startswith(b"arrowvision.")}
    pq.write_table(transform(table).replace_schema_metadata(ours), target, **write_options)
    return target


def test_large_binary_data_column_is_decoded(tmp_path, tiny_siglip_parquet):
    def to_large_binary(table: pa.Table) -> pa.Table:
        index = table.schema.get_field_index("data")
        return table.set_column(index, pa.field("data", pa.large_binary()), table.column("data").cast(pa.large_binary()))

    path = _rewrite(tiny_siglip_parquet, tmp_path / "large.parquet", to_large_binary, compression="zstd")
    assert pq.read_schema(path).field("data").type == pa.large_binary()
    reference = WeightLoader(tiny_siglip_parquet)
    weights = WeightLoader(path, verify=True)
    assert not weights.zero_copy
    for name in reference.names():
        np.testing.assert_array_equal(weights.tensor(name), reference.tensor(name))


def test_corrupt_data_pages_are_a_format_error(tmp_path, tiny_siglip_parquet):
    path = _rewrite(tiny_siglip_parquet, tmp_path / "zstd.parquet", compression="zstd", row_group_size=1000)
    chunk = pq.read_metadata(path).row_group(0).column(SCHEMA.get_field_index("data"))
    blob = bytearray(path.read_bytes())
    start = chunk.data_page_offset + 64
    blob[start : start + 256] = bytes(256)  # zero a stretch of the compressed tensor bytes
    path.write_bytes(bytes(blob))
    weights = WeightLoader(path)  # footer and index columns are intact
    with pytest.raises(FormatError, match=f"{path}: cannot decode tensor data"):
        weights.tensor(weights.names()[0])


def test_decoded_data_shorter_than_its_index_says(tmp_path):
    table = pa.table({"name": ["short"], "dtype": ["float32"], "shape": [[8]], "nbytes": [32], "checksum": [""], "pad": [b""],
                      "data": [b"\0" * 16]}, schema=SCHEMA)
    meta = {"arrowvision.format_version": "1", "arrowvision.config": "{}", "arrowvision.family": "siglip"}
    path = tmp_path / "short.parquet"
    pq.write_table(table.replace_schema_metadata(meta), path, compression="zstd")
    weights = WeightLoader(path)
    assert not weights.zero_copy
    with pytest.raises(FormatError, match="tensor 'short': data has 16 bytes, nbytes says 32"):
        weights.tensor("short")
