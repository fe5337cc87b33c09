"""The load script end to end on the tiny model (it starts its own servers), and its loopback-only guard."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from tests.serve.serve_helpers import tiny_model_file  # noqa: F401 (fixture; tests/serve is not on sys.path here)
from vlchat.bench.load import check_loopback

FIELDS = {
    "name",
    "clients",
    "max_batch",
    "requests",
    "ok",
    "wall_s",
    "requests_per_s",
    "tokens_per_s",
    "tokens_per_request",
    "latency_p50_s",
    "latency_p95_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "peak_batch",
    "mean_active_batch",
    "max_gap_s",
    "failures",
}


def loadtest(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlchat.bench.load", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_three_scenarios_on_the_tiny_model(tiny_model_file):
    done = loadtest(
        "--model",
        str(tiny_model_file),
        "--clients",
        "4",
        "--requests",
        "8",
        "--max-tokens",
        "8",
        "--duration-limit",
        "120",
        "--huge-prompt-mb",
        "2",
        "--json",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["failures"] == [] and report["model"] == "vlchat-tiny"
    scenarios = {s["name"]: s for s in report["scenarios"]}
    assert list(scenarios) == ["serial", "concurrent", "unbatched"]
    for s in scenarios.values():
        assert FIELDS <= set(s)
        assert s["requests"] == s["ok"] == 8 and s["failures"] == []
        assert s["tokens_per_request"] == [8]  # min_tokens == max_tokens: every answer is exactly 8 tokens
        assert s["tokens_per_s"] > 0 and 0 < s["ttft_p50_s"] <= s["latency_p95_s"]
    assert [s["clients"] for s in scenarios.values()] == [1, 4, 4]
    huge = scenarios["concurrent"]  # the 2 MB prompt cannot fit the tiny model's 512 tokens: refused
    assert huge["huge_prompt_status"] == 400 and huge["huge_prompt_s"] > 0 and huge["max_gap_s"] > 0
    assert [s["max_batch"] for s in scenarios.values()] == [4, 4, 1]
    assert scenarios["serial"]["peak_batch"] == 1 and scenarios["unbatched"]["peak_batch"] == 1
    assert set(report["ratios"]) == {"concurrent_vs_serial", "batched_vs_unbatched"}
    assert all(ratio > 0 for ratio in report["ratios"].values())


@pytest.mark.parametrize(
    "url", ["http://example.com:8000", "http://10.0.0.5:8000", "ftp://127.0.0.1/", "http://127.0.0.1.example.com/"]
)
def test_a_non_loopback_url_is_refused(url):
    done = loadtest("--url", url, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "refusing --url" in done.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "http://localhost:9", "http://[::1]:8000"])
def test_loopback_urls_pass(url):
    assert check_loopback(url) == url.rstrip("/")
