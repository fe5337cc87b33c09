"""arxiv_search against a fake arXiv on loopback (a real HTTP server with a canned Atom feed),
and against a closed port for the offline case."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from vlchat.agent.builtin.arxiv import ArxivClient, ArxivConfig, arxiv_search_tool
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.tools import ToolRegistry

FEED = b"""<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:arxiv="http://arxiv.org/schemas/atom">
  <title type="html">ArXiv Query: search_query=all:minigpt</title>
  <entry>
    <id>http://arxiv.org/abs/2304.10592v2</id>
    <published>2023-04-20T17:59:25Z</published>
    <title>MiniGPT-4: Enhancing Vision-Language Understanding with
      Advanced Large Language Models</title>
    <summary>  The recent GPT-4 has demonstrated extraordinary multi-modal abilities.
    We present MiniGPT-4, which aligns a frozen visual encoder with a frozen LLM. </summary>
    <author><name>Deyao Zhu</name></author>
    <author><name>Jun Chen</name></author>
    <link href="http://arxiv.org/abs/2304.10592v2" rel="alternate" type="text/html"/>
  </entry>
  <entry>
    <id>http://arxiv.org/abs/2304.08485v2</id>
    <published>2023-04-17T17:59:25Z</published>
    <title>Visual Instruction Tuning</title>
    <summary>Instruction tuning large language models using machine-generated data.</summary>
    <author><name>Haotian Liu</name></author>
  </entry>
</feed>
"""
ERROR_FEED = b"""<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><entry><id>http://arxiv.org/api/errors#incorrect_id_format</id>
<title>Error</title><summary>incorrect id format for 1234</summary></entry></feed>"""


class FakeArxiv(BaseHTTPRequestHandler):
    requests: list[dict] = []
    body = FEED
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        FakeArxiv.requests.append({"path": url.path, **parse_qs(url.query)})
        self.send_response(FakeArxiv.status)
        self.send_header("Content-Type", "application/atom+xml")
        self.end_headers()
        self.wfile.write(FakeArxiv.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_arxiv():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeArxiv)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeArxiv.requests, FakeArxiv.body, FakeArxiv.status = [], FEED, 200
    yield f"http://127.0.0.1:{server.server_port}/api/query"
    server.shutdown()
    server.server_close()


def executor_for(url: str) -> ToolExecutor:
    client = ArxivClient(ArxivConfig(base_url=url, timeout_s=3), http=httpx.Client(trust_env=False))
    return ToolExecutor(ToolRegistry([arxiv_search_tool(client=client)]))


def test_search_parses_the_feed_and_sends_the_query(fake_arxiv):
    obs = executor_for(fake_arxiv).run("arxiv_search", {"query": "minigpt vision", "max_results": 2})
    assert obs.ok, obs.error
    first, second = obs.data["papers"]
    assert first == {
        "arxiv_id": "2304.10592v2",
        "title": "MiniGPT-4: Enhancing Vision-Language Understanding with Advanced Large Language Models",
        "authors": ["Deyao Zhu", "Jun Chen"],
        "published": "2023-04-20",
        "summary": "The recent GPT-4 has demonstrated extraordinary multi-modal abilities. We present MiniGPT-4, "
        "which aligns a frozen visual encoder with a frozen LLM.",
        "url": "http://arxiv.org/abs/2304.10592v2",
    }
    assert second["title"] == "Visual Instruction Tuning" and second["authors"] == ["Haotian Liu"]
    [request] = FakeArxiv.requests
    assert request["path"] == "/api/query" and request["search_query"] == ["all:minigpt vision"]
    assert request["max_results"] == ["2"] and request["sortBy"] == ["relevance"]


def test_arxiv_errors_and_bad_answers_are_clear(fake_arxiv):
    executor = executor_for(fake_arxiv)
    FakeArxiv.body = ERROR_FEED
    assert (
        executor.run("arxiv_search", {"query": "x"}).error == "arXiv rejected the query: incorrect id format for 1234"
    )
    FakeArxiv.body = b"<html>not a feed"
    assert executor.run("arxiv_search", {"query": "x"}).error.startswith("arXiv's answer is not a readable Atom feed")
    FakeArxiv.status, FakeArxiv.body = 503, b""
    assert executor.run("arxiv_search", {"query": "x"}).error == "arXiv answered HTTP 503"


def test_no_network_is_a_clean_offline_observation():
    with socket.socket() as probe:  # a loopback port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    obs = executor_for(f"http://127.0.0.1:{port}/api/query").run("arxiv_search", {"query": "minigpt"})
    assert not obs.ok and obs.error.startswith("offline: arXiv cannot be reached"), obs.error
    assert obs.elapsed_s < 5
