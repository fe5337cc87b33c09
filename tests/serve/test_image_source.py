"""resolve_image: data URLs, confined local files, and guarded remote fetches against a real local server."""

from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import os
import sys
import threading
import time

import pytest
from PIL import Image

from vlchat.serve.image_source import ImageInputError, ImagePolicy, global_only, resolve_image


def png_bytes(size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def refused(url: str, policy: ImagePolicy, status: int = 400, **kwargs) -> str:
    with pytest.raises(ImageInputError) as info:
        resolve_image(url, policy, **kwargs)
    assert info.value.status == status
    message = str(info.value)
    assert "\n" not in message
    return message


def allow_all(ip) -> bool:
    return True


# --- data URLs ---------------------------------------------------------------------------------


def test_data_url_loads_rgb_image_of_the_right_size():
    image = resolve_image(data_url(png_bytes((8, 6))), ImagePolicy())
    assert image.mode == "RGB" and image.size == (8, 6)


def test_data_url_bad_base64_is_400():
    assert "base64" in refused("data:image/png;base64,@@not*base64@@", ImagePolicy())


def test_data_url_wrong_mime_or_encoding_is_400():
    payload = base64.b64encode(png_bytes()).decode()
    assert "image media type" in refused(f"data:text/plain;base64,{payload}", ImagePolicy())
    assert "image media type" in refused(f"data:;base64,{payload}", ImagePolicy())
    assert "base64-encoded" in refused("data:image/png,rawbytes", ImagePolicy())


def test_data_url_not_an_image_is_400():
    assert "not an image" in refused(data_url(b"hello, not a png"), ImagePolicy())


def test_data_url_too_large_is_413_and_param_is_kept():
    data = png_bytes((64, 64))
    message = refused(data_url(data), ImagePolicy(max_bytes=len(data) - 1), 413, param="messages[0].content[1]")
    assert "too large" in message
    with pytest.raises(ImageInputError) as info:
        resolve_image(data_url(data), ImagePolicy(max_bytes=10), param="messages[0].content[1]")
    assert info.value.param == "messages[0].content[1]"


def test_data_url_oversize_is_refused_from_the_encoded_length_before_decoding():
    # Not valid base64 at all: a 413 (not a 400) shows the size check came first.
    assert "too large" in refused("data:image/png;base64," + "*" * 4000, ImagePolicy(max_bytes=1000), 413)


def test_too_many_pixels_is_413():
    assert "too large" in refused(data_url(png_bytes((50, 50))), ImagePolicy(max_pixels=100), 413)


def test_unknown_scheme_and_empty_url_are_400():
    assert "unsupported image URL scheme 'ftp'" in refused("ftp://example.com/a.png", ImagePolicy())
    assert "empty" in refused("  ", ImagePolicy())


# --- local files -------------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.png").write_bytes(png_bytes((5, 7)))
    (root / "my pic.png").write_bytes(png_bytes((3, 4)))
    (tmp_path / "secret.png").write_bytes(png_bytes((9, 9)))
    return root


def test_local_files_refused_without_image_dir(image_dir):
    assert "--image-dir" in refused("sub/cat.png", ImagePolicy())
    assert "--image-dir" in refused(f"file://{image_dir}/sub/cat.png", ImagePolicy())


def test_local_file_inside_dir_loads(image_dir):
    policy = ImagePolicy(image_dir=image_dir)
    assert resolve_image("sub/cat.png", policy).size == (5, 7)
    assert resolve_image(f"file://{image_dir}/sub/cat.png", policy).size == (5, 7)
    assert resolve_image(f"file://{image_dir}/my%20pic.png", policy).size == (3, 4)
    assert resolve_image(str(image_dir / "sub" / "cat.png"), policy).size == (5, 7)


def test_image_dir_may_itself_be_reached_through_a_symlink(image_dir, tmp_path):
    (tmp_path / "link").symlink_to(image_dir)
    assert resolve_image("sub/cat.png", ImagePolicy(image_dir=tmp_path / "link")).size == (5, 7)


def test_dotdot_traversal_is_refused(image_dir):
    policy = ImagePolicy(image_dir=image_dir)
    assert "outside" in refused("../secret.png", policy)
    assert "outside" in refused("sub/../../secret.png", policy)
    assert "outside" in refused(f"file://{image_dir}/../secret.png", policy)


def test_symlink_escaping_the_dir_is_refused(image_dir, tmp_path):
    (image_dir / "escape.png").symlink_to(tmp_path / "secret.png")
    (image_dir / "inner.png").symlink_to(image_dir / "sub" / "cat.png")
    policy = ImagePolicy(image_dir=image_dir)
    assert "outside" in refused("escape.png", policy)
    assert resolve_image("inner.png", policy).size == (5, 7)  # links that stay inside are fine


def test_absolute_path_outside_is_refused(image_dir, tmp_path):
    policy = ImagePolicy(image_dir=image_dir)
    assert "outside" in refused(str(tmp_path / "secret.png"), policy)
    assert "outside" in refused("file:///etc/passwd", policy)
    assert "file:///absolute/path" in refused("file://otherhost/etc/passwd", policy)


def test_missing_file_names_only_the_clients_path(image_dir, tmp_path):
    message = refused("sub/nope.png", ImagePolicy(image_dir=image_dir))
    assert message == "image not found: sub/nope.png"
    assert str(tmp_path) not in message


def test_directory_fifo_and_nul_paths_are_400(image_dir):
    os.mkfifo(image_dir / "pipe.png")  # must not block the request
    policy = ImagePolicy(image_dir=image_dir)
    assert "not a regular file" in refused("sub", policy)
    assert "not a regular file" in refused("pipe.png", policy)
    assert "invalid image path" in refused("file:///x%00.png", policy)


def test_local_file_too_large_is_413_and_corrupt_is_400(image_dir):
    (image_dir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert "too large" in refused("sub/cat.png", ImagePolicy(image_dir=image_dir, max_bytes=20), 413)
    message = refused("bad.png", ImagePolicy(image_dir=image_dir))
    assert "bad.png" in message and str(image_dir) not in message


# --- remote URLs -------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[str]  # set per server by the fixture

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.server.hosts.append(self.headers.get("Host"))
        route = self.path.split("?")[0]
        if route == "/img.png":
            self._send(200, png_bytes((11, 13)))
        elif route == "/big":
            self._send(200, b"x" * 5000)
        elif route == "/big-unsized":  # no Content-Length: only streaming can stop it
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        elif route == "/text":
            self._send(200, b"hello", "text/plain")
        elif route.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1] if "to=" in self.path else "/img.png")
            self.end_headers()
        elif route == "/slow":
            time.sleep(1.5)
            self._send(200, png_bytes())
        elif route == "/drip":  # each read is quick, the whole body is not
            self.send_response(200)
            self.end_headers()
            for _ in range(15):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, code: int, body: bytes, kind: str = "image/png") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """The client hanging up mid-body (a size cap or a timeout, as these tests mean it to) is
        not an error; socketserver would print its traceback into the test output."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server():
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = _Server(("127.0.0.1", 0), handler)
    httpd.daemon_threads, httpd.block_on_close, httpd.hosts = True, False, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.requests = handler.requests
    yield httpd
    httpd.shutdown()
    httpd.server_close()


REMOTE = ImagePolicy(allow_remote=True, fetch_timeout_s=5.0)


def test_remote_urls_disabled_by_default(server):
    message = refused(f"{server.base}/img.png", ImagePolicy())
    assert message == "remote image URLs are disabled; start the server with --allow-remote-images"
    assert server.requests == []


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "10.1.2.3",
        "169.254.169.254",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
        "[2002:7f00:1::]",
        "2130706433",
        "0x7f.1",
        "127.1",
    ],
)  # odd spellings getaddrinfo maps to 127.0.0.1
def test_default_guard_refuses_local_and_private_hosts_without_a_request(server, host):
    port = server.server_address[1]
    assert "not allowed" in refused(f"http://{host}:{port}/img.png", REMOTE)
    assert server.requests == []


def test_global_only():
    ok = ["8.8.8.8", "2606:4700:4700::1111"]
    bad = [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",
        "ff02::1",
    ]
    assert all(global_only(ipaddress.ip_address(a)) for a in ok)
    assert not any(global_only(ipaddress.ip_address(a)) for a in bad)


def test_guard_sees_unwrapped_ipv4_mapped_addresses(server):
    seen = []
    refused(
        f"http://[::ffff:127.0.0.1]:{server.server_address[1]}/img.png",
        REMOTE,
        is_allowed_address=lambda ip: seen.append(ip) or False,
    )
    assert seen == [ipaddress.ip_address("127.0.0.1")]


def test_remote_image_loads_when_the_guard_allows(server):
    image = resolve_image(f"{server.base}/img.png", REMOTE, is_allowed_address=allow_all)
    assert image.size == (11, 13)
    assert server.requests == ["/img.png"]


def test_remote_connects_to_the_checked_ip_and_sends_the_original_host(server):
    port = server.server_address[1]
    resolve_image(f"http://localhost:{port}/img.png", REMOTE, is_allowed_address=allow_all)
    assert server.hosts == [f"localhost:{port}"]


def test_remote_body_over_max_bytes_is_413(server):
    policy = ImagePolicy(allow_remote=True, max_bytes=1000)
    assert "too large" in refused(f"{server.base}/big", policy, 413, is_allowed_address=allow_all)
    assert "too large" in refused(f"{server.base}/big-unsized", policy, 413, is_allowed_address=allow_all)


def test_remote_redirect_is_followed(server):
    image = resolve_image(f"{server.base}/redirect", REMOTE, is_allowed_address=allow_all)
    assert image.size == (11, 13)
    assert server.requests == ["/redirect", "/img.png"]


def test_every_redirect_hop_is_rechecked(server):
    port = server.server_address[1]
    calls = []

    def first_hop_only(ip) -> bool:  # allows the first resolution, refuses any later one
        calls.append(ip)
        return len(calls) == 1

    url = f"{server.base}/redirect?to=http://localhost:{port}/img.png"
    assert "not allowed" in refused(url, REMOTE, is_allowed_address=first_hop_only)
    assert len(calls) >= 2
    assert server.requests == [f"/redirect?to=http://localhost:{port}/img.png"]


def test_too_many_redirects_is_400(server):
    policy = ImagePolicy(allow_remote=True, max_redirects=2)
    url = f"{server.base}/redirect?to=/redirect?to=/redirect?to=/redirect"
    assert "redirects" in refused(url, policy, is_allowed_address=allow_all)
    assert len(server.requests) == 3


def test_redirect_to_a_file_url_is_400(server):
    url = f"{server.base}/redirect?to=file:///etc/passwd"
    assert "non-http" in refused(url, REMOTE, is_allowed_address=allow_all)


def test_slow_server_times_out(server):
    policy = ImagePolicy(allow_remote=True, fetch_timeout_s=0.3)
    for route in ("/slow", "/drip"):  # each takes the server 1.5 s
        started = time.monotonic()
        assert "timed out" in refused(f"{server.base}{route}", policy, is_allowed_address=allow_all)
        assert time.monotonic() - started < 1.2


def test_remote_http_error_and_non_image_are_400(server):
    assert "HTTP 404" in refused(f"{server.base}/missing.png", REMOTE, is_allowed_address=allow_all)
    assert "not an image" in refused(f"{server.base}/text", REMOTE, is_allowed_address=allow_all)


def test_unreachable_and_unresolvable_hosts_are_400(server):
    closed = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    assert "failed" in refused(f"http://127.0.0.1:{port}/img.png", REMOTE, is_allowed_address=allow_all)
    assert "cannot resolve" in refused("http://no-such-host.invalid/a.png", REMOTE, is_allowed_address=allow_all)
    assert "invalid remote image URL" in refused("http://example.com:99999/a.png", REMOTE)


def test_malformed_urls_are_400_not_crashes(server, image_dir):
    assert "invalid image URL" in refused("http://[::1/a.png", REMOTE, is_allowed_address=allow_all)
    assert "invalid image URL" in refused("file://[x/a.png", ImagePolicy(image_dir=image_dir))
    url = f"{server.base}/redirect?to=http://[bad/"
    assert "invalid image URL" in refused(url, REMOTE, is_allowed_address=allow_all)
    assert "\\n" in refused("sub/a\nb.png", ImagePolicy(image_dir=image_dir))  # shown escaped, one line
