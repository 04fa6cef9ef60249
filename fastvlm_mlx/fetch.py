"""Image URLs: an http(s) GET with a total deadline, a cap on the body and an address policy.

- The deadline bounds the whole fetch (connecting, every redirect, the body), not each read: a
  watchdog shuts the socket when it passes, so a drip-fed body cannot hold a thread for longer.
- `allow_private=False` (the server's default) refuses every address that is not public:
  loopback, private, link-local (cloud metadata at 169.254.169.254), multicast, unspecified and
  reserved ones, however they are spelt (decimal `2852039166`, IPv4-mapped IPv6). The host is
  resolved once per hop, the connection goes to an address that was checked, and the address
  actually connected to is checked again, so DNS cannot pass one address and serve another.
  Redirects are followed here, at most MAX_REDIRECTS, each hop checked the same way, and only
  to http(s). No proxy is used then (a proxy would resolve the name itself).
- A `Cancel` set from another thread ends the fetches given it at once (the server drops the
  fetches of a client that has left).
"""

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from typing import Callable, List, Optional

from .config import InputError

MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
CHUNK_BYTES = 64 * 2**10


class FetchError(InputError):
    """An image URL that could not be fetched; the message says why, in one line."""


def is_public(address: str) -> bool:
    """Whether ADDRESS (an IP literal) is a public unicast address; IPv4-mapped IPv6 addresses
    are judged as the IPv4 address they carry."""
    ip = ipaddress.ip_address(address.split("%")[0])  # (an IPv6 scope id is no part of it)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class Cancel:
    """Ends fetches from another thread: `set()` runs every closer given to `add` (each shuts a
    socket, so that a blocked read returns at once); a closer added after `set()` runs at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._set = False
        self._closers: List[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            self._set, closers, self._closers = True, self._closers, []
        for close in closers:
            close()

    def is_set(self) -> bool:
        return self._set

    def add(self, close: Callable[[], None]) -> None:
        with self._lock:
            if not self._set:
                self._closers.append(close)
                return
        close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected (yet, or any more)
        pass


def _connect(host: str, port: int, timeout: float, allow_private: bool) -> socket.socket:
    """A socket connected to HOST:PORT; unless ALLOW_PRIVATE, only after every address the
    name resolves to was found public, and only if the peer connected to is public too."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError(f"cannot resolve {host}: {e}") from None
    if not allow_private:
        refused = [info[4][0] for info in infos if not is_public(info[4][0])]
        if refused:
            raise FetchError(f"{host} resolves to {refused[0]}, which is not a public address")
    error: Optional[OSError] = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as e:
            sock.close()
            error = e
            continue
        peer = sock.getpeername()[0]
        if not allow_private and not is_public(peer):
            sock.close()
            raise FetchError(f"{host} connected to {peer}, which is not a public address")
        return sock
    raise FetchError(f"cannot connect to {host}:{port}: {error}")


def _proxy_for(scheme: str, host: str) -> Optional[urllib.parse.SplitResult]:
    """The proxy the environment names for SCHEME and HOST (http_proxy, https_proxy, no_proxy)."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")


def _open(scheme: str, host: str, port: int, remaining: float, allow_private: bool,
          guard: Cancel):
    """(a connection to HOST:PORT, whether requests name the whole URL: a plain-http proxy),
    its socket watched by GUARD."""
    context = ssl.create_default_context() if scheme == "https" else None
    proxy = _proxy_for(scheme, host) if allow_private else None
    if proxy is not None:
        via = (proxy.hostname, proxy.port or 80)
        if scheme == "https":
            conn = http.client.HTTPSConnection(*via, timeout=remaining, context=context)
            conn.set_tunnel(host, port)
        else:
            conn = http.client.HTTPConnection(*via, timeout=remaining)
        conn.connect()
        guard.add(lambda: _shut(conn.sock))
        return conn, scheme == "http"
    sock = _connect(host, port, remaining, allow_private)
    guard.add(lambda: _shut(sock))
    if context is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=remaining, context=context)
        sock = context.wrap_socket(sock, server_hostname=host)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=remaining)
    conn.sock = sock  # connected to the address checked above; http.client does not connect again
    return conn, False


def fetch_url(url: str, timeout: float, max_bytes: int, allow_private: bool = True,
              cancel: Optional[Cancel] = None) -> bytes:
    """GET URL (http or https) within TIMEOUT seconds in all, refusing a body over MAX_BYTES;
    unless ALLOW_PRIVATE, only from public addresses (see the module's docstring). CANCEL, when
    set, ends the fetch. Any failure is a FetchError."""
    started = time.monotonic()
    guard = Cancel()  # set at the deadline, or with CANCEL
    timer = threading.Timer(timeout, guard.set)
    timer.daemon = True
    timer.start()
    if cancel is not None:
        cancel.add(guard.set)
    try:
        return _get(url, started + timeout, max_bytes, allow_private, guard)
    except FetchError as e:
        reason = str(e)
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = str(e) or type(e).__name__
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif guard.is_set():
            reason = f"it took longer than {timeout:g} s"
    finally:
        timer.cancel()
        guard.set()  # closes what is still open
    raise FetchError(f"cannot fetch image URL {url}: {reason}")


def _get(url: str, deadline: float, max_bytes: int, allow_private: bool, guard: Cancel) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"{url} is not an http(s) URL with a host")
        port = parts.port or (443 if parts.scheme == "https" else 80)  # ValueError if out of range
        remaining = deadline - time.monotonic()
        if remaining <= 0 or guard.is_set():
            raise OSError("no time left")
        conn, whole_url = _open(parts.scheme, parts.hostname, port, remaining, allow_private, guard)
        target = urllib.parse.urlunsplit(
            parts._replace(fragment="") if whole_url else ("", "", parts.path or "/", parts.query, ""))
        conn.request("GET", target, headers={"User-Agent": "fastvlm-mlx", "Accept": "image/*"})
        response = conn.getresponse()
        if response.status in REDIRECT_STATUSES and response.getheader("Location"):
            url = urllib.parse.urljoin(url, response.getheader("Location"))
            conn.close()
            continue
        if response.status != 200:
            raise FetchError(f"HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"its body is {int(length)} bytes, over the cap of {max_bytes}")
        body = bytearray()
        while len(body) <= max_bytes:
            chunk = response.read(CHUNK_BYTES)
            if not chunk:
                break
            body += chunk
        if guard.is_set():  # the watchdog shut the socket: what was read is not the whole body
            raise OSError("cut off")
        if len(body) > max_bytes:
            raise FetchError(f"its body is over the cap of {max_bytes} bytes")
        return bytes(body)
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")
