"""The Ray engine of ``arrowvision embed`` (Ray Data actor pool), on a real local Ray cluster:
the same dataset as the local engine, error rows, resume in both directions, a killed actor,
the CLI, and a two-node cluster (``ray.cluster_utils.Cluster``) in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arrowvision import VisionEncoder
from arrowvision.datasets.pipeline import collect_inputs, embed_paths, read_embeddings

from .raykit import ray_cluster  # noqa: F401 (fixture)

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"


def cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arrowvision", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> tuple[Path, list[str], list[str]]:
    """Real photos in nested folders, small generated images, and broken files."""
    folder = tmp_path_factory.mktemp("ray_corpus")
    (folder / "nested").mkdir()
    good = []
    for i, (name, photo) in enumerate(photos.items()):
        target = folder / ("nested" if i % 2 else "") / f"{name}.jpg"
        Image.fromarray(photo).save(target, "JPEG")
        good.append(str(target))
    rng = np.random.default_rng(0)
    for i in range(20):
        target = folder / "nested" / f"noise-{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (24 + i, 40, 3), np.uint8)).save(target)
        good.append(str(target))
    bad = {"empty.jpg": b"", "garbage.png": os.urandom(300), "text.jpeg": b"hello\n"}
    for name, payload in bad.items():
        (folder / name).write_bytes(payload)
    return folder, sorted(good), sorted(str(folder / n) for n in bad)


@pytest.fixture(scope="module")
def encoder(module_cache) -> VisionEncoder:
    return VisionEncoder.from_parquet(DEMO, backend="openvino")  # exports the IR the actors then share


def ray_embed(paths, output, **options):
    from arrowvision.distributed.data import embed_paths_ray

    options = {"batch_size": 4, "chunk_size": 8, "progress": False, **options}
    return embed_paths_ray(DEMO, paths, output, backend="openvino", **options)


def rows(folder: Path) -> dict[str, dict]:
    table = read_embeddings(folder)
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)), "a path was written twice"
    return {row["path"]: row for row in table.to_pylist()}


def test_core_never_imports_ray():
    code = textwrap.dedent("""
        import sys
        import arrowvision, arrowvision.cli, arrowvision.datasets.pipeline, arrowvision.datasets.writer, arrowvision.service.app
        from arrowvision.cli import build_parser
        build_parser().parse_args(["embed", "x", "-o", "y", "--engine", "ray"])
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "arrowvision.distributed")))
        print(loaded)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout


def test_same_dataset_as_the_local_engine(tmp_path, corpus, encoder, ray_cluster):
    folder, good, bad = corpus
    paths = collect_inputs(str(folder))
    stats = ray_embed(paths, tmp_path / "ray", root=folder, actors=2)
    local = embed_paths(encoder, paths, tmp_path / "local", batch_size=4, chunk_size=8, root=folder, progress=False)
    assert (stats.embedded, stats.failed) == (local.embedded, local.failed) == (len(good), len(bad))
    ray_rows, local_rows = rows(tmp_path / "ray"), rows(tmp_path / "local")
    assert sorted(ray_rows) == sorted(local_rows) == good
    for path, row in ray_rows.items():
        other = local_rows[path]
        assert {k: row[k] for k in ("relpath", "width", "height", "sha256")} == \
               {k: other[k] for k in ("relpath", "width", "height", "sha256")}
        assert np.abs(np.asarray(row["embedding"]) - np.asarray(other["embedding"])).max() < 1e-5
    # same layout: chunks of exactly chunk_size rows (the last fewer), errors under _errors/, same schema
    parts = sorted((tmp_path / "ray").glob("part-*.parquet"))
    counts = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    assert set(counts[:-1]) == {8} and 0 < counts[-1] <= 8 and sum(counts) == len(good), counts
    assert pq.read_schema(parts[0]) == pq.read_schema(sorted((tmp_path / "local").glob("part-*.parquet"))[0])
    errors = pq.read_table(tmp_path / "ray" / "_errors").to_pydict()
    assert sorted(errors["path"]) == bad and all(errors["error"])
    assert stats.actors == 2 and sum(stats.nodes.values()) == len(paths) and stats.actor_start_seconds > 0
    assert stats.threads == [1]  # OpenVINO's INFERENCE_NUM_THREADS = the 1 CPU Ray gave each actor


def test_resume_across_engines_in_both_directions(tmp_path, corpus, encoder, ray_cluster):
    folder, good, bad = corpus
    paths = collect_inputs(str(folder))
    half = paths[: len(paths) // 2]
    # local first (half the corpus), then ray on everything: ray does only the rest
    embed_paths(encoder, half, tmp_path / "a", batch_size=4, chunk_size=8, root=folder, progress=False)
    stats = ray_embed(paths, tmp_path / "a", root=folder)
    half_done = sum(p in good for p in half)
    assert stats.skipped == half_done and stats.embedded == len(good) - half_done
    assert sorted(rows(tmp_path / "a")) == good
    # ray first, stopped after its first batch, then local finishes: every image exactly once
    stop = threading.Event()
    stopped = ray_embed(paths, tmp_path / "b", root=folder, on_batch=lambda batch: stop.set(), stop=stop)
    assert stopped.interrupted and 0 < stopped.embedded + stopped.failed < len(paths)
    resumed = embed_paths(encoder, paths, tmp_path / "b", batch_size=4, chunk_size=8, root=folder, progress=False)
    assert resumed.skipped == stopped.embedded and resumed.embedded == len(good) - stopped.embedded
    assert sorted(rows(tmp_path / "b")) == good
    # and nothing is left for either engine
    assert ray_embed(paths, tmp_path / "b", root=folder, skip_failed=True).embedded == 0


def test_a_killed_actor_costs_a_retry_not_data(tmp_path, encoder, ray_cluster):
    rng = np.random.default_rng(1)
    images = []
    for i in range(96):
        path = tmp_path / "in" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(path)
        images.append(str(path))
    killed: list[int] = []

    def kill_first_actor(batch) -> None:
        if not killed:
            killed.append(int(batch["pid"][0]))
            os.kill(killed[0], signal.SIGKILL)

    stats = ray_embed(images, tmp_path / "out", batch_size=2, actors=2, on_batch=kill_first_actor)
    assert killed and stats.embedded == len(images) and stats.failed == 0
    assert sorted(rows(tmp_path / "out")) == sorted(images)  # every image exactly once
    pids = {int(worker.split("/")[1]) for worker in stats.workers}
    assert killed[0] in pids and len(pids) >= 3, stats.workers  # the killed actor was replaced by a new process


def test_actors_that_cannot_load_the_model_fail_with_one_clear_error(tmp_path, corpus, ray_cluster):
    from arrowvision.errors import ArrowVisionError

    folder, _, _ = corpus
    with pytest.raises(ArrowVisionError, match=r"the Ray job failed \(.*unexpected keyword argument 'bogus'.*rerun to resume"):
        ray_embed(collect_inputs(str(folder)), tmp_path / "out", backend_options={"bogus": 1})


def test_cli_joins_a_cluster_and_reads_uris(tmp_path, corpus, module_cache, ray_cluster):
    """``--address``: the run's cluster (starting a local one is test_ray_serve's CLI test)."""
    folder, good, bad = corpus
    out = tmp_path / "out"
    address = ray_cluster.get_runtime_context().gcs_address
    run = cli("embed", f"file://{folder}", "-o", str(out), "--weights", str(DEMO), "--engine", "ray", "--actors", "1",
              "--batch-size", "8", "--no-progress", "--address", address)
    assert run.returncode == 3, run.stderr  # finished, some inputs failed
    assert f"{len(good)} embedded" in run.stdout and f"{len(bad)} failed" in run.stdout, run.stdout
    assert "ray: 1 actors" in run.stdout and "per node: " in run.stdout
    assert sorted(rows(out)) == good
    assert rows(out)[good[0]]["relpath"] == os.path.relpath(good[0], folder)


def test_ray_options_are_refused_with_the_local_engine(tmp_path, corpus):
    folder, _, _ = corpus
    run = cli("embed", str(folder), "-o", str(tmp_path / "o"), "--address", "auto")
    assert run.returncode == 2 and "--address applies to --engine ray only" in run.stderr


TWO_NODES = """
import json, subprocess, sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                        "object_store_memory": 100 * 1024 * 1024})
cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
cluster.wait_for_nodes()
try:
    run = subprocess.run([sys.executable, "-m", "arrowvision", "embed", *sys.argv[1:], "--engine", "ray",
                          "--address", cluster.address, "--actors", "2", "--no-progress"],
                         capture_output=True, text=True, timeout=400)
    print(json.dumps({"returncode": run.returncode, "stdout": run.stdout, "stderr": run.stderr[-3000:]}))
finally:
    cluster.shutdown()
"""


@pytest.mark.slow
def test_work_lands_on_both_nodes_of_a_two_node_cluster(tmp_path, corpus, module_cache):
    folder, good, bad = corpus
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", TWO_NODES, str(folder), "-o", str(out), "--weights", str(DEMO),
                          "--batch-size", "2"], capture_output=True, text=True, timeout=500,
                         # Ray Data dispatches as soon as ONE actor is ready: on a loaded machine the first
                         # could embed all 27 images before the second loads; wait for the whole pool.
                         env={**os.environ, "RAY_ADDRESS": "", "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["returncode"] == 3, result
    per_node = [line for line in result["stdout"].splitlines() if line.startswith("per node: ")]
    assert per_node, result["stdout"]
    counts = [int(part.rsplit(" ", 1)[1]) for part in per_node[0].removeprefix("per node: ").split(", ")]
    assert len(counts) == 2 and min(counts) > 0 and sum(counts) == len(good) + len(bad), per_node
    assert sorted(rows(out)) == good


def test_file_names_that_are_not_utf8_are_rows_on_ray_too(tmp_path, corpus, ray_cluster):
    folder, good, _ = corpus
    odd = tmp_path.resolve() / "odd"
    odd.mkdir()
    latin1, broken = os.fsencode(odd) + b"/caf\xe9.jpg", os.fsencode(odd) + b"/bad\xff.jpg"
    Path(os.fsdecode(latin1)).write_bytes(Path(good[0]).read_bytes())
    Path(os.fsdecode(broken)).write_bytes(b"not an image")
    stats = ray_embed(collect_inputs(str(odd)), tmp_path / "out", root=odd)
    assert (stats.embedded, stats.failed) == (1, 1)
    assert list(rows(tmp_path / "out")) == [f"{odd}/caf\\xe9.jpg"]  # valid UTF-8, the byte written \xe9
    errors = pq.read_table(tmp_path / "out" / "_errors").to_pydict()
    assert errors["path"] == [f"{odd}/bad\\xff.jpg"] and errors["error"][0].startswith(errors["path"][0])
