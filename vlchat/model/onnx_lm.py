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
from vlchat.model.onnx_quant import BLOCK, q4_1_blocks, quantise, symmetric8

log = logging.getLogger(__name__)

BUILDER_VERSION = 6  # bump when the graph changes: cached graphs are keyed by it
# LMConfig.onnx_weights: 8 or 4 bits with integer zero points (int4 is inaccurate on GGUF Q4_1
# weights), q4_1 (4 bits plus a float residual per block, exact on them; 8-bit LM head), float32
WEIGHTS = ("int8", "int4", "q4_1", "float32")
STATIC_ROPE = {"default", "linear", "llama3"}  # rotary types whose cos/sin tables do not depend on the length


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).contiguous().numpy()


def array_of(tensor: torch.Tensor) -> np.ndarray:
    """numpy_of without its three no-op calls for the usual case, a float32 contiguous cache
    tensor (60 of them a step for the default LM)."""
    if tensor.dtype == torch.float32 and not tensor.requires_grad and tensor.is_contiguous():
        return tensor.numpy()
    return numpy_of(tensor)


class GraphBuilder:
    """Nodes and initialisers of one graph, with fresh names; `weights` one of WEIGHTS."""

    def __init__(self, weights: str) -> None:
        self.nodes, self.inits, self.weights, self.count = [], [], weights, 0

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
        self.nodes.append(helper.make_node(op, inputs, names, name=names[0], domain=domain, **attrs))
        return names

    def op(self, op: str, *inputs: str, **attrs) -> str:
        return self.node(op, list(inputs), **attrs)[0]

    def matmul(self, x: str, weight: np.ndarray, head: bool = False) -> str:
        """x (.., K) @ weight (N, K).T -> (.., N) in `weights`' format; q4_1: the LM head (Q8_0 in
        GGUF files) in symmetric 8 bits, the rest 4 bits plus the residual matmul (model/onnx_quant.py)."""
        k = weight.shape[1]
        if self.weights == "float32":
            return self.op("MatMul", x, self.const("wt", weight.T.astype(np.float32)))
        if self.weights != "q4_1":
            return self.nbits(x, quantise(weight, 8 if self.weights == "int8" else 4), weight.shape)
        if head or k % BLOCK:
            return self.nbits(x, symmetric8(weight), weight.shape)
        packed, scale, zero, residual = q4_1_blocks(weight)
        main = self.nbits(x, (packed, scale, zero), weight.shape)
        # blocksum(x) as x @ S, S (K, K/32) one where row k is in block column k // 32: one node, not a
        # Reshape and a ReduceSum (the per-node cost shows on a loaded 2-core machine)
        ones = np.kron(np.eye(k // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
        sums = self.op("MatMul", x, self.const("blocks", ones))  # (.., K/32)
        return self.op("Add", main, self.op("MatMul", sums, self.const("r", residual.T)))  # + R blocksum(x)

    def nbits(self, x: str, parts: tuple[np.ndarray, np.ndarray, np.ndarray], shape: tuple[int, int]) -> str:
        """MatMulNBits of x with the (B, scales, zero points) of an (N, K) weight; int8 activations."""
        packed, scale, zero = parts
        ins = [x, self.const("w", packed), self.const("s", scale), self.const("z", zero)]
        bits = 8 if packed.shape[-1] == BLOCK else 4
        n, k = shape
        attrs = {"K": k, "N": n, "bits": bits, "block_size": BLOCK, "accuracy_level": 4}
        return self.node("MatMulNBits", ins, domain="com.microsoft", **attrs)[0]

    def linears(self, x: str, modules: list[nn.Linear], gate: str | None, head: bool = False) -> str:
        """Several linear layers on one input as one fused matmul (their outputs side by side),
        with their biases and, where some are gated LoRA layers, their updates B·A·x times the
        per-row gate as one more pair of matmuls: the A's stacked, the B's block-diagonal."""
        fused = self.matmul(x, np.concatenate([numpy_of(m.weight) for m in modules]), head)
        if any(m.bias is not None for m in modules):
            biases = [numpy_of(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32) for m in modules]
            fused = self.op("Add", fused, self.const("b", np.concatenate(biases)))
        adapted = [m for m in modules if hasattr(m, "lora_down")]  # GatedLoRALinear: (r, in), (out, r) scaled
        if not adapted:
            return fused
        downs = np.concatenate([numpy_of(m.lora_down) for m in adapted])  # (R, in)
        ups = np.zeros((sum(m.out_features for m in modules), len(downs)), np.float32)  # (out, R)
        row, col = 0, 0
        for m in modules:
            if hasattr(m, "lora_down"):
                rank = m.lora_down.shape[0]
                ups[row : row + m.out_features, col : col + rank] = numpy_of(m.lora_up)
                col += rank
            row += m.out_features
        update = self.op("MatMul", self.op("MatMul", x, self.const("la", downs.T)), self.const("lb", ups.T))
        return self.op("Add", fused, self.op("Mul", update, gate))

    def rms(self, x: str, norm: nn.Module) -> str:
        return self.op(
            "SimplifiedLayerNormalization", x, self.const("g", numpy_of(norm.weight)), axis=-1, epsilon=eps_of(norm)
        )

    def add_rms(self, x: str, residual: str, norm: nn.Module) -> tuple[str, str]:
        """(RMSNorm(x + residual), x + residual) as one node."""
        out = self.node(
            "SkipSimplifiedLayerNormalization",
            [x, residual, self.const("g", numpy_of(norm.weight))],
            outputs=4,
            domain="com.microsoft",
            epsilon=eps_of(norm),
        )
        return out[0], out[3]


def eps_of(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def rotary_tables(model: nn.Module, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, head_dim / 2) cos and sin as the model's own rotary embedding computes them
    (HF Llama's rotate_half layout, GroupQueryAttention's cos_cache and sin_cache)."""
    rotary = model.get_decoder().rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise VlchatError(f"lm runtime onnx supports rotary types {sorted(STATIC_ROPE)}, not {rope_type!r}")
    inv = rotary.inv_freq.detach().double().cpu().numpy()
    angles = np.outer(np.arange(positions, dtype=np.float64), inv)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return (np.cos(angles) * scaling).astype(np.float32), (np.sin(angles) * scaling).astype(np.float32)


def check_layout(config) -> None:
    if config.model_type not in ("llama", "mistral", "qwen2") or getattr(config, "sliding_window", None):
        raise VlchatError(f"lm runtime onnx supports Llama-layout models, not {config.model_type!r}")


def build_graph(model: nn.Module, weights: str, positions: int):
    """The ONNX model of `model`'s (a HF Llama-layout causal LM) cached forward; see the module doc."""
    from onnx import TensorProto, helper

    config = model.config
    check_layout(config)
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    decoder = model.get_decoder()
    g = GraphBuilder(weights)
    floats = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", floats, ["batch", "seq", config.hidden_size]),
        helper.make_tensor_value_info("attention_bias", floats, ["batch", 1, "seq", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    gate = None
    if any(hasattr(m, "lora_down") for m in model.modules()):
        gate = "adapter_gate"
        inputs.append(helper.make_tensor_value_info(gate, floats, ["batch", 1, 1]))
    outputs = [helper.make_tensor_value_info("logits", floats, ["batch", config.vocab_size])]
    for i in range(len(decoder.layers)):
        for kind in ("key", "value"):
            shape = ["batch", kv_heads, "past", head_dim]
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", floats, shape))
            outputs.append(
                helper.make_tensor_value_info(f"present_{kind}_{i}", floats, [*shape[:2], "total", head_dim])
            )
    shared = attention_inputs(g, model, positions)
    residual, h = "inputs_embeds", g.rms("inputs_embeds", decoder.layers[0].input_layernorm)
    norms = [layer.input_layernorm for layer in decoder.layers[1:]] + [decoder.norm]
    for i, (layer, next_norm) in enumerate(zip(decoder.layers, norms)):
        attn, mlp = layer.self_attn, layer.mlp
        context = attention(g, g.linears(h, [attn.q_proj, attn.k_proj, attn.v_proj], gate), i, shared, config)
        h, residual = g.add_rms(g.linears(context, [attn.o_proj], gate), residual, layer.post_attention_layernorm)
        gate_proj, up = g.node(
            "Split", [g.linears(h, [mlp.gate_proj, mlp.up_proj], gate)], outputs=2, axis=-1, num_outputs=2
        )
        hidden = g.op("Mul", g.op("Mul", gate_proj, g.op("Sigmoid", gate_proj)), up)
        h, residual = g.add_rms(g.linears(hidden, [mlp.down_proj], gate), residual, next_norm)
    last = g.op("Gather", h, g.const("last", np.array(-1, np.int64)), axis=1)  # (B, D), normed by decoder.norm
    g.nodes.append(
        helper.make_node("Identity", [g.linears(last, [model.get_output_embeddings()], gate, head=True)], ["logits"])
    )
    graph = helper.make_graph(g.nodes, "vlchat_lm", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def attention_inputs(g: GraphBuilder, model: nn.Module, positions: int) -> dict[str, str]:
    """What every layer's GroupQueryAttention shares: the rotary tables and, from the bias's shape,
    the total length (P + T) as a scalar and, per row, the index of its last key (P + T - 1)."""
    cos, sin = rotary_tables(model, positions)
    shape = g.op("Shape", "attention_bias")  # (B, 1, T, P + T)
    total = g.op("Cast", g.op("Gather", shape, g.const("axis", np.array(3, np.int64)), axis=0), to=6)  # int32
    last = g.op("Sub", total, g.const("one", np.array(1, np.int32)))
    rows = g.op("Expand", g.op("Unsqueeze", last, g.ints(0)), g.op("Slice", shape, g.ints(0), g.ints(1)))  # (B,)
    return {"cos": g.const("cos", cos), "sin": g.const("sin", sin), "total": total, "seqlens": rows}


def attention(g: GraphBuilder, qkv: str, layer: int, shared: dict[str, str], config) -> str:
    """ORT's fused GroupQueryAttention on the (B, T, (H + 2 kvH) hd) projections -> (B, T, H hd): the
    new keys and values appended to the past (present_*_i), and softmax(q k^T / sqrt(hd) +
    attention_bias) v, each key/value head serving H / kvH query heads. The bias carries the left
    padding; GroupQueryAttention's own causal mask (query t sees keys up to P + t) is the bias's.
    The rotary is a RotaryEmbedding node per q and k at the caller's position ids: the attention's
    own rotary ignores them on a first prompt, which a left-padded batch shifts."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sizes = g.ints(heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    q, k, v = g.node("Split", [qkv, sizes], outputs=3, axis=-1)
    q, k = (
        g.op("RotaryEmbedding", x, "position_ids", shared["cos"], shared["sin"], domain="com.microsoft", num_heads=n)
        for x, n in ((q, heads), (k, kv_heads))
    )
    out = g.node(
        "GroupQueryAttention",
        [q, k, v, f"past_key_{layer}", f"past_value_{layer}", shared["seqlens"], shared["total"]]
        + ["", "", "", "attention_bias"],
        outputs=3,
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv_heads,
    )
    g.nodes[-1].output[1], g.nodes[-1].output[2] = f"present_key_{layer}", f"present_value_{layer}"
    return out[0]


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


def ensure_graph(model: nn.Module, weights: str, positions: int, path: Path) -> Path:
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
            build_graph(model, weights, positions),
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
        path = ensure_graph(model, weights, positions, graph_path(cache_root, {**identity, "onnx_weights": weights}))
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
                feed[f"past_{kind}_{i}"] = array_of(tensor)
        if "adapter_gate" in self.input_names:
            feed["adapter_gate"] = gate_column(gate_rows, batch)
        out = dict(zip(self.output_names, self.run(feed, batch > 1 and length > 1 and done > 0)))
        layers = [
            (torch.from_numpy(out[f"present_key_{i}"]), torch.from_numpy(out[f"present_value_{i}"]))
            for i in range(self.layers)
        ]
        return torch.from_numpy(out["logits"]), dynamic_cache(layers)

    def run(self, feed: dict[str, np.ndarray], by_row: bool) -> list[np.ndarray]:
        """The session's outputs; `by_row`: one row at a time, stacked, as GroupQueryAttention on
        the CPU takes several new positions after a past only at batch 1 (a batched prefill)."""
        if not by_row:
            return self.session.run(self.output_names, feed)
        batch = len(feed["inputs_embeds"])
        rows = [self.session.run(self.output_names, {k: v[r : r + 1] for k, v in feed.items()}) for r in range(batch)]
        return [np.concatenate(parts) for parts in zip(*rows)]


def dynamic_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers DynamicCache holding these (B, kvH, S, hd) tensors themselves: its constructor
    would copy each one (torch.cat onto an empty tensor), the whole KV cache again every step, and
    its layers' lazy initialisation cost ~2 ms a step in Python; the layers are filled in directly."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers = []
    for keys, values in layers:
        layer = DynamicLayer()
        layer.keys, layer.values, layer.dtype, layer.device = keys, values, keys.dtype, keys.device
        layer.is_initialized = True
        cache.layers.append(layer)
    return cache


def attention_bias(mask: torch.Tensor | None, batch: int, done: int, length: int) -> np.ndarray:
    """(B, 1, T, P+T) additive bias: 0 where query t may see key j (a real position, j <= P + t),
    float32's lowest value elsewhere (as HF's eager masks)."""
    total = done + length
    if mask is None and length == 1:  # one new position, every key real: nothing is masked
        return np.zeros((batch, 1, 1, total), np.float32)
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
