"""``arrowvision score``: a table of (image, text) pairs in, the same rows with scores out.

Input: a CSV or Parquet file with ``image`` (path, relative paths taken from the table's folder,
or an http(s) URL, fetched with the SSRF guard of ``arrowvision.inputs.urlfetch``) and ``text`` columns. Output (CSV or Parquet, by suffix, written atomically): every input
column plus ``clip_score`` (max(100 cos, 0)), ``logit`` (transformers' logits_per_image entry of the
pair), ``probability`` and ``error``. ``probability`` is the pair's sigmoid for SigLIP; for CLIP
it is the softmax of the image's logits over the table's distinct texts (what CLIP's
``probs`` means: this text among the candidates). Unreadable images get an ``error`` and empty
scores (a URL that cannot be fetched too, with the reason); the run goes on. Texts are embedded once each, images in batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import scoring
from ..errors import ArrowVisionError, ImageError
from ..inputs.urlfetch import UrlFetcher, UrlPolicy, is_url
from ..util.fsutil import atomic_output


@dataclass
class ScoreStats:
    rows: int
    scored: int
    failed: int


def read_pairs(path: str | os.PathLike) -> pa.Table:
    """The ``image`` and ``text`` columns (and any others) of a CSV or Parquet table."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif path.suffix.lower() in (".csv", ".tsv"):
            from pyarrow import csv

            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            table = csv.read_csv(path, parse_options=csv.ParseOptions(delimiter=delimiter),
                                 convert_options=csv.ConvertOptions(column_types={"image": pa.string(), "text": pa.string()}))
        else:
            raise ArrowVisionError(f"{path}: expected a .csv, .tsv or .parquet table of (image, text) pairs")
    except (pa.ArrowException, OSError) as exc:
        raise ArrowVisionError(f"{path}: cannot read the pairs table: {exc}") from None
    missing = [c for c in ("image", "text") if c not in table.column_names]
    if missing:
        raise ArrowVisionError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.column_names) or 'none'}")
    return table


def _resolve(image: str | None, folder: Path) -> str | None:
    if not image:
        return None
    if is_url(image):
        return image.strip()
    path = Path(image).expanduser()
    return str(path if path.is_absolute() else folder / path)


def score_pairs(model: Any, pairs: str | os.PathLike, output: str | os.PathLike, *, batch_size: int = 32,
                progress: bool = True, url_policy: UrlPolicy | None = None, url_workers: int = 8) -> ScoreStats:
    """Score every (image, text) row of ``pairs`` with ``model`` (an ``ImageTextModel``) into ``output``.
    Image URLs are fetched ``url_workers`` at a time under ``url_policy`` (default: SSRF guard on)."""
    if batch_size < 1:
        raise ArrowVisionError(f"batch_size must be >= 1, got {batch_size}")
    out_suffix = Path(output).suffix.lower()
    if out_suffix not in (".csv", ".parquet"):
        raise ArrowVisionError(f"{output}: the output must be a .csv or .parquet file")
    table = read_pairs(pairs)
    folder = Path(pairs).resolve().parent
    images = [_resolve(v, folder) for v in table.column("image").to_pylist()]
    texts = ["" if t is None else t for t in table.column("text").to_pylist()]
    unique = list(dict.fromkeys(texts))
    text_index = {t: i for i, t in enumerate(unique)}
    text_embeddings = model.encode_texts(unique, batch_size=batch_size) if unique else np.zeros((0, 1), np.float32)

    n = len(texts)
    clip_scores = np.full(n, np.nan, np.float32)
    logits = np.full(n, np.nan, np.float32)
    probabilities = np.full(n, np.nan, np.float32)
    errors: list[str | None] = [None] * n
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import nullcontext

    from tqdm import tqdm

    fetcher = UrlFetcher(url_policy) if any(is_url(image) for image in images) else None

    def pixels_of(image: str) -> np.ndarray:
        return model.vision.preprocessor(fetcher.fetch(image) if fetcher and is_url(image) else image)

    def attempt(row: int) -> np.ndarray | str:
        if images[row] is None:
            return "empty image path"
        try:
            return pixels_of(images[row])
        except (ImageError, OSError) as exc:  # UrlError is an ImageError
            return str(exc)

    with tqdm(total=n, unit="pair", desc="scoring", disable=not progress, leave=False) as bar, \
            ThreadPoolExecutor(url_workers if fetcher else 1) as pool, fetcher or nullcontext():
        for start in range(0, n, batch_size):
            rows, pixels = [], []
            span = range(start, min(start + batch_size, n))
            for row, outcome in zip(span, pool.map(attempt, span)):
                if isinstance(outcome, str):
                    errors[row] = outcome
                else:
                    pixels.append(outcome)
                    rows.append(row)
            if rows:
                image_embeddings = model.encode_images(np.stack(pixels), batch_size=batch_size)
                all_logits = scoring.logits(image_embeddings, text_embeddings, model.logit_scale, model.logit_bias)
                all_probs = scoring.probabilities(all_logits, model.family)
                columns = np.array([text_index[texts[r]] for r in rows])
                picked = np.arange(len(rows))
                clip_scores[rows] = scoring.clip_score(image_embeddings, text_embeddings[columns])
                logits[rows] = all_logits[picked, columns]
                probabilities[rows] = all_probs[picked, columns]
            bar.update(min(batch_size, n - start))

    def column(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.float32(), mask=np.isnan(values))

    result = table
    for name, values in (("clip_score", column(clip_scores)), ("logit", column(logits)),
                         ("probability", column(probabilities)), ("error", pa.array(errors, pa.string()))):
        if name in result.column_names:
            result = result.drop_columns([name])
        result = result.append_column(name, values)
    with atomic_output(output) as tmp:
        if out_suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(result, tmp)
        else:
            from pyarrow import csv

            csv.write_csv(result, tmp)
    failed = sum(e is not None for e in errors)
    return ScoreStats(rows=n, scored=n - failed, failed=failed)
