"""Commands about a weights file: ``convert``, ``info``, ``export`` and ``validate`` (parity)."""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ..backends.base import PRECISIONS
from ..errors import ArrowVisionError
from ._common import (EXIT_ERROR, EXIT_OK, SAMPLES_DIR, add_backend_options, add_weights_argument, command,
                      cosine_threshold, elapsed_bar, non_negative_float, print_json, progress_enabled, weights_path)
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


def _portable_source(source: dict) -> dict:
    """The conversion source without paths of temporary build folders."""
    temp = Path(tempfile.gettempdir()).resolve()
    path = source.get("path")
    if isinstance(path, str) and (Path(path).resolve() == temp or temp in Path(path).resolve().parents):
        return {k: v for k, v in source.items() if k != "path"}
    return dict(source)


def cmd_info(args: argparse.Namespace) -> int:
    from collections import Counter

    from ..model.config import VisionConfig
    from ..weights.format import WeightLoader

    path = weights_path(args, demo_default=False)
    start = time.perf_counter()
    weights = WeightLoader(path, verify=args.verify)
    elapsed = time.perf_counter() - start
    dtypes = Counter(info.dtype for info in weights.tensors())
    parameters = sum(math.prod(info.shape) for info in weights.tensors())
    try:
        vision: dict[str, Any] = VisionConfig.from_hf(weights.config).to_dict()
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
        "checksums_verified": bool(args.verify),
        "source": _portable_source(weights.source),
        "vision_config": vision,
        "auto_choice": _auto_choice(weights),
        "exports": _export_summaries(weights),
        "load_ms": round(elapsed * 1000, 2),
    }
    if args.json:
        print_json(report)
        return EXIT_OK
    source = report["source"]
    lines = {
        "path": report["path"],
        "model": f"{weights.family or '?'} ({weights.tower or '?'} tower)",
        "tensors": f"{len(weights)} ({', '.join(f'{count} {dtype}' for dtype, count in dtypes.most_common())})",
        "parameters": f"{parameters:,}",
        "size": f"{weights.nbytes / 2**20:.1f} MiB of tensors",
        "zero-copy": "yes" if weights.zero_copy else "no (decoded with pyarrow)",
        "checksum": weights.checksum,
        "checksums": "verified" if args.verify else "not verified (use --verify)",
        "source": " ".join(str(source[k]) for k in ("type", "repo_id", "revision", "path") if source.get(k)) or "unknown",
        "vision": _describe_vision(vision),
        "auto choice": report["auto_choice"],
        "exports": report["exports"] or ["none cached"],
        "load time": f"{report['load_ms']:.1f} ms",
    }
    for key, value in lines.items():
        for index, item in enumerate(value if isinstance(value, list) else [value]):  # lists: one line per item
            print(f"{key if index == 0 else '':>11}{':' if index == 0 else ' '} {item}")
    return EXIT_OK


def _auto_choice(weights) -> str:
    """What ``--backend auto`` runs for this model on this CPU, if it was measured already."""
    try:
        from ..backends.auto import remembered_choice

        record = remembered_choice(weights)
    except ArrowVisionError as exc:
        return f"unknown ({exc})"
    if record is None:
        return "not measured on this CPU yet (the first --backend auto use measures it)"
    return f"{record['backend']} {record['precision']} on {record['cpu']}"


def _export_summaries(weights) -> list[str]:
    """Cached exports of this model and their held-out accuracy per kind (min cosine vs fp32)."""
    from ..backends.artifacts import cached_exports

    lines = []
    for meta in cached_exports(weights.checksum):
        kinds = meta.get("by_kind")
        accuracy = (", ".join(f"{k} {v['min_cosine']:.4f}" for k, v in kinds.items()) if kinds
                    else f"max abs {meta['max_abs']:.1e}" if "max_abs" in meta else "exact (fp32)")
        lines.append(f"{meta['format']} {meta['precision']}: {accuracy}")
    return lines


def _describe_vision(vision: dict[str, Any]) -> str:
    if "error" in vision:
        return f"not loadable: {vision['error']}"
    text = (f"{vision['image_size']}px, patch {vision['patch_size']}, width {vision['hidden_size']}, "
            f"{vision['num_layers']} layers, {vision['num_heads']} heads, mlp {vision['intermediate_size']}")
    return text + (f", projection {vision['projection_dim']}" if vision.get("projection_dim") else "")


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

        with elapsed_bar(f"exporting to ONNX ({args.precision})", progress_enabled(args)):
            report = save_onnx(weights, args.output, args.precision, cache_dir=args.cache_dir, min_cosine=args.min_cosine,
                               force=args.force)
        print(f"{args.precision} ONNX: {args.output} ({time.perf_counter() - start:.1f} s)")
    else:
        from ..backends.artifacts import read_meta
        from ..backends.openvino_backend import export

        calibration = image_files(args.calibration) if args.calibration else None
        with elapsed_bar(f"exporting to OpenVINO IR ({args.precision})", progress_enabled(args)):
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
