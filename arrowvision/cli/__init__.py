"""The ``arrowvision`` command line: one console script, one subcommand per job.

Exit codes: 0 ok, 1 error (one ``error:`` line on stderr; ``-v`` shows the traceback), 2 usage
error (bad option or value, caught by the parser), 3 partial (the job finished but some inputs
failed), 130 interrupted (Ctrl-C / SIGTERM). ``--json`` prints one JSON document on stdout.

Each command group is a module with a ``register(subparsers)``; ``COMMANDS`` below is the one
list of them, in the order ``--help`` shows them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import ArrowVisionError
from . import bench, bundle, demo, embed, index, search, serve, text, weights
from ._common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, ArgumentParser, HelpFormatter
from ._load import check_backend_options, resolve_backend

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "build_parser", "main"]

# demo; convert, info, export, validate; bundle; embed; search; bench; serve; score, classify; index
COMMANDS = [demo.register, weights.register, bundle.register, embed.register, search.register, bench.register,
            serve.register, text.register, index.register]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; an unknown option is the subcommand's usage error, pointing at its own --help (with
    the closest option it has, for a typo)."""
    import difflib

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = args.command_parser
        options = [option for action in command._actions for option in action.option_strings]
        guess = difflib.get_close_matches(unknown[0].split("=", 1)[0], options, n=1)
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {guess[0]}?)" if guess else ""))
    return args


def main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    args = parse_arguments(build_parser(), argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if hasattr(args, "precision") and hasattr(args, "backend"):  # usage errors before anything loads
        check_backend_options(args, resolve_backend(args.backend, getattr(args, "device", "cpu")))
    try:
        with logging_redirect_tqdm():  # a log line clears the progress bar and is printed above it, not glued to it
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
