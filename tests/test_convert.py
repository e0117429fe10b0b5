"""Converter inputs (folders, shards, .bin, single files, hub ids) and its error messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arrowvision import ConversionError, WeightLoader
from arrowvision.model.convert import convert

from .conftest import TINY_CLIP, TINY_SIGLIP, hf_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _assert_same_tensors(parquet: Path, folder: Path, prefix: str = "") -> None:
    reference = {k: v for k, v in hf_model(folder).state_dict().items() if k.startswith(prefix) and not k.endswith("position_ids")}
    loaded = WeightLoader(parquet).torch()
    assert set(loaded) == set(reference)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, reference[name]), name


def test_full_siglip_checkpoint_vision_text_all(tmp_path):
    folder = save_checkpoint(tmp_path / "full", "siglip_full", **TINY_SIGLIP)
    for tower, prefix in (("vision", "vision_model."), ("text", "text_model."), ("all", "")):
        out = tmp_path / f"{tower}.parquet"
        convert(str(folder), out, tower=tower, progress=False)
        weights = WeightLoader(out)
        assert weights.tower == tower
        if tower == "all":
            _assert_same_tensors(out, folder)
        else:
            assert all(n.startswith(prefix) for n in weights.names())
            _assert_same_tensors(out, folder, prefix)


def test_full_clip_checkpoint_keeps_visual_projection(tmp_path):
    folder = save_checkpoint(tmp_path / "full", "clip_full", **TINY_CLIP)
    out = tmp_path / "v.parquet"
    convert(str(folder), out, progress=False)
    names = WeightLoader(out).names()
    assert "visual_projection.weight" in names and not any(n.startswith("text") for n in names)


def test_sharded_safetensors(tmp_path):
    import transformers as tf

    folder = save_checkpoint(tmp_path / "one", "siglip_vision", **TINY_SIGLIP)
    sharded = tmp_path / "sharded"
    tf.SiglipVisionModel.from_pretrained(folder).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    out = tmp_path / "s.parquet"
    convert(str(sharded), out, progress=False)
    _assert_same_tensors(out, folder)


def test_pytorch_bin_is_loaded_weights_only(tmp_path):
    folder = save_checkpoint(tmp_path / "st", "siglip_vision", **TINY_SIGLIP)
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(folder / "config.json", binary)
    torch.save(load_file(folder / "model.safetensors"), binary / "pytorch_model.bin")
    out = tmp_path / "b.parquet"
    convert(str(binary), out, progress=False)
    _assert_same_tensors(out, folder)


def test_pickle_payload_in_bin_is_refused(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"x": Exploit()}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(ConversionError, match="unreadable checkpoint"):
        convert(str(folder), tmp_path / "o.parquet", progress=False)
    assert not (tmp_path / "pwned").exists()


def test_single_safetensors_file_with_config(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", "clip_vision", **TINY_CLIP)
    single = tmp_path / "weights.safetensors"
    shutil.copy(folder / "model.safetensors", single)
    out = tmp_path / "c.parquet"
    convert(str(single), out, config_path=str(folder / "config.json"), progress=False)
    _assert_same_tensors(out, folder)


def test_missing_config(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", "siglip_vision", **TINY_SIGLIP)
    (folder / "config.json").unlink()
    with pytest.raises(ConversionError, match="missing config"):
        convert(str(folder), tmp_path / "o.parquet", progress=False)


def test_unsupported_family(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", "siglip_vision", **TINY_SIGLIP)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConversionError, match="unsupported model.*bert"):
        convert(str(folder), tmp_path / "o.parquet", progress=False)


def test_missing_and_unexpected_tensors(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", "siglip_vision", **TINY_SIGLIP)
    state = load_file(folder / "model.safetensors")
    state.pop("head.probe")
    state["encoder.layers.9.mlp.fc1.weight"] = torch.zeros(2, 2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ConversionError, match=r"missing tensors: head\.probe.*unexpected tensors: encoder\.layers\.9"):
        convert(str(folder), tmp_path / "o.parquet", progress=False)
    assert not (tmp_path / "o.parquet").exists()


def test_unsupported_dtype_and_tower(tmp_path, tiny_siglip):
    with pytest.raises(ConversionError, match="unsupported dtype 'float8'"):
        convert(str(tiny_siglip), tmp_path / "o.parquet", dtype="float8", progress=False)
    with pytest.raises(ConversionError, match="no text tower"):
        convert(str(tiny_siglip), tmp_path / "o.parquet", tower="text", progress=False)


def test_unreadable_weights(tmp_path, tiny_siglip):
    folder = tmp_path / "garbage"
    shutil.copytree(tiny_siglip, folder)
    (folder / "model.safetensors").write_bytes(b"\x07" * 100)
    with pytest.raises(ConversionError, match="unreadable checkpoint file"):
        convert(str(folder), tmp_path / "o.parquet", progress=False)


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConversionError, match="HF_HUB_OFFLINE"):
        convert("google/siglip-base-patch16-224", tmp_path / "o.parquet", progress=False)


def test_hub_id_served_from_local_cache(tmp_path, monkeypatch, tiny_siglip):
    """A hub id resolves through huggingface_hub's cache layout when offline."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-siglip" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_siglip, snapshot)
    (cache / "models--acme--tiny-siglip" / "refs").mkdir()
    (cache / "models--acme--tiny-siglip" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "hub.parquet"
    convert("acme/tiny-siglip", out, progress=False)
    source = WeightLoader(out).source
    assert source == {"type": "hub", "repo_id": "acme/tiny-siglip", "revision": "a" * 40, "requested_revision": "main"}


def test_cli_tool_prints_summary_and_fails_cleanly(tmp_path, tiny_clip):
    out = tmp_path / "cli.parquet"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_weights.py"), str(tiny_clip), str(out), "--dtype", "float16", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "40 tensors" in run.stdout and "parameters" in run.stdout
    assert WeightLoader(out).tensor("visual_projection.weight").dtype.name == "float16"
    bad = subprocess.run(
        [sys.executable, "-m", "arrowvision", "convert", str(tmp_path / "nope"), str(out)], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
