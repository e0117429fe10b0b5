"""The text tower on OpenVINO: cache reuse, validation of lossy precisions, torch-free warm path.
(Parity of the fp32 IR with transformers: test_text_parity.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import arrowvision
from arrowvision import BackendError
from arrowvision.model.convert import convert

from .textkit import AWKWARD, SENTENCES, save_full_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip_all(tmp_path_factory) -> Path:
    folder = save_full_checkpoint(tmp_path_factory.mktemp("clip_ov"), "clip", seed=11)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    return folder / "all.parquet"


def test_cached_ir_is_reused_and_keyed_by_precision(clip_all, tmp_path):
    first = arrowvision.TextEncoder.from_parquet(clip_all, backend="openvino", cache_dir=tmp_path)
    again = arrowvision.TextEncoder.from_parquet(clip_all, backend="openvino", cache_dir=tmp_path)
    assert not first.backend.cache_hit and again.backend.cache_hit and again.backend.entry == first.backend.entry
    fp16 = arrowvision.TextEncoder.from_parquet(clip_all, backend="openvino", precision="fp16", cache_dir=tmp_path)
    assert fp16.backend.entry != first.backend.entry
    assert fp16.backend.report["by_kind"]["awkward"]["min_cosine"] >= 0.99
    reference = arrowvision.TextEncoder.from_parquet(clip_all).encode(SENTENCES + AWKWARD)
    assert (fp16.encode(SENTENCES + AWKWARD) * reference).sum(axis=1).min() >= 0.99


def test_lossy_text_export_below_threshold_is_refused_and_not_cached(clip_all, tmp_path):
    with pytest.raises(BackendError, match="too inaccurate"):
        arrowvision.TextEncoder.from_parquet(clip_all, backend="openvino", precision="int8-weights", cache_dir=tmp_path, min_cosine=0.999999)
    assert not list((tmp_path / "ir-text").glob("*/meta.json"))


def test_unknown_text_backend_and_torch_options_are_clear_errors(clip_all):
    with pytest.raises(BackendError, match="not available for the text tower"):
        arrowvision.TextEncoder.from_parquet(clip_all, backend="onnxruntime")
    with pytest.raises(BackendError, match="fp32 only"):
        arrowvision.TextEncoder.from_parquet(clip_all, precision="fp16")


def test_warm_text_and_image_path_imports_neither_torch_nor_transformers(clip_all, tmp_path):
    photo = ROOT / "arrowvision" / "samples" / "chelsea.jpg"
    warm = arrowvision.ImageTextModel.from_parquet(clip_all, backend="openvino", cache_dir=tmp_path)
    expected = warm.logits([photo], ["a cat", "a dog"])
    code = f"""
        import sys
        import numpy as np
        import arrowvision
        model = arrowvision.ImageTextModel.from_parquet({str(clip_all)!r}, backend="openvino", cache_dir={str(tmp_path)!r})
        logits = model.logits([{str(photo)!r}], ["a cat", "a dog"])
        print("LOGITS", np.array2string(logits.ravel(), precision=6))
        print("RANKED", model.zero_shot([{str(photo)!r}], ["cat", "dog"])[0][0][0])
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "nncf"))
        print("LEAKED", leaked)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout, result.stdout
    assert f"LOGITS {np.array2string(expected.ravel(), precision=6)}" in result.stdout, result.stdout
