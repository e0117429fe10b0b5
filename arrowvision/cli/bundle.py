"""``arrowvision bundle``: a model exported and validated once into a folder that ``serve
--bundle`` and ``embed --bundle`` load with the runtime install (no torch); and those options."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..backends.base import PRECISIONS
from ._common import EXIT_OK, command, cosine_threshold, given, print_json, progress_enabled


def _add_bundle(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "bundle", "export + validate a model once into a self-contained folder for the runtime install",
                cmd_bundle)
    p.add_argument("--weights", required=True, help="Parquet weights file")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="bundle folder to write (atomically)")
    p.add_argument("--backend", choices=["openvino", "onnxruntime", "auto"], default="openvino",
                   help="runtime the bundle runs on; auto: the fastest validated choice measured on this CPU "
                        "(re-validated, or replaced by an fp32 fallback, on another CPU)")
    p.add_argument("--precision", choices=PRECISIONS, help="default fp32; auto picks its own")
    p.add_argument("--tower", choices=["vision", "all"], default="vision",
                   help="all: the text tower and tokenizer too (weights converted with --tower all)")
    p.add_argument("--min-cosine", type=cosine_threshold,
                   help="lossy precisions must reach this cosine vs fp32 on every held-out kind (default 0.99)")
    p.add_argument("--cache-dir", help="export cache (default: $ARROWVISION_CACHE or the user cache dir)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at DIR")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def cmd_bundle(args: argparse.Namespace) -> int:
    from ..backends.validation import DEFAULT_MIN_COSINE
    from ..bundle.build import build_bundle
    from ._common import elapsed_bar

    with elapsed_bar(f"bundling {args.weights}: export and held-out validation", progress_enabled(args)):
        manifest = build_bundle(args.weights, args.output, precision=args.precision, backend=args.backend, tower=args.tower,
                                min_cosine=args.min_cosine or DEFAULT_MIN_COSINE, cache_dir=args.cache_dir, force=args.force)
    if args.json:
        print_json(manifest)
        return EXIT_OK
    for tower in ("vision", "text"):
        if tower in manifest:
            artifact = manifest[tower]["artifact"]
            fallback = " (+ fp32 fallback)" if "fallback" in manifest[tower] else ""
            print(f"{tower}: {artifact['backend']} {artifact['precision']}{fallback}, held-out min cosine "
                  f"{artifact['accuracy']['min_cosine']:.5f}")
    size = sum(entry["bytes"] for entry in manifest["files"].values())
    print(f"bundle {args.output}: {len(manifest['files'])} files, {size / 2**20:.1f} MiB, made on {manifest['cpu']['model']}")
    return EXIT_OK


def add_bundle_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", metavar="DIR", help="a folder made by `arrowvision bundle` (runs with the runtime install, "
                   "no torch; replaces --weights and the backend options)")


# Options a bundle fixes itself; --min-cosine (stricter only), --mode and --device cpu still apply.
BUNDLE_FIXED = ("weights", "weights_positional", "precision", "calibration", "cache_dir", "compile", "profiles")


def check_bundle_options(args: argparse.Namespace) -> None:
    """With --bundle, refuse what the bundle already decided (a usage error, exit 2)."""
    fixed = [option for option in BUNDLE_FIXED if given(getattr(args, option, None))]
    if args.backend != "default":
        fixed.insert(0, "backend")
    if fixed:
        flags = ", ".join("--" + ("model" if o == "profiles" else "weights" if o == "weights_positional" else o).replace("_", "-")
                          for o in fixed)
        args.command_parser.error(f"--bundle carries its own weights, backend and precision: drop {flags}")
    if str(args.device).upper() != "CPU":
        args.command_parser.error(f"--device {args.device}: a bundle runs on the CPU")
    if getattr(args, "engine", "local") != "local":
        args.command_parser.error("--bundle runs with --engine local only")


def load_from_bundle(args: argparse.Namespace) -> tuple[Any, Any]:
    """(encoder, image-text model or None) of ``args.bundle``; a bundle made with --tower all serves text too."""
    from ..bundle.runtime import open_bundle
    from ..encoder import VisionEncoder

    check_bundle_options(args)
    mode = str(getattr(args, "mode", "latency"))
    bundle = open_bundle(args.bundle)  # every file checked once, here
    if bundle.has_text:
        from ..image_text import ImageTextModel

        model = ImageTextModel.from_bundle(bundle, mode=mode, min_cosine=args.min_cosine)
        encoder = model.vision
    else:
        model, encoder = None, VisionEncoder.from_bundle(bundle, mode=mode, min_cosine=args.min_cosine)
    backend = encoder.backend
    print(f"bundle {args.bundle}: {backend.name} {backend.precision}", file=sys.stderr)
    return encoder, model


register = _add_bundle
