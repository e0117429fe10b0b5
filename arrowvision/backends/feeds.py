"""What a vision graph is fed: fixed-resolution pixels (N, 3, S, S) or, for SigLIP 2 NaFlex models,
a ``NaFlexBatch`` (patches, mask, patch grids; any sequence length). One place for the input
names, the checks, and example / random inputs of both kinds, shared by every exporter, backend
and the held-out validation."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BackendError
from ..inputs.naflex import DEFAULT_MAX_PATCHES, NaFlexBatch
from ..model.config import VisionConfig

FIXED_NAMES = ("pixel_values",)


def input_names(config: VisionConfig) -> tuple[str, ...]:
    return NaFlexBatch.NAMES if config.naflex else FIXED_NAMES


def model_inputs(config: VisionConfig, batch: Any) -> list[np.ndarray]:
    """The graph's positional inputs for ``batch``; a BackendError when it is the other kind."""
    if config.naflex:
        if not isinstance(batch, NaFlexBatch):
            shape = getattr(batch, "shape", None)
            raise BackendError(f"a SigLIP 2 NaFlex model takes a NaFlexBatch (patches, mask, patch grids), not "
                               f"{type(batch).__name__}{'' if shape is None else f' of shape {tuple(shape)}'}; "
                               "use VisionEncoder.encode or NaFlexPreprocessor")
        pixels, mask, shapes = batch
        return [np.ascontiguousarray(pixels, dtype=np.float32), np.ascontiguousarray(mask, dtype=np.int32),
                np.ascontiguousarray(shapes, dtype=np.int64)]
    if isinstance(batch, NaFlexBatch):
        raise BackendError(f"a fixed-resolution {config.family} model takes (N, 3, {config.image_size}, "
                           f"{config.image_size}) pixels, not a NaFlexBatch")
    return [np.ascontiguousarray(batch, dtype=np.float32)]


def named_inputs(config: VisionConfig, batch: Any) -> dict[str, np.ndarray]:
    return dict(zip(input_names(config), model_inputs(config, batch)))


def random_inputs(config: VisionConfig, rows: int, seed: int = 0) -> Any:
    """Timing / export inputs of the model's kind: a full patch budget (256) for NaFlex."""
    rng = np.random.default_rng(seed)
    if not config.naflex:
        return rng.standard_normal((rows, 3, config.image_size, config.image_size), dtype=np.float32)
    side = int(DEFAULT_MAX_PATCHES**0.5)
    dim = config.patch_size * config.patch_size * config.num_channels
    return NaFlexBatch(rng.standard_normal((rows, DEFAULT_MAX_PATCHES, dim), dtype=np.float32),
                       np.ones((rows, DEFAULT_MAX_PATCHES), np.int32), np.full((rows, 2), side, np.int64))


def export_example(config: VisionConfig) -> tuple[Any, ...]:
    """Torch example inputs to trace with: two rows; for NaFlex two different grids with padding,
    so no shape is constant-folded."""
    import torch

    if not config.naflex:
        return (torch.zeros(2, 3, config.image_size, config.image_size),)
    dim = config.patch_size * config.patch_size * config.num_channels
    mask = torch.zeros(2, 12, dtype=torch.int32)
    mask[0, :12], mask[1, :6] = 1, 1
    return torch.zeros(2, 12, dim), mask, torch.tensor([[3, 4], [2, 3]], dtype=torch.int64)


def torch_inputs(config: VisionConfig, batch: Any, device: Any = "cpu") -> list[Any]:
    import torch

    return [torch.from_numpy(part).to(device) for part in model_inputs(config, batch)]


def ov_input_shapes(config: VisionConfig) -> list[Any]:
    """OpenVINO (shape, type) of each input: batch dynamic; for NaFlex the patch count too."""
    import openvino as ov

    if not config.naflex:
        return [(ov.PartialShape([-1, 3, config.image_size, config.image_size]), ov.Type.f32)]
    dim = config.patch_size * config.patch_size * config.num_channels
    return [(ov.PartialShape([-1, -1, dim]), ov.Type.f32), (ov.PartialShape([-1, -1]), ov.Type.i32),
            (ov.PartialShape([-1, 2]), ov.Type.i64)]


def onnx_dynamic_axes(config: VisionConfig) -> dict[str, dict[int, str]]:
    axes = {"embedding": {0: "batch"}}
    if not config.naflex:
        return {"pixel_values": {0: "batch"}, **axes}
    return {"pixel_values": {0: "batch", 1: "patches"}, "pixel_attention_mask": {0: "batch", 1: "patches"},
            "spatial_shapes": {0: "batch"}, **axes}
