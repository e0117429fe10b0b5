"""Commands about a weights file: ``convert``, ``info``, ``export`` and ``validate`` (parity)."""

from __future__ import annotations

import argparse
import math
import time

from ..backends.base import PRECISIONS
from ._common import (EXIT_ERROR, EXIT_OK, SAMPLES_DIR, add_backend_options, add_weights_argument, command,
                      cosine_threshold, elapsed_bar, non_negative_float, print_json, progress_enabled, progress_wanted, weights_path)
from ._load import backend_options, check_backend_options, image_files, resolve_backend


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "convert", "convert a HF SigLIP/CLIP checkpoint to a Parquet weights file", cmd_convert)
    p.add_argument("source", help="hub id (google/siglip-base-patch16-224), local folder, or .safetensors/.bin file")
    p.add_argument("output", help="output .parquet path")
    p.add_argument("--tower", choices=["vision", "text", "all"], default="vision", help="which tower(s) to keep")
    p.add_argument("--dtype", choices=["keep", "float32", "float16", "bfloat16"], default="keep", help="stored dtype")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--config", help="config.json for a single weights file (default: next to it)")


def cmd_convert(args: argparse.Namespace) -> int:
    from ..model.convert import convert, format_summary

    summary = convert(
        args.source, args.output, tower=args.tower, dtype=args.dtype, revision=args.revision,
        config_path=args.config, progress=progress_enabled(args),
    )
    print(format_summary(summary))
    return EXIT_OK


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "info", "describe a Parquet weights file", cmd_info)
    add_weights_argument(p)
    p.add_argument("--verify", action="store_true", help="recompute every tensor checksum")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def cmd_info(args: argparse.Namespace) -> int:
    from ._describe import describe_weights, report_lines

    report = describe_weights(weights_path(args, demo_default=False), verify=args.verify)
    if args.json:
        print_json(report)
        return EXIT_OK
    for key, value in report_lines(report).items():
        for index, item in enumerate(value if isinstance(value, list) else [value]):  # lists: one line per item
            print(f"{key if index == 0 else '':>11}{':' if index == 0 else ' '} {item}")
    return EXIT_OK


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "export", "export a weights file to OpenVINO IR in the cache (done automatically on first use) "
                 "or to a portable ONNX file", cmd_export)
    add_weights_argument(p)
    p.add_argument("--format", choices=["openvino", "onnx"], default="openvino",
                   help="openvino: IR into the cache; onnx: a validated .onnx file written to -o (fp32 or int8)")
    p.add_argument("-o", "--output", help="output .onnx path (--format onnx)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="export precision")
    p.add_argument("--calibration", nargs="+", metavar="IMAGE", help="images (or folders) to calibrate int8 on "
                   "(default: the bundled sample photos and grayscale/sketch renderings of them); give the same ones "
                   "to embed/search/bench/validate/serve to use this IR")
    p.add_argument("--min-cosine", type=cosine_threshold, default=0.99,
                   help="refuse a lossy export below this cosine on any held-out kind, in (0, 1]")
    p.add_argument("--cache-dir", help="export cache (default: $ARROWVISION_CACHE or the user cache dir)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")


def cmd_export(args: argparse.Namespace) -> int:
    from ..weights.format import WeightLoader

    if args.format == "onnx" and not args.output:
        args.command_parser.error("--format onnx writes a file: give -o model.onnx")
    if args.format == "onnx" and args.calibration:
        args.command_parser.error("--calibration applies to OpenVINO int8 only (ONNX int8 is dynamically quantized)")
    weights = WeightLoader(weights_path(args, demo_default=False))
    start = time.perf_counter()
    if args.format == "onnx":
        from ..backends.onnx_export import save_onnx

        with elapsed_bar(f"exporting to ONNX ({args.precision})", progress_wanted(args)):
            report = save_onnx(weights, args.output, args.precision, cache_dir=args.cache_dir, min_cosine=args.min_cosine,
                               force=args.force)
        print(f"{args.precision} ONNX: {args.output} ({time.perf_counter() - start:.1f} s)")
    else:
        from ..backends.artifacts import read_meta
        from ..backends.openvino_backend import export

        calibration = image_files(args.calibration) if args.calibration else None
        with elapsed_bar(f"exporting to OpenVINO IR ({args.precision})", progress_wanted(args)):
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
    return EXIT_OK


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "validate", "parity report of a weights file / exported IR vs the torch reference and transformers",
                 cmd_validate)
    add_backend_options(p)
    p.add_argument("--images", nargs="+", help="images or folders to compare on (default: bundled sample photos)")
    p.add_argument("--max-abs", type=non_negative_float, default=1e-4, help="pass threshold on max abs diff (fp32; 0: off)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def cmd_validate(args: argparse.Namespace) -> int:
    from ..parity import validate

    weights = weights_path(args, demo_default=True)
    backend = resolve_backend(args.backend, getattr(args, "device", "cpu"))
    check_backend_options(args, backend)
    images = image_files(args.images) if args.images else sorted(SAMPLES_DIR.glob("*.jpg"))
    options = backend_options(args, backend)
    precision = options.pop("precision", None)
    rows, passed = validate(weights, backend, precision, images, max_abs=args.max_abs,
                            lossy_min_cosine=options.pop("min_cosine", 0.99), backend_options=options,
                            progress=progress_enabled(args))
    if args.json:
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
        print_json({"weights": weights, "backend": backend, "precision": precision, "images": len(images),
                    "comparisons": clean, "passed": passed})
        return EXIT_OK if passed else EXIT_ERROR
    print(f"{'comparison':<44} {'max abs':>10} {'mean abs':>10} {'rmse':>10} {'min cos':>10}  result")
    for row in rows:
        print(f"{row['name']:<44} {row['max_abs']:10.2e} {row['mean_abs']:10.2e} {row['rmse']:10.2e} {row['min_cosine']:10.6f}  "
              f"{'PASS' if row['passed'] else 'FAIL'}")
    print("PASS" if passed else "FAIL")
    return EXIT_OK if passed else EXIT_ERROR


def register(sub: argparse._SubParsersAction) -> None:
    for add in (_add_convert, _add_info, _add_export, _add_validate):
        add(sub)
