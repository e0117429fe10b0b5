"""Open a bundle with the runtime install alone: OpenVINO or ONNX Runtime, numpy, the tokenizers;
never torch, nncf or transformers.

A lossy artifact (or the choice of ``--backend auto``) was validated on the CPU that made the
bundle. int8 kernels differ between CPUs (VNNI or not) and ``auto``'s choice was the fastest
*there*, so on another CPU the artifact is re-validated against the fp32 reference embeddings
stored in the bundle (the held-out images ship with the package) before it serves, and replaced
by the bundled fp32 artifact when it fails or cannot run here. Either way a warning says so.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.artifacts import cache_root
from ..backends.cpu import cpu_info
from ..backends.validation import DEFAULT_MIN_COSINE, accuracy_by_kind, check_accuracy, heldout_pixels, summarize
from ..errors import BackendError, BundleError, ConversionError
from ..model.config import VisionConfig
from ..model.text_config import TextConfig
from .manifest import CACHE, BundleSource, check_listing, read_manifest, verify_checksums

SMALL_FILE_BYTES = 1 << 20

log = logging.getLogger("arrowvision")


class Bundle:
    """A verified bundle folder: its manifest, configs, and loaders for each tower's backend."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.manifest = read_manifest(self.path)
        check_listing(self.path, self.manifest)
        # Small files are checked now; the large artifacts and cache blobs are hashed on a thread while
        # the runtime compiles (their sizes already match: a same-size edit only changes numbers), and
        # every loader waits for that check before it returns a backend.
        files = {**self.manifest["files"], **self.manifest.get("compiled_cache_files", {})}
        verify_checksums(self.path, {k: v for k, v in files.items() if v["bytes"] <= SMALL_FILE_BYTES})
        large = {k: v for k, v in files.items() if v["bytes"] > SMALL_FILE_BYTES}
        self._checking = ThreadPoolExecutor(1, thread_name_prefix="arrowvision-bundle-check")
        self._checked = self._checking.submit(verify_checksums, self.path, large)
        self._checking.shutdown(wait=False)
        try:
            config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
            vision = {k: tuple(v) if k in ("image_mean", "image_std") else v for k, v in config["vision"].items()}
            self.vision_config = VisionConfig(**vision)
            self.text_config = TextConfig(**config["text"]) if config.get("text") else None
        except (OSError, TypeError, ValueError, AttributeError, KeyError, ConversionError) as exc:
            raise BundleError(f"bundle {self.path}: its config does not describe a model ({exc}); rebuild it") from None
        self.source = BundleSource(self.path, str(self.manifest["weights"]["checksum"]))
        self.logit_scale, self.logit_bias = config.get("logit_scale"), config.get("logit_bias")
        self.notes: list[str] = []  # what loading decided (re-validated, fell back), also logged

    @property
    def has_text(self) -> bool:
        return self.text_config is not None and "text" in self.manifest

    @property
    def made_on_this_cpu(self) -> bool:
        return self.manifest["cpu"].get("signature") == cpu_info().signature()

    def compiled_dir(self) -> Path:
        """OpenVINO's compiled-model cache: the bundle's own when writable (valid for the CPU and
        path it was made at), else the user's cache."""
        own = self.path / CACHE
        if own.is_dir() and os.access(own, os.W_OK):
            return own
        return cache_root() / "compiled"

    def vision_backend(self, *, mode: str = "latency", num_threads: int | None = None, min_cosine: float | None = None):
        """The image tower's backend, re-validated or replaced by the fp32 fallback when needed."""
        def open_artifact(artifact: dict[str, Any]):
            path = self.path / artifact["path"]
            if artifact["backend"] == "onnxruntime":
                from ..backends.onnxruntime_backend import ONNXRuntimeBackend

                return ONNXRuntimeBackend.from_file(path, self.vision_config, artifact["precision"],
                                                    report=artifact.get("accuracy"), num_threads=num_threads)
            from ..backends.openvino_backend import OpenVINOBackend

            return OpenVINOBackend.from_ir(path, self.vision_config, artifact["precision"], report=artifact.get("accuracy"),
                                           mode=mode, num_threads=num_threads, compiled_dir=self.compiled_dir())

        return self._load("vision", open_artifact, lambda: heldout_pixels(self.vision_config), min_cosine)

    def text_backend(self, *, num_threads: int | None = None, min_cosine: float | None = None):
        """The text tower's backend (OpenVINO), re-validated or replaced like the image tower's."""
        if not self.has_text:
            raise BundleError(f"bundle {self.path} holds the image tower only; make it with `arrowvision bundle --tower all`")
        from ..backends.openvino_text import VALIDATION_TEXTS, OpenVINOTextBackend

        def open_artifact(artifact: dict[str, Any]):
            return OpenVINOTextBackend.from_ir(self.path / artifact["path"], artifact["precision"], report=artifact.get("accuracy"),
                                               num_threads=num_threads, compiled_dir=self.compiled_dir())

        tokenizer = self.tokenizer()
        return self._load("text", open_artifact, lambda: {k: tokenizer(v) for k, v in VALIDATION_TEXTS.items()}, min_cosine)

    def tokenizer(self):
        from ..model.tokenizer import load_tokenizer

        self.verified()  # a tokenizer.json may be large enough to be checked on the thread
        folder = self.path / "tokenizer"
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}
        return load_tokenizer(files, self.text_config)

    def verified(self) -> None:
        """Wait for the checksums of the large files; ``BundleError`` if one differs."""
        self._checked.result()

    def _load(self, tower: str, open_artifact, inputs, min_cosine: float | None):
        section = self.manifest.get(tower)
        if not isinstance(section, dict) or not isinstance(section.get("artifact"), dict):
            raise BundleError(f"bundle {self.path}: its manifest has no {tower} artifact; rebuild it")
        artifact, fallback = section["artifact"], section.get("fallback")
        threshold = max(min_cosine or 0.0, float(self.manifest.get("min_cosine", DEFAULT_MIN_COSINE)))
        try:
            backend = open_artifact(artifact)
            self.verified()  # before re-validating: a re-validation of edited files says nothing
            self._check_here(tower, artifact, backend, inputs, threshold, min_cosine)
        except BackendError as exc:
            if not fallback:
                raise BundleError(f"bundle {self.path}: its {tower} artifact ({artifact['backend']} {artifact['precision']}) "
                                  f"cannot serve here: {exc}") from None
            self._note(f"bundle {tower} tower: {artifact['backend']} {artifact['precision']} does not hold here ({exc}); "
                       f"falling back to its {fallback['backend']} {fallback['precision']} artifact")
            backend = open_artifact(fallback)
        self.verified()
        return backend

    def _check_here(self, tower: str, artifact: dict[str, Any], backend: Any, inputs, threshold: float,
                    min_cosine: float | None) -> None:
        """On another CPU, measure a lossy or auto-chosen artifact against the stored reference;
        on this one, hold its recorded accuracy to a stricter ``min_cosine`` if one is asked for."""
        lossy = artifact["precision"] != "fp32"
        if self.made_on_this_cpu or not (lossy or self.manifest.get("requested_backend") == "auto"):
            if min_cosine is not None and artifact.get("accuracy", {}).get("by_kind"):
                check_accuracy(artifact["precision"], artifact["accuracy"]["by_kind"], threshold)
            return
        made_on = self.manifest["cpu"].get("describe", "another CPU")
        reference = self.reference(tower)
        report = accuracy_by_kind(reference, backend, inputs())
        check_accuracy(artifact["precision"], report, threshold)
        backend.report = summarize(report)
        chosen = " (auto's choice there; the fastest here may differ: rebuild the bundle on this CPU to re-measure)" \
            if self.manifest.get("requested_backend") == "auto" else ""
        self._note(f"bundle {tower} tower: {artifact['backend']} {artifact['precision']} was made on {made_on}; "
                   f"re-validated on this CPU ({cpu_info().model}): min cosine {backend.report['min_cosine']:.5f} >= "
                   f"{threshold}{chosen}")

    def reference(self, tower: str) -> dict[str, np.ndarray]:
        with np.load(self.path / "reference" / f"{tower}.npz", allow_pickle=False) as stored:
            return {kind: stored[kind] for kind in stored.files}

    def _note(self, message: str) -> None:
        self.notes.append(message)
        log.warning("%s", message)


def open_bundle(path: str | os.PathLike) -> Bundle:
    """The bundle at ``path``, every file checked against the manifest (``BundleError`` if not)."""
    return Bundle(path)
