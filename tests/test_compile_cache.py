"""torch.compile's artifacts kept across processes in our cache (backends/compile_cache.py).

The cross-process tests run the tiny model in fresh subprocesses, each with its own Inductor
folder (TORCHINDUCTOR_CACHE_DIR), so a cache hit in the second process can only come from our
entry; they assert on torch's cache counters, not on time. On the CPU the compiled C++ kernels
are not part of torch's Mega-Cache (they stay in Inductor's folder): the later processes get a
copy of the first one's Inductor folder *without* its FX-graph and AOTAutograd entries, so they
reuse the built kernels (a fast test) while the graphs must come from our file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from arrowvision import VisionEncoder
from arrowvision.backends.compile_cache import CompileCache, key_parts, read_entry, write_entry

from .compilekit import run_child

CXX = os.environ.get("CXX") or "g++"
needs_compiler = pytest.mark.skipif(shutil.which(CXX) is None,
                                    reason=f"no C++ compiler ({CXX}) for torch.compile's CPU backend (Inductor)")


def kernels_only(inductor: Path, target: Path) -> Path:
    """A copy of an Inductor folder without its graph caches: built C++ kernels only."""
    shutil.copytree(inductor, target, ignore=shutil.ignore_patterns("fxgraph", "aotautograd"))
    return target


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pixels") / "batch.npy"
    np.save(path, np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def eager(tiny_siglip_parquet, pixels) -> np.ndarray:
    return VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch").backend(np.load(pixels))


@pytest.fixture(scope="module")
def first(tiny_siglip_parquet, pixels, tmp_path_factory):
    """Process 1: compiles from nothing and keeps the artifacts in our cache."""
    work = tmp_path_factory.mktemp("compile")
    result, _ = run_child(tiny_siglip_parquet, work / "cache", work / "inductor1", pixels)
    return SimpleNamespace(work=work, cache=work / "cache", inductor=work / "inductor1", result=result)


@needs_compiler
def test_first_process_compiles_and_keeps_the_artifacts(first, eager):
    assert first.result["loaded"] is False
    assert first.result["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 1
    np.testing.assert_allclose(first.result["output"], eager, atol=1e-4)
    header, payload = read_entry(Path(first.result["path"]))
    assert Path(first.result["path"]).parent == first.cache / "torch-compile"
    assert header["parts"]["precision"] == "fp32" and header["parts"]["torch"] == torch.__version__
    assert any(key.startswith("inductor/") for key in header["artifacts"]) and len(payload) == header["bytes"]


@needs_compiler
def test_second_process_compiles_from_the_cache(first, tiny_siglip_parquet, pixels, eager):
    entry = Path(first.result["path"])
    before = entry.read_bytes()
    inductor = kernels_only(first.inductor, first.work / "inductor2")
    result, _ = run_child(tiny_siglip_parquet, first.cache, inductor, pixels)
    assert result["loaded"] is True
    assert result["counters"]["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert result["counters"]["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert result["counters"]["aot_autograd"].get("autograd_cache_hit", 0) >= 1
    np.testing.assert_allclose(result["output"], eager, atol=1e-4)
    assert entry.read_bytes() == before, "nothing new was compiled: the entry is not rewritten"


@needs_compiler
def test_a_corrupt_entry_is_ignored_with_a_warning_and_rewritten(first, tiny_siglip_parquet, pixels, eager):
    cache = first.work / "cache-corrupt"
    shutil.copytree(first.cache, cache)
    entry = cache / "torch-compile" / Path(first.result["path"]).name
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside torch's payload
    entry.write_bytes(bytes(data))
    inductor = kernels_only(first.inductor, first.work / "inductor3")
    result, stderr = run_child(tiny_siglip_parquet, cache, inductor, pixels)
    assert "ignoring the torch.compile cache entry" in stderr and "checksum mismatch" in stderr
    assert result["loaded"] is False
    assert result["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 1
    np.testing.assert_allclose(result["output"], eager, atol=1e-4)
    header, _ = read_entry(entry)  # rewritten whole by the process that compiled again
    assert header["parts"]["weights"] == first_parts(first)["weights"]


def first_parts(first) -> dict:
    header, _ = read_entry(Path(first.result["path"]))
    return header["parts"]


# ---------------------------------------------------------------- without compiling (no compiler needed)


def test_a_failing_first_compiled_call_is_a_clear_error(tiny_siglip_parquet, monkeypatch):
    from arrowvision.errors import BackendError

    backend = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch").backend
    monkeypatch.setattr(backend, "compiled", True)

    def no_compiler(pixels):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error (g++ not found)")

    monkeypatch.setattr(backend, "forward", no_compiler)
    with pytest.raises(BackendError, match=r"torch.compile failed on the first batch of shape \(2, 3, 32, 32\) "
                                           r"\(RuntimeError: InductorError.*g\+\+ not found\)\); run without compile"):
        backend._run(torch.zeros((2, 3, 32, 32)))
    assert not backend.fixed_sizes, "the failed shape is not remembered as compiled"


PARTS = {"weights": "abc", "config": {"image_mean": (0.5, 0.5, 0.5)}, "precision": "fp32", "variant": {"fused": False},
         "device": "cpu:x", "torch": "2.13.0", "triton": None, "format": 1}


class FakeCompiler:
    """Stands in for torch.compiler: records what is loaded, returns what it is told to save."""

    def __init__(self, keys: list[str] | None = None):
        self.keys, self.loaded = keys or [], []

    def save_cache_artifacts(self):
        if not self.keys:
            return None
        return b"payload:" + ",".join(self.keys).encode(), SimpleNamespace(artifacts={"inductor": list(self.keys)})

    def load_cache_artifacts(self, payload: bytes):
        self.loaded.append(payload)
        return SimpleNamespace(artifacts={"inductor": payload.decode().split(":", 1)[1].split(",")})


def fake_cache(tmp_path, compiler: FakeCompiler, parts: dict = PARTS) -> CompileCache:
    return CompileCache.open(SimpleNamespace(compiler=compiler), parts, tmp_path)


def test_save_writes_atomically_and_only_what_is_new(tmp_path):
    compiler = FakeCompiler()
    cache = fake_cache(tmp_path, compiler)
    assert cache.save() is False and not cache.path.exists()  # nothing compiled yet
    compiler.keys = ["graph-b8"]
    assert cache.save() is True
    assert cache.save() is False  # the same artifacts: not rewritten
    compiler.keys = ["graph-b8", "graph-b256"]
    assert cache.save() is True
    header, payload = read_entry(cache.path)
    assert header["artifacts"] == ["inductor/graph-b256", "inductor/graph-b8"] and payload == b"payload:graph-b8,graph-b256"
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name], "no temp files left behind"
    again = fake_cache(tmp_path, FakeCompiler(["graph-b8", "graph-b256"]))
    assert again.load() is True and again.known == {"inductor/graph-b8", "inductor/graph-b256"}
    assert again.save() is False  # a process that only hit the cache leaves the file as it is


@pytest.mark.parametrize("damage", ["foreign", "truncated", "flipped", "bad header"])
def test_unusable_entries_are_ignored_with_a_warning(tmp_path, caplog, damage):
    compiler = FakeCompiler()
    cache = fake_cache(tmp_path, compiler)
    write_entry(cache.path, {"parts": PARTS, "artifacts": ["inductor/x"]}, b"payload:x")
    data = cache.path.read_bytes()
    cache.path.write_bytes({"foreign": b"\x80\x04not ours", "truncated": data[:-3],
                            "flipped": data[:-1] + b"y", "bad header": data.replace(b'{"parts"', b'["parts"', 1)}[damage])
    assert cache.load() is False and compiler.loaded == [], "torch never sees an unverified payload"
    assert "ignoring the torch.compile cache entry" in caplog.text


def test_an_entry_made_for_another_key_is_ignored(tmp_path, caplog):
    compiler = FakeCompiler()
    cache = fake_cache(tmp_path, compiler)
    write_entry(cache.path, {"parts": {**PARTS, "torch": "2.12.0"}, "artifacts": ["inductor/x"]}, b"payload:x")
    assert cache.load() is False and compiler.loaded == []
    assert "made for another model, device or torch version" in caplog.text
    write_entry(cache.path, {"parts": PARTS, "artifacts": ["inductor/x"]}, b"payload:x")
    assert cache.load() is True and compiler.loaded == [b"payload:x"]  # tuples and lists compare as JSON


def test_torch_failing_to_load_an_entry_is_a_warning(tmp_path, caplog):
    class Broken(FakeCompiler):
        def load_cache_artifacts(self, payload):
            raise RuntimeError("unpickling failed")

    cache = fake_cache(tmp_path, Broken())
    write_entry(cache.path, {"parts": PARTS, "artifacts": ["inductor/x"]}, b"payload:x")
    assert cache.load() is False
    assert "RuntimeError: unpickling failed" in caplog.text


def test_the_key_names_precision_device_variant_and_versions(tiny_siglip_parquet):
    from arrowvision.backends.artifacts import hash_key
    from arrowvision.weights.format import WeightLoader

    weights = WeightLoader(tiny_siglip_parquet)
    cpu = torch.device("cpu")
    base = key_parts(torch, weights.checksum, {"hidden_size": 64}, "fp32", cpu, {"fused": False})
    assert base["torch"] == torch.__version__ and base["device"].startswith("cpu:")
    others = [key_parts(torch, weights.checksum, {"hidden_size": 64}, "bf16", cpu, {"fused": False}),
              key_parts(torch, weights.checksum, {"hidden_size": 64}, "fp32", cpu, {"fused": True}),
              key_parts(torch, weights.checksum, {"hidden_size": 32}, "fp32", cpu, {"fused": False}),
              key_parts(torch, "other-weights", {"hidden_size": 64}, "fp32", cpu, {"fused": False})]
    assert len({hash_key(parts) for parts in [base, *others]}) == 5
