"""Brute-force cosine search over an embeddings dataset, streamed batch by batch."""

from __future__ import annotations

import heapq
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .pipeline import META_PREFIX, iter_embedding_batches

log = logging.getLogger("arrowvision")


def top_k(dataset: str | os.PathLike, query: np.ndarray, k: int = 10, model_checksum: str | None = None) -> list[tuple[float, str]]:
    """The k rows most similar to ``query`` (cosine), best first. Memory: one batch + k rows."""
    query = np.asarray(query, dtype=np.float32)
    query = query / max(float(np.linalg.norm(query)), 1e-12)
    if model_checksum:
        _check_model(Path(dataset), model_checksum)
    best: list[tuple[float, str]] = []  # min-heap of the current top k
    for paths, vectors in iter_embedding_batches(dataset):
        if vectors.shape[1] != query.shape[0]:
            from .errors import ArrowVisionError

            raise ArrowVisionError(f"{dataset}: embeddings have dim {vectors.shape[1]}, the query has {query.shape[0]}")
        norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
        scores = vectors @ query / norms
        candidates = np.argpartition(-scores, min(k, len(scores)) - 1)[:k] if len(scores) > k else np.arange(len(scores))
        for i in candidates:
            item = (float(scores[i]), paths[i])
            if len(best) < k:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)
    return sorted(best, reverse=True)


def _check_model(dataset: Path, checksum: str) -> None:
    parts = sorted(dataset.glob("part-*.parquet")) if dataset.is_dir() else [dataset]
    if parts:
        stored = (pq.read_schema(parts[0]).metadata or {}).get(META_PREFIX + b"model_checksum", b"").decode()
        if stored and stored != checksum:
            log.warning("%s was embedded with model %s, the query with %s: scores are not comparable", dataset, stored[:19], checksum[:19])
