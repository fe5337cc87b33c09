"""Where and how a model's weights are put: device, dtype, 8-bit/4-bit quantization, device maps.

The names live in the configs (`ModelConfig.device`, `LMConfig.dtype|load_in|device_map`) so they
serialise; this module checks that the machine can honour them (a GPU for `cuda`, `float16`, a
device map or bitsandbytes; bitsandbytes installed for `load_in`) before any weight is read, and
turns them into the keyword arguments of transformers' `from_pretrained`.

8-bit and 4-bit loading follow MiniGPT-4's `low_resource` mode (`load_in_8bit=True,
device_map={"": device}`), written with transformers' `BitsAndBytesConfig`; `device_map: auto`
lets accelerate spread a large LM over every visible GPU (and CPU RAM when they are full).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import torch

from vlchat.config import ModelConfig, check_names
from vlchat.errors import VlchatError


def resolve_device(device: str) -> str:
    """ "auto" | "cpu" | "cuda" | "cuda:N" -> a torch device string that exists here."""
    check_names(device, "auto", None, None)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    index = int(device.partition(":")[2] or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise VlchatError(
            f"device {device!r} is not available here ({torch.cuda.device_count()} CUDA device(s)); use --device cpu"
        )
    return device


def check_placement(device: str, dtype: str, load_in: str | None, device_map: str | None) -> str:
    """Check the whole request against this machine; returns the resolved device."""
    check_names(device, dtype, load_in, device_map)
    where = resolve_device(device)
    gpu = where.startswith("cuda")
    if dtype == "float16" and not gpu:
        raise VlchatError(
            "dtype float16 runs on GPUs only (CPU float16 matmuls are slow and overflow-prone); "
            "on the CPU use float32 or bfloat16"
        )
    if load_in is not None:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise VlchatError(f"--load-in {load_in} needs bitsandbytes: pip install bitsandbytes (and a CUDA GPU)")
        if not gpu:
            raise VlchatError(f"--load-in {load_in} needs a CUDA GPU (bitsandbytes quantizes on the GPU); none here")
    if device_map is not None and not gpu:
        raise VlchatError(f"--device-map {device_map} spreads a model over GPUs; no CUDA GPU here (use --device cpu)")
    return where


def resolve_dtype(name: str, device: str | None = None) -> torch.dtype:
    """A dtype name -> torch dtype. "auto": bfloat16 on a GPU or a CPU that computes it natively, else float32."""
    if name == "auto":
        on_gpu = device.startswith("cuda") if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu or cpu_has_native_bf16() else torch.float32
    return getattr(torch, name)


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pretrained_kwargs(dtype: torch.dtype, device: str, load_in: str | None, device_map: str | None) -> dict[str, Any]:
    """The `from_pretrained` keywords for a placement: quantization and device map; {} for a plain
    load (the caller moves the model). A quantized model is placed whole on `device` unless a
    device map is asked for (bitsandbytes weights cannot be moved after loading)."""
    kwargs: dict[str, Any] = {}
    if load_in is not None:
        from transformers import BitsAndBytesConfig

        if load_in == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:  # 4-bit NF4 with the compute in the model's dtype (QLoRA's recipe)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif load_in is not None:
        kwargs["device_map"] = {"": device}
    return kwargs


def placed_by_transformers(load_in: str | None, device_map: str | None) -> bool:
    """Whether from_pretrained places the LM itself (then it must not be moved with `.to`)."""
    return load_in is not None or device_map is not None


def with_placement(
    config: ModelConfig, device: str, dtype: str | None, load_in: str | None, device_map: str | None
) -> ModelConfig:
    """`config` with a placement request over it (dtype None: the model's own), checked against this
    machine now, so a bad request fails before anything slow."""
    dtype = dtype if dtype is not None else config.lm.dtype
    check_placement(device, dtype, load_in, device_map)
    lm = replace(config.lm, dtype=dtype, load_in=load_in, device_map=device_map)
    return replace(config, device=device, lm=lm)


def lm_placement(config: ModelConfig) -> tuple[torch.dtype, dict[str, Any]]:
    """(the LM's torch dtype, its from_pretrained placement keywords) for a model config whose
    device is resolved (vlm.load_model does that)."""
    dtype = resolve_dtype(config.lm.dtype, config.device)
    return dtype, pretrained_kwargs(dtype, config.device, config.lm.load_in, config.lm.device_map)
