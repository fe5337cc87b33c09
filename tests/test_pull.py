"""`vlchat pull` against a fake Hugging Face hub on loopback: a real HTTP server in this test that serves
what huggingface_hub's HfApi.model_info(files_metadata=True) and the resolve URLs need (JSON listing at
a commit with sizes and hashes, file downloads with ETag and Range). The CLI runs as a subprocess with
HF_ENDPOINT pointing at it, so a download can be killed mid-file and resumed by a second process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from vlchat.errors import VlchatError
from vlchat.pull import check_file_name, pull, resolve_name

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = os.urandom(300_000)
STALL_AT = 100_000  # bytes of model.safetensors sent before the first download stalls


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


COMMITS = {
    "a" * 40: {"config.json": b'{"model_type": "llama"}', "model.safetensors": WEIGHTS, "sub/notes.txt": b"hello"},
    "b" * 40: {"config.json": b'{"model_type": "llama", "v": 1}', "model.safetensors": WEIGHTS[:1000]},
    "c" * 40: {"config.json": b"{}", "../escape.txt": b"outside"},
}
REFS = {"org/tiny": {"main": "a" * 40, "v1": "b" * 40}, "org/evil": {"main": "c" * 40}}
LFS = {"model.safetensors"}


class FakeHub(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict]] = []  # (method, path, lower-cased headers)
    stall_first = False
    stalled = threading.Event()
    release = threading.Event()

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        FakeHub.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
        path = unquote(urlsplit(self.path).path)
        if path.startswith("/api/models/"):
            return self.model_info(path[len("/api/models/") :])
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        commit, _, name = rest.partition("/")
        files = COMMITS.get(commit) if repo in REFS else None
        if files is None or name not in files:
            return self.reply(404, b"{}", {"X-Error-Code": "EntryNotFound"})
        self.send_file(files[name], name)

    def model_info(self, rest: str) -> None:
        repo, _, revision = rest.partition("/revision/")
        if repo not in REFS:
            return self.reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        commit = REFS[repo].get(revision or "main", revision if revision in COMMITS else None)
        if commit is None:
            return self.reply(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
        siblings = []
        for name, data in COMMITS[commit].items():
            sibling = {"rfilename": name, "size": len(data), "blobId": blob_id(data)}
            if name in LFS:
                sha = hashlib.sha256(data).hexdigest()
                sibling["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 130}
            siblings.append(sibling)
        body = {"id": repo, "modelId": repo, "sha": commit, "private": False, "siblings": siblings}
        self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def send_file(self, data: bytes, name: str) -> None:
        etag = f'"{hashlib.sha256(data).hexdigest() if name in LFS else blob_id(data)}"'
        start = 0
        if (ranged := self.headers.get("Range")) and ranged.startswith("bytes="):
            start = int(ranged[len("bytes=") :].split("-")[0])
            if start >= len(data):
                return self.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if name == "model.safetensors" and FakeHub.stall_first and start == 0:
            FakeHub.stall_first = False
            self.wfile.write(data[:STALL_AT])
            self.wfile.flush()
            FakeHub.stalled.set()
            FakeHub.release.wait(60)  # until the test has killed the client
            return
        self.wfile.write(data[start:])

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    FakeHub.release.set()
    server.shutdown()


@pytest.fixture
def env(tmp_path, hub):
    FakeHub.requests.clear()
    values = {**os.environ, "VLCHAT_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub}
    for key in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        values.pop(key, None)
    return values


def vlchat(env: dict, *args: str, wait: bool = True):
    command = [sys.executable, "-m", "vlchat.cli", *args]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def models_dir(env: dict) -> Path:
    return Path(env["VLCHAT_HOME"]) / "models"


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_pull_downloads_verifies_and_lists_the_model(env):
    result = vlchat({**env, "HF_TOKEN": "hf_test_token"}, "pull", "org/tiny")
    assert result.returncode == 0, result.stderr
    target = models_dir(env) / "org" / "tiny"
    assert result.stdout.strip() == str(target)
    for name, data in COMMITS["a" * 40].items():
        assert (target / name).read_bytes() == data
    assert not (target / ".pull").exists()
    hub_calls = [h for _, p, h in FakeHub.requests if p.startswith("/api/models/") or "/resolve/" in p]
    assert len(hub_calls) == 4 and all(h.get("authorization") == "Bearer hf_test_token" for h in hub_calls)
    assert any("/revision/" not in p and p.startswith("/api/models/org/tiny") for _, p, _ in FakeHub.requests)
    listed = vlchat(env, "models").stdout.splitlines()
    assert any(line.split()[:2] == ["org/tiny", "pulled"] for line in listed)
    FakeHub.requests.clear()
    again = vlchat(env, "pull", "org/tiny")  # nothing left to download
    assert again.returncode == 0 and not any("/resolve/" in p for _, p, _ in FakeHub.requests)


def test_a_killed_download_resumes_where_it_stopped(env):
    FakeHub.stall_first, FakeHub.stalled, FakeHub.release = True, threading.Event(), threading.Event()
    first = vlchat(env, "pull", "org/tiny", wait=False)
    try:
        assert FakeHub.stalled.wait(60), "the client never reached the stalling file"
        part = models_dir(env) / "org" / "tiny" / ".pull" / ("a" * 40) / "partial" / "model.safetensors.part"
        deadline = time.monotonic() + 30
        while (not part.is_file() or part.stat().st_size < STALL_AT) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert part.stat().st_size == STALL_AT
    finally:
        first.kill()  # SIGKILL: no cleanup runs in the client
        first.wait()
        FakeHub.release.set()
    FakeHub.requests.clear()
    second = vlchat(env, "pull", "org/tiny")
    assert second.returncode == 0, second.stderr
    assert f"resuming at {STALL_AT} bytes" in second.stderr
    downloads = [h for _, p, h in FakeHub.requests if p.endswith("/model.safetensors")]
    assert [h.get("range") for h in downloads] == [f"bytes={STALL_AT}-"]
    assert (models_dir(env) / "org" / "tiny" / "model.safetensors").read_bytes() == WEIGHTS


def test_revision_is_honoured(env):
    result = vlchat(env, "pull", "org/tiny", "--revision", "v1")
    assert result.returncode == 0, result.stderr
    target = models_dir(env) / "org" / "tiny@v1"
    assert (target / "config.json").read_bytes() == COMMITS["b" * 40]["config.json"]
    assert (target / "model.safetensors").read_bytes() == WEIGHTS[:1000]
    assert not (target / "sub").exists()
    assert any(p.startswith("/api/models/org/tiny/revision/v1") for _, p, _ in FakeHub.requests)
    assert all(f"/resolve/{'b' * 40}/" in p for _, p, _ in FakeHub.requests if "/resolve/" in p)
    missing = vlchat(env, "pull", "org/tiny", "--revision", "nope")
    assert_one_line_error(missing, "org/tiny has no revision 'nope'")


def test_a_listing_with_path_traversal_is_refused(env, tmp_path):
    result = vlchat(env, "pull", "org/evil")
    assert_one_line_error(result, "refusing org/evil", "'../escape.txt'", "outside the model folder")
    assert not any("/resolve/" in p for _, p, _ in FakeHub.requests)  # refused before any download
    assert not list(tmp_path.rglob("escape.txt"))


@pytest.mark.parametrize(
    "args, words",
    [
        (["not a name"], ["neither org/repo nor a known name"]),
        (["org/../etc"], ["neither org/repo"]),
        (["org/tiny", "--source", "gitlab"], ["unknown source 'gitlab'", "huggingface, modelscope"]),
        (["org/tiny", "--revision", "../x"], ["revision '../x'"]),
        (["llava-1.5-7b", "--source", "modelscope"], ["not known on modelscope"]),
        (["org/missing"], ["no model org/missing", "HF_TOKEN"]),
    ],
)
def test_bad_names_and_sources_fail_with_one_line(env, args, words):
    assert_one_line_error(vlchat(env, "pull", *args), *words)


def test_offline_uses_only_the_cache(env):
    result = vlchat({**env, "HF_HUB_OFFLINE": "1"}, "pull", "org/tiny")
    assert_one_line_error(result, "offline", "HF_HUB_OFFLINE", "not in the Hugging Face cache")
    assert not [p for _, p, _ in FakeHub.requests if p.startswith("/api/models/")]
    snapshot = Path(env["HF_HOME"]) / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    cached = vlchat({**env, "HF_HUB_OFFLINE": "1"}, "pull", "org/tiny")
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.strip() == str(snapshot)
    assert not [p for _, p, _ in FakeHub.requests if p.startswith("/api/models/") or "/resolve/" in p]


def test_modelscope_goes_through_its_client(tmp_path, monkeypatch):
    monkeypatch.setenv("VLCHAT_HOME", str(tmp_path))
    calls = []

    def fake_snapshot_download(model_id, revision, local_dir):
        calls.append((model_id, revision))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")

    target = pull("internlm2-chat-7b", "modelscope", None, fake_snapshot_download, log=lambda line: None)
    assert calls == [("Shanghai_AI_Laboratory/internlm2-chat-7b", "master")]
    assert target == tmp_path / "models" / "Shanghai_AI_Laboratory" / "internlm2-chat-7b"

    def failing(model_id, revision, local_dir):
        raise RuntimeError("404 model not found\ndetails")

    with pytest.raises(VlchatError, match=r"^ModelScope download of org/x failed: 404 model not found$"):
        pull("org/x", "modelscope", "v2", failing, log=lambda line: None)


def test_modelscope_without_its_package_says_how_to_install(env):
    pytest.importorskip("huggingface_hub")
    if subprocess.run([sys.executable, "-c", "import modelscope"], capture_output=True).returncode == 0:
        pytest.skip("modelscope is installed here")
    assert_one_line_error(vlchat(env, "pull", "org/tiny", "--source", "modelscope"), "pip install modelscope")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a\\b", "C:/x", "a//b", "./x", ".pull/x"])
def test_file_names_outside_the_folder_are_refused(name):
    with pytest.raises(VlchatError, match="outside the model folder"):
        check_file_name("org/r", name)


def test_known_names_resolve_per_source():
    assert resolve_name("blip2-opt-2.7b", "huggingface") == "Salesforce/blip2-opt-2.7b"
    assert resolve_name("instructblip-vicuna-7b", "huggingface") == "Salesforce/instructblip-vicuna-7b"
    assert resolve_name("Org/Some.Model-1_0", "modelscope") == "Org/Some.Model-1_0"
