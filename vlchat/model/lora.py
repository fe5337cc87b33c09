"""A LoRA adapter kept beside the LM's weights and switched on per sequence (per batch row).

Stage 2 (`lm: lora`) trains an adapter on short answers about images; merged into the weights it
also changes every text-only conversation (the base LM's poem became "There is no sea, so there
is no poem."). Kept apart instead, each target projection computes

    y = W x                      for rows whose sequence has no image (the base LM, bit for bit)
    y = W x + (B A x) * scale    for rows whose sequence has one

The caller decides per sequence (`LMState.adapter`) and the LM sets an `AdapterGate` around each
forward; the projections read it, so the HF model's own forward code stays as it is.

peft reads the adapter files (every peft LoRA option is honoured); inference then uses only these
plain modules. Training (stage 2) still wraps the LM with peft.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlchat.errors import VlchatError

# What the running forward asks of the adapter: None (off for every row), True (on for every
# row), or a (B,) bool tensor (on for some rows of a mixed decode batch).
GateRows = bool | torch.Tensor | None


class AdapterGate:
    """Shared by one LM's adapted projections: which rows the adapter is on for in the current
    forward. A context variable, so a forward on another thread never sees this one's gate."""

    def __init__(self) -> None:
        self._rows: ContextVar[GateRows] = ContextVar(f"vlchat_adapter_gate_{id(self)}", default=None)

    @property
    def rows(self) -> GateRows:
        return self._rows.get()

    @contextmanager
    def on(self, rows: bool | Sequence[bool]) -> Iterator[None]:
        """Run the enclosed forward with the adapter on for `rows` (one flag, or one per batch row)."""
        token = self._rows.set(normalise(rows))
        try:
            yield
        finally:
            self._rows.reset(token)


def normalise(rows: bool | Sequence[bool]) -> GateRows:
    """All off -> None, all on -> True, mixed -> (B,) bool tensor."""
    if isinstance(rows, bool):
        return True if rows else None
    flags = [bool(r) for r in rows]
    if not any(flags):
        return None
    return True if all(flags) else torch.tensor(flags)


class GatedLoRALinear(nn.Linear):
    """An `nn.Linear` (the base weight and bias, same parameter names) plus a gated rank-r update.

    down: A (r, in); up: B * scale (out, r), the scale folded in once at load."""

    def __init__(self, base: nn.Linear, down: torch.Tensor, up: torch.Tensor, gate: AdapterGate) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        # non-persistent: the state dict stays the base LM's
        self.register_buffer("lora_down", down.to(base.weight.dtype), persistent=False)  # (r, in)
        self.register_buffer("lora_up", up.to(base.weight.dtype), persistent=False)  # (out, r)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        out = F.linear(x, self.weight, self.bias)  # exactly nn.Linear's forward: the base LM
        rows = self.gate.rows
        if rows is None:
            return out
        if rows is True:
            return out + self.update(x)
        if rows.shape[0] != x.shape[0]:
            raise ValueError(f"adapter gate has {rows.shape[0]} rows, the batch {x.shape[0]}")
        rows = rows.to(x.device)
        out[rows] += self.update(x[rows])  # rows without an image keep W x as it is
        return out

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_down), self.lora_up)  # (.., in) -> (.., r) -> (.., out)


def attach_adapter(model: nn.Module, spec: str) -> AdapterGate:
    """Read a peft LoRA adapter and put a `GatedLoRALinear` in place of each projection it adapts
    (in `model`, in place); returns the gate that switches them."""
    from vlchat.assets import resolve

    path = resolve(spec)
    if not (path / "adapter_config.json").is_file():
        raise VlchatError(f"LoRA adapter {spec!r} not found (expected a peft directory with adapter_config.json)")
    updates = read_updates(model, path, spec)
    gate = AdapterGate()
    for name, (down, up) in updates.items():
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, GatedLoRALinear(getattr(holder, child), down, up, gate))
    return gate


def read_updates(model: nn.Module, path: Path, spec: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name in `model`: (A, B * scale)} as peft loads them; `model` is left unchanged."""
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    with warnings.catch_warnings():  # peft calls a transformers API that warns of its own rename
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(path))
    config = peft_model.peft_config["default"]
    refused = [o for o in ("modules_to_save", "trainable_token_indices") if getattr(config, o, None)]
    updates = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        plain = type(module) is LoraLinear and isinstance(module.base_layer, nn.Linear)
        if not plain or module.use_dora.get("default") or module.lora_bias.get("default") or module.fan_in_fan_out:
            refused.append(f"{name.removeprefix(prefix)} ({type(module).__name__})")
            continue
        down = module.lora_A["default"].weight.detach()  # (r, in)
        up = module.lora_B["default"].weight.detach() * module.scaling["default"]  # (out, r)
        updates[name.removeprefix(prefix)] = (down.clone(), up.clone())
    peft_model.unload()  # the original modules back in place, weights untouched
    if refused:
        raise VlchatError(
            f"LoRA adapter {spec!r} uses options vlchat cannot switch per conversation: "
            f"{', '.join(refused[:3])}{' ...' if len(refused) > 3 else ''} (only plain LoRA on linear layers)"
        )
    if not updates:
        raise VlchatError(f"LoRA adapter {spec!r} adapts no layer of this language model")
    return updates
