"""What every command shares: exit codes, argument types, the parser classes, the shared options
(weights, backend, Ray engine) and small output helpers."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..backends.base import BACKENDS, PRECISIONS
from ..errors import ArrowVisionError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own code for bad options
EXIT_PARTIAL = 3  # the job finished but some inputs failed (see the errors table)
EXIT_INTERRUPTED = 130

PACKAGE = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = PACKAGE.parent / "weights" / "siglip-demo-random.parquet"
SAMPLES_DIR = PACKAGE / "samples"
BACKEND_CHOICES = ("default", *BACKENDS)
BACKEND_HELP = ("default: openvino fp32 if installed, else torch; auto: the fastest validated backend and "
                "precision for this CPU (measured once, cached)")


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


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def cosine_threshold(text: str) -> float:
    value = finite_float(text)
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


def common_options() -> argparse.ArgumentParser:
    """Global options, accepted before or after the subcommand."""
    common = ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show details, and tracebacks on errors")
    common.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return common


COMMON = common_options()


def command(sub: argparse._SubParsersAction, name: str, help: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, parents=[COMMON], formatter_class=HelpFormatter)
    p.set_defaults(func=func, command_parser=p)
    return p


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    """Weights as ``--weights W``; the positional form of older releases still works."""
    p.add_argument("weights_positional", nargs="?", metavar="WEIGHTS", help="Parquet weights file (same as --weights)")
    p.add_argument("--weights", help="Parquet weights file")


TEXT_WEIGHTS_HELP = "Parquet weights converted with --tower all (required: the bundled demo model has no text tower)"


def add_backend_options(p: argparse.ArgumentParser, mode: str = "latency", weights_help: str | None = None) -> None:
    p.add_argument("--weights", help=weights_help or "Parquet weights (default: the bundled random-init demo model, "
                   "with a warning; --text needs weights converted with --tower all)")
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


def ray_group(p: argparse.ArgumentParser, engine_help: str) -> argparse._ArgumentGroup:
    """The options every command with a Ray engine shares: --engine and --address."""
    ray = p.add_argument_group("ray engine (pip install 'arrowvision[ray]'; see docs/SCALING.md)")
    ray.add_argument("--engine", choices=["local", "ray"], default="local", help=engine_help)
    ray.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")
    return ray


def weights_path(args: argparse.Namespace, *, demo_default: bool) -> str:
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


def progress_wanted(args: argparse.Namespace) -> bool:
    """The user did not turn progress off (``embed`` then reports plain lines into a log file)."""
    return not getattr(args, "no_progress", False)


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars: wanted, and stderr is a terminal (a file or a pipe gets no ``\\r`` redraws)."""
    return progress_wanted(args) and sys.stderr.isatty()


@contextlib.contextmanager
def elapsed_bar(description: str, enabled: bool) -> Iterator[None]:
    """A ticking 'description: 12s' line on stderr for steps with no countable progress."""
    from tqdm import tqdm

    if enabled and not sys.stderr.isatty():
        print(f"{description} ...", file=sys.stderr, flush=True)
        enabled = False
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
