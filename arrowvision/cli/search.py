"""``arrowvision search``: the nearest images of a dataset to a query image, sketch or text."""

from __future__ import annotations

import argparse

from ._common import EXIT_OK, add_backend_options, command, positive_int, print_json, progress_enabled
from ._load import load_encoder, load_image_text


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "search", "top-k nearest images in an embeddings dataset for a query image", cmd_search)
    p.add_argument("embeddings", help="dataset folder written by `arrowvision embed` (or one part file)")
    p.add_argument("query", nargs="?", help="query image (or sketch with --sketch)")
    add_backend_options(p)
    p.add_argument("-k", "--top-k", type=positive_int, default=10, help="how many results")
    p.add_argument("--sketch", action="store_true", help="sketch-normalize the query first")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--text", help="search by text instead of an image (weights converted with --tower all)")
    p.add_argument("--no-index", action="store_true", help="scan every part file even if `arrowvision index` built an index")
    p.add_argument("--nprobe", type=positive_int, help="IVF index: lists probed per query (default: the one stored in the index)")


def cmd_search(args: argparse.Namespace) -> int:
    from ..datasets.pipeline import part_files
    from ..search.index import search_dataset

    if args.text is None and args.query is None:
        args.command_parser.error("search needs a query image or --text")
    part_files(args.embeddings)  # a missing dataset fails before the model loads
    if args.text is not None or args.query is None:
        return cmd_search_text(args)
    encoder = load_encoder(args)
    query = args.query
    if args.sketch:
        from ..inputs.preprocess import normalize_sketch

        query = normalize_sketch(query)
    vector = encoder.encode([query])[0]
    hits = search_dataset(args.embeddings, vector, args.top_k, model_checksum=encoder.checksum, use_index=not args.no_index,
                          nprobe=args.nprobe, progress=progress_enabled(args))
    return print_hits(args, {"query": args.query}, hits)


def cmd_search_text(args: argparse.Namespace) -> int:
    """``search OUT_DIR --text "a red car"``: refused unless the dataset was embedded by this model."""
    from ..search.index import search_dataset
    from ..search.scan import require_model

    if args.text is None:
        args.command_parser.error("search needs a query image or --text")
    if args.query is not None or args.sketch:
        args.command_parser.error("give either a query image or --text, not both (--sketch applies to image queries)")
    model = load_image_text(args)
    require_model(args.embeddings, model.checksum)
    vector = model.encode_texts([args.text])[0]
    hits = search_dataset(args.embeddings, vector, args.top_k, use_index=not args.no_index, nprobe=args.nprobe,
                          progress=progress_enabled(args))
    return print_hits(args, {"text": args.text}, hits)


def print_hits(args: argparse.Namespace, query: dict, hits: list) -> int:
    """Search results as one JSON document (--json: ``results`` of ``path`` and ``score``, the cosine,
    as ``POST /v1/search`` answers) or a ranked table; shared by image and text queries."""
    if args.json:
        print_json({"dataset": args.embeddings, **query, "k": args.top_k,
                    "results": [{"rank": rank, "path": path, "score": score} for rank, (score, path) in enumerate(hits, 1)]})
        return EXIT_OK
    print(f"{'rank':>4}  {'cosine':>8}  path")
    for rank, (score, path) in enumerate(hits, 1):
        print(f"{rank:>4}  {score:8.4f}  {path}")
    return EXIT_OK


register = _add_search
