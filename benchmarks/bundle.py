"""The shipped form (issue 27): runtime venv size, cold boot and memory of `serve --bundle`.

SigLIP-B/16 (the published vision config, random weights with every norm/bias/probe perturbed; see
latency.py) bundled for OpenVINO fp32 and int8 with the full install, served from a runtime venv
(`pip install '.[runtime]'`, not editable, no torch). Reports

- the runtime venv's size vs the full venv running this script (target <= 25%), and that torch,
  nncf and transformers are not importable in it;
- cold boot of `serve --bundle` in the runtime venv: process start -> first /health 200 -> first
  /v1/embed answered, median and p95 of --boots fresh processes (target <= 2.0 s), beside the
  full install's `serve --weights --backend openvino` on the same weights (IR cache warm) as the peer;
- peak RSS (VmHWM) of each service after --requests /v1/embed requests (targets: fp32 <= 1 GB,
  int8 <= 600 MB).

Page cache warm (files read by earlier boots), compiled-model caches present: a container restart
on the machine that built it. Usage: python benchmarks/bundle.py [--boots 5] [--requests 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
WORK = HERE / ".cache"
PHOTO = sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))[0]


def folder_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def runtime_venv(path: Path) -> Path:
    """A fresh venv with the checkout (copied, not editable) and its runtime extra; made once."""
    if (path / ".installed").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    source = path.with_name(path.name + "-src")
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "arrowvision", source / "arrowvision", ignore=shutil.ignore_patterns("__pycache__"))
    env = clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, env=env)
    subprocess.run([str(path / "bin" / "pip"), "install", "--quiet", f"{source}[runtime]"], check=True, env=env)
    shutil.rmtree(source)
    (path / ".installed").touch()
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"HF_HUB_OFFLINE": "1"}


def make_bundle(parquet: Path, precision: str) -> Path:
    from arrowvision import WeightLoader
    from arrowvision.bundle.build import build_bundle
    from arrowvision.bundle.manifest import read_manifest

    out = WORK / f"bundle-siglip-base-{precision}"
    checksum = WeightLoader(parquet).checksum
    try:
        if read_manifest(out)["weights"]["checksum"] == checksum:
            return out
    except Exception:  # noqa: BLE001 - missing or stale: build it
        pass
    build_bundle(parquet, out, precision=precision, force=out.exists())
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def boot(command: list[str], env: dict[str, str], requests: int) -> dict[str, float]:
    """One fresh service: seconds to /health 200 and to the first embedding, then peak RSS (MB)
    after ``requests`` embeddings in all."""
    import httpx

    port = free_port()
    body = PHOTO.read_bytes()
    start = time.perf_counter()
    process = subprocess.Popen([*command, "--port", str(port), "--quiet"], env=env, cwd=WORK,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command} exited: {process.stderr.read().decode()[-2000:]}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.005)
            health = time.perf_counter() - start
            client.post("/v1/embed", files={"file": ("a.jpg", body, "image/jpeg")}).raise_for_status()
            first = time.perf_counter() - start
            for _ in range(requests - 1):
                client.post("/v1/embed", files={"file": ("a.jpg", body, "image/jpeg")}).raise_for_status()
        status = Path(f"/proc/{process.pid}/status").read_text()
        peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"health": health, "first": first, "peak_mb": peak_kb / 1024}


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--runtime-venv", type=Path, default=WORK / "runtime-venv")
    args = parser.parse_args()

    from latency import base_checkpoint

    from arrowvision.backends.cpu import cpu_info

    _, parquet = base_checkpoint()
    venv = runtime_venv(args.runtime_venv)
    bundles = {precision: make_bundle(parquet, precision) for precision in ("fp32", "int8")}
    full_venv = Path(sys.prefix)

    print(f"\ncpu: {cpu_info().describe()}")
    runtime_size, full_size = folder_bytes(venv), folder_bytes(full_venv)
    leaked = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                             "print([m for m in ('torch', 'nncf', 'transformers') if u.find_spec(m)])"],
                            capture_output=True, text=True, env=clean_env(), cwd=WORK).stdout.strip()
    print(f"runtime venv {runtime_size / 2**20:.0f} MB vs full venv ({full_venv}) {full_size / 2**20:.0f} MB: "
          f"{100 * runtime_size / full_size:.1f}% (target <= 25%); importable there of torch/nncf/transformers: {leaked}")
    for precision, path in bundles.items():
        print(f"bundle {precision}: {folder_bytes(path) / 2**20:.0f} MB ({path})")

    runtime_bin = str(venv / "bin" / "arrowvision")
    services = {
        "bundle fp32 (runtime venv)": ([runtime_bin, "serve", "--bundle", str(bundles["fp32"])], clean_env()),
        "bundle int8 (runtime venv)": ([runtime_bin, "serve", "--bundle", str(bundles["int8"])], clean_env()),
        "weights OV fp32 (full install, peer)": ([sys.executable, "-m", "arrowvision", "serve", "--weights", str(parquet),
                                                  "--backend", "openvino"], {**os.environ, "PYTHONPATH": str(ROOT)}),
    }
    results: dict[str, list[dict[str, float]]] = {}
    for name, (command, env) in services.items():
        boot(command, env, 1)  # warm-up: the compiled cache and the page cache, as after a first container start
        results[name] = [boot(command, env, args.requests if i == 0 else 1) for i in range(args.boots)]
    peer = statistics.median(r["first"] for r in results["weights OV fp32 (full install, peer)"])
    print(f"\n{'service':<38} {'health p50':>10} {'p95':>7} {'1st emb p50':>11} {'p95':>7} {'x peer':>7} "
          f"{'peak RSS after ' + str(args.requests) + ' req':>24}")
    for name, runs in results.items():
        health, first = [r["health"] for r in runs], [r["first"] for r in runs]
        print(f"{name:<38} {statistics.median(health):9.2f}s {p95(health):6.2f}s {statistics.median(first):10.2f}s "
              f"{p95(first):6.2f}s {statistics.median(first) / peer:6.2f}x {runs[0]['peak_mb']:21.0f} MB")
    print("targets: first embedding <= 2.0 s (median of fresh processes); peak RSS fp32 <= 1024 MB, int8 <= 600 MB")


if __name__ == "__main__":
    main()
