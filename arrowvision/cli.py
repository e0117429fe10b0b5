"""The ``arrowvision`` command line: one console script, one subcommand per job.

Errors print one line and exit non-zero; ``-v`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from .backends import BACKENDS, PRECISIONS
from .errors import ArrowVisionError

EXIT_ERROR = 1
EXIT_PARTIAL = 3  # the job finished but some inputs failed (see the errors table)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a HF SigLIP/CLIP checkpoint to a Parquet weights file")
    p.add_argument("source", help="hub id (google/siglip-base-patch16-224), local folder, or .safetensors/.bin file")
    p.add_argument("output", help="output .parquet path")
    p.add_argument("--tower", choices=["vision", "text", "all"], default="vision")
    p.add_argument("--dtype", choices=["keep", "float32", "float16", "bfloat16"], default="keep")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--config", help="config.json for a single weights file (default: next to it)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert, format_summary

    summary = convert(
        args.source, args.output, tower=args.tower, dtype=args.dtype, revision=args.revision,
        config_path=args.config, progress=not args.no_progress,
    )
    print(format_summary(summary))
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a Parquet weights file")
    p.add_argument("weights")
    p.add_argument("--verify", action="store_true", help="recompute every tensor checksum")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from collections import Counter

    from .config import VisionConfig
    from .format import WeightLoader

    start = time.perf_counter()
    weights = WeightLoader(args.weights, verify=args.verify)
    elapsed = time.perf_counter() - start
    dtypes = Counter(info.dtype for info in weights.tensors())
    parameters = sum(math.prod(info.shape) for info in weights.tensors())
    try:
        vision = VisionConfig.from_hf(weights.config).to_dict()
    except ArrowVisionError as exc:
        vision = {"error": str(exc)}
    report = {
        "path": str(weights.path),
        "family": weights.family,
        "tower": weights.tower,
        "tensors": len(weights),
        "parameters": parameters,
        "bytes": weights.nbytes,
        "dtypes": dict(dtypes),
        "zero_copy": weights.zero_copy,
        "weights_checksum": weights.checksum,
        "checksums": "verified" if args.verify else "not verified (use --verify)",
        "source": weights.source,
        "vision_config": vision,
        "auto_choice": _auto_choice(weights),
        "exports": _export_summaries(weights),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if isinstance(value, list):  # one line per item
            print(f"{key:>16}: {value[0] if value else 'none cached'}")
            for item in value[1:]:
                print(f"{'':>16}  {item}")
        else:
            print(f"{key:>16}: {value}")
    print(f"{'load time':>16}: {elapsed * 1000:.1f} ms")
    return 0


def _auto_choice(weights) -> str:
    """What ``--backend auto`` runs for this model on this CPU, if it was measured already."""
    try:
        from .backends.auto import remembered_choice

        record = remembered_choice(weights)
    except ArrowVisionError as exc:
        return f"unknown ({exc})"
    if record is None:
        return "not measured on this CPU yet (the first --backend auto use measures it)"
    return f"{record['backend']} {record['precision']} on {record['cpu']}"


def _export_summaries(weights) -> list[str]:
    """Cached exports of this model and their held-out accuracy per kind (min cosine vs fp32)."""
    from .backends.artifacts import cached_exports

    lines = []
    for meta in cached_exports(weights.checksum):
        kinds = meta.get("by_kind")
        accuracy = (", ".join(f"{k} {v['min_cosine']:.4f}" for k, v in kinds.items()) if kinds
                    else f"max abs {meta['max_abs']:.1e}" if "max_abs" in meta else "exact (fp32)")
        lines.append(f"{meta['format']} {meta['precision']}: {accuracy}")
    return lines


DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "siglip-demo-random.parquet"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="embed the bundled sample photos with the bundled default model")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="Parquet weights (default: bundled demo model)")
    p.add_argument("--backend", choices=["default", *BACKENDS], default="default",
                   help="default: openvino fp32 if installed, else torch; auto: the fastest validated choice for this CPU")
    p.set_defaults(func=cmd_demo)


def resolve_backend(name: str) -> str:
    """``default``: OpenVINO (exact fp32) when it is installed, else the torch reference.
    ``auto`` (measured per CPU, possibly lossy within --min-cosine) is chosen by name only."""
    if name != "default":
        return name
    import importlib.util

    return "openvino" if importlib.util.find_spec("openvino") else "torch"


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .encoder import VisionEncoder

    backend = resolve_backend(args.backend)
    start = time.perf_counter()
    encoder = VisionEncoder.from_parquet(args.weights, backend=backend)
    loaded = time.perf_counter()
    images = sorted(SAMPLES_DIR.glob("*.jpg"))
    embeddings = encoder.encode(images)
    done = time.perf_counter()
    print(f"model   {args.weights} ({encoder.config.family}, {encoder.config.image_size}px, dim {encoder.embedding_dim})")
    exported = "" if getattr(encoder.backend, "cache_hit", True) else " (first use: exported to OpenVINO IR and cached)"
    print(f"backend {encoder.backend.name} {encoder.backend.precision}; load {1000 * (loaded - start):.0f} ms{exported}; "
          f"{len(images)} images embedded in {1000 * (done - loaded):.0f} ms")
    print(f"weights checksum {encoder.checksum}")
    names = [p.stem[:10] for p in images]
    print("\ncosine similarity (L2-normalized embeddings)")
    print(" " * 11 + " ".join(f"{n:>10}" for n in names))
    similarity = embeddings @ embeddings.T
    for name, row in zip(names, similarity):
        print(f"{name:>10} " + " ".join(f"{v:10.3f}" for v in row))
    print(f"\nfirst embedding, first 8 values: {np.array2string(embeddings[0, :8], precision=4)}")
    if Path(args.weights).resolve() == DEFAULT_WEIGHTS:
        print("note: the bundled model is random-init (no downloads here); convert a real one with\n"
              "  arrowvision convert google/siglip-base-patch16-224 weights/siglip-b16.parquet")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a weights file to OpenVINO IR in the cache (done automatically on first use) "
                       "or to a portable ONNX file")
    p.add_argument("weights")
    p.add_argument("--format", choices=["openvino", "onnx"], default="openvino",
                   help="openvino: IR into the cache; onnx: a validated .onnx file written to -o (fp32 or int8)")
    p.add_argument("-o", "--output", help="output .onnx path (--format onnx)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--calibration", nargs="+", metavar="IMAGE", help="images (or folders) to calibrate int8 on "
                   "(default: the bundled sample photos and grayscale/sketch renderings of them)")
    p.add_argument("--min-cosine", type=float, default=0.99, help="refuse a lossy export below this cosine on any held-out kind")
    p.add_argument("--cache-dir", help="default: $ARROWVISION_CACHE or the user cache dir")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_export)


def image_files(sources: list[str]) -> list[str]:
    """Expand each source (folder, glob, list file or image) the way `embed` does."""
    from .pipeline import collect_inputs

    return [path for source in sources for path in collect_inputs(source)]


def cmd_export(args: argparse.Namespace) -> int:
    from .format import WeightLoader

    start = time.perf_counter()
    weights = WeightLoader(args.weights)
    if args.format == "onnx":
        from .backends.onnx_export import save_onnx

        if not args.output:
            raise ArrowVisionError("--format onnx writes a file: give -o model.onnx")
        if args.calibration:
            raise ArrowVisionError("--calibration applies to OpenVINO int8 only (ONNX int8 is dynamically quantized)")
        report = save_onnx(weights, args.output, args.precision, cache_dir=args.cache_dir, min_cosine=args.min_cosine,
                           force=args.force)
        print(f"{args.precision} ONNX: {args.output} ({time.perf_counter() - start:.1f} s)")
    else:
        from .backends.artifacts import read_meta
        from .backends.openvino_backend import export

        calibration = image_files(args.calibration) if args.calibration else None
        entry = export(weights, args.precision, cache_dir=args.cache_dir, calibration=calibration,
                       min_cosine=args.min_cosine, force=args.force)
        report = read_meta(entry)
        print(f"{args.precision} IR: {entry / 'model.xml'} ({time.perf_counter() - start:.1f} s)")
    if "max_abs" in report:
        print(f"max abs diff vs fp32 torch reference on held-out images: {report['max_abs']:.2e}")
    if "by_kind" in report:
        print(f"accuracy vs fp32 torch reference on {report['validation_images']} held-out images: "
              f"min cosine {report['min_cosine']:.5f}, mean {report['mean_cosine']:.5f}")
        for kind, row in report["by_kind"].items():
            print(f"  {kind:<10} {row['images']:>3} images  min cosine {row['min_cosine']:.5f}  mean {row['mean_cosine']:.5f}")
    return 0


def _backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="Parquet weights (default: bundled demo model)")
    p.add_argument("--backend", choices=["default", *BACKENDS], default="default",
                   help="default: openvino fp32 if installed, else torch; auto: the fastest validated backend and "
                        "precision for this CPU (measured once, cached)")
    p.add_argument("--precision", choices=PRECISIONS, help="default fp32; auto picks its own")
    p.add_argument("--device", default="CPU", help="openvino device: CPU, GPU or AUTO (torch: cpu)")
    p.add_argument("--min-cosine", type=float, default=0.99, help="lossy precisions must reach this on every held-out kind")


def load_encoder(args: argparse.Namespace):
    from .encoder import VisionEncoder

    backend = resolve_backend(args.backend)
    options = {"precision": args.precision} if args.precision else {}
    if backend in ("openvino", "onnxruntime", "auto"):
        options["min_cosine"] = args.min_cosine
    if backend in ("openvino", "auto"):
        options["mode"] = getattr(args, "mode", "latency")
    device = args.device
    if backend == "torch":
        device = "cpu" if args.device.upper() == "CPU" else args.device
    encoder = VisionEncoder.from_parquet(args.weights, backend=backend, device=device, **options)
    if backend == "auto":
        print(f"auto: {encoder.backend.name} {encoder.backend.precision} (fastest validated on this CPU)", file=sys.stderr)
    return encoder


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed a folder, glob or list of images into a Parquet dataset (resumable)")
    p.add_argument("inputs", help="a folder (recursive), a quoted glob, or a .txt/.csv/.parquet list of paths")
    p.add_argument("-o", "--output", required=True, help="output dataset folder (part-*.parquet, errors-*.parquet)")
    _backend_options(p)
    p.add_argument("--mode", choices=["latency", "throughput"], default="throughput", help="openvino performance hint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per atomically written chunk")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--sketch", action="store_true", help="apply sketch normalization before embedding")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    from .pipeline import collect_inputs, embed_paths

    if args.batch_size < 1 or args.chunk_size < 1:
        raise ArrowVisionError("--batch-size and --chunk-size must be >= 1")
    paths = collect_inputs(args.inputs)
    encoder = load_encoder(args)
    stats = embed_paths(encoder, paths, args.output, batch_size=args.batch_size, chunk_size=args.chunk_size,
                        workers=args.workers, sketch=args.sketch, progress=not args.no_progress)
    print(f"{len(paths)} inputs: {stats.embedded} embedded, {stats.skipped} already done, {stats.failed} failed; "
          f"{stats.images_per_second:.1f} img/s, model busy {100 * stats.model_busy:.0f}% of wall time -> {args.output}")
    for _path, reason in stats.errors[:10]:
        print(f"  failed: {reason}", file=sys.stderr)
    if len(stats.errors) > 10:
        print(f"  ... and {len(stats.errors) - 10} more (see errors-*.parquet)", file=sys.stderr)
    return EXIT_PARTIAL if stats.failed else 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="top-k nearest images in an embeddings dataset for a query image")
    p.add_argument("embeddings", help="dataset folder written by `arrowvision embed` (or one part file)")
    p.add_argument("query", help="query image (or sketch with --sketch)")
    _backend_options(p)
    p.add_argument("-k", "--top-k", type=int, default=10)
    p.add_argument("--sketch", action="store_true")
    p.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from .search import top_k

    encoder = load_encoder(args)
    query = args.query
    if args.sketch:
        from .preprocess import normalize_sketch

        query = normalize_sketch(query)
    vector = encoder.encode([query])[0]
    hits = top_k(args.embeddings, vector, args.top_k, model_checksum=encoder.checksum)
    print(f"{'rank':>4}  {'cosine':>8}  path")
    for rank, (score, path) in enumerate(hits, 1):
        print(f"{rank:>4}  {score:8.4f}  {path}")
    return 0


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="parity report of a weights file / exported IR vs the torch reference and transformers")
    _backend_options(p)
    p.add_argument("--images", nargs="+", help="images or folders to compare on (default: bundled sample photos)")
    p.add_argument("--max-abs", type=float, default=1e-4, help="pass threshold on max abs diff (fp32)")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate

    images = image_files(args.images) if args.images else sorted(SAMPLES_DIR.glob("*.jpg"))
    rows, passed = validate(args.weights, resolve_backend(args.backend), args.precision, images,
                            max_abs=args.max_abs, lossy_min_cosine=args.min_cosine)
    print(f"{'comparison':<44} {'max abs':>10} {'mean abs':>10} {'rmse':>10} {'min cos':>10}  result")
    for row in rows:
        print(f"{row['name']:<44} {row['max_abs']:10.2e} {row['mean_abs']:10.2e} {row['rmse']:10.2e} {row['min_cosine']:10.6f}  "
              f"{'PASS' if row['passed'] else 'FAIL'}")
    print("PASS" if passed else "FAIL")
    return 0 if passed else EXIT_ERROR


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency percentiles, img/s and peak RSS for a backend")
    _backend_options(p)
    p.add_argument("--mode", choices=["latency", "throughput"], default="latency")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--iters", type=int, default=20)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import resource

    import numpy as np

    encoder = load_encoder(args)
    size = encoder.config.image_size
    rng = np.random.default_rng(0)
    from .backends.cpu import cpu_info

    print(f"cpu: {cpu_info().describe()}")
    print(f"{encoder.backend.name} {encoder.backend.precision} {encoder.config.family} {size}px dim {encoder.embedding_dim}")
    print(f"{'batch':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'img/s':>9}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        encoder.backend(pixels)
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            encoder.backend(pixels)
            times.append(time.perf_counter() - start)
        p50, p95, p99 = np.percentile(times, [50, 95, 99]) * 1000
        print(f"{batch:>5} {p50:9.1f} {p95:9.1f} {p99:9.1f} {batch / np.median(times):9.1f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP embedding service with dynamic micro-batching (FastAPI + uvicorn)")
    _backend_options(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="images per model call")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, default=256, help="queued images before 503")
    p.add_argument("--max-body-mb", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .service import ServiceConfig, serve

    config = ServiceConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                           max_body_bytes=int(args.max_body_mb * 1024 * 1024), request_timeout_s=args.timeout)
    serve(load_encoder(args), args.host, args.port, config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrowvision",
        description="Arrow-native SigLIP/CLIP vision encoder: Parquet weights, fast CPU embeddings.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show details and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [_add_demo, _add_convert, _add_info, _add_export, _add_validate, _add_embed, _add_search, _add_bench, _add_serve]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ArrowVisionError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except FileNotFoundError as exc:
        if args.verbose:
            raise
        print(f"error: {exc.filename or exc}: not found", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
