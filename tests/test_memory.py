"""fp32 weights held once: the mechanisms, checked structurally (which mappings stay resident,
what the serving process imports), never by an RSS threshold, which depends on the machine.
The sizes they buy are measured by benchmarks/latency.py."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from arrowvision import BackendError, VisionEncoder
from arrowvision.backends import export_child
from arrowvision.util.memory import MappedWeights, memory_usage, release_mapped_pages

linux_only = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")


def resident_bytes(path: str | os.PathLike) -> int:
    """Resident bytes of this process's mappings of ``path`` (a file, or the files under a folder)."""
    path, total, counting = os.path.realpath(path), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].endswith(":") and "-" in fields[0]:
            name = " ".join(fields[5:])
            counting = name == path or name.startswith(path + os.sep)
        elif counting and fields[:1] == ["Rss:"]:
            total += int(fields[1]) * 1024
    return total


@pytest.fixture()
def weight_file(tmp_path) -> Path:
    path = tmp_path / "weights.bin"
    path.write_bytes(np.arange(2 << 20, dtype=np.float32).tobytes())  # 8 MB
    return path


@linux_only
def test_release_drops_a_read_only_shared_mapping_and_keeps_its_content(weight_file):
    with open(weight_file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        values = np.frombuffer(mapped, dtype=np.float32)
        assert values.sum(dtype=np.float64) > 0  # touches every page
        assert resident_bytes(weight_file) >= weight_file.stat().st_size // 2
        assert release_mapped_pages([weight_file.parent]) >= weight_file.stat().st_size  # a folder counts its files
        assert resident_bytes(weight_file) == 0
        np.testing.assert_array_equal(values[::4096], np.arange(2 << 20, dtype=np.float32)[::4096])  # faulted back in
        del values


@linux_only
@pytest.mark.parametrize("access", [mmap.ACCESS_WRITE, mmap.ACCESS_COPY])
def test_writable_or_private_mappings_are_left_alone(weight_file, access):
    """Dropping a writable or private mapping's pages could lose data: never done."""
    with open(weight_file, "r+b") as handle, mmap.mmap(handle.fileno(), 0, access=access) as mapped:
        mapped[:4] = b"\x01\x02\x03\x04"
        np.frombuffer(mapped, dtype=np.float32).sum()
        before = resident_bytes(weight_file)
        assert release_mapped_pages([weight_file]) == 0
        assert resident_bytes(weight_file) == before > 0
        assert mapped[:4] == b"\x01\x02\x03\x04"


def test_memory_usage_names_the_resident_parts():
    usage = memory_usage()
    if not usage:
        pytest.skip("needs Linux /proc/self/status")
    assert usage["peak"] >= usage["rss"] > 0
    assert usage["anon"] > 0 and usage["file"] > 0


@linux_only
def test_openvino_keeps_no_model_and_no_resident_weight_mapping(module_cache, tiny_siglip_parquet):
    """After the first inference the plugin has repacked every weight: the mapped IR (or compiled
    blob) is no longer resident, no ``ov.Model`` is kept, and the results do not change."""
    import openvino as ov

    backend = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="openvino").backend
    assert isinstance(backend.mapped, MappedWeights) and not backend.mapped.repacked
    assert backend.mapped.paths[0] == backend.entry / "model.bin"
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    first = backend(pixels[:1])
    assert backend.mapped.repacked and backend.mapped.released > 0  # the weight file was mapped, and released
    assert all(resident_bytes(path) == 0 for path in backend.mapped.paths)
    assert not any(isinstance(value, ov.Model) for value in vars(backend).values())
    reference = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch").encode(pixels, normalize=False)
    np.testing.assert_allclose(first, reference[:1], atol=1e-4)
    np.testing.assert_allclose(backend(pixels), reference, atol=1e-4)


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_a_first_call_on_a_batch_repacks_on_its_first_row_alone(module_cache, tiny_siglip_parquet, mode):
    backend = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="openvino", mode=mode).backend
    sizes = []
    run = backend._run
    backend._run = lambda inputs: sizes.append(len(inputs[0])) or run(inputs)
    pixels = np.random.default_rng(1).standard_normal((5, 3, 32, 32), dtype=np.float32)
    first = backend(pixels)
    assert sizes == [1, 4] and backend.mapped.repacked
    np.testing.assert_allclose(backend(pixels), first, atol=1e-5)
    assert sizes == [1, 4, 5]


def test_large_models_export_in_a_child_and_the_server_never_imports_torch(tmp_path, tiny_siglip_parquet):
    code = textwrap.dedent(f"""
        import sys
        import arrowvision
        from arrowvision.backends import export_child
        export_child.CHILD_MIN_BYTES = 0  # the tiny model counts as large
        encoder = arrowvision.VisionEncoder.from_parquet({str(tiny_siglip_parquet)!r}, backend="openvino")
        print(encoder.backend.cache_hit, "torch" in sys.modules, encoder.encode({str(Path(__file__).parents[1] / "arrowvision" / "samples" / "chelsea.jpg")!r}).shape[0])
    """)
    env = {**os.environ, "ARROWVISION_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[0] == "False False 1"  # exported on first use, torch never imported here
    assert list((tmp_path / "cache" / "ir").glob("*/model.xml"))


def test_an_export_refused_in_the_child_raises_the_same_error(tmp_path, monkeypatch, tiny_siglip_parquet):
    monkeypatch.setattr(export_child, "CHILD_MIN_BYTES", 0)
    with pytest.raises(BackendError, match="min_cosine|cosine"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="onnxruntime", precision="int8", min_cosine=0.9999999,
                                   cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "onnx").glob("*/meta.json"))  # nothing refused is cached
