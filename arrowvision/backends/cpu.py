"""What this CPU can do, for choosing precisions and keying cached choices.

Read from /proc/cpuinfo (Linux) with OpenVINO's own capability list as a fallback; both are cheap
and neither needs torch. The features that matter here:

- ``avx512_vnni`` / ``avx_vnni`` / ``amx_int8``: int8 dot products without saturation. Without
  them, u8 x s8 products go through ``vpmaddubsw``, whose int16 intermediate saturates, so int8
  needs 7-bit weights (OpenVINO's overflow fix, ONNX Runtime's ``reduce_range``).
- ``avx512_bf16`` / ``amx_bf16``: native bf16 compute.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from dataclasses import dataclass, field
from pathlib import Path

REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CPUInfo:
    model: str
    flags: frozenset[str] = field(default_factory=frozenset)
    cores: int = 1

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
        return f"{self.model} ({self.cores} cores); has {' '.join(present) or 'none'}; lacks {' '.join(missing) or 'none'}"

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
    return CPUInfo(model=model, flags=frozenset(flags), cores=cores)


def _openvino_flags() -> set[str]:
    try:
        import openvino as ov

        capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # no openvino, or no CPU plugin: report nothing rather than guess
        return set()
    return {"avx512_bf16"} if "BF16" in capabilities else set()
