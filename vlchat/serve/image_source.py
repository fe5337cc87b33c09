"""OpenAI `image_url.url` -> loaded RGB image for `vlchat serve`: data URLs, local files, http(s).

Refusals are ImageInputError (400; 413 when too large), one line naming only what the client sent.
Files are confined to `--image-dir` by real path. Remote fetches (only with `--allow-remote-images`)
resolve each hop's host once, check every address (SSRF) and connect to that address (DNS rebinding).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import httpx
from PIL import Image

from vlchat.errors import VlchatError
from vlchat.images import DEFAULT_MAX_PIXELS, load_image

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = {301, 302, 303, 307, 308}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True)
class ImagePolicy:
    image_dir: Path | None = None  # local files are allowed only under this directory
    allow_remote: bool = False
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    fetch_timeout_s: float = 10.0  # whole fetch, all redirect hops together
    max_redirects: int = 3


class ImageInputError(VlchatError):
    """A client's image was refused: `status` is the HTTP status (400, or 413 for too large)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def global_only(ip: IPAddress) -> bool:
    """True for publicly routable unicast addresses only (IPv4 hidden in IPv6 is checked as IPv4)."""
    ip = _unwrap(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        # 6to4 / Teredo carry an IPv4 address the relay would reach; it must be public too.
        if any(v4 is not None and not global_only(v4) for v4 in [ip.sixtofour, *(ip.teredo or ())]):
            return False
    bad = ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_private or ip.is_link_local
    return ip.is_global and not bad and not ip.is_unspecified


def resolve_image(
    url: str,
    policy: ImagePolicy,
    *,
    param: str | None = None,
    is_allowed_address: Callable[[IPAddress], bool] = global_only,
) -> Image.Image:
    """Loads the image an OpenAI `image_url.url` names, or raises ImageInputError (400/413)."""
    try:
        name, data = _read(url, policy, is_allowed_address)
        return load_image(data, max_pixels=policy.max_pixels, max_bytes=policy.max_bytes, name=name)
    except ImageInputError as err:
        err.param = param
        raise
    except VlchatError as err:
        # load_image's size refusals start with these words (see vlchat/images.py); the rest are 400.
        too_large = str(err).startswith(("image too large", "image file too large"))
        raise ImageInputError(str(err), status=413 if too_large else 400, param=param) from None


def _read(url: str, policy: ImagePolicy, is_allowed: Callable[[IPAddress], bool]) -> tuple[str, bytes]:
    """(name for messages, raw image bytes) by the URL's scheme."""
    if not url.strip():
        raise ImageInputError("image URL is empty")
    found = _SCHEME.match(url)  # RFC 3986 scheme syntax, so "dir/a:b.png" is still a path
    scheme = found.group(1).lower() if found else ""
    if scheme == "data":
        return "data URL", _data_url(url, policy.max_bytes)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageInputError("remote image URLs are disabled; start the server with --allow-remote-images")
        return _shown(url), _fetch(url, policy, is_allowed)
    if scheme == "file":
        _, parts = _split(url)
        if parts.netloc not in ("", "localhost"):
            raise ImageInputError(f"file URLs must look like file:///absolute/path, got {_shown(url)}")
        return _shown(url), _local_file(unquote(parts.path), url, policy)
    if scheme:
        raise ImageInputError(f"unsupported image URL scheme {scheme!r}: use data:, http(s):, file: or a path")
    return _shown(url), _local_file(url, url, policy)


def _data_url(url: str, max_bytes: int) -> bytes:
    """Decodes `data:image/<type>[;params];base64,<payload>` strictly, refusing oversize early."""
    header, comma, payload = url.partition(",")
    params = header[len("data:") :].split(";")
    if not comma or not params[0].lower().startswith("image/") or len(params[0]) <= len("image/"):
        raise ImageInputError("data URL must have an image media type, e.g. data:image/png;base64,...")
    if params[-1].lower() != "base64":
        raise ImageInputError("data URL must be base64-encoded (data:image/<type>;base64,...)")
    if len(payload) * 3 // 4 - 2 > max_bytes:  # cheap bound before decoding (at most 2 padding bytes)
        raise ImageInputError(f"image too large: data URL decodes to over {max_bytes} bytes", status=413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("data URL payload is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageInputError(f"image too large: data URL is {len(data)} bytes, limit is {max_bytes}", status=413)
    return data


def _local_file(path: str, given: str, policy: ImagePolicy) -> bytes:
    """Reads a file inside policy.image_dir; messages name only `given`, never the server's paths."""
    if policy.image_dir is None:
        raise ImageInputError("local image files are disabled; start the server with --image-dir DIR")
    try:
        root = os.path.realpath(policy.image_dir)
        target = os.path.realpath(os.path.join(root, path))  # an absolute `path` replaces root here
    except (ValueError, OSError):  # e.g. an embedded NUL byte
        raise ImageInputError(f"invalid image path: {_shown(given)}") from None
    if os.path.commonpath([root, target]) != root:  # checked before existence: no probing outside
        raise ImageInputError(f"image path is outside the server's image directory: {_shown(given)}")
    try:
        # O_NONBLOCK: a FIFO must not hang us; O_NOFOLLOW: a symlink swapped in after realpath() fails.
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ImageInputError(f"image not found: {_shown(given)}") from None
    except OSError as err:
        raise ImageInputError(f"cannot read image {_shown(given)}: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageInputError(f"image path is not a regular file: {_shown(given)}")
        if info.st_size > policy.max_bytes:
            raise ImageInputError(
                f"image too large: {_shown(given)} is {info.st_size} bytes, limit is {policy.max_bytes}", status=413
            )
        with open(fd, "rb", closefd=False) as f:
            return f.read(policy.max_bytes + 1)  # bounded even if the file grows meanwhile
    finally:
        os.close(fd)


def _fetch(url: str, policy: ImagePolicy, is_allowed: Callable[[IPAddress], bool]) -> bytes:
    """GETs the body, following up to max_redirects redirects by hand so every hop is checked."""
    deadline = time.monotonic() + policy.fetch_timeout_s
    # trust_env=False: an HTTP(S)_PROXY variable would otherwise connect by name, skipping the guard.
    with httpx.Client(trust_env=False, follow_redirects=False) as client:
        for _ in range(policy.max_redirects + 1):
            host, ip_url, headers, extensions = _pinned_request(url, is_allowed)
            timeout = httpx.Timeout(max(deadline - time.monotonic(), 0.001))
            try:
                with client.stream("GET", ip_url, headers=headers, extensions=extensions, timeout=timeout) as resp:
                    if resp.status_code in _REDIRECTS and "location" in resp.headers:
                        url, parts = _split(resp.headers["location"], base=url)  # the name's URL, not the IP's
                        if parts.scheme.lower() not in ("http", "https"):
                            raise ImageInputError(f"remote image redirected to a non-http URL: {_shown(url)}")
                        continue
                    if not 200 <= resp.status_code < 300:
                        raise ImageInputError(f"remote image fetch failed: HTTP {resp.status_code} from {host}")
                    return _read_body(resp, policy.max_bytes, deadline, host)
            except httpx.TimeoutException:
                limit = policy.fetch_timeout_s
                raise ImageInputError(f"remote image fetch from {host} timed out after {limit}s") from None
            except (httpx.HTTPError, httpx.InvalidURL) as err:
                raise ImageInputError(f"remote image fetch from {host} failed ({type(err).__name__})") from None
    raise ImageInputError(f"remote image URL made more than {policy.max_redirects} redirects")


def _pinned_request(url: str, is_allowed: Callable[[IPAddress], bool]) -> tuple[str, str, dict, dict]:
    """(host, URL with the checked IP in place of the name, headers, httpx extensions)."""
    _, parts = _split(url)
    try:
        host = (parts.hostname or "").encode("idna").decode("ascii")
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)  # ValueError if out of range
        if not host:
            raise ValueError("no host")
    except (UnicodeError, ValueError):
        raise ImageInputError(f"invalid remote image URL: {_shown(url)}") from None
    ip, by_name = _checked_address(host, port, is_allowed)
    ip_url = parts._replace(netloc=f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}", fragment="").geturl()
    host_header = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    # No userinfo is sent; identity encoding keeps a compressed body from expanding past max_bytes at once.
    headers = {"Host": host_header, "Accept": "image/*", "Accept-Encoding": "identity"}
    # TLS still verifies the certificate against the name: httpcore uses sni_hostname as server_hostname.
    extensions = {"sni_hostname": host} if by_name and parts.scheme.lower() == "https" else {}
    return host, ip_url, headers, extensions


def _checked_address(host: str, port: int, is_allowed: Callable[[IPAddress], bool]) -> tuple[IPAddress, bool]:
    """(first address, whether `host` was a name); refused if ANY address `host` has fails the guard."""
    try:
        addresses, by_name = [_ip(host)], False
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise ImageInputError(f"cannot resolve remote image host {host}") from None
        addresses, by_name = [_ip(info[4][0]) for info in infos], True
    if not addresses or not all(is_allowed(ip) for ip in addresses):
        raise ImageInputError(f"remote image host {host} is not allowed (not a public address)")
    return addresses[0], by_name


def _read_body(resp: httpx.Response, max_bytes: int, deadline: float, host: str) -> bytes:
    """Streams the body, stopping at max_bytes (413) or the overall deadline (slow drips)."""
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageInputError(f"image too large: {host} sent {declared} bytes, limit is {max_bytes}", status=413)
    body = bytearray()
    for chunk in resp.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise ImageInputError(f"image too large: {host} sent over {max_bytes} bytes", status=413)
        if time.monotonic() > deadline:  # per-read timeouts alone let a slow drip run on
            raise httpx.ReadTimeout("overall fetch deadline passed")
    return bytes(body)


def _split(url: str, base: str | None = None) -> tuple[str, SplitResult]:
    """(absolute URL, its parts); a redirect's Location is resolved against `base`."""
    try:
        url = urljoin(base, url) if base else url
        return url, urlsplit(url)
    except ValueError:  # e.g. an unclosed "[" in the host
        raise ImageInputError(f"invalid image URL: {_shown(url)}") from None


def _ip(text: str) -> IPAddress:
    return _unwrap(ipaddress.ip_address(text.split("%")[0]))  # a zone (fe80::1%eth0) is dropped


def _unwrap(ip: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d -> a.b.c.d, so IPv4 rules apply to IPv4-mapped IPv6 addresses."""
    return getattr(ip, "ipv4_mapped", None) or ip


def _shown(text: str, limit: int = 200) -> str:
    """The client's string as it may appear in a one-line message: printable, bounded."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."
