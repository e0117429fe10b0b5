"""``ImageTextModel``: both towers of one SigLIP/CLIP Parquet file, and the scores between them.

Images go through ``VisionEncoder``, texts through ``TextEncoder``; ``arrowvision.scoring`` turns
the embeddings into transformers' ``logits_per_image``, probabilities and CLIP scores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import scoring
from .backends.factory import create as create_backend
from .encoder import VisionEncoder
from .errors import ArrowVisionError, ModelError
from .model.text_config import CONVERT_HINT
from .text_encoder import TextEncoder
from .weights.format import WeightLoader


def _scalar(weights: WeightLoader, name: str, default: float | None) -> float:
    if name in weights:
        return float(np.asarray(weights.tensor(name), dtype=np.float64).reshape(-1)[0])
    if default is None:
        raise ModelError(f"{weights.path} has no {name!r} tensor; {CONVERT_HINT}")
    return default


class ImageTextModel:
    """Text embeddings, image-text logits, zero-shot labels and CLIP scores from one Parquet file.

    >>> model = ImageTextModel.from_parquet("siglip.parquet")
    >>> model.zero_shot(["cat.jpg"], ["cat", "dog"])[0][0]
    ('cat', 0.93...)
    """

    def __init__(self, vision: VisionEncoder, text: TextEncoder, logit_scale: float, logit_bias: float):
        if vision.config.family != text.config.family:
            raise ModelError(f"vision tower is {vision.config.family}, text tower is {text.config.family}")
        if vision.embedding_dim != text.embedding_dim:
            raise ModelError(f"image embeddings have {vision.embedding_dim} dims, text embeddings {text.embedding_dim}")
        self.vision = vision
        self.text = text
        self.family = text.config.family
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias

    @classmethod
    def from_parquet(cls, path: str | os.PathLike, backend: str = "torch", device: str = "cpu",
                     text_backend: str | None = None, text_precision: str = "fp32", max_num_patches: int | None = None,
                     **options: Any) -> ImageTextModel:
        """``backend``, ``max_num_patches`` (NaFlex) and ``options`` are the image tower's (see
        ``VisionEncoder.from_parquet``).
        The text tower runs on ``text_backend`` (default: torch with torch, else openvino) at
        ``text_precision``; it shares ``cache_dir`` and ``min_cosine`` with the image tower."""
        weights = WeightLoader(path)
        text_backend = text_backend or ("torch" if backend == "torch" else "openvino")
        text_options: dict[str, Any] = {}
        if text_backend != "torch":
            text_options = {k: options[k] for k in ("cache_dir", "min_cosine") if k in options}
            text_options["precision"] = text_precision
        elif text_precision != "fp32":
            raise ArrowVisionError("the torch text backend runs fp32 only")
        # the text tower first: a vision-only file fails here, with the hint to convert with --tower all
        text = TextEncoder.from_weights(weights, backend=text_backend, device=device, **text_options)
        logit_scale = _scalar(weights, "logit_scale", None)
        logit_bias = _scalar(weights, "logit_bias", None if text.config.family == "siglip" else 0.0)
        impl = create_backend(backend, weights, device=device, **options)
        vision = VisionEncoder(weights, impl, impl.config, max_num_patches=max_num_patches)
        return cls(vision, text, logit_scale, logit_bias)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike | Any, mode: str = "latency", num_threads: int | None = None,
                    min_cosine: float | None = None) -> ImageTextModel:
        """Both towers of a bundle made with ``--tower all``, with the runtime install alone."""
        from .bundle.runtime import Bundle, open_bundle

        bundle = path if isinstance(path, Bundle) else open_bundle(path)
        text_backend = bundle.text_backend(num_threads=num_threads, min_cosine=min_cosine)  # image-only bundles fail here
        text = TextEncoder(bundle.source, text_backend, bundle.text_config, bundle.tokenizer())
        vision_backend = bundle.vision_backend(mode=mode, num_threads=num_threads, min_cosine=min_cosine)
        return cls(VisionEncoder(bundle.source, vision_backend, bundle.vision_config), text, float(bundle.logit_scale),
                   float(bundle.logit_bias))

    @property
    def checksum(self) -> str:
        return self.text.checksum

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, L) int64 = transformers' ``input_ids`` (SigLIP: padded to 64; CLIP: to the longest)."""
        return self.text.tokenize(texts)

    def encode_texts(self, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(N, D) float32, L2-normalized."""
        return self.text.encode(texts, batch_size=batch_size)

    def encode_images(self, images: Any, batch_size: int = 32) -> np.ndarray:
        """(N, D) float32, L2-normalized; the same as ``VisionEncoder.encode``."""
        return self.vision.encode(images, batch_size=batch_size)

    def logits(self, images: Any, texts: str | Sequence[str]) -> np.ndarray:
        """(N_images, N_texts) = transformers' ``logits_per_image``."""
        return scoring.logits(self.encode_images(images), self.encode_texts(texts), self.logit_scale, self.logit_bias)

    def probabilities(self, images: Any, texts: str | Sequence[str]) -> np.ndarray:
        """(N_images, N_texts): sigmoid per pair (SigLIP) or softmax over the texts (CLIP)."""
        return scoring.probabilities(self.logits(images, texts), self.family)

    def zero_shot(self, images: Any, labels: Sequence[str], template: str = "a photo of a {}.") -> list[list[tuple[str, float]]]:
        """Per image: every label with its probability, most likely first."""
        labels = [labels] if isinstance(labels, str) else list(labels)
        if not labels:
            raise ArrowVisionError("zero_shot needs at least one label")
        if "{}" not in template:
            raise ArrowVisionError(f"template {template!r} has no '{{}}' for the label")
        probs = self.probabilities(images, [template.replace("{}", label) for label in labels])
        return [sorted(zip(labels, map(float, row)), key=lambda pair: -pair[1]) for row in probs]

    def clip_score(self, images: Any, texts: str | Sequence[str]) -> np.ndarray:
        """``max(100 * cos, 0)`` of each (image i, text i) pair: (N,) float32."""
        return scoring.clip_score(self.encode_images(images), self.encode_texts(texts))
