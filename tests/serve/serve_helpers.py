"""Real servers for the API tests: `vlchat serve` in a subprocess on a free loopback port.

`tiny_server` serves the 2-layer tiny model (fast; error paths, limits, fuzzing);
`default_server` serves the real default model (what users get).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLES, REPO, tiny_config

from vlchat.bench.load import stop_process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(path: Path) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


class Server:
    """A `vlchat serve` subprocess; `url` is its base address."""

    def __init__(self, home: Path, *args: str, wait: bool = True, env: dict | None = None) -> None:
        self.home, self.args, self.port = home, args, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(home / f"server-{self.port}.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vlchat.cli", "serve", "--port", str(self.port), "--home", str(home), *args],
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s: {self.output()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def output(self) -> str:
        self.log.flush()
        return (self.home / f"server-{self.port}.log").read_text()[-3000:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


@pytest.fixture(scope="session")
def tiny_model_file(tiny_lm_dir, tmp_path_factory) -> Path:
    """The tiny model as a config file `vlchat serve --model` accepts."""
    path = tmp_path_factory.mktemp("tiny-model") / "tiny.json"
    path.write_text(json.dumps(asdict(tiny_config(tiny_lm_dir))))
    return path


@pytest.fixture(scope="module")
def tiny_server(tiny_model_file, tmp_path_factory):
    home = tmp_path_factory.mktemp("tiny-home")
    images = home / "allowed"
    images.mkdir()
    (images / "shapes.png").write_bytes((EXAMPLES / "shapes.png").read_bytes())
    server = Server(
        home,
        "--model",
        str(tiny_model_file),
        "--image-dir",
        str(images),
        "--max-body-mb",
        "2",
        "--max-image-mb",
        "1",
        "--max-tokens",
        "16",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("default-home"))
    yield server
    server.stop()
