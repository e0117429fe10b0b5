"""From the shared backend options to a loaded model: the backend chosen, options that do not
apply to it refused (a usage error), first-use exports announced."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..backends.base import BACKEND_PRECISIONS
from ..errors import ArrowVisionError
from ._common import elapsed_bar, given, progress_wanted, weights_path

# Options that only some backends use; giving one to another backend is a usage error.
# (--precision is checked against backends.BACKEND_PRECISIONS.)
BACKEND_ONLY_OPTIONS = {
    "mode": ("openvino", "auto"),
    "calibration": ("openvino", "auto"),
    "cache_dir": ("openvino", "onnxruntime", "auto", "torch"),
    "min_cosine": ("openvino", "onnxruntime", "auto", "torch"),
    "compile": ("torch",),
}


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
    from ..datasets.pipeline import collect_inputs

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
    from ..encoder import VisionEncoder

    weights = weights or weights_path(args, demo_default=True)
    backend = resolve_backend(args.backend, getattr(args, "device", "cpu"))
    check_backend_options(args, backend)
    options = backend_options(args, backend)
    device = str(args.device)
    if backend == "torch":
        device = "cpu" if device.upper() == "CPU" else device
    first_use = first_use_note(weights, backend, options) if progress_wanted(args) else ""
    with elapsed_bar(first_use, bool(first_use)):
        encoder = VisionEncoder.from_parquet(weights, backend=backend, device=device, **options)
    if backend == "auto":
        print(f"auto: {encoder.backend.name} {encoder.backend.precision} (fastest validated on this CPU)", file=sys.stderr)
    return encoder


def first_use_note(weights: str, backend: str, options: dict[str, Any]) -> str:
    """What a first use of ``backend`` will do before it can run (empty if it is cached)."""
    from ..weights.format import WeightLoader

    try:
        loaded = WeightLoader(weights)
        if backend == "openvino":
            from ..backends.artifacts import is_complete
            from ..backends.openvino_backend import cache_key, cache_root

            precision = options.get("precision", "fp32")
            key = cache_key(loaded, precision, options.get("calibration"))
            if not is_complete(cache_root(options.get("cache_dir")) / "ir" / key):
                return f"first use of this model: exporting it to OpenVINO IR ({precision})"
        elif backend == "auto":
            from ..backends.auto import DEFAULT_MIN_COSINE, remembered_choice

            if remembered_choice(loaded, options.get("min_cosine", DEFAULT_MIN_COSINE), options.get("cache_dir")) is None:
                return "first use of backend auto: measuring the backends and precisions on this CPU"
    except ArrowVisionError:
        return ""  # the load itself reports the problem
    return ""


def backend_summary(encoder: Any) -> dict[str, Any]:
    backend = encoder.backend
    return {"backend": backend.name, "precision": backend.precision,
            "device": str(backend.device), "family": encoder.config.family,
            "image_size": encoder.config.image_size, "dim": encoder.embedding_dim, "model_checksum": encoder.checksum}


def load_image_text(args: argparse.Namespace, weights: str | None = None):
    """An ``ImageTextModel`` from the shared backend options (the text tower follows the image one:
    torch with torch, else OpenVINO). Text commands need real weights: no demo default."""
    from ..image_text import ImageTextModel

    if not (weights or args.weights or getattr(args, "weights_positional", None)):
        args.command_parser.error("give --weights W.parquet converted with --tower all "
                                  "(the bundled demo model has no text tower)")
    weights = weights or weights_path(args, demo_default=False)
    backend = resolve_backend(args.backend, getattr(args, "device", "cpu"))
    check_backend_options(args, backend)
    device = str(args.device)
    if backend == "torch":
        device = "cpu" if device.upper() == "CPU" else device
    return ImageTextModel.from_parquet(weights, backend=backend, device=device, **backend_options(args, backend))


def load_text_model_if_any(args: argparse.Namespace, weights: str):
    """The ``ImageTextModel`` when the weights hold a text tower, else None (image-only service)."""
    from ..weights.format import WeightLoader

    if "text_model.embeddings.token_embedding.weight" not in WeightLoader(weights):
        return None
    return load_image_text(args, weights)
