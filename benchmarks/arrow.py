#!/usr/bin/env python3
"""Arrow in, Arrow out: every Arrow path vs `embed` over the same images as files, vs the peers.

Table: ``--rows`` JPEGs (640x480, real photos at several crops and qualities) as a Parquet
``binary`` column. Model: base SigLIP-B/16-224 (random init, every norm/bias perturbed; both
towers, saved as a hub folder with its processor so the peers load the very same weights), ours
on the default backend (OpenVINO fp32, the exact path) and, with ``--auto``, on ``auto``.

Ours: ``embed`` over files (the baseline), ``encode_arrow``, DuckDB (``embed_image`` in SQL),
polars (a lazy query), pyarrow compute (``pc.call_function``) and ``embed --column`` (its code,
``arrowvision.datasets.table.embed_table``). Rounds interleave the paths; medians and p95 of img/s.
Peers, on ``--peer-rows`` rows: LanceDB's ``siglip`` embedding function and Daft's
``embed_image`` (transformers provider), each given the local model folder; a peer that cannot
run here prints why. ``--rss-gb`` also runs ``arrowvision embed --column`` over a Parquet file of
that size (demo model; decoding and streaming are what it measures) and reports its peak RSS
against the same process with the model loaded and one batch embedded.

    python benchmarks/arrow.py [--rows 2000] [--rounds 3] [--peer-rows 200] [--auto] [--rss-gb 1.0]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
WORK = HERE / ".cache"
BASE_VISION = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
                   patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


def model_folder() -> tuple[Path, Path]:
    """A base SigLIP hub folder (model + processor) and our Parquet of it (both towers)."""
    import torch
    import transformers as tf

    from arrowvision.model.convert import convert
    from tests.textkit import train_spiece

    folder, parquet = WORK / "siglip-base-full", WORK / "siglip-base-full.parquet"
    if not (folder / "model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        train_spiece(folder)
        torch.manual_seed(0)
        text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
                    projection_size=768)
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=BASE_VISION, text_config=text)).eval()
        with torch.no_grad():  # HF init leaves norms at 1/0 and biases at 0
            for name, param in model.named_parameters():
                if "norm" in name or name.endswith("bias") or "probe" in name:
                    param.add_(0.05 * torch.randn_like(param))
        model.save_pretrained(folder)
        processor = tf.SiglipProcessor(tf.SiglipImageProcessor(size={"height": 224, "width": 224}),
                                       tf.SiglipTokenizer(str(folder / "spiece.model")))
        processor.save_pretrained(folder)
    if not parquet.exists():
        convert(str(folder), parquet, tower="all", progress=False)
    return folder, parquet


def jpeg_table(rows: int):
    """(table with an ``image`` binary column, the same bytes) of 640x480 JPEGs."""
    import pyarrow as pa
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    images = []
    for i in range(rows):
        photo = photos[i % len(photos)]
        top, left = int(rng.integers(0, 40)), int(rng.integers(0, 40))
        crop = Image.fromarray(photo[top:, left:]).resize((640, 480))
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=int(rng.integers(80, 96)))
        images.append(buffer.getvalue())
    return pa.table({"id": pa.array(range(rows), pa.int64()), "image": pa.array(images, pa.binary())}), images


def measure(name: str, count: int, run, results: dict[str, list[float]]) -> None:
    start = time.perf_counter()
    run()
    results.setdefault(name, []).append(count / (time.perf_counter() - start))


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 5))  # img/s: the slow tail is the low 5%


def ours(args, parquet: Path, work: Path, table, files: list[str], backend: str) -> dict[str, list[float]]:
    import duckdb
    import polars as pl
    import pyarrow.compute as pc

    import arrowvision.compute
    import arrowvision.duckdb
    import arrowvision.polars as avp
    from arrowvision import VisionEncoder
    from arrowvision.datasets.pipeline import embed_paths
    from arrowvision.datasets.table import embed_table
    from arrowvision.engine_models import shared_model

    options = dict(backend=backend, batch_size=args.batch_size)
    model = shared_model(parquet, **options)  # the adapters' model: the same one for all of them
    encoder: VisionEncoder = model.encoder
    shard = work / "shard.parquet"
    con = duckdb.connect()
    arrowvision.duckdb.register(con, parquet, text_name=None, **options)
    arrowvision.compute.register(parquet, name=f"bench_embed_{backend}", **options)
    encoder.encode_arrow(table["image"].slice(0, args.batch_size))  # warm-up
    results: dict[str, list[float]] = {}
    n = table.num_rows
    for round_ in range(args.rounds):
        out = work / f"{backend}-{round_}"
        measure("embed (files)", n, lambda: embed_paths(encoder, files, out / "files", batch_size=args.batch_size,
                                                        progress=False), results)
        measure("encode_arrow", n, lambda: encoder.encode_arrow(table["image"], batch_size=args.batch_size), results)
        measure("DuckDB", n, lambda: con.sql(f"SELECT embed_image(image) FROM '{shard}'").fetchnumpy(), results)
        measure("polars", n, lambda: pl.scan_parquet(shard).select(avp.embed_image("image", parquet, **options)).collect(),
                results)
        measure("pyarrow compute", n, lambda: pc.call_function(f"bench_embed_{backend}", [table["image"]]), results)
        measure("embed --column", n, lambda: embed_table(encoder, str(shard), out / "column", column="image",
                                                         batch_size=args.batch_size, progress=False), results)
    return results


def lancedb_peer(folder: Path, images: list[bytes], patched: bool = False) -> float:
    """LanceDB's ``siglip`` function as shipped; ``patched``: its one transformers-5 break fixed
    (``get_image_features`` now returns an output object: its ``pooler_output`` is the tensor)."""
    import pyarrow as pa
    from lancedb.embeddings import get_registry

    function = get_registry().get("siglip").create(model_name=str(folder))
    if patched:
        model = function._model
        plain = model.get_image_features

        def image_features(*args, **kwargs):
            output = plain(*args, **kwargs)
            return getattr(output, "pooler_output", output)

        model.get_image_features = image_features
    function.compute_source_embeddings(pa.array(images[:4]))  # warm-up
    start = time.perf_counter()
    function.compute_source_embeddings(pa.array(images))
    return len(images) / (time.perf_counter() - start)


def daft_peer(folder: Path, images: list[bytes]) -> float:
    import daft
    from daft.functions import embed_image

    frame = daft.from_pydict({"image": images})
    frame = frame.select(embed_image(frame["image"].decode_image(), provider="transformers", model=str(folder)))
    start = time.perf_counter()
    frame.collect()
    return len(images) / (time.perf_counter() - start)


def peers(args, folder: Path, images: list[bytes]) -> dict[str, tuple[float | None, str]]:
    found: dict[str, tuple[float | None, str]] = {}
    runs = (("LanceDB siglip", lancedb_peer), ("LanceDB siglip, patched", lambda f, i: lancedb_peer(f, i, patched=True)),
            ("Daft embed_image", daft_peer))
    for name, run in runs:
        try:
            found[name] = (run(folder, images[: args.peer_rows]), "")
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here says why
            found[name] = (None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
    if found["Daft embed_image"][0] is None and "daft[transformers]" in found["Daft embed_image"][1]:
        found["Daft embed_image"] = (None, found["Daft embed_image"][1] + " (daft[transformers] requires torch<2.13.0 and "
                                     "torchvision; this environment pins torch 2.13.0 CPU and must not install another torch)")
    return found


def peak_rss(args, work: Path) -> None:
    """``embed --column`` over a >= ``--rss-gb`` Parquet file vs the model alone, both subprocesses."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    demo = ROOT / "weights" / "siglip-demo-random.parquet"
    rng = np.random.default_rng(1)
    distinct = []
    for _ in range(64):  # noisy 640x480 JPEGs (~200 KB): the file is large with few encodes
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)).save(buffer, format="JPEG", quality=95)
        distinct.append(buffer.getvalue())
    rows = int(args.rss_gb * 1e9 / np.mean([len(b) for b in distinct])) + 1
    big = work / "big.parquet"
    with pq.ParquetWriter(big, pa.schema([("id", pa.int64()), ("image", pa.binary())]), use_dictionary=False,
                          compression="none") as writer:
        for start in range(0, rows, 512):
            ids = range(start, min(rows, start + 512))
            writer.write_table(pa.table({"id": pa.array(ids, pa.int64()), "image": [distinct[i % 64] for i in ids]}),
                               row_group_size=512)  # ~180 MB row groups: Arrow reads one at a time
    size = big.stat().st_size
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    model_only = ("import arrowvision, pyarrow.parquet as pq; e = arrowvision.VisionEncoder.from_parquet(%r, backend='openvino'); "
                  "e.encode_arrow(next(pq.ParquetFile(%r).iter_batches(batch_size=32)).column('image'))") % (str(demo), str(big))
    embed = ("import sys, runpy; sys.argv = ['arrowvision', 'embed', %r, '--column', 'image', '--weights', %r, "
             "'--backend', 'openvino', '-o', %r, '--no-progress']\ntry:\n    runpy.run_module('arrowvision', run_name='__main__')\n"
             "except SystemExit as exit:\n    print('exit', exit.code, file=sys.stderr)") % (str(big), str(demo), str(work / "big-out"))
    # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's, which holds the base model)
    own_peak = "\nprint([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    subprocess.run([sys.executable, "-c", model_only], env=env, check=True, capture_output=True)  # export the IR once
    base = int(subprocess.run([sys.executable, "-c", model_only + own_peak], capture_output=True, text=True, env=env,
                              check=True).stdout.split()[-1])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", embed + own_peak], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    peak = int(done.stdout.split()[-1])
    print(f"\nembed --column over {size / 1e9:.2f} GB ({rows} rows of ~{size / rows / 1e3:.0f} KB, row groups of 512 rows, demo model): "
          f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}, {seconds:.0f} s, {rows / seconds:.0f} img/s")
    print(f"peak RSS {peak / 1024:.0f} MB vs model loaded + one batch {base / 1024:.0f} MB: "
          f"+{(peak - base) / 1024:.0f} MB (target <= +400 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--peer-rows", type=int, default=200, help="rows given to each peer (they are slow)")
    parser.add_argument("--auto", action="store_true", help="also measure encode_arrow on backend auto (first use measures)")
    parser.add_argument("--rss-gb", type=float, default=1.0, help="size of the RSS test's Parquet file (0: skip)")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from arrowvision.backends.cpu import cpu_info

    os.environ.setdefault("ARROWVISION_CACHE", str(WORK / "arrowvision-cache"))
    folder, parquet = model_folder()
    work = Path(tempfile.mkdtemp(prefix="arrowvision-arrow-bench-"))
    try:
        table, images = jpeg_table(args.rows)
        pq.write_table(table, work / "shard.parquet")
        (work / "files").mkdir()
        files = []
        for i, data in enumerate(images):
            files.append(str(work / "files" / f"{i:05d}.jpg"))
            Path(files[-1]).write_bytes(data)
        print(f"cpu: {cpu_info().describe()}")
        print(f"SigLIP-B/16-224 (random, perturbed), {args.rows} JPEGs 640x480 in one Parquet binary column, "
              f"batch {args.batch_size}, {args.rounds} rounds, {os.cpu_count()} CPUs visible")
        results = ours(args, parquet, work, table, files, "openvino")
        baseline = statistics.median(results["embed (files)"])
        print(f"\n{'path (openvino fp32, exact)':32s} {'median img/s':>12s} {'p95 img/s':>10s} {'vs files':>9s}")
        for name, rates in results.items():
            print(f"{name:32s} {statistics.median(rates):12.1f} {p95(rates):10.1f} {statistics.median(rates) / baseline:8.0%}")
        auto_rate = None
        if args.auto:
            from arrowvision.engine_models import shared_model

            model = shared_model(parquet, backend="auto")
            print(f"auto chose: {model.encoder.backend.name} {getattr(model.encoder.backend, 'precision', '')}")
            model.embed(table["image"].slice(0, 32))
            rates = []
            for _ in range(args.rounds):
                measure("auto", table.num_rows, lambda: model.embed(table["image"]), (box := {}))
                rates += box["auto"]
            auto_rate = statistics.median(rates)
            print(f"{'encode_arrow (auto)':32s} {auto_rate:12.1f} {p95(rates):10.1f} {auto_rate / baseline:8.0%}")
        found = peers(args, folder, images)
        ours_rate = statistics.median(results["encode_arrow"])
        print(f"\npeers on {min(args.peer_rows, args.rows)} rows, the same weights from the hub folder:")
        for name, (rate, why) in found.items():
            print(f"  {name:20s} " + (f"{rate:8.1f} img/s" if rate else f"cannot run here: {why}"))
        rates = [rate for rate, _ in found.values() if rate]
        if rates:
            best = max(rates)
            print(f"encode_arrow (exact default) vs the faster peer: {ours_rate / best:.2f}x (target >= 2x)")
            if auto_rate:
                print(f"encode_arrow (auto) vs the faster peer: {auto_rate / best:.2f}x")
        if args.rss_gb > 0:
            peak_rss(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
