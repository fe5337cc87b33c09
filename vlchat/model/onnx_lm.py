"""A faster CPU runtime for the LM's cached forward: the Llama decoder as an ONNX graph run by ONNX Runtime.

The graph is written with onnx.helper from the loaded torch model's weights (no exporter), once,
and cached on disk (`graph_path`). Standard ONNX ops compute attention (not the fused
GroupQueryAttention), so a left-padded batch works: the caller passes an additive attention bias
built from the attention mask and causality, and each row's position ids. Linear layers are
`MatMulNBits` (block-quantised weights, int8 activations at accuracy_level 4) or, for checks,
plain float32 `MatMul`. A gated LoRA adapter (model/lora.py) becomes extra float MatMuls times a
per-row gate input. Embeddings stay in torch; the KV cache handed back is a transformers
`DynamicCache` over the graph's present tensors, so `LMState` and batching work unchanged.

research/ort_decode.py is the spike this comes from (measured accuracy and speed per bit width).

Inputs:  inputs_embeds (B, T, D) float32, attention_bias (B, 1, T, P+T) float32 (0 or very
         negative), position_ids (B, T) int64, adapter_gate (B, 1, 1) float32 (only with an
         adapter), past_key_i / past_value_i (B, kv_heads, P, head_dim) float32.
Outputs: logits (B, V) of the last position, present_key_i / present_value_i (B, kv_heads, P+T, head_dim).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlchat.errors import VlchatError

log = logging.getLogger(__name__)

BUILDER_VERSION = 2  # bump when the graph changes: cached graphs are keyed by it
BLOCK = 32  # MatMulNBits block size along K
WEIGHTS = {"int8": 8, "int4": 4, "float32": None}  # LMConfig.onnx_weights -> MatMulNBits bits
STATIC_ROPE = {"default", "linear", "llama3"}  # rotary types whose cos/sin tables do not depend on the length


def quantise(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, K) float -> MatMulNBits' B (N, K/32, 32*bits/8) uint8, scales (N*K/32,) float32 and zero
    points uint8: asymmetric per block of 32 along K (K zero-padded to whole blocks), two 4-bit
    values per byte low nibble first. 4 bits are inaccurate on GGUF Q4_1 weights (research/ort_decode.py)."""
    n, k = weight.shape
    if k % BLOCK:
        weight = np.pad(weight, ((0, 0), (0, BLOCK - k % BLOCK)))
    top = 2**bits - 1
    blocks = weight.reshape(n, -1, BLOCK).astype(np.float32)
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = np.maximum((high - low) / top, 1e-12)
    zero = np.clip(np.round(-low / scale), 0, top)
    q = np.clip(np.round(blocks / scale[..., None] + zero[..., None]), 0, top).astype(np.uint8)
    zero = zero.astype(np.uint8)
    if bits == 8:
        return q, scale.astype(np.float32).reshape(-1), zero.reshape(-1)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # (N, K/32, 16)
    if zero.shape[1] % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
    return packed, scale.astype(np.float32).reshape(-1), (zero[:, 0::2] | (zero[:, 1::2] << 4)).reshape(-1)


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).contiguous().numpy()


class GraphBuilder:
    """Nodes and initialisers of one graph, with fresh names; `bits` None = float32 MatMul."""

    def __init__(self, bits: int | None) -> None:
        self.nodes, self.inits, self.bits, self.count = [], [], bits, 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, stem: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        # np.asarray, not ascontiguousarray: that makes a 0-d scalar 1-d
        self.inits.append(numpy_helper.from_array(np.asarray(value, order="C"), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const("i", np.array(values, np.int64))

    def node(self, op: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        names = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, domain=domain, **attrs))
        return names

    def op(self, op: str, *inputs: str, **attrs) -> str:
        return self.node(op, list(inputs), **attrs)[0]

    def matmul(self, x: str, weight: np.ndarray) -> str:
        """x (.., K) @ weight (N, K).T -> (.., N), quantised unless bits is None."""
        n, k = weight.shape
        if self.bits is None:
            return self.op("MatMul", x, self.const("wt", weight.T.astype(np.float32)))
        packed, scale, zero = quantise(weight, self.bits)
        ins = [x, self.const("w", packed), self.const("s", scale), self.const("z", zero)]
        return self.node(
            "MatMulNBits", ins, domain="com.microsoft", K=k, N=n, bits=self.bits, block_size=BLOCK, accuracy_level=4
        )[0]

    def linears(self, x: str, modules: list[nn.Linear], gate: str | None) -> list[str]:
        """Several linear layers on one input as one fused matmul, split back; each with its bias
        and, where it is a gated LoRA layer, its update B·A·x times the per-row gate."""
        weight = np.concatenate([numpy_of(m.weight) for m in modules])
        fused = self.matmul(x, weight)
        sizes = [m.out_features for m in modules]
        outs = (
            self.node("Split", [fused, self.ints(*sizes)], outputs=len(modules), axis=-1) if len(sizes) > 1 else [fused]
        )
        result = []
        for out, module in zip(outs, modules):
            if module.bias is not None:
                out = self.op("Add", out, self.const("b", numpy_of(module.bias)))
            if hasattr(module, "lora_down"):  # GatedLoRALinear: (r, in) and (out, r) with the scale folded in
                down = self.op("MatMul", x, self.const("la", numpy_of(module.lora_down).T))
                update = self.op("MatMul", down, self.const("lb", numpy_of(module.lora_up).T))
                out = self.op("Add", out, self.op("Mul", update, gate))
            result.append(out)
        return result

    def rms(self, x: str, norm: nn.Module) -> str:
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        return self.op("SimplifiedLayerNormalization", x, self.const("g", numpy_of(norm.weight)), axis=-1, epsilon=eps)


def rotate(g: GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    """HF Llama rotary embedding: x * cos + rotate_half(x) * sin; x (B, T, heads, hd), cos/sin (B, T, 1, hd)."""
    first, second = g.node("Split", [x, g.ints(half, half)], outputs=2, axis=-1)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def rotary_tables(model: nn.Module, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, head_dim) cos and sin as the model's own rotary embedding computes them."""
    rotary = model.get_decoder().rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise VlchatError(f"lm runtime onnx supports rotary types {sorted(STATIC_ROPE)}, not {rope_type!r}")
    inv = rotary.inv_freq.detach().double().cpu().numpy()
    angles = np.outer(np.arange(positions, dtype=np.float64), inv)
    angles = np.concatenate([angles, angles], axis=-1)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return (np.cos(angles) * scaling).astype(np.float32), (np.sin(angles) * scaling).astype(np.float32)


def build_graph(model: nn.Module, bits: int | None, positions: int):
    """The ONNX model of `model`'s (a HF Llama-layout causal LM) cached forward; see the module doc."""
    from onnx import TensorProto, helper

    config = model.config
    if config.model_type not in ("llama", "mistral", "qwen2") or getattr(config, "sliding_window", None):
        raise VlchatError(f"lm runtime onnx supports Llama-layout models, not {config.model_type!r}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    decoder = model.get_decoder()
    adapted = any(hasattr(m, "lora_down") for m in model.modules())
    g = GraphBuilder(bits)
    cos_table, sin_table = rotary_tables(model, positions)
    cos = g.op("Unsqueeze", g.op("Gather", g.const("cos", cos_table), "position_ids"), g.ints(2))  # (B, T, 1, hd)
    sin = g.op("Unsqueeze", g.op("Gather", g.const("sin", sin_table), "position_ids"), g.ints(2))
    floats = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", floats, ["batch", "seq", config.hidden_size]),
        helper.make_tensor_value_info("attention_bias", floats, ["batch", 1, "seq", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    gate = None
    if adapted:
        gate = "adapter_gate"
        inputs.append(helper.make_tensor_value_info(gate, floats, ["batch", 1, 1]))
    outputs = [helper.make_tensor_value_info("logits", floats, ["batch", config.vocab_size])]
    x = "inputs_embeds"
    scale = g.const("scale", np.array(head_dim**-0.5, np.float32))
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_{kind}_{i}", floats, ["batch", kv_heads, "past", head_dim])
            )
            outputs.append(
                helper.make_tensor_value_info(f"present_{kind}_{i}", floats, ["batch", kv_heads, "total", head_dim])
            )
        h = g.rms(x, layer.input_layernorm)
        q, k, v = g.linears(h, [attn.q_proj, attn.k_proj, attn.v_proj], gate)
        q = rotate(g, g.op("Reshape", q, g.ints(0, 0, heads, head_dim)), cos, sin, head_dim // 2)  # (B, T, H, hd)
        k = rotate(g, g.op("Reshape", k, g.ints(0, 0, kv_heads, head_dim)), cos, sin, head_dim // 2)
        v = g.op("Reshape", v, g.ints(0, 0, kv_heads, head_dim))
        q = g.op("Transpose", q, perm=[0, 2, 1, 3])  # (B, H, T, hd)
        k = g.op("Transpose", k, perm=[0, 2, 1, 3])  # (B, kvH, T, hd)
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])
        g.nodes.append(helper.make_node("Concat", [f"past_key_{i}", k], [f"present_key_{i}"], axis=2))
        g.nodes.append(helper.make_node("Concat", [f"past_value_{i}", v], [f"present_value_{i}"], axis=2))
        context = attention(g, q, f"present_key_{i}", f"present_value_{i}", scale, heads, kv_heads, head_dim)
        (o,) = g.linears(context, [attn.o_proj], gate)
        x = g.op("Add", x, o)
        h = g.rms(x, layer.post_attention_layernorm)
        gate_proj, up = g.linears(h, [mlp.gate_proj, mlp.up_proj], gate)
        (down,) = g.linears(g.op("Mul", g.op("Mul", gate_proj, g.op("Sigmoid", gate_proj)), up), [mlp.down_proj], gate)
        x = g.op("Add", x, down)
    last = g.op("Gather", x, g.const("last", np.array(-1, np.int64)), axis=1)  # (B, D)
    (logits,) = g.linears(g.rms(last, decoder.norm), [model.get_output_embeddings()], gate)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    graph = helper.make_graph(g.nodes, "vlchat_lm", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def attention(g: GraphBuilder, q: str, k: str, v: str, scale: str, heads: int, kv_heads: int, head_dim: int) -> str:
    """softmax(q k^T * scale + attention_bias) v with grouped heads -> (B, T, H * hd). q (B, H, T, hd),
    k and v (B, kvH, S, hd). Each key/value head serves H / kvH query heads: the query heads are
    grouped as (B, kvH, H / kvH, T, hd) and the matmuls broadcast over the group, so keys and values
    are never copied per query head (an Expand of them cost ~2x the step at 400 positions)."""
    group = heads // kv_heads
    q = g.op("Reshape", q, g.ints(0, kv_heads, group, -1, head_dim))  # (B, kvH, G, T, hd)
    k = g.op("Unsqueeze", g.op("Transpose", k, perm=[0, 1, 3, 2]), g.ints(2))  # (B, kvH, 1, hd, S)
    scores = g.op("Mul", g.op("MatMul", q, k), scale)  # (B, kvH, G, T, S)
    scores = g.op("Add", scores, g.op("Unsqueeze", "attention_bias", g.ints(2)))  # bias (B, 1, 1, T, S)
    context = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.op("Unsqueeze", v, g.ints(2)))  # (B, kvH, G, T, hd)
    context = g.op("Reshape", context, g.ints(0, heads, -1, head_dim))  # (B, H, T, hd)
    return g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]), g.ints(0, 0, heads * head_dim))


def graph_path(cache_root: Path, identity: dict) -> Path:
    """Where the graph of these weights, this quantisation and this builder version is cached."""
    key = hashlib.sha256(json.dumps({**identity, "builder": BUILDER_VERSION}, sort_keys=True).encode()).hexdigest()
    return cache_root / f"onnx-{key[:16]}" / "model.onnx"


def files_identity(path: str | Path | None) -> list:
    """A cheap identity of a weights directory or file: names, sizes and modification times."""
    if path is None:
        return []
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return [str(path.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def ensure_graph(model: nn.Module, bits: int | None, positions: int, path: Path) -> Path:
    """Build and save the graph (weights as external data beside it) unless already cached."""
    import onnx

    if path.is_file():
        return path
    log.warning("building the ONNX graph of the LM in %s (once)", path.parent)
    tmp = path.parent.with_name(f".{path.parent.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        onnx.save(
            build_graph(model, bits, positions),
            str(tmp / path.name),
            save_as_external_data=True,
            location="weights.data",
        )
        tmp.replace(path.parent)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_file():  # not another process having won the race
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class OnnxDecoder:
    """Runs the cached forward of `LanguageModel.forward_cached` through ONNX Runtime."""

    def __init__(self, model: nn.Module, weights: str, positions: int, cache_root: Path, identity: dict) -> None:
        import onnxruntime as ort

        if weights not in WEIGHTS:
            raise VlchatError(f"lm onnx_weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        path = ensure_graph(
            model, WEIGHTS[weights], positions, graph_path(cache_root, {**identity, "onnx_weights": weights})
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        config = model.config
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def forward(
        self,
        embeds: torch.Tensor,
        cache,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        gate_rows,
    ):
        """As `LanguageModel.forward_cached`: -> (last-position logits (B, V) float32, DynamicCache)."""
        batch, length = embeds.shape[:2]
        past = [(layer.keys, layer.values) for layer in cache.layers] if cache is not None else []
        done = past[0][0].shape[2] if past else 0
        feed = {
            "inputs_embeds": numpy_of(embeds),
            "attention_bias": attention_bias(attention_mask, batch, done, length),
            "position_ids": positions(position_ids, batch, done, length),
        }
        for i in range(self.layers):
            for kind, j in (("key", 0), ("value", 1)):
                tensor = past[i][j] if past else torch.zeros(batch, self.kv_heads, 0, self.head_dim)
                feed[f"past_{kind}_{i}"] = numpy_of(tensor)
        if "adapter_gate" in self.input_names:
            feed["adapter_gate"] = gate_column(gate_rows, batch)
        out = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        layers = [
            (torch.from_numpy(out[f"present_key_{i}"]), torch.from_numpy(out[f"present_value_{i}"]))
            for i in range(self.layers)
        ]
        return torch.from_numpy(out["logits"]), dynamic_cache(layers)


def dynamic_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers DynamicCache holding these (B, kvH, S, hd) tensors themselves: its constructor
    would copy each one (torch.cat onto an empty tensor), the whole KV cache again every step."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in layers])
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.keys, layer.values = keys, values
    return cache


def attention_bias(mask: torch.Tensor | None, batch: int, done: int, length: int) -> np.ndarray:
    """(B, 1, T, P+T) additive bias: 0 where query t may see key j (a real position, j <= P + t),
    float32's lowest value elsewhere (as HF's eager masks)."""
    total = done + length
    causal = np.arange(total)[None, :] <= (done + np.arange(length))[:, None]  # (T, P+T)
    real = np.ones((batch, total), bool) if mask is None else mask.bool().numpy()  # (B, P+T)
    allowed = causal[None, None] & real[:, None, None, :]
    return np.where(allowed, np.float32(0), np.finfo(np.float32).min).astype(np.float32)


def positions(position_ids: torch.Tensor | None, batch: int, done: int, length: int) -> np.ndarray:
    if position_ids is not None:
        return position_ids.to(torch.int64).numpy()
    return np.broadcast_to(np.arange(done, done + length, dtype=np.int64), (batch, length)).copy()


def gate_column(rows, batch: int) -> np.ndarray:
    """An adapter gate (None / bool / one flag per row) -> (B, 1, 1) float32 of 0 and 1."""
    from vlchat.model.lora import normalise

    rows = normalise(rows) if isinstance(rows, (bool, list, tuple)) else rows
    if rows is None:
        flags = np.zeros(batch, np.float32)
    elif rows is True:
        flags = np.ones(batch, np.float32)
    else:
        flags = np.asarray(rows, dtype=np.float32)
    return flags.reshape(batch, 1, 1)
