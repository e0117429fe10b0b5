"""What this CPU can do, for choosing precisions and keying cached choices.

Read from /proc/cpuinfo (Linux) with OpenVINO's own capability list as a fallback; both are cheap
and neither needs torch. The features that matter here:

- ``avx512_vnni`` / ``avx_vnni`` / ``amx_int8``: int8 dot products without saturation. Without
  them, u8 x s8 products go through ``vpmaddubsw``, whose int16 intermediate saturates, so int8
  needs 7-bit weights (OpenVINO's overflow fix, ONNX Runtime's ``reduce_range``).
- ``avx512_bf16`` / ``amx_bf16``: native bf16 compute.

``ARROWVISION_CPU_ISA=avx2`` reports the CPU as the runtimes see it when their ISA dispatch is
capped at AVX2+FMA (``benchmarks/emulate/``'s CPUID shim sets it, so an AVX-512 machine can stand
in for a Zen 3): every AVX-512, VNNI, AMX and GFNI flag is dropped. It can only hide features.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from dataclasses import dataclass, field
from pathlib import Path

REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
ISA_CAP_VARIABLE = "ARROWVISION_CPU_ISA"
ISA_CAPS = ("avx2",)


@dataclass(frozen=True)
class CPUInfo:
    model: str
    flags: frozenset[str] = field(default_factory=frozenset)
    cores: int = 1
    isa_cap: str | None = None  # "avx2": the flags were capped (ARROWVISION_CPU_ISA), see above

    @property
    def int8_vnni(self) -> bool:
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def native_bf16(self) -> bool:
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    def relevant_flags(self) -> list[str]:
        return [flag for flag in REPORTED_FLAGS if flag in self.flags]

    def describe(self) -> str:
        """One line for benchmark headers: model, cores and the flags that change our choices."""
        present = self.relevant_flags()
        missing = [flag for flag in REPORTED_FLAGS if flag not in self.flags]
        capped = f" (ISA capped at {self.isa_cap} by {ISA_CAP_VARIABLE}: emulated)" if self.isa_cap else ""
        return f"{self.model} ({self.cores} cores); has {' '.join(present) or 'none'}; lacks {' '.join(missing) or 'none'}{capped}"

    def signature(self) -> str:
        """Stable key for choices measured on this kind of CPU (model, core count, relevant flags)."""
        text = f"{self.model}|{self.cores}|{','.join(self.relevant_flags())}|{platform.machine()}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def cpu_info() -> CPUInfo:
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    if not flags:  # not Linux: ask OpenVINO what its CPU plugin can use
        flags = _openvino_flags()
    cap = os.environ.get(ISA_CAP_VARIABLE, "").strip().lower() or None
    if cap is not None and cap not in ISA_CAPS:
        from ..errors import BackendError

        raise BackendError(f"{ISA_CAP_VARIABLE}={cap!r} is not a known ISA cap; use one of {', '.join(ISA_CAPS)} or unset it")
    return CPUInfo(model=model, flags=frozenset(avx2_only(flags) if cap else flags), cores=cores, isa_cap=cap)


def avx2_only(flags: set[str] | frozenset[str]) -> set[str]:
    """``flags`` without what an AVX2+FMA (Zen 3-like) CPU lacks."""
    beyond_avx2 = ("avx512", "amx", "avx_vnni", "avx_ifma", "avx_ne_convert", "gfni")
    return {flag for flag in flags if not flag.startswith(beyond_avx2)}


def _openvino_flags() -> set[str]:
    try:
        import openvino as ov

        capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # no openvino, or no CPU plugin: report nothing rather than guess
        return set()
    return {"avx512_bf16"} if "BF16" in capabilities else set()
