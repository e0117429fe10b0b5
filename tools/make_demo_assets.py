#!/usr/bin/env python3
"""Regenerate the bundled demo assets (committed; rerun only to change them).

- weights/siglip-demo-random.parquet: a small SigLIP vision tower (hidden 128, 4 layers,
  224 px, patch 16), random init with seed 0 and every parameter perturbed (tests/checkpoints.py:
  no LayerNorm left at 1/0, no bias left at 0, so tests on the demo model can see swapped norms
  or dropped biases). Real checkpoints cannot be downloaded in our
  build environment; the demo shows the pipeline, not semantic quality. Convert a real
  checkpoint with `arrowvision convert google/siglip-base-patch16-224 weights/siglip-b16.parquet`.
- arrowvision/samples/*.jpg: real photos from scikit-image (public domain), shrunk to 256 px,
  used by the demo and as default int8 calibration images.
"""

import sys
import tempfile
from pathlib import Path

from PIL import Image
from skimage import data

from arrowvision.model.convert import convert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.checkpoints import save_checkpoint  # noqa: E402  (one checkpoint builder for tests and demo)

DEMO_CONFIG = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                   image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
SAMPLES = ["astronaut", "chelsea", "coffee", "rocket", "horse", "camera", "immunohistochemistry"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), "siglip_vision", seed=0, **DEMO_CONFIG)
        print(convert(tmp, ROOT / "weights" / "siglip-demo-random.parquet", progress=False))
    samples = ROOT / "arrowvision" / "samples"
    samples.mkdir(exist_ok=True)
    for name in SAMPLES:
        array = getattr(data, name)()
        if array.dtype == bool:
            array = (~array * 255).astype("uint8")
        image = Image.fromarray(array).convert("RGB")
        image.thumbnail((256, 256))
        image.save(samples / f"{name}.jpg", quality=90)


if __name__ == "__main__":
    main()
