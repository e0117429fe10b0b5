"""The command-line side of the vector index: ``arrowvision index``, the index update after
``embed``, ``serve --index`` start-up checks and ``demo --serve``."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import IndexMismatch
from ._common import command, positive_int


def run_index(args: argparse.Namespace) -> int:
    """``arrowvision index OUT_DIR``: build, update incrementally, or rebuild; one summary line."""
    from ..search import index

    index.part_files(args.embeddings)  # a missing dataset: the usual "no embeddings" error
    options = {name: value for name, value in (("exact_below", args.exact_below), ("nlist", args.nlist),
                                                ("nprobe", args.nprobe)) if value is not None}
    info = index.build_or_update(args.embeddings, rebuild=args.rebuild or bool(options), merge=args.merge,
                                 progress=not getattr(args, "no_progress", False) and sys.stderr.isatty(), **options)
    report = {"dataset": args.embeddings, "folder": info.folder, "action": info.action, "kind": info.kind, "rows": info.rows,
              "added_rows": info.added_rows, "seconds": round(info.seconds, 3), "bytes": info.bytes, **info.details}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    meta = index.read_meta(args.embeddings)
    kind = {"exact": "exact (faiss IndexFlatIP)",
            "ivf": f"IVF (faiss IndexIVFScalarQuantizer, float16, {meta.get('nlist')} lists)",
            "ivfpq": f"IVF-PQ (faiss, {meta.get('nlist')} lists, {meta.get('pq')} codes re-ranked from float16)"}[info.kind]
    delta = sum(segment["rows"] for segment in meta.get("delta", []))
    what = {"built": "built", "updated": f"updated (+{info.added_rows} rows, {delta} in delta segments)",
            "merged": f"updated (+{info.added_rows} rows, delta segments merged)", "unchanged": "up to date"}[info.action]
    print(f"{info.rows} rows, {kind}: {what} in {info.seconds:.2f} s, {info.bytes / 2**20:.1f} MiB -> {info.folder}")
    return 0


def update_index_after_embed(dataset: str, progress: bool) -> None:
    """``embed`` added chunks: bring the dataset's index (if it has one) up to date."""
    from ..search import index

    if not index.has_index(dataset):
        return
    info = index.update(dataset, progress=progress)
    if info.action != "unchanged":
        print(f"index {info.action}: {info.rows} rows ({info.kind}) in {info.seconds:.2f} s", file=sys.stderr)


def open_index_for_serving(dataset: str, model_checksum: str, progress: bool) -> Any:
    """The ``VectorIndex`` of ``dataset`` for ``serve --index``, refusing another model's embeddings
    before building anything; an index is built (or brought up to date) if needed."""
    from ..search import index

    stored = index.dataset_metadata(Path(dataset)).get("model_checksum", "")
    if stored != model_checksum:
        raise IndexMismatch(f"{dataset} was embedded with model {stored[:19] or 'unknown'}, the service runs "
                            f"{model_checksum[:19]}: search scores would mean nothing; serve the weights that embedded it")
    if not index.has_index(dataset):
        info = index.build(dataset, progress=progress)
        print(f"index built: {info.rows} rows ({info.kind}) in {info.seconds:.2f} s", file=sys.stderr)
    if index.VectorIndex.open(dataset, model_checksum=model_checksum).is_stale():
        index.update(dataset, progress=progress)
    return index.VectorIndex.open(dataset, model_checksum=model_checksum, mmap=False)  # in RAM: every query is fast


def serve_demo(weights: str, backend: str, samples: Path, host: str, port: int, progress: bool,
               security: Any = None) -> None:
    """Embed the sample photos (once, in the cache), index them and serve the search page under
    ``security`` (a ``SecurityConfig``: ``serve``'s access policy)."""
    from ..backends.artifacts import cache_root
    from ..datasets.pipeline import embed_paths
    from ..image_text import ImageTextModel
    from ..service.app import listen, serve
    from ..weights.format import WeightLoader

    sock = listen(host, port)
    if "text_model.embeddings.token_embedding.weight" in WeightLoader(weights):
        text_model = ImageTextModel.from_parquet(weights, backend=backend)
        encoder = text_model.vision
    else:
        from ..encoder import VisionEncoder

        text_model, encoder = None, VisionEncoder.from_parquet(weights, backend=backend)
        print("note: this model has no text tower: the page searches by sketch and photo only", file=sys.stderr)
    key = hashlib.sha256(f"{encoder.checksum} {samples.resolve()}".encode()).hexdigest()[:16]  # per model and checkout
    dataset = cache_root() / "demo-search" / key
    embed_paths(encoder, sorted(str(p) for p in samples.glob("*.jpg")), dataset, progress=False, root=samples)
    opened = open_index_for_serving(str(dataset), encoder.checksum, progress)
    bound_host, bound_port = sock.getsockname()[:2]
    print(f"\nsearch page: http://{bound_host}:{bound_port}/  ({opened.rows} sample photos; Ctrl-C stops)", flush=True)
    serve(encoder, sock=sock, model_name=weights, text_model=text_model, index=opened, access_log=False, security=security)


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "index", "build or update the vector index (FAISS) that `search` and `serve --index` use", run_index)
    p.add_argument("embeddings", help="dataset folder written by `arrowvision embed`; the index goes in its _index/")
    p.add_argument("--exact-below", type=positive_int, help="exact search below this many rows, IVF above (default 50000)")
    p.add_argument("--nlist", type=positive_int, help="IVF lists (default: sqrt(rows))")
    p.add_argument("--nprobe", type=positive_int,
                   help="IVF lists probed per query, stored as the index's default (default: 1/4 of the lists, at least 32)")
    p.add_argument("--rebuild", action="store_true", help="build from scratch (implied by the three options above) "
                   "even if an index exists; without it new part files are added incrementally (as a delta segment)")
    p.add_argument("--merge", action="store_true", help="fold the delta segments (rows added since the last build or "
                   "merge, searched exactly beside the main index) into the main index now")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


register = _add_index
