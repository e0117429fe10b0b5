"""What ``arrowvision info`` says about a weights file: one structured report (its ``--json``),
and the lines a person reads.

Parameters are counted per tower (vision, text, and the shared ``logit_scale``/``logit_bias``);
tokenizer files stored with a text tower are bytes, reported apart, never counted as parameters.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import ArrowVisionError
from ..model.text_config import TEXT_TENSOR_PREFIXES
from ..weights.format import TOKENIZER_PREFIX

SHARED_TENSORS = ("logit_scale", "logit_bias")


def tensor_part(name: str) -> str:
    """Which part of the model a tensor belongs to: vision, text, shared or tokenizer (a vision-only
    file may name its tensors without the ``vision_model.`` prefix)."""
    if name.startswith(TOKENIZER_PREFIX):
        return "tokenizer"
    if name.startswith(TEXT_TENSOR_PREFIXES):
        return "text"
    if name in SHARED_TENSORS:
        return "shared"
    return "vision"


def describe_weights(path: str, verify: bool = False) -> dict[str, Any]:
    """The ``info`` report of the weights file ``path`` (JSON-ready)."""
    from ..model.config import VisionConfig
    from ..weights.format import WeightLoader

    start = time.perf_counter()
    weights = WeightLoader(path, verify=verify)
    elapsed = time.perf_counter() - start
    model_tensors = [info for info in weights.tensors() if tensor_part(info.name) != "tokenizer"]
    by_tower: Counter = Counter()
    for info in model_tensors:
        by_tower[tensor_part(info.name)] += math.prod(info.shape)
    tokenizer = {name: len(data) for name, data in weights.tokenizer_files().items()}
    return {
        "path": str(weights.path),
        "family": weights.family,
        "tower": weights.tower,
        "tensors": len(model_tensors),
        "parameters": sum(by_tower.values()),
        "parameters_by_tower": {part: by_tower[part] for part in ("vision", "text", "shared") if by_tower[part]},
        "bytes": sum(info.nbytes for info in model_tensors),
        "dtypes": dict(Counter(info.dtype for info in model_tensors)),
        "tokenizer": {"files": sorted(tokenizer), "bytes": sum(tokenizer.values())} if tokenizer else None,
        "zero_copy": weights.zero_copy,
        "weights_checksum": weights.checksum,
        "checksums_verified": bool(verify),
        "source": _portable_source(weights.source),
        "vision_config": _config_or_error(lambda: VisionConfig.from_hf(weights.config).to_dict()),
        "text_config": _text_config(weights) if by_tower["text"] else None,
        "auto_choice": _auto_choice(weights),
        "exports": _exports(weights),
        "load_ms": round(elapsed * 1000, 2),
    }


def _config_or_error(build) -> dict[str, Any]:
    try:
        return build()
    except ArrowVisionError as exc:
        return {"error": str(exc)}


def _text_config(weights) -> dict[str, Any]:
    from ..model.text_config import TextConfig

    return _config_or_error(lambda: TextConfig.from_weights(weights).to_dict())


def _portable_source(source: dict) -> dict:
    """The conversion source without paths of temporary build folders."""
    temp = Path(tempfile.gettempdir()).resolve()
    path = source.get("path")
    if isinstance(path, str) and (Path(path).resolve() == temp or temp in Path(path).resolve().parents):
        return {k: v for k, v in source.items() if k != "path"}
    return dict(source)


def _auto_choice(weights) -> dict[str, Any] | None:
    """What ``--backend auto`` runs for this model on this CPU: None if not measured yet."""
    try:
        from ..backends.auto import remembered_choice

        record = remembered_choice(weights)
    except (ArrowVisionError, OSError, ValueError) as exc:
        return {"error": str(exc)}
    if record is None:
        return None
    return {key: record.get(key) for key in ("backend", "precision", "cpu", "min_cosine", "measured_at")}


def _exports(weights) -> list[dict[str, Any]]:
    """Cached exports of this model, with their held-out accuracy vs fp32 (per kind for lossy ones)."""
    from ..backends.artifacts import cached_exports

    return [{"format": meta["format"], "tower": meta.get("tower", "vision"), "precision": meta.get("precision"),
             "path": meta["path"], "max_abs": meta.get("max_abs"), "min_cosine": meta.get("min_cosine"),
             "min_cosine_by_kind": {k: v["min_cosine"] for k, v in meta["by_kind"].items()} if meta.get("by_kind") else None}
            for meta in cached_exports(weights.checksum)]


def report_lines(report: dict[str, Any]) -> dict[str, str | list[str]]:
    """The report as ``label: text`` lines (a list: one line per item)."""
    source = report["source"]
    dtypes = Counter(report["dtypes"])
    towers = report["parameters_by_tower"]
    tokenizer = report["tokenizer"]
    lines: dict[str, str | list[str]] = {
        "path": report["path"],
        "model": f"{report['family'] or '?'} ({report['tower'] or '?'} tower)",
        "tensors": f"{report['tensors']} ({', '.join(f'{count} {dtype}' for dtype, count in dtypes.most_common())})",
        "parameters": f"{report['parameters']:,}" + (f" ({', '.join(f'{k} {v:,}' for k, v in towers.items())})"
                                                     if len(towers) > 1 else ""),
        "size": f"{report['bytes'] / 2**20:.1f} MiB of tensors",
        "zero-copy": "yes" if report["zero_copy"] else "no (decoded with pyarrow)",
        "checksum": report["weights_checksum"],
        "checksums": "verified" if report["checksums_verified"] else "not verified (use --verify)",
        "source": " ".join(str(source[k]) for k in ("type", "repo_id", "revision", "path") if source.get(k)) or "unknown",
        "vision": describe_vision(report["vision_config"]),
    }
    if report["text_config"] is not None:
        lines["text"] = describe_text(report["text_config"])
    if tokenizer:
        lines["tokenizer"] = f"{', '.join(tokenizer['files'])} ({tokenizer['bytes'] / 1024:.1f} KiB, not parameters)"
    lines["auto choice"] = _describe_auto(report["auto_choice"])
    lines["exports"] = [_describe_export(export) for export in report["exports"]] or ["none cached"]
    lines["load time"] = f"{report['load_ms']:.1f} ms"
    return lines


def describe_vision(vision: dict[str, Any]) -> str:
    if "error" in vision:
        return f"not loadable: {vision['error']}"
    text = (f"{vision['image_size']}px, patch {vision['patch_size']}, width {vision['hidden_size']}, "
            f"{vision['num_layers']} layers, {vision['num_heads']} heads, mlp {vision['intermediate_size']}")
    return text + (f", projection {vision['projection_dim']}" if vision.get("projection_dim") else "")


def describe_text(text: dict[str, Any]) -> str:
    if "error" in text:
        return f"not loadable: {text['error']}"
    return (f"vocab {text['vocab_size']:,}, {text['max_positions']} tokens, width {text['hidden_size']}, "
            f"{text['num_layers']} layers, {text['num_heads']} heads, mlp {text['intermediate_size']}, "
            f"projection {text['projection_dim']}")


def _describe_auto(choice: dict[str, Any] | None) -> str:
    if choice is None:
        return "not measured on this CPU yet (the first --backend auto use measures it)"
    if "error" in choice:
        return f"unknown ({choice['error']})"
    return f"{choice['backend']} {choice['precision']} on {choice['cpu']}"


def _describe_export(export: dict[str, Any]) -> str:
    kinds = export["min_cosine_by_kind"]
    accuracy = (", ".join(f"{k} {v:.4f}" for k, v in kinds.items()) if kinds
                else f"max abs {export['max_abs']:.1e}" if export["max_abs"] is not None else "exact (fp32)")
    tower = "" if export["tower"] == "vision" else f" ({export['tower']} tower)"
    return f"{export['format']} {export['precision']}{tower}: {accuracy}"
