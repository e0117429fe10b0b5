"""``arrowvision demo``: the bundled sample photos embedded with the bundled model (and ``--serve``d)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..service.security import add_access_arguments, security_from_args
from ._common import (BACKEND_CHOICES, BACKEND_HELP, DEFAULT_WEIGHTS, EXIT_OK, SAMPLES_DIR, command, elapsed_bar,
                      port_number, progress_enabled, progress_wanted, weights_path)
from ._load import first_use_note, resolve_backend


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "demo", "embed the bundled sample photos with the bundled default model", cmd_demo)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="Parquet weights")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="default", help=BACKEND_HELP)
    p.add_argument("--serve", action="store_true", help="then serve the search page over the sample photos (Ctrl-C stops)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on")
    p.add_argument("--port", type=port_number, default=8000, help="--serve: port to listen on (0: any free port)")
    add_access_arguments(p, when="--serve: ")


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from ..encoder import VisionEncoder

    weights = weights_path(args, demo_default=False)
    backend = resolve_backend(args.backend, getattr(args, "device", "cpu"))
    security = security_from_args(args) if args.serve else None  # serve's access policy, refused before any work
    access = {"api_key": "--api-key", "allow_unauthenticated": "--allow-unauthenticated", "cors_origins": "--cors-origin",
              "rate_limit": "--rate-limit", "forwarded_allow_ips": "--forwarded-allow-ips"}
    given = [flag for dest, flag in access.items() if getattr(args, dest)]
    if given and not args.serve:
        args.command_parser.error(f"{given[0]} applies with --serve")
    start = time.perf_counter()
    first_use = first_use_note(weights, backend, {}) if progress_wanted(args) else ""
    with elapsed_bar(first_use, bool(first_use)):
        encoder = VisionEncoder.from_parquet(weights, backend=backend)
    loaded = time.perf_counter()
    images = sorted(SAMPLES_DIR.glob("*.jpg"))
    embeddings = encoder.encode(images)
    done = time.perf_counter()
    print(f"model   {weights} ({encoder.config.family}, {encoder.config.image_size}px, dim {encoder.embedding_dim})")
    exported = "" if encoder.backend.cache_hit else " (first use: exported to OpenVINO IR and cached)"
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
    if Path(weights).resolve() == DEFAULT_WEIGHTS:
        print("note: the bundled model is random-init (no downloads here); convert a real one with\n"
              "  arrowvision convert google/siglip-base-patch16-224 weights/siglip-b16.parquet")
    if args.serve:
        from .index import serve_demo

        serve_demo(weights, backend, SAMPLES_DIR, args.host, args.port, progress_enabled(args), security=security)
    else:
        print("search page: `arrowvision demo --serve` (or `make demo-serve`) serves these photos at http://127.0.0.1:8000/")
    return EXIT_OK


register = _add_demo
