"""SigLIP 2 NaFlex on the fast paths: OpenVINO and ONNX Runtime graphs with a dynamic patch count
and the mask as an input, equal to our torch tower at fp32 for mixed shapes and every budget;
lossy precisions validated on the held-out kinds like fixed-resolution models; ``auto``; the
service and score paths taking NaFlex weights."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from arrowvision import BackendError, VisionEncoder
from arrowvision.backends.validation import KINDS
from arrowvision.inputs.naflex import NaFlexBatch, concatenate

from .conftest import save_checkpoint
from .test_naflex import BUDGETS, SHAPES, TINY_NAFLEX, pad_to

FP32_MAX_ABS = 1e-4


@pytest.fixture(scope="module")
def naflex_parquet(tmp_path_factory):
    from arrowvision.model.convert import convert

    folder = save_checkpoint(tmp_path_factory.mktemp("naflex_fast"), "siglip2_vision", seed=11, **TINY_NAFLEX)
    convert(str(folder), folder / "naflex.parquet", progress=False)
    return folder / "naflex.parquet"


@pytest.fixture(scope="module")
def images(photos) -> list[Image.Image]:
    sources = list(photos.values())
    return [Image.fromarray(sources[i % len(sources)]).resize((w, h)) for i, (h, w) in enumerate(SHAPES)]


@pytest.fixture(scope="module")
def mixed_batch(naflex_parquet, images) -> NaFlexBatch:
    """Every shape at every budget, padded to the largest: one batch of 21 images."""
    encoder = VisionEncoder.from_parquet(naflex_parquet)
    config = encoder.config
    from arrowvision.inputs.naflex import NaFlexPreprocessor

    return concatenate([pad_to(NaFlexPreprocessor.from_config(config, b).batch(images), max(BUDGETS)) for b in BUDGETS])


@pytest.fixture(scope="module")
def reference(naflex_parquet, mixed_batch) -> np.ndarray:
    return VisionEncoder.from_parquet(naflex_parquet).backend(mixed_batch)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_fp32_graphs_equal_torch_for_mixed_shapes_and_budgets(backend, naflex_parquet, mixed_batch, reference, images,
                                                             module_cache):
    encoder = VisionEncoder.from_parquet(naflex_parquet, backend=backend)
    assert encoder.backend.name == backend and encoder.config.naflex
    assert np.abs(encoder.backend(mixed_batch) - reference).max() <= FP32_MAX_ABS
    # one graph for any patch count: each budget on its own, and through the encoder
    torch_encoder = VisionEncoder.from_parquet(naflex_parquet)
    for budget in BUDGETS:
        got = encoder.encode(images, max_num_patches=budget, batch_size=4)
        assert np.abs(got - torch_encoder.encode(images, max_num_patches=budget)).max() <= FP32_MAX_ABS
    with pytest.raises(BackendError, match="NaFlexBatch"):
        encoder.backend(np.zeros((1, 3, 32, 32), np.float32))


def test_openvino_throughput_mode_splits_naflex_batches(naflex_parquet, mixed_batch, reference, module_cache):
    encoder = VisionEncoder.from_parquet(naflex_parquet, backend="openvino", mode="throughput")
    assert np.abs(encoder.backend(mixed_batch) - reference).max() <= FP32_MAX_ABS


@pytest.mark.parametrize("backend, precision", [("openvino", "int8"), ("openvino", "int8-weights"), ("onnxruntime", "int8")])
def test_lossy_precisions_are_validated_on_every_heldout_kind(backend, precision, naflex_parquet, mixed_batch, reference,
                                                              module_cache):
    encoder = VisionEncoder.from_parquet(naflex_parquet, backend=backend, precision=precision)
    report = encoder.backend.report
    assert set(report["by_kind"]) == set(KINDS) and report["min_cosine"] >= 0.99
    got = encoder.backend(mixed_batch)
    cosines = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.98
    with pytest.raises(BackendError, match="too inaccurate"):  # the cached export held to a stricter caller
        VisionEncoder.from_parquet(naflex_parquet, backend=backend, precision=precision, min_cosine=0.9999999)


def test_a_fixed_resolution_graph_refuses_a_naflex_batch(tiny_siglip_parquet, mixed_batch, module_cache):
    encoder = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="onnxruntime")
    with pytest.raises(BackendError, match="not a NaFlexBatch"):
        encoder.backend(mixed_batch)


def test_auto_chooses_a_validated_backend_for_naflex(naflex_parquet, mixed_batch, reference, module_cache):
    encoder = VisionEncoder.from_parquet(naflex_parquet, backend="auto")
    record = encoder.backend.choice
    measured = [row for row in record["candidates"] if "score" in row]
    assert measured and all(row["min_cosine"] >= 0.99 for row in measured)
    assert encoder.backend.name in ("openvino", "onnxruntime")
    got = encoder.backend(mixed_batch)
    cosines = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.98


def test_service_embeds_with_naflex_weights(naflex_parquet, images, module_cache):
    from fastapi.testclient import TestClient

    from arrowvision.service.app import create_app
    from arrowvision.service.config import ServiceConfig

    encoder = VisionEncoder.from_parquet(naflex_parquet, backend="openvino")
    buffers = []
    for image in images[:3]:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        buffers.append(base64.b64encode(buffer.getvalue()).decode())
    with TestClient(create_app(encoder, ServiceConfig())) as client:
        assert client.get("/health").status_code == 200
        answer = client.post("/v1/embed/batch", json={"images": buffers})
        assert answer.status_code == 200, answer.text
        vectors = np.array([item["embedding"] for item in answer.json()["results"]], np.float32)
    assert np.abs(vectors - encoder.encode(images[:3])).max() <= 1e-5


def test_score_pairs_with_naflex_weights(tmp_path, images):
    """The Arrow scoring path (``score``): NaFlex images of mixed shapes against their texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import arrowvision
    from arrowvision.datasets.score_pairs import score_pairs
    from arrowvision.model.convert import convert

    from .textkit import save_full_checkpoint

    folder = save_full_checkpoint(tmp_path / "full", "siglip2-naflex", seed=13)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    model = arrowvision.ImageTextModel.from_parquet(folder / "all.parquet")
    paths = []
    for i, image in enumerate(images[:4]):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    texts = ["a photo", "a drawing", "a rocket", "a cat"]
    pq.write_table(pa.table({"image": paths, "text": texts}), tmp_path / "pairs.parquet")
    stats = score_pairs(model, tmp_path / "pairs.parquet", tmp_path / "scores.parquet", batch_size=3, progress=False)
    assert stats.scored == 4 and stats.failed == 0
    logits = np.asarray(pq.read_table(tmp_path / "scores.parquet").column("logit").to_pylist(), np.float32)
    assert np.abs(logits - np.diag(model.logits(paths, texts))).max() <= 1e-4


def test_a_bundle_of_naflex_weights_embeds_like_torch(naflex_parquet, mixed_batch, reference, module_cache, tmp_path):
    """``arrowvision bundle``: the NaFlex graph (dynamic patch count, mask input) validated and run torch-free."""
    from arrowvision.bundle.build import build_bundle

    build_bundle(naflex_parquet, tmp_path / "bundle", precision="fp32")
    encoder = VisionEncoder.from_bundle(tmp_path / "bundle")
    assert encoder.config.naflex
    assert np.abs(encoder.backend(mixed_batch) - reference).max() <= FP32_MAX_ABS
