"""benchmarks/gpu.py's end-to-end section: ``embed_paths`` per decode mode on a JPEG folder (and
its hard-linked copies, for steady state) vs transformers + DataLoader + SiglipImageProcessor."""

from __future__ import annotations

import os
import shutil
import time
import traceback
from pathlib import Path

import numpy as np
from gpu_common import RESULTS, elapsed, hf_model, save, say, section



def embed_row(encoder, paths, out: Path, label: str, batch: int, workers: int, mode: str, pool: str = "auto") -> tuple[dict, np.ndarray]:
    """One ``embed_paths`` run (after a warm-up run on two batches: cuDNN, pinned memory, forks)."""
    from arrowvision.datasets.pipeline import embed_paths, read_embeddings

    warm = out.parent / "warm"
    for folder in (out, warm):
        shutil.rmtree(folder, ignore_errors=True)
    embed_paths(encoder, paths[: 2 * batch], warm, batch_size=batch, workers=workers, progress=False, decode=mode,
                decode_pool=pool)
    stats = embed_paths(encoder, paths, out, batch_size=batch, workers=workers, progress=False, decode=mode, decode_pool=pool)
    inside = stats.embedded / stats.inference_seconds if stats.inference_seconds else 0.0
    row = {"pipeline": label, "images": len(paths), "img_per_s": round(stats.images_per_second, 1), "embedded": stats.embedded,
           "failed": stats.failed, "model_busy_pct": round(100 * stats.model_busy, 1),
           "input_wait_pct": round(100 * stats.input_wait_seconds / stats.seconds, 1) if stats.seconds else 0.0,
           "model_rate_inside_run": round(inside, 1), "seconds": round(stats.seconds, 2)}
    table = read_embeddings(out)
    order = np.argsort(table.column("path").to_pylist())
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[order]
    for folder in (out, warm):
        shutil.rmtree(folder, ignore_errors=True)
    return row, vectors


def decode_only(encoder, paths, mode: str, batch: int, workers: int, torch, device) -> float:
    """img/s of the feeder alone (worker processes; gpu: plus nvJPEG + resize on the device, with
    the share of JPEGs ``embed`` leaves to the workers), start-up included."""
    from arrowvision.inputs.decode import gpu_cpu_share
    from arrowvision.inputs.feeder import Feeder

    gpu = None
    if mode == "gpu":
        from arrowvision.inputs.gpu_decode import GpuDecoder

        gpu = GpuDecoder(encoder.preprocessor, encoder.backend)
    feeder = Feeder(encoder.preprocessor, batch_size=batch, workers=workers, mode=mode, pool="process",
                    cpu_share=gpu_cpu_share(workers) if mode == "gpu" else 0.0)
    done, tick = 0, time.perf_counter()
    for fed in feeder.batches(paths):
        if gpu is not None:
            ok, _staged = gpu.assemble(fed.decoded, fed.pixels, fed.jpegs)
            done += len(ok)
        else:
            done += len(fed.decoded)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - tick)


def steady_corpus(images: list[str], copies: int, work: Path) -> list[str]:
    """``copies`` x the JPEG folder as hard links: distinct paths (own rows), no extra bytes to write."""
    paths = list(images)
    for copy in range(1, copies):
        folder = work / f"jpegs-link{copy}"
        folder.mkdir(parents=True, exist_ok=True)
        for image in images:
            target = folder / Path(image).name
            if not target.exists():
                os.link(image, target)
            paths.append(str(target))
    return paths


def end_to_end_section(torch, tf, hf_folder, parquet, device, images, args) -> None:
    from arrowvision import VisionEncoder

    workers = args.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    batch = 16 if args.tiny else args.batch_size
    rows = []
    RESULTS["sections"]["end_to_end"] = rows
    encoder = VisionEncoder.from_parquet(parquet, backend="torch", device=str(device))
    work = Path(args.work)
    large = steady_corpus(images, args.steady_copies, work) if args.steady_copies > 1 else []
    say(f"  {len(images)} JPEGs 640x480 (steady state: {len(large) or 'off'}), batch {batch}, {workers} workers, "
        f"torch {encoder.backend.precision} on {device}, CUDA graphs {'on' if encoder.backend.graphs is not None else 'off'}")
    modes = ["exact", "fast", "gpu"] if device.type == "cuda" or args.tiny else ["exact", "fast"]
    modes = [mode for mode in modes if mode in args.e2e_modes]

    def show(row: dict) -> None:
        rows.append(row)
        say(f"  {row['pipeline']:<34} " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "pipeline"))
        save(args.out)

    for mode in modes:  # decode ceilings: what the workers (and nvJPEG) deliver without the model
        if device.type != "cuda" and mode == "gpu":
            continue
        try:
            show({"pipeline": f"decode only --decode {mode}", "images": len(images),
                  "img_per_s": round(decode_only(encoder, images, mode, batch, workers, torch, device), 1)})
        except Exception as exc:  # noqa: BLE001
            show({"pipeline": f"decode only --decode {mode}", "error": f"{type(exc).__name__}: {exc}"})
    embeddings = {}
    variants = [(mode, "process" if mode == "exact" else "auto") for mode in modes]
    if not args.quick and "exact" in modes:
        variants.append(("exact", "thread"))  # the old way: decoding threads in the model's process
    for mode, pool in variants:
        if args.budget and elapsed() > args.budget:
            say(f"  embed --decode {mode}: skipped (budget)")
            continue
        label = f"embed --decode {mode}" + {"auto": "", "process": " (processes)", "thread": " (threads)"}[pool]
        for paths in [images] + ([large] if large and pool != "thread" else []):
            try:
                row, vectors = embed_row(encoder, paths, work / "e2e", label, batch, workers, mode, pool)
                if paths is images:
                    embeddings.setdefault(mode, vectors)
                    if mode != "exact" and "exact" in embeddings:
                        cos = (vectors * embeddings["exact"]).sum(1)
                        row.update(min_cosine_vs_exact=float(cos.min()), mean_cosine_vs_exact=float(cos.mean()))
            except Exception as exc:  # noqa: BLE001 - report and go on
                row = {"pipeline": label, "images": len(paths), "error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            show(row)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.compile and not (args.budget and elapsed() > args.budget):
        mode = "gpu" if device.type == "cuda" else "fast"
        label = f"embed --decode {mode} --compile"
        try:
            tick = time.perf_counter()
            compiled = VisionEncoder.from_parquet(parquet, backend="torch", device=str(device), compile=True)
            for paths in [images] + ([large] if large else []):
                row, _ = embed_row(compiled, paths, work / "e2e", label, batch, workers, mode)
                row["load_compile_warmup_s"] = round(time.perf_counter() - tick, 1)
                show(row)
                tick = time.perf_counter()
            del compiled
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            show({"pipeline": label, "error": f"{type(exc).__name__}: {exc}"})
    for paths in ([images] + ([large] if large else [])) if "peer" in args.sections else []:
        if not section(f"end to end: transformers + DataLoader peer, {len(paths)} JPEGs", args):
            break
        try:
            row = dataloader_peer(torch, tf, hf_folder, device, paths, workers, batch, args)
        except Exception as exc:  # noqa: BLE001
            row = {"pipeline": "transformers bf16 + DataLoader", "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        show(row)


class _Files:
    """A map-style dataset: path -> the HF processor's pixel_values (what a user would write)."""

    def __init__(self, paths, processor):
        self.paths, self.processor = paths, processor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def dataloader_peer(torch, tf, hf_folder, device, images, workers, batch, args) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = hf_model(torch, tf, hf_folder, device, dtype)
    processor = tf.SiglipImageProcessor(size={"height": args.image_size, "width": args.image_size})
    loader = torch.utils.data.DataLoader(_Files(images, processor), batch_size=batch, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    outputs, busy = 0, 0.0
    tick = time.perf_counter()
    with torch.inference_mode():
        for pixels in loader:
            start = time.perf_counter()
            pooled = model(pixel_values=pixels.to(device, dtype, non_blocking=True)).pooler_output
            outputs += len(pooled.float().cpu())
            busy += time.perf_counter() - start
    seconds = time.perf_counter() - tick
    return {"pipeline": f"transformers {'bf16' if dtype == torch.bfloat16 else 'fp32'} + DataLoader({workers} workers) "
                        "+ SiglipImageProcessor", "images": len(images), "img_per_s": round(outputs / seconds, 1),
            "embedded": outputs,
            "model_busy_pct": round(100 * busy / seconds, 1), "seconds": round(seconds, 2)}
