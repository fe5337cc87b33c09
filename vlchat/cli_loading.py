"""The options of every command that loads a model, in one place: `--device`, `--dtype`,
`--load-in`, `--device-map`, `--trust-remote-code`.

`@loads_model` adds them to a command's signature (typer reads the signature) and hands the command
one checked `Loading` instead, as its `loading` parameter; a bad value or a request this machine
cannot honour (CUDA without a GPU, float16 on the CPU, --load-in without bitsandbytes) fails in
one line before anything slow.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Annotated

import typer

from vlchat.config import DTYPES, ModelConfig


@dataclass(frozen=True)
class Loading:
    device: str = "auto"
    dtype: str | None = None  # None: the model's own (its LMConfig.dtype)
    load_in: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False

    def check(self) -> None:
        """Names and this machine (model/placement.py)."""
        from vlchat.model.placement import check_placement

        check_placement(self.device, self.dtype or "auto", self.load_in, self.device_map)

    def apply(self, config: ModelConfig) -> ModelConfig:
        from vlchat.model.placement import with_placement

        config = with_placement(config, self.device, self.dtype, self.load_in, self.device_map)
        return replace(config, lm=replace(config.lm, trust_remote_code=True)) if self.trust_remote_code else config


def _option(name: str, annotation, default, help: str, *declarations: str) -> inspect.Parameter:
    option = typer.Option(*declarations, help=help)  # declarations: a bool flag without its --no- form
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


OPTIONS = (
    _option("device", str, "auto", "auto (a GPU if there is one) | cpu | cuda | cuda:N."),
    _option("dtype", str | None, None, f"{' | '.join(DTYPES)} (float16: GPUs only); default: the model's."),
    _option("load_in", str | None, None, "8bit | 4bit: quantize the LM with bitsandbytes (CUDA GPUs)."),
    _option("device_map", str | None, None, "auto: spread the LM over every visible GPU (accelerate)."),
    _option(
        "trust_remote_code",
        bool,
        False,
        "Run a checkpoint's own Python code (its auto_map) when transformers has no class for it. Off by "
        "default: only for checkpoints you trust.",
        "--trust-remote-code",
    ),
)


def loads_model(command: Callable) -> Callable:
    """Replace the command's `loading` parameter by the OPTIONS; the command receives a checked Loading."""
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "loading"]

    @functools.wraps(command)
    def wrapper(
        *args,
        device: str,
        dtype: str | None,
        load_in: str | None,
        device_map: str | None,
        trust_remote_code: bool,
        **kwargs,
    ):
        loading = Loading(device, dtype, load_in, device_map, trust_remote_code)
        loading.check()
        return command(*args, loading=loading, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*kept, *OPTIONS])
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    return wrapper
