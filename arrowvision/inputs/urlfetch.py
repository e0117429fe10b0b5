"""Images by http(s) URL, fetched safely: the service (async, pooled) and ``score``/``embed`` (sync).

Every fetch streams with a byte cap (the service's upload limit), has connect/read timeouts and
a deadline for the whole fetch (so a server trickling 1 byte/s costs its own request a timeout),
follows at most ``max_redirects`` redirects itself, and sniffs the image type from the bytes
(the server's Content-Type is only quoted in errors).

SSRF guard: the host is resolved once, inside the connection step of our own httpcore network
backend; every resolved address is checked (loopback, private, link-local such as the
169.254.169.254 metadata service, unspecified, multicast, reserved and other non-global ranges
are refused) and the connection goes to the checked address, so a DNS answer that changes
between the check and the connect (rebinding) cannot slip through. Each redirect opens a new
connection and is checked again. ``allow_private`` lifts the guard for intranet use. Proxies from
the environment are ignored (they would bypass the check).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import ImageError, ImageTooLarge

USER_AGENT = "arrowvision (+https://github.com/arrowvision)"
REDIRECTS = (301, 302, 303, 307, 308)
_MAGIC = (  # (prefix, offset, type) of the image formats Pillow decodes here
    (b"\xff\xd8\xff", 0, "jpeg"), (b"\x89PNG\r\n\x1a\n", 0, "png"), (b"GIF87a", 0, "gif"), (b"GIF89a", 0, "gif"),
    (b"WEBP", 8, "webp"), (b"BM", 0, "bmp"), (b"II*\x00", 0, "tiff"), (b"MM\x00*", 0, "tiff"),
)


class UrlError(ImageError):
    """An image URL could not be fetched; ``status`` is the HTTP status the service answers."""

    status = 422


class UrlBlocked(UrlError):
    """The URL's host resolves to an address the SSRF guard refuses."""

    status = 403


class UrlTooLarge(UrlError, ImageTooLarge):
    """The response body is over the byte cap."""

    status = 413


@dataclass(frozen=True)
class UrlPolicy:
    max_bytes: int = 20 * 1024 * 1024  # the service passes its upload limit
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # longest wait for the next bytes
    total_timeout_s: float = 20.0  # the whole fetch, redirects included
    max_redirects: int = 5
    allow_private: bool = False
    max_connections: int = 100


def is_url(text: Any) -> bool:
    """An http(s) URL (as opposed to a path, base64 or a data: URI)."""
    return isinstance(text, str) and text[:8].lower().startswith(("http://", "https://"))


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 is the last 32 bits
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use: the site's own translators


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, list[ipaddress.IPv4Address]] | None:
    """The IPv4 host(s) an IPv6 address reaches through a transition mechanism: 6to4
    (2002::/16), Teredo (2001::/32: server and client) or NAT64 (64:ff9b::/96)."""
    if ip.sixtofour is not None:
        return "6to4", [ip.sixtofour]
    if ip.teredo is not None:
        return "Teredo", list(ip.teredo)
    if ip in NAT64:
        return "NAT64", [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return None


def refused_reason(address: str) -> str | None:
    """Why the guard refuses ``address`` (``None``: a public address). An IPv6 address that
    carries an IPv4 one (mapped, 6to4, Teredo, NAT64) is refused when that IPv4 address is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        elif ip in NAT64_LOCAL:
            return "local-use NAT64 (64:ff9b:1::/48)"
        elif carried := embedded_ipv4(ip):
            kind, hosts = carried
            for host in hosts:
                if reason := refused_reason(str(host)):
                    return f"{reason} IPv4 in IPv6 ({kind} of {host})"
            if kind == "NAT64":
                return None  # a public IPv4 through the well-known prefix (which Python calls reserved)
    for reason, hit in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                        ("link-local", ip.is_link_local), ("multicast", ip.is_multicast), ("private", ip.is_private),
                        ("reserved", ip.is_reserved), ("non-public", not ip.is_global)):
        if hit:
            return reason
    return None


def checked_addresses(host: str, infos: list, allow_private: bool) -> list[str]:
    """The addresses of ``getaddrinfo`` results, every one of them checked by the guard."""
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise UrlError(f"cannot resolve {host}")
    if not allow_private:
        for address in addresses:
            if reason := refused_reason(address):
                where = f"{host} is" if host.strip("[]") == address else f"{host} resolves to {address},"
                raise UrlBlocked(f"refused: {where} a {reason} address "
                                 "(allow with --allow-private-urls / allow_private_urls)")
    return addresses


def sniff_image_type(data: bytes) -> str | None:
    """The image format from the first bytes; ``None`` for anything else."""
    for magic, offset, kind in _MAGIC:
        if data[offset : offset + len(magic)] == magic and (kind != "webp" or data[:4] == b"RIFF"):
            return kind
    return None


def _checked_image(url: str, data: bytes, content_type: str | None) -> bytes:
    if not data:
        raise UrlError(f"{url}: the server sent an empty body")
    if sniff_image_type(data) is None:
        raise UrlError(f"{url}: not an image (the server said {content_type or 'no content type'}; "
                       f"the body starts with {data[:12]!r})")
    return data


def _validate(url: str) -> None:
    import httpx

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UrlError(f"{url}: not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise UrlError(f"{url}: only http and https URLs are fetched")
    if not parsed.host:
        raise UrlError(f"{url}: the URL has no host")


def _redirect_target(url: str, response: Any) -> str:
    location = response.headers.get("location")
    if not location:
        raise UrlError(f"{url}: redirect ({response.status_code}) without a Location")
    return str(response.url.join(location))


def _too_large(url: str, limit: int) -> UrlTooLarge:
    return UrlTooLarge(f"{url}: the image is larger than the {limit} bytes allowed")


def _declared_length(response: Any) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _http_failure(url: str, exc: Exception, policy: UrlPolicy) -> UrlError:
    import httpx

    if isinstance(exc, UrlError):
        return type(exc)(f"{url}: {exc}")
    if isinstance(exc, httpx.ConnectTimeout):
        return UrlError(f"{url}: timed out connecting (after {policy.connect_timeout_s} s)")
    if isinstance(exc, httpx.TimeoutException):
        return UrlError(f"{url}: timed out (no data for {policy.read_timeout_s} s)")
    return UrlError(f"{url}: cannot fetch ({type(exc).__name__}: {exc or 'connection failed'})")


def _timeout(policy: UrlPolicy) -> Any:
    import httpx

    return httpx.Timeout(connect=policy.connect_timeout_s, read=policy.read_timeout_s, write=policy.read_timeout_s,
                         pool=policy.total_timeout_s)


# ----------------------------------------------------------------------------- network backends


def _literal(host: str, port: int) -> list | None:
    """``getaddrinfo``'s answer for an IP-literal host, without a resolver round trip."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return [(None, None, None, "", (str(address), port))]


def _guarded_backends() -> tuple[type, type]:
    """httpcore network backends whose ``connect_tcp`` resolves, checks and connects to the checked address."""
    import anyio
    import httpcore

    class GuardedAsyncBackend(httpcore.AsyncNetworkBackend):
        def __init__(self, allow_private: bool):
            self.allow_private = allow_private
            self.inner = httpcore.AnyIOBackend()

        async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            try:
                with anyio.fail_after(timeout):
                    infos = _literal(host, port) or await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except TimeoutError:
                raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
            except OSError as exc:
                raise UrlError(f"cannot resolve {host} ({exc.strerror or exc})") from None
            last: Exception | None = None
            for address in checked_addresses(host, infos, self.allow_private):
                try:
                    return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as exc:
                    last = exc
            raise last  # type: ignore[misc]

        async def connect_unix_socket(self, path, timeout=None, socket_options=None):
            raise UrlBlocked("unix sockets are not fetched")

        async def sleep(self, seconds: float) -> None:
            await self.inner.sleep(seconds)

    class GuardedSyncBackend(httpcore.NetworkBackend):
        def __init__(self, allow_private: bool):
            self.allow_private = allow_private
            self.inner = httpcore.SyncBackend()

        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            try:
                infos = _literal(host, port) or socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise UrlError(f"cannot resolve {host} ({exc.strerror or exc})") from None
            last: Exception | None = None
            for address in checked_addresses(host, infos, self.allow_private):
                try:
                    return self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as exc:
                    last = exc
            raise last  # type: ignore[misc]

        def connect_unix_socket(self, path, timeout=None, socket_options=None):
            raise UrlBlocked("unix sockets are not fetched")

        def sleep(self, seconds: float) -> None:
            self.inner.sleep(seconds)

    return GuardedAsyncBackend, GuardedSyncBackend


def _transport(policy: UrlPolicy, asynchronous: bool) -> Any:
    """An httpx transport whose connection pool uses the guarded network backend."""
    import httpcore
    import httpx

    async_backend, sync_backend = _guarded_backends()
    pool_class, transport_class, backend = (
        (httpcore.AsyncConnectionPool, httpx.AsyncHTTPTransport, async_backend(policy.allow_private)) if asynchronous
        else (httpcore.ConnectionPool, httpx.HTTPTransport, sync_backend(policy.allow_private)))
    transport = transport_class(trust_env=False)
    if not hasattr(transport, "_pool"):  # httpx internals changed: fail loudly rather than unguarded
        raise RuntimeError("unsupported httpx version: cannot install the SSRF guard")
    transport._pool = pool_class(ssl_context=httpx.create_ssl_context(), max_connections=policy.max_connections,
                                 max_keepalive_connections=min(20, policy.max_connections), network_backend=backend)
    return transport


# ----------------------------------------------------------------------------- fetchers


class AsyncUrlFetcher:
    """Pooled async fetches for the service; ``close()`` when done."""

    def __init__(self, policy: UrlPolicy | None = None):
        import httpx

        self.policy = policy or UrlPolicy()
        self.client = httpx.AsyncClient(transport=_transport(self.policy, True), timeout=_timeout(self.policy),
                                        follow_redirects=False, trust_env=False,
                                        headers={"user-agent": USER_AGENT, "accept": "image/*"})

    async def fetch(self, url: str) -> bytes:
        """The image bytes at ``url``, or a ``UrlError`` naming the reason."""
        try:
            return await asyncio.wait_for(self._fetch(url), self.policy.total_timeout_s)
        except TimeoutError:
            raise UrlError(f"{url}: timed out (the whole fetch took over {self.policy.total_timeout_s} s)") from None

    async def _fetch(self, url: str) -> bytes:
        import httpx

        current = url
        try:
            for _ in range(self.policy.max_redirects + 1):
                _validate(current)
                async with self.client.stream("GET", current) as response:
                    if response.status_code in REDIRECTS:
                        current = _redirect_target(url, response)
                        continue
                    if response.status_code != 200:
                        raise UrlError(f"the server answered {response.status_code} {response.reason_phrase}".rstrip())
                    if (_declared_length(response) or 0) > self.policy.max_bytes:
                        raise _too_large(url, self.policy.max_bytes)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > self.policy.max_bytes:
                            raise _too_large(url, self.policy.max_bytes)
                    return _checked_image(url, bytes(body), response.headers.get("content-type"))
        except UrlError as exc:
            raise exc if str(exc).startswith(url) else _http_failure(url, exc, self.policy) from None
        except httpx.HTTPError as exc:
            raise _http_failure(url, exc, self.policy) from None
        raise UrlError(f"{url}: more than {self.policy.max_redirects} redirects")

    async def close(self) -> None:
        await self.client.aclose()


_shared: dict[UrlPolicy, Any] = {}
_shared_lock = threading.Lock()


def shared_fetcher(policy: UrlPolicy | None = None) -> UrlFetcher:
    """One pooled blocking fetcher per policy in this process (embed's decoding workers share it)."""
    policy = policy or UrlPolicy()
    with _shared_lock:
        if policy not in _shared:
            _shared[policy] = UrlFetcher(policy)
        return _shared[policy]


class UrlFetcher:
    """Pooled blocking fetches for ``score`` and ``embed`` (safe to share between threads)."""

    def __init__(self, policy: UrlPolicy | None = None):
        import httpx

        self.policy = policy or UrlPolicy()
        self.client = httpx.Client(transport=_transport(self.policy, False), timeout=_timeout(self.policy),
                                   follow_redirects=False, trust_env=False,
                                   headers={"user-agent": USER_AGENT, "accept": "image/*"})

    def fetch(self, url: str) -> bytes:
        """The image bytes at ``url``, or a ``UrlError`` naming the reason."""
        import httpx

        deadline = time.monotonic() + self.policy.total_timeout_s
        current = url
        try:
            for _ in range(self.policy.max_redirects + 1):
                _validate(current)
                with self.client.stream("GET", current) as response:
                    if response.status_code in REDIRECTS:
                        current = _redirect_target(url, response)
                        continue
                    if response.status_code != 200:
                        raise UrlError(f"the server answered {response.status_code} {response.reason_phrase}".rstrip())
                    if (_declared_length(response) or 0) > self.policy.max_bytes:
                        raise _too_large(url, self.policy.max_bytes)
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > self.policy.max_bytes:
                            raise _too_large(url, self.policy.max_bytes)
                        if time.monotonic() > deadline:
                            raise UrlError(f"timed out (the whole fetch took over {self.policy.total_timeout_s} s)")
                    return _checked_image(url, bytes(body), response.headers.get("content-type"))
        except UrlError as exc:
            raise exc if str(exc).startswith(url) else _http_failure(url, exc, self.policy) from None
        except httpx.HTTPError as exc:
            raise _http_failure(url, exc, self.policy) from None
        raise UrlError(f"{url}: more than {self.policy.max_redirects} redirects")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> UrlFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
