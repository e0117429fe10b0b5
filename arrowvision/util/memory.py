"""This process's memory: what is resident (anonymous vs file-backed), and handing the resident
pages of read-only weight mappings back to the kernel once a runtime has repacked them.

Why: OpenVINO maps the IR's ``model.bin`` (or its compiled-cache blob) and its CPU plugin repacks
every MatMul weight into its own (anonymous) memory, in part at compile time and the rest at the
first inference. The mapping stays referenced, and the pages read while repacking stay resident,
so fp32 weights were counted twice in RSS (SigLIP-B/16: 340 MB mapped + 340 MB repacked). Those
pages are clean page-cache pages of a read-only mapping: ``madvise(MADV_DONTNEED)`` takes them
out of this process's RSS without losing anything (a later read faults them back in from the
page cache; the few the plugin still reads, biases and norms, come back within ~20 MB). Linux
only; elsewhere nothing is released.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from pathlib import Path

MADV_DONTNEED = 4
_STATUS_FIELDS = {"VmHWM": "peak", "VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}


def memory_usage() -> dict[str, int]:
    """Bytes of this process: ``peak`` (VmHWM, the resident high-water mark), ``rss`` now, and
    its ``anon``ymous and ``file``-backed parts. Empty where /proc is not available."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    usage = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            usage[_STATUS_FIELDS[key]] = int(value.split()[0]) * 1024
    return usage


def _libc_madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def _weight_mappings(paths: list[str]) -> Iterable[tuple[int, int]]:
    """(start, end) of each shared read-only mapping of one of ``paths`` (files, or folders whose
    files count): its pages are the page cache's, so dropping them never loses data. (A private
    mapping could hold copied-on-write pages; OpenVINO maps weights shared.)"""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1] == "r--s":
            name = fields[5]
            if any(name == path or name.startswith(path + os.sep) for path in paths):
                start, end = (int(value, 16) for value in fields[0].split("-"))
                yield start, end


def release_mapped_pages(paths: Iterable[str | os.PathLike]) -> int:
    """Drop this process's resident pages of read-only mappings of ``paths`` (a file, or every
    file under a folder); return how many bytes of mappings were advised (0 off Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    resolved = [os.path.realpath(path) for path in paths]
    try:
        madvise = _libc_madvise()
        ranges = list(_weight_mappings(resolved))
    except (OSError, AttributeError):  # no /proc, no libc symbol: nothing to release
        return 0
    released = 0
    for start, end in ranges:
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
    return released


class MappedWeights:
    """The files a runtime maps its weights from (an IR's ``.bin``, a compiled-cache folder), whose
    resident pages are released after compiling and once more after the first inference, when
    the runtime has repacked every weight into its own memory."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.paths = [Path(path) for path in paths]
        self.repacked = False
        self.released = release_mapped_pages(self.paths)

    def after_call(self) -> None:
        """Call after each inference: the first one releases the pages it read while repacking."""
        if not self.repacked:
            self.repacked = True
            self.released = release_mapped_pages(self.paths)
