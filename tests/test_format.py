"""Parquet weights format: bit-exact round trips, zero-copy mapping, independent decoding,
and hostile or corrupt files rejected with FormatError."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arrowvision import FormatError, WeightLoader
from arrowvision.errors import TensorNotFound
from arrowvision.model.convert import convert
from arrowvision.weights.format import ALIGNMENT, SCHEMA
from arrowvision.weights.writer import write_weights

from .conftest import TINY_CLIP, TINY_SIGLIP, hf_model, save_checkpoint

TORCH_DTYPES = {"keep": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("kind,config", [("siglip_vision", TINY_SIGLIP), ("clip_vision", TINY_CLIP)])
@pytest.mark.parametrize("dtype", ["keep", "float16", "bfloat16"])
def test_round_trip_bit_exact(tmp_path, kind, config, dtype):
    folder = save_checkpoint(tmp_path / "ckpt", kind, seed=3, **config)
    out = tmp_path / "w.parquet"
    summary = convert(str(folder), out, dtype=dtype, progress=False)
    reference = hf_model(folder).state_dict()
    weights = WeightLoader(out, verify=True)
    assert weights.zero_copy
    assert summary["tensors"] == len(weights) == len([k for k in reference if not k.endswith("position_ids")])
    for name, tensor in weights.torch().items():
        expected = reference[name]
        if TORCH_DTYPES[dtype] is not None:
            expected = expected.to(TORCH_DTYPES[dtype])
        assert tensor.dtype == expected.dtype, name
        assert torch.equal(tensor.view(torch.uint8), expected.contiguous().view(torch.uint8)), name  # bit-exact
        array = weights.tensor(name)
        assert array.dtype.name == str(expected.dtype).removeprefix("torch."), name
        assert array.tobytes() == expected.contiguous().view(torch.uint8).numpy().tobytes(), name


def test_tensors_are_views_of_the_mapping(tmp_path):
    # ~13 MB of weights, so "1% of the weight bytes" is a meaningful bound
    config = dict(TINY_SIGLIP, hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    folder = save_checkpoint(tmp_path / "ckpt", "siglip_vision", **config)
    out = tmp_path / "w.parquet"
    convert(str(folder), out, progress=False)
    pool_before = pa.total_allocated_bytes()
    weights = WeightLoader(out)
    tensors = weights.torch()
    arrays = weights.numpy()
    pool_growth = pa.total_allocated_bytes() - pool_before
    assert pool_growth < 0.01 * weights.nbytes, pool_growth
    start, length = weights.mapped_region
    for name, tensor in tensors.items():
        info = weights.info(name)
        assert tensor.data_ptr() == start + info.offset, name
        assert arrays[name].ctypes.data == start + info.offset, name
        assert info.offset % ALIGNMENT == 0, name
        assert info.offset + info.nbytes <= length
        assert not arrays[name].flags.owndata


def test_independent_parquet_decode_matches_views(tiny_siglip_parquet):
    weights = WeightLoader(tiny_siglip_parquet)
    table = pq.read_table(tiny_siglip_parquet)  # plain pyarrow, no knowledge of our layout
    assert table.num_rows == len(weights)
    for name, dtype, shape, nbytes, data in zip(*(table.column(c).to_pylist() for c in ("name", "dtype", "shape", "nbytes", "data"))):
        view = weights.tensor(name)
        assert data == view.tobytes()
        assert (dtype, tuple(shape), nbytes) == (weights.info(name).dtype, view.shape, view.nbytes)


def test_metadata_carries_config_and_provenance(tiny_siglip, tiny_siglip_parquet):
    weights = WeightLoader(tiny_siglip_parquet)
    assert weights.family == "siglip"
    assert weights.config == json.loads((tiny_siglip / "config.json").read_text())
    assert weights.source == {"type": "local", "path": str(tiny_siglip.resolve())}
    assert weights.metadata["source_checksum"].startswith("sha256:")
    assert weights.checksum.startswith("sha256:")


def test_selection_by_prefix_and_glob(tiny_siglip_parquet):
    weights = WeightLoader(tiny_siglip_parquet)
    layer0 = weights.names("encoder.layers.0.")
    assert layer0 and all(n.startswith("encoder.layers.0.") for n in layer0)
    biases = weights.names("*.bias")
    assert biases and all(n.endswith(".bias") for n in biases)
    assert set(weights.numpy("head.")) == set(weights.names("head."))
    with pytest.raises(TensorNotFound, match="no tensor matches 'vision_model.encoder.layers.0.'"):
        weights.numpy("vision_model.encoder.layers.0.")  # an unmatched selection is an error, not {}
    with pytest.raises(KeyError):  # still a KeyError for dict-style callers
        weights.torch("nothing.*")


def test_other_parquet_writers_fall_back_to_decoding(tmp_path, tiny_siglip_parquet, caplog):
    table = pq.read_table(tiny_siglip_parquet)
    ours = {k: v for k, v in pq.read_metadata(tiny_siglip_parquet).metadata.items() if k.startswith(b"arrowvision.")}
    table = table.replace_schema_metadata(ours)
    compressed = tmp_path / "zstd.parquet"
    pq.write_table(table, compressed, compression="zstd", row_group_size=7)
    reference = WeightLoader(tiny_siglip_parquet)
    with caplog.at_level("WARNING", logger="arrowvision"):
        weights = WeightLoader(compressed, verify=True)
    assert not weights.zero_copy
    assert sum("decoding with pyarrow" in r.message for r in caplog.records) == 1
    for name in reference.names():
        np.testing.assert_array_equal(weights.tensor(name), reference.tensor(name))
        assert torch.equal(weights.torch(name)[name], reference.torch(name)[name])


# ------------------------------------------------------------------------- corrupt files


def test_truncated_file(tmp_path, tiny_siglip_parquet):
    data = tiny_siglip_parquet.read_bytes()
    for cut in (0, 5, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.parquet"
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="too small|magic|truncated"):
            WeightLoader(bad)


def test_flipped_byte_fails_checksum_naming_the_tensor(tmp_path, tiny_siglip_parquet):
    weights = WeightLoader(tiny_siglip_parquet)
    info = weights.info("encoder.layers.1.mlp.fc1.weight")
    data = bytearray(tiny_siglip_parquet.read_bytes())
    data[info.offset + 17] ^= 0x40
    bad = tmp_path / "flipped.parquet"
    bad.write_bytes(bytes(data))
    WeightLoader(bad)  # structure is intact: loads lazily without verify
    with pytest.raises(FormatError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight.*checksum"):
        WeightLoader(bad, verify=True)


def test_wrong_magic(tmp_path, tiny_siglip_parquet):
    data = bytearray(tiny_siglip_parquet.read_bytes())
    data[:4] = b"GGUF"
    bad = tmp_path / "magic.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="magic"):
        WeightLoader(bad)


def test_not_a_file(tmp_path):
    with pytest.raises(FormatError, match="cannot read"):
        WeightLoader(tmp_path / "missing.parquet")


def _hostile(tmp_path, *, shape, nbytes, dtype="float32", data=b"\0" * 16, metadata=None):
    """A file with our schema whose index lies about its tensor."""
    table = pa.table(
        {"name": ["evil"], "dtype": [dtype], "shape": [shape], "nbytes": [nbytes], "checksum": ["sha256:0"], "pad": [b""], "data": [data]},
        schema=SCHEMA,
    )
    path = tmp_path / "hostile.parquet"
    meta = {"arrowvision.format_version": "1", "arrowvision.config": "{}", "arrowvision.family": "siglip"} if metadata is None else metadata
    pq.write_table(table.replace_schema_metadata(meta), path, compression="none", use_dictionary=False)
    return path


def test_absurd_shape_is_rejected_before_allocating(tmp_path):
    path = _hostile(tmp_path, shape=[2**40, 2**40], nbytes=16)
    with pytest.raises(FormatError, match="evil.*shape"):
        WeightLoader(path)


def test_nbytes_past_the_end_is_rejected(tmp_path):
    path = _hostile(tmp_path, shape=[2**28], nbytes=2**30)  # within the 2 GiB limit, past the end
    with pytest.raises(FormatError, match="evil.*more than the whole file"):
        WeightLoader(path)


def test_negative_dims_and_unknown_dtype(tmp_path):
    with pytest.raises(FormatError, match="evil.*invalid shape"):
        WeightLoader(_hostile(tmp_path, shape=[-4, -1], nbytes=16))
    with pytest.raises(FormatError, match="evil.*unsupported dtype"):
        WeightLoader(_hostile(tmp_path, shape=[4], nbytes=16, dtype="complex128"))


def test_data_length_disagrees_with_index(tmp_path):
    path = _hostile(tmp_path, shape=[8], nbytes=32, data=b"\0" * 16)  # says 32 bytes, holds 16
    with pytest.raises(FormatError, match="evil"):
        WeightLoader(path).tensor("evil")


def test_missing_metadata(tmp_path):
    with pytest.raises(FormatError, match="missing file metadata"):
        WeightLoader(_hostile(tmp_path, shape=[4], nbytes=16, metadata={}))


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(FormatError, match="unsupported dtype"):
        write_weights(tmp_path / "x.parquet", [("x", np.zeros(3, np.complex64))], config={}, family="siglip")
    assert not list(tmp_path.iterdir())  # no temp file left behind


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_corruption_never_crashes(tmp_path_factory, data):
    """Any byte flips or truncation: either a valid load or FormatError, never a crash."""
    source = tmp_path_factory.getbasetemp() / "fuzz_source.parquet"
    if not source.exists():
        folder = save_checkpoint(tmp_path_factory.mktemp("fuzz"), "siglip_vision", **TINY_SIGLIP)
        convert(str(folder), source, progress=False)
    blob = bytearray(source.read_bytes())
    footer_start = len(blob) - 8 - int.from_bytes(blob[-8:-4], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(max(0, footer_start - 64), len(blob) - 1))
        blob[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    target = tmp_path_factory.mktemp("fuzzed") / "f.parquet"
    target.write_bytes(bytes(blob))
    try:
        weights = WeightLoader(target)
        for name in weights.names():
            weights.tensor(name)
    except FormatError:
        pass
    shutil.rmtree(target.parent)
