"""AVX2 CPUs without VNNI (Zen 3 kind): the capped CPU view, the 7-bit ONNX Runtime int8 recipe,
``auto``'s choice there (faked capabilities), and the CPUID emulation the benchmarks use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arrowvision import BackendError, VisionEncoder, WeightLoader
from arrowvision.backends import auto
from arrowvision.backends.cpu import CPUInfo, cpu_info
from arrowvision.backends.validation import KINDS

ROOT = Path(__file__).resolve().parents[1]
EMULATE = ROOT / "benchmarks" / "emulate_avx2.py"
ZEN3 = CPUInfo("AMD EPYC 7B13", frozenset({"avx2", "fma"}), 2)
SKYLAKE_X = CPUInfo("Intel Xeon Gold 6148", frozenset({"avx2", "fma", "avx512f"}), 2)  # AVX-512 without VNNI
ZEN4 = CPUInfo("AMD EPYC 9B14", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}), 2)


@pytest.fixture
def avx2_view(monkeypatch):
    """This process's CPU seen as AVX2+FMA only (ARROWVISION_CPU_ISA=avx2), restored afterwards."""
    monkeypatch.setenv("ARROWVISION_CPU_ISA", "avx2")
    cpu_info.cache_clear()
    yield cpu_info()
    monkeypatch.delenv("ARROWVISION_CPU_ISA", raising=False)
    cpu_info.cache_clear()


def test_isa_cap_hides_what_avx2_lacks(avx2_view, monkeypatch):
    monkeypatch.delenv("ARROWVISION_CPU_ISA")
    cpu_info.cache_clear()
    real = cpu_info()
    assert avx2_view.flags <= real.flags and {"avx2", "fma"} & real.flags <= avx2_view.flags  # hides, never adds
    assert avx2_view.signature() != real.signature() or not real.int8_vnni  # choices measured capped are kept apart
    assert not any(flag.startswith(("avx512", "amx")) or flag in ("avx_vnni", "gfni") for flag in avx2_view.flags)
    assert not avx2_view.int8_vnni and not avx2_view.native_bf16
    assert "emulated" in avx2_view.describe() and "lacks avx512f avx512_vnni" in avx2_view.describe()


def test_unknown_isa_cap_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ARROWVISION_CPU_ISA", "sse2")
    cpu_info.cache_clear()
    try:
        with pytest.raises(BackendError, match="ARROWVISION_CPU_ISA='sse2'"):
            cpu_info()
    finally:
        monkeypatch.delenv("ARROWVISION_CPU_ISA")
        cpu_info.cache_clear()


def test_candidates_on_avx2_without_vnni():
    zen3 = auto.candidates(ZEN3)
    assert ("onnxruntime", "int8") in zen3 and ("openvino", "fp32") in zen3 and ("onnxruntime", "fp32") in zen3
    assert ("openvino", "int8") not in zen3  # oneDNN's jit_gemm_I8 fallback: no faster than fp32 there
    assert not {("openvino", "bf16"), ("openvino", "int8-weights")} & set(zen3)
    assert ("openvino", "int8") in auto.candidates(SKYLAKE_X) and ("openvino", "int8") in auto.candidates(ZEN4)


def _fake_auto(monkeypatch, cpu: CPUInfo, b1_ms: dict[tuple[str, str], float]):
    """auto on ``cpu`` with stand-in backends timed at ``b1_ms`` (b8: 0.8x per image): returns
    the build function and the list of what it built."""
    built: list[tuple[str, str]] = []

    class Fake:
        def __init__(self, name, precision):
            self.name, self.precision = name, precision
            self.report = {"min_cosine": 0.9995 if precision != "fp32" else 1.0}

    def build(name, weights, **options):
        built.append((name, options["precision"]))
        return Fake(name, options["precision"])

    def timed(backend, config, rounds=3, warm=True):
        b1 = b1_ms[(backend.name, backend.precision)]
        return b1, 0.8 * b1

    monkeypatch.setattr(auto, "cpu_info", lambda: cpu)
    monkeypatch.setattr(auto, "_time", timed)
    monkeypatch.setattr(auto, "_warm", lambda backend, config: None)
    return build, built


def test_auto_on_avx2_picks_onnxruntime_int8_when_it_is_fastest(monkeypatch, tmp_path, tiny_siglip_parquet):
    # in the proportions measured under AVX2 emulation (SigLIP-B/16, 2 threads)
    timings = {("openvino", "fp32"): 220.0, ("onnxruntime", "fp32"): 250.0, ("onnxruntime", "int8"): 140.0,
               ("openvino", "int8"): 230.0}
    build, built = _fake_auto(monkeypatch, ZEN3, timings)
    weights = WeightLoader(tiny_siglip_parquet)
    record = auto.choose(weights, build=build, cache_dir=tmp_path)
    assert (record["backend"], record["precision"]) == ("onnxruntime", "int8")
    assert ("openvino", "int8") not in built and set(built) == set(auto.candidates(ZEN3))
    rematched = [(row["backend"], row["precision"]) for row in record["candidates"] if row.get("rematched")]
    assert rematched == [("openvino", "fp32"), ("onnxruntime", "int8")]  # the two fastest, timed alternately
    assert "lacks avx512f avx512_vnni" in record["cpu"]
    assert json.loads(auto.choice_path(weights, 0.99, tmp_path).read_text())["precision"] == "int8"
    # measured, not assumed: where fp32 is faster, fp32 is chosen
    build, _ = _fake_auto(monkeypatch, ZEN3, {**timings, ("onnxruntime", "int8"): 300.0})
    again = auto.choose(weights, build=build, cache_dir=tmp_path, refresh=True)
    assert (again["backend"], again["precision"]) == ("openvino", "fp32")


def test_onnxruntime_int8_on_avx2_has_7bit_per_channel_weights(avx2_view, module_cache, tiny_siglip_parquet):
    import onnx
    from onnx import numpy_helper

    from arrowvision.backends.onnx_export import export_onnx

    weights = WeightLoader(tiny_siglip_parquet)
    entry = export_onnx(weights, "int8")
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["reduce_range"] is True
    assert set(meta["by_kind"]) == set(KINDS) and min(v["min_cosine"] for v in meta["by_kind"].values()) >= 0.99
    graph = onnx.load(str(entry / "model.onnx")).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    quantized = [node for node in graph.node if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert quantized
    for node in quantized:
        weight = initializers[node.input[1]]
        assert weight.dtype == np.int8 and np.abs(weight.astype(np.int16)).max() <= 64  # 7-bit: no vpmaddubsw saturation
        scale = initializers[node.input[1].removesuffix("_quantized") + "_scale"]
        assert scale.shape == (weight.shape[1],)  # per channel: one scale per output column
    fp32_matmuls = [node.name for node in graph.node if node.op_type == "MatMul"]
    assert any("/head/" in name for name in fp32_matmuls)  # the MAP head stays fp32


def _emulation_skip_reason() -> str | None:
    sys.path.insert(0, str(EMULATE.parent))
    try:
        import emulate_avx2
    finally:
        sys.path.pop(0)
    reason = emulate_avx2.unavailable_reason()
    if reason is None and not shutil.which(os.environ.get("CC", "cc")):
        reason = "no C compiler to build the CPUID shim"
    return reason


SATURATION = """
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
k = 64
weight = numpy_helper.from_array(np.full((k, 8), 127, np.int8), "w")
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])], [weight])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
print(int(session.run(None, {"a": np.full((4, k), 255, np.uint8)})[0].min()))
"""


def test_emulation_moves_every_runtime_to_avx2_kernels(tmp_path):
    reason = _emulation_skip_reason()
    if reason:
        pytest.skip(f"AVX2 emulation unavailable here: {reason}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    check = subprocess.run([sys.executable, str(EMULATE), "--check"], capture_output=True, text=True, timeout=300, env=env)
    assert check.returncode == 0, check.stderr
    seen = json.loads(check.stdout)
    assert seen["numpy_avx2"] and not seen["numpy_avx512f"] and "BF16" not in seen["openvino"] and not seen["vnni"]
    # ONNX Runtime's MLAS really runs its AVX2 u8 x s8 kernel: 255 x 127 pairs saturate its int16 sums
    exact = 255 * 127 * 64
    emulated = subprocess.run([sys.executable, str(EMULATE), "--", sys.executable, "-c", SATURATION], capture_output=True,
                              text=True, timeout=300, env=env)
    assert emulated.returncode == 0, emulated.stderr
    assert int(emulated.stdout.split()[-1]) < exact
    if CPUInfo("", frozenset(Path("/proc/cpuinfo").read_text().split())).int8_vnni:
        native = subprocess.run([sys.executable, "-c", SATURATION], capture_output=True, text=True, timeout=300, env=env)
        assert int(native.stdout.split()[-1]) == exact  # VNNI: no int16 intermediate
    # a real fault still reaches the program's own SIGSEGV handler (faulthandler) through the shim
    crash = subprocess.run([sys.executable, str(EMULATE), "--", sys.executable, "-X", "faulthandler", "-c",
                            "import ctypes; ctypes.string_at(0)"], capture_output=True, text=True, timeout=120, env=env)
    assert crash.returncode != 0 and "Segmentation fault" in crash.stderr


def test_int8_sessions_load_the_saved_optimized_graph(module_cache, tiny_siglip_parquet):
    import onnxruntime as ort

    from arrowvision.backends.onnx_export import optimized_path

    encoder = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="onnxruntime", precision="int8")
    entry = encoder.backend.entry
    optimized = optimized_path(entry)
    assert optimized.exists() and not list(optimized.parent.glob(".*"))  # saved once, atomically
    assert sorted(path.name for path in entry.iterdir()) == ["meta.json", "model.onnx"]  # bundles copy only these
    stamp = optimized.stat().st_mtime_ns
    again = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="onnxruntime", precision="int8")
    assert optimized.stat().st_mtime_ns == stamp
    plain = ort.InferenceSession(str(entry / "model.onnx"), providers=["CPUExecutionProvider"])  # the validated graph
    pixels = np.random.default_rng(0).standard_normal((2, 3, encoder.config.image_size, encoder.config.image_size), dtype=np.float32)
    for row in range(2):  # batch 1 each: dynamic quantization scales depend on the whole batch
        expected = plain.run(None, {plain.get_inputs()[0].name: pixels[row : row + 1]})[0]
        assert np.abs(again.backend(pixels[row : row + 1]) - expected).max() <= 1e-5
    assert (entry / "model.onnx").stat().st_size > 0  # the portable artifact is untouched
