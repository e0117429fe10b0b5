"""The ``arrowvision`` command line: one console script, one subcommand per job.

Exit codes: 0 ok, 1 error (one ``error:`` line on stderr; ``-v`` shows the traceback), 2 usage
error (bad option or value, caught by the parser), 3 partial (the job finished but some inputs
failed), 130 interrupted (Ctrl-C / SIGTERM). ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .backends import BACKEND_PRECISIONS, BACKENDS, PRECISIONS
from .errors import ArrowVisionError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own code for bad options
EXIT_PARTIAL = 3  # the job finished but some inputs failed (see the errors table)
EXIT_INTERRUPTED = 130

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "siglip-demo-random.parquet"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
BACKEND_CHOICES = ("default", *BACKENDS)
BACKEND_HELP = ("default: openvino fp32 if installed, else torch; auto: the fastest validated backend and "
                "precision for this CPU (measured once, cached)")
# Options that only some backends use; giving one to another backend is a usage error.
# (--precision is checked against backends.BACKEND_PRECISIONS.)
BACKEND_ONLY_OPTIONS = {
    "mode": ("openvino", "auto"),
    "calibration": ("openvino", "auto"),
    "cache_dir": ("openvino", "onnxruntime", "auto", "torch"),
    "min_cosine": ("openvino", "onnxruntime", "auto", "torch"),
    "compile": ("torch",),
}


# ----------------------------------------------------------------------------- argument types


class Default(str):
    """A default value the user did not type (lets us refuse options that do not apply)."""


def given(value: Any) -> bool:
    return value is not None and not isinstance(value, Default)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def port_number(text: str) -> int:
    """1-65535, or 0 for any free port."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535 (0: any free port), got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def request_rate(text: str) -> float:
    """``20/s``, ``600/min`` -> requests per second."""
    from .service_security import parse_rate

    try:
        return parse_rate(text)
    except ArrowVisionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cosine_threshold(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a cosine threshold is in (0, 1], got {value}")
    return value


def batch_sizes(text: str) -> list[int]:
    """``1,8,32`` or ``"1 8 32"`` -> [1, 8, 32]."""
    items = text.replace(",", " ").split()
    if not items:
        raise argparse.ArgumentTypeError("give at least one batch size, e.g. 1,8,32")
    return [positive_int(item) for item in items]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones (None, False) and where the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors are one ``error:`` line too (exit 2), pointing at ``--help``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _common_options() -> argparse.ArgumentParser:
    """Global options, accepted before or after the subcommand."""
    common = ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show details, and tracebacks on errors")
    common.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return common


COMMON = _common_options()


def _command(sub: argparse._SubParsersAction, name: str, help: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, parents=[COMMON], formatter_class=HelpFormatter)
    p.set_defaults(func=func, command_parser=p)
    return p


def _weights_argument(p: argparse.ArgumentParser) -> None:
    """Weights as ``--weights W``; the positional form of older releases still works."""
    p.add_argument("weights_positional", nargs="?", metavar="WEIGHTS", help="Parquet weights file (same as --weights)")
    p.add_argument("--weights", help="Parquet weights file")


def _weights_path(args: argparse.Namespace, *, demo_default: bool) -> str:
    """The weights file named by the user; the bundled demo model (with a warning) if none."""
    positional = getattr(args, "weights_positional", None)
    if positional and args.weights and Path(positional) != Path(args.weights):
        args.command_parser.error(f"two different weights files given: {positional} and --weights {args.weights}")
    path = positional or args.weights
    if not path:
        if not demo_default:
            args.command_parser.error("give a weights file (--weights W.parquet)")
        print(f"warning: no --weights given: using the bundled random-init demo model ({DEFAULT_WEIGHTS.name}); "
              "its embeddings carry no meaning", file=sys.stderr)
        path = str(DEFAULT_WEIGHTS)
    if Path(path).is_dir():
        raise ArrowVisionError(f"{path}: is a folder, not a Parquet weights file "
                               "(convert a checkpoint folder with `arrowvision convert`)")
    if not Path(path).exists():
        raise ArrowVisionError(f"{path}: no such weights file")
    return path


def progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


@contextlib.contextmanager
def elapsed_bar(description: str, enabled: bool) -> Iterator[None]:
    """A ticking 'description: 12s' line on stderr for steps with no countable progress."""
    from tqdm import tqdm

    bar = tqdm(desc=description, bar_format="{desc}: {elapsed}", disable=not enabled, file=sys.stderr)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


# ----------------------------------------------------------------------------- convert


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "convert", "convert a HF SigLIP/CLIP checkpoint to a Parquet weights file", cmd_convert)
    p.add_argument("source", help="hub id (google/siglip-base-patch16-224), local folder, or .safetensors/.bin file")
    p.add_argument("output", help="output .parquet path")
    p.add_argument("--tower", choices=["vision", "text", "all"], default="vision", help="which tower(s) to keep")
    p.add_argument("--dtype", choices=["keep", "float32", "float16", "bfloat16"], default="keep", help="stored dtype")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--config", help="config.json for a single weights file (default: next to it)")


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert, format_summary

    summary = convert(
        args.source, args.output, tower=args.tower, dtype=args.dtype, revision=args.revision,
        config_path=args.config, progress=progress_enabled(args),
    )
    print(format_summary(summary))
    return EXIT_OK


# ----------------------------------------------------------------------------- info


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "info", "describe a Parquet weights file", cmd_info)
    _weights_argument(p)
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

    from .config import VisionConfig
    from .format import WeightLoader

    path = _weights_path(args, demo_default=False)
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


def _describe_vision(vision: dict[str, Any]) -> str:
    if "error" in vision:
        return f"not loadable: {vision['error']}"
    text = (f"{vision['image_size']}px, patch {vision['patch_size']}, width {vision['hidden_size']}, "
            f"{vision['num_layers']} layers, {vision['num_heads']} heads, mlp {vision['intermediate_size']}")
    return text + (f", projection {vision['projection_dim']}" if vision.get("projection_dim") else "")


# ----------------------------------------------------------------------------- backends


def _backend_options(p: argparse.ArgumentParser, mode: str = "latency") -> None:
    p.add_argument("--weights", help="Parquet weights (default: the bundled random-init demo model, with a warning)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="default", help=BACKEND_HELP)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="default fp32 (torch on CUDA: bf16, or fp16 where bf16 is missing); auto picks its own")
    p.add_argument("--device", default=Default("CPU"), help="openvino: CPU, GPU or AUTO; torch: cpu or cuda[:N]")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch: torch.compile the model (faster on GPUs after a first call of ~20 s)")
    p.add_argument("--mode", choices=["latency", "throughput"], default=Default(mode), help="openvino performance hint")
    p.add_argument("--min-cosine", type=cosine_threshold,
                   help="lossy precisions must reach this cosine vs fp32 on every held-out kind (default 0.99)")
    p.add_argument("--calibration", nargs="+", metavar="IMAGE",
                   help="int8 calibration images or folders, as given to `arrowvision export` "
                        "(default: the bundled sample photos)")
    p.add_argument("--cache-dir", help="IR cache (default: $ARROWVISION_CACHE or the user cache dir)")


def resolve_backend(name: str, device: str = "cpu") -> str:
    """``default``: OpenVINO (exact fp32) when it is installed, else the torch reference; torch
    for a CUDA device. ``auto`` (measured per CPU, possibly lossy within --min-cosine) is chosen
    by name only."""
    if name != "default":
        return name
    if str(device).lower().startswith("cuda"):
        return "torch"
    import importlib.util

    return "openvino" if importlib.util.find_spec("openvino") else "torch"


def check_backend_options(args: argparse.Namespace, backend: str) -> None:
    """Refuse options the chosen backend would silently ignore (a usage error, exit 2)."""
    chosen = f" (the default backend is {backend} here)" if args.backend == "default" else ""
    precision = getattr(args, "precision", None)
    if backend == "auto" and precision:
        args.command_parser.error(f"--precision {precision}: backend auto chooses the precision itself; "
                                  "name a backend to fix the precision")
    if precision and precision not in BACKEND_PRECISIONS.get(backend, (precision,)):
        args.command_parser.error(f"--precision {precision} is not available on the {backend} backend{chosen}; "
                                  f"choose from {', '.join(BACKEND_PRECISIONS[backend])}")
    for option, backends in BACKEND_ONLY_OPTIONS.items():
        value = getattr(args, option, None)
        if not given(value) or backend in backends:
            continue
        flag = "--" + option.replace("_", "-")
        shown = " ".join(value) if isinstance(value, list) else "" if value is True else value
        args.command_parser.error(f"{flag}{f' {shown}' if shown else ''} applies to the {'/'.join(backends)} backends only, not {backend}{chosen}")
    device = str(getattr(args, "device", "cpu")).lower()
    if backend == "torch" and device != "cpu" and not device.startswith("cuda"):
        args.command_parser.error(f"--device {args.device}: the torch backend runs on cpu (or cuda)")


def image_files(sources: list[str]) -> list[str]:
    """Expand each source (folder, glob, list file or image) the way `embed` does."""
    from .pipeline import collect_inputs

    return list(dict.fromkeys(path for source in sources for path in collect_inputs(source)))


def backend_options(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """The options given for ``backend`` (precision, min_cosine, mode, cache_dir, calibration)."""
    options: dict[str, Any] = {"precision": args.precision} if args.precision else {}
    if args.min_cosine is not None:
        options["min_cosine"] = args.min_cosine
    if backend in BACKEND_ONLY_OPTIONS["mode"] and hasattr(args, "mode"):
        options["mode"] = str(args.mode)
    if args.cache_dir:
        options["cache_dir"] = args.cache_dir
    if args.calibration:
        options["calibration"] = image_files(args.calibration)
    if getattr(args, "compile", None):
        options["compile"] = True
    return options


def load_encoder(args: argparse.Namespace, weights: str | None = None):
    """The encoder for the command's backend options. A first-use export (or auto's first
    measurement) shows a progress line."""
    from .encoder import VisionEncoder

    weights = weights or _weights_path(args, demo_default=True)
    backend = resolve_backend(args.backend, getattr(args, "device", "cpu"))
    check_backend_options(args, backend)
    options = backend_options(args, backend)
    device = str(args.device)
    if backend == "torch":
        device = "cpu" if device.upper() == "CPU" else device
    first_use = _first_use(weights, backend, options) if progress_enabled(args) else ""
    with elapsed_bar(first_use, bool(first_use)):
        encoder = VisionEncoder.from_parquet(weights, backend=backend, device=device, **options)
    if backend == "auto":
        print(f"auto: {encoder.backend.name} {encoder.backend.precision} (fastest validated on this CPU)", file=sys.stderr)
    return encoder


def _first_use(weights: str, backend: str, options: dict[str, Any]) -> str:
    """What a first use of ``backend`` will do before it can run (empty if it is cached)."""
    from .format import WeightLoader

    try:
        loaded = WeightLoader(weights)
        if backend == "openvino":
            from .backends.artifacts import is_complete
            from .backends.openvino_backend import cache_key, cache_root

            precision = options.get("precision", "fp32")
            key = cache_key(loaded, precision, options.get("calibration"))
            if not is_complete(cache_root(options.get("cache_dir")) / "ir" / key):
                return f"first use of this model: exporting it to OpenVINO IR ({precision})"
        elif backend == "auto":
            from .backends.auto import DEFAULT_MIN_COSINE, remembered_choice

            if remembered_choice(loaded, options.get("min_cosine", DEFAULT_MIN_COSINE), options.get("cache_dir")) is None:
                return "first use of backend auto: measuring the backends and precisions on this CPU"
    except ArrowVisionError:
        return ""  # the load itself reports the problem
    return ""


def _backend_summary(encoder: Any) -> dict[str, Any]:
    backend = encoder.backend
    return {"backend": backend.name, "precision": getattr(backend, "precision", "fp32"),
            "device": str(getattr(backend, "device", "cpu")), "family": encoder.config.family,
            "image_size": encoder.config.image_size, "dim": encoder.embedding_dim, "model_checksum": encoder.checksum}


# ----------------------------------------------------------------------------- demo


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "demo", "embed the bundled sample photos with the bundled default model", cmd_demo)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="Parquet weights")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="default", help=BACKEND_HELP)
    p.add_argument("--serve", action="store_true", help="then serve the search page over the sample photos (Ctrl-C stops)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on")
    p.add_argument("--port", type=port_number, default=8000, help="--serve: port to listen on (0: any free port)")


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .encoder import VisionEncoder

    weights = _weights_path(args, demo_default=False)
    backend = resolve_backend(args.backend, getattr(args, "device", "cpu"))
    start = time.perf_counter()
    first_use = _first_use(weights, backend, {}) if progress_enabled(args) else ""
    with elapsed_bar(first_use, bool(first_use)):
        encoder = VisionEncoder.from_parquet(weights, backend=backend)
    loaded = time.perf_counter()
    images = sorted(SAMPLES_DIR.glob("*.jpg"))
    embeddings = encoder.encode(images)
    done = time.perf_counter()
    print(f"model   {weights} ({encoder.config.family}, {encoder.config.image_size}px, dim {encoder.embedding_dim})")
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
    if Path(weights).resolve() == DEFAULT_WEIGHTS:
        print("note: the bundled model is random-init (no downloads here); convert a real one with\n"
              "  arrowvision convert google/siglip-base-patch16-224 weights/siglip-b16.parquet")
    if args.serve:
        from .index_cli import serve_demo

        serve_demo(weights, backend, SAMPLES_DIR, args.host, args.port, progress_enabled(args))
    else:
        print("search page: `arrowvision demo --serve` (or `make demo-serve`) serves these photos at http://127.0.0.1:8000/")
    return EXIT_OK


# ----------------------------------------------------------------------------- export


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "export", "export a weights file to OpenVINO IR in the cache (done automatically on first use) "
                 "or to a portable ONNX file", cmd_export)
    _weights_argument(p)
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
    from .format import WeightLoader

    if args.format == "onnx" and not args.output:
        args.command_parser.error("--format onnx writes a file: give -o model.onnx")
    if args.format == "onnx" and args.calibration:
        args.command_parser.error("--calibration applies to OpenVINO int8 only (ONNX int8 is dynamically quantized)")
    weights = WeightLoader(_weights_path(args, demo_default=False))
    start = time.perf_counter()
    if args.format == "onnx":
        from .backends.onnx_export import save_onnx

        with elapsed_bar(f"exporting to ONNX ({args.precision})", progress_enabled(args)):
            report = save_onnx(weights, args.output, args.precision, cache_dir=args.cache_dir, min_cosine=args.min_cosine,
                               force=args.force)
        print(f"{args.precision} ONNX: {args.output} ({time.perf_counter() - start:.1f} s)")
    else:
        from .backends.artifacts import read_meta
        from .backends.openvino_backend import export

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


# ----------------------------------------------------------------------------- embed


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "embed", "embed a folder, glob or list of images into a Parquet dataset (resumable)", cmd_embed)
    p.add_argument("inputs", help="a folder (recursive), a quoted glob, or a .txt/.csv/.parquet list of paths or "
                   "http(s) URLs (relative entries resolve against the list's folder); with --column, a Parquet "
                   "table (file, folder or quoted glob)")
    p.add_argument("-o", "--output", required=True, help="output dataset folder (part-*.parquet, _errors/)")
    _backend_options(p, mode="throughput")
    p.add_argument("--batch-size", type=positive_int, help="images per model call (default 32; 256 on CUDA)")
    p.add_argument("--chunk-size", type=positive_int, default=1024, help="rows per atomically written part file")
    p.add_argument("--workers", type=positive_int,
                   help="decoding workers: threads (default 2), or on CUDA processes (default: one per CPU); "
                        "local engine (ray actors decode with their own CPUs)")
    p.add_argument("--decode", choices=["exact", "fast", "gpu"], default="exact",
                   help="exact: HF processor parity; fast: reduced-size JPEG decode; gpu: nvJPEG on the GPU "
                        "(torch backend on CUDA); local engine")
    p.add_argument("--sketch", action="store_true", help="apply sketch normalization before embedding")
    p.add_argument("--skip-failed", action="store_true",
                   help="do not retry inputs that failed in an earlier run (they still count as failed)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let http(s) inputs reach loopback, private and link-local hosts (intranet use; local engine)")
    table = p.add_argument_group("a table's image column (docs/ARROW.md)")
    table.add_argument("--column", help="embed this column of the Parquet table INPUTS: image bytes, a Hugging Face "
                       "image struct<bytes, path>, or paths/URLs")
    table.add_argument("--id-column", help="the rows' identity for resuming (default: file + row number); copied")
    table.add_argument("--keep-columns", metavar="A,B", help="columns copied from the table to each embedded row")
    _ray_embed_options(p)


def _ray_group(p: argparse.ArgumentParser, engine_help: str) -> argparse._ArgumentGroup:
    """The options every command with a Ray engine shares: --engine and --address."""
    ray = p.add_argument_group("ray engine (pip install 'arrowvision[ray]'; see docs/SCALING.md)")
    ray.add_argument("--engine", choices=["local", "ray"], default="local", help=engine_help)
    ray.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")
    return ray


def _ray_embed_options(p: argparse.ArgumentParser) -> None:
    ray = _ray_group(p, "local: threads in this process; ray: a Ray Data actor pool (same dataset, resumable by either)")
    ray.add_argument("--actors", type=positive_int, help="model actors (default: the cluster's CPUs / --cpus-per-actor)")
    ray.add_argument("--cpus-per-actor", type=positive_float,
                     help="CPUs Ray gives each actor (default 1); its inference threads match them")


def cmd_embed(args: argparse.Namespace) -> int:
    from .pipeline import collect_inputs, embed_paths, input_root
    from .urlfetch import UrlPolicy

    for option in ("address", "actors", "cpus_per_actor"):
        if args.engine == "local" and getattr(args, option) is not None:
            args.command_parser.error(f"--{option.replace('_', '-')} applies to --engine ray only")
    if args.engine == "ray" and (args.decode != "exact" or args.workers):
        flag = f"--decode {args.decode}" if args.decode != "exact" else "--workers"
        args.command_parser.error(f"{flag} applies to --engine local only (ray actors decode exactly, with their own CPUs)")
    if args.column is None and (args.id_column or args.keep_columns):
        args.command_parser.error("--id-column and --keep-columns apply to --column only")
    if args.column is not None:  # a table's image column
        from .arrow.table import embed_from_cli as embed_table_from_cli

        stats, count = embed_table_from_cli(args, load_encoder)
    elif args.engine == "ray":
        from .distributed.data import embed_from_cli

        if args.allow_private_urls:
            args.command_parser.error("--allow-private-urls applies to --engine local only (Ray workers keep the SSRF guard on)")
        args.batch_size = args.batch_size or 32
        paths = collect_inputs(args.inputs)
        count, stats = len(paths), embed_from_cli(args, paths, input_root(args.inputs))
    else:
        paths = collect_inputs(args.inputs)
        count, encoder = len(paths), load_encoder(args)
        on_gpu = str(getattr(encoder.backend, "device", "cpu")).startswith("cuda")
        if args.workers:
            workers = args.workers
        else:
            from .feeder import default_workers

            workers = default_workers() if on_gpu else 2
        stats = embed_paths(encoder, paths, args.output, batch_size=args.batch_size or (256 if on_gpu else 32),
                            chunk_size=args.chunk_size, workers=workers, sketch=args.sketch,
                            progress=progress_enabled(args), root=input_root(args.inputs),
                            skip_failed=args.skip_failed, decode=args.decode,
                            url_policy=UrlPolicy(allow_private=args.allow_private_urls))
    rate = (f"; {stats.images_per_second:.1f} img/s, model busy {100 * stats.model_busy:.0f}% of wall time"
            if stats.embedded else "")
    print(f"{count} inputs: {stats.embedded} embedded, {stats.skipped} already done, {stats.failed} failed"
          f"{rate} -> {args.output}")
    for line in getattr(stats, "summary_lines", list)():  # the ray engine: actors, nodes
        print(line)
    for _path, reason in stats.errors[:10]:
        print(f"  failed: {reason}", file=sys.stderr)
    if len(stats.errors) > 10:
        print(f"  ... and {len(stats.errors) - 10} more (see {Path(args.output) / '_errors'})", file=sys.stderr)
    if stats.embedded:
        from .index_cli import update_index_after_embed

        update_index_after_embed(args.output, progress_enabled(args))
    if stats.interrupted:
        print(f"interrupted: the {stats.embedded} rows embedded so far are saved; run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_PARTIAL if stats.failed else EXIT_OK


# ----------------------------------------------------------------------------- search


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "search", "top-k nearest images in an embeddings dataset for a query image", cmd_search)
    p.add_argument("embeddings", help="dataset folder written by `arrowvision embed` (or one part file)")
    p.add_argument("query", nargs="?", help="query image (or sketch with --sketch)")
    _backend_options(p)
    p.add_argument("-k", "--top-k", type=positive_int, default=10, help="how many results")
    p.add_argument("--sketch", action="store_true", help="sketch-normalize the query first")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--text", help="search by text instead of an image (weights converted with --tower all)")
    p.add_argument("--no-index", action="store_true", help="scan every part file even if `arrowvision index` built an index")
    p.add_argument("--nprobe", type=positive_int, help="IVF index: lists probed per query (default: the one stored in the index)")


def cmd_search(args: argparse.Namespace) -> int:
    from .index import search_dataset
    from .pipeline import part_files

    part_files(args.embeddings)  # a missing dataset fails before the model loads
    if args.text is not None or args.query is None:
        return cmd_search_text(args)
    encoder = load_encoder(args)
    query = args.query
    if args.sketch:
        from .preprocess import normalize_sketch

        query = normalize_sketch(query)
    vector = encoder.encode([query])[0]
    hits = search_dataset(args.embeddings, vector, args.top_k, model_checksum=encoder.checksum, use_index=not args.no_index,
                          nprobe=args.nprobe, progress=progress_enabled(args))
    return print_hits(args, {"query": args.query}, hits)


def print_hits(args: argparse.Namespace, query: dict, hits: list) -> int:
    """Search results as one JSON document (--json) or a ranked table; shared by image and text queries."""
    if args.json:
        print_json({"dataset": args.embeddings, **query, "k": args.top_k,
                    "hits": [{"rank": rank, "cosine": score, "path": path} for rank, (score, path) in enumerate(hits, 1)]})
        return EXIT_OK
    print(f"{'rank':>4}  {'cosine':>8}  path")
    for rank, (score, path) in enumerate(hits, 1):
        print(f"{rank:>4}  {score:8.4f}  {path}")
    return EXIT_OK


# ----------------------------------------------------------------------------- validate


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "validate", "parity report of a weights file / exported IR vs the torch reference and transformers",
                 cmd_validate)
    _backend_options(p)
    p.add_argument("--images", nargs="+", help="images or folders to compare on (default: bundled sample photos)")
    p.add_argument("--max-abs", type=non_negative_float, default=1e-4, help="pass threshold on max abs diff (fp32; 0: off)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate

    weights = _weights_path(args, demo_default=True)
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


# ----------------------------------------------------------------------------- bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "bench", "latency percentiles, img/s and peak RSS for a backend", cmd_bench)
    _backend_options(p)
    p.add_argument("--batch-sizes", type=batch_sizes, default="1,8,32", help="comma- or space-separated batch sizes")
    p.add_argument("--iters", type=positive_int, default=20, help="timed runs per batch size (after 1 warm-up run)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def cmd_bench(args: argparse.Namespace) -> int:
    import resource

    import numpy as np
    from tqdm import tqdm

    from .backends.cpu import cpu_info

    encoder = load_encoder(args)
    summary = {**_backend_summary(encoder), "cpu": cpu_info().describe()}
    size = encoder.config.image_size
    rng = np.random.default_rng(0)
    results = []
    bar = tqdm(total=len(args.batch_sizes) * (args.iters + 1), desc="benchmarking", unit="run", leave=False,
               disable=not progress_enabled(args), file=sys.stderr)
    for batch in args.batch_sizes:
        pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        encoder.backend(pixels)  # warm-up, not timed
        bar.update()
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            encoder.backend(pixels)
            times.append(time.perf_counter() - start)
            bar.update()
        p50, p95, p99 = (float(v) for v in np.percentile(times, [50, 95, 99]) * 1000)
        results.append({"batch": batch, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": 1000 * float(np.mean(times)),
                        "img_per_s": batch * len(times) / float(np.sum(times))})
    bar.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print_json({**summary, "warmup_runs": 1, "timed_runs": args.iters, "results": results, "peak_rss_mb": rss_mb})
        return EXIT_OK
    print(f"cpu: {summary['cpu']}")
    print(f"{summary['backend']} {summary['precision']} on {summary['device']}: {summary['family']} {size}px "
          f"dim {summary['dim']}; {args.iters} timed runs per batch size after 1 warm-up; "
          "img/s = images / total timed seconds")
    print(f"{'batch':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'img/s':>9}")
    for row in results:
        print(f"{row['batch']:>5} {row['p50_ms']:9.1f} {row['p95_ms']:9.1f} {row['p99_ms']:9.1f} {row['img_per_s']:9.1f}")
    print(f"peak RSS {rss_mb:.0f} MB")
    return EXIT_OK


# ----------------------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "serve", "HTTP embedding service with dynamic micro-batching (FastAPI + uvicorn)", cmd_serve)
    _backend_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=positive_int, default=32, help="images per model call")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=positive_int, default=256, help="queued images before 503")
    p.add_argument("--max-body-mb", type=positive_float, default=20.0, help="largest request body, MiB")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--index", metavar="OUT_DIR", help="an embeddings dataset (indexed or not) to search: adds POST /v1/search, "
                   "GET /v1/thumbnail and the search page at /")
    _add_serve_profiles_and_access(p)
    _ray_serve_options(p)


def _add_serve_profiles_and_access(p: argparse.ArgumentParser) -> None:
    """serve: model profiles, image URLs, access control, logs (issue 19)."""
    p.add_argument("--model", action="append", metavar="NAME=WEIGHTS", dest="profiles",
                   help="serve WEIGHTS as model NAME (repeat for several; requests pick one with \"model\": NAME)")
    p.add_argument("--default", dest="default_model", metavar="NAME", help="model used when a request names none "
                   "(default: the first --model)")
    p.add_argument("--max-loaded-models", type=positive_int, metavar="N",
                   help="models kept loaded at once; the least recently used is unloaded (default: all)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let image URLs reach loopback, private and link-local hosts (intranet use)")
    p.add_argument("--url-timeout", type=positive_float, default=20.0, help="longest image-URL fetch, seconds")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every endpoint but /health "
                   "(default: $ARROWVISION_API_KEY; prefer the variable, command lines are visible to other users)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow listening on a non-loopback address without an API key")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", dest="cors_origins",
                   help="allow browser calls from ORIGIN (repeat; * for any); CORS is off otherwise")
    p.add_argument("--rate-limit", metavar="N/s", type=request_rate,
                   help="requests per second (N/s) or minute (N/min) per client address (429 over it)")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines (each with the request id) as text or JSON documents")


def _ray_serve_options(p: argparse.ArgumentParser) -> None:
    ray = _ray_group(p, "local: uvicorn in this process; ray: Ray Serve, the model in --replicas replicas")
    ray.add_argument("--replicas", type=positive_int, help="model replicas (default 1; the initial count when autoscaling)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling: fewest model replicas (0 allowed)")
    ray.add_argument("--max-replicas", type=positive_int, help="autoscaling: most model replicas")
    ray.add_argument("--cpus-per-replica", type=positive_float,
                     help="CPUs Ray gives each model replica (default 1); its inference threads match them")


def cmd_serve(args: argparse.Namespace) -> int:
    from .service import ServiceConfig, listen, serve
    from .service_models import registry_from_profiles
    from .service_security import security_from_options

    if args.profiles and (args.weights or getattr(args, "weights_positional", None)):
        args.command_parser.error("give either --weights or --model NAME=WEIGHTS profiles, not both")
    if not args.profiles and (args.default_model or args.max_loaded_models):
        args.command_parser.error("--default and --max-loaded-models apply to --model profiles")
    security = security_from_options(args.host, args.api_key or os.environ.get("ARROWVISION_API_KEY"),
                                     allow_unauthenticated=args.allow_unauthenticated, cors_origins=args.cors_origins,
                                     rate_limit=args.rate_limit)
    config = ServiceConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                           max_body_bytes=int(args.max_body_mb * 1024 * 1024), request_timeout_s=args.timeout,
                           allow_private_urls=args.allow_private_urls, url_timeout_s=args.url_timeout)
    if args.engine == "ray" and args.index:
        args.command_parser.error("--index (search and the page) runs with --engine local only")
    if args.profiles and args.index:
        args.command_parser.error("--index searches with one model: give --weights, not --model profiles")
    if args.engine == "ray":
        local_only = {"--model": args.profiles, "--api-key / ARROWVISION_API_KEY": security.api_key,
                      "--cors-origin": security.cors_origins, "--rate-limit": security.rate_limit,
                      "--log-format json": args.log_format == "json"}
        for option, value in local_only.items():
            if value:
                args.command_parser.error(f"{option} applies to --engine local only (Ray Serve runs its own proxy)")
        from .distributed.serve import serve_from_cli

        return serve_from_cli(args, config)
    for option in ("address", "replicas", "min_replicas", "max_replicas", "cpus_per_replica"):
        if getattr(args, option) is not None:
            args.command_parser.error(f"--{option.replace('_', '-')} applies to --engine ray only")
    sock = listen(args.host, args.port)  # a busy port fails now, before the model loads

    def load(weights: str):
        text_model = load_text_model_if_any(args, weights)  # weights converted with --tower all also serve text
        return (text_model.vision if text_model else load_encoder(args, weights)), text_model

    if args.profiles:
        models = registry_from_profiles(args.profiles, load, default=args.default_model, max_loaded=args.max_loaded_models,
                                        backend=resolve_backend(args.backend))
        serve(models, config=config, sock=sock, access_log=not args.quiet, security=security, log_format=args.log_format)
        return EXIT_OK
    weights = _weights_path(args, demo_default=True)
    encoder, text_model = load(weights)
    index = None
    if args.index:
        from .index_cli import open_index_for_serving

        index = open_index_for_serving(args.index, encoder.checksum, progress_enabled(args))
    serve(encoder, config=config, sock=sock, access_log=not args.quiet, model_name=weights, text_model=text_model,
          index=index, security=security, log_format=args.log_format)
    return EXIT_OK


# ----------------------------------------------------------------------------- main


COMMANDS = [_add_demo, _add_convert, _add_info, _add_export, _add_validate, _add_embed, _add_search, _add_bench, _add_serve]


# ------------------------------------------------------------------------------ text tower


def load_image_text(args: argparse.Namespace, weights: str | None = None):
    """An ``ImageTextModel`` from the shared backend options (the text tower follows the image one:
    torch with torch, else OpenVINO). Text commands need real weights: no demo default."""
    from .image_text import ImageTextModel

    weights = weights or _weights_path(args, demo_default=False)
    backend = resolve_backend(args.backend, getattr(args, "device", "cpu"))
    check_backend_options(args, backend)
    device = str(args.device)
    if backend == "torch":
        device = "cpu" if device.upper() == "CPU" else device
    return ImageTextModel.from_parquet(weights, backend=backend, device=device, **backend_options(args, backend))


def load_text_model_if_any(args: argparse.Namespace, weights: str):
    """The ``ImageTextModel`` when the weights hold a text tower, else None (image-only service)."""
    from .format import WeightLoader

    if "text_model.embeddings.token_embedding.weight" not in WeightLoader(weights):
        return None
    return load_image_text(args, weights)


def cmd_search_text(args: argparse.Namespace) -> int:
    """``search OUT_DIR --text "a red car"``: refused unless the dataset was embedded by this model."""
    from .index import search_dataset
    from .search import require_model

    if args.text is None:
        raise ArrowVisionError("search needs a query image or --text")
    if args.query is not None or args.sketch:
        raise ArrowVisionError("give either a query image or --text, not both (--sketch applies to image queries)")
    model = load_image_text(args)
    require_model(args.embeddings, model.checksum)
    vector = model.encode_texts([args.text])[0]
    hits = search_dataset(args.embeddings, vector, args.top_k, use_index=not args.no_index, nprobe=args.nprobe,
                          progress=progress_enabled(args))
    return print_hits(args, {"text": args.text}, hits)


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "score", "CLIP score, logit and probability for each (image, text) row of a CSV/Parquet table", cmd_score)
    p.add_argument("pairs", help="CSV or Parquet with `image` (path, relative to the table, or http(s) URL) and `text` columns")
    p.add_argument("-o", "--output", required=True, help="output .csv or .parquet (input columns + scores + error)")
    _backend_options(p)
    p.add_argument("--batch-size", type=positive_int, default=32, help="images (and texts) per model call")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let http(s) images reach loopback, private and link-local hosts (intranet use)")


def cmd_score(args: argparse.Namespace) -> int:
    from .score_pairs import score_pairs
    from .urlfetch import UrlPolicy

    model = load_image_text(args)
    stats = score_pairs(model, args.pairs, args.output, batch_size=args.batch_size, progress=progress_enabled(args),
                        url_policy=UrlPolicy(allow_private=args.allow_private_urls))
    print(f"{stats.rows} pairs: {stats.scored} scored, {stats.failed} failed -> {args.output}")
    return EXIT_PARTIAL if stats.failed else EXIT_OK


def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "classify", "zero-shot classification of images against a list of labels", cmd_classify)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--labels", required=True, help='comma-separated labels, e.g. "cat,dog,car"')
    p.add_argument("--template", default="a photo of a {}.", help="prompt with {} for the label")
    p.add_argument("-k", "--top-k", type=positive_int, default=5, help="labels shown per image")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    _backend_options(p)


def cmd_classify(args: argparse.Namespace) -> int:
    import numpy as np

    from . import scoring
    from .errors import ImageError

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ArrowVisionError("--labels needs at least one non-empty label")
    if "{}" not in args.template:
        raise ArrowVisionError(f"--template {args.template!r} has no {{}} for the label")
    model = load_image_text(args)
    label_embeddings = model.encode_texts([args.template.replace("{}", label) for label in labels])  # once for all images
    failed = 0
    for image in args.images:
        try:
            embedding = model.encode_images(model.vision.preprocessor(image)[np.newaxis])
        except (ImageError, OSError) as exc:
            failed += 1
            print(json.dumps({"image": image, "error": str(exc)}) if args.json else f"{image}: error: {exc}")
            continue
        logits = scoring.logits(embedding, label_embeddings, model.logit_scale, model.logit_bias)
        probs = scoring.probabilities(logits, model.family)[0]
        ranking = sorted(zip(labels, map(float, probs)), key=lambda pair: -pair[1])[: args.top_k]
        if args.json:
            print(json.dumps({"image": image, "labels": [{"label": label, "probability": p} for label, p in ranking]}))
        else:
            print(f"{image}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranking))
    return EXIT_PARTIAL if failed else EXIT_OK


COMMANDS += [_add_score, _add_classify]  # text tower


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "index", "build or update the vector index (FAISS) that `search` and `serve --index` use", cmd_index)
    p.add_argument("embeddings", help="dataset folder written by `arrowvision embed`; the index goes in its _index/")
    p.add_argument("--exact-below", type=positive_int, help="exact search below this many rows, IVF above (default 50000)")
    p.add_argument("--nlist", type=positive_int, help="IVF lists (default: sqrt(rows))")
    p.add_argument("--nprobe", type=positive_int,
                   help="IVF lists probed per query, stored as the index's default (default: 1/8 of the lists, at least 32)")
    p.add_argument("--rebuild", action="store_true", help="build from scratch (implied by the three options above) "
                   "even if an index exists; without it new part files are added incrementally")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def cmd_index(args: argparse.Namespace) -> int:
    from .index_cli import run_index

    return run_index(args)


COMMANDS += [_add_index]  # vector index

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = ArgumentParser(
        prog="arrowvision",
        description="Arrow-native SigLIP/CLIP vision encoder: Parquet weights, fast CPU embeddings.",
        epilog="exit codes: 0 ok, 1 error, 2 usage error, 3 finished but some inputs failed, 130 interrupted",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"arrowvision {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show details, and tracebacks on errors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _error(message: str) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if hasattr(args, "precision") and hasattr(args, "backend"):  # usage errors before anything loads
        check_backend_options(args, resolve_backend(args.backend, getattr(args, "device", "cpu")))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ArrowVisionError as exc:
        if args.verbose:
            raise
        return _error(str(exc))
    except OSError as exc:
        if args.verbose:
            raise
        if exc.filename:
            return _error(f"{exc.filename}: {exc.strerror or exc}")
        return _error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
