"""The command line's contract: exit codes, one-line errors, parser validation, consistent flags,
JSON output, and one IR cache shared by every command that may export."""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path

import pytest

from arrowvision import WeightLoader, __version__
from arrowvision.cli import EXIT_ERROR, EXIT_USAGE, main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"
SAMPLES = ROOT / "arrowvision" / "samples"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """main() in-process: (exit code, stdout, stderr); argparse's exits become codes too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(stderr: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr


@pytest.mark.parametrize("argv,needle", [
    (["search", "E", "q.jpg", "-k", "-1"], "--top-k: must be >= 1"),
    (["bench", "--iters", "0"], "--iters: must be >= 1"),
    (["bench", "--batch-sizes", "1,x"], "'x' is not an integer"),
    (["export", DEMO, "--min-cosine", "2"], "(0, 1]"),
    (["validate", "--min-cosine", "0"], "(0, 1]"),
    (["serve", "--max-batch", "0"], "--max-batch: must be >= 1"),
    (["serve", "--port", "70000"], "1-65535"),
    (["embed", "x", "-o", "y", "--chunk-size", "0"], "--chunk-size: must be >= 1"),
    (["embed", "x", "-o", "y", "--backend", "torch", "--precision", "int8"], "--precision int8 is not available on the torch backend"),
    (["embed", "x", "-o", "y", "--backend", "onnxruntime", "--precision", "fp16"], "not available on the onnxruntime backend"),
    (["embed", "x", "-o", "y", "--backend", "auto", "--precision", "int8"], "auto chooses the precision itself"),
    (["embed", "x", "-o", "y", "--backend", "onnxruntime", "--calibration", "a.jpg"], "applies to the openvino/auto backends only"),
    (["search", "E", "q.jpg", "--backend", "torch", "--mode", "latency"], "--mode latency applies to the openvino/auto backends only"),
    (["search", "E", "q.jpg", "--backend", "openvino", "--compile"], "--compile applies to the torch backends only"),
    (["embed", "x", "-o", "y", "--decode", "nvjpeg"], "invalid choice"),
    (["export", DEMO, "--format", "onnx"], "give -o model.onnx"),
    (["bench", "--backend", "torch", "--calibration", "x.jpg"], "--calibration x.jpg applies to the openvino"),
    (["bench", "--backend", "torch", "--device", "GPU"], "the torch backend runs on cpu"),
    (["embed", "x", "-o", "y", "--backend", "nope"], "invalid choice"),
    (["info"], "give a weights file"),
    (["info", DEMO, "--weights", "other.parquet"], "two different weights files"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE and out == ""
    assert one_error_line(err) and needle in err and "--help" in err


def test_bad_inputs_are_one_error_line_and_exit_1(capsys, tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    existing_file = tmp_path / "file"
    existing_file.write_text("x")
    cases = [
        (["info", folder], "is a folder"),
        (["export", folder], "is a folder"),
        (["demo", "--weights", folder], "is a folder"),
        (["info", tmp_path / "missing.parquet"], "no such weights file"),
        (["embed", SAMPLES, "-o", existing_file, "--weights", DEMO, "--backend", "torch"], "is not a folder"),
        (["embed", folder, "-o", tmp_path / "out", "--weights", DEMO, "--backend", "torch"], "no images found"),
        (["search", tmp_path / "nothing", SAMPLES / "horse.jpg", "--weights", DEMO, "--backend", "torch"], "no embeddings"),
    ]
    for argv, needle in cases:
        code, _, err = run(capsys, *argv)
        assert code == EXIT_ERROR and one_error_line(err) and needle in err, (argv, err)
    assert not (tmp_path / "out").exists()  # an empty input folder fails before anything is written


def test_version_help_defaults_and_global_options_after_the_subcommand(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"arrowvision {__version__}"
    code, out, _ = run(capsys, "embed", "--help")
    flat = " ".join(out.split())
    assert code == 0 and "(default 32; 256 on CUDA)" in flat and "(default: 1024)" in out and "(default: throughput)" in out
    code, out, _ = run(capsys, "--help")
    assert "130 interrupted" in out
    before = run(capsys, "-v", "info", DEMO, "--json")
    after = run(capsys, "info", "--weights", DEMO, "-v", "--json")  # --weights and -v after the subcommand
    assert before[0] == after[0] == 0
    first, second = json.loads(before[1]), json.loads(after[1])
    first.pop("load_ms"), second.pop("load_ms")
    assert first == second


def test_info_is_plain_text_or_json(capsys):
    code, out, _ = run(capsys, "info", DEMO, "--verify")
    assert code == 0 and "checksums: verified" in out
    assert "{" not in out and "'" not in out  # no Python reprs
    build_path = WeightLoader(DEMO).source["path"]  # the converter's temp folder, meaningless to users
    assert build_path.startswith(tempfile.gettempdir()) and build_path not in out  # (the checkout itself may live in /tmp)
    code, out, _ = run(capsys, "info", DEMO, "--json")
    report = json.loads(out)
    assert report["family"] == "siglip" and report["vision_config"]["hidden_size"] == 128
    assert "path" not in report["source"]


def test_bench_json_states_runs_and_implicit_demo_model_warns(capsys):
    code, out, err = run(capsys, "bench", "--backend", "torch", "--batch-sizes", "1 2", "--iters", "2", "--json",
                         "--no-progress")
    assert code == 0, err
    assert "warning: no --weights given" in err and "random-init demo model" in err
    report = json.loads(out)
    assert report["timed_runs"] == 2 and report["warmup_runs"] == 1 and report["backend"] == "torch"
    assert [row["batch"] for row in report["results"]] == [1, 2]
    for row in report["results"]:  # img/s from the timed batches: batch / mean latency
        assert row["img_per_s"] == pytest.approx(row["batch"] * 1000 / row["mean_ms"], rel=1e-6)
    code, out, err = run(capsys, "bench", "--weights", DEMO, "--backend", "torch", "--batch-sizes", "1", "--iters", "1",
                         "--no-progress")
    assert code == 0 and "warning" not in err and "1 timed runs per batch size after 1 warm-up" in out


def test_validate_json(capsys):
    code, out, err = run(capsys, "validate", "--weights", DEMO, "--backend", "torch", "--images", SAMPLES / "horse.jpg",
                         SAMPLES / "coffee.jpg", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] is True and report["images"] == 2
    assert [row["name"] for row in report["comparisons"]] == ["torch vs transformers"]


def test_serve_on_a_busy_port_is_one_error_line_exit_1(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run(capsys, "serve", "--weights", DEMO, "--backend", "torch", "--port", port)
    assert code == EXIT_ERROR and one_error_line(err) and "in use" in err


def test_serve_quiet_turns_the_access_log_off(capsys, monkeypatch):
    import arrowvision.service.app as service

    calls = []
    monkeypatch.setattr(service, "serve", lambda encoder, **kwargs: calls.append(kwargs))
    for extra in ([], ["--quiet"]):
        code, _, err = run(capsys, "serve", "--weights", DEMO, "--backend", "torch", "--port", "0", *extra)
        assert code == 0, err
    assert [call["access_log"] for call in calls] == [True, False]
    calls[0]["sock"].close(), calls[1]["sock"].close()


def test_the_ir_made_by_export_is_the_one_embed_uses(capsys, tmp_path):
    """--calibration and --cache-dir reach every command that may export: no second export."""
    cache = tmp_path / "cache"
    calibration = [SAMPLES / "horse.jpg", SAMPLES / "coffee.jpg", SAMPLES / "rocket.jpg"]
    code, out, err = run(capsys, "export", DEMO, "--precision", "int8", "--calibration", *calibration, "--cache-dir", cache,
                         "--min-cosine", "0.5", "--no-progress")
    assert code == 0, err
    entries = sorted((cache / "ir").glob("*/meta.json"))
    assert len(entries) == 1 and str(entries[0].parent / "model.xml") in out
    code, out, err = run(capsys, "embed", SAMPLES, "-o", tmp_path / "E", "--weights", DEMO, "--backend", "openvino",
                         "--precision", "int8", "--calibration", *calibration, "--cache-dir", cache, "--min-cosine", "0.5")
    assert code == 0, err
    assert sorted((cache / "ir").glob("*/meta.json")) == entries  # reused, not exported again
    assert "exporting" not in err and "7 embedded" in out
