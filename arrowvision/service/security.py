"""Access control of the service: API key, CORS, per-client rate limit.

- ``api_key``: every request but ``/health`` (and CORS preflights) needs
  ``Authorization: Bearer KEY`` (or HTTP Basic with the key as password, which browsers send by
  themselves after one login prompt: that is how the web page and /docs work with a key),
  compared in constant time; otherwise 401 with ``WWW-Authenticate`` (Bearer for the /v1/ API,
  Basic elsewhere, so that a browser prompts). The key is never logged or echoed.
- ``cors_origins``: CORS is off unless origins are named (``*`` allows any).
- ``rate_limit``: ``N`` requests per second per client (its address), as a token bucket holding
  up to ``N`` tokens (bursts of ``N``); over it, 429 with ``Retry-After`` (whole seconds). The
  limit applies before the key check, so guessing keys is rate limited too; ``/health`` and
  ``/metrics`` are exempt (probes and scrapers).
- ``forwarded_allow_ips``: the proxies whose ``X-Forwarded-For`` names the client (none by
  default: the client is the TCP peer, so no client can choose its own rate-limit bucket).

``add_access_arguments`` and ``security_from_args`` are the one access policy of every command
that listens (``serve``, ``serve --engine ray``, ``demo --serve``): the same options, the same
refusal of a non-loopback address without a key. docs/SECURITY.md has the whole picture.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..errors import ArrowVisionError

PUBLIC_PATHS = frozenset({"/health"})
UNLIMITED_PATHS = frozenset({"/health", "/metrics"})
MAX_TRACKED_CLIENTS = 100_000  # token buckets kept (least recently seen dropped first)


@dataclass
class SecurityConfig:
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    rate_limit: float | None = None  # requests per second per client
    forwarded_allow_ips: list[str] = field(default_factory=list)  # proxies whose X-Forwarded-For is believed


def parse_forwarded_allow_ips(text: str) -> list[str]:
    """``10.0.0.5,10.1.0.0/16`` -> the proxies (addresses or networks) trusted for forwarded
    headers; ``*`` trusts every peer (only behind a proxy that overwrites the header)."""
    import ipaddress

    items = [item.strip() for item in text.split(",") if item.strip()]
    if items == ["*"]:
        return items
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ArrowVisionError(f"--forwarded-allow-ips {item!r}: expected IP addresses or networks "
                                   "(e.g. 10.0.0.5,10.1.0.0/16), or *") from None
    return items


def parse_rate(text: str) -> float:
    """``10/s``, ``10`` or ``600/min`` -> requests per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute))?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ArrowVisionError(f"rate limit {text!r}: expected N/s (e.g. 20/s) or N/min, N > 0")
    rate = float(match.group(1))
    return rate / 60 if (match.group(2) or "s").startswith("m") else rate


async def _reply(send: Any, status: int, message: str, headers: dict[str, str]) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """401 unless ``Authorization: Bearer KEY`` (constant-time comparison)."""

    def __init__(self, app: Any, api_key: str):
        if not api_key:
            raise ArrowVisionError("the API key is empty")
        self.app = app
        self.key = api_key.encode()

    def authorized(self, header: bytes) -> bool:
        scheme, _, credentials = header.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(credentials.strip(), self.key)
        if scheme.lower() == b"basic":
            try:
                password = base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(password, self.key)
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not self.authorized(given):
            reason = "missing Authorization: Bearer header" if not given else "invalid API key"
            challenge = "Bearer" if scope["path"].startswith("/v1/") else 'Basic realm="arrowvision", charset="UTF-8"'
            await _reply(send, 401, f"unauthorized: {reason}", {"WWW-Authenticate": challenge})
            return
        await self.app(scope, receive, send)


class RateLimitMiddleware:
    """Token bucket per client address; 429 with Retry-After when empty."""

    def __init__(self, app: Any, rate: float, clock: Any = time.monotonic):
        self.app = app
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.clock = clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, last time)

    def take(self, client: str) -> float:
        """0 if the request may go ahead, else the seconds until a token is free."""
        now = self.clock()
        tokens, last = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1 if tokens >= 1 else tokens, now)
        while len(self.buckets) > MAX_TRACKED_CLIENTS:
            self.buckets.popitem(last=False)
        return wait

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.take(client)
        if wait > 0:
            await _reply(send, 429, f"rate limit of {self.rate:g} requests/s exceeded; retry later",
                         {"Retry-After": str(max(1, math.ceil(wait)))})
            return
        await self.app(scope, receive, send)


def add_security(app: Any, security: SecurityConfig | None) -> None:
    """Install the middlewares (innermost first: key check, rate limit, CORS)."""
    if security is None:
        return
    if security.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=security.api_key)
    if security.rate_limit:
        app.add_middleware(RateLimitMiddleware, rate=security.rate_limit)
    if security.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(security.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"], max_age=600)


def is_loopback_host(host: str) -> bool:
    """Does ``host`` only ever mean this machine (127.0.0.0/8, ::1, localhost)?"""
    import ipaddress
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses)


def security_from_options(host: str, api_key: str | None, *, allow_unauthenticated: bool = False,
                          cors_origins: list[str] | None = None, rate_limit: float | str | None = None,
                          forwarded_allow_ips: list[str] | str | None = None) -> SecurityConfig:
    """``serve``'s access options; refuses a non-loopback address without a key (unless allowed)."""
    if api_key is not None and not api_key.strip():
        raise ArrowVisionError("the API key is empty")
    if not api_key and not allow_unauthenticated and not is_loopback_host(host):
        raise ArrowVisionError(f"refusing to listen on {host} without an API key: anyone who can reach it could use "
                               "the service; set ARROWVISION_API_KEY (or --api-key), or pass --allow-unauthenticated")
    if isinstance(forwarded_allow_ips, str):
        forwarded_allow_ips = parse_forwarded_allow_ips(forwarded_allow_ips)
    return SecurityConfig(api_key=api_key.strip() if api_key else None, cors_origins=list(cors_origins or []),
                          rate_limit=parse_rate(rate_limit) if isinstance(rate_limit, str) else rate_limit,
                          forwarded_allow_ips=list(forwarded_allow_ips or []))


def _argument_type(parse: Any) -> Any:
    import argparse

    def checked(text: str) -> Any:
        try:
            return parse(text)
        except ArrowVisionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    checked.__name__ = parse.__name__  # argparse names the type in its errors
    return checked


def add_access_arguments(parser: Any, when: str = "") -> None:
    """The access options of every command that listens (``when``: e.g. "--serve: ")."""
    group = parser.add_argument_group("access (see docs/SECURITY.md)")
    group.add_argument("--api-key", metavar="KEY", help=f"{when}require Authorization: Bearer KEY on every endpoint but /health "
                       "(default: $ARROWVISION_API_KEY; prefer the variable, command lines are visible to other users)")
    group.add_argument("--allow-unauthenticated", action="store_true",
                       help=f"{when}allow listening on a non-loopback address without an API key")
    group.add_argument("--cors-origin", action="append", metavar="ORIGIN", dest="cors_origins",
                       help=f"{when}allow browser calls from ORIGIN (repeat; * for any); CORS is off otherwise")
    group.add_argument("--rate-limit", metavar="N/s", type=_argument_type(parse_rate),
                       help=f"{when}requests per second (N/s) or minute (N/min) per client address (429 over it)")
    group.add_argument("--forwarded-allow-ips", metavar="IPS", type=_argument_type(parse_forwarded_allow_ips),
                       help=f"{when}proxies (addresses/networks, comma-separated) whose X-Forwarded-For names the client; "
                       "default none: the client is the connecting address")


def security_from_args(args: Any) -> SecurityConfig:
    """The ``SecurityConfig`` of parsed ``add_access_arguments`` options (key from the option or
    ``$ARROWVISION_API_KEY``); refuses a non-loopback ``args.host`` without a key."""
    import os

    return security_from_options(args.host, args.api_key or os.environ.get("ARROWVISION_API_KEY"),
                                 allow_unauthenticated=args.allow_unauthenticated, cors_origins=args.cors_origins,
                                 rate_limit=args.rate_limit, forwarded_allow_ips=args.forwarded_allow_ips)
