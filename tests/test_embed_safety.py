"""`embed` as a new user meets it: two runs into one folder, odd file names, Ctrl-C, and what
lands in a log file. Real processes and real signals throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from arrowvision.datasets.pipeline import read_embeddings
from arrowvision.datasets.writer import OWNER_FILE, EmbeddingWriter
from arrowvision.errors import OutputBusy
from arrowvision.util.interrupts import ACKNOWLEDGED, STOPPED

from .test_pipeline import GATED_EMBED, cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"
SAMPLES = sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))
EMBED = ["--weights", str(DEMO), "--backend", "torch"]
PROMPTLY = 3.0  # seconds: generous on a loaded machine; the order of events is what is asserted first


def error_rows(out: Path) -> list[dict]:
    return [row for part in sorted((out / "_errors").glob("errors-*.parquet")) for row in pq.read_table(part).to_pylist()]


class GatedRun:
    """`embed` whose 4th model call blocks on a FIFO until ``release``: a run provably mid-way."""

    def __init__(self, tmp_path: Path, inputs: Path, out: Path, *extra: str):
        self.gate, self.marker = tmp_path / "gate", tmp_path / "blocked"
        os.mkfifo(self.gate)
        self.proc = subprocess.Popen([sys.executable, "-c", GATED_EMBED, str(self.gate), str(self.marker), "embed", str(inputs),
                                      "-o", str(out), *EMBED, "--batch-size", "1", "--chunk-size", "1", "--workers", "1", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []  # (monotonic time, stderr line)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 120
        while not self.marker.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr()
            time.sleep(0.01)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for_line(self, text: str, timeout: float = 30.0) -> float | None:
        """When a stderr line equal to ``text`` appeared (None if not within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in self.lines:
                if line == text:
                    return when
            time.sleep(0.01)
        return None

    def release(self) -> None:
        os.close(os.open(self.gate, os.O_WRONLY))  # the blocked reader opened it: EOF when we close

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code


def two_folders(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    for i, image in enumerate(SAMPLES):
        shutil.copy(image, (first if i < 5 else second) / image.name)
    return first, second


def test_a_second_concurrent_embed_into_one_folder_is_refused_and_no_row_is_lost(tmp_path):
    first, second = two_folders(tmp_path)
    out = tmp_path / "out"
    running = GatedRun(tmp_path, first, out, "--no-progress")  # holds the folder, mid-run
    try:
        refused = cli("embed", str(second), "-o", str(out), *EMBED, "--no-progress")
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert "is being written by another arrowvision run" in refused.stderr
        assert f"pid {running.proc.pid}" in refused.stderr
        early = cli("embed", str(second), "-o", str(out), "--weights", str(tmp_path / "missing.parquet"), "--no-progress")
        assert early.returncode == 1 and "is being written by another" in early.stderr, early.stderr  # before the model
    finally:
        running.release()
    assert running.finish() == 0, running.stderr()
    assert not (out / OWNER_FILE).exists()  # released at the end of the run
    again = cli("embed", str(second), "-o", str(out), *EMBED, "--no-progress")
    assert again.returncode == 0, again.stderr
    paths = read_embeddings(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(SAMPLES)  # both runs' rows, once each


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    first, _ = two_folders(tmp_path)
    out = tmp_path / "out"
    crashed = GatedRun(tmp_path, first, out, "--no-progress")
    crashed.proc.send_signal(signal.SIGKILL)
    crashed.finish()
    assert json.loads((out / OWNER_FILE).read_text())["pid"] == crashed.proc.pid  # left behind by the crash
    kept = len(read_embeddings(out))
    assert 2 <= kept < 5  # the chunks written before the 4th model call
    resumed = cli("embed", str(first), "-o", str(out), *EMBED, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} already done" in resumed.stdout  # the chunks the killed run wrote are kept
    paths = read_embeddings(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 5


def test_one_writer_per_folder_in_one_process_too(tmp_path):
    metadata = {"model_checksum": "sha256:x", "family": "siglip", "dim": "4", "sketch": "false", "normalized": "true"}
    with EmbeddingWriter(tmp_path / "out", 4, metadata):
        with pytest.raises(OutputBusy, match="one writer per output folder"):
            EmbeddingWriter(tmp_path / "out", 4, metadata)
    with EmbeddingWriter(tmp_path / "out", 4, metadata):  # free again once closed
        pass


def test_file_names_that_are_not_utf8_are_embedded_or_error_rows(tmp_path):
    """Linux allows any bytes in a name: the good images of the chunk are kept, the bad file is a
    row of the errors table, the dataset stays valid UTF-8, and a rerun resumes."""
    folder = tmp_path.resolve() / "odd"
    folder.mkdir()
    for image in SAMPLES[:3]:
        shutil.copy(image, folder / image.name)
    latin1, broken = os.fsencode(folder) + b"/caf\xe9.jpg", os.fsencode(folder) + b"/bad\xff.jpg"
    shutil.copy(SAMPLES[3], latin1)
    with open(broken, "wb") as handle:
        handle.write(b"not an image")
    out = tmp_path / "out"
    run = cli("embed", str(folder), "-o", str(out), *EMBED, "--no-progress")
    assert run.returncode == 3 and "Traceback" not in run.stderr, run.stderr  # finished, one input failed
    assert "4 embedded" in run.stdout and "1 failed" in run.stdout
    table = read_embeddings(out)
    paths = table.column("path").to_pylist()
    assert f"{folder}/caf\\xe9.jpg" in paths and len(paths) == 4  # the escaped spelling of byte 0xe9
    assert "caf\\xe9.jpg" in table.column("relpath").to_pylist()
    [error] = error_rows(out)
    assert error["path"] == f"{folder}/bad\\xff.jpg" and error["error"].startswith(error["path"])
    again = cli("embed", str(folder), "-o", str(out), *EMBED, "--no-progress")
    assert again.returncode == 3 and "4 already done" in again.stdout and "0 embedded" in again.stdout


def test_a_symlink_loop_in_a_list_is_an_error_row(tmp_path):
    (tmp_path / "a.jpg").symlink_to("b.jpg")
    (tmp_path / "b.jpg").symlink_to("a.jpg")
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"a.jpg\n{SAMPLES[0]}\n")
    out = tmp_path / "out"
    run = cli("embed", str(listing), "-o", str(out), *EMBED, "--no-progress")
    assert run.returncode == 3 and "Traceback" not in run.stderr, run.stderr
    assert "1 embedded" in run.stdout and "1 failed" in run.stdout
    [error] = error_rows(out)
    assert error["path"] == os.path.abspath(tmp_path / "a.jpg") and "symbolic links" in error["error"]


def test_errors_rows_carry_the_run_and_the_time(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    before = time.time()
    for _ in range(2):
        assert cli("embed", str(folder), "-o", str(out), *EMBED, "--no-progress").returncode == 3
    rows = error_rows(out)
    assert len(rows) == 2 and rows[0]["run_id"] != rows[1]["run_id"]  # one row per failure per run, told apart
    assert all(before - 1 <= row["time"].timestamp() <= time.time() + 1 for row in rows)
    assert rows[0]["time"] <= rows[1]["time"]


def test_ctrl_c_is_acknowledged_at_once_and_a_second_one_stops_at_once(tmp_path):
    """The model call in progress is blocked (as a long one would be): the first Ctrl-C is answered
    while it still runs, and the second ends the process without waiting for it."""
    first, _ = two_folders(tmp_path)
    out = tmp_path / "out"
    run = GatedRun(tmp_path, first, out, "--no-progress")
    try:
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        acknowledged = run.wait_for_line(ACKNOWLEDGED)
        assert acknowledged is not None, run.stderr()  # answered although the model call still holds the main thread
        assert acknowledged - sent < PROMPTLY
        assert run.proc.poll() is None  # the first Ctrl-C only asks to finish the batch
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        code = run.proc.wait(30)  # the gate is still closed: nothing but the second Ctrl-C can end it
        stopped = time.monotonic()
    finally:
        if run.proc.poll() is None:
            run.release()
    run.finish()
    assert code == 130 and stopped - sent < PROMPTLY
    assert run.stderr().splitlines() == [ACKNOWLEDGED, STOPPED]
    kept = len(read_embeddings(out))
    assert 2 <= kept < 5  # the chunks written before the stop are whole
    resumed = cli("embed", str(first), "-o", str(out), *EMBED, "--no-progress")
    assert resumed.returncode == 0 and f"{kept} already done" in resumed.stdout, resumed.stderr


def test_progress_in_a_log_file_is_plain_lines_and_absent_when_nothing_is_left(tmp_path):
    first, _ = two_folders(tmp_path)
    out = tmp_path / "out"
    run = cli("embed", str(first), "-o", str(out), *EMBED, "--batch-size", "1")  # stderr is a pipe, not a terminal
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    progress = [line for line in run.stderr.splitlines() if line.startswith("embedding: ")]
    assert progress and progress[-1].startswith("embedding: 5/5 img (100%)")
    again = cli("embed", str(first), "-o", str(out), *EMBED)
    assert again.returncode == 0 and "5 already done" in again.stdout
    assert "embedding" not in again.stderr and "0img" not in again.stderr  # nothing to do: no bar
