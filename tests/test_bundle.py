"""Bundles (issue 27): `arrowvision bundle` writes a validated, checksummed folder; the encoders,
`serve --bundle` and `embed --bundle` load it without torch; a bundle from another CPU is
re-validated or falls back to fp32, saying so; a bad bundle is our own error.

The runtime install itself (a fresh venv without torch) is tests/test_runtime_install.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import arrowvision
from arrowvision import BundleError, ImageTextModel, VisionEncoder
from arrowvision.bundle.build import build_bundle
from arrowvision.cli import EXIT_ERROR, EXIT_USAGE, main

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "arrowvision" / "samples").glob("*.jpg"))[:4]


@pytest.fixture(scope="module")
def bundle_all(siglip_all_parquet, module_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "siglip-all"
    build_bundle(siglip_all_parquet, out, tower="all")
    return out


@pytest.fixture(scope="module")
def lossy_bundle(tiny_siglip_parquet, module_cache, tmp_path_factory) -> Path:
    """int8-weights on OpenVINO: lossy, so the bundle carries an fp32 fallback."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-int8w"
    build_bundle(tiny_siglip_parquet, out, backend="openvino", precision="int8-weights")
    return out


def as_if_made_on_another_cpu(bundle: Path, target: Path) -> Path:
    """A copy of ``bundle`` whose manifest names another CPU (the manifest is not itself checksummed)."""
    import shutil

    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("cache"))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["cpu"].update(model="AMD EPYC 7R13 (test)", signature="0" * 16, describe="AMD EPYC 7R13 (test); lacks avx512f")
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_the_bundle_records_what_it_holds_and_where_it_was_made(bundle_all, siglip_all_parquet):
    manifest = json.loads((bundle_all / "manifest.json").read_text())
    assert manifest["weights"]["checksum"] == arrowvision.WeightLoader(siglip_all_parquet).checksum
    assert manifest["requested_backend"] == "openvino" and manifest["tower"] == "all"
    for tower in ("vision", "text"):
        artifact = manifest[tower]["artifact"]
        assert (artifact["backend"], artifact["precision"]) == ("openvino", "fp32")
        assert "fallback" not in manifest[tower]  # fp32 needs none
        assert artifact["accuracy"]["min_cosine"] >= 0.9999
    assert set(manifest["vision"]["artifact"]["accuracy"]["by_kind"]) == {"photos", "grayscale", "sketches", "graphics", "small"}
    assert manifest["cpu"]["model"] and len(manifest["cpu"]["signature"]) == 16
    assert manifest["versions"]["openvino"] and manifest["versions"]["arrowvision"] == arrowvision.__version__
    files = manifest["files"]
    assert {"config.json", "vision/model.xml", "vision/model.bin", "text/model.xml", "reference/vision.npz",
            "reference/text.npz"} <= set(files)
    assert any(name.startswith("tokenizer/") for name in files)
    assert all(len(entry["blake3"]) == 64 and entry["bytes"] > 0 for entry in files.values())
    assert manifest["compiled_cache"] == "cache/" and manifest["compiled_cache_files"], "the compiled-model cache was not filled"
    assert all((bundle_all / name).is_file() for name in manifest["compiled_cache_files"])
    assert not [p for p in bundle_all.parent.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_a_bundle_embeds_like_the_weights_it_was_made_from(bundle_all, siglip_all_parquet):
    bundled = ImageTextModel.from_bundle(bundle_all)
    reference = ImageTextModel.from_parquet(siglip_all_parquet)  # the torch reference
    cosines = (bundled.encode_images(SAMPLES) * reference.encode_images(SAMPLES)).sum(axis=1)
    assert cosines.min() >= 0.99999, cosines
    texts = ["a photo of a cat", "two dogs on a beach", "東京の夜景"]
    assert (bundled.encode_texts(texts) * reference.encode_texts(texts)).sum(axis=1).min() >= 0.99999
    np.testing.assert_allclose(bundled.logits(SAMPLES[:2], texts), reference.logits(SAMPLES[:2], texts), atol=1e-3)
    assert bundled.checksum == reference.checksum  # datasets and indexes made with either match
    vision = VisionEncoder.from_bundle(bundle_all)
    assert vision.backend.name == "openvino" and vision.embedding_dim == reference.vision.embedding_dim


def test_a_bundle_serves_images_and_texts(bundle_all):
    from arrowvision.service.app import create_app

    model = ImageTextModel.from_bundle(bundle_all)
    with TestClient(create_app(model.vision, text_model=model)) as client:
        assert client.get("/health").json()["model_loaded"] is True
        answer = client.post("/v1/embed", files={"file": ("a.jpg", SAMPLES[0].read_bytes(), "image/jpeg")}).json()
        assert np.dot(answer["embedding"], model.encode_images([SAMPLES[0]])[0]) >= 0.99999
        texts = client.post("/v1/embed/text", json={"texts": ["a cat"]}).json()
        assert np.dot(texts["embeddings"][0], model.encode_texts(["a cat"])[0]) >= 0.99999


def test_loading_a_bundle_imports_neither_torch_nor_transformers(bundle_all):
    code = textwrap.dedent(f"""
        import sys
        import arrowvision
        model = arrowvision.ImageTextModel.from_bundle({str(bundle_all)!r})
        model.encode_images([{str(SAMPLES[0])!r}]); model.encode_texts(["a cat"])
        print("LEAKED", sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "transformers", "nncf"}}))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert run.returncode == 0, run.stderr
    assert "LEAKED []" in run.stdout, run.stdout


def test_bad_bundles_are_our_error(bundle_all, tmp_path):
    import shutil

    with pytest.raises(BundleError, match="no such bundle folder"):
        VisionEncoder.from_bundle(tmp_path / "missing")
    with pytest.raises(BundleError, match="no manifest.json"):
        VisionEncoder.from_bundle(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(bundle_all, copy)
    with open(copy / "vision" / "model.bin", "r+b") as file:  # one flipped byte, same size
        first = file.read(1)
        file.seek(0)
        file.write(bytes([first[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="vision/model.bin does not match its checksum"):  # same size: hashed
        VisionEncoder.from_bundle(copy)
    with open(copy / "vision" / "model.bin", "ab") as file:
        file.write(b"\0")
    with pytest.raises(BundleError, match="vision/model.bin does not match its size"):  # caught before any read
        VisionEncoder.from_bundle(copy)
    (copy / "vision" / "model.bin").unlink()
    with pytest.raises(BundleError, match="incomplete: vision/model.bin is missing"):
        VisionEncoder.from_bundle(copy)
    shutil.rmtree(copy)
    shutil.copytree(bundle_all, copy)
    (copy / "vision" / "extra.bin").write_bytes(b"\0")
    with pytest.raises(BundleError, match="does not list: vision/extra.bin"):
        VisionEncoder.from_bundle(copy)
    (copy / "vision" / "extra.bin").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    blob = next(iter(manifest["compiled_cache_files"]))  # the compiled model made at build time is checked too
    original = (copy / blob).read_bytes()
    (copy / blob).write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(BundleError, match=f"{blob} does not match its checksum"):
        VisionEncoder.from_bundle(copy)
    (copy / blob).unlink()  # gone is fine: OpenVINO compiles again
    assert VisionEncoder.from_bundle(copy).backend.name == "openvino"
    assert VisionEncoder.from_bundle(copy).backend.name == "openvino"  # and the blob it wrote is the one recorded
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99"):
        VisionEncoder.from_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        VisionEncoder.from_bundle(copy)


def test_a_vision_only_bundle_says_it_has_no_text_tower(lossy_bundle):
    with pytest.raises(BundleError, match="--tower all"):
        ImageTextModel.from_bundle(lossy_bundle)


def test_a_lossy_bundle_from_another_cpu_is_revalidated_or_falls_back(lossy_bundle, tmp_path, caplog):
    manifest = json.loads((lossy_bundle / "manifest.json").read_text())
    assert manifest["vision"]["artifact"]["precision"] == "int8-weights"
    assert manifest["vision"]["fallback"]["precision"] == "fp32"
    here = VisionEncoder.from_bundle(lossy_bundle)  # made on this CPU: no re-validation, no note
    assert here.backend.precision == "int8-weights"
    moved = as_if_made_on_another_cpu(lossy_bundle, tmp_path / "moved")
    caplog.set_level("WARNING", logger="arrowvision")
    revalidated = VisionEncoder.from_bundle(moved)
    assert revalidated.backend.precision == "int8-weights"
    assert "made on AMD EPYC 7R13 (test); lacks avx512f; re-validated on this CPU" in caplog.text
    assert set(revalidated.backend.report["by_kind"]) == {"photos", "grayscale", "sketches", "graphics", "small"}
    caplog.clear()
    strict = VisionEncoder.from_bundle(moved, min_cosine=0.99999999)  # a threshold no int8 artifact reaches
    assert (strict.backend.name, strict.backend.precision) == ("openvino", "fp32")
    assert "does not hold here" in caplog.text and "falling back to its openvino fp32 artifact" in caplog.text
    cosines = (strict.encode(SAMPLES) * here.encode(SAMPLES)).sum(axis=1)
    assert cosines.min() > 0.99


def test_an_int8_onnx_bundle_has_weights_that_hold_on_every_cpu_kind(tiny_siglip_parquet, module_cache, tmp_path):
    """Made on any CPU (VNNI or not), a bundle's int8 weights use 7 bits: 8-bit ones made on a
    VNNI machine saturate the u8 x s8 products of an AVX2-only CPU (SigLIP-B/16: 0.91 there)."""
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "ort-int8"
    build_bundle(tiny_siglip_parquet, out, backend="onnxruntime", precision="int8")
    graph = onnx.load(str(out / "vision" / "model.onnx")).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    quantized = [node.input[1] for node in graph.node if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert quantized
    assert all(np.abs(initializers[name].astype(np.int16)).max() <= 64 for name in quantized)
    assert VisionEncoder.from_bundle(out).backend.precision == "int8"


def test_an_auto_bundle_runs_on_another_cpu(tiny_siglip_parquet, module_cache, tmp_path, caplog):
    out = tmp_path / "auto"
    manifest = build_bundle(tiny_siglip_parquet, out, backend="auto")
    assert manifest["requested_backend"] == "auto"
    chosen = manifest["vision"]["artifact"]
    assert (chosen["backend"], chosen["precision"]) == (manifest["auto"]["backend"], manifest["auto"]["precision"])
    assert manifest["auto"]["cpu"] == manifest["cpu"]["describe"]
    moved = as_if_made_on_another_cpu(out, tmp_path / "moved")
    caplog.set_level("WARNING", logger="arrowvision")
    encoder = VisionEncoder.from_bundle(moved)
    assert (encoder.backend.name, encoder.backend.precision) == (chosen["backend"], chosen["precision"])
    assert "re-validated on this CPU" in caplog.text and "auto's choice there" in caplog.text


def test_bundle_writes_atomically_and_refuses_to_overwrite(tiny_siglip_parquet, module_cache, tmp_path):
    out = tmp_path / "b"
    with pytest.raises(arrowvision.BackendError, match="too inaccurate"):  # refused at validation: nothing is left
        build_bundle(tiny_siglip_parquet, out, backend="onnxruntime", precision="int8", min_cosine=0.99999999)
    assert list(tmp_path.iterdir()) == []
    build_bundle(tiny_siglip_parquet, out)
    with pytest.raises(BundleError, match="exists"):
        build_bundle(tiny_siglip_parquet, out)
    first = json.loads((out / "manifest.json").read_text())["created_at"]
    build_bundle(tiny_siglip_parquet, out, force=True, backend="onnxruntime")
    assert json.loads((out / "manifest.json").read_text())["vision"]["artifact"]["backend"] == "onnxruntime"
    assert first and [p.name for p in tmp_path.iterdir()] == ["b"]
    assert VisionEncoder.from_bundle(out).backend.name == "onnxruntime"
    with pytest.raises(arrowvision.ModelError, match="holds no text tower"):
        build_bundle(tiny_siglip_parquet, tmp_path / "text", tower="all")


def test_cli_bundle_then_embed_from_it(tiny_siglip_parquet, module_cache, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["bundle", "--weights", str(tiny_siglip_parquet), "-o", str(out), "--no-progress"]) == 0
    assert "vision: openvino fp32" in capsys.readouterr().out
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in SAMPLES:
        (photos / path.name).write_bytes(path.read_bytes())
    assert main(["embed", str(photos), "-o", str(tmp_path / "emb"), "--bundle", str(out), "--no-progress"]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "emb")
    reference = VisionEncoder.from_parquet(tiny_siglip_parquet).encode([photos / Path(p).name for p in table["path"].to_pylist()])
    assert (np.stack(table["embedding"].to_numpy(zero_copy_only=False)) * reference).sum(axis=1).min() >= 0.99999
    import pyarrow as pa  # a table's image column (embed TABLE --column) from the bundle too

    pq.write_table(pa.table({"img": [path.read_bytes() for path in SAMPLES]}), tmp_path / "table.parquet")
    argv = ["embed", str(tmp_path / "table.parquet"), "--column", "img", "-o", str(tmp_path / "col"), "--bundle", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    rows = pq.read_table(tmp_path / "col")
    order = np.argsort([int(p.rsplit("#", 1)[1]) for p in rows["path"].to_pylist()])
    embedded = np.stack(rows["embedding"].to_numpy(zero_copy_only=False))[order]
    assert (embedded * VisionEncoder.from_parquet(tiny_siglip_parquet).encode(SAMPLES)).sum(axis=1).min() >= 0.99999


@pytest.mark.parametrize("argv, message", [
    (["serve", "--bundle", "B", "--precision", "int8"], "drop --precision"),
    (["serve", "--bundle", "B", "--weights", "W.parquet"], "drop --weights"),
    (["serve", "--bundle", "B", "--backend", "torch"], "drop --backend"),
    (["embed", "x", "-o", "y", "--bundle", "B", "--engine", "ray"], "--engine local only"),
    (["bundle", "--weights", "W", "-o", "B", "--backend", "auto", "--precision", "int8"], "chooses the precision itself"),
])
def test_cli_refuses_options_a_bundle_fixes(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_cli_names_a_missing_bundle(tmp_path, capsys):
    samples = str(SAMPLES[0].parent)
    assert main(["embed", samples, "-o", str(tmp_path / "out"), "--bundle", str(tmp_path / "nope")]) == EXIT_ERROR
    assert "no such bundle folder" in capsys.readouterr().err
