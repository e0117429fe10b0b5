"""Image-text scores from embeddings, as transformers computes them (numpy only).

``logits`` equals ``logits_per_image``: cosine similarity times ``exp(logit_scale)``, plus
``logit_bias`` for SigLIP. Probabilities are per pair for SigLIP (sigmoid: each label is judged on
its own) and over the texts for CLIP (softmax). ``clip_score`` is the evaluation metric
``max(100 * cos, 0)`` of matching (image, text) pairs.
"""

from __future__ import annotations

import numpy as np

from .errors import ArrowVisionError


def _unit(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)


def cosines(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """(N_images, N_texts) cosine similarities."""
    return _unit(image_embeddings) @ _unit(text_embeddings).T


def logits(image_embeddings: np.ndarray, text_embeddings: np.ndarray, logit_scale: float, logit_bias: float = 0.0) -> np.ndarray:
    """(N_images, N_texts) = transformers' ``logits_per_image``."""
    return (cosines(image_embeddings, text_embeddings) * np.float32(np.exp(logit_scale)) + np.float32(logit_bias)).astype(np.float32)


def probabilities(logits_per_image: np.ndarray, family: str) -> np.ndarray:
    """Sigmoid per pair (SigLIP) or softmax over the texts of each image (CLIP)."""
    x = np.asarray(logits_per_image, dtype=np.float64)
    if family == "siglip":
        out = 0.5 * (1.0 + np.tanh(0.5 * x))  # the overflow-free sigmoid
    elif family == "clip":
        e = np.exp(x - x.max(axis=-1, keepdims=True)) if x.size else x
        out = e / e.sum(axis=-1, keepdims=True) if x.size else x
    else:
        raise ArrowVisionError(f"unknown family {family!r}")
    return out.astype(np.float32)


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """``max(100 * cos, 0)`` of each (image i, text i) pair: (N,)."""
    if len(image_embeddings) != len(text_embeddings):
        raise ArrowVisionError(f"clip_score pairs images with texts: got {len(image_embeddings)} images and {len(text_embeddings)} texts")
    cos = (_unit(image_embeddings) * _unit(text_embeddings)).sum(axis=-1)
    return np.maximum(100.0 * cos, 0.0).astype(np.float32)
