"""`vlchat bench`: the engine beside MiniGPT-4's way, each measured in its own child process.

MiniGPT-4's Chat.answer re-renders the whole conversation every turn, embeds it (image
embeddings are kept from upload_img) and calls HF `generate(inputs_embeds=...)`, so every turn
prefills all of history again. vlchat keeps the KV cache and prefills only the new tokens.
Both run the same 4-turn conversation with one image (greedy, a fixed number of tokens per
turn); the 4th turn's time-to-first-token is the "follow-up after 3 turns" figure. Each mode
runs in a fresh process so its peak RSS is its own.

`python -m vlchat.bench.decode runtimes MODEL TOKENS` instead compares the LM runtimes
(LMConfig.runtime torch, and onnx with onnx_weights int8 and q4_1, model/onnx_lm.py) on the
engine's conversation, each in its own child process, and prints the CPU's flags and load
average beside the decode speeds (issue 35). research/ort_decode.py compares them in one process,
steps interleaved, with each one's logits against torch float32.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chelsea.jpg"
QUESTIONS = [
    "Describe this image.",
    "What colours do you see?",
    "Is it indoors or outdoors?",
    "Summarise our conversation in one sentence.",
]
# compare_runtimes' child modes: the engine with LMConfig.runtime torch, and onnx per onnx_weights
RUNTIMES = {"vlchat": "torch", "vlchat-onnx": "onnx int8", "vlchat-onnx-q4_1": "onnx q4_1"}
KEYS = ("image_encode_ms", "ttft_first_s", "ttft_followup_s", "decode_tok_s", "peak_rss_mb")


def run_bench(model: str, tokens: int, as_json: bool, rounds: int = 2) -> None:
    """Alternate the two modes `rounds` times and keep each mode's best figures (less noise)."""
    runs = {"vlchat": [], "baseline": []}
    for _ in range(rounds):
        for mode in runs:
            runs[mode].append(measure_in_child(mode, model, tokens))
    best = {mode: best_of(figures) for mode, figures in runs.items()}
    report = {**best["vlchat"], "baseline": best["baseline"], "tokens_per_turn": tokens, "rounds": rounds}
    print(json.dumps(report, indent=2) if as_json else table(report))


def compare_runtimes(model: str, tokens: int, rounds: int = 2) -> None:
    """Decode tokens/s of the engine with the torch runtime and the onnx runtime per weight format
    (int8, q4_1), best of `rounds` each, the modes alternating."""
    speeds = {mode: [] for mode in RUNTIMES}
    for _ in range(rounds):
        for mode in speeds:
            speeds[mode].append(measure_in_child(mode, model, tokens)["decode_tok_s"])
    best = {mode: max(figures) for mode, figures in speeds.items()}
    print(f"cpu flags: {cpu_flags()}; torch threads {torch.get_num_threads()}; load average {load_average()}")
    print(
        f"decode tokens/s, best of {rounds}, {tokens} tokens per turn: "
        + ", ".join(
            f"{label} {best[mode]:.1f} ({best[mode] / best['vlchat']:.2f}x)" for mode, label in RUNTIMES.items()
        )
    )


def cpu_flags() -> str:
    words = set(Path("/proc/cpuinfo").read_text().split())
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni") if f in words)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def best_of(runs: list[dict]) -> dict:
    """Highest decode speed, lowest of everything else."""
    return {key: (max if key == "decode_tok_s" else min)(run[key] for run in runs) for key in KEYS}


def measure_in_child(mode: str, model: str, tokens: int) -> dict:
    command = [sys.executable, "-m", "vlchat.bench.decode", mode, model, str(tokens)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise VlchatError(f"bench {mode} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(report: dict) -> str:
    base = report["baseline"]
    rows = [
        ("image encode (ms)", "image_encode_ms", "{:.1f}"),
        ("TTFT, first turn (s)", "ttft_first_s", "{:.3f}"),
        ("TTFT, follow-up after 3 turns (s)", "ttft_followup_s", "{:.3f}"),
        ("decode (tokens/s)", "decode_tok_s", "{:.1f}"),
        ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
    ]
    lines = [f"{'':36}{'vlchat':>10}{'baseline':>10}{'ratio':>8}"]
    for label, key, fmt in rows:
        ratio = report[key] / base[key] if base[key] else float("nan")
        lines.append(f"{label:36}{fmt.format(report[key]):>10}{fmt.format(base[key]):>10}{ratio:>8.2f}")
    lines.append(
        f"(baseline = MiniGPT-4's way: generate(inputs_embeds=...) on the whole conversation each "
        f"turn; {report['tokens_per_turn']} tokens per turn, greedy; best of {report['rounds']} runs each)"
    )
    return "\n".join(lines)


# --- the child processes -------------------------------------------------------------------


def image_encode_ms(chat, image, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            chat.model.encode_images(chat.model.pixels(image)[None])
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def engine_turns(chat, config) -> list[tuple[float, float]]:
    """(ttft_s, decode_tok_s) per turn with vlchat's KV-cache reuse."""
    session = chat.session(generation=config)
    session.upload_img(EXAMPLE)
    turns = []
    for question in QUESTIONS:
        session.ask(question)
        start, first, n = time.perf_counter(), None, 0
        for chunk in session.stream():
            first = first or (time.perf_counter() if chunk.text else None)
        end = time.perf_counter()
        n = session.timings.completion_tokens
        turns.append((first - start, (n - 1) / (end - first)))
    return turns


class _Clock:
    """An HF streamer that only records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel():
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def baseline_turns(chat, config) -> list[tuple[float, float]]:
    """The same conversation, MiniGPT-4's way: every turn embeds and prefills all of history."""
    from vlchat.chat.messages import Message

    session = chat.session(generation=config)
    session.upload_img(EXAMPLE)
    lm, turns = chat.model.lm, []
    for question in QUESTIONS:
        session.ask(question)
        start = time.perf_counter()
        keys = session.position_keys(session.conversation())
        clock = _Clock()
        with torch.inference_mode(), lm.gated(lm.adapter_on(True)):  # the conversation has an image
            embeds = session.embed_keys(keys)
            out = lm.model.generate(
                inputs_embeds=embeds,
                max_new_tokens=config.max_new_tokens,
                min_new_tokens=config.min_new_tokens,
                do_sample=False,
                streamer=clock,
            )
        end = time.perf_counter()
        session.messages.append(Message.text_message("assistant", lm.detokenize(out[0].tolist()).strip()))
        turns.append((clock.times[0] - start, (len(clock.times) - 1) / (end - clock.times[0])))
    return turns


def child(mode: str, model: str, tokens: int) -> dict:
    from vlchat.chat.engine import Chat
    from vlchat.config import GenerationConfig
    from vlchat.images import load_image
    from vlchat.model.vlm import load_model

    settings = model_config(model)
    if mode.startswith("vlchat-onnx"):  # the engine with the ONNX Runtime LM (model/onnx_lm.py)
        weights = mode.removeprefix("vlchat-onnx").removeprefix("-") or "int8"
        settings = replace(settings, lm=replace(settings.lm, runtime="onnx", onnx_weights=weights))
    chat = Chat(load_model(settings))
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    encode = image_encode_ms(chat, load_image(EXAMPLE))
    turns = (baseline_turns if mode == "baseline" else engine_turns)(chat, config)
    return {
        "image_encode_ms": encode,
        "ttft_first_s": turns[0][0],
        "ttft_followup_s": turns[-1][0],
        "decode_tok_s": statistics.mean(speed for _, speed in turns),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    if sys.argv[1] == "runtimes":
        compare_runtimes(sys.argv[2], int(sys.argv[3]))
    else:
        print(json.dumps(child(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
