"""Spike for issue 35: how fast can the default LM (SmolLM2-135M, Llama layout) decode on this CPU
through ONNX Runtime with 4-bit block-quantised weights (`MatMulNBits`) and its fused
`GroupQueryAttention`, fed input embeddings as vlchat's engine feeds its LM?

    python -m research.ort_decode HF_DIR [--tokens 64] [--level 4]

Builds the graph with onnx.helper straight from the HF safetensors (no exporter), checks the
logits of a prompt against transformers' float32 forward, then times greedy decoding at batch 1
beside transformers' own float32 step (both in this run). Prints the CPU flags.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vlchat.model.onnx_lm import BLOCK, quantise  # the product's quantiser, so the spike measures what ships


def cpu_flags() -> str:
    words = set(Path("/proc/cpuinfo").read_text().split())
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni") if f in words)


class GraphBuilder:
    def __init__(self, level: int, bits: int) -> None:
        self.nodes, self.inits, self.level, self.bits, self.count = [], [], level, bits, 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, stem: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        names = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, domain=domain, **attrs))
        return names

    def linear(self, x: str, weight: np.ndarray) -> str:  # weight (N, K) as nn.Linear's
        n, k = weight.shape
        if self.level < 0:  # float32 reference graph: plain MatMul
            return self.node("MatMul", [x, self.const("wt", np.ascontiguousarray(weight.T))])[0]
        packed, scale, zp = quantise(weight, self.bits)
        ins = [x, self.const("w", packed), self.const("s", scale), self.const("z", zp)]
        return self.node(
            "MatMulNBits",
            ins,
            domain="com.microsoft",
            K=k,
            N=n,
            bits=self.bits,
            block_size=BLOCK,
            accuracy_level=self.level,
        )[0]

    def rms(self, x: str, weight: np.ndarray, eps: float) -> str:
        return self.node("SimplifiedLayerNormalization", [x, self.const("g", weight)], axis=-1, epsilon=eps)[0]


def build(hf_dir: Path, level: int, bits: int, max_len: int = 8192):
    from onnx import TensorProto, helper
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, eps, layers = hidden // heads, config["rms_norm_eps"], config["num_hidden_layers"]
    theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0))
    g = GraphBuilder(level, bits)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_len), inv)
    cos, sin = g.const("cos", np.cos(angles).astype(np.float32)), g.const("sin", np.sin(angles).astype(np.float32))
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", hidden]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = []
    x = "inputs_embeds"
    for i in range(layers):
        p = f"model.layers.{i}."
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_{kind}_{i}", TensorProto.FLOAT, ["batch", kv_heads, "past", head_dim]
                )
            )
        h = g.rms(x, weights[p + "input_layernorm.weight"], eps)
        qkv = np.concatenate([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], axis=0)
        packed_qkv = g.linear(h, qkv)
        attn, pk, pv = g.node(
            "GroupQueryAttention",
            [packed_qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length", cos, sin],
            outputs=3,
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
        )
        g.nodes[-1].output[1], g.nodes[-1].output[2] = f"present_key_{i}", f"present_value_{i}"
        for kind in ("key", "value"):
            outputs.append(
                helper.make_tensor_value_info(
                    f"present_{kind}_{i}", TensorProto.FLOAT, ["batch", kv_heads, "total", head_dim]
                )
            )
        x = g.node("Add", [x, g.linear(attn, weights[p + "self_attn.o_proj.weight"])])[0]
        h = g.rms(x, weights[p + "post_attention_layernorm.weight"], eps)
        gate_up = g.linear(h, np.concatenate([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]]))
        gate, up = g.node("Split", [gate_up, g.const("split", np.array([1536, 1536], np.int64))], outputs=2, axis=-1)
        act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])[0]])[0], up])[0]
        x = g.node("Add", [x, g.linear(act, weights[p + "mlp.down_proj.weight"])])[0]
    # logits of the last position only: (B, 1, V)
    last = g.node(
        "Slice",
        [
            x,
            g.const("st", np.array([-1], np.int64)),
            g.const("en", np.array([2**31], np.int64)),
            g.const("ax", np.array([1], np.int64)),
        ],
    )[0]
    h = g.rms(last, weights["model.norm.weight"], eps)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    g.linear(h, head)
    g.nodes[-1].output[0] = "logits"
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, head.shape[0]]))
    graph = helper.make_graph(g.nodes, "smollm2", inputs, outputs, g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    return model, config, weights


def main() -> None:
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument(
        "--level", type=int, default=4, help="MatMulNBits accuracy_level (4: int8 activations; -1: float32 MatMul)"
    )
    args = parser.parse_args()
    print(f"cpu flags: {cpu_flags()}; torch threads {torch.get_num_threads()}; onnxruntime {ort.__version__}")
    start = time.perf_counter()
    model, config, weights = build(args.hf_dir, args.level, args.bits)
    path = Path("/tmp/ort_smollm2.onnx")
    import onnx

    onnx.save(model, str(path), save_as_external_data=True, location="ort_smollm2.data")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    print(f"build + quantise + session: {time.perf_counter() - start:.1f} s")
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    embed = weights["model.embed_tokens.weight"]
    hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    prompt = [1, 504, 3458, 282, 4526, 314, 253, 1345, 30, 2]  # any ids
    past = {
        f"past_{k}_{i}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
        for i in range(layers)
        for k in ("key", "value")
    }

    def step(ids: list[int], past: dict, length: int):
        feed = {
            "inputs_embeds": embed[ids][None].astype(np.float32),
            "seqlens_k": np.array([length + len(ids) - 1], np.int32),
            "total_sequence_length": np.array(length + len(ids), np.int32),
            **past,
        }
        out = session.run(None, feed)
        names = [o.name for o in session.get_outputs()]
        present = {n.replace("present", "past"): v for n, v in zip(names[1:], out[1:], strict=True)}
        return out[0][0, -1], present

    logits, past = step(prompt, past, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
    print(
        f"prefill logits vs transformers float32: max abs diff {np.abs(logits - ref).max():.3f}, "
        f"argmax {int(logits.argmax())} vs {int(ref.argmax())}, cosine "
        f"{float(logits @ ref / np.linalg.norm(logits) / np.linalg.norm(ref)):.5f}"
    )
    length, token, generated = len(prompt), int(logits.argmax()), []
    start = time.perf_counter()
    for _ in range(args.tokens):
        logits, past = step([token], past, length)
        length += 1
        token = int(logits.argmax())
        generated.append(token)
    ort_s = time.perf_counter() - start
    print(
        f"onnxruntime int{args.bits} (accuracy_level {args.level}): {args.tokens} tokens in {ort_s:.2f} s = "
        f"{args.tokens / ort_s:.1f} tokens/s"
    )
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        hf_tokens = []
        start = time.perf_counter()
        for _ in range(args.tokens):
            out = hf(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            hf_tokens.append(token)
        hf_s = time.perf_counter() - start
    print(
        f"transformers float32: {args.tokens} tokens in {hf_s:.2f} s = {args.tokens / hf_s:.1f} tokens/s; "
        f"speed-up {hf_s / ort_s:.2f}x; greedy tokens equal for the first "
        f"{next((i for i, (a, b) in enumerate(zip(generated, hf_tokens, strict=True)) if a != b), args.tokens)}"
    )


if __name__ == "__main__":
    main()
