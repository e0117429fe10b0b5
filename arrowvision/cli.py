"""The ``arrowvision`` command line: one console script, one subcommand per job.

Errors print one line and exit non-zero; ``-v`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

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
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        print(f"{key:>16}: {value}")
    print(f"{'load time':>16}: {elapsed * 1000:.1f} ms")
    return 0


DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "siglip-demo-random.parquet"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="embed the bundled sample photos with the bundled default model")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="Parquet weights (default: bundled demo model)")
    p.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto")
    p.set_defaults(func=cmd_demo)


def resolve_backend(name: str) -> str:
    """``auto``: OpenVINO when it is installed, else the torch reference."""
    if name != "auto":
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
    print(f"backend {backend}; load {1000 * (loaded - start):.0f} ms; {len(images)} images embedded in {1000 * (done - loaded):.0f} ms")
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


COMMANDS = [_add_demo, _add_convert, _add_info]


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
    except FileNotFoundError as exc:
        if args.verbose:
            raise
        print(f"error: {exc.filename or exc}: not found", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
