"""``arrowvision embed``: a folder, glob or list of images into a resumable Parquet dataset, on
threads in this process or on a Ray Data actor pool."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ._common import (EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, add_backend_options, command, positive_float,
                      positive_int, progress_enabled, progress_wanted, ray_group, weights_path)
from ._load import backend_options, check_backend_options, load_encoder, resolve_backend
from .bundle import add_bundle_option, check_bundle_options, load_from_bundle


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "embed", "embed a folder, glob or list of images into a Parquet dataset (resumable)", cmd_embed)
    p.add_argument("inputs", help="a folder (recursive), a quoted glob, or a .txt/.csv/.parquet list of paths or "
                   "http(s) URLs (relative entries resolve against the list's folder); with --column, a Parquet "
                   "table (file, folder or quoted glob)")
    p.add_argument("-o", "--output", required=True, help="output dataset folder (part-*.parquet, _errors/)")
    add_backend_options(p, mode="throughput")
    add_bundle_option(p)
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


def _ray_embed_options(p: argparse.ArgumentParser) -> None:
    ray = ray_group(p, "local: threads in this process; ray: a Ray Data actor pool (same dataset, resumable by either)")
    ray.add_argument("--actors", type=positive_int, help="model actors (default: the cluster's CPUs / --cpus-per-actor)")
    ray.add_argument("--cpus-per-actor", type=positive_float,
                     help="CPUs Ray gives each actor (default 1); its inference threads match them")


def cmd_embed(args: argparse.Namespace) -> int:
    from ..datasets.pipeline import collect_inputs, embed_paths, input_root
    from ..datasets.writer import dataset_text, ensure_output_free
    from ..inputs.urlfetch import UrlPolicy

    if args.bundle:
        check_bundle_options(args)  # before anything else: the bundle fixes weights, backend, engine
    for option in ("address", "actors", "cpus_per_actor"):
        if args.engine == "local" and getattr(args, option) is not None:
            args.command_parser.error(f"--{option.replace('_', '-')} applies to --engine ray only")
    if args.engine == "ray" and (args.decode != "exact" or args.workers):
        flag = f"--decode {args.decode}" if args.decode != "exact" else "--workers"
        args.command_parser.error(f"{flag} applies to --engine local only (ray actors decode exactly, with their own CPUs)")
    if args.engine == "ray" and args.max_num_patches is not None:  # the actors load the default (256)
        args.command_parser.error("--max-num-patches applies to --engine local only (Ray actors use the default 256)")
    if args.column is None and (args.id_column or args.keep_columns):
        args.command_parser.error("--id-column and --keep-columns apply to --column only")
    ensure_output_free(args.output)  # before the model loads: a refused run costs nothing
    if args.column is not None:  # a table's image column
        stats, count = embed_table_column(args)
    elif args.engine == "ray":
        if args.allow_private_urls:
            args.command_parser.error("--allow-private-urls applies to --engine local only (Ray workers keep the SSRF guard on)")
        args.batch_size = args.batch_size or 32
        paths = collect_inputs(args.inputs)
        count, stats = len(paths), embed_on_ray(args, paths, input_root(args.inputs))
    else:
        paths = collect_inputs(args.inputs)
        count, encoder = len(paths), _encoder(args)
        on_gpu = str(encoder.backend.device).startswith("cuda")
        if args.workers:
            workers = args.workers
        else:
            from ..inputs.feeder import default_workers

            workers = default_workers() if on_gpu else 2
        stats = embed_paths(encoder, paths, args.output, batch_size=args.batch_size or (256 if on_gpu else 32),
                            chunk_size=args.chunk_size, workers=workers, sketch=args.sketch,
                            progress=progress_wanted(args), root=input_root(args.inputs),
                            skip_failed=args.skip_failed, decode=args.decode,
                            url_policy=UrlPolicy(allow_private=args.allow_private_urls))
    rate = (f"; {stats.images_per_second:.1f} img/s, model busy {100 * stats.model_busy:.0f}% of wall time"
            if stats.embedded else "")
    print(f"{count} inputs: {stats.embedded} embedded, {stats.skipped} already done, {stats.failed} failed"
          f"{rate} -> {args.output}")
    for line in getattr(stats, "summary_lines", list)():  # the ray engine: actors, nodes
        print(line)
    for _path, reason in stats.errors[:10]:
        print(f"  failed: {dataset_text(reason)}", file=sys.stderr)  # file names as the errors table spells them
    if len(stats.errors) > 10:
        print(f"  ... and {len(stats.errors) - 10} more (see {Path(args.output) / '_errors'})", file=sys.stderr)
    if stats.embedded:
        from .index import update_index_after_embed

        update_index_after_embed(args.output, progress_enabled(args))
    if stats.interrupted:
        print(f"interrupted: the {stats.embedded} rows embedded so far are saved; run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_PARTIAL if stats.failed else EXIT_OK


def _encoder(args: argparse.Namespace) -> Any:
    """The image encoder of ``--bundle`` (runtime install) or of the weights and backend options."""
    return load_from_bundle(args)[0] if args.bundle else load_encoder(args)


def embed_on_ray(args: argparse.Namespace, paths: list[str], root: str | os.PathLike) -> Any:
    """``arrowvision embed --engine ray``: the CLI's backend options, checked as for the local engine."""
    from ..distributed.data import embed_paths_ray

    backend = resolve_backend(args.backend)
    check_backend_options(args, backend)
    device = str(args.device)
    if backend == "torch" and device.upper() == "CPU":
        device = "cpu"
    return embed_paths_ray(weights_path(args, demo_default=True), paths, args.output, backend=backend, device=device,
                           backend_options=backend_options(args, backend), batch_size=args.batch_size,
                           chunk_size=args.chunk_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor or 1.0,
                           sketch=args.sketch, root=root, skip_failed=args.skip_failed,
                           progress=progress_wanted(args), address=args.address)


def embed_table_column(args: argparse.Namespace) -> tuple[Any, int]:
    """``embed TABLE --column C``: refuses what does not apply, runs either engine; -> (stats, rows)."""
    from ..datasets.table import embed_table, table_files, total_rows

    fail = args.command_parser.error
    if args.sketch or args.decode == "gpu":
        fail(f"{'--sketch' if args.sketch else '--decode gpu'} applies to image files, not to --column")
    keep = [name.strip() for name in (args.keep_columns or "").split(",") if name.strip()]
    files = table_files(args.inputs)
    if args.engine == "ray":
        from ..distributed.columns import embed_table_ray

        if not args.id_column:
            fail("--engine ray with --column needs --id-column (Ray reads row groups in parallel: rows have no stable number)")
        if args.allow_private_urls:
            fail("--allow-private-urls applies to --engine local only (Ray workers keep the SSRF guard on)")
        backend = resolve_backend(args.backend)
        check_backend_options(args, backend)
        device = "cpu" if backend == "torch" and str(args.device).upper() == "CPU" else str(args.device)
        stats = embed_table_ray(weights_path(args, demo_default=True), files, args.output, column=args.column,
                                id_column=args.id_column, keep_columns=keep, backend=backend, device=device,
                                backend_options=backend_options(args, backend), batch_size=args.batch_size or 32,
                                chunk_size=args.chunk_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor or 1.0,
                                skip_failed=args.skip_failed, progress=progress_wanted(args), address=args.address)
        return stats, total_rows(files)
    from ..inputs import decode as decoding
    from ..inputs.urlfetch import UrlPolicy

    decoding.URL_POLICY[0] = UrlPolicy(allow_private=args.allow_private_urls)  # path/URL columns
    stats = embed_table(_encoder(args), args.inputs, args.output, column=args.column, id_column=args.id_column,
                        keep_columns=keep, batch_size=args.batch_size or 32, chunk_size=args.chunk_size,
                        workers=args.workers or 2, decode=args.decode, skip_failed=args.skip_failed,
                        progress=progress_wanted(args))
    return stats, total_rows(files)


register = _add_embed
