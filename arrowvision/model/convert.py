"""Convert a Hugging Face SigLIP/CLIP checkpoint (hub id, folder or .safetensors file) to Parquet.

Checkpoint files are read with safetensors or ``torch.load(weights_only=True)``; never with
unrestricted pickle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConversionError, FormatError
from ..util.safejson import MAX_CONFIG_BYTES, load_json
from ..weights.format import TOKENIZER_PREFIX
from ..weights.writer import write_weights
from .config import FAMILIES, VisionConfig, tensor_problems
from .text_config import TextConfig

TOWER_PREFIXES = {
    "vision": ("vision_model.", "visual_projection."),
    "text": ("text_model.", "text_projection."),
    "all": ("",),
}
log = logging.getLogger("arrowvision")
DTYPE_CHOICES = ("keep", "float32", "float16", "bfloat16")
# Tokenizer files stored with the text tower (whichever the checkpoint has), so one Parquet
# file is all ``ImageTextModel`` needs.
TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
SAFETENSORS_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]
BIN_PATTERNS = ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", *TOKENIZER_FILES]
TEXT_TOWER_TENSOR = "text_model.embeddings.token_embedding.weight"


@dataclass
class Checkpoint:
    """A resolved checkpoint: its config, its weight files and where it came from."""

    config: dict[str, Any]
    weight_files: list[Path]
    source: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # where tokenizer files are looked up

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer files present beside the weights, by name."""
        if self.folder is None:
            return {}
        found = {}
        for name in TOKENIZER_FILES:
            path = self.folder / name
            if path.is_file():
                try:
                    found[name] = path.read_bytes()
                except OSError as exc:
                    raise ConversionError(f"unreadable tokenizer file {path}: {exc.strerror}") from None
        return found


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"missing config: {path} not found (a HF checkpoint needs config.json)")
    try:
        config = load_json(path.read_bytes(), str(path), max_bytes=MAX_CONFIG_BYTES)
    except (OSError, FormatError) as exc:
        raise ConversionError(f"unreadable config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"config {path} is not a JSON object")
    return config


def _weight_files(folder: Path) -> list[Path]:
    """Weight files of a HF folder: safetensors (single or sharded) preferred over .bin."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = load_json(index.read_bytes(), str(index))["weight_map"]
                shards = [folder / name for name in sorted(set(weight_map.values()))]
            except (OSError, FormatError, KeyError, TypeError, AttributeError) as exc:
                raise ConversionError(f"unreadable shard index {index}: {exc!r}") from None
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise ConversionError(f"shard index {index} names missing files: {', '.join(missing)}")
            return shards
        if (folder / single).is_file():
            return [folder / single]
    raise ConversionError(f"no weights in {folder}: expected model.safetensors, a sharded index, or pytorch_model.bin")


def resolve_checkpoint(source: str, *, revision: str | None = None, config_path: str | None = None) -> Checkpoint:
    """Turn a hub id, a local folder, or a single .safetensors file into a Checkpoint."""
    path = Path(source).expanduser()
    if path.is_dir():
        config = _read_config(Path(config_path) if config_path else path / "config.json")
        return Checkpoint(config, _weight_files(path), {"type": "local", "path": str(path.resolve())}, path)
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin"):
            raise ConversionError(f"{path}: expected a folder, a .safetensors or .bin file, or a hub id")
        config = _read_config(Path(config_path) if config_path else path.parent / "config.json")
        return Checkpoint(config, [path], {"type": "local", "path": str(path.resolve())}, path.parent)
    if source.count("/") > 1 or source.startswith((".", "/", "~")):
        raise ConversionError(f"{source}: no such file or folder")
    return _download(source, revision)


def _download(repo_id: str, revision: str | None) -> Checkpoint:
    """Fetch a checkpoint from the hub (or its local cache when HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SAFETENSORS_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=BIN_PATTERNS))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else " (no network and not cached?)"
        raise ConversionError(f"cannot fetch {repo_id!r} from the Hugging Face hub{hint}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ConversionError(f"cannot fetch {repo_id!r} from the Hugging Face hub: {exc}") from None
    source = {"type": "hub", "repo_id": repo_id, "revision": folder.name, "requested_revision": revision or "main"}
    return Checkpoint(_read_config(folder / "config.json"), _weight_files(folder), source, folder)


def _load_state_dict(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """Yield (name, torch tensor) from safetensors or weights-only torch files."""
    import torch
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(state, dict):
                    raise ConversionError(f"{file}: expected a state dict, got {type(state).__name__}")
                yield from state.items()
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:
            raise ConversionError(f"unreadable checkpoint file {file}: {exc}") from None
        except Exception as exc:  # torch's weights-only unpickler raises UnpicklingError and others
            if isinstance(exc, ConversionError):
                raise
            raise ConversionError(f"unreadable checkpoint file {file}: {type(exc).__name__}: {exc}") from None


def _to_numpy(name: str, tensor: Any, dtype: str) -> np.ndarray:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise ConversionError(f"tensor {name!r} is a {type(tensor).__name__}, not a tensor")
    if dtype != "keep" and tensor.is_floating_point():
        tensor = tensor.to(getattr(torch, dtype))
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if tensor.dtype not in (torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        raise ConversionError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
    return tensor.numpy()


def _file_checksum(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def check_tensors(config: VisionConfig | TextConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fail with the list of missing, unexpected or misshapen vision (or text) tensors."""
    problems = config.tensor_problems(shapes) if isinstance(config, TextConfig) else tensor_problems(config, shapes)
    if problems:
        raise ConversionError("checkpoint does not match its config; " + "; ".join(problems))


def convert(
    source: str,
    output: str | os.PathLike,
    *,
    tower: str = "vision",
    dtype: str = "keep",
    revision: str | None = None,
    config_path: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert ``source`` to a Parquet weights file at ``output``; returns a summary dict."""
    if tower not in TOWER_PREFIXES:
        raise ConversionError(f"unknown tower {tower!r}; choose from {', '.join(TOWER_PREFIXES)}")
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPE_CHOICES)}")
    start = time.perf_counter()
    checkpoint = resolve_checkpoint(source, revision=revision, config_path=config_path)
    model_type = checkpoint.config.get("model_type")
    if model_type not in FAMILIES:
        raise ConversionError(f"unsupported model family {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[model_type]
    vision_config = VisionConfig.from_hf(checkpoint.config)

    vision_only = model_type.endswith("_vision_model")  # the whole checkpoint is the vision tower
    if vision_only and tower == "text":
        raise ConversionError(f"{source} is a vision-only checkpoint ({model_type}); it has no text tower")
    prefixes = ("",) if vision_only else TOWER_PREFIXES[tower]
    selected = [(n, t) for n, t in _load_state_dict(checkpoint.weight_files) if n.startswith(prefixes)]
    selected = [(n, t) for n, t in selected if not n.endswith("position_ids")]  # non-persistent buffers
    if not selected:
        raise ConversionError(f"no {tower} tensors found in {source} (names should start with {' or '.join(prefixes)})")
    if tower in ("vision", "all"):
        vision_names = prefixes if vision_only else TOWER_PREFIXES["vision"]
        check_tensors(vision_config, {n: tuple(t.shape) for n, t in selected if n.startswith(vision_names)})

    tokenizer: dict[str, bytes] = {}
    if tower in ("text", "all") and not vision_only:
        if not any(n == TEXT_TOWER_TENSOR for n, _ in selected):
            raise ConversionError(f"{source} has no text tower (no tensor {TEXT_TOWER_TENSOR}); convert it with --tower vision")
        check_tensors(TextConfig.from_hf(checkpoint.config), {n: tuple(t.shape) for n, t in selected if n.startswith(TOWER_PREFIXES["text"])})
        tokenizer = checkpoint.tokenizer_files()
        if not tokenizer:  # the weights are still worth converting; text encoding will say what is missing
            log.warning("%s: no tokenizer files beside the weights (%s); texts cannot be tokenized from this file",
                        source, ", ".join(TOKENIZER_FILES[:3]))

    total = sum(t.numel() * t.element_size() for _, t in selected)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress, leave=False)
    try:
        summary = write_weights(
            output,
            _with_tokenizer(((name, _to_numpy(name, tensor, dtype)) for name, tensor in selected), tokenizer),
            config=checkpoint.config,
            family=family,
            source=checkpoint.source,
            source_checksum=_file_checksum(checkpoint.weight_files),
            tower=tower,
            on_tensor=lambda _name, nbytes: bar.update(nbytes),
        )
    finally:
        bar.close()
    summary.update({"output": str(output), "family": family, "tower": tower, "seconds": time.perf_counter() - start})
    return summary


def _with_tokenizer(tensors: Iterator[tuple[str, np.ndarray]], files: dict[str, bytes]) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors, then each tokenizer file as a ``tokenizer/<name>`` uint8 row (see docs/FORMAT.md)."""
    yield from tensors
    for name, data in files.items():
        yield TOKENIZER_PREFIX + name, np.frombuffer(data, dtype=np.uint8)


def format_summary(summary: dict[str, Any]) -> str:
    return (
        f"wrote {summary['output']}: {summary['family']} {summary['tower']} tower, {summary['tensors']} tensors, "
        f"{summary['parameters']:,} parameters, {summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.2f} s\n"
        f"weights checksum {summary['weights_checksum']}"
    )
