"""The runtime install (issue 27): `pip install 'arrowvision[runtime]'` into a fresh venv (no
--system-site-packages: torch is in this one) holds no torch, nncf or transformers, and embeds and
serves a bundle there with the full install's output.

Slow-ish (a venv and a non-editable install, ~30 s with pip's cache) but part of `make test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from arrowvision import ImageTextModel
from arrowvision.bundle.build import build_bundle

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))[:3]
TEXTS = ["a photo of a cat", "two dogs on a beach"]

pytestmark = pytest.mark.slow


def runtime_env() -> dict[str, str]:
    """This environment without what points at the checkout or the full venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv with the checkout installed (not editable) with the runtime extra."""
    work = tmp_path_factory.mktemp("runtime")
    source = work / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "arrowvision", source / "arrowvision", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=runtime_env())
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"{source}[runtime]"], capture_output=True,
                             text=True, timeout=900, env=runtime_env(), cwd=work)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def bundle(siglip_all_parquet, module_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "siglip-all"
    build_bundle(siglip_all_parquet, out, tower="all")
    return out


@pytest.fixture(scope="module")
def full_install(siglip_all_parquet):
    """The full install's embeddings: the torch reference."""
    model = ImageTextModel.from_parquet(siglip_all_parquet)
    return {"images": model.encode_images(SAMPLES), "texts": model.encode_texts(TEXTS)}


def run_in(venv: Path, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env=runtime_env(), cwd=cwd)


def test_the_runtime_venv_has_no_torch_nncf_or_transformers(runtime_venv, tmp_path):
    code = ("import importlib.util, arrowvision; "
            "print([m for m in ('torch', 'nncf', 'transformers') if importlib.util.find_spec(m)]); print(arrowvision.__file__)")
    result = run_in(runtime_venv, "python", "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    missing, location = result.stdout.splitlines()
    assert missing == "[]"
    assert location.startswith(str(runtime_venv)), location  # the installed package, not the checkout
    for package in ("openvino", "onnxruntime", "fastapi", "uvicorn", "tokenizers"):
        check = run_in(runtime_venv, "python", "-c", f"import {package}", cwd=tmp_path)
        assert check.returncode == 0, f"{package}: {check.stderr[-500:]}"


def test_embed_from_a_bundle_in_the_runtime_venv(runtime_venv, bundle, full_install, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in SAMPLES:
        shutil.copy2(path, photos / path.name)
    result = run_in(runtime_venv, "arrowvision", "embed", str(photos), "-o", str(tmp_path / "out"), "--bundle", str(bundle),
                    "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "out").sort_by("path")
    assert [Path(p).name for p in table["path"].to_pylist()] == [p.name for p in SAMPLES]
    embeddings = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert (embeddings * full_install["images"]).sum(axis=1).min() >= 0.99999


def test_serve_a_bundle_in_the_runtime_venv(runtime_venv, bundle, full_install, tmp_path):
    process = subprocess.Popen([str(runtime_venv / "bin" / "arrowvision"), "serve", "--bundle", str(bundle), "--port", "0",
                                "--quiet"], stderr=subprocess.PIPE, text=True, env=runtime_env(), cwd=tmp_path)
    try:
        url, seen = None, []
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            seen.append(line)
            match = re.search(r"at (http://\S+)", line)
            url = match.group(1) if match else None
        assert url, "the service did not start:\n" + "".join(seen)
        with httpx.Client(base_url=url, timeout=60) as client:
            while client.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.get("/health").json()["model_loaded"] is True
            image = client.post("/v1/embed", files={"file": ("a.jpg", SAMPLES[0].read_bytes(), "image/jpeg")})
            assert image.status_code == 200, image.text
            assert np.dot(image.json()["embedding"], full_install["images"][0]) >= 0.99999
            texts = client.post("/v1/embed/text", json={"texts": TEXTS})
            assert texts.status_code == 200, texts.text
            assert (np.asarray(texts.json()["embeddings"]) * full_install["texts"]).sum(axis=1).min() >= 0.99999
    finally:
        process.terminate()
        process.wait(timeout=60)
