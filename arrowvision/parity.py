"""Parity report for a user's weights: backend vs our torch reference vs transformers."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .encoder import VisionEncoder
from .util.similarity import row_cosines


def compare(name: str, ours: np.ndarray, reference: np.ndarray, max_abs: float, min_cosine: float) -> dict[str, Any]:
    diff = np.abs(ours - reference)
    cos = row_cosines(ours, reference)
    row = {"name": name, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
           "rmse": float(np.sqrt((diff**2).mean())), "min_cosine": float(cos.min())}
    row["passed"] = row["min_cosine"] >= min_cosine and (max_abs <= 0 or row["max_abs"] <= max_abs)
    return row


BATCH = 16  # images per model call: bounded memory and a moving progress bar on big image sets


def _batched(run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, description: str, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    outputs = []
    with tqdm(total=len(pixels), desc=description, unit="img", leave=False, disable=not progress) as bar:
        for start in range(0, len(pixels), BATCH):
            outputs.append(np.asarray(run(pixels[start : start + BATCH]), dtype=np.float32))
            bar.update(len(outputs[-1]))
    return np.concatenate(outputs)


def validate(weights: str | Path, backend: str, precision: str | None, images: Sequence[Any], *, max_abs: float = 1e-4,
             min_cosine: float = 0.9999, lossy_min_cosine: float = 0.99, backend_options: dict[str, Any] | None = None,
             progress: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """Unnormalized pooled outputs on ``images``; abs-diff thresholds apply to fp32 comparisons only.

    A lossy backend (anything but fp32) is held to ``lossy_min_cosine`` on ``images`` and gets one
    row per held-out kind from its export validation (photos, grayscale, sketches, ...).
    ``backend_options`` (cache_dir, calibration, mode) select the same cached export that
    ``arrowvision export`` made."""
    from tqdm import tqdm

    reference = VisionEncoder.from_parquet(weights, backend="torch")
    pixels = np.stack([reference.preprocessor(image) for image in tqdm(list(images), desc="decoding", unit="img",
                                                                         leave=False, disable=not progress)])
    expected = _batched(reference.backend, pixels, "torch reference", progress)
    rows = []
    if backend != "torch" or precision not in (None, "fp32"):  # torch bf16/fp16: lossy, checked like exports
        options = {**(backend_options or {}), **({"precision": precision} if precision else {})}
        fast = VisionEncoder.from_parquet(weights, backend=backend, **{**options, "min_cosine": 0.0})
        label = f"{fast.backend.name} {fast.backend.precision}"
        exact = fast.backend.precision == "fp32"
        rows.append(compare(f"{label} vs torch", _batched(fast.backend, pixels, label, progress), expected,
                            max_abs if exact else 0, min_cosine if exact else lossy_min_cosine))
        for kind, row in fast.backend.report.get("by_kind", {}).items():
            rows.append({"name": f"{label} held-out {kind} ({row['images']})", "max_abs": float("nan"), "mean_abs": float("nan"),
                         "rmse": float("nan"), "min_cosine": row["min_cosine"], "passed": row["min_cosine"] >= lossy_min_cosine})
    if importlib.util.find_spec("transformers"):
        hf = _transformers_model(reference)
        rows.append(compare("torch vs transformers", expected, _batched(hf, pixels, "transformers", progress), max_abs, min_cosine))
    return rows, all(r["passed"] for r in rows)


def _transformers_model(encoder: VisionEncoder) -> Callable[[np.ndarray], np.ndarray]:
    """The same tensors loaded into the HF model class: pixels -> pooled outputs."""
    import torch
    import transformers as tf

    hf_config = dict(encoder.weights.config)
    family = encoder.config.family
    tensors = encoder.weights.torch()
    # built normally on CPU (not meta): HF keeps non-persistent buffers (position_ids) outside state_dict
    vision = {k: v for k, v in hf_config.get("vision_config", hf_config).items() if k != "model_type"}
    if family == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**vision))
    else:
        config = tf.CLIPVisionConfig(**vision)
        if "projection_dim" in hf_config:
            config.projection_dim = hf_config["projection_dim"]
        model = tf.CLIPVisionModelWithProjection(config) if "visual_projection.weight" in tensors else tf.CLIPVisionModel(config)
    state = {}
    for name in model.state_dict():
        for candidate in (name, "vision_model." + name, name.removeprefix("vision_model.")):
            if candidate in tensors:
                state[name] = tensors[candidate].float()
                break
    model.load_state_dict(state, strict=True)
    model.eval()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels)))
        pooled = getattr(out, "image_embeds", None)
        return (pooled if pooled is not None else out.pooler_output).numpy()

    return run
