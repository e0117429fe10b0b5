"""Untrusted input lists and decoding failures: `embed` never hangs, a bad row fails alone, a
dead decoding worker stops the job with one error line and keeps the finished chunks, and a bad
list is one clear error, never a traceback."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arrowvision import ArrowVisionError, VisionEncoder, cli
from arrowvision.datasets.pipeline import collect_inputs, embed_paths, read_embeddings
from arrowvision.inputs import decode
from arrowvision.inputs.pathlists import MAX_LINE_BYTES, read_path_list

from .test_pipeline import DEMO
from .test_pipeline import cli as run_cli

HANG = 120  # seconds after which a run counts as hung (a healthy one takes a few)


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for name, photo in photos.items():
        Image.fromarray(photo).resize((64, 48)).save(folder / f"{name}.jpg")
        paths.append(str(folder / f"{name}.jpg"))
    return sorted(paths)


@pytest.fixture(scope="module")
def encoder(tiny_siglip_parquet) -> VisionEncoder:
    return VisionEncoder.from_parquet(tiny_siglip_parquet)


def embed_within(seconds: float, *args, **kwargs):
    """embed_paths in a thread: a hang fails the test instead of blocking the suite."""
    outcome: dict = {}

    def run():
        try:
            outcome["stats"] = embed_paths(*args, progress=False, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "embed_paths hung"
    return outcome


def test_embed_on_a_list_with_a_nul_line_finishes_with_that_row_failed(tmp_path, images):
    listing = tmp_path / "list.txt"
    listing.write_bytes(("\n".join([images[0], "/tmp/evil\0name.jpg", images[1]]) + "\n").encode())
    out = tmp_path / "out"
    run = run_cli("embed", str(listing), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--no-progress", timeout=HANG)
    assert run.returncode == cli.EXIT_PARTIAL, run.stderr
    assert "NUL byte" in run.stderr and "Traceback" not in run.stderr
    assert sorted(read_embeddings(out).column("path").to_pylist()) == sorted(images[:2])
    errors = pa.concat_tables(pq.read_table(p, columns=["path", "error"]) for p in (out / "_errors").glob("errors-*.parquet"))
    assert errors.to_pylist() == [{"path": "/tmp/evil\0name.jpg", "error": "'/tmp/evil\\x00name.jpg': path contains a NUL byte"}]


def test_any_exception_in_a_decoding_worker_is_a_failed_row(tmp_path, images, encoder, monkeypatch):
    preprocessor_type = type(encoder.preprocessor)  # a frozen dataclass: patch its class
    real, calls = preprocessor_type.resized, []

    def flaky(self, image):
        calls.append(image)
        if len(calls) == 2:
            raise RuntimeError("preprocessing exploded")
        return real(self, image)

    monkeypatch.setattr(preprocessor_type, "resized", flaky)
    outcome = embed_within(HANG, encoder, images, tmp_path / "out", batch_size=2, workers=2)
    stats = outcome["stats"]
    assert (stats.embedded, stats.failed) == (len(images) - 1, 1)
    assert stats.errors[0][1].endswith("preprocessing exploded")
    errors = pq.read_table(next((tmp_path / "out" / "_errors").glob("errors-*.parquet"))).to_pylist()
    assert errors[0]["error"].endswith("preprocessing exploded")


def test_a_dead_worker_stops_the_job_keeping_finished_chunks(tmp_path, images, encoder, monkeypatch):
    real = decode.decode_path

    def dies_on_the_third(path, *args):
        if path == images[2]:
            raise MemoryError("out of memory while decoding")
        return real(path, *args)

    monkeypatch.setattr(decode, "decode_path", dies_on_the_third)
    out = tmp_path / "out"
    outcome = embed_within(HANG, encoder, images, out, batch_size=2, chunk_size=100)
    assert isinstance(outcome["error"], ArrowVisionError)
    assert "decoding worker died (MemoryError: out of memory while decoding)" in str(outcome["error"])
    assert read_embeddings(out).column("path").to_pylist() == images[:2]  # the batch before was written
    monkeypatch.setattr(decode, "decode_path", real)
    outcome = embed_within(HANG, encoder, images, out, batch_size=2)  # resumes
    assert (outcome["stats"].skipped, outcome["stats"].embedded) == (2, len(images) - 2)


def test_a_dead_worker_is_one_error_line_and_a_nonzero_exit(tmp_path, images, monkeypatch, capsys):
    def dies(*args):
        raise SystemError("decoder state corrupted")

    monkeypatch.setattr(decode, "decode_path", dies)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(images))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rc=cli.main(
        ["embed", str(listing), "-o", str(tmp_path / "out"), "--weights", str(DEMO), "--backend", "torch", "--no-progress"])))
    thread.start()
    thread.join(HANG)
    assert not thread.is_alive(), "embed hung"
    assert result["rc"] == cli.EXIT_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if "error" in line] == [
        "error: a decoding worker died (SystemError: decoder state corrupted); finished chunks are kept, rerun to resume"
    ]


def test_odd_rows_fail_alone(tmp_path, images, encoder):
    """Rows that would block, exhaust memory or are not files fail one by one; the job goes on."""
    os.mkfifo(tmp_path / "pipe.jpg")  # reading a FIFO would block forever
    odd = [str(tmp_path / "pipe.jpg"), str(tmp_path), "/dev/zero", str(tmp_path / ("x" * 5000)), str(tmp_path / "missing.jpg")]
    outcome = embed_within(HANG, encoder, images[:1] + odd, tmp_path / "out")
    stats = outcome["stats"]
    assert (stats.embedded, stats.failed) == (1, len(odd))
    reasons = dict(stats.errors)
    assert reasons[odd[0]].endswith("not a regular file") and reasons[odd[2]].endswith("not a regular file")
    assert "too long" in reasons[odd[3]] and "No such file" in reasons[odd[4]]


# --------------------------------------------------------------------------- list reading


def test_bad_list_encodings_are_one_clear_error(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"a.jpg\n# comment\ncaf\xe9.jpg\n")
    with pytest.raises(ArrowVisionError, match=r"latin.txt: line 3 is not valid UTF-8 \(byte 0xe9 at column 4\)"):
        collect_inputs(str(latin))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("a.jpg\n", encoding="utf-16")
    with pytest.raises(ArrowVisionError, match="UTF-16; save it as UTF-8"):
        collect_inputs(str(utf16))
    csv_file = tmp_path / "list.csv"
    csv_file.write_bytes(b"path\nok.jpg\n\xff\xfe.jpg\n")
    with pytest.raises(ArrowVisionError, match="list.csv: line 3 is not valid UTF-8"):
        collect_inputs(str(csv_file))


def test_absurd_lines_are_one_clear_error(tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("ok.jpg\n" + "x" * (MAX_LINE_BYTES + 1))
    with pytest.raises(ArrowVisionError, match=f"long.txt: line 2 is longer than {MAX_LINE_BYTES} bytes"):
        collect_inputs(str(long))
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('path\n"' + "y\n" * 70_000 + '"\n')  # one field over the csv module's limit
    with pytest.raises(ArrowVisionError, match="quoted.csv: line .* is not valid CSV"):
        collect_inputs(str(quoted))


def test_list_formats_keep_working(tmp_path):
    text = tmp_path / "list.txt"
    text.write_bytes("\ufeffa.jpg\r\n\n  b.jpg  \n#c.jpg\nd\0.jpg\n".encode())
    assert read_path_list(text) == ["a.jpg", "b.jpg", "d\0.jpg"]  # BOM, CRLF, blanks, comments; NUL kept as a row
    table = tmp_path / "list.csv"
    table.write_text('id,path\n1,a.jpg\n2\n3,"b,c.jpg"\n')
    assert read_path_list(table) == ["a.jpg", "b,c.jpg"]  # short rows skipped, quoting understood
    parquet = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", None, "b.jpg"]}), parquet)
    assert read_path_list(parquet) == ["a.jpg", "b.jpg"]


def test_bad_parquet_lists(tmp_path):
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"path": [1, 2]}), numbers)
    with pytest.raises(ArrowVisionError, match="'path' column must hold strings, not int64"):
        collect_inputs(str(numbers))
    no_path = tmp_path / "no_path.parquet"
    pq.write_table(pa.table({"file": ["a.jpg"]}), no_path)
    with pytest.raises(ArrowVisionError, match="needs a 'path' column"):
        collect_inputs(str(no_path))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet PAR1")
    with pytest.raises(ArrowVisionError, match="cannot read the Parquet list"):
        collect_inputs(str(broken))


def test_cli_bad_list_is_one_error_line(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9.jpg\n")
    run = run_cli("embed", str(latin), "-o", str(tmp_path / "o"), "--weights", str(DEMO), "--backend", "torch", timeout=HANG)
    assert run.returncode == cli.EXIT_ERROR
    assert run.stderr.strip().splitlines() == [f"error: {latin}: line 1 is not valid UTF-8 (byte 0xe9 at column 4); lists of paths must be UTF-8 text"]


def test_paths_in_lists_are_kept_as_written(tmp_path):
    """Reading a list does not open the listed files: a slow or odd path cannot stall it. (Each
    entry becomes its resolved absolute path, relative ones against the list's folder: issue 17.)"""
    listing = tmp_path / "list.txt"
    listing.write_text("/dev/zero\n/nonexistent/a.jpg\n" + str(Path("relative/b.jpg")) + "\n")
    assert collect_inputs(str(listing)) == ["/dev/zero", "/nonexistent/a.jpg", str((tmp_path / "relative" / "b.jpg").resolve())]
