"""``backend="auto"``: the fastest validated (backend, precision), measured once per model and CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from arrowvision import BackendError, VisionEncoder, WeightLoader
from arrowvision.backends import auto
from arrowvision.backends.cpu import CPUInfo

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "arrowvision" / "samples" / "chelsea.jpg"
ZEN3 = CPUInfo("AMD EPYC 7B13", frozenset({"avx2", "fma"}), 2)
ZEN4 = CPUInfo("AMD EPYC 9B14", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}), 2)


def test_candidates_follow_cpu_features():
    avx2 = auto.candidates(ZEN3)
    assert ("onnxruntime", "int8") in avx2 and ("openvino", "fp32") in avx2  # OV int8 there: see test_avx2.py
    assert ("openvino", "bf16") not in avx2 and ("openvino", "int8-weights") not in avx2
    avx512 = auto.candidates(ZEN4)
    assert ("openvino", "bf16") in avx512 and ("openvino", "int8-weights") in avx512 and ("openvino", "int8") in avx512
    assert ZEN4.int8_vnni and not ZEN3.int8_vnni and ZEN4.native_bf16 and not ZEN3.native_bf16
    assert ZEN3.signature() != ZEN4.signature()
    assert "lacks avx512f" in ZEN3.describe()


def test_auto_picks_the_fastest_validated_choice_and_remembers_it(tmp_path, monkeypatch, tiny_siglip_parquet):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ARROWVISION_CACHE", str(cache))
    encoder = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="auto")
    record = encoder.backend.choice
    assert (encoder.backend.name, encoder.backend.precision) == (record["backend"], record["precision"])
    usable = [row for row in record["candidates"] if "score" in row]
    assert len(usable) >= 2 and all(row["min_cosine"] >= 0.99 for row in usable)
    assert min(usable, key=lambda row: row["score"])["backend"] == record["backend"]
    kinds = encoder.backend.report.get("by_kind")  # lossy choices were validated per kind, sketches included
    assert kinds is None or kinds["sketches"]["min_cosine"] >= 0.99
    path = auto.choice_path(WeightLoader(tiny_siglip_parquet), 0.99, None)
    assert json.loads(path.read_text())["backend"] == record["backend"]

    def no_measuring(*args, **kwargs):
        raise AssertionError("a remembered choice must not be measured again")

    monkeypatch.setattr(auto, "measure", no_measuring)
    again = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="auto")
    assert (again.backend.name, again.backend.precision) == (encoder.backend.name, encoder.backend.precision)
    # another kind of CPU gets its own measurement, never this one's choice
    monkeypatch.setattr(auto, "cpu_info", lambda: ZEN4)
    assert auto.choice_path(WeightLoader(tiny_siglip_parquet), 0.99, None) != path
    # a warm cache runs without torch, and the CLI says what auto chose
    code = textwrap.dedent(f"""
        import sys
        import arrowvision
        encoder = arrowvision.VisionEncoder.from_parquet({str(tiny_siglip_parquet)!r}, backend="auto")
        encoder.encode([{str(PHOTO)!r}])
        print("CHOSE", encoder.backend.name, encoder.backend.precision)
        print("LEAKED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "nncf")))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert f"CHOSE {record['backend']} {record['precision']}" in result.stdout and "LEAKED []" in result.stdout
    info = subprocess.run([sys.executable, "-m", "arrowvision", "info", str(tiny_siglip_parquet)], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())
    assert f"{record['backend']} {record['precision']}" in info.stdout, info.stdout


def test_auto_chooses_the_precision_itself(tmp_path, tiny_siglip_parquet):
    with pytest.raises(BackendError, match="chooses the precision"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="auto", precision="int8", cache_dir=tmp_path)
    with pytest.raises(BackendError, match="CPU"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="auto", device="GPU", cache_dir=tmp_path)
