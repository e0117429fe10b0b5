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


@pytest.fixture(scope="module")
def tower_all(tmp_path_factory) -> Path:
    from arrowvision.model.convert import convert

    from .textkit import save_full_checkpoint

    folder = save_full_checkpoint(tmp_path_factory.mktemp("full"), "siglip", seed=5)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    return folder


def test_info_counts_parameters_per_tower_and_describes_the_text_tower(capsys, tower_all, tmp_path, monkeypatch):
    import transformers as tf

    from arrowvision.backends import auto

    monkeypatch.setenv("ARROWVISION_CACHE", str(tmp_path / "cache"))
    weights = tower_all / "all.parquet"
    code, out, err = run(capsys, "info", weights, "--json")
    assert code == 0, err
    report = json.loads(out)
    expected = sum(p.numel() for p in tf.SiglipModel.from_pretrained(tower_all).parameters())
    assert report["parameters"] == expected  # the tokenizer's bytes are not parameters
    towers = report["parameters_by_tower"]
    assert set(towers) == {"vision", "text", "shared"} and sum(towers.values()) == expected and towers["shared"] == 2
    assert report["tokenizer"]["bytes"] > 0 and "spiece.model" in report["tokenizer"]["files"]
    assert report["text_config"]["family"] == "siglip" and report["text_config"]["num_layers"] >= 1
    assert report["auto_choice"] is None and report["exports"] == []
    code, out, _ = run(capsys, "info", weights)
    assert code == 0 and f"parameters: {expected:,} (vision {towers['vision']:,}, text {towers['text']:,}, shared 2)" in out
    assert "\n       text: vocab " in out and "not parameters" in out
    # measured auto choice and cached exports are fields, not prose
    loaded = WeightLoader(weights)
    record = {"backend": "openvino", "precision": "fp32", "cpu": "Some CPU", "min_cosine": 0.99, "measured_at": "2026-01-01T00:00:00Z"}
    path = auto.choice_path(loaded, auto.DEFAULT_MIN_COSINE, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "candidates": []}))
    assert run(capsys, "export", weights, "--no-progress")[0] == 0
    code, out, err = run(capsys, "info", weights, "--json")
    report = json.loads(out)
    assert report["auto_choice"] == record
    [export] = report["exports"]
    assert export["format"] == "openvino" and export["precision"] == "fp32" and export["tower"] == "vision"
    assert export["max_abs"] is None and export["min_cosine_by_kind"] is None and Path(export["path"]).is_dir()
    assert "exports: openvino fp32: exact (fp32)" in run(capsys, "info", weights)[1]


@pytest.mark.parametrize("argv,needle,command", [
    (["search", "E"], "search needs a query image or --text", "search"),
    (["embed", "x", "-o", "y", "--batchsize", "3"], "unrecognized arguments: --batchsize 3 (did you mean --batch-size?)", "embed"),
    (["info", DEMO, "--jsn"], "(did you mean --json?)", "info"),
    (["classify", "x.jpg", "--labels", "a,b"], "converted with --tower all (the bundled demo model has no text tower)", "classify"),
    (["score", "pairs.csv", "-o", "out.csv"], "converted with --tower all", "score"),
])
def test_usage_errors_point_at_the_subcommands_help(capsys, argv, needle, command):
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE and out == ""
    assert one_error_line(err) and needle in err and err.rstrip().endswith(f"(see arrowvision {command} --help)")


def test_text_commands_say_they_need_text_weights(capsys):
    for command in ("classify", "score"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "required: the bundled demo model has no text tower" in " ".join(out.split())


GLUED = """
import logging, sys
from tqdm import tqdm
from arrowvision import cli
from arrowvision.cli import weights

def noisy_info(args):
    bar = tqdm(total=3, desc="working", file=sys.stderr)
    bar.update(1)
    logging.getLogger("arrowvision").warning("needs your attention")
    bar.update(2)
    bar.close()
    return 0

weights.cmd_info = noisy_info
sys.exit(cli.main(["info", sys.argv[1]]))
"""


def test_log_lines_are_not_glued_onto_progress_bars():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", GLUED, str(DEMO)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pieces = result.stderr.replace("\r", "\n").splitlines()
    [line] = [piece for piece in pieces if "needs your attention" in piece]
    assert line.startswith("WARNING arrowvision: needs your attention"), result.stderr


def test_passing_validations_and_auto_rows_are_info_a_failing_one_a_warning(caplog, monkeypatch, tiny_siglip_parquet):
    import logging

    import numpy as np

    from arrowvision import BackendError
    from arrowvision.backends import auto
    from arrowvision.backends.validation import validate_lossy

    reference = {"photos": np.eye(4, dtype=np.float32)}
    with caplog.at_level(logging.INFO, logger="arrowvision"):
        validate_lossy("openvino", "int8", lambda batch: batch, reference, reference, 0.99)
        with pytest.raises(BackendError, match="too inaccurate"):
            validate_lossy("openvino", "int8", lambda batch: batch[:, ::-1].copy(), reference, reference, 0.99)
    assert [r.levelno for r in caplog.records if "export: cosine" in r.getMessage()] == [logging.INFO, logging.WARNING]
    caplog.clear()

    class Fast:
        report = {"min_cosine": 1.0}

        def __call__(self, pixels):
            return pixels.reshape(len(pixels), -1)[:, :8]

    def build(name, weights, **options):
        if name == "onnxruntime":
            raise BackendError("onnxruntime is not installed")
        return Fast()

    monkeypatch.setattr(auto, "candidates", lambda cpu: [("torch", "fp32"), ("onnxruntime", "int8")])
    with caplog.at_level(logging.INFO, logger="arrowvision"):
        record = auto.measure(WeightLoader(tiny_siglip_parquet), build=build, min_cosine=0.99, cache_dir=None)
    assert record["backend"] == "torch"
    rows = [r for r in caplog.records if r.getMessage().startswith("auto: ")]
    assert len(rows) == 2 and all(r.levelno == logging.INFO for r in rows)
