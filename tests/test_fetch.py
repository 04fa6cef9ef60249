"""Image URL fetches: the address policy (no SSRF into loopback, private, link-local or metadata
addresses, however spelt, directly or through a redirect, and no DNS-rebinding gap), redirects,
cancellation. Everything stays on loopback: a guard fails the test at any connect elsewhere."""

import socket
import threading
import time

import pytest

from fastvlm_mlx import fetch
from fastvlm_mlx.fetch import Cancel, FetchError, fetch_url, is_public
from reference import LocalHTTP, drip, redirect_to, send_bytes

BODY = b"\x89PNG not really"


@pytest.fixture
def connects(monkeypatch):
    """Every address a socket connects to; any but loopback fails the test before leaving."""
    seen = []
    real = socket.socket.connect

    def connect(sock, address):
        seen.append(address[0])
        assert address[0] in ("127.0.0.1", "::1"), f"a connection to {address} would leave loopback"
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


@pytest.fixture
def web():
    server = LocalHTTP({"/ok.png": send_bytes(BODY)})
    yield server
    server.close()


@pytest.mark.parametrize("address,public", [
    ("127.0.0.1", False), ("::1", False), ("10.0.0.1", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("::ffff:169.254.169.254", False),
    ("::ffff:127.0.0.1", False), ("0.0.0.0", False), ("::", False), ("224.0.0.1", False),
    ("fe80::1", False), ("fc00::1", False), ("100.64.0.1", False),
    ("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True),
])
def test_only_public_unicast_addresses_are_public(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize("host", [
    "127.0.0.1", "localhost", "169.254.169.254", "2852039166", "0xa9fea9fe", "[::ffff:169.254.169.254]",
    "10.0.0.1", "0.0.0.0", "[::1]", "127.1",
])
def test_non_public_addresses_are_refused_before_connecting(host, connects, web):
    with pytest.raises(FetchError, match="not a public address"):
        fetch_url(f"http://{host}:{web.port}/ok.png", timeout=5, max_bytes=2**20, allow_private=False)
    assert connects == [] and web.served["/ok.png"] == 0


def test_allow_private_fetches_loopback(connects, web):
    assert fetch_url(web.url("/ok.png"), timeout=5, max_bytes=2**20, allow_private=True) == BODY


def test_every_redirect_is_checked_again_before_connecting(connects, web, monkeypatch):
    """A first hop the policy lets through (loopback counted as public here) that redirects to a
    private address, or out of http(s), is refused before the second connection."""
    real = fetch.is_public
    monkeypatch.setattr(fetch, "is_public", lambda a: a == "127.0.0.1" or real(a))
    web.routes["/to-private"] = redirect_to("http://10.0.0.1/x.png")
    web.routes["/to-metadata"] = redirect_to("http://2852039166/latest/meta-data/")
    web.routes["/to-ftp"] = redirect_to("ftp://127.0.0.1/x.png")
    web.routes["/to-ok"] = redirect_to("/ok.png")
    for path, words in [("/to-private", "not a public address"),
                        ("/to-metadata", "not a public address"),
                        ("/to-ftp", "not an http")]:
        with pytest.raises(FetchError, match=words):
            fetch_url(web.url(path), timeout=5, max_bytes=2**20, allow_private=False)
    assert set(connects) == {"127.0.0.1"} and len(connects) == 3  # the first hops only
    assert fetch_url(web.url("/to-ok"), timeout=5, max_bytes=2**20, allow_private=False) == BODY


def test_the_address_connected_to_is_checked_not_only_the_resolved_one(web, monkeypatch):
    """DNS rebinding: the name resolves to a public address for the check, and the connection
    lands elsewhere (simulated: every connect goes to the local server, never to the address
    asked for). The peer's address is what counts."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port))])
    real, connects = socket.socket.connect, []

    def rebound(sock, address):
        connects.append(address[0])
        return real(sock, ("127.0.0.1", web.port))

    monkeypatch.setattr(socket.socket, "connect", rebound)
    with pytest.raises(FetchError, match="connected to 127.0.0.1, which is not a public address"):
        fetch_url(f"http://rebinding.example:{web.port}/ok.png", timeout=5, max_bytes=2**20,
                  allow_private=False)
    assert connects == ["8.8.8.8"] and web.served["/ok.png"] == 0


def test_redirects_are_bounded(web):
    web.routes["/loop"] = redirect_to("/loop")
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch_url(web.url("/loop"), timeout=5, max_bytes=2**20)
    assert web.served["/loop"] == 6


def test_cancel_ends_a_fetch_at_once(web):
    web.routes["/drip"] = drip(seconds=8)
    cancel = Cancel()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="cancelled"):
        fetch_url(web.url("/drip"), timeout=30, max_bytes=2**20, cancel=cancel)
    assert time.monotonic() - t0 < 2
    deadline = time.monotonic() + 3
    while web.open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert web.open == 0, "the server still sends to a fetch that was cancelled"
