"""Crafted weights files (valid Parquet, all columns present) that lie in their config or their
tensor rows: each fails fast with our own error type naming the file and the field, and nothing
is built or allocated beyond what the file's own tensors cost."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from arrowvision import ConversionError, FormatError, ModelError, VisionConfig, WeightLoader
from arrowvision.model.config import ACTIVATIONS
from arrowvision.model.convert import convert
from arrowvision.model.vision import VisionTransformer, activation
from arrowvision.util.safejson import MAX_CONFIG_BYTES, json_depth, load_json
from arrowvision.weights import format as weights_format
from arrowvision.weights.format import SCHEMA
from arrowvision.weights.writer import write_weights

OUR_ERRORS = (FormatError, ConversionError, ModelError)
SECONDS = 5.0  # generous bound per load; the failures measured here take milliseconds
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def recraft(source: Path, target: Path, *, config: dict | None = None, raw_config: str | None = None,
            cast: str | None = None, source_meta: str | None = None) -> Path:
    """Rewrite ``source``'s tensors with the real writer under another config (a dict merged
    into the original, or raw metadata text) or with the tensors cast to another dtype."""
    weights = WeightLoader(source)
    extra = {}
    if raw_config is not None:
        extra["config"] = raw_config
    if source_meta is not None:
        extra["source"] = source_meta
    tensors = ((n, weights.tensor(n).astype(cast) if cast else weights.tensor(n)) for n in weights.names())
    write_weights(target, tensors, config={**weights.config, **(config or {})}, family=weights.family, extra_metadata=extra)
    return target


def load_model(path: Path) -> VisionTransformer:
    return VisionTransformer.from_weights(WeightLoader(path))


def timed(function, *args):
    start = time.perf_counter()
    try:
        return function(*args), None, time.perf_counter() - start
    except OUR_ERRORS as exc:
        return None, exc, time.perf_counter() - start


# ---------------------------------------------------------------------------- the layer bomb


@pytest.mark.parametrize("layers,error", [(200_000, ConversionError), (1000, ModelError)])
def test_layer_bomb_fails_in_well_under_a_second_without_building(tmp_path, tiny_siglip_parquet, monkeypatch, layers, error):
    """The issue's case: a 4-layer file whose config claims 200 000 layers cost 287 s and 9 GB.
    Within the schema's range (1000) the tensors' own layer count refuses it."""
    bomb = recraft(tiny_siglip_parquet, tmp_path / "bomb.parquet", config={"num_hidden_layers": layers})
    built = []
    monkeypatch.setattr(VisionTransformer, "__init__", lambda self, config: built.append(config))
    _, exc, seconds = timed(load_model, bomb)
    assert isinstance(exc, error), exc
    assert str(bomb) in str(exc) and "num_hidden_layers" in str(exc)
    assert seconds < 1.0, seconds
    assert not built  # refused before a single module was made


# ------------------------------------------------------------------ crafted configs, one by one


CRAFTED_CONFIGS = {
    # the cases
    "heads 2.5": (dict(num_attention_heads=2.5), ConversionError, "num_attention_heads.*integer"),
    "negative eps": (dict(layer_norm_eps=-1.0), ConversionError, "layer_norm_eps"),
    "hidden 1e9": (dict(hidden_size=1e9), ConversionError, "hidden_size.*integer"),
    "patch 0": (dict(patch_size=0), ConversionError, "patch_size.*out of range"),
    # more types and ranges
    "bool width": (dict(hidden_size=True), ConversionError, "hidden_size.*integer"),
    "string layers": (dict(num_hidden_layers="4"), ConversionError, "num_hidden_layers.*integer"),
    "null heads": (dict(num_attention_heads=None), ConversionError, "num_attention_heads"),
    "float image": (dict(image_size=32.0), ConversionError, "image_size.*integer"),
    "huge int": (dict(intermediate_size=10**40), ConversionError, "intermediate_size.*out of range"),
    "zero eps": (dict(layer_norm_eps=0), ConversionError, "layer_norm_eps"),
    "string eps": (dict(layer_norm_eps="1e-6"), ConversionError, "layer_norm_eps"),
    "heads do not divide": (dict(num_attention_heads=5), ConversionError, "num_attention_heads.*divide"),
    "patch > image": (dict(patch_size=64), ConversionError, "patch_size.*larger than image_size"),
    "grey channels": (dict(num_channels=1), ConversionError, "num_channels"),
    "unknown activation": (dict(hidden_act="relu"), ConversionError, "hidden_act"),
    "activation list": (dict(hidden_act=["gelu"]), ConversionError, "hidden_act"),
    "no head flag string": (dict(vision_use_head="yes"), ConversionError, "vision_use_head"),
    "model_type list": (dict(model_type=["siglip"]), ConversionError, "model_type"),
    "unknown model_type": (dict(model_type="bert"), ConversionError, "model_type"),
    "vision_config list": (dict(model_type="siglip", vision_config=[1, 2]), ConversionError, "vision_config"),
    # config and tensors disagree
    "fewer layers": (dict(num_hidden_layers=1), ModelError, "unexpected tensors: encoder.layers.1"),
    "more layers": (dict(num_hidden_layers=3), ModelError, "num_hidden_layers is 3"),
    "wider": (dict(hidden_size=128, num_attention_heads=4), ModelError, "wrong shapes"),
    "other image size": (dict(image_size=64), ModelError, r"position_embedding.weight \(16, 64\) != \(64, 64\)"),
    "wider mlp": (dict(intermediate_size=256), ModelError, "mlp.fc1.weight"),
    "clip config, siglip tensors": (dict(model_type="clip_vision_model"), ModelError, "missing tensors: embeddings.class_embedding"),
}


@pytest.mark.parametrize("case", CRAFTED_CONFIGS)
def test_crafted_config_is_refused_naming_file_and_field(tmp_path, tiny_siglip_parquet, case):
    changes, error, pattern = CRAFTED_CONFIGS[case]
    path = recraft(tiny_siglip_parquet, tmp_path / "crafted.parquet", config=changes)
    with pytest.raises(error, match=pattern) as info:
        load_model(path)
    assert str(path) in str(info.value)


RAW_CONFIGS = {
    "100 000 deep": ("[" * 100_000 + "]" * 100_000, "nested 100000 levels"),
    "deep object": ('{"a":' * 5000 + "1" + "}" * 5000, "nested 5000 levels"),
    "NaN": ('{"model_type": "siglip_vision_model", "layer_norm_eps": NaN}', "non-finite"),
    "Infinity": ('{"model_type": "siglip_vision_model", "layer_norm_eps": -Infinity}', "non-finite"),
    "overflowing literal": ('{"model_type": "siglip_vision_model", "layer_norm_eps": 1e999}', "non-finite"),
    "5000-digit integer": ('{"hidden_size": ' + "9" * 5000 + "}", "not valid JSON"),
    "not JSON": ("model_type: siglip", "not valid JSON"),
    "a JSON list": ("[1, 2, 3]", "must be a JSON object, not list"),
    "a JSON string": ('"siglip"', "must be a JSON object, not str"),
    "too large": (json.dumps({"model_type": "siglip_vision_model", "pad": "x" * MAX_CONFIG_BYTES}), "larger than"),
}


@pytest.mark.parametrize("case", RAW_CONFIGS)
def test_hostile_config_json_is_a_format_error(tmp_path, tiny_siglip_parquet, case):
    raw, pattern = RAW_CONFIGS[case]
    path = recraft(tiny_siglip_parquet, tmp_path / "raw.parquet", raw_config=raw)
    start = time.perf_counter()
    with pytest.raises(FormatError, match=pattern) as info:
        WeightLoader(path)
    assert time.perf_counter() - start < SECONDS
    assert f"{path}: metadata arrowvision.config" in str(info.value)


def test_source_metadata_and_tensor_dtypes_are_checked(tmp_path, tiny_siglip_parquet):
    path = recraft(tiny_siglip_parquet, tmp_path / "source.parquet", source_meta="[" * 1000)
    with pytest.raises(FormatError, match="metadata arrowvision.source.*nested"):
        WeightLoader(path)
    integers = recraft(tiny_siglip_parquet, tmp_path / "int8.parquet", cast="int8")
    with pytest.raises(ModelError, match="floating point.*int8"):
        load_model(integers)


def test_valid_config_variants_still_load(tmp_path, tiny_siglip_parquet):
    """The schema refuses lies, not legitimate spellings: an int eps, another known activation."""
    path = recraft(tiny_siglip_parquet, tmp_path / "ok.parquet", config=dict(layer_norm_eps=1, hidden_act="gelu"))
    with pytest.raises(ConversionError, match="layer_norm_eps"):  # (0, 1) is open: 1 is refused
        load_model(path)
    path = recraft(tiny_siglip_parquet, tmp_path / "ok.parquet", config=dict(layer_norm_eps=1e-5, hidden_act="gelu"))
    model = load_model(path)
    assert model.config.hidden_act == "gelu" and model.config.layer_norm_eps == 1e-5
    x = torch.linspace(-3, 3, 7)
    for name in ACTIVATIONS:  # every name the schema accepts is one the model implements
        assert torch.allclose(activation(name)(x), torch.nn.functional.gelu(x), atol=0.02 if name != "quick_gelu" else 0.03)


# ------------------------------------------------------------------- fuzzing the config values

CONFIG_KEYS = ["image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "layer_norm_eps", "hidden_act", "vision_use_head", "model_type"]
JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 4, 8, 16, 32, 64, 128, 2**31, 2**63, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 2.5, 1e-6, -1e-6, 1e9, 32.0]),
    st.text(max_size=20), st.sampled_from(["gelu", "relu", "quick_gelu", "siglip", "clip_vision_model", ""]),
)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, min_size=1, max_size=3), data=st.data())
def test_fuzzed_config_values(tmp_path_factory, tiny_siglip_parquet, changes, data):
    """Any values (type, zero, negative, huge, NaN, nesting) for the config keys: the model
    loads and gives finite embeddings, or our own error comes back within the time bound."""
    target = tmp_path_factory.mktemp("fuzz_config") / "f.parquet"
    if data.draw(st.booleans()):  # also as raw JSON text, NaN and all, as a hostile writer would
        config = {**WeightLoader(tiny_siglip_parquet).config, **changes}
        recraft(tiny_siglip_parquet, target, raw_config=json.dumps(config))
    else:
        recraft(tiny_siglip_parquet, target, config=changes)
    model, exc, seconds = timed(load_model, target)
    assert seconds < SECONDS, (changes, seconds)
    if exc is None:
        pooled = model(torch.rand(1, 3, model.config.image_size, model.config.image_size)).pooled
        assert torch.isfinite(pooled).all(), changes
    else:
        assert str(target) in str(exc)


# --------------------------------------------------------------------- crafted tensor rows


def write_rows(path: Path, rows: list[dict], *, schema: pa.Schema = SCHEMA, compression: str = "none") -> Path:
    """A file with our metadata whose index rows say anything."""
    columns = {field.name: [row.get(field.name) for row in rows] for field in schema}
    table = pa.table(columns, schema=schema)
    meta = {"arrowvision.format_version": "1", "arrowvision.config": "{}", "arrowvision.family": "siglip"}
    pq.write_table(table.replace_schema_metadata(meta), path, compression=compression, use_dictionary=False)
    return path


def row(name="evil", dtype="float32", shape=(4,), nbytes=16, data=b"\0" * 16) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape), "nbytes": nbytes, "checksum": "sha256:0", "pad": b"", "data": data}


NULLABLE = pa.schema([field.with_nullable(True) for field in SCHEMA])

CRAFTED_ROWS = {
    "[0, 2**62], nbytes 0": ([row(shape=(0, 2**62), nbytes=0, data=b"")], "too large"),
    "[0] * 8 with huge dims": ([row(shape=(0,) + (2**40,) * 7, nbytes=0, data=b"")], "too large"),
    "2**40 x 2**40": ([row(shape=(2**40, 2**40))], "shape"),
    "negative dimension": ([row(shape=(-4, -1))], "invalid shape"),
    "9 dimensions": ([row(shape=(1,) * 9, nbytes=4, data=b"\0" * 4)], "invalid shape"),
    "nbytes over 2 GiB": ([row(shape=(2**30,), nbytes=2**32)], "too large"),
    "negative nbytes": ([row(nbytes=-16)], "nbytes says -16"),
    "nbytes past the end": ([row(shape=(2**28,), nbytes=2**30)], "more than the whole file"),
    "unknown dtype": ([row(dtype="complex128")], "unsupported dtype 'complex128'"),
    "empty dtype": ([row(dtype="")], "unsupported dtype"),
    "duplicate names": ([row(), row()], "duplicated"),
    "empty name": ([row(name="")], "empty"),
    "10 000-character name": ([row(name="n" * 10_000)], r"printable.*1024"),
    "control characters in name": ([row(name="a\nb\x00")], "printable"),
    "data shorter than nbytes": ([row(shape=(8,), nbytes=32)], "evil"),
}


@pytest.mark.parametrize("case", CRAFTED_ROWS)
def test_crafted_tensor_rows(tmp_path, case):
    rows, pattern = CRAFTED_ROWS[case]
    path = write_rows(tmp_path / "rows.parquet", rows)
    with pytest.raises(FormatError, match=pattern) as info:
        weights = WeightLoader(path)
        weights.numpy(), weights.torch()
    assert str(path) in str(info.value) and len(str(info.value)) < 600  # hostile names are cut short


def test_null_values_and_wrong_column_types(tmp_path):
    for field in ("name", "dtype", "shape", "nbytes"):
        path = write_rows(tmp_path / f"null_{field}.parquet", [{**row(), field: None}], schema=NULLABLE)
        with pytest.raises(FormatError, match="evil|empty|shape|dtype"):
            WeightLoader(path)
    wrong = pa.schema([pa.field("shape", pa.string()) if f.name == "shape" else f for f in SCHEMA])
    path = write_rows(tmp_path / "shape_text.parquet", [{**row(), "shape": "[4]"}], schema=wrong)
    with pytest.raises(FormatError, match="column 'shape' has type string"):
        WeightLoader(path)
    missing = pa.schema([f for f in SCHEMA if f.name != "nbytes"])
    with pytest.raises(FormatError, match="missing index column 'nbytes'"):
        WeightLoader(write_rows(tmp_path / "no_nbytes.parquet", [row()], schema=missing))


def test_decompression_bombs_in_index_and_data(tmp_path, monkeypatch):
    """Compressed columns that decode to far more than they say: refused from the footer."""
    monkeypatch.setattr(weights_format, "MAX_INDEX_BYTES", 1 << 20)
    names = write_rows(tmp_path / "names.parquet", [row(name="n" * (2 << 20))], compression="zstd")
    assert names.stat().st_size < 100_000
    with pytest.raises(FormatError, match="index columns decode to"):
        WeightLoader(names)
    data = write_rows(tmp_path / "data.parquet", [row(data=b"\0" * (16 << 20))], compression="zstd")
    assert data.stat().st_size < 100_000
    weights = WeightLoader(data)  # non-canonical (compressed): decoded on first use
    with pytest.raises(FormatError, match="data column decodes to"):
        weights.tensor("evil")


TENSOR_ROWS = st.fixed_dictionaries({
    "name": st.one_of(st.sampled_from(["w", "w", "encoder.layers.0.x", ""]), st.text(max_size=30)),
    "dtype": st.one_of(st.sampled_from(list(weights_format.DTYPES)), st.text(max_size=10)),
    "shape": st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, 2, 4, 2**31, 2**62])), max_size=10),
    "nbytes": st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 4, 8, 16, 2**31])),
    "checksum": st.text(max_size=10),
    "pad": st.binary(max_size=8),
    "data": st.binary(max_size=64),
})


@FUZZ
@given(rows=st.lists(TENSOR_ROWS, min_size=1, max_size=3), compression=st.sampled_from(["none", "zstd"]))
def test_fuzzed_tensor_rows(tmp_path_factory, rows, compression):
    """Any dtype, shape, nbytes, names and data: a valid load whose tensors match their rows,
    or FormatError, within the time bound, never a numpy/torch/pyarrow error."""
    path = write_rows(tmp_path_factory.mktemp("fuzz_rows") / "f.parquet", rows, compression=compression)
    start = time.perf_counter()
    try:
        weights = WeightLoader(path, verify=False)
        arrays, tensors = weights.numpy(), weights.torch()
    except FormatError as exc:
        assert str(path) in str(exc)
    else:
        for name, array in arrays.items():
            assert array.shape == tuple(weights.info(name).shape) == tuple(tensors[name].shape)
            assert array.nbytes == weights.info(name).nbytes
    assert time.perf_counter() - start < SECONDS


# ------------------------------------------------------------------------------- the paths


def test_directories_and_unreadable_paths(tmp_path, tiny_siglip_parquet, monkeypatch):
    with pytest.raises(FormatError, match="a directory"):
        WeightLoader(tmp_path)
    os.mkfifo(tmp_path / "fifo.parquet")
    with pytest.raises(FormatError, match="not a regular file"):  # opening a FIFO would block
        WeightLoader(tmp_path / "fifo.parquet")
    with pytest.raises(FormatError, match="cannot read"):
        WeightLoader(str(tmp_path) + "/bad\0name.parquet")
    with pytest.raises(FormatError, match="cannot read"):
        WeightLoader(tiny_siglip_parquet / "inside-a-file.parquet")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(weights_format, "open", denied, raising=False)  # root ignores chmod 000
    with pytest.raises(FormatError, match="Permission denied"):
        WeightLoader(tiny_siglip_parquet)


# ------------------------------------------------------------------------- the JSON guard


def test_json_guard_is_reusable_for_any_json():
    """The same guard serves tokenizer files of the text tower: size, depth, finiteness."""
    assert json_depth('{"a": [1, {"b": "[[[[ \\" {{"}]}') == 3
    assert load_json(b'{"vocab": {"a": 1}}', "tokenizer.json") == {"vocab": {"a": 1}}
    with pytest.raises(FormatError, match="tokenizer.json: JSON of 11 bytes is larger than the 10 allowed"):
        load_json('{"a": "bb"}', "tokenizer.json", max_bytes=10)
    with pytest.raises(FormatError, match="tokenizer.json: JSON nested 3 levels"):
        load_json("[[[1]]]", "tokenizer.json", max_depth=2)
    with pytest.raises(FormatError, match="not UTF-8"):
        load_json(b'{"a": "\xff"}', "tokenizer.json")
    with pytest.raises(FormatError, match="non-finite"):
        load_json('{"merges": [[1e400]]}', "tokenizer.json")
    assert np.isfinite(load_json("[1e300]", "x")[0])


@settings(max_examples=60, deadline=None)
@given(st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)))
def test_json_depth_matches_the_parsed_structure(value):
    def depth(item):
        if isinstance(item, list):
            return 1 + max(map(depth, item), default=0)
        if isinstance(item, dict):
            return 1 + max(map(depth, item.values()), default=0)
        return 0

    text = json.dumps(value)
    assume("NaN" not in text and "Infinity" not in text)
    assert json_depth(text) == depth(value)
    assert load_json(text, "x") == value


def test_config_from_hf_is_the_same_schema(tiny_siglip_parquet):
    """VisionConfig refuses bad values however it is built (presets, from_hf, directly)."""
    config = WeightLoader(tiny_siglip_parquet).config
    assert VisionConfig.from_hf(config).num_layers == config["num_hidden_layers"]
    with pytest.raises(ConversionError, match="config must be a JSON object"):
        VisionConfig.from_hf([config])
    with pytest.raises(ConversionError, match="num_attention_heads"):
        VisionConfig("siglip", num_heads=0)
    assert all(VisionConfig.preset(name) for name in ("siglip-base-patch16-224", "clip-vit-large-patch14-336"))


def test_checkpoint_json_goes_through_the_same_guard(tmp_path, tiny_siglip):
    """convert reads a downloaded checkpoint's config.json and shard index: same limits."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_siglip, folder)
    (folder / "config.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(ConversionError, match="unreadable config .*nested 50000 levels"):
        convert(str(folder), tmp_path / "o.parquet", progress=False)
    shutil.copy(tiny_siglip / "config.json", folder / "config.json")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    with pytest.raises(ConversionError, match="unreadable shard index"):
        convert(str(folder), tmp_path / "o.parquet", progress=False)
