"""End-to-end CLI tests in subprocesses: embed a folder of real photos and broken files, resume
after a kill, search, validate, info."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arrowvision import VisionEncoder
from arrowvision.datasets.pipeline import collect_inputs, embed_paths, read_embeddings
from arrowvision.errors import ArrowVisionError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arrowvision", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> tuple[Path, list[str], list[str]]:
    """Real photos (several formats and sizes, nested folders) plus broken files."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "nested" / "deeper").mkdir(parents=True)
    good = []
    for i, (name, photo) in enumerate(photos.items()):
        for j, (fmt, ext) in enumerate((("JPEG", "jpg"), ("PNG", "png"))):
            target = folder / ("nested" if j else "") / ("deeper" if i % 2 and j else "") / f"{name}.{ext}"
            Image.fromarray(photo).save(target, fmt)
            good.append(str(target))
    jpeg = (folder / "coffee.jpg").read_bytes()
    bad = {"empty.jpg": b"", "garbage.png": os.urandom(500), "truncated.jpg": jpeg[:2000], "text.jpeg": b"hello world\n"}
    for name, payload in bad.items():
        (folder / name).write_bytes(payload)
    (folder / "notes.txt").write_text("not collected: wrong extension")
    return folder, sorted(good), sorted(str(folder / n) for n in bad)


def test_collect_inputs_folder_glob_and_lists(tmp_path, corpus):
    folder, good, bad = corpus
    assert sorted(collect_inputs(str(folder))) == sorted(good + bad)
    assert sorted(collect_inputs(str(folder / "**" / "*.png"))) == sorted(p for p in good + bad if p.endswith(".png"))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(good[:3] + good[:1]) + "\n")
    assert collect_inputs(str(listing)) == good[:3]  # duplicates dropped, order kept
    table = tmp_path / "list.csv"
    table.write_text("id,path\n" + "\n".join(f"{i},{p}" for i, p in enumerate(good[:2])) + "\n")
    assert collect_inputs(str(table)) == good[:2]


def test_embed_folder_end_to_end(tmp_path, corpus):
    folder, good, bad = corpus
    out = tmp_path / "emb"
    run = cli("embed", str(folder), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--batch-size", "3",
              "--chunk-size", "5", "--no-progress")
    assert run.returncode == 3, run.stderr  # finished, but some inputs failed
    assert f"{len(good)} embedded" in run.stdout and f"{len(bad)} failed" in run.stdout
    table = read_embeddings(out)
    assert sorted(table.column("path").to_pylist()) == good
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # every row equals a direct encode() of that file
    encoder = VisionEncoder.from_parquet(DEMO)
    direct = encoder.encode(table.column("path").to_pylist())
    assert np.abs(direct - vectors).max() < 1e-5
    row = table.slice(0, 1).to_pylist()[0]
    with Image.open(row["path"]) as image:
        assert (row["width"], row["height"]) == image.size
    import hashlib

    assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
    error_rows = [r for p in sorted((out / "_errors").glob("errors-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["path"] for r in error_rows) == bad
    assert all(r["error"].startswith(r["path"]) for r in error_rows)  # every reason names its file
    assert [pq.read_metadata(p).num_rows for p in sorted(out.glob("part-*.parquet"))] == [5, 3]  # --chunk-size exactly
    assert sorted(table.column("relpath").to_pylist()) == sorted(str(Path(p).relative_to(folder)) for p in good)
    metadata = pq.read_schema(next(out.glob("part-*.parquet"))).metadata
    assert metadata[b"arrowvision.model_checksum"].decode() == encoder.checksum
    # rerun: the failures are retried (and fail again), nothing is written twice, no img/s for nothing
    error_chunks = len(list((out / "_errors").glob("*.parquet")))
    again = cli("embed", str(folder), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--no-progress")
    assert again.returncode == 3 and "0 embedded" in again.stdout and f"{len(bad)} failed" in again.stdout
    assert f"{len(good)} already done" in again.stdout and "img/s" not in again.stdout
    assert len(list((out / "_errors").glob("*.parquet"))) == error_chunks + 1
    skipped = cli("embed", str(folder), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--no-progress",
                  "--skip-failed")
    assert skipped.returncode == 3 and f"{len(bad)} failed" in skipped.stdout  # skipped, still counted as failed
    assert len(list((out / "_errors").glob("*.parquet"))) == error_chunks + 1  # not retried
    assert sorted(read_embeddings(out).column("path").to_pylist()) == good


def test_every_parquet_reader_sees_only_the_embeddings(tmp_path, corpus):
    """Error tables live in _errors/, which dataset discovery skips (README: any reader)."""
    import duckdb
    import polars as pl
    import pyarrow.dataset as ds

    folder, good, bad = corpus
    out = tmp_path / "emb"
    run = cli("embed", str(folder), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--no-progress",
              "--chunk-size", "3")
    assert run.returncode == 3 and list((out / "_errors").glob("errors-*.parquet"))
    columns = {"path", "relpath", "embedding", "width", "height", "sha256"}
    readers = {
        "pq.read_table": lambda: pq.read_table(out).to_pydict(),
        "pyarrow.dataset": lambda: ds.dataset(out).to_table().to_pydict(),
        "duckdb": lambda: duckdb.sql(f"SELECT * FROM read_parquet('{out}/*.parquet')").arrow().read_all().to_pydict(),
        "polars": lambda: pl.read_parquet(f"{out}/*.parquet").to_dict(as_series=False),
    }
    for name, read in readers.items():
        rows = read()
        assert set(rows) == columns, name
        assert sorted(rows["path"]) == good, name
        assert all(len(vector) == 128 for vector in rows["embedding"]), name


def test_one_identity_per_image_whatever_the_spelling(tmp_path, photos):
    """Relative, absolute and `.`-from-inside spellings of one folder resume one dataset."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, photo in list(photos.items())[:3]:
        Image.fromarray(photo).resize((64, 64)).save(folder / f"{name}.png")
    out = tmp_path / "E"
    base = [sys.executable, "-m", "arrowvision", "embed", "--weights", str(DEMO), "--backend", "torch", "--no-progress"]
    runs = [(tmp_path, ["mixed", "-o", "E"]), (tmp_path / "elsewhere", [str(folder), "-o", str(out)]), (folder, [".", "-o", "../E"])]
    (tmp_path / "elsewhere").mkdir()
    for i, (cwd, args) in enumerate(runs):
        run = subprocess.run(base + args, capture_output=True, text=True, timeout=300, cwd=cwd)
        assert run.returncode == 0, run.stderr
        assert ("3 embedded" if i == 0 else "3 already done") in run.stdout
    table = read_embeddings(out)
    assert sorted(table.column("path").to_pylist()) == sorted(str(p.resolve()) for p in folder.glob("*.png"))
    assert sorted(table.column("relpath").to_pylist()) == sorted(p.name for p in folder.glob("*.png"))
    search = cli("search", str(out), str(folder / "chelsea.png"), "--weights", str(DEMO), "--backend", "torch", "--json")
    hits = json.loads(search.stdout)["results"]
    assert len(hits) == 3 and len({hit["path"] for hit in hits}) == 3 and hits[0]["path"].endswith("chelsea.png")


def test_lists_resolve_against_their_folder_and_skip_headers(tmp_path, monkeypatch, corpus):
    folder, good, _ = corpus
    lists = tmp_path / "lists"
    (lists / "img").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(lists / "img" / name)
    expected = [str((lists / "img" / n).resolve()) for n in ("a.png", "b.png")]
    (lists / "list.txt").write_text("img/a.png\nimg/b.png\n")
    (lists / "header.csv").write_text("file,label\nimg/a.png,cat\nimg/b.png,dog\n")
    (lists / "other_header.csv").write_text("name,label\nimg/a.png,cat\nimg/b.png,dog\n")
    (lists / "plain.csv").write_text("img/a.png,cat\nimg/b.png,dog\n")
    monkeypatch.chdir(folder)  # another folder: entries still resolve against the list's folder
    for name in ("list.txt", "header.csv", "other_header.csv", "plain.csv"):
        assert collect_inputs(str(lists / name)) == expected, name
    assert collect_inputs(str(folder / "nested" / ".." / "coffee.jpg")) == [str((folder / "coffee.jpg").resolve())]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArrowVisionError, match="no images found"):
        collect_inputs(str(tmp_path / "empty"))


def test_a_missing_file_is_a_failure_that_names_it(tmp_path, corpus):
    folder, good, _ = corpus
    missing = str(tmp_path / "gone.jpg")
    encoder = VisionEncoder.from_parquet(DEMO)
    out = tmp_path / "out"
    stats = embed_paths(encoder, [missing], out, progress=False)
    assert (stats.embedded, stats.failed) == (0, 1)
    assert stats.errors == [(missing, f"{missing}: cannot read (No such file or directory)")]
    (out / "_errors" / "errors-00000.parquet").rename(out / "errors-00000.parquet")  # the older layout
    stats = embed_paths(encoder, [missing, good[0]], out, progress=False)
    assert (stats.embedded, stats.failed) == (1, 1)  # the failure is retried
    assert not list(out.glob("errors-*.parquet"))  # moved into _errors/
    assert len(list((out / "_errors").glob("errors-*.parquet"))) == 2
    assert pq.read_table(out).column("path").to_pylist() == [good[0]]


class _StopAfter:
    """A backend wrapper that sets ``stop`` during its n-th call, like a Ctrl-C mid-run."""

    def __init__(self, backend, stop: threading.Event, calls: int):
        self.backend, self.stop, self.calls, self.name = backend, stop, calls, backend.name

    def __call__(self, pixels):
        self.calls -= 1
        if self.calls == 0:
            self.stop.set()
        return self.backend(pixels)


def test_stop_flushes_embedded_rows_as_one_more_chunk(tmp_path, corpus):
    folder, good, _ = corpus
    encoder = VisionEncoder.from_parquet(DEMO)
    stop = threading.Event()
    encoder.backend = _StopAfter(encoder.backend, stop, calls=3)
    out = tmp_path / "emb"
    stats = embed_paths(encoder, good, out, batch_size=2, chunk_size=100, progress=False, stop=stop)
    assert stats.interrupted and stats.embedded == 6
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 1 and pq.read_metadata(parts[0]).num_rows == 6  # nothing embedded was lost
    encoder.backend = encoder.backend.backend
    resumed = embed_paths(encoder, good, out, batch_size=2, chunk_size=100, progress=False)
    assert not resumed.interrupted and (resumed.skipped, resumed.embedded) == (6, len(good) - 6)
    paths = read_embeddings(out).column("path").to_pylist()
    assert sorted(paths) == good and len(set(paths)) == len(paths)


def test_killed_run_resumes_with_exactly_one_row_per_image(tmp_path, photos):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        photo = list(photos.values())[i % 4]
        crop = photo[rng.integers(0, 50) :, rng.integers(0, 50) :]
        Image.fromarray(np.ascontiguousarray(crop)).resize((900, 900)).save(folder / f"img{i:03d}.png")
    out = tmp_path / "emb"
    args = [sys.executable, "-m", "arrowvision", "embed", str(folder), "-o", str(out), "--weights", str(DEMO),
            "--backend", "torch", "--batch-size", "2", "--chunk-size", "2", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts_after_kill = len(list(out.glob("part-*.parquet")))
    assert 3 <= parts_after_kill < 24, "the run should have been killed midway"
    done_before = set(read_embeddings(out).column("path").to_pylist())
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done_before)} already done" in resumed.stdout
    paths = read_embeddings(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 48
    assert not list(out.glob(".*.tmp"))  # no temp files remain visible as chunks


GATED_EMBED = """
import sys
from arrowvision import cli
from arrowvision.encoder import VisionEncoder

gate, marker, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
load = VisionEncoder.from_parquet


class Gated:
    # The 4th model call blocks on a FIFO: Ctrl-C always lands while embed is mid-run.
    name = "gated"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, pixels):
        self.calls += 1
        if self.calls == 4:
            open(marker, "w").close()
            with open(gate, "rb") as fifo:
                fifo.read()
        return self.inner(pixels)


def gated(*args, **kwargs):
    encoder = load(*args, **kwargs)
    return VisionEncoder(encoder.weights, Gated(encoder.backend), encoder.config)


VisionEncoder.from_parquet = gated
sys.exit(cli.main(argv))
"""


def test_ctrl_c_exits_cleanly(tmp_path, corpus):
    """SIGINT while `embed` is provably mid-run (its 4th model call blocked on a FIFO): the run
    stops with 130 and one line, and keeps (only) the rows it says it saved."""
    _, good, _ = corpus
    gate, marker = tmp_path / "gate", tmp_path / "blocked"
    os.mkfifo(gate)
    out = tmp_path / "emb"
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(good) + "\n")
    proc = subprocess.Popen([sys.executable, "-c", GATED_EMBED, str(gate), str(marker), "embed", str(listing), "-o", str(out),
                             "--weights", str(DEMO), "--backend", "torch", "--batch-size", "1", "--chunk-size", "1",
                             "--workers", "1", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():  # three images embedded and written, the fourth held in the model
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # interrupts the blocked open() in the main thread
    while proc.poll() is None and time.monotonic() < deadline:  # fallback: release the gate if it is still held
        try:
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody is waiting on the gate (any more)
            time.sleep(0.01)
    _, stderr = proc.communicate(timeout=60)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert lines[0] == "finishing the batch, Ctrl-C again to stop now" and len(lines) == 2 and lines[1].startswith("interrupted")
    paths = read_embeddings(out).column("path").to_pylist()
    assert len(paths) >= 3 and paths == good[: len(paths)] and f"{len(paths)} rows" in stderr  # what it says it saved
    for part in out.glob("part-*.parquet"):
        pq.read_table(part)

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_flush_then_exit_130(tmp_path, photos, sig):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(list(photos.values())[i % 4]).resize((700, 700)).save(folder / f"img{i:03d}.png")
    out = tmp_path / "emb"
    proc = subprocess.Popen([sys.executable, "-m", "arrowvision", "embed", str(folder), "-o", str(out), "--weights", str(DEMO),
                             "--backend", "torch", "--batch-size", "1", "--chunk-size", "1000", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()

    def read_progress():
        while chunk := proc.stderr.read1(4096):
            seen.extend(chunk)

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and not re.search(rb" ([2-9]|\d\d)/40 ", bytes(seen)):  # tqdm: 2+ images embedded
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, rest = proc.communicate(timeout=120)  # communicate also drains stderr: keep what it read
    reader.join(10)
    stderr = (bytes(seen) + (rest or b"")).decode()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    parts = list(out.glob("part-*.parquet"))
    assert len(parts) == 1  # the rows since the last chunk were written as one more chunk
    rows = pq.read_metadata(parts[0]).num_rows
    assert 2 <= rows < 40 and f"{rows} embedded" in stdout.decode()
    resumed = cli("embed", str(folder), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--no-progress")
    assert resumed.returncode == 0 and f"{rows} already done" in resumed.stdout
    paths = read_embeddings(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 40


def test_search_and_info_and_validate(tmp_path, corpus):
    folder, good, _ = corpus
    out = tmp_path / "emb"
    cli("embed", str(folder), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--no-progress")
    query = next(p for p in good if p.endswith("chelsea.png"))
    run = cli("search", str(out), query, "--weights", str(DEMO), "--backend", "torch", "-k", "3")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[1].split()[2].endswith("chelsea.png") and float(lines[1].split()[1]) > 0.9999
    info = cli("info", str(DEMO), "--verify")
    assert info.returncode == 0 and "verified" in info.stdout and "siglip" in info.stdout
    validate = cli("validate", "--weights", str(DEMO), "--backend", "torch")
    assert validate.returncode == 0 and "torch vs transformers" in validate.stdout and validate.stdout.strip().endswith("PASS")


def test_cli_errors_are_one_line(tmp_path):
    run = cli("embed", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o"), "--weights", str(DEMO), "--backend", "torch")
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error:")
    bad_weights = tmp_path / "w.parquet"
    bad_weights.write_bytes(b"PAR1 nope")
    run = cli("info", str(bad_weights))
    assert run.returncode == 1 and "error:" in run.stderr and "Traceback" not in run.stderr
    assert "Traceback" in cli("-v", "info", str(bad_weights)).stderr


def test_export_and_bench_commands(tmp_path):
    env = {"ARROWVISION_CACHE": str(tmp_path / "cache")}
    run = cli("export", str(DEMO), "--precision", "int8-weights", env=env)
    assert run.returncode == 0, run.stderr
    assert "model.xml" in run.stdout and "min cosine" in run.stdout
    refused = cli("export", str(DEMO), "--precision", "int8", "--min-cosine", "0.9999999", env=env)
    assert refused.returncode == 1 and "too inaccurate" in refused.stderr
    bench = cli("bench", "--weights", str(DEMO), "--backend", "openvino", "--batch-sizes", "1,4", "--iters", "3", env=env)
    assert bench.returncode == 0, bench.stderr
    rows = [line.split() for line in bench.stdout.splitlines() if line.split() and line.split()[0] in ("1", "4")]
    assert [r[0] for r in rows] == ["1", "4"] and all(float(r[4]) > 0 for r in rows)
    assert "peak RSS" in bench.stdout
    validate = cli("validate", "--weights", str(DEMO), "--backend", "openvino", env=env)
    assert validate.returncode == 0 and "openvino fp32 vs torch" in validate.stdout
