"""The service's limits and timeouts (``serve``'s options), in one place every module reads."""

from __future__ import annotations

from dataclasses import dataclass

from ..inputs.preprocess import MAX_PIXELS
from ..inputs.urlfetch import UrlPolicy


@dataclass
class ServiceConfig:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    max_batch_items: int = 64  # images per /v1/embed/batch request
    request_timeout_s: float = 30.0
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (408 after)
    decode_threads: int = 2
    max_texts: int = 64  # texts per /v1/embed/text or /v1/score request (413 above)
    max_text_chars: int = 1000  # characters per text (422 above)
    allow_private_urls: bool = False  # image URLs may point at loopback/private/link-local hosts
    url_timeout_s: float = 20.0  # a whole image-URL fetch, redirects included
    url_connect_timeout_s: float = 5.0
    url_read_timeout_s: float = 10.0  # longest silence while fetching
    url_max_redirects: int = 5

    def url_policy(self) -> UrlPolicy:
        """Image URLs: the upload byte limit, these timeouts, the SSRF guard unless allowed."""
        return UrlPolicy(max_bytes=self.max_body_bytes, connect_timeout_s=self.url_connect_timeout_s,
                         read_timeout_s=self.url_read_timeout_s, total_timeout_s=self.url_timeout_s,
                         max_redirects=self.url_max_redirects, allow_private=self.allow_private_urls)
