"""Issue 35: the LM runtimes side by side at batch 1, in one process, on the default LM (or another
model config): torch float32 and the ONNX Runtime graphs of model/onnx_lm.py per weight format.

    python -m research.ort_decode [--weights int8 q4_1] [--steps 48] [--model default] [--threads 1] [--profile]

For each variant: the cosine and the largest difference of a text prompt's logits against torch
float32, and how many greedy tokens equal torch's. Then the decode steps are timed interleaved:
each variant keeps its own state and the variants take turns every 8 steps (A B C A B C ...), so
a shared, loaded machine slows them alike; the median and the 10th percentile of the step times
are printed with the load average before and after. --profile adds ORT's per-op profile of each
graph's decode steps (ms per step by op type, MatMulNBits by layer kind).

(The first version of this file was the spike that built a GroupQueryAttention graph straight from
safetensors; model/onnx_lm.py grew out of it.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

PROMPT = "Write a short poem about the sea and the sky, in four lines."


def cpu_flags() -> str:
    words = set(Path("/proc/cpuinfo").read_text().split())
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni") if f in words)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def load_variants(model: str, weights: list[str], threads: list[int] | None = None) -> dict:
    """{"torch": the float32 LM, "onnx-<w>": an LM whose forward runs the <w> graph with as many
    intra-op threads as torch, "onnx-<w>@<t>": the same graph with t threads}."""
    from vlchat.model.language import load_language_model
    from vlchat.model.loaders import model_config

    config = replace(model_config(model).lm, adapter=None, dtype="float32")
    variants = {"torch": load_language_model(replace(config, runtime="torch"))}
    for w in weights:
        lm = variants[f"onnx-{w}"] = load_language_model(replace(config, runtime="onnx", onnx_weights=w))
        for count in threads or []:
            if count != torch.get_num_threads():
                variants[f"onnx-{w}@{count}"] = with_threads(lm, count)
    return variants


def with_threads(lm, count: int):
    """A shallow copy of an onnx-runtime LM whose session runs `count` intra-op threads."""
    import copy

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = count
    twin, twin.onnx = copy.copy(lm), copy.copy(lm.onnx)
    twin.onnx.session = ort.InferenceSession(lm.onnx.session._model_path, options, providers=["CPUExecutionProvider"])
    return twin


def accuracy(variants: dict, ids: torch.Tensor, steps: int) -> None:
    reference, tokens = None, {}
    for name, lm in variants.items():
        with torch.inference_mode():
            logits, state = lm.prefill(lm.embed(ids[None]))
            out, token = [], int(logits.argmax())
            for _ in range(steps):
                out.append(token)
                step, state = lm.decode(torch.tensor([token]), state)
                token = int(step.argmax())
        tokens[name] = out
        if reference is None:
            reference = logits
            continue
        cosine = float(torch.nn.functional.cosine_similarity(logits, reference).item())
        same = next((i for i, (a, b) in enumerate(zip(out, tokens["torch"])) if a != b), steps)
        print(
            f"{name}: prompt logits cosine {cosine:.5f} vs torch float32, max abs difference "
            f"{float((logits - reference).abs().max()):.3f}; greedy tokens equal torch's for {same} of {steps}"
        )


def timed_steps(variants: dict, ids: torch.Tensor, steps: int, block: int = 8) -> dict[str, list[float]]:
    """Seconds per decode step of each variant, the variants taking turns every `block` steps. The
    first step of each turn is not counted: the previous variant's threads may still be spinning."""
    states, tokens, times = {}, {}, {name: [] for name in variants}
    with torch.inference_mode():
        for name, lm in variants.items():
            logits, states[name] = lm.prefill(lm.embed(ids[None]))
            tokens[name] = int(logits.argmax())
        for _ in range(max(1, steps // block)):
            for name, lm in variants.items():
                for step in range(block + 1):
                    start = time.perf_counter()
                    logits, states[name] = lm.decode(torch.tensor([tokens[name]]), states[name])
                    if step:
                        times[name].append(time.perf_counter() - start)
                    tokens[name] = int(logits.argmax())
    return times


def profile(lm, ids: torch.Tensor, steps: int) -> None:
    """ORT's own profile of `steps` decode steps of this LM's graph: ms per step by op type and
    MatMulNBits by layer kind (told apart by their weight shapes)."""
    import onnxruntime as ort

    decoder = lm.onnx
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = f"/tmp/ort-profile-{os.getpid()}"
    plain, decoder.session = decoder.session, ort.InferenceSession(decoder.session._model_path, options)
    config = lm.model.config
    kinds = {
        config.hidden_size + 2 * config.num_key_value_heads * config.head_dim: "qkv",
        2 * config.intermediate_size: "gate_up",
        config.vocab_size: "head",
    }
    with torch.inference_mode():
        _, state = lm.prefill(lm.embed(ids[None]))
        for token in range(steps):
            _, state = lm.decode(torch.tensor([token + 100]), state)
    path = decoder.session.end_profiling()
    decoder.session = plain
    ops, matmuls = collections.Counter(), collections.Counter()
    for event in json.loads(Path(path).read_text()):
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        ops[op] += event["dur"]
        if op == "MatMulNBits":
            n = int(event["args"]["output_type_shape"][0]["float"][-1])
            k = int(event["args"]["input_type_shape"][0]["float"][-1])
            matmuls[kinds.get(n, "o" if k == n else "down")] += event["dur"]
    Path(path).unlink()
    runs = steps + 1  # the prefill is profiled too
    print(f"  kernels per step: {sum(ops.values()) / runs / 1e3:.2f} ms (prefill included once in {runs} runs)")
    for op, us in ops.most_common(8):
        print(f"    {op:34} {us / runs / 1e3:7.3f} ms")
    for kind, us in matmuls.most_common():
        print(f"    MatMulNBits {kind:22} {us / runs / 1e3:7.3f} ms")


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--weights", nargs="+", default=["int8", "q4_1"])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, nargs="*", help="also time each graph with these intra-op thread counts")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(f"cpu flags: {cpu_flags()}; torch threads {torch.get_num_threads()}; onnxruntime {ort.__version__}")
    variants = load_variants(args.model, args.weights, args.threads)
    ids = torch.tensor(variants["torch"].tokenizer(PROMPT)["input_ids"])
    accuracy(variants, ids, args.steps)
    print(f"load average before: {load_average()}")
    times = timed_steps(variants, ids, args.steps)
    print(f"load average after:  {load_average()}")
    base = np.median(times["torch"])
    for name, seconds in times.items():
        ms = np.array(seconds) * 1e3
        print(
            f"{name:12} step median {np.median(ms):6.2f} ms, p10 {np.percentile(ms, 10):6.2f} ms -> "
            f"{1e3 / np.median(ms):5.1f} tokens/s ({base / np.median(seconds):.2f}x torch)"
        )
    if args.profile:
        for name, lm in variants.items():
            if lm.onnx is not None:
                print(f"{name}: ORT profile of {args.steps} decode steps")
                profile(lm, ids, args.steps)


if __name__ == "__main__":
    main()
