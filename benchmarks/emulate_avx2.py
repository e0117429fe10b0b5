#!/usr/bin/env python3
"""Run a command as if on an AVX2+FMA CPU without AVX-512/VNNI/AMX (a Zen 3 stand-in).

ONNX Runtime's MLAS, OpenVINO (oneDNN fork, bundled MLAS, its own JIT kernels) and numpy pick
kernels from CPUID at run time, and MLAS has no switch to cap that (``ONEDNN_MAX_CPU_ISA`` reaches
only oneDNN: OpenVINO's MLAS fully-connected kernels and MVN stayed AVX-512 under it). On Linux
CPUs with ``cpuid_fault`` the ``avx2_cpuid.c`` shim, preloaded, makes CPUID trap and answers it
with those features cleared, for every library in the process. Only the dispatch is emulated:
the silicon, clocks and caches are this machine's, so compare ratios within one run, not times
with a real Zen 3 (and glibc's own string functions were picked before the shim loaded).

    python benchmarks/emulate_avx2.py --check            # build the shim, show what the runtimes see
    python benchmarks/emulate_avx2.py -- CMD [ARGS...]   # run CMD under it
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "avx2_cpuid.c"
EXIT_NO_FAULTING = 86  # the shim's exit status where CPUID cannot be made to fault

PROBE = """
import json, sys
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__ as numpy_features
import openvino as ov
from arrowvision.backends.cpu import cpu_info
print(json.dumps({"numpy_avx512f": numpy_features.get("AVX512F"), "numpy_avx2": numpy_features.get("AVX2"),
                  "openvino": list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                  "arrowvision": cpu_info().describe(), "vnni": cpu_info().int8_vnni}))
"""


def unavailable_reason() -> str | None:
    """Why CPUID cannot be emulated here, or None."""
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"CPUID emulation needs Linux on x86-64 (this is {platform.system()} {platform.machine()})"
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError as exc:
        return f"cannot read /proc/cpuinfo: {exc}"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    if "cpuid_fault" not in flags:
        return "this CPU/hypervisor offers no CPUID faulting (no cpuid_fault flag)"
    return None


def shim_path(cache: Path | None = None) -> Path:
    """The compiled shim, built once per source version (atomically) under ``cache``."""
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"AVX2 emulation unavailable: {reason}")
    source = SOURCE.read_bytes()
    folder = cache or (HERE / ".cache" / "emulate")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"avx2_cpuid-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not target.exists():
        compiler = os.environ.get("CC", "cc")
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".so", delete=False) as staging:
            pass
        try:
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", staging.name, str(SOURCE), "-ldl"], check=True,
                           capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            Path(staging.name).unlink(missing_ok=True)
            detail = getattr(exc, "stderr", "") or str(exc)
            raise SystemExit(f"AVX2 emulation: cannot compile {SOURCE.name} with {compiler}: {detail.strip()}") from None
        os.replace(staging.name, target)
    return target


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: os.environ) with the shim preloaded and arrowvision's ISA cap set."""
    env = dict(os.environ if base is None else base)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{shim_path()}{':' + preload if preload else ''}"
    env["ARROWVISION_CPU_ISA"] = "avx2"
    return env


def check(env: dict[str, str]) -> dict:
    """What numpy, OpenVINO and arrowvision see under the shim; exits if any still sees AVX-512/VNNI."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode:
        raise SystemExit(f"AVX2 emulation check failed (exit {out.returncode}): {out.stderr[-2000:]}")
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    if seen["numpy_avx512f"] or not seen["numpy_avx2"] or "BF16" in seen["openvino"] or seen["vnni"]:
        raise SystemExit(f"AVX2 emulation is not in effect: {seen}")
    return seen


def main() -> None:
    args = sys.argv[1:]
    env = environment()
    if args[:1] == ["--check"]:
        print(json.dumps(check(env), indent=2))
        return
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise SystemExit(__doc__)
    raise SystemExit(subprocess.run(args, env=env).returncode)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
