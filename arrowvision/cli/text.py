"""Commands of the text tower: ``score`` (image-text pairs) and ``classify`` (zero-shot labels)."""

from __future__ import annotations

import argparse
import json

from ..errors import ArrowVisionError
from ._common import EXIT_OK, EXIT_PARTIAL, TEXT_WEIGHTS_HELP, add_backend_options, command, positive_int, progress_enabled
from ._load import load_image_text


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "score", "CLIP score, logit and probability for each (image, text) row of a CSV/Parquet table", cmd_score)
    p.add_argument("pairs", help="CSV or Parquet with `image` (path, relative to the table, or http(s) URL) and `text` columns")
    p.add_argument("-o", "--output", required=True, help="output .csv or .parquet (input columns + scores + error)")
    add_backend_options(p, weights_help=TEXT_WEIGHTS_HELP)
    p.add_argument("--batch-size", type=positive_int, default=32, help="images (and texts) per model call")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let http(s) images reach loopback, private and link-local hosts (intranet use)")


def cmd_score(args: argparse.Namespace) -> int:
    from ..datasets.score_pairs import score_pairs
    from ..inputs.urlfetch import UrlPolicy

    model = load_image_text(args)
    stats = score_pairs(model, args.pairs, args.output, batch_size=args.batch_size, progress=progress_enabled(args),
                        url_policy=UrlPolicy(allow_private=args.allow_private_urls))
    print(f"{stats.rows} pairs: {stats.scored} scored, {stats.failed} failed -> {args.output}")
    return EXIT_PARTIAL if stats.failed else EXIT_OK


def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "classify", "zero-shot classification of images against a list of labels", cmd_classify)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--labels", required=True, help='comma-separated labels, e.g. "cat,dog,car"')
    p.add_argument("--template", default="a photo of a {}.", help="prompt with {} for the label")
    p.add_argument("-k", "--top-k", type=positive_int, default=5, help="labels shown per image")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    add_backend_options(p, weights_help=TEXT_WEIGHTS_HELP)


def cmd_classify(args: argparse.Namespace) -> int:
    import numpy as np

    from .. import scoring
    from ..errors import ImageError

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ArrowVisionError("--labels needs at least one non-empty label")
    if "{}" not in args.template:
        raise ArrowVisionError(f"--template {args.template!r} has no {{}} for the label")
    model = load_image_text(args)
    label_embeddings = model.encode_texts([args.template.replace("{}", label) for label in labels])  # once for all images
    failed = 0
    for image in args.images:
        try:
            embedding = model.encode_images(model.vision.preprocessor(image)[np.newaxis])
        except (ImageError, OSError) as exc:
            failed += 1
            print(json.dumps({"image": image, "error": str(exc)}) if args.json else f"{image}: error: {exc}")
            continue
        logits = scoring.logits(embedding, label_embeddings, model.logit_scale, model.logit_bias)
        probs = scoring.probabilities(logits, model.family)[0]
        ranking = sorted(zip(labels, map(float, probs)), key=lambda pair: -pair[1])[: args.top_k]
        if args.json:
            print(json.dumps({"image": image, "labels": [{"label": label, "probability": p} for label, p in ranking]}))
        else:
            print(f"{image}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranking))
    return EXIT_PARTIAL if failed else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    _add_score(sub)
    _add_classify(sub)
