"""Image URLs against a real local HTTP server: fetching, the SSRF guard (also on redirects),
byte cap, timeouts of a trickling server, and URLs in `score` tables and `embed` lists."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from arrowvision.inputs import urlfetch
from arrowvision.inputs.urlfetch import AsyncUrlFetcher, UrlBlocked, UrlError, UrlFetcher, UrlPolicy, UrlTooLarge

from .servers import PHOTOS, SAMPLES, PhotoServer

OPEN = UrlPolicy(allow_private=True, max_bytes=2_000_000)


@pytest.fixture(scope="module")
def photos():
    with PhotoServer() as server:
        yield server


@pytest.fixture
def public_host(monkeypatch):
    """A second server on 127.0.0.2 that the guard treats as a public address (the rest of
    127.0.0.0/8 stays refused): lets a redirect from a 'public' host to 127.0.0.1 be tested."""
    real = urlfetch.refused_reason
    monkeypatch.setattr(urlfetch, "refused_reason", lambda address: None if address == "127.0.0.2" else real(address))
    with PhotoServer("127.0.0.2") as server:
        yield server


def fetch(url: str, policy: UrlPolicy = OPEN) -> bytes:
    with UrlFetcher(policy) as fetcher:
        return fetcher.fetch(url)


def afetch(url: str, policy: UrlPolicy = OPEN) -> bytes:
    async def run():
        fetcher = AsyncUrlFetcher(policy)
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.close()

    return asyncio.run(run())


@pytest.mark.parametrize("get", [fetch, afetch], ids=["sync", "async"])
def test_fetches_photos_and_follows_redirects(photos, get):
    assert get(photos.photo(1)) == PHOTOS[SAMPLES[1].name]
    assert get(photos.url("/hops/3")) == PHOTOS[SAMPLES[0].name]
    with pytest.raises(UrlError, match="more than 5 redirects"):
        get(photos.url("/hops/6"))


@pytest.mark.parametrize("get", [fetch, afetch], ids=["sync", "async"])
@pytest.mark.parametrize(("path", "error", "message"), [
    ("/page.html", UrlError, r"not an image \(the server said text/html"),
    ("/missing", UrlError, "the server answered 404"),
    ("/declared-big", UrlTooLarge, "larger than the 2000000 bytes allowed"),
    ("/streamed-big?bytes=3000000", UrlTooLarge, "larger than the 2000000 bytes allowed"),
])
def test_bad_responses_are_named(photos, get, path, error, message):
    with pytest.raises(error, match=message) as info:
        get(photos.url(path))
    assert str(info.value).startswith(photos.url(path))
    assert info.value.status == (413 if error is UrlTooLarge else 422)


@pytest.mark.parametrize("get", [fetch, afetch], ids=["sync", "async"])
@pytest.mark.parametrize(("url", "reason"), [
    ("http://127.0.0.1:{port}/photos/x.jpg", "loopback"),
    ("http://localhost:{port}/photos/x.jpg", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.1.2.3/x.jpg", "private"),
    ("http://0.0.0.0:{port}/", "unspecified"),
    ("http://[::1]:{port}/", "loopback"),
])
def test_guard_refuses_internal_addresses(photos, get, url, reason):
    url = url.format(port=photos.port)
    before = len(photos.server.hits)
    with pytest.raises(UrlBlocked, match=f"a {reason} address") as info:
        get(url, UrlPolicy())
    assert info.value.status == 403 and "--allow-private-urls" in str(info.value)
    assert len(photos.server.hits) == before  # refused before connecting


@pytest.mark.parametrize(("address", "reason"), [
    ("2002:7f00:1::1", "loopback IPv4 in IPv6 (6to4 of 127.0.0.1)"),
    ("2002:a9fe:a9fe::1", "link-local IPv4 in IPv6 (6to4 of 169.254.169.254)"),
    ("2002:c0a8:101::", "private IPv4 in IPv6 (6to4 of 192.168.1.1)"),
    ("64:ff9b::7f00:1", "loopback IPv4 in IPv6 (NAT64 of 127.0.0.1)"),
    ("64:ff9b::a9fe:a9fe", "link-local IPv4 in IPv6 (NAT64 of 169.254.169.254)"),
    ("64:ff9b::a00:1", "private IPv4 in IPv6 (NAT64 of 10.0.0.1)"),
    ("64:ff9b:1::808:808", "local-use NAT64 (64:ff9b:1::/48)"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private IPv4 in IPv6 (Teredo of 192.0.2.45)"),  # RFC 4380's example
    ("2001:0:808:808::80ff:fffe", "loopback IPv4 in IPv6 (Teredo of 127.0.0.1)"),  # the client is stored inverted
])
def test_guard_refuses_ipv4_carried_in_ipv6(address, reason, photos):
    """6to4, NAT64 and Teredo addresses reach the IPv4 host they embed: refused when that host
    is internal (offline: the guard refuses before any connection)."""
    assert urlfetch.refused_reason(address) == reason
    before = len(photos.server.hits)
    with pytest.raises(UrlBlocked, match=re.escape(f"a {reason} address")):
        fetch(f"http://[{address}]:{photos.port}/photos/x.jpg", UrlPolicy())
    assert len(photos.server.hits) == before


def test_guard_passes_ipv6_transition_addresses_of_public_hosts():
    for address in ("2002:808:808::1", "64:ff9b::808:808", "2606:4700:4700::1111", "8.8.8.8", "::ffff:8.8.8.8"):
        assert urlfetch.refused_reason(address) is None, address


@pytest.mark.parametrize("get", [fetch, afetch], ids=["sync", "async"])
def test_redirect_to_loopback_is_refused_at_the_hop(photos, public_host, get):
    assert get(public_host.photo(2), UrlPolicy()) == PHOTOS[SAMPLES[2].name]  # the 'public' host is fetched
    before = len(photos.server.hits)
    with pytest.raises(UrlBlocked, match="127.0.0.1 is a loopback address"):
        get(public_host.url(f"/redirect?to={photos.photo(0)}"), UrlPolicy())
    assert len(photos.server.hits) == before  # the redirect target was never contacted
    assert get(public_host.url(f"/redirect?to={photos.photo(0)}")) == PHOTOS[SAMPLES[0].name]  # allowed: followed


def test_dns_answer_is_checked_and_connected_to(photos, monkeypatch):
    """The guard connects to the address it checked: a name resolving to loopback is refused
    even when the URL names no IP, and one resolving to an allowed address is fetched from it."""
    import socket

    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host  # anyio passes IDNA-encoded bytes
        return real("127.0.0.1" if name == "photos.example" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    url = f"http://photos.example:{photos.port}/photos/{SAMPLES[0].name}"
    with pytest.raises(UrlBlocked, match="photos.example resolves to 127.0.0.1, a loopback address"):
        fetch(url, UrlPolicy())
    assert fetch(url) == PHOTOS[SAMPLES[0].name]


@pytest.mark.parametrize("get", [fetch, afetch], ids=["sync", "async"])
def test_dns_rebinding_cannot_swap_the_checked_address(photos, public_host, monkeypatch, get):
    """A resolver whose first answer is a 'public' address and every later one loopback (DNS
    rebinding): the fetch goes to the address that was checked, never to a second lookup's."""
    import socket

    real = socket.getaddrinfo
    answers = iter(["127.0.0.2"])

    def rebinding(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host  # anyio passes IDNA-encoded bytes
        return real(next(answers, "127.0.0.1") if name == "rebind.example" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert public_host.port != photos.port
    url = f"http://rebind.example:{public_host.port}/photos/{SAMPLES[3].name}"
    before = len(photos.server.hits), len(public_host.server.hits)
    assert get(url, UrlPolicy()) == PHOTOS[SAMPLES[3].name]
    assert len(public_host.server.hits) == before[1] + 1 and len(photos.server.hits) == before[0]


def test_bad_urls():
    for url, message in (("ftp://example.com/x.jpg", "only http and https"), ("http:///x.jpg", "no host"),
                         ("http://nonexistent.invalid/x.jpg", "cannot resolve")):
        with pytest.raises(UrlError, match=message):
            fetch(url, UrlPolicy())


def test_a_trickling_server_times_out_without_stalling_other_fetches(photos):
    """1 byte/s: the trickle costs its own fetch a timeout; the other fetches finish meanwhile."""
    policy = UrlPolicy(allow_private=True, total_timeout_s=3, read_timeout_s=5)
    finished: list[str] = []

    async def run():
        fetcher = AsyncUrlFetcher(policy)

        async def one(label: str, url: str):
            try:
                return await fetcher.fetch(url)
            finally:
                finished.append(label)

        try:
            return await asyncio.gather(one("trickle", photos.url("/trickle")),
                                        *(one(f"photo{i}", photos.photo(i % len(SAMPLES))) for i in range(8)),
                                        return_exceptions=True)
        finally:
            await fetcher.close()

    results = asyncio.run(run())
    assert isinstance(results[0], UrlError) and "timed out" in str(results[0]), results[0]
    assert all(isinstance(r, bytes) for r in results[1:])
    assert finished[-1] == "trickle"  # every photo was answered while the trickle was still going
    with pytest.raises(UrlError, match="timed out"):
        fetch(photos.url("/trickle"), UrlPolicy(allow_private=True, total_timeout_s=2, read_timeout_s=5))


def test_sniffing_uses_the_bytes():
    assert urlfetch.sniff_image_type(PHOTOS[SAMPLES[0].name]) == "jpeg"
    assert urlfetch.sniff_image_type(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert urlfetch.sniff_image_type(b"<html>") is None


# ----------------------------------------------------------------------------- score and embed


@pytest.fixture(scope="module")
def image_text_model(siglip_all_parquet):
    import arrowvision

    return arrowvision.ImageTextModel.from_parquet(siglip_all_parquet)


def test_score_table_with_urls(photos, image_text_model, tmp_path):
    import pyarrow as pa

    from arrowvision.datasets.score_pairs import score_pairs

    local = tmp_path / SAMPLES[0].name
    local.write_bytes(PHOTOS[SAMPLES[0].name])
    images = [photos.photo(0), str(local), photos.url("/page.html"), "http://nonexistent.invalid/x.jpg", photos.url("/hops/2")]
    pq.write_table(pa.table({"image": images, "text": ["a cat"] * len(images)}), tmp_path / "pairs.parquet")
    stats = score_pairs(image_text_model, tmp_path / "pairs.parquet", tmp_path / "out.parquet", progress=False,
                        url_policy=UrlPolicy(allow_private=True))
    out = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert (stats.scored, stats.failed) == (3, 2)
    assert out["error"][0] is None and out["clip_score"][0] == pytest.approx(out["clip_score"][1], abs=1e-4)
    assert out["clip_score"][4] == pytest.approx(out["clip_score"][0], abs=1e-4)  # /hops/2 ends at the same photo
    assert "not an image" in out["error"][2]
    assert "cannot resolve nonexistent.invalid" in out["error"][3]
    guarded = score_pairs(image_text_model, tmp_path / "pairs.parquet", tmp_path / "guarded.csv", progress=False)
    assert (guarded.scored, guarded.failed) == (1, 4)  # the guard on: only the local file is scored
    from pyarrow import csv

    errors = csv.read_csv(tmp_path / "guarded.csv").column("error").to_pylist()
    assert [e is not None and "loopback address" in e for e in errors] == [True, False, True, False, True]


def test_embed_list_with_urls(photos, tmp_path):
    from arrowvision import VisionEncoder
    from arrowvision.datasets.pipeline import ERRORS_DIR, collect_inputs, embed_paths, read_embeddings

    encoder = VisionEncoder.from_parquet(SAMPLES[0].parents[2] / "weights" / "siglip-demo-random.parquet")
    listing = tmp_path / "inputs.csv"
    urls = [photos.photo(0), photos.photo(1), photos.url("/missing"), photos.url("/streamed-big?bytes=3000000")]
    listing.write_text("url\n" + "\n".join(urls) + "\n")
    paths = collect_inputs(str(listing))
    assert paths == urls  # URLs are kept as they are
    stats = embed_paths(encoder, paths, tmp_path / "out", progress=False,
                        url_policy=UrlPolicy(allow_private=True, max_bytes=2_000_000))
    assert (stats.embedded, stats.failed) == (2, 2)
    table = read_embeddings(tmp_path / "out").to_pydict()
    assert table["path"] == urls[:2] and table["relpath"] == urls[:2]
    expected = encoder.encode([PHOTOS[SAMPLES[0].name], PHOTOS[SAMPLES[1].name]])
    np.testing.assert_allclose(np.array(table["embedding"]), expected, atol=1e-5)
    errors = pq.read_table(next((tmp_path / "out" / ERRORS_DIR).glob("*.parquet"))).to_pydict()
    assert errors["path"] == urls[2:]
    assert "404" in errors["error"][0] and "larger than" in errors["error"][1]
    guarded = embed_paths(encoder, paths, tmp_path / "out", progress=False)  # guard on: retried and refused
    assert guarded.skipped == 2 and guarded.failed == 2
    assert all("loopback" in reason for _, reason in guarded.errors)


def test_cli_score_and_embed_take_urls_with_allow_private(photos, siglip_all_parquet, tmp_path, capsys):
    from arrowvision.cli import EXIT_OK, EXIT_PARTIAL, main

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,text\n{photos.photo(0)},a cat\n{photos.url('/missing')},a dog\n")
    common = ["--weights", str(siglip_all_parquet), "--backend", "torch", "--no-progress"]
    assert main(["score", str(pairs), "-o", str(tmp_path / "scored.csv"), *common]) == EXIT_PARTIAL  # guard on: both fail
    assert "2 failed" in capsys.readouterr().out
    assert main(["score", str(pairs), "-o", str(tmp_path / "scored.csv"), "--allow-private-urls", *common]) == EXIT_PARTIAL
    assert "1 scored, 1 failed" in capsys.readouterr().out
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{photos.photo(0)}\n{photos.photo(1)}\n")
    embed = ["embed", str(listing), "-o", str(tmp_path / "out"), *common]
    assert main(embed) == EXIT_PARTIAL and "loopback address" in capsys.readouterr().err
    assert main([*embed, "--allow-private-urls"]) == EXIT_OK
    assert "2 embedded" in capsys.readouterr().out
