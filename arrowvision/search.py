"""Brute-force cosine search over an embeddings dataset, streamed batch by batch."""

from __future__ import annotations

import heapq
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .encoder import l2_normalize
from .errors import ArrowVisionError
from .pipeline import META_PREFIX, iter_embedding_batches, part_files

log = logging.getLogger("arrowvision")


def top_k(dataset: str | os.PathLike, query: np.ndarray, k: int = 10, model_checksum: str | None = None) -> list[tuple[float, str]]:
    """The k rows most similar to ``query`` (cosine), best first. Memory: one batch + k rows."""
    query = l2_normalize(np.asarray(query, dtype=np.float32))
    if model_checksum:
        _check_model(Path(dataset), model_checksum)
    best: list[tuple[float, str]] = []  # min-heap of the current top k
    for paths, vectors in iter_embedding_batches(dataset):
        if vectors.shape[1] != query.shape[0]:
            raise ArrowVisionError(f"{dataset}: embeddings have dim {vectors.shape[1]}, the query has {query.shape[0]}")
        scores = l2_normalize(vectors) @ query
        candidates = np.argpartition(-scores, min(k, len(scores)) - 1)[:k] if len(scores) > k else np.arange(len(scores))
        for i in candidates:
            item = (float(scores[i]), paths[i])
            if len(best) < k:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)
    return sorted(best, reverse=True)


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
