"""`python -m vlchat.bench.load`: streaming chat clients against `vlchat serve`, on loopback only.

Without --url it starts two servers itself and measures, in one run: (a) serial, 1 client against
the batching server; (b) N concurrent clients against the same server; (c) N concurrent clients
against a `--max-batch 1` server (the gain of batching). Every request carries shapes.png and a
slightly different question, and min_tokens == max_tokens forces the same number of generated
tokens, so runs are comparable. The run is bounded: a fixed request count and --duration-limit.
With --huge-prompt-mb, scenario (b) also has one more client that sends a prompt that large
(refused, it cannot fit the context window) once the streams run: the report gives how long its
refusal took and every scenario's largest gap between two chunks of one stream.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
QUESTIONS = [
    "What shapes are in this picture?",
    "Which colours do you see?",
    "How many objects are there?",
    "Describe the image in one sentence.",
    "What is the largest shape?",
    "Is there a circle here?",
    "What colour is the background?",
    "Where is the triangle?",
]


class Aborted(Exception):
    """The run cannot go on (a server did not start, a warm-up request failed)."""


@dataclass
class Result:
    latency: float = 0.0  # request sent -> [DONE]
    ttft: float | None = None  # request sent -> first non-empty content delta
    tokens: int = 0  # usage.completion_tokens (stream_options.include_usage)
    text: str = ""
    finish: str | None = None
    error: str | None = None
    max_gap: float = 0.0  # the longest wait between two `data:` lines of this stream

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.text) and self.finish is not None


def check_loopback(url: str) -> str:
    """The URL without a trailing slash; exits 2 with one line when its host is not loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
        print(
            f"loadtest: refusing --url {url!r}: only http(s) on 127.0.0.1, localhost or ::1 is allowed", file=sys.stderr
        )
        raise SystemExit(2)
    return url.rstrip("/")


def request_body(model_id: str, tag: str, i: int, max_tokens: int, image_url: str) -> dict:
    # The tag makes every prompt unique, so no request finds another's whole prompt in the prefix cache;
    # the shared system+image prefix is still reused, as it would be for real clients.
    question = f"{QUESTIONS[i % len(QUESTIONS)]} (request {tag}{i + 1})"
    return {
        "model": model_id,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}],
            }
        ],
    }


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    result, start = Result(), time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            last = None
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                result.max_gap, last = max(result.max_gap, now - last if last else 0.0), now
                if absorb(result, line[5:].strip(), start):
                    break
            else:
                result.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as error:  # ValueError: a data line that is not JSON
        result.error = f"{type(error).__name__}: {error}"
    result.latency = time.perf_counter() - start
    return result


def absorb(result: Result, payload: str, start: float) -> bool:
    """Fold one SSE `data:` payload into `result`; True at `[DONE]`."""
    if payload == "[DONE]":
        return True
    chunk = json.loads(payload)
    if "error" in chunk:
        result.error = chunk["error"].get("message", "an error event")
    for choice in chunk.get("choices", []):
        if (text := choice.get("delta", {}).get("content")) and result.ttft is None:
            result.ttft = time.perf_counter() - start
        result.text += text or ""
        result.finish = choice.get("finish_reason") or result.finish
    result.tokens = (chunk.get("usage") or {}).get("completion_tokens", result.tokens)
    return False


async def run_clients(url: str, bodies: list[dict], clients: int) -> tuple[list[Result], float]:
    """`clients` workers take the bodies in order, one request at a time each; returns results and wall time."""
    todo, results = list(enumerate(bodies)), [Result(error="not sent") for _ in bodies]

    async def worker(client: httpx.AsyncClient) -> None:
        while todo:
            i, body = todo.pop(0)
            results[i] = await stream_one(client, url, body)

    start = time.perf_counter()
    # No read timeout here: --duration-limit bounds the whole run. trust_env=False: never via a proxy.
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), trust_env=False) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return results, time.perf_counter() - start


async def health(url: str) -> dict:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        return (await client.get(f"{url}/health")).json()


async def sample_active(url: str, samples: list[int], period: float = 0.25) -> None:
    """Record /health's active batch size while a scenario runs (cancelled at its end)."""
    while True:
        try:
            samples.append((await health(url))["batch"]["active"])
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        await asyncio.sleep(period)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None when there are no values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


async def huge_prompt(url: str, model_id: str, megabytes: float, report: dict) -> None:
    """Once the streams run, send one prompt of `megabytes` MB of text; record status and seconds."""
    body = json.dumps(
        {"model": model_id, "max_tokens": 4, "messages": [{"role": "user", "content": "a " * int(megabytes * 2**19)}]}
    ).encode()
    await asyncio.sleep(2.0)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), trust_env=False) as client:
        response = await client.post(
            f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    report.update(huge_prompt_mb=megabytes, huge_prompt_status=response.status_code)
    report["huge_prompt_s"] = time.perf_counter() - start


async def scenario(name: str, url: str, clients: int, bodies: list[dict], huge_mb: float = 0.0) -> dict:
    samples: list[int] = []
    sampler = asyncio.create_task(sample_active(url, samples))
    huge: dict = {}
    side = asyncio.create_task(huge_prompt(url, bodies[0]["model"], huge_mb, huge)) if huge_mb else None
    try:
        results, wall = await run_clients(url, bodies, clients)
        if side is not None:
            await side
    finally:
        sampler.cancel()
    batch, ok = (await health(url))["batch"], [r for r in results if r.ok]
    busy = [s for s in samples if s > 0]
    latencies, ttfts = [r.latency for r in ok], [r.ttft for r in ok if r.ttft is not None]
    return {
        "name": name,
        "clients": clients,
        "max_batch": batch["max"],
        "requests": len(results),
        "ok": len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r.tokens for r in ok) / wall,
        "tokens_per_request": sorted({r.tokens for r in ok}),
        "latency_p50_s": pct(latencies, 0.5),
        "latency_p95_s": pct(latencies, 0.95),
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p95_s": pct(ttfts, 0.95),
        "peak_batch": batch["peak"],
        "mean_active_batch": statistics.fmean(busy) if busy else None,
        "max_gap_s": max((r.max_gap for r in ok), default=None),
        **huge,
        "failures": [
            f"{name} #{i + 1}: {r.error or 'empty content or no finish_reason'}"
            for i, r in enumerate(results)
            if not r.ok
        ],
    }


class LocalServer:
    """`vlchat serve` on a free loopback port; its output goes to `home/server.log`."""

    def __init__(self, home: Path, model: str, max_batch: int, max_queue: int) -> None:
        with socket.socket() as sock:  # a free port (a tiny race with other programs; fine on loopback)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url, self.log_path = f"http://127.0.0.1:{port}", home / "server.log"
        command = [
            sys.executable,
            "-m",
            "vlchat.cli",
            "serve",
            "--port",
            str(port),
            "--home",
            str(home),
            "--model",
            model,
            "--max-batch",
            str(max_batch),
            "--max-queue",
            str(max_queue),
        ]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down gracefully), SIGKILL if it is still there after 15 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_ready(url: str, server: LocalServer | None) -> dict:
    """Poll /health until the model is loaded (the caller's deadline bounds this); returns the body."""
    while True:
        try:
            if (body := await health(url)).get("status") == "ok":
                return body
        except httpx.ConnectError as error:
            if server is None:  # a --url server that is not there: say so now, not at the time limit
                raise Aborted(f"nothing answers at {url}: {error}") from None
        except (httpx.HTTPError, ValueError):
            pass
        if server and server.process.poll() is not None:
            raise Aborted(
                f"the server stopped (exit status {server.process.returncode}): "
                f"{server.log_path.read_text()[-600:].strip()}"
            )
        await asyncio.sleep(0.2)


async def measure(
    args: argparse.Namespace, urls: dict[str, str], servers: dict[str, LocalServer], phase: list[str]
) -> dict:
    """Wait for each server and warm it up with one uncounted request, then run the scenarios in turn.
    `phase[0]` says where the run is, for the abort message."""
    image = f"data:image/png;base64,{base64.b64encode(EXAMPLE.read_bytes()).decode()}"
    report = {
        "model": None,
        "clients": args.clients,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "load_average": [os.getloadavg()[0]],
    }  # other processes skew timings on a small machine
    for kind, url in urls.items():
        phase[0] = f"waiting for the {kind} server"
        report["model"] = (await wait_ready(url, servers.get(kind)))["model"]
        phase[0] = f"warming up the {kind} server"
        warm, _ = await run_clients(url, [request_body(report["model"], "w", 0, args.max_tokens, image)], 1)
        if not warm[0].ok:
            raise Aborted(f"the warm-up request failed: {warm[0].error or 'empty answer'}")
    plan = [("serial", "batched", 1), ("concurrent", "batched", args.clients), ("unbatched", "unbatched", args.clients)]
    report["scenarios"] = []
    for tag, (name, kind, clients) in zip("abc", plan):
        if kind in urls:  # with --url there is no unbatched server
            phase[0] = f"scenario {name}"
            bodies = [request_body(report["model"], tag, i, args.max_tokens, image) for i in range(args.requests)]
            huge = args.huge_prompt_mb if name == "concurrent" else 0.0
            report["scenarios"].append(await scenario(name, urls[kind], clients, bodies, huge))
    report["load_average"].append(os.getloadavg()[0])
    return with_ratios(report)


def with_ratios(report: dict) -> dict:
    rate = {s["name"]: s["tokens_per_s"] for s in report["scenarios"]}
    ratio = lambda a, b: rate[a] / rate[b] if a in rate and rate.get(b) else None  # noqa: E731
    report["ratios"] = {
        "concurrent_vs_serial": ratio("concurrent", "serial"),
        "batched_vs_unbatched": ratio("concurrent", "unbatched"),
    }
    report["peak_batch"] = max(s["peak_batch"] for s in report["scenarios"] if s["name"] != "unbatched")
    report["failures"] = [f for s in report["scenarios"] for f in s["failures"]]
    report["ok"] = not report["failures"]
    return report


def table(report: dict) -> str:
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    head = [
        "scenario",
        "clients",
        "batch",
        "reqs",
        "ok",
        "req/s",
        "tok/s",
        "lat p50",
        "lat p95",
        "ttft p50",
        "ttft p95",
        "peak",
        "mean act",
        "max gap",
    ]
    lines = [f"{head[0]:<11}" + "".join(f"{h:>9}" for h in head[1:])]
    for s in report["scenarios"]:
        cells = [
            s["clients"],
            s["max_batch"],
            s["requests"],
            s["ok"],
            num(s["requests_per_s"], ".2f"),
            num(s["tokens_per_s"], ".1f"),
            *(num(s[k], ".2f") for k in ("latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s")),
            s["peak_batch"],
            num(s["mean_active_batch"], ".1f"),
            num(s["max_gap_s"], ".2f"),
        ]
        lines.append(f"{s['name']:<11}" + "".join(f"{c:>9}" for c in cells))
    r = report["ratios"]
    lines += [
        f"throughput (tok/s): concurrent-batched / serial = {num(r['concurrent_vs_serial'], '.2f')}x, "
        f"batched / unbatched = {num(r['batched_vs_unbatched'], '.2f')}x; "
        f"peak batch in /health: {report['peak_batch']}",
        f"(model {report['model']}; {report['max_tokens']} tokens per request, forced with min_tokens; "
        f"greedy; times in s; 'mean act' = mean active batch in /health while busy; "
        f"1-min load average {report['load_average'][0]:.1f} at start, {report['load_average'][1]:.1f} at end)",
    ]
    lines += [
        f"huge prompt: {s['huge_prompt_mb']:g} MB during '{s['name']}', answered {s['huge_prompt_status']} "
        f"in {s['huge_prompt_s']:.2f} s; that scenario's largest gap between chunks {num(s['max_gap_s'], '.2f')} s"
        for s in report["scenarios"]
        if "huge_prompt_s" in s
    ]
    return "\n".join(lines + [f"FAILED {f}" for f in report["failures"]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlchat.bench.load", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server on loopback (default: start two servers here)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=16, help="requests per scenario")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (forced)")
    parser.add_argument("--duration-limit", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--model", default="default", help="model preset or config file for the started servers")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--huge-prompt-mb", type=float, default=0.0, help="during (b), one more client sends a prompt this large"
    )
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, args.max_tokens, args.duration_limit) <= 0:
        parser.error("--clients, --requests, --max-tokens and --duration-limit must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args, start = parse_args(argv), time.monotonic()
    urls = {"batched": check_loopback(args.url)} if args.url else {}
    servers: dict[str, LocalServer] = {}
    phase = ["starting"]
    with ExitStack() as stack:
        for kind, batch in [] if args.url else [("batched", args.clients), ("unbatched", 1)]:
            # Both start now, so their model loads overlap; the idle one only polls an empty queue.
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"vlchat-load-{kind}-")))
            servers[kind] = LocalServer(home, args.model, batch, max(32, args.clients))
            stack.callback(servers[kind].stop)  # stopped before its home is removed (ExitStack unwinds in reverse)
            urls[kind] = servers[kind].url
        try:
            left = args.duration_limit - (time.monotonic() - start)
            report = asyncio.run(asyncio.wait_for(measure(args, urls, servers, phase), timeout=left))
        except TimeoutError:
            print(f"loadtest: aborted ({phase[0]}): past --duration-limit {args.duration_limit:g} s", file=sys.stderr)
            return 1
        except (Aborted, httpx.HTTPError) as error:
            print(f"loadtest: aborted ({phase[0]}): {error}", file=sys.stderr)
            return 1
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
