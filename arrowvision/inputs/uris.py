"""Inputs named by URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``...), read through pyarrow's
filesystems, so a corpus on object storage needs no copy: the engines read each object where
they decode it (on Ray, inside the worker). Credentials come from the usual places (the AWS/GCS
environment variables and config files pyarrow reads). A ``file://`` URI is just a local path.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote, urlparse

from ..errors import ArrowVisionError

URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(text: str) -> bool:
    return bool(URI.match(text))


def is_remote(text: str) -> bool:
    """A URI that is not a plain local ``file://`` path."""
    return is_uri(text) and not text.lower().startswith("file://")


def local_path(uri: str) -> str:
    """``file:///a/b%20c.jpg`` -> ``/a/b c.jpg``."""
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ArrowVisionError(f"{uri}: a file:// URI names a local path (file:///...), not host {parsed.netloc!r}")
    return unquote(parsed.path)


@lru_cache(maxsize=32)
def _filesystem(scheme_and_host: str):
    from pyarrow.fs import FileSystem

    return FileSystem.from_uri(scheme_and_host + "/")[0]


def _split(uri: str):
    """-> (pyarrow filesystem, path inside it); one filesystem per scheme + bucket, reused."""
    parsed = urlparse(uri)
    try:
        filesystem = _filesystem(f"{parsed.scheme}://{parsed.netloc}")
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError...: all one problem
        raise ArrowVisionError(f"{uri}: cannot open its filesystem ({exc})") from None
    return filesystem, f"{parsed.netloc}{parsed.path}" if parsed.scheme not in ("file", "hdfs") else parsed.path


def read_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of the object ``uri``; OSError (with ``strerror``) when it is missing, not a
    file or larger than ``max_bytes``."""
    from pyarrow.fs import FileType

    try:
        filesystem, path = _split(uri)
    except ArrowVisionError as exc:
        raise OSError(5, str(exc)) from None
    try:
        info = filesystem.get_file_info(path)
    except OSError as exc:  # network, permissions: pyarrow's message names the cause
        raise OSError(exc.errno or 5, exc.strerror or str(exc)) from None
    if info.type == FileType.NotFound:
        raise OSError(2, "No such file or object")
    if info.type != FileType.File:
        raise OSError(21, "not a file")
    if info.size is not None and info.size > max_bytes:
        raise OSError(27, f"{info.size} bytes, larger than the {max_bytes} allowed")
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def list_uri(uri: str, extensions: set[str]) -> list[str]:
    """Every object under the prefix ``uri`` (recursive) with one of ``extensions``, sorted, as
    URIs; a URI naming one object gives that object."""
    from pyarrow.fs import FileSelector, FileType

    filesystem, path = _split(uri)
    scheme = urlparse(uri).scheme
    try:
        info = filesystem.get_file_info(path)
        if info.type == FileType.File:
            return [uri]
        if info.type == FileType.NotFound:
            raise ArrowVisionError(f"{uri}: no such object or prefix")
        found = filesystem.get_file_info(FileSelector(path, recursive=True))
    except OSError as exc:
        raise ArrowVisionError(f"{uri}: cannot list ({exc})") from None
    names = sorted(f.path for f in found if f.type == FileType.File and _suffix(f.path) in extensions)
    prefix = f"{scheme}://" if scheme not in ("file", "hdfs") else f"{scheme}://{urlparse(uri).netloc}"
    return [prefix + name for name in names]


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
