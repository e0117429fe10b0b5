"""Brute-force cosine search over an embeddings dataset, streamed batch by batch."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..datasets.pipeline import META_PREFIX, iter_embedding_batches, part_files
from ..errors import ArrowVisionError
from ..util.similarity import l2_normalize

log = logging.getLogger("arrowvision")


def top_k(dataset: str | os.PathLike, query: np.ndarray, k: int = 10, model_checksum: str | None = None,
          progress: bool = False) -> list[tuple[float, str]]:
    """The k images most similar to ``query`` (cosine), best first, each path once (a dataset
    written before paths were resolved may hold an image twice). Memory: one batch + k rows."""
    from tqdm import tqdm

    if k < 1:
        raise ArrowVisionError(f"k must be >= 1, got {k}")
    query = l2_normalize(np.asarray(query, dtype=np.float32))
    if model_checksum:
        _check_model(Path(dataset), model_checksum)
    best: dict[str, float] = {}
    rows = sum(pq.read_metadata(part).num_rows for part in part_files(dataset))
    bar = tqdm(total=rows, desc="searching", unit="row", unit_scale=True, leave=False, disable=not progress)
    for paths, vectors in iter_embedding_batches(dataset):
        bar.update(len(paths))
        if vectors.shape[1] != query.shape[0]:
            raise ArrowVisionError(f"{dataset}: embeddings have dim {vectors.shape[1]}, the query has {query.shape[0]}")
        scores = l2_normalize(vectors) @ query
        taken = 0
        for i in np.argsort(-scores, kind="stable"):  # best first, until k distinct paths
            path, score = paths[i], float(scores[i])
            if path not in best:
                taken += 1
            best[path] = max(score, best.get(path, score))
            if taken >= k:
                break
        if len(best) > k:
            best = dict(sorted(best.items(), key=lambda item: -item[1])[:k])
    bar.close()
    return sorted(((score, path) for path, score in best.items()), key=lambda hit: (-hit[0], hit[1]))


def _check_model(dataset: Path, checksum: str) -> None:
    stored = (pq.read_schema(part_files(dataset)[0]).metadata or {}).get(META_PREFIX + b"model_checksum", b"").decode()
    if stored and stored != checksum:
        log.warning("%s was embedded with model %s, the query with %s: scores are not comparable", dataset, stored[:19], checksum[:19])


def require_model(dataset: str | os.PathLike, checksum: str) -> None:
    """Refuse a dataset embedded by another model (text queries only make sense in the same space)."""
    stored = (pq.read_schema(part_files(Path(dataset))[0]).metadata or {}).get(META_PREFIX + b"model_checksum", b"").decode()
    if stored != checksum:
        raise ArrowVisionError(
            f"{dataset} was embedded with model {stored[:19] or 'unknown'}, the text query uses {checksum[:19]}: "
            "embed the images with the same --tower all weights file to search them by text"
        )
